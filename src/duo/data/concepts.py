"""Concepts: what to erase, as a YAML file (built-in presets live in duo/concepts/)."""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from duo.data.splits import empty_held_out, is_held_out, parse_held_out
from duo.data.text import bad_character
from duo.errors import UserError

PRESETS = Path(__file__).resolve().parent.parent / "concepts"
TOP_KEYS = {
    "name",
    "description",
    "judge",
    "judge_options",
    "strength",
    "guidance",
    "steps",
    "resolution",
    "unsafe_words",
    "neighbours",
    "parts",
    "train",
    "held_out",
}
PART_KEYS = {"name", "pairs", "unsafe", "safe", "negative", "vars", "strength"}


@dataclass
class ConceptPart:
    name: str
    pairs: int
    unsafe: str  # template, e.g. "a naked {race} woman, realistic photo"
    safe: str
    vars: dict[str, list[str]] = field(default_factory=dict)
    strength: float | None = None  # overrides the concept's SDEdit strength
    # Negative prompt of the safe edit; the authors use the whole unsafe prompt. Where that prompt also names
    # what must stay (a shape, a background), a template of the concept words alone keeps it.
    negative: str | None = None

    def prompt_pairs(self, seed: int, held_out: dict | None = None) -> list[tuple[str, str, str]]:
        """(unsafe, safe, negative) prompts of every pair: variable combinations shuffled once, then cycled.

        Combinations of the concept's held-out grammar (`duo.data.splits`) are skipped: curation never sees them.
        """
        keys = sorted(self.vars)
        combos = [dict(zip(keys, values)) for values in itertools.product(*(self.vars[k] for k in keys))]
        random.Random(f"{seed}-{self.name}").shuffle(combos)
        combos = [c for c in combos if not is_held_out(c, held_out)] if combos else [{}]
        if not combos:
            raise UserError(f"part '{self.name}': held_out leaves no combination of its variables for curation")
        negative = self.negative or self.unsafe
        return [
            (self.unsafe.format(**c), self.safe.format(**c), negative.format(**c))
            for c in itertools.islice(itertools.cycle(combos), self.pairs)
        ]


@dataclass
class Concept:
    name: str
    parts: list[ConceptPart]
    description: str = ""
    judge: str = "none"
    judge_options: dict = field(default_factory=dict)
    strength: float = 0.75
    guidance: float = 7.5
    steps: int = 50
    resolution: int | None = None
    unsafe_words: list[str] = field(default_factory=list)
    neighbours: list[str] = field(default_factory=list)
    train: dict = field(default_factory=dict)  # training defaults for this concept (explicit flags win)
    held_out: dict = field(default_factory=empty_held_out)  # grammar curation never uses (duo.data.splits)
    source: str = ""

    def part(self, name: str) -> ConceptPart:
        for p in self.parts:
            if p.name == name:
                return p
        raise UserError(f"concept '{self.name}' has no part '{name}'; its parts are {[p.name for p in self.parts]}")

    def to_dict(self) -> dict:
        return asdict(self)

    def judge_spec(self, judge: str | None = None, options: str | dict | None = None) -> tuple[str, dict]:
        """(judge name, options): the one rule every stage applies.

        An explicit judge wins; explicit options (a dict or JSON text) win; otherwise the concept's options,
        but only with the concept's own judge (its thresholds mean nothing to another judge).
        """
        name = judge or self.judge
        if options is None:
            return name, dict(self.judge_options) if name == self.judge else {}
        return name, parse_options(options)


def parse_options(options: str | dict) -> dict:
    if isinstance(options, dict):
        return dict(options)
    import json

    try:
        parsed = json.loads(options)
    except json.JSONDecodeError as exc:
        raise UserError(f'--judge-options is not valid JSON ({exc}); write e.g. \'{{"preset": "rece9"}}\'.') from None
    if not isinstance(parsed, dict):
        raise UserError('--judge-options must be a JSON object, e.g. \'{"preset": "rece9"}\'.')
    return parsed


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_concept(name_or_path: str) -> Concept:
    """A preset name (see `list_presets()`) or the path of a YAML concept file."""
    path = Path(name_or_path)
    if not path.is_file():
        preset = PRESETS / f"{name_or_path}.yaml"
        if not preset.is_file():
            raise UserError(
                f"concept '{name_or_path}' is neither a file nor a preset. Presets: "
                f"{', '.join(list_presets())}. Or write a YAML file (schema in README)."
            )
        path = preset
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"concept file '{path}' is not valid YAML ({exc}). Fix the syntax.") from None
    return concept_from_dict(data, source=str(path))


def _fail(source: str, what: str) -> None:
    raise UserError(f"concept file '{source}': {what}. See the concept schema in README.")


