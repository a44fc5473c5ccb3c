"""Concept Inversion (Pham et al., ICLR 2024): textual inversion of a new token on the *unlearned* model.

The token is learned from images of the concept with the model under attack (LoRAs on), so it finds
whatever input still leads that model to the concept; prompts then carry the token where the concept's
unsafe words were. Only the token's vectors train; UNet, VAE and text encoder stay frozen.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from duo.attacks.base import Found
from duo.attacks.settings.concept_inversion import BUDGETS, NAME, Settings  # noqa: F401 (module contract)
from duo.data.concepts import token_prompt
from duo.data.files import atomic_write_bytes, atomic_write_text
from duo.errors import UserError
from duo.models.token_slots import TokenSlots, word_vectors

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily

FOLDER = "concept_inversion"
EMBEDS = "learned_embeds.safetensors"
CHECKPOINT = "checkpoint.safetensors"
log = logging.getLogger(__name__)


EVAL_DRAWS = 32  # fixed (image, t, noise) draws that score the initial and the learned token alike


def prepare(ctx, s: Settings) -> dict:
    """Learn the token (or load it from an earlier run) and load it into the pipeline under `s.token`."""
    _validate(s)
    folder = ctx.out / FOLDER
    path = folder / EMBEDS
    if path.is_file():
        vectors = None  # the family reads its own file format
        provenance = _read_json(folder / "provenance.json") | {"resumed": True}
    else:
        vectors, provenance = _learn(ctx, s, folder)
        provenance["file"] = str(path)
        atomic_write_text(folder / "provenance.json", json.dumps(provenance, indent=2))
        tmp = folder / f".{EMBEDS}.tmp"
        ctx.family.save_textual_inversion(tmp, s.token, vectors)
        os.replace(tmp, path)  # its presence means "trained": never a half-written file
        (folder / CHECKPOINT).unlink(missing_ok=True)
    install_token(ctx.family, s.token, vectors, path)
    return provenance


def attack(ctx, s: Settings, target) -> Found:
    prompt = token_prompt(target.prompt, ctx.concept.unsafe_words, s.token)
    return Found(target.id, target.prompt, prompt, target.seed, target.guidance, {"token": s.token})


def _validate(s: Settings) -> None:
    if not s.token or any(ch.isspace() for ch in s.token):
        raise UserError(f"--token must be one word without spaces, got '{s.token}'")
    for key in ("num_vectors", "n_images", "train_steps", "train_batch", "checkpoint_every"):
        if getattr(s, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(s, key)}")


def install_token(family: ModelFamily, token: str, vectors: torch.Tensor | None, path) -> None:
    """Make the pipeline generate with the token; a second prepare in the same process overwrites the rows."""
    family.load_textual_inversion(path, token, vectors)


# ---- training ------------------------------------------------------------------------------------------
def _learn(ctx, s: Settings, folder) -> tuple[torch.Tensor, dict]:
    images, prompts, source = ctx.concept_images(s.n_images)
    if not images:
        raise UserError("concept inversion found no images of the concept; pass --images FOLDER.")
    family: ModelFamily = ctx.family
    texts = [token_prompt(p, ctx.concept.unsafe_words, s.token) for p in prompts]
    atomic_write_text(folder / "prompts.txt", "\n".join(texts) + "\n")
    mean, std = family.encode_images(images, ctx.resolution or family.native_resolution)
    slots = TokenSlots(family, s.num_vectors)
    ids = _training_ids(family, slots, texts, s.token)
    init = word_vectors(family, s.init_word, s.num_vectors).to(family.device)
    draws = _fixed_draws(family, mean, std, ctx.seed)
    guided = _guidance(ctx, s)
    with slots.hooked():
        eval_init = _draws_loss(family, ids, draws, slots, init, guided)
        fingerprint = json.dumps({**asdict(s), "checkpoint_every": None, "seed": ctx.seed, "images": source})
        vectors, losses, start = _optimise(
            ctx, s, folder / CHECKPOINT, fingerprint, slots, ids, mean, std, init, guided
        )
        eval_learned = _draws_loss(family, ids, draws, slots, vectors, guided)
    atomic_write_text(folder / "losses.json", json.dumps(losses))
    window = max(1, min(50, len(losses) // 10))
    provenance = {
        "token": s.token,
        "num_vectors": s.num_vectors,
        "init_word": s.init_word,
        "steps": s.train_steps,
        "resumed_from_step": start,
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "eval_loss_init": eval_init,
        "eval_loss_learned": eval_learned,
        "images": source,
        "guard_aware": guided is not None,
        "prompts_file": str(folder / "prompts.txt"),
    }
    return vectors.cpu(), provenance


def _guidance(ctx, s: Settings) -> tuple[torch.Tensor, float] | None:
    """(negative prompt embedding, guidance scale) when learning through the negprompt guard, else None."""
    if not s.guard_aware or ctx.guard.name != "negprompt":
        return None
    _, negatives = ctx.guard.apply([""])
    scale = ctx.config.guidance if ctx.config.guidance is not None else ctx.concept.guidance
    return ctx.family.encode_prompts(negatives), float(scale)


def _predict(family: ModelFamily, x_t, t, emb, guided) -> torch.Tensor:
    """The UNet's prediction, or the guided one ε_neg + g·(ε_cond − ε_neg) that the guarded model samples with."""
    pred = family.denoise(family.unet, x_t, t, emb).float()
    if guided is None:
        return pred
    negative, scale = guided
    with torch.no_grad():
        neg = family.denoise(family.unet, x_t, t, negative.expand(len(t), -1, -1)).float()
    return neg + scale * (pred - neg)


