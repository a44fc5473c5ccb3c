"""Relearning probe: fine-tune the unlearned model on a few concept images and watch how fast DSR falls.

The resurgence probe of the field (concept resurgence, Suriyakumar et al. 2024; relearning attacks on LLM
unlearning, Hu et al. 2024, Lynch et al. 2024): an unlearning that only hides the concept comes back after a
few steps of plain fine-tuning, one that removed it needs about as many as the original model needs to learn
it from scratch. Our protocol (no single published one; see the settings' docstring):

- data: ONE judge-filtered image set of the original model (`ctx.concept_images`, hashed), captions = its prompts;
- loss: the family's plain denoising loss, t uniform over the whole schedule, fresh noise every step, AdamW;
- weights: the denoiser's attention projections (or all of it), and/or the first text encoder's linear layers
  (`--params text-encoder`: the attacker of a text-encoder LoRA), trained as base weights under the active LoRAs.
  The gradient of a base weight W under a LoRA is the gradient of the fused weight W + BA, so with weight
  decay 0 this is exactly fine-tuning the fused model, without fusing (the LoRAs stay switchable);
- the same fine-tune (seed, data order, noise) twice: the model under attack (LoRAs on), then the original
  (`ctx.original()`: LoRAs off), each from its own weights and with the captions as its own text encoder reads
  them (a text-encoder LoRA changes the conditioning; when the text encoder is fine-tuned too, the captions are
  encoded through it at every step); without LoRAs
  the two are the same model, so the first curve is reused. At each checkpoint the first `curve_targets` targets
  are generated under the guard (`ctx.generate`, their seeds and guidance, one image each) and judged.

prepare() leaves the family in the fine-tuned state of the model under attack at the last checkpoint, so the
harness's DSR (the target prompts themselves, under the guard) is the DSR after relearning; out/relearn/
holds the curve and the trained weights, which a new session re-applies instead of training. `restore(ctx)`
puts the weights of before back, bit for bit.

Memory: the trained weights, their gradients and AdamW's two moments (4 × fp32), plus a CPU snapshot. SD 1.x's
attention projections are about a tenth of its 860 M UNet parameters; all of them (~14 GB of state) and batch
1-4 at 512 px fit one 80 GB GPU in float32. Half-precision weights are refused: AdamW steps of 1e-5 vanish in them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from duo.attacks.base import Found
from duo.attacks.settings.relearn import BUDGETS, NAME, Settings  # noqa: F401 (module contract)
from duo.data.files import atomic_write_bytes, atomic_write_text
from duo.errors import UserError
from duo.seeds import derive_seed

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily

FOLDER, CURVE, WEIGHTS = "relearn", "curve.json", "finetuned.safetensors"
SNAPSHOT = "relearn-snapshot"  # ctx.memo key: the trained weights as they were before the probe
EVAL_DRAWS = 16  # fixed (image, t, noise) draws whose loss is reported at every checkpoint
LORA_PARTS = ("lora_",)  # PEFT's adapter tensors: never trained here, the LoRA under attack stays as it is
TEXT_PREFIX = "text_encoder."  # names of the text encoder's trained weights (the denoiser's keep theirs bare)
log = logging.getLogger(__name__)


def prepare(ctx, s: Settings) -> dict:
    """Run the probe (or load its result) and leave the family fine-tuned; returns the curves."""
    s.validate()
    _check_dtype(ctx.family)
    params = trained_parameters(ctx.family, s.params)
    # Every weight a probe ever trained went into the snapshot before it moved, so a weight not in it still
    # holds its loaded value: a second prepare of the context (other settings included) starts from those.
    snapshot = ctx.memo.setdefault(SNAPSHOT, {})
    snapshot |= {k: p.detach().cpu().clone() for k, p in params.items() if k not in snapshot}
    restore(ctx)
    folder = ctx.out / FOLDER
    record = _read_json(folder / CURVE)
    if record.get("fingerprint") != _fingerprint(ctx, s):
        record = {}
    if record.get("complete") and (folder / WEIGHTS).is_file():
        _apply(params, load_file(str(folder / WEIGHTS)), exact=True)
        return record["provenance"] | {"resumed": True}
    return _run(ctx, s, params, record)


def attack(ctx, s: Settings, target) -> Found:
    """The target prompt as it is: what changed is the model (prepare left it fine-tuned)."""
    return Found(target.id, target.prompt, target.prompt, target.seed, target.guidance, {"relearn_steps": s.final_step})


def restore(ctx) -> None:
    """Put back the weights as the context's first prepare() found them (bit for bit)."""
    snapshot = ctx.memo.get(SNAPSHOT)
    if snapshot is not None:
        _apply(trained_parameters(ctx.family, "all+text-encoder"), snapshot)


