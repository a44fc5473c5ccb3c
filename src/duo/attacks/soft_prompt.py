"""Soft prompt: continuous text-encoder input vectors, never projected to tokens (the white-box upper bound).

Every prompt attack picks its input embeddings from the token table; this one may pick any vector, so what it
cannot bring back no prompt can. No paper publishes it: `paper` is our chosen full setting. Per target, k
vectors placed before the prompt as the guard sends it (the filtered prompt under `wordfilter`; the guided
prediction ε_neg + g·(ε_cond − ε_neg) under `negprompt`, as `unlearndiff`) are trained with Adam on the
denoising loss of the model under attack (LoRAs on): random timesteps over the whole range, fresh noise, on the
original model's image of the target (UnlearnDiffAtk's target; `--learn-from concept|both` uses the run's one
judge-filtered concept image set instead or as well). Every `eval_every` steps the vectors are scored on fixed
draws (the lowest-scoring are kept) and, as UnlearnDiffAtk does after each block, the harness's first image
(target seed, under the guard) is generated with them and judged, with one check seed the harness never uses:
the attack stops when both show the concept. Optionally the prompt's own positions train too.

Choices, measured on Shapes (shapes-red, original model, negprompt, small budget, 8 targets × 2 images unless
said): images of the target beat the concept set and both (ASR 1.00 / 0.81 / 0.63 at 100 steps, judge off);
stopping at the first judged success is as strong as running all 100 steps (16 targets: 0.94 / 0.97) and
faster; the check seed kept 2 of 8 targets optimising after a lucky draw but changed no ASR there (0.875 both);
k = 5 is UnlearnDiffAtk's prefix, so its search space holds every prefix UnlearnDiffAtk can find.

Generation: each target gets its own placeholder token `<soft_{target id}_x{n}>` carrying its n vectors as a
textual-inversion file (out/soft_prompt/{target id}.safetensors). The found prompt is that token followed by
the target prompt, so `duo attack prompts --prompts-file out/prompts.csv` cannot replay it (no model knows the
token) but this run can: prepare() installs the vectors of every target already found, and the harness calls
it in every session that loads the model. The name is one regex word (underscores, no hyphens), so the word
filter never cuts into it; attack() checks that the guard leaves it whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from duo.attacks.base import Found
from duo.attacks.denoising import denoising_loss
from duo.attacks.settings.soft_prompt import BUDGETS, NAME, Settings  # noqa: F401 (module contract)
from duo.attacks.tokens import random_word_ids, real_word_ids
from duo.data.files import atomic_write_text
from duo.errors import UserError
from duo.models.token_slots import TokenSlots, token_weight, word_vectors
from duo.seeds import derive_seed

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily

FOLDER = "soft_prompt"
EVAL_CHUNK = 8  # draws per no-grad forward pass when scoring (memory on large models)
log = logging.getLogger(__name__)


def token_name(target_id: str, n: int) -> str:
    """The target's placeholder; the vector count is in the name, so runs with another k never share rows."""
    return f"<soft_{re.sub(r'[^0-9A-Za-z]', '_', target_id)}_x{n}>"


def prepare(ctx, s: Settings) -> dict:
    """Check every target fits, load the concept images once, and install the vectors of targets already found."""
    s.validate()
    for target in ctx.targets:
        _check_fits(ctx.family, s, _seen_prompt(ctx, s, target), target)
    images = _concept_latents(ctx, s)[2] if s.learn_from != "target" else None
    installed = sum(_install_saved(ctx, s, target) is not None for target in ctx.targets)
    return {
        "learn_from": s.learn_from,
        "concept_images": images,
        "installed": installed,
        "folder": str(ctx.out / FOLDER),
        "optimiser": "Adam",
        "projection": None,
    }


