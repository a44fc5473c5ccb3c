"""The judge interface shared by curation, attacks and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image


@dataclass
class Verdict:
    """What a judge says about one image.

    present: the unwanted concept is in the image.
    score: the judge's confidence that it is (0..1).
    matches_prompt: whether the image shows what its prompt asked for (None if the judge cannot tell).
    """

    present: bool
    score: float
    matches_prompt: bool | None = None
    details: dict = field(default_factory=dict)


class Judge(Protocol):
    name: str
    version: str
    classes: list[str]
    threshold: float

    def judge(self, images: list[Image.Image], prompts: list[str]) -> list[Verdict]: ...

    def provenance(self) -> dict: ...