# ---- which weights -----------------------------------------------------------------------------------------
def canonical(name: str) -> str:
    """A parameter's name with PEFT's wrapper dropped: the same with or without LoRAs loaded."""
    return name.replace(".base_layer.", ".")


def trained_parameters(family: ModelFamily, which: str) -> dict[str, torch.nn.Parameter]:
    """The model's own weights that the probe trains, by canonical name; LoRA tensors never. `which`: parts joined
    with '+' (settings.PARAMS).

    'attention': every linear layer inside an attention block of the denoiser, found by the `to_q`/`to_k` pair
    that diffusers' attention classes of every family share (SD's attn1/attn2, the joint attention of SD3 and
    FLUX); 'all': every denoiser weight; 'text-encoder': every linear layer of the first text encoder (attention
    and feed-forward, where a text-encoder LoRA sits), named with a `text_encoder.` prefix.
    """
    parts, chosen = which.split("+"), {}
    if "all" in parts:
        chosen |= dict(family.unet.named_parameters())
    elif "attention" in parts:
        for name, module in family.unet.named_modules():
            if hasattr(module, "to_q") and hasattr(module, "to_k"):
                chosen |= {f"{name}.{k}": p for k, p in _linear_parameters(module)}
    if "text-encoder" in parts:
        chosen |= {f"{TEXT_PREFIX}{k}": p for k, p in _linear_parameters(family.text_encoders[0])}
    kept = {canonical(k): p for k, p in chosen.items() if not any(part in k for part in LORA_PARTS)}
    if not kept:
        raise UserError(f"this model has no {which} weights to fine-tune; use --params all")
    return kept


def _linear_parameters(module: torch.nn.Module):
    for sub, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):
            yield from ((f"{sub}.{k}", p) for k, p in layer.named_parameters())


def trains_text_encoder(s: Settings) -> bool:
    """The captions are then encoded at every step, through the encoder being fine-tuned."""
    return "text-encoder" in s.params.split("+")


def _apply(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor], exact: bool = False) -> None:
    """Copy `state` into the weights; `exact`: it must hold every one of them (a saved fine-tune)."""
    unknown = [k for k in state if k not in params]
    missing = [k for k in params if k not in state] if exact else []
    if unknown or missing:
        raise UserError(
            f"saved relearning weights do not fit this model ({(unknown or missing)[:3]}); rerun with --overwrite"
        )
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value.to(params[key].device))


def _check_dtype(family: ModelFamily) -> None:
    if family.dtype != torch.float32:
        raise UserError(f"relearn fine-tunes the weights, which needs --dtype float32 (got {family.dtype})")


# ---- the probe ---------------------------------------------------------------------------------------------
@dataclass
class _Data:
    """The concept images as latent distributions, their captions' conditioning, and fixed evaluation draws."""

    mean: torch.Tensor
    std: torch.Tensor
    emb: torch.Tensor
    draws: dict
    captions: list[str]
    ids: torch.Tensor | None = None  # the captions' tokens, when the text encoder trains (encoded every step)


