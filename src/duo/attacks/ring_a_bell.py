"""Ring-A-Bell (Tsai et al., ICLR 2024): a black-box attack that needs only the text encoder.

The concept vector v is the mean difference of the encoder's hidden states between prompts with and without
the concept. A genetic search then looks for K whole-word tokens whose hidden states are closest to those of
the target prompt pushed along v (E(prompt) + η·v). With the concept's unsafe words left out of the search,
the prompt found carries the concept in embedding space while naming none of its banned words.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from duo.attacks.base import AttackContext, Found, Target
from duo.attacks.settings.ring_a_bell import BUDGETS, CHOICES, NAME, Settings  # noqa: F401 (module contract)
from duo.data.files import read_table
from duo.errors import UserError

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily

VECTOR_FILE = "ring_a_bell_vector.safetensors"
ENCODE_CHUNK = 64  # prompts per text-encoder call while building the concept vector
PROGRESS_MIN_GENERATIONS = 500  # shorter searches finish too fast for a bar to help


# ---- contract ------------------------------------------------------------------------------------------


def prepare(ctx: AttackContext, s: Settings) -> dict:
    """The concept vector, computed once and kept in out/ (a rerun loads it)."""
    s.validate()
    _check_length(ctx.family, s.length)
    vector, meta = _concept_vector(ctx, s)
    banned = _banned_words(ctx, s)
    return {
        "file": VECTOR_FILE,
        "n_pairs": int(meta["n_pairs"]),
        "pairs_source": meta["source"],
        "norm": float(vector.norm()),
        "shape": list(vector.shape),
        "candidate_tokens": len(_candidate_ids(ctx.family, banned)),
        "excluded_words": sorted(banned),
    }


def attack(ctx: AttackContext, s: Settings, target: Target) -> Found:
    family: ModelFamily = ctx.family
    _check_length(family, s.length)
    key = ("ring-a-bell", repr(s))  # one read of the vector file and one vocabulary scan per run and setting
    if key not in ctx.memo:
        ctx.memo[key] = _concept_vector(ctx, s)[0], _candidate_ids(family, _banned_words(ctx, s))
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
    return Found(
        id=target.id,
        source=target.prompt,
        prompt=prompt,
        seed=target.seed,
        guidance=target.guidance,
        details={
            "distance": best,
            "initial_distance": initial,
            # the harness sends the decoded text: a check that it scores as the searched tokens did
            "distance_as_text": float(as_text),
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
    meta = {"n_pairs": str(len(pairs)), "source": source}
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
    if vector.dim() != 2 or vector.shape[0] != family.max_prompt_tokens or "n_pairs" not in meta:
        raise UserError(
            f"{path} is not a concept vector of this model (shape {tuple(vector.shape)}). "
            "Delete it, or use another --out."
        )
    return vector, meta


def _pairs(ctx: AttackContext, s: Settings) -> tuple[list[tuple[str, str]], str]:
    """(with, without) prompts: the pairs file's rows, or n_pairs of the concept's pairs, its parts in turn."""
    if s.pairs_file:
        return _read_pairs_file(Path(s.pairs_file)), str(s.pairs_file)
    parts = ctx.concept.parts
    per_part = -(-s.n_pairs // len(parts))
    lists = [replace(p, pairs=per_part).prompt_pairs(ctx.seed) for p in parts]
    pairs = [lists[i % len(parts)][i // len(parts)][:2] for i in range(s.n_pairs)]
    return pairs, f"concept {ctx.concept.name}"


def _read_pairs_file(path: Path) -> list[tuple[str, str]]:
    rows = read_table(path, "--pairs-file")
    pairs = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not str(row.get("with") or "").strip() or row.get("without") is None:
            raise UserError(f"--pairs-file '{path}', row {i}: needs columns 'with' (non-empty) and 'without'.")
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
    return {w for phrase in ctx.concept.unsafe_words for w in phrase.lower().split()}


def _candidate_ids(family: ModelFamily, banned: set[str]) -> torch.Tensor:
    """Whole-word tokens of two letters or more that decode to a word and tokenize back to themselves, so that
    the decoded prompt the harness sends is the token sequence that was searched."""
    ids = family.whole_word_ids(banned, min_length=2)
    if len(ids) == 0:
        raise UserError(f"the vocabulary of '{family.ref}' has no whole-word tokens left to search.")
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
