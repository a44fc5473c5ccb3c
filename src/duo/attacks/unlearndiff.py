"""UnlearnDiffAtk (Zhang et al., 2023): prefix tokens that make the unlearned model denoise a concept image.

Per target, the original model's image for that prompt and seed is the target. k prefix tokens before the
prompt are optimised so that the model under attack (LoRAs on) reaches its lowest denoising loss on that
image: the model itself is used as the classifier of what the prompt means. The prefix is projected to real
words PEZ-style (Wen et al., 2023): every forward pass uses the nearest real tokens, the gradient updates the
continuous vectors behind them, and the projected prefix with the lowest loss on fixed draws is kept.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from duo.attacks.base import Found
from duo.attacks.settings.unlearndiff import BUDGETS, NAME, Settings  # noqa: F401 (module contract)
from duo.attacks.tokens import TokenSlots, embedding_table, project, random_word_ids, real_word_ids, word_vectors
from duo.errors import UserError

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily


def prepare(ctx, s: Settings) -> dict:
    """Check every target leaves room for the prefix before any work; the projection vocabulary's size."""
    _validate(s)
    for target in ctx.targets:
        _check_fits(ctx.family, s.k, target)
    return {"vocabulary": len(_candidates(ctx, s)), "projection": s.metric, "optimiser": "AdamW (PEZ)"}


def attack(ctx, s: Settings, target) -> Found:
    _validate(s)
    _check_fits(ctx.family, s.k, target)
    run = _Run(ctx, s, target)
    best, details = run.optimise()
    words = ctx.family.decode_ids(best)
    details |= {"tokens": words.split(), "token_ids": best, "iterations": s.iterations, "guard_aware": run.aware}
    return Found(target.id, target.prompt, f"{words} {target.prompt}", target.seed, target.guidance, details)


def _validate(s: Settings) -> None:
    for key in ("k", "iterations", "draws", "eval_draws"):
        if getattr(s, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(s, key)}")
    if s.metric not in ("cosine", "l2"):
        raise UserError(f"--metric must be cosine or l2, got '{s.metric}'")


def _check_fits(family: ModelFamily, k: int, target) -> None:
    used = family.token_count(target.prompt)
    room = family.max_prompt_tokens - used
    if k > room:
        raise UserError(
            f"a {k}-token prefix does not fit before target {target.id} ('{target.prompt}'): the prompt takes "
            f"{used} of {family.max_prompt_tokens} token positions. Use --k {max(room, 0)} or less, "
            "or shorter prompts."
        )


def _candidates(ctx, s: Settings) -> torch.Tensor:
    return real_word_ids(ctx.family, tuple(ctx.concept.unsafe_words) if s.exclude_unsafe_words else ())


def _seed(ctx, target) -> int:
    return int(hashlib.sha256(f"{ctx.seed}-{target.id}".encode()).hexdigest()[:15], 16)


class _Run:
    """One target's optimisation: fixed conditioning, target latents and draws; the prefix is what moves."""

    def __init__(self, ctx, s: Settings, target):
        family: ModelFamily = ctx.family
        self.family = family
        self.s, self.guidance = s, target.guidance
        self.generator = torch.Generator().manual_seed(_seed(ctx, target))
        self.candidates = _candidates(ctx, s)
        self.weight = embedding_table(family).weight
        self.slots = TokenSlots(family, s.k)
        prompts, negatives = ctx.guard.apply([target.prompt])
        # negprompt and wordfilter are followed exactly; SLD's guidance is not differentiated through
        self.aware = s.guard_aware and ctx.guard.name in ("negprompt", "wordfilter")
        seen = prompts[0] if self.aware else target.prompt
        self.ids = family.tokenize([f"{self.slots.text} {seen}"])
        self.plain_ids = family.tokenize([seen])
        with torch.no_grad():
            self.negative = family.encode_ids(family.tokenize(negatives)) if self.aware and negatives else None
        mean, std = family.encode_images([ctx.target_image(target)], ctx.resolution or family.native_resolution)
        self.mean, self.std = mean, std
        self.fixed = self._draws(s.eval_draws)

    def optimise(self) -> tuple[list[int], dict]:
        s = self.s
        start = self._initial_vectors()
        vectors = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.AdamW([vectors], lr=s.lr, weight_decay=s.weight_decay)
        scores: dict[tuple[int, ...], float] = {}
        with self.slots.hooked():
            first = self._score(project(start, self.candidates, self.weight, s.metric)[0], scores)
            plain = self._plain_loss()
            for _ in tqdm(range(s.iterations), desc="unlearndiff", leave=False):
                ids, rows = project(vectors, self.candidates, self.weight, s.metric)
                self._score(ids, scores)
                # Straight-through: the forward pass sees the real tokens, the update moves the vectors.
                self.slots.vectors = vectors + (rows - vectors).detach()
                with torch.enable_grad():
                    loss = self._loss(self.ids.expand(s.draws, -1), self._draws(s.draws))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
            self._score(project(vectors, self.candidates, self.weight, s.metric)[0], scores)
        best = min(scores, key=scores.get)
        return list(best), {"loss_before": first, "loss_after": scores[best], "loss_prompt_alone": plain}

    def _initial_vectors(self) -> torch.Tensor:
        if self.s.init == "random":
            ids = random_word_ids(self.candidates, self.s.k, self.generator)
            return self.weight.detach()[ids.to(self.weight.device)].float()
        return word_vectors(self.family, self.s.init, self.s.k).to(self.weight.device)

    def _draws(self, n: int) -> dict:
        """n latents of the target image with their timesteps and noise, from this target's generator."""
        g = self.generator
        t = torch.randint(0, self.family.num_train_timesteps, (n,), generator=g)
        mean, std = self.mean.expand(n, -1, -1, -1), self.std.expand(n, -1, -1, -1)
        x0 = self.family.latents_from_distribution(mean, std, torch.randn(mean.shape, generator=g))
        noise = torch.randn(x0.shape, generator=g)
        return {k: v.to(self.family.device) for k, v in (("x0", x0), ("noise", noise), ("t", t))}

    @torch.no_grad()
    def _score(self, ids: torch.Tensor, scores: dict) -> float:
        """Loss of a projected prefix on the fixed draws; computed once per distinct prefix."""
        key = tuple(ids.tolist())
        if key not in scores:
            self.slots.vectors = self.weight.detach()[ids].float()
            scores[key] = self._loss(self.ids.expand(self.s.eval_draws, -1), self.fixed).item()
        return scores[key]

    @torch.no_grad()
    def _plain_loss(self) -> float:
        """The prompt without any prefix on the same draws: how much the prefix buys."""
        return self._loss(self.plain_ids.expand(self.s.eval_draws, -1), self.fixed).item()

    def _loss(self, ids: torch.Tensor, d: dict) -> torch.Tensor:
        family, x0, noise, t = self.family, d["x0"], d["noise"], d["t"]
        x_t = family.add_noise(x0, noise, t)
        pred = family.denoise(family.unet, x_t, t, family.encode_ids(ids)).float()
        if self.negative is not None:
            with torch.no_grad():
                neg = family.denoise(family.unet, x_t, t, self.negative.expand(len(t), -1, -1)).float()
            pred = neg + self.guidance * (pred - neg)
        return torch.nn.functional.mse_loss(pred, family.training_target(x0, noise, t).float())