def _data(ctx, s: Settings) -> tuple[_Data, dict]:
    images, prompts, source = ctx.concept_images(s.n_images)
    if not images:
        raise UserError("relearn found no images of the concept; pass --images FOLDER.")
    family: ModelFamily = ctx.family
    mean, std = family.encode_images(images, ctx.resolution or family.native_resolution)
    emb = _encode(ctx, prompts)
    g = torch.Generator().manual_seed(derive_seed(ctx.seed, "relearn", "eval"))
    idx = torch.arange(EVAL_DRAWS) % len(mean)
    t = torch.randint(0, family.num_train_timesteps, (EVAL_DRAWS,), generator=g)
    x0 = family.latents_from_distribution(mean[idx], std[idx], torch.randn(mean[idx].shape, generator=g))
    draws = {"idx": idx, "t": t, "x0": x0, "noise": torch.randn(x0.shape, generator=g)}
    ids = family.tokenize(prompts) if trains_text_encoder(s) else None
    return _Data(mean, std, emb, draws, prompts, ids), source | {"prompts": sorted(set(prompts))}


@torch.no_grad()
def _encode(ctx, captions: list[str]) -> torch.Tensor:
    """The captions encoded by the text encoder(s) as the current context has them (LoRAs on or off)."""
    return ctx.family.encode_prompts(captions).detach()


def _run(ctx, s: Settings, params: dict, record: dict) -> dict:
    folder, started = ctx.out / FOLDER, time.monotonic()
    data, source = _data(ctx, s)
    targets = ctx.targets[: s.curve_targets or len(ctx.targets)]
    base = {"fingerprint": _fingerprint(ctx, s), "images": source}
    attacked = record.get("attacked")
    same_images = record.get("images", {}).get("sha256") == source.get("sha256")
    if attacked is None or not same_images or not (folder / WEIGHTS).is_file():
        attacked = _probe(ctx, s, params, data, targets)
        state = {k: p.detach().cpu().contiguous() for k, p in params.items()}
        atomic_write_bytes(folder / WEIGHTS, safetensors_bytes(state, metadata={"step": str(s.final_step)}))
        atomic_write_text(folder / CURVE, json.dumps(base | {"attacked": attacked, "complete": False}, indent=2))
        restore(ctx)
    if ctx.has_loras:
        with ctx.original():
            # the captions as the original encodes them: a text-encoder LoRA changes the conditioning too
            original = _probe(ctx, s, params, replace(data, emb=_encode(ctx, data.captions)), targets)
        restore(ctx)
    else:
        original = attacked | {"same_as_attacked": True}  # no LoRA: the model under attack is the original
    _apply(params, load_file(str(folder / WEIGHTS)), exact=True)
    provenance = _provenance(ctx, s, params, attacked, original, source) | {"seconds": time.monotonic() - started}
    record = base | {"attacked": attacked, "original": original, "complete": True, "provenance": provenance}
    atomic_write_text(folder / CURVE, json.dumps(record, indent=2))
    return provenance | {"resumed": False}


def _probe(ctx, s: Settings, params: dict, data: _Data, targets: list) -> dict:
    """Fine-tune from the current weights; the DSR at every checkpoint, the losses, the time it took."""
    family: ModelFamily = ctx.family
    started = time.monotonic()
    generator = torch.Generator().manual_seed(derive_seed(ctx.seed, "relearn", "train"))
    optimizer = torch.optim.AdamW(list(params.values()), lr=s.lr, weight_decay=s.weight_decay)
    points, losses, checkpoints = [], [], set(s.checkpoints)
    try:
        for p in params.values():
            p.requires_grad_(True)
        for step in range(s.final_step + 1):
            if step in checkpoints:
                points.append(_measure(ctx, data, targets, step))
                log.info("relearn step %d: DSR %.3f", step, points[-1]["dsr"])
            if step == s.final_step:
                break
            with torch.enable_grad():
                loss = _loss(family, data, _batch(family, data, s.batch, generator))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            losses.append(round(loss.item(), 6))
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    return {"points": points, "losses": losses, "seconds": round(time.monotonic() - started, 2)}