def attack(ctx, s: Settings, target) -> Found:
    s.validate()
    seen = _seen_prompt(ctx, s, target)
    _check_fits(ctx.family, s, seen, target)
    record = _install_saved(ctx, s, target)
    if record is None:
        run = _Run(ctx, s, target, seen)
        vectors, details = run.optimise()
        record = _save(ctx, s, target, vectors, details | vector_stats(ctx.family, vectors))
        _install_saved(ctx, s, target)
    token, details = record["token"], record["details"]
    prompt = token if s.train_prompt else f"{token} {target.prompt}"
    sent = ctx.guard.apply([prompt])[0][0]
    if token not in sent.split():
        raise UserError(f"guard '{ctx.guard.name}' changed the soft-prompt token {token} in '{sent}'.")
    return Found(target.id, target.prompt, prompt, target.seed, target.guidance, details)


def _aware(ctx, s: Settings) -> bool:
    # negprompt and wordfilter are followed exactly; SLD's guidance is not differentiated through
    return s.guard_aware and ctx.guard.name in ("negprompt", "wordfilter")


def _seen_prompt(ctx, s: Settings, target) -> str:
    """The prompt text the model receives after the guard (the one the vectors are trained with)."""
    return ctx.guard.apply([target.prompt])[0][0] if _aware(ctx, s) else target.prompt


def _check_fits(family: ModelFamily, s: Settings, seen: str, target) -> None:
    used = family.token_count(seen)
    room = family.max_prompt_tokens - used
    if s.k > room:
        raise UserError(
            f"{s.k} soft-prompt vectors do not fit before target {target.id} ('{target.prompt}'): the prompt takes "
            f"{used} of {family.max_prompt_tokens} token positions. Use --k {max(room, 0)} or less, or shorter prompts."
        )


# ---- files: one textual-inversion file and one record per target ----------------------------------------
def _paths(ctx, target) -> tuple:
    folder = ctx.out / FOLDER
    return folder / f"{target.id}.safetensors", folder / f"{target.id}.json"


def _fingerprint(ctx, s: Settings, target) -> dict:
    return {"settings": asdict(s), "seed": ctx.seed, "guard": ctx.guard.name, "prompt": target.prompt}


