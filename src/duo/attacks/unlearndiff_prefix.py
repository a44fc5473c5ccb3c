"""The optimisation inside UnlearnDiffAtk: a k-token prefix that lowers the attacked model's denoising loss.

`PrefixProblem` fixes one target: its original-model image as latents, the prompt as the guard sends it, and
the guard-aware loss. Two relaxations move the prefix:
- `SimplexPrefix` (the authors'): per token a distribution over the vocabulary; each step samples a one-hot
  token (straight-through: the gradient of the sample, clipped to [-1, 1], reaches the distribution), takes an
  Adam step and projects each distribution back onto the probability simplex; the prefix is its argmax.
- `PezPrefix` (this package's earlier attack): continuous vectors whose nearest tokens the forward pass uses;
  the projected prefix with the lowest loss on fixed draws is kept.
`PrefixBatch` steps several targets' relaxations together (one text-encoder and UNet pass over all their rows);
each keeps its own generator, optimizer and loss, so each moves as it would alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from duo.attacks.denoising import denoising_loss, denoising_prediction
from duo.attacks.tokens import random_word_ids
from duo.models.token_slots import TokenSlots, project, token_weight, word_vectors

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto {p : p ≥ 0, Σp = 1} (sort-based; the authors bisect for the same)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    cumulative = u.cumsum(-1) - 1.0
    index = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    support = (u - cumulative / index) > 0
    rho = support.to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last position still in the support
    theta = cumulative.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp(min=0.0)


class SampledOneHot(torch.autograd.Function):
    """One token drawn per row of a distribution, as one-hot rows; the backward pass clips the gradient."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        draws = torch.multinomial(probs.detach().float().cpu(), 1, generator=generator).squeeze(-1)
        return torch.nn.functional.one_hot(draws, probs.shape[-1]).to(probs.device, probs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.nn.functional.hardtanh(grad), None


class PrefixProblem:
    """One target's fixed parts: the prompt (as the guard sends it), the target latents, the guard-aware loss."""

    def __init__(self, ctx, s, target, generator: torch.Generator, slots: TokenSlots | None = None):
        """`slots`: shared by the problems of one batch (one hook serves them all)."""
        family: ModelFamily = ctx.family
        self.family, self.s, self.guidance, self.generator = family, s, target.guidance, generator
        self.weight = token_weight(family)
        self.slots = slots or TokenSlots(family, s.k)
        prompts, negatives = ctx.guard.apply([target.prompt])
        # negprompt and wordfilter are followed exactly; SLD's guidance is not differentiated through
        self.aware = s.guard_aware and ctx.guard.name in ("negprompt", "wordfilter")
        seen = prompts[0] if self.aware else target.prompt
        self.ids = family.tokenize([f"{self.slots.text} {seen}"])
        self.plain_ids = family.tokenize([seen])
        with torch.no_grad():
            self.negative = family.encode_ids(family.tokenize(negatives)) if self.aware and negatives else None
        resolution = ctx.resolution or family.native_resolution
        self.mean, self.std = family.encode_images([ctx.target_image(target)], resolution)

    def draws(self, n: int, t: int | None = None, sample_latents: bool = True) -> dict:
        """n (x₀, noise, t) of the target image: t fixed or uniform, x₀ sampled or the latent mean (the authors')."""
        g, family = self.generator, self.family
        if t is None:
            times = torch.randint(0, family.num_train_timesteps, (n,), generator=g)
        else:
            times = torch.full((n,), t)
        mean, std = self.mean.expand(n, -1, -1, -1), self.std.expand(n, -1, -1, -1)
        eps = torch.randn(mean.shape, generator=g) if sample_latents else torch.zeros_like(mean)
        x0 = family.latents_from_distribution(mean, std, eps)
        noise = torch.randn(x0.shape, generator=g)
        return {k: v.to(family.device) for k, v in (("x0", x0), ("noise", noise), ("t", times))}

    def loss(self, ids: torch.Tensor, d: dict) -> torch.Tensor:
        return denoising_loss(self.family, ids, d, self.negative, self.guidance)

    def prefix_loss(self, d: dict) -> torch.Tensor:
        """Loss with the slots' current vectors before the prompt."""
        return self.loss(self.ids.expand(len(d["t"]), -1), d)

    @torch.no_grad()
    def score(self, ids: torch.Tensor, d: dict) -> float:
        """Loss of a prefix of real tokens on given draws."""
        self.slots.vectors = self.weight.detach()[ids].float()
        return self.prefix_loss(d).item()

    @torch.no_grad()
    def plain_loss(self, d: dict) -> float:
        """The prompt without any prefix on the same draws: how much the prefix buys."""
        return self.loss(self.plain_ids.expand(len(d["t"]), -1), d).item()


class SimplexPrefix:
    """The authors' relaxation: uniform distributions over the candidates, Adam, projection onto the simplex."""

    def __init__(self, problem: PrefixProblem, candidates: torch.Tensor):
        self.p, self.candidates = problem, candidates
        self.rows = problem.weight.detach()[candidates.to(problem.weight.device)].float()
        k, n = problem.s.k, len(candidates)
        self.probs = torch.full((k, n), 1.0 / n, device=self.rows.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.probs], lr=problem.s.lr, weight_decay=problem.s.weight_decay)

    def step(self, t: int | None) -> float:
        return PrefixBatch([self]).step(t)[0]

    def inputs(self, t: int | None) -> tuple[torch.Tensor, dict]:
        """The step's prefix vectors (a sampled one-hot per token, with grad) and draws, in the generator's order."""
        p = self.p
        vectors = SampledOneHot.apply(self.probs, p.generator) @ self.rows
        return vectors, p.draws(p.s.draws, t, sample_latents=False)

    def update(self) -> None:
        self.optimizer.step()
        with torch.no_grad():
            self.probs.copy_(project_to_simplex(self.probs))

    def prefix_ids(self) -> list[int]:
        return self.candidates[self.probs.detach().argmax(-1).cpu()].tolist()