def concept_from_dict(data, source: str = "<dict>") -> Concept:
    if not isinstance(data, dict) or not data:
        _fail(source, "is empty or not a mapping")
    unknown = set(data) - TOP_KEYS
    if unknown:
        _fail(source, f"unknown keys {sorted(unknown)}")
    if not data.get("name"):
        _fail(source, "missing 'name'")
    parts_raw = data.get("parts")
    if not isinstance(parts_raw, list) or not parts_raw:
        _fail(source, "needs a non-empty list 'parts' (each with name, pairs, unsafe, safe)")
    parts = [_part(p, source) for p in parts_raw]
    if len({p.name for p in parts}) != len(parts):
        _fail(source, "part names must be unique")
    kwargs = {k: data[k] for k in TOP_KEYS - {"parts", "held_out"} if k in data}
    kwargs["held_out"] = parse_held_out(data.get("held_out"), source, parts)
    concept = Concept(parts=parts, source=source, **kwargs)
    if not 0.0 < concept.strength <= 1.0:
        _fail(source, f"strength must be in (0, 1], got {concept.strength}")
    _check_numbers(concept, source)
    return concept


def _check_numbers(concept: Concept, source: str) -> None:
    """Values that would only fail deep inside sampling or training fail when the file is read."""
    if not isinstance(concept.steps, int) or concept.steps < 1:
        _fail(source, f"steps must be a positive integer, got {concept.steps!r}")
    if concept.train is None:  # `train:` with nothing under it
        concept.train = {}
    if not isinstance(concept.train, dict):
        _fail(source, f"'train' must be a mapping of training settings, got {concept.train!r}")
    beta = concept.train.get("beta")
    if beta is not None and (not isinstance(beta, int | float) or beta <= 0):
        _fail(source, f"train.beta (β of the DUO loss) must be a positive number, got {beta!r}")
    steps = concept.train.get("steps")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        _fail(source, f"train.steps must be a positive integer, got {steps!r}")


def _part(raw, source: str) -> ConceptPart:
    if not isinstance(raw, dict):
        _fail(source, f"each part must be a mapping, got {raw!r}")
    unknown = set(raw) - PART_KEYS
    missing = {"name", "pairs", "unsafe", "safe"} - set(raw)
    if unknown or missing:
        problems = [f"unknown keys {sorted(unknown)}"] * bool(unknown) + [f"missing {sorted(missing)}"] * bool(missing)
        _fail(source, f"part {raw.get('name', '?')}: {', '.join(problems)} (a part takes {sorted(PART_KEYS)})")
    if not isinstance(raw["pairs"], int) or raw["pairs"] < 1:
        _fail(source, f"part {raw['name']}: 'pairs' must be a positive integer")
    variables = raw.get("vars") or {}
    if not isinstance(variables, dict):
        _fail(source, f"part {raw['name']}: 'vars' must map each variable to a list of values")
    for template in (raw["unsafe"], raw["safe"], raw.get("negative") or ""):
        if not isinstance(template, str):
            _fail(source, f"part {raw['name']}: prompts must be text, got {template!r}")
        if bad := bad_character(template):
            _fail(
                source,
                f"part {raw['name']}: the prompt {template[:40]!r} holds the invisible control character "
                f"U+{ord(bad[1]):04X} at position {bad[0]}; delete it",
            )
        for _, key, _, _ in string.Formatter().parse(template):
            if key is not None and key not in variables:
                _fail(source, f"part {raw['name']}: template '{template}' uses {{{key}}} but vars has no '{key}'")
    if any(not isinstance(v, list) or not v for v in variables.values()):
        _fail(source, f"part {raw['name']}: every var must be a non-empty list")
    return ConceptPart(
        name=str(raw["name"]),
        pairs=raw["pairs"],
        unsafe=raw["unsafe"],
        safe=raw["safe"],
        vars={k: [str(x) for x in v] for k, v in variables.items()},
        strength=raw.get("strength"),
        negative=raw.get("negative"),
    )


def token_prompt(prompt: str, unsafe_words: list[str], token: str) -> str:
    """The prompt with every unsafe word (whole word, any case) replaced by the token; else the token first."""
    words = sorted((w for w in unsafe_words if w.strip()), key=len, reverse=True)
    if words and prompt:
        pattern = r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"
        replaced, count = re.subn(pattern, token, prompt, flags=re.IGNORECASE)
        if count:
            return replaced
    return f"{token} {prompt}" if prompt else token


def words_pattern(words: list[str]) -> re.Pattern | None:
    """Any of the words, whole and in any case (None for no words: nothing matches)."""
    return re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE) if words else None


def merge_concepts(concepts: list[Concept]) -> Concept:
    """What training needs of several concepts erased by one LoRA: their names joined, every unsafe word, and
    the neighbours that show none of the concepts (shapes-red keeps "a purple circle", which shapes-circle
    erases: retaining it would pull against erasing it). Judge, parts and the rest are the first concept's; a
    joined concept is for training only, each concept is still evaluated on its own."""
    words = list(dict.fromkeys(w for c in concepts for w in c.unsafe_words))
    pattern = words_pattern(words)
    neighbours = [n for c in concepts for n in c.neighbours if pattern is None or not pattern.search(n)]
    return dataclasses.replace(
        concepts[0],
        name="+".join(c.name for c in concepts),
        unsafe_words=words,
        neighbours=list(dict.fromkeys(neighbours)),
        parts=[p for c in concepts for p in c.parts],
    )