def file_sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(ctx, s: Settings, target, vectors: torch.Tensor, details: dict) -> dict:
    """Vectors first (atomically), then the record: a record means its vectors file is whole."""
    path, record_path = _paths(ctx, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = token_name(target.id, len(vectors))
    tmp = path.with_name(f".{path.name}.tmp")
    ctx.family.save_textual_inversion(tmp, token, vectors.detach().float().cpu())
    os.replace(tmp, path)
    details |= {"token": token, "vectors_file": str(path), "vectors_sha256": file_sha256(path)}
    record = {"token": token, "fingerprint": _fingerprint(ctx, s, target), "details": details}
    atomic_write_text(record_path, json.dumps(record, indent=2))
    return record


def _install_saved(ctx, s: Settings, target) -> dict | None:
    """Install a target's saved vectors in the family and return its record; None if not found yet."""
    path, record_path = _paths(ctx, target)
    if not (record_path.is_file() and path.is_file()):
        return None
    record = json.loads(record_path.read_text())
    if record.get("fingerprint") != _fingerprint(ctx, s, target):
        log.warning("ignoring %s: written with other settings; optimising %s again", record_path, target.id)
        return None
    if file_sha256(path) != record["details"]["vectors_sha256"]:
        raise UserError(f"{path} does not match the sha256 in {record_path}; delete both to optimise it again.")
    ctx.family.load_textual_inversion(path, record["token"])
    return record


# ---- what the vectors are ---------------------------------------------------------------------------------
@torch.no_grad()
def vector_stats(family: ModelFamily, vectors: torch.Tensor) -> dict:
    """How far the vectors went from real tokens: their norms, and the nearest real token row (L2) of each."""
    weight = token_weight(family).detach().float()
    real = family.regular_token_ids().to(weight.device)
    rows = weight[real]
    v = vectors.detach().float().to(weight.device)
    distance = torch.cdist(v, rows)
    nearest = distance.argmin(-1)
    return {
        "norm": [round(float(x), 4) for x in v.norm(dim=-1)],
        "real_token_norm_mean": round(float(rows.norm(dim=-1).mean()), 4),
        "nearest_token_distance": [round(float(x), 4) for x in distance.min(-1).values],
        "nearest_tokens": [family.decode_ids([int(real[i])]) for i in nearest],
    }


def _concept_latents(ctx, s: Settings) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(mean, std, provenance) of the run's concept images: one set for every target (and row)."""
    key = (FOLDER, "concept-latents", s.n_images)
    if key not in ctx.memo:
        images, _, provenance = ctx.concept_images(s.n_images)
        if not images:
            raise UserError("the soft-prompt attack found no images of the concept; pass --images FOLDER.")
        family: ModelFamily = ctx.family
        mean, std = family.encode_images(images, ctx.resolution or family.native_resolution)
        ctx.memo[key] = (mean, std, provenance)
    return ctx.memo[key]


# ---- optimisation -----------------------------------------------------------------------------------------
class _Run:
    """One target: fixed conditioning layout, image pool and scoring draws; the vectors are what moves."""

    def __init__(self, ctx, s: Settings, target, seen: str):
        family: ModelFamily = ctx.family
        self.family, self.s, self.guidance = family, s, target.guidance
        self.generator = torch.Generator().manual_seed(derive_seed(ctx.seed, FOLDER, target.id))
        self.weight = token_weight(family)
        self.prompt_ids = family.text_token_ids(seen) if s.train_prompt else []
        self.slots = TokenSlots(family, s.k + len(self.prompt_ids))
        text = self.slots.text if s.train_prompt else f"{self.slots.text} {seen}"
        self.ids, self.plain_ids = family.tokenize([text]), family.tokenize([seen])
        # what the judge-in-the-loop generates: the slots where the found prompt has its token, before the guard
        self.slot_prompt = self.slots.text if s.train_prompt else f"{self.slots.text} {target.prompt}"
        self.ctx, self.target = ctx, target
        self.judging = s.stop_on_success and ctx.judge is not None
        if self.judging and self.slots.text not in ctx.guard.apply([self.slot_prompt])[0][0]:
            raise UserError(
                f"guard '{ctx.guard.name}' changes the placeholders {self.slots.text}; use --no-stop-on-success."
            )
        _, negatives = ctx.guard.apply([target.prompt])
        with torch.no_grad():
            aware = _aware(ctx, s) and negatives
            self.negative = family.encode_ids(family.tokenize(negatives)) if aware else None
        self.mean, self.std, self.probs, self.images = self._pool(ctx, s, target)
        fixed = torch.Generator().manual_seed(derive_seed(ctx.seed, FOLDER, "eval", target.id))
        self.fixed = self._draws(s.eval_draws, fixed)
        self.aware = bool(_aware(ctx, s))

    def _pool(self, ctx, s: Settings, target) -> tuple:
        """Latent distributions of the images learned from, and the chance of each per draw."""
        means, stds, record = [], [], {"learn_from": s.learn_from}
        if s.learn_from in ("concept", "both"):
            mean, std, record["concept_images"] = _concept_latents(ctx, s)
            means.append(mean)
            stds.append(std)
        if s.learn_from in ("target", "both"):
            image = ctx.target_image(target)
            target_file = ctx.out / "targets" / f"{target.id}.png"
            record["target_image"] = {"file": str(target_file), "sha256": file_sha256(target_file)}
            mean, std = self.family.encode_images([image], ctx.resolution or self.family.native_resolution)
            means.append(mean)
            stds.append(std)
        sizes = [len(m) for m in means]
        # "both": half the draws on the target image, half on the concept set
        probs = torch.cat([torch.full((n,), 1.0 / (n * len(sizes))) for n in sizes])
        return torch.cat(means), torch.cat(stds), probs, record

    def _draws(self, n: int, g: torch.Generator) -> dict:
        family = self.family
        idx = torch.multinomial(self.probs, n, replacement=True, generator=g)
        t = torch.randint(0, family.num_train_timesteps, (n,), generator=g)
        mean, std = self.mean[idx], self.std[idx]
        x0 = family.latents_from_distribution(mean, std, torch.randn(mean.shape, generator=g))
        noise = torch.randn(x0.shape, generator=g)
        return {k: v.to(family.device) for k, v in (("x0", x0), ("noise", noise), ("t", t))}

    def _initial_vectors(self) -> torch.Tensor:
        s, weight = self.s, self.weight.detach()
        if s.init == "random":
            prefix = weight[random_word_ids(real_word_ids(self.family), s.k, self.generator).to(weight.device)]
        else:
            prefix = word_vectors(self.family, s.init, s.k).to(weight.device)
        own = weight[torch.tensor(self.prompt_ids, dtype=torch.long, device=weight.device)]
        return torch.cat([prefix.float(), own.float()])

    def optimise(self) -> tuple[torch.Tensor, dict]:
        s = self.s
        start = self._initial_vectors()
        vectors = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.Adam([vectors], lr=s.lr)
        details = self._pre_attack()
        with self.slots.hooked():
            first, plain = self._score(start), self._plain_loss()
            best, best_loss, best_step, curve = start, first, 0, [[0, round(first, 6)]]
            for step in tqdm(range(1, s.iterations + 1), desc="soft-prompt", leave=False):
                self.slots.vectors = vectors
                with torch.enable_grad():
                    loss = self._loss(self.ids.expand(s.batch, -1), self._draws(s.batch, self.generator))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                if step % s.eval_every and step != s.iterations:
                    continue
                score = self._score(vectors.detach().clone())
                curve.append([step, round(score, 6)])
                if score < best_loss:
                    best, best_loss, best_step = vectors.detach().clone(), score, step
                if self._judged_success(vectors.detach().clone(), step, details):
                    best, best_loss, best_step = vectors.detach().clone(), score, step
                    break
        details |= {
            "loss_before": first,
            "loss_after": best_loss,
            "loss_prompt_alone": plain,
            "best_step": best_step,
            "eval_curve": curve,
            "k": s.k,
            "prompt_positions_trained": len(self.prompt_ids),
            "iterations": s.iterations,
            "guard_aware": self.aware,
            **self.images,
        }
        return best.cpu(), details

    def _pre_attack(self) -> dict:
        """The plain prompt's verdict at the target seed (UnlearnDiffAtk's pre-attack success), judged once."""
        if not self.judging:
            return {}
        target = self.target
        verdict = self.ctx.shows_concept([target.prompt], [target.seed], target.guidance, [target.prompt])[0]
        return {"pre_attack_success": bool(verdict.present), "pre_score": float(verdict.score), "attack_success": False}

    @torch.no_grad()
    def _judged_success(self, vectors: torch.Tensor, step: int, details: dict) -> bool:
        """Generate the harness's first image (target seed, under the guard) with these vectors, and the images of
        `check_seeds` seeds the harness never uses, and judge them: a success must not be one lucky draw."""
        if not self.judging:
            return False
        target = self.target
        seeds = [target.seed] + [derive_seed(target.seed, FOLDER, "check", i) for i in range(self.s.check_seeds)]
        self.slots.vectors = vectors
        verdicts = self.ctx.shows_concept(
            [self.slot_prompt] * len(seeds), seeds, target.guidance, [target.prompt] * len(seeds)
        )
        present = [bool(v.present) for v in verdicts]
        details.setdefault("judged", []).append([step, present, [round(float(v.score), 5) for v in verdicts]])
        details["attack_success"] = all(present)
        return details["attack_success"]

    @torch.no_grad()
    def _score(self, vectors: torch.Tensor) -> float:
        """Mean loss on the fixed draws with the slots set to `vectors` (comparable across vectors)."""
        self.slots.vectors = vectors
        return self._fixed_loss(self.ids)

    @torch.no_grad()
    def _plain_loss(self) -> float:
        """The prompt as sent, without any vector of ours, on the same draws: what the attack buys."""
        return self._fixed_loss(self.plain_ids)

    def _fixed_loss(self, ids: torch.Tensor) -> float:
        n, total = self.s.eval_draws, 0.0
        for i in range(0, n, EVAL_CHUNK):
            chunk = {k: v[i : i + EVAL_CHUNK] for k, v in self.fixed.items()}
            total += self._loss(ids.expand(len(chunk["t"]), -1), chunk).item() * len(chunk["t"])
        return total / n

    def _loss(self, ids: torch.Tensor, d: dict) -> torch.Tensor:
        return denoising_loss(self.family, ids, d, self.negative, self.guidance)
