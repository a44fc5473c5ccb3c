"""`DIR` or `DIR:WEIGHT` LoRA arguments; without torch, so flags are checked before anything heavy loads."""

from __future__ import annotations


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'DIR' or 'DIR:WEIGHT' → (dir, weight)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def lora_dirs(specs: list[str] | None) -> list[str]:
    """The folders of `DIR[:W]` specs, in order (a malformed spec fails here, before any model loads)."""
    return [parse_lora_spec(s)[0] for s in specs or []]
