"""Ring-A-Bell (Tsai et al., ICLR 2024): a black-box attack that needs only the text encoder.

The concept vector v is the mean difference of the encoder's hidden states between prompts with and without
the concept, over many diverse pairs (the preset's shipped file for nudity and violence, `--pairs-file`, or the
concept's own grammar). A genetic search then looks for K tokens whose hidden states, padding included, are
closest to those of the target prompt pushed along v (E(prompt) + η·v), and the decoded tokens are the prompt.

As published (the defaults): the search draws from every token of the vocabulary, sub-word pieces included,
and bans nothing, so a prompt found may name the concept, and its decoded text may tokenize into other ids
than those searched (each prompt records `retokenizes_exactly` and `distance_as_text`, the distance its text
reaches). Stricter, behind flags: `--vocabulary whole-words` searches only whole words that survive decoding
unchanged; `--exclude-unsafe-words` drops the concept's unsafe words from either vocabulary.
Other differences from the authors' notebooks: the elite is never mutated (settings), the distance is the mean
rather than the sum of squares (same ranking), "special" tokens are the family's own (the authors skip id 0,
'!', as well), and the shipped pairs are written for this package and not judge-filtered (the authors dropped
the nudity pairs whose images NudeNet did not flag).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from duo.attacks.base import AttackContext, Found, Target
from duo.attacks.settings.ring_a_bell import BUDGETS, CHOICES, NAME, Settings  # noqa: F401 (module contract)
from duo.attacks.tokens import full_vocabulary_ids
from duo.data.files import read_table
from duo.errors import UserError

if TYPE_CHECKING:
    from duo.data.concepts import Concept
    from duo.models.protocol import ModelFamily

VECTOR_FILE = "ring_a_bell_vector.safetensors"
SHIPPED_PAIRS = Path(__file__).resolve().parent.parent / "concepts" / "ring_a_bell"  # <concept name>.csv
ENCODE_CHUNK = 64  # prompts per text-encoder call while building the concept vector
PROGRESS_MIN_GENERATIONS = 500  # shorter searches finish too fast for a bar to help


# ---- contract ------------------------------------------------------------------------------------------


def prepare(ctx: AttackContext, s: Settings) -> dict:
    """The concept vector, computed once and kept in out/ (a rerun loads it), and what the search draws from."""
    s.validate()
    _check_length(ctx.family, s.length)
    vector, meta = _concept_vector(ctx, s)
    banned = _banned_words(ctx, s)
    return {
        "file": VECTOR_FILE,
        "n_pairs": int(meta["n_pairs"]),
        "pairs_source": meta.get("source"),
        "pairs_sha256": meta.get("pairs_sha256"),
        "norm": float(vector.norm()),
        "shape": list(vector.shape),
        "vocabulary": s.vocabulary,
        "candidate_tokens": len(_candidate_ids(ctx.family, s.vocabulary, banned)),
        "excluded_words": sorted(banned),
    }


def attack(ctx: AttackContext, s: Settings, target: Target) -> Found:
    family: ModelFamily = ctx.family
    _check_length(family, s.length)
    key = ("ring-a-bell", repr(s))  # one read of the vector file and one vocabulary scan per run and setting
    if key not in ctx.memo:
        ctx.memo[key] = _concept_vector(ctx, s)[0], _candidate_ids(family, s.vocabulary, _banned_words(ctx, s))
    vector, candidates = ctx.memo[key]
    with torch.no_grad():
        target_emb = family.encode_ids(family.tokenize([target.prompt]))[0].float()
    if target_emb.shape != vector.shape:
        raise UserError(
            f"{ctx.out / VECTOR_FILE} has shape {tuple(vector.shape)} but the model's prompts encode to "
            f"{tuple(target_emb.shape)}: it was made for another model. Delete it, or use another --out."
        )
    goal = target_emb + s.eta * vector.to(target_emb.device)
    generator = torch.Generator().manual_seed(_seed(ctx.seed, target.id))
    search = _Search(family, s, goal, candidates, generator)
    tokens, best, initial = search.run(desc=f"ring-a-bell {target.id}")
    prompt = family.decode_ids(tokens)
    with torch.no_grad():
        as_text = _distances(family.encode_ids(family.tokenize([prompt])).float(), goal, s.distance)[0]
    # full-vocabulary pieces may merge or split once the text is tokenized again: the harness sends the text
    retokenizes = family.text_token_ids(prompt) == tokens
    return Found(
        id=target.id,
        source=target.prompt,
        prompt=prompt,
        seed=target.seed,
        guidance=target.guidance,
        details={
            "distance": best,
            "initial_distance": initial,
            # the harness sends the decoded text: what it scores, and whether it is the searched tokens
            "distance_as_text": float(as_text),
            "retokenizes_exactly": retokenizes,
            "vocabulary": s.vocabulary,
            "tokens": tokens,
            "generations": s.generations,
            "eta": s.eta,
            "length": s.length,
            "metric": s.distance,
        },
    )


# ---- the concept vector ----------------------------------------------------------------------------------


def _concept_vector(ctx: AttackContext, s: Settings) -> tuple[torch.Tensor, dict]:
    path = ctx.out / VECTOR_FILE
    if path.is_file():
        return _load_vector(path, ctx.family)
    pairs, source = _pairs(ctx, s)
    vector = _mean_difference(ctx.family, pairs)
    meta = {"n_pairs": str(len(pairs)), "source": source, "pairs_sha256": pairs_sha256(pairs)}
    _save_vector(path, vector, meta)
    return vector, meta


def _mean_difference(family: ModelFamily, pairs: list[tuple[str, str]]) -> torch.Tensor:
    total = None
    for start in range(0, len(pairs), ENCODE_CHUNK):
        chunk = pairs[start : start + ENCODE_CHUNK]
        with torch.no_grad():
            with_concept = family.encode_ids(family.tokenize([w for w, _ in chunk])).float()
            without = family.encode_ids(family.tokenize([wo for _, wo in chunk])).float()
        diff = (with_concept - without).sum(0).cpu()
        total = diff if total is None else total + diff
    return total / len(pairs)


def _save_vector(path: Path, vector: torch.Tensor, meta: dict) -> None:
    from safetensors.torch import save

    from duo.data.files import atomic_write_bytes

    atomic_write_bytes(path, save({"vector": vector.contiguous()}, metadata=meta))


def _load_vector(path: Path, family: ModelFamily) -> tuple[torch.Tensor, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            vector, meta = f.get_tensor("vector").float(), dict(f.metadata() or {})
    except (SafetensorError, OSError, KeyError) as exc:
        raise UserError(f"{path} cannot be read ({exc}). Delete it: the next run recomputes it.") from None
    # a family's conditioning may hold rows beyond the token positions (a pooled vector): at least as many
    if vector.dim() != 2 or vector.shape[0] < family.max_prompt_tokens or "n_pairs" not in meta:
        raise UserError(
            f"{path} is not a concept vector of this model (shape {tuple(vector.shape)}). "
            "Delete it, or use another --out."
        )
    return vector, meta


def _pairs(ctx: AttackContext, s: Settings) -> tuple[list[tuple[str, str]], str]:
    """(with, without) prompts: --pairs-file, else the preset's shipped file, else the concept's grammar."""
    if s.pairs_file:
        return _read_pairs_file(Path(s.pairs_file)), str(s.pairs_file)
    shipped = shipped_pairs_file(ctx.concept.name)
    if shipped is not None:
        return _read_pairs_file(shipped), f"shipped {shipped.parent.name}/{shipped.name}"
    return _grammar_pairs(ctx.concept, ctx.seed, s.n_pairs), f"concept {ctx.concept.name}"


def shipped_pairs_file(concept_name: str) -> Path | None:
    path = SHIPPED_PAIRS / f"{concept_name}.csv"
    return path if path.is_file() else None


def pairs_sha256(pairs: list[tuple[str, str]]) -> str:
    """Hash of the pairs as used ("with<TAB>without" lines), whatever file or grammar they came from."""
    return hashlib.sha256("".join(f"{w}\t{wo}\n" for w, wo in pairs).encode()).hexdigest()


def _grammar_pairs(concept: Concept, seed: int, n: int) -> list[tuple[str, str]]:
    """n of the concept's pairs, its parts in turn."""
    parts = concept.parts
    per_part = -(-n // len(parts))
    lists = [replace(p, pairs=per_part).prompt_pairs(seed) for p in parts]
    return [lists[i % len(parts)][i // len(parts)][:2] for i in range(n)]


def _read_pairs_file(path: Path) -> list[tuple[str, str]]:
    rows = read_table(path, "--pairs-file")
    pairs = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not str(row.get("with") or "").strip() or row.get("without") is None:
            raise UserError(f"--pairs-file '{path}', row {i}: needs columns 'with' (non-empty) and 'without'.")
        if None in row:  # csv puts cells beyond the header under None: an unquoted comma split a prompt
            raise UserError(f"--pairs-file '{path}', row {i}: more cells than columns; quote prompts with commas.")
        pairs.append((str(row["with"]).strip(), str(row["without"]).strip()))
    if not pairs:
        raise UserError(f"--pairs-file '{path}' has no rows.")
    return pairs


# ---- what may be searched ----------------------------------------------------------------------------------


def _check_length(family: ModelFamily, length: int) -> None:
    most = family.max_prompt_tokens - 2  # BOS and EOS take two positions
    if length > most:
        raise UserError(
            f"--length {length} does not fit: '{family.ref}' takes {family.max_prompt_tokens} tokens per prompt, "
            f"BOS and EOS included, so at most {most}. Pass --length {most} or less."
        )


def _banned_words(ctx: AttackContext, s: Settings) -> set[str]:
    # every word of a phrase ("exposed breasts"): a searched prompt could otherwise spell the phrase out
    if not s.exclude_unsafe_words:
        return set()
    return {w.lower() for phrase in ctx.concept.unsafe_words for w in re.findall(r"[^\W\d_]+", phrase)}


def _candidate_ids(family: ModelFamily, vocabulary: str, banned: set[str]) -> torch.Tensor:
    """The token ids the search draws from.

    full: every non-special token (the authors'), less those that decode to a banned word (any case);
    whole-words: whole-word tokens of two letters or more that decode to a word and tokenize back to themselves,
    so that the decoded prompt the harness sends is the token sequence that was searched.
    """
    if vocabulary == "whole-words":
        ids = family.whole_word_ids(banned, min_length=2)
    else:
        ids = full_vocabulary_ids(family, banned)
    if len(ids) == 0:
        raise UserError(f"the vocabulary of '{family.ref}' has no {vocabulary} tokens left to search.")
    return ids


# ---- the genetic search ----------------------------------------------------------------------------------


def _seed(seed: int, target_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}-{target_id}".encode()).digest()[:8], "little") >> 1


def _distances(embs: torch.Tensor, goal: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance of each (tokens, dim) sequence in embs to goal, over the whole sequence (padding included,
    as the authors do)."""
    flat, target = embs.flatten(1), goal.flatten().unsqueeze(0)
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(flat, target, dim=1)
    return ((flat - target) ** 2).mean(1)


class _Search:
    """Genes are indices into the candidate tokens; a population is a (P, K) tensor, kept sorted by fitness."""

    def __init__(self, family: ModelFamily, s: Settings, goal: torch.Tensor, candidates: torch.Tensor, generator):
        self.family, self.s, self.goal, self.candidates, self.g = family, s, goal, candidates, generator
        self.n_elite = max(1, math.floor(s.elite * s.population))
        self.n_children = s.population - self.n_elite

    def run(self, desc: str) -> tuple[list[int], float, float]:
        from tqdm.auto import tqdm

        s = self.s
        pop = self._random_genes(s.population)
        pop, scores = self._sorted(pop, self._score(pop))
        initial = float(scores[0])
        for _ in tqdm(range(s.generations), desc=desc, leave=False, disable=s.generations < PROGRESS_MIN_GENERATIONS):
            children = self._mutate(self._crossover(pop, scores))
            pop = torch.cat([pop[: self.n_elite], children])
            scores = torch.cat([scores[: self.n_elite], self._score(children)])
            pop, scores = self._sorted(pop, scores)
        return self.candidates[pop[0]].tolist(), float(scores[0]), initial

    def _random_genes(self, n: int) -> torch.Tensor:
        return torch.randint(len(self.candidates), (n, self.s.length), generator=self.g)

    @staticmethod
    def _sorted(pop: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort(scores, stable=True)
        return pop[order], scores[order]

    def _score(self, genes: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            embs = self.family.encode_ids(self.family.prompt_ids(self.candidates[genes])).float()
        return _distances(embs, self.goal, self.s.distance).cpu()

    def _parents(self, scores: torch.Tensor, n: int) -> torch.Tensor:
        """Indices into the sorted population: the lower, the fitter."""
        size = len(scores)
        if self.s.selection == "tournament":
            return torch.randint(size, (n, self.s.tournament_size), generator=self.g).min(1).values
        pool = max(1, math.ceil(self.s.parents * size))
        return torch.randint(pool, (n,), generator=self.g)

    def _crossover(self, pop: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, k = self.n_children, self.s.length
        first = pop[self._parents(scores, n)]
        second = pop[self._parents(scores, n)]
        if self.s.crossover == "uniform":
            take_second = torch.rand(n, k, generator=self.g) < 0.5
        else:
            point = torch.randint(1, max(2, k), (n, 1), generator=self.g)
            take_second = torch.arange(k).unsqueeze(0) >= point
        mixes = torch.rand(n, 1, generator=self.g) < self.s.crossover_rate
        return torch.where(take_second & mixes, second, first)

    def _mutate(self, genes: torch.Tensor) -> torch.Tensor:
        n, k = genes.shape
        if self.s.mutation == "per-token":
            mask = torch.rand(n, k, generator=self.g) < self.s.mutation_rate
        else:
            position = torch.randint(k, (n, 1), generator=self.g)
            mutated = torch.rand(n, 1, generator=self.g) < self.s.mutation_rate
            mask = (torch.arange(k).unsqueeze(0) == position) & mutated
        return torch.where(mask, self._random_genes(n), genes)
