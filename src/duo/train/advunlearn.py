"""AdvUnlearn (Zhang et al., "Defensive Unlearning with Adversarial Training for Robust Concept Erasure in
Diffusion Models", NeurIPS 2024) as a method of the one training loop: `duo train --method advunlearn`.

What the published code (OPTML-Group/AdvUnlearn, train-scripts/AdvUnlearn.py) does, and our defaults with it:
- Trained: the text encoder only (`text_encoder_full`: every transformer layer's attention and MLP and the final
  layer norm; embeddings frozen), Adam lr 1e-5, 1000 iterations, one concept image per step. The UNet is frozen.
- Upper level: ESD's loss with the trained encoder and a frozen UNet, ‖ε(x_t, t, E_θ(c_adv)) − [ε(x_t, t, E₀(c∅))
  − η(ε(x_t, t, E₀(c)) − ε(x_t, t, E₀(c∅)))]‖², η = 1 (`--negative_guidance`); c is the concept's name.
  x_t: DDIM-sampled from the original model under c (guidance 3, 50 steps) down to a random step; t uniform.
- Retain (README: `--retain_train reg --retain_loss_w 0.3`): + 0.3·‖ε(x_r, t, E_θ(c_r)) − ε(x_r, t, E₀(c_r))‖²
  over 5 COCO object prompts per step ("a photo of chair"), x_r sampled under c_r like x_t, the same t.
- Lower level: k = 1 vector before the concept prompt ("prefix_k"), 30 Adam steps at lr 1e-3 minimising
  ‖ε(x_t, t, E_θ(c_adv)) − ε(x_t, t, E₀(c))‖² (the trained encoder brought back to the original's concept
  prediction), a fresh x_t and t every attack step; refreshed every iteration (`--adv_prompt_update_step 1`)
  after 200 warm-up iterations trained on c itself; started from a random vocabulary token each refresh
  (README's `--attack_init random`; the script's default `latest` continues from the last vectors).
  `pgd` is a plain Adam step (nothing is projected); `fast_at` takes the sign of the gradient first.

Where we differ (each a flag or a documented choice):
- A LoRA (`--rank`, `--alpha`, `--targets`) on the attention and MLP layers instead of full fine-tuning: the
  result loads as a standard diffusers LoRA (`text_encoder.` keys); layer norms cannot be LoRA'd. Hence lr 1e-4
  (as our ESD), and the loop's AdamW (weight decay 1e-2, gradient clip 1) instead of plain Adam.
- x_t and x_r come from the pairs (`duo curate`) like our ESD: unsafe images noised at t for the concept rows,
  the pairs' safe images noised at the same t for the retain rows, instead of sampling the model at every step.
- Batches: `--batch-size` concept images per step (authors 1: pass --batch-size 1), each with `--retain-batch`
  retain rows; the attack learns one prefix over the step's batch (with batch 1, the published attack).
- Retain prompts: the concept's `neighbours` (or the pairs' safe prompts) instead of COCO's object prompts,
  drawn with replacement; concept prompts: each unsafe word (or, `--unlearn-prompts unsafe`, each pair's prompt).
- The attack's gradient is zeroed between its steps (the published loop never zeroes it, so Adam sees the running
  sum of every earlier step's gradient); the attack draws fresh noise and t each step, on the step's pairs.
Every random draw is a function of (seed, step); the vectors in use are checkpointed (`state_dict`), so
`--resume` continues exactly. On Shapes a small encoder reads a prefixed prompt as a shifted one, and erasure learned
under the prefix barely reaches the plain prompt: its compare row warms up longer (duo.shapes.world says why).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from duo.data.pairs import PairSet
from duo.errors import UserError
from duo.models.lora import adapters_disabled
from duo.models.token_slots import TokenSlots, random_vocabulary_vectors
from duo.objectives import advunlearn_loss, per_sample_mse
from duo.seeds import derive_seed
from duo.train.config import TrainConfig
from duo.train.draws import Draws, pair_indices


@dataclass
class AdvDraws(Draws):
    pair_index: torch.Tensor  # (G,) which unsafe image
    latent_noise: torch.Tensor  # (G, C, H, W): sample of its latent distribution
    noise: torch.Tensor
    t: torch.Tensor
    prompt_index: torch.Tensor  # (G,) which concept prompt
    retain_pair: torch.Tensor  # (G, R) which safe image is x_r
    retain_latent_noise: torch.Tensor  # (G, R, C, H, W)
    retain_noise: torch.Tensor
    retain_prompt: torch.Tensor  # (G, R) which retain prompt


def unsafe_and_safe_latents(family, pairs: PairSet, device) -> tuple[torch.Tensor, ...]:
    """(mean, std) of the unsafe images' latent distributions, then of the safe images', each (N, C, H, W)."""
    out = []
    for images in (pairs.unsafe_images, pairs.safe_images):
        chunks = [family.encode_images(images[i : i + 16], pairs.resolution) for i in range(0, len(images), 16)]
        out += [torch.cat([m for m, _ in chunks]).to(device), torch.cat([s for _, s in chunks]).to(device)]
    return tuple(out)


class AdvUnlearnMethod:
    """ESD on the text encoder's LoRA under a prefix attack refreshed as training goes, plus a retain term."""

    metrics = ("loss", "unlearn", "retain", "attack")  # attack: the inner attack's last loss (0 before the first)
    shown = "unlearn"
    needs_text_encoder = True  # the loop must leave the trained encoder on the device

    @staticmethod
    def timestep_range(cfg: TrainConfig, family, pairs: PairSet) -> tuple[int, int]:
        t_range = (cfg.t_min or 0, cfg.t_max if cfg.t_max is not None else family.num_train_timesteps)
        if not 0 <= t_range[0] < t_range[1] <= family.num_train_timesteps:
            raise UserError(
                f"timesteps [{t_range[0]}, {t_range[1]}) are empty or outside the model's "
                f"{family.num_train_timesteps} steps; adjust --t-min / --t-max."
            )
        return t_range

    def __init__(self, cfg: TrainConfig, family, pairs: PairSet, device):
        self.cfg, self.family, self.device, self.n_pairs = cfg, family, device, len(pairs)
        self.groups = pairs.groups
        self.t_range = self.timestep_range(cfg, family, pairs)
        self.prompts, self.retain_prompts = _prompts(cfg, pairs)
        self.mean, self.std, self.safe_mean, self.safe_std = unsafe_and_safe_latents(family, pairs, device)
        self.slots = TokenSlots(family, cfg.attack_tokens)
        _check_fits(family, cfg.attack_tokens, self.prompts)
        self.plain_ids = family.tokenize(self.prompts).to(device)
        self.adv_ids = family.tokenize([f"{self.slots.text} {p}" for p in self.prompts]).to(device)
        self.retain_ids = family.tokenize(self.retain_prompts).to(device)
        # ε_ref reads every prompt through the original encoder: encoded once, LoRA off
        with torch.no_grad(), adapters_disabled(family.text_encoders[0]):
            self.emb_empty = family.encode_ids(family.tokenize([""])).to(device)
            self.emb_prompts = family.encode_ids(self.plain_ids).to(device)
            self.emb_retain = family.encode_ids(self.retain_ids).to(device)
        self.real_ids = family.regular_token_ids()
        self.vectors: torch.Tensor | None = None  # the adversarial prefix in use; None during warm-up
        self.last_attack = torch.zeros(())

    # ---- state the loop checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.vectors is None:
            return {}
        return {"vectors": self.vectors.detach().cpu().clone(), "attack_loss": self.last_attack.detach().cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.vectors = state["vectors"].to(self.device) if "vectors" in state else None
        self.last_attack = state.get("attack_loss", torch.zeros(()))

    # ---- draws ---------------------------------------------------------------------------------------------
    def draw(self, step: int, global_batch: int) -> AdvDraws:
        cfg, G, R = self.cfg, global_batch, self.cfg.retain_batch
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        shape = tuple(self.mean.shape[1:])
        pair_index = pair_indices(self.groups, cfg.seed, step, G)
        retain_pair = torch.randint(0, self.n_pairs, (G, R), generator=g)
        return AdvDraws(
            pair_index=pair_index,
            latent_noise=torch.randn((G, *shape), generator=g),
            noise=torch.randn((G, *shape), generator=g),
            t=torch.randint(self.t_range[0], self.t_range[1], (G,), generator=g),
            prompt_index=pair_index if cfg.unlearn_prompts == "unsafe" else _randint(len(self.prompts), (G,), g),
            retain_pair=retain_pair,
            retain_latent_noise=torch.randn((G, R, *shape), generator=g),
            retain_noise=torch.randn((G, R, *shape), generator=g),
            # a safe prompt goes with its own image; a neighbour with any safe image
            retain_prompt=retain_pair if cfg.retain_from == "safe" else _randint(len(self.retain_prompts), (G, R), g),
        )

    # ---- lower level: the attack ---------------------------------------------------------------------------
    def before_step(self, module, acc, step: int) -> None:
        """Refresh the adversarial prefix when one is due: after warm-up, every --attack-every steps."""
        cfg = self.cfg
        if step < cfg.attack_warmup or (self.vectors is not None and (step - cfg.attack_warmup) % cfg.attack_every):
            return
        global_batch = cfg.batch_size * cfg.grad_accum * acc.num_processes
        self.vectors, self.last_attack = self.attack(self.draw(step, global_batch), step, acc)

    def _initial_vectors(self, g: torch.Generator) -> torch.Tensor:
        if self.cfg.attack_init == "latest" and self.vectors is not None:
            return self.vectors.detach().clone()
        return random_vocabulary_vectors(self.family, self.cfg.attack_tokens, g, self.real_ids)

    def attack(self, d: AdvDraws, step: int, acc) -> tuple[torch.Tensor, torch.Tensor]:
        """k vectors before the step's concept prompts that bring the original's concept prediction back past the
        encoder as it stands (gradients reach the vectors only); returns them and the last attack loss."""
        cfg, fam = self.cfg, self.family
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "advunlearn-attack", step))
        vectors = torch.nn.Parameter(self._initial_vectors(g).to(self.device))
        optimizer = torch.optim.Adam([vectors], lr=cfg.attack_lr)
        idx, prompt = d.pair_index.to(self.device), d.prompt_index.to(self.device)
        ids, target_emb = self.adv_ids[prompt], self.emb_prompts[prompt]
        with self.slots.hooked(), torch.enable_grad():
            self.slots.vectors = vectors
            for _ in range(cfg.attack_steps):
                x_t, t = self._noised(idx, g)
                with acc.autocast():
                    with torch.no_grad():
                        eps_concept = fam.denoise(fam.unet, x_t, t, target_emb)
                    pred = fam.denoise(fam.unet, x_t, t, fam.encode_ids(ids))
                loss = per_sample_mse(pred, eps_concept).mean()
                (grad,) = torch.autograd.grad(loss, [vectors])
                vectors.grad = grad.sign() if cfg.attack_method == "fast-at" else grad
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return vectors.detach(), loss.detach().cpu()

    def _noised(self, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh x_t of the given unsafe images at fresh t (one attack step's draw)."""
        fam, shape = self.family, (len(idx), *self.mean.shape[1:])
        x0 = fam.latents_from_distribution(
            self.mean[idx], self.std[idx], torch.randn(shape, generator=g).to(self.device)
        )
        t = torch.randint(self.t_range[0], self.t_range[1], (len(idx),), generator=g).to(self.device)
        return fam.add_noise(x0, torch.randn(shape, generator=g).to(self.device), t), t

    # ---- upper level: the loss -----------------------------------------------------------------------------
    def micro_loss(self, module, acc, d: AdvDraws) -> dict[str, torch.Tensor]:
        """ESD rows under the adversarial prompt (the plain one during warm-up), then the retain rows."""
        fam, cfg = self.family, self.cfg
        d = d.to(acc.device)
        b = d.t.shape[0]
        x0 = fam.latents_from_distribution(self.mean[d.pair_index], self.std[d.pair_index], d.latent_noise)
        x_t = fam.add_noise(x0, d.noise, d.t)
        ids = (self.plain_ids if self.vectors is None else self.adv_ids)[d.prompt_index]
        # policy rows [x_t | c_adv (; x_r | c_r)], reference rows [x_t | c∅ ; x_t | c (; x_r | c_r)]
        latents, ts, ref_embs = [x_t], [d.t], [self.emb_empty.expand(b, -1, -1), self.emb_prompts[d.prompt_index]]
        retain = self._retain_rows(d) if cfg.retain_weight > 0 else None
        if retain is not None:
            x_r, t_r, prompt_r = retain
            latents, ts = [x_t, x_r], [d.t, t_r]
            ids = torch.cat([ids, self.retain_ids[prompt_r]])
            ref_embs.append(self.emb_retain[prompt_r])
        ref_latents, ref_ts = torch.cat([x_t, *latents]), torch.cat([d.t, *ts])
        with acc.autocast():
            with torch.no_grad():
                reference = fam.denoise(fam.unet, ref_latents, ref_ts, torch.cat(ref_embs))
            with self.slots.hooked() if self.vectors is not None else nullcontext():
                self.slots.vectors = self.vectors
                emb = fam.encode_ids(ids, encoder=module)
            policy = fam.denoise(fam.unet, torch.cat(latents), torch.cat(ts), emb)
        eps_uncond, eps_concept, eps_retain = reference[:b], reference[b : 2 * b], reference[2 * b :]
        loss, unlearn, kept = advunlearn_loss(
            policy[:b], eps_concept, eps_uncond, cfg.negative_guidance,
            policy[b:] if retain is not None else None, eps_retain, cfg.retain_weight,
        )  # fmt: skip
        return {"loss": loss, "unlearn": unlearn, "retain": kept, "attack": self.last_attack.to(loss.device)}

    def _retain_rows(self, d: AdvDraws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_r (the safe images noised at their slot's t), that t, and the retain prompts: R rows per slot."""
        fam, r = self.family, d.retain_pair.flatten()
        x0 = fam.latents_from_distribution(self.safe_mean[r], self.safe_std[r], d.retain_latent_noise.flatten(0, 1))
        t = d.t.repeat_interleave(self.cfg.retain_batch)
        return fam.add_noise(x0, d.retain_noise.flatten(0, 1), t), t, d.retain_prompt.flatten()


def _randint(n: int, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, shape, generator=g)


def _prompts(cfg: TrainConfig, pairs: PairSet) -> tuple[list[str], list[str]]:
    """The concept prompts c and the retain prompts c_r the settings name."""
    concept = pairs.concept
    prompts = list(concept.unsafe_words) if cfg.unlearn_prompts == "words" else list(pairs.unsafe_prompts)
    if not prompts:
        raise UserError(
            f"AdvUnlearn conditions on the concept's words, and concept '{concept.name}' lists no unsafe_words; "
            "add them to the concept file, or pass --unlearn-prompts unsafe."
        )
    retain = list(concept.neighbours) if cfg.retain_from == "neighbours" else list(pairs.safe_prompts)
    if not retain and cfg.retain_weight > 0:
        raise UserError(
            f"AdvUnlearn's retain term needs prompts, and concept '{concept.name}' lists no neighbours; add them to "
            "the concept file, or pass --retain-from safe (or --retain-weight 0)."
        )
    return prompts, retain or [""]


def _check_fits(family, k: int, prompts: list[str]) -> None:
    longest = max(prompts, key=family.token_count)
    if family.token_count(longest) + k > family.max_prompt_tokens:
        raise UserError(
            f"{k} adversarial token(s) do not fit before '{longest}': it takes {family.token_count(longest)} of "
            f"{family.max_prompt_tokens} token positions. Use --attack-tokens "
            f"{max(family.max_prompt_tokens - family.token_count(longest), 0)} or shorter concept prompts."
        )