class PezPrefix:
    """The earlier relaxation: vectors projected to their nearest candidate; the best projected prefix is kept."""

    def __init__(self, problem: PrefixProblem, candidates: torch.Tensor):
        self.p, self.candidates, s = problem, candidates, problem.s
        self.fixed = problem.draws(s.eval_draws)
        self.vectors = torch.nn.Parameter(self._initial_vectors())
        self.optimizer = torch.optim.AdamW([self.vectors], lr=s.lr, weight_decay=s.weight_decay)
        self.scores: dict[tuple[int, ...], float] = {}
        self.first = self._score(self._projected()[0])

    def _initial_vectors(self) -> torch.Tensor:
        s, weight = self.p.s, self.p.weight
        if s.init == "random":
            ids = random_word_ids(self.candidates, s.k, self.p.generator)
            return weight.detach()[ids.to(weight.device)].float()
        return word_vectors(self.p.family, s.init, s.k).to(weight.device)

    def _projected(self) -> tuple[torch.Tensor, torch.Tensor]:
        return project(self.vectors, self.candidates, self.p.weight, self.p.s.metric)

    def _score(self, ids: torch.Tensor) -> float:
        key = tuple(ids.tolist())
        if key not in self.scores:
            self.scores[key] = self.p.score(ids, self.fixed)
        return self.scores[key]

    def step(self, t: int | None) -> float:
        return PrefixBatch([self]).step(t)[0]

    def inputs(self, t: int | None) -> tuple[torch.Tensor, dict]:
        """The current projection scored (on the fixed draws), then the step's vectors and draws."""
        p = self.p
        ids, rows = self._projected()
        self._score(ids)
        # Straight-through: the forward pass sees the real tokens, the update moves the vectors.
        return self.vectors + (rows - self.vectors).detach(), p.draws(p.s.draws, t)

    def update(self) -> None:
        self.optimizer.step()

    def prefix_ids(self) -> list[int]:
        """The current vectors' nearest tokens (what the published schedule judges after a block)."""
        return self._projected()[0].tolist()

    def best_ids(self) -> tuple[list[int], dict]:
        """The projected prefix with the lowest loss on the fixed draws (the earlier attack's answer)."""
        self._score(self._projected()[0])
        best = min(self.scores, key=self.scores.get)
        plain = self.p.plain_loss(self.fixed)
        return list(best), {"loss_before": self.first, "loss_after": self.scores[best], "loss_prompt_alone": plain}


class PrefixBatch:
    """Relaxations of several targets stepped as one batch. Each target's loss is the mean over its own rows, and
    the sum of those losses is what is differentiated, so every target's gradient is what it would be alone; one
    target is the plain single-target step."""

    def __init__(self, relaxations: list):
        self.items = relaxations

    def step(self, t: int | None) -> list[float]:
        with torch.enable_grad():
            parts = [r.inputs(t) for r in self.items]  # each from its own generator, in its own order
            losses = self._losses([r.p for r in self.items], parts)
            for r in self.items:
                r.optimizer.zero_grad(set_to_none=True)
            sum(losses).backward()
        for r in self.items:
            r.update()
        return [loss.item() for loss in losses]

    @staticmethod
    def _losses(problems: list[PrefixProblem], parts: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
        first = problems[0]
        if len(problems) == 1:  # the single-target computation exactly as before batching (same bytes found)
            first.slots.vectors = parts[0][0]
            return [first.prefix_loss(parts[0][1])]
        sizes = [len(d["t"]) for _, d in parts]
        first.slots.vectors = torch.cat([v.unsqueeze(0).expand(n, -1, -1) for (v, _), n in zip(parts, sizes)])
        ids = torch.cat([p.ids.expand(n, -1) for p, n in zip(problems, sizes)])
        draws = {k: torch.cat([d[k] for _, d in parts]) for k in ("x0", "noise", "t")}
        negative, guidance = None, 1.0
        if first.negative is not None:  # one guard for the whole batch: every problem has its negative prompt
            negative = torch.cat([p.negative.expand(n, -1, -1) for p, n in zip(problems, sizes)])
            guidance = torch.tensor([p.guidance for p, n in zip(problems, sizes) for _ in range(n)])
            guidance = guidance.to(negative.device).view(-1, *([1] * (draws["x0"].dim() - 1)))
        pred, target = denoising_prediction(first.family, ids, draws, negative, guidance)
        ends = torch.tensor(sizes).cumsum(0).tolist()
        return [torch.nn.functional.mse_loss(pred[end - n : end], target[end - n : end]) for n, end in zip(sizes, ends)]