def _optimise(ctx, s: Settings, ckpt, fingerprint: str, slots, ids, mean, std, init, guided):
    """Adam on the token's vectors from `init` (or the last checkpoint); returns (vectors, losses, start)."""
    family: ModelFamily = ctx.family
    vectors = torch.nn.Parameter(init.clone())
    optimizer = torch.optim.Adam([vectors], lr=s.lr)
    generator = torch.Generator().manual_seed(ctx.seed)
    start, losses = _restore(ckpt, fingerprint, vectors, optimizer, generator)
    slots.vectors = vectors
    bar = tqdm(range(start, s.train_steps), initial=start, total=s.train_steps, desc="concept inversion", leave=False)
    with torch.enable_grad():
        for step in bar:
            loss = _step(family, ids, mean, std, s.train_batch, generator, guided)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if (step + 1) % s.checkpoint_every == 0 and step + 1 < s.train_steps:
                _save_checkpoint(ckpt, fingerprint, step + 1, vectors, optimizer, generator, losses)
    return vectors.detach(), losses, start


def _training_ids(family: ModelFamily, slots: TokenSlots, texts: list[str], token: str) -> torch.Tensor:
    """Token ids of each training prompt; one whose token fell past the last position gets it up front."""
    texts = [t.replace(token, slots.text) for t in texts]
    ids = family.tokenize(texts).cpu()
    placed = torch.isin(ids, torch.tensor(slots.ids)).sum(1)
    for i in torch.nonzero(placed < len(slots.ids)).flatten().tolist():
        ids[i] = family.tokenize([f"{slots.text} {texts[i].replace(slots.text, '').strip()}"])[0].cpu()
    return ids


def _step(
    family: ModelFamily, ids, mean, std, batch_size: int, generator: torch.Generator, guided=None
) -> torch.Tensor:
    """Denoising MSE on a random batch of the concept's images at uniform timesteps (fresh noise)."""
    idx = torch.randint(len(ids), (batch_size,), generator=generator)
    t = torch.randint(0, family.num_train_timesteps, (batch_size,), generator=generator)
    x0 = family.latents_from_distribution(mean[idx], std[idx], torch.randn(mean[idx].shape, generator=generator))
    noise = torch.randn(x0.shape, generator=generator)
    x0, noise, t = x0.to(family.device), noise.to(family.device), t.to(family.device)
    pred = _predict(family, family.add_noise(x0, noise, t), t, family.encode_ids(ids[idx]), guided)
    return torch.nn.functional.mse_loss(pred, family.training_target(x0, noise, t).float())


def _fixed_draws(family: ModelFamily, mean, std, seed: int) -> dict:
    """Draws of their own generator, so the training stream does not depend on them."""
    g = torch.Generator().manual_seed(seed + 1)
    n = EVAL_DRAWS
    idx = torch.arange(n) % len(mean)
    t = torch.randint(0, family.num_train_timesteps, (n,), generator=g)
    x0 = family.latents_from_distribution(mean[idx], std[idx], torch.randn(mean[idx].shape, generator=g))
    return {"idx": idx, "t": t, "x0": x0, "noise": torch.randn(x0.shape, generator=g)}


@torch.no_grad()
def _draws_loss(
    family: ModelFamily, ids, draws: dict, slots: TokenSlots, vectors: torch.Tensor, guided=None, chunk=8
) -> float:
    """Mean denoising MSE of the fixed draws with the token set to `vectors` (comparable across vectors)."""
    slots.vectors, total = vectors, 0.0
    for i in range(0, len(draws["idx"]), chunk):
        idx = draws["idx"][i : i + chunk]
        x0, noise, t = (draws[k][i : i + chunk].to(family.device) for k in ("x0", "noise", "t"))
        pred = _predict(family, family.add_noise(x0, noise, t), t, family.encode_ids(ids[idx]), guided)
        target = family.training_target(x0, noise, t)
        total += torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="sum").item()
    return total / draws["x0"].numel()


# ---- checkpoints: vectors, Adam state, RNG and losses in one atomically written file ---------------------
def _save_checkpoint(path, fingerprint: str, step: int, vectors, optimizer, generator, losses) -> None:
    adam = optimizer.state[vectors]
    tensors = {
        "vectors": vectors.detach().cpu().contiguous(),
        "exp_avg": adam["exp_avg"].cpu().contiguous(),
        "exp_avg_sq": adam["exp_avg_sq"].cpu().contiguous(),
        "adam_step": torch.as_tensor(adam["step"], dtype=torch.float32).reshape(1),
        "rng": generator.get_state(),
    }
    meta = {"step": str(step), "settings": fingerprint, "losses": json.dumps(losses)}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=meta))


def _restore(path, fingerprint: str, vectors, optimizer, generator) -> tuple[int, list[float]]:
    if not path.is_file():
        return 0, []
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("settings") != fingerprint:
        log.warning("ignoring %s: it was written with other settings; training from step 0", path)
        return 0, []
    device = vectors.device
    with torch.no_grad():
        vectors.copy_(tensors["vectors"].to(device))
    step_value = tensors["adam_step"].reshape(())
    optimizer.state[vectors] = {
        "step": step_value,
        "exp_avg": tensors["exp_avg"].to(device),
        "exp_avg_sq": tensors["exp_avg_sq"].to(device),
    }
    generator.set_state(tensors["rng"])
    return int(meta["step"]), json.loads(meta["losses"])


def _read_json(path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
