"""Phase 2 of the Shapes base training: the VAE (MSE + 0.5 L1 + 1e-5 KL), scaled so latents have unit std."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from duo.shapes.architecture import make_vae, to_unit
from duo.shapes.trainutil import atomic_dir

SCALE_SAMPLE = 5000  # images whose latents set the scaling factor
CHECK_SAMPLE = 500  # images whose reconstruction error is logged


def train_vae(images: torch.Tensor, steps: int, seed: int, log, batch: int = 32):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=max(0.05, 3.0 / steps))
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = to_unit(images[idx])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            log(
                f"vae step {step + 1}/{steps} loss {loss.item():.5f} kl {kl.item():.1f} "
                f"({(time.time() - t0) / (step + 1):.3f}s/step)"
            )
    vae.eval()
    return vae


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 500):
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(to_unit(images[i : i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def vae_phase(work: Path, images: torch.Tensor, steps: int, seed: int, log):
    """The trained VAE, frozen: resumed from work/vae, or trained, scaled and saved there."""
    from diffusers import AutoencoderKL

    vae_dir = work / "vae"
    if (vae_dir / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval()
        log("vae: resumed from work/vae")
    else:
        vae = train_vae(images, steps, seed, log)
        mean, std = encode_all(vae, images[:SCALE_SAMPLE])
        lat = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
        sf = float(1.0 / lat.std())
        vae.register_to_config(scaling_factor=sf)
        atomic_dir(lambda p: vae.save_pretrained(p), vae_dir)
        with torch.no_grad():
            rec = vae.decode(mean[:CHECK_SAMPLE]).sample
            mse = float(F.mse_loss((rec + 1) / 2, images[:CHECK_SAMPLE]))
        log(f"vae: scaling factor {sf:.4f}, reconstruction MSE {mse:.5f}")
    vae.requires_grad_(False)
    return vae