def _batch(family: ModelFamily, data: _Data, size: int, generator: torch.Generator) -> dict:
    """A random batch of images with uniform timesteps and fresh noise, all from the probe's own generator."""
    idx = torch.randint(len(data.mean), (size,), generator=generator)
    t = torch.randint(0, family.num_train_timesteps, (size,), generator=generator)
    mean, std = data.mean[idx], data.std[idx]
    x0 = family.latents_from_distribution(mean, std, torch.randn(mean.shape, generator=generator))
    return {"idx": idx, "t": t, "x0": x0, "noise": torch.randn(x0.shape, generator=generator)}


def _loss(family: ModelFamily, data: _Data, d: dict) -> torch.Tensor:
    x0, noise, t = (d[k].to(family.device) for k in ("x0", "noise", "t"))
    if data.ids is None:
        emb = data.emb[d["idx"].to(data.emb.device)]
    else:  # through the text encoder as it stands (fine-tuned so far, its LoRA on or off as the context has it)
        emb = family.encode_ids(data.ids[d["idx"].to(data.ids.device)])
    pred = family.denoise(family.unet, family.add_noise(x0, noise, t), t, emb)
    return torch.nn.functional.mse_loss(pred.float(), family.training_target(x0, noise, t).float())


def _measure(ctx, data: _Data, targets: list, step: int) -> dict:
    """Generate every curve target once under the guard (its seed, its guidance), judge; plus the eval loss."""
    present = {t.id: bool(v.present) for t, v in zip(targets, ctx.verdicts([(t, t.prompt) for t in targets]))}
    with torch.no_grad():
        eval_loss = _loss(ctx.family, data, data.draws).item()
    shown = [t.id for t in targets if present[t.id]]
    dsr = 1.0 - len(shown) / max(1, len(targets))
    return {"step": step, "dsr": dsr, "n": len(targets), "eval_loss": round(eval_loss, 6), "concept_shown": shown}


# ---- records -----------------------------------------------------------------------------------------------
def steps_to_fall(points: list[dict], threshold: float) -> int | None:
    """The first checkpoint whose DSR is at or below the threshold; None if the curve never gets there."""
    return next((p["step"] for p in points if p["dsr"] <= threshold), None)


def _curve(probe: dict) -> list[dict]:
    return [{k: p[k] for k in ("step", "dsr", "n", "eval_loss")} for p in probe["points"]]


def _provenance(ctx, s: Settings, params: dict, attacked: dict, original: dict, source: dict) -> dict:
    return {
        "checkpoints": list(s.checkpoints),
        "curves": {"attacked": _curve(attacked), "original": _curve(original)},
        "steps_to_fall": {
            "attacked": steps_to_fall(attacked["points"], s.threshold),
            "original": steps_to_fall(original["points"], s.threshold),
        },
        "threshold": s.threshold,
        "original_same_as_attacked": bool(original.get("same_as_attacked")),
        "images": source,
        "images_sha256": source.get("sha256"),
        "lr": s.lr,
        "batch": s.batch,
        "weight_decay": s.weight_decay,
        "params": s.params,
        "trained_tensors": len(params),
        "trained_scalars": sum(p.numel() for p in params.values()),
        "final_step": s.final_step,
        "seconds_probe": {"attacked": attacked["seconds"], "original": original["seconds"]},
        "curve_file": str(ctx.out / FOLDER / CURVE),
        "weights_file": str(ctx.out / FOLDER / WEIGHTS),
    }


def _fingerprint(ctx, s: Settings) -> str:
    """What the saved curve and weights depend on beyond the run folder's own settings check."""
    loras = list(getattr(ctx.config, "lora", None) or [])
    return json.dumps({**asdict(s), "seed": ctx.seed, "loras": loras, "guard": getattr(ctx.guard, "name", None)})


def _read_json(path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
