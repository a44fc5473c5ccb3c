"""The gradient methods the one training loop runs: each turns (seed, step) into draws and draws into a loss.

A method holds what never changes during training (latent distributions, prompt embeddings: computed once)
and knows its own objective; the loop owns everything else (LoRA, optimizer, accumulation, processes,
checkpoints, metrics). DUO pairs each unsafe image with its safe edit; ESD needs only the unsafe images.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch

from duo.data.pairs import PairSet
from duo.errors import UserError
from duo.models.lora import LoraModules, adapters_disabled
from duo.objectives import duo_loss, esd_loss, per_sample_mse, preference_deltas, preference_loss
from duo.train.adversary import Adversary
from duo.train.advunlearn import AdvUnlearnMethod
from duo.train.config import TrainConfig
from duo.train.draws import Draws, StepDraws, draw_step, pair_indices


@dataclass
class Cache:
    """Latent distributions of the pairs and prompt embeddings, computed once."""

    mean: torch.Tensor  # (N, 2, C, H, W): x⁻ then x⁺
    std: torch.Tensor
    emb_empty: torch.Tensor  # (1, L, D)
    emb_unsafe: torch.Tensor  # (N, L, D)
    emb_retain: torch.Tensor  # (N or K, L, D)


def encode_pair_latents(family, pairs: PairSet, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE latent distributions, (N, 2, C, H, W) with x⁻ then x⁺."""
    res = pairs.resolution
    means, stds = [], []
    for images in (pairs.unsafe_images, pairs.safe_images):
        chunks = [family.encode_images(images[i : i + 16], res) for i in range(0, len(images), 16)]
        means.append(torch.cat([m for m, _ in chunks]))
        stds.append(torch.cat([s for _, s in chunks]))
    return torch.stack(means, 1).to(device), torch.stack(stds, 1).to(device)


def retain_prompt_list(pairs: PairSet, cfg: TrainConfig) -> list[str]:
    """The prompts of the retain term: each pair's safe prompt, or the concept's neighbours."""
    retain_prompts = pairs.concept.neighbours if cfg.retain_prompts == "neighbours" else pairs.safe_prompts
    if cfg.keep == "noise+retain" and not retain_prompts:
        raise UserError("--retain-prompts neighbours needs a 'neighbours' list in the concept file.")
    return list(retain_prompts)


def build_cache(family, pairs: PairSet, cfg: TrainConfig, device) -> Cache:
    """Latents and the original text encoder's embeddings (a LoRA attached to it is switched off meanwhile)."""
    retain_prompts = retain_prompt_list(pairs, cfg)
    encode = family.encode_prompts
    mean, std = encode_pair_latents(family, pairs, device)
    with adapters_disabled(family.text_encoders[0]):
        return Cache(
            mean=mean,
            std=std,
            emb_empty=encode([""]).to(device),
            emb_unsafe=encode(pairs.unsafe_prompts).to(device),
            emb_retain=encode(retain_prompts).to(device) if cfg.keep == "noise+retain" else encode([""]).to(device),
        )


class LiveText:
    """DUO with its LoRA on the text encoder: the policy's conditioning, encoded every micro-batch through the
    encoder being trained, so the loss's gradient reaches its LoRA. Only the rows a micro-batch uses are encoded,
    in one forward (a DDP-wrapped encoder must be called once per backward)."""

    def __init__(self, family, pairs: PairSet, cfg: TrainConfig, device):
        self.family = family
        self.unsafe = family.tokenize(pairs.unsafe_prompts).to(device)
        self.empty = family.tokenize([""]).to(device)
        self.retain = family.tokenize(retain_prompt_list(pairs, cfg) or [""]).to(device)

    def rows(self, encoder, acc, use_concept, idx, retain_idx, adversaries, adv_ids, anchor: bool) -> torch.Tensor:
        """Conditioning laid out as the batched forward's rows:
        [c ; c ; c∅ (; c_r) (; c_adv1 ; c_adv1 ; c_adv2 ; c_adv2 …) (; c∅ ; c∅)]; `adv_ids`: each adversarial row
        group's token ids (DuoMethod.adversarial_groups)."""
        b = idx.shape[0]
        cond = torch.where(use_concept[:, None], self.unsafe[idx], self.empty.expand(b, -1))
        ids = [cond, self.empty]
        if retain_idx is not None:
            ids.append(self.retain[retain_idx])
        ids += adv_ids  # placeholders: only these rows' embeddings are swapped by the hooks
        with acc.autocast(), ExitStack() as stack:
            for a in adversaries:  # disjoint placeholders: every adversary's hook swaps its own rows only
                stack.enter_context(a.vectors_in_place())
            emb = self.family.encode_ids(torch.cat(ids), encoder=encoder)
        cond, empty, rest = emb[:b], emb[b : b + 1].expand(b, -1, -1), emb[b + 1 :]
        retain, rest = (rest[:b], rest[b:]) if retain_idx is not None else (rest[:0], rest)
        adv = [part for k in range(len(adv_ids)) for part in (rest[k * b : (k + 1) * b],) * 2]
        return torch.cat([cond, cond, empty, retain, *adv] + [empty, empty] * anchor)


def preference_range(cfg: TrainConfig, family, pairs: PairSet) -> tuple[int, int]:
    """[t_min, t_max) of the preference term: the flags, else what SDEdit at the pairs' strength visits."""
    lo, hi = family.preference_timesteps(pairs.strength)
    return _checked_range(cfg, family, (lo, hi))


def _checked_range(cfg: TrainConfig, family, default: tuple[int, int]) -> tuple[int, int]:
    t_range = (cfg.t_min if cfg.t_min is not None else default[0], cfg.t_max if cfg.t_max is not None else default[1])
    if not 0 <= t_range[0] < t_range[1] <= family.num_train_timesteps:
        raise UserError(
            f"timesteps [{t_range[0]}, {t_range[1]}) are empty or outside the model's "
            f"{family.num_train_timesteps} steps; adjust --t-min / --t-max."
        )
    return t_range


class DuoMethod:
    """DUO (SPEC §3): preference for x⁺ over x⁻ plus the keep term at pure noise.

    With `--lora-on text-encoder` the UNet is frozen and carries no LoRA: ε_θ is the UNet conditioned through the
    text encoder with its LoRA (encoded live, `LiveText`), ε_ref the same UNet conditioned through the original
    encoder (the cache). The loss is the same duo_loss over the same rows. With `--lora-on both` the policy's UNet
    carries a LoRA as well (trained by the same loss), switched off for the reference.
    """

    metrics = ("loss", "pref", "keep", "retain", "delta_win", "delta_lose", "accuracy")
    shown = "accuracy"

    @staticmethod
    def timestep_range(cfg: TrainConfig, family, pairs: PairSet) -> tuple[int, int]:
        return preference_range(cfg, family, pairs)

    def __init__(self, cfg: TrainConfig, family, pairs: PairSet, device):
        self.cfg, self.family, self.groups = cfg, family, pairs.groups
        self.t_range = self.timestep_range(cfg, family, pairs)
        self.cache = build_cache(family, pairs, cfg, device)  # the reference's conditioning in both placements
        # LoRA on the text encoder: the policy reads prompts through it, encoded live
        self.live = LiveText(family, pairs, cfg, device) if "text_encoder" in cfg.lora_modules else None
        c = self.cache
        self.adversaries = [
            Adversary(cfg, family, pairs, c.mean[:, 0], c.std[:, 0], device, kind, number)
            for number, kind in enumerate(cfg.adversary_kinds)
        ]
        if self.adversaries:
            self.metrics = (*self.metrics, "adv_pref", "adv_loss")
        if cfg.lam_uncond > 0:
            self.metrics = (*self.metrics, "uncond")
        if cfg.lam_text_retain > 0:
            self.metrics = (*self.metrics, "text_retain")

    @property
    def needs_text_encoder(self) -> bool:
        return bool(self.adversaries) or self.live is not None

    def before_step(self, module, acc, step: int) -> None:
        """A round of the inner attack, against the LoRA as it stands, when one is due. With the LoRA on the
        text encoder the attack's denoiser is the frozen UNet; it reads the encoder (LoRA on) itself."""
        for adversary in self.adversaries:
            if adversary.due(step, of=len(self.adversaries)):
                adversary.refresh(self.family.unet if self.live else acc.unwrap_model(module), step)

    def _state_prefix(self, adversary: Adversary) -> str:
        """One adversary's checkpoint keys are unprefixed (as before several existed); several are numbered."""
        return f"adv{adversary.number}." if len(self.adversaries) > 1 else ""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {self._state_prefix(a) + k: v for a in self.adversaries for k, v in a.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for a in self.adversaries:
            prefix = self._state_prefix(a)
            a.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})

    def draw(self, step: int, global_batch: int) -> StepDraws:
        cfg, c = self.cfg, self.cache
        return draw_step(
            cfg.seed,
            step,
            global_batch,
            self.groups,
            tuple(c.mean.shape[2:]),
            self.t_range,
            cfg.timesteps == "shared",
            cfg.conditioning,
            self.family.num_train_timesteps,
            c.emb_retain.shape[0],
        )

    def micro_loss(self, module, acc, d: StepDraws) -> dict[str, torch.Tensor]:
        """One batched forward over [x⁻_t ; x⁺_t ; x_T (; x⁺ at random t for retain)], policy and reference."""
        fam, c, dev = self.family, self.cache, acc.device
        d = d.to(dev)
        idx, b = d.pair_index, d.pair_index.shape[0]
        x0 = fam.latents_from_distribution(c.mean[idx], c.std[idx], d.latent_noise)  # (b, 2, C, H, W)
        x_lose0, x_win0 = x0[:, 0], x0[:, 1]
        T = torch.full((b,), fam.keep_timestep(), device=dev, dtype=torch.long)
        latents = [fam.add_noise(x_lose0, d.noise, d.t_lose), fam.add_noise(x_win0, d.noise, d.t_win), d.noise_T]
        ts, retain_idx = [d.t_lose, d.t_win, T], None
        if self.cfg.keep == "noise+retain":
            retain_idx = idx if self.cfg.retain_prompts == "safe" else d.retain_prompt
            latents.append(fam.add_noise(x_win0, d.retain_noise, d.t_retain))
            ts.append(d.t_retain)
        n_rows = len(latents) * b  # the rows duo_loss reads; adversarial rows follow them
        for _ in range(self.n_groups):  # the same x⁻_t, x⁺_t under each inner attack's prompt
            latents, ts = latents + latents[:2], ts + ts[:2]
        if self.cfg.lam_uncond > 0:  # and under c∅, for the anchor
            latents, ts = latents + latents[:2], ts + ts[:2]
        latents, ts = torch.cat(latents), torch.cat(ts)
        embs = self._cached_rows(d, idx, retain_idx)
        target = torch.cat(
            [fam.training_target(x_lose0, d.noise, d.t_lose), fam.training_target(x_win0, d.noise, d.t_win)]
        )
        live = None
        if self.live is None:  # LoRA on the UNet: one conditioning, the UNet with and without its adapters
            reference, policy = _reference_and_policy(fam, module, acc, latents, ts, embs)
        else:  # LoRA on the text encoder: the UNet conditioned by the original and the trained encoder (with
            # --lora-on both the policy's UNet carries its LoRA too, the reference's is switched off)
            anchor = self.cfg.lam_uncond > 0
            adv_ids = self.adversarial_groups(d, idx, "ids")
            encoder = module["text_encoder"] if isinstance(module, LoraModules) else module
            live = self.live.rows(encoder, acc, d.use_concept, idx, retain_idx, self.adversaries, adv_ids, anchor)
            reference, policy = _reference_and_policy(fam, fam.unet, acc, latents, ts, embs, policy_embs=live)
        out = self._loss_parts(policy, reference, target, n_rows, b)
        if self.cfg.lam_text_retain > 0:  # the retain prompts' rows, [c ; c ; c∅ ; c_r …]: encoder against encoder
            out["text_retain"] = per_sample_mse(live[3 * b : 4 * b], embs[3 * b : 4 * b]).mean()
            out["loss"] = out["loss"] + self.cfg.lam_text_retain * out["text_retain"]
        return out

    def _cached_rows(self, d: StepDraws, idx, retain_idx) -> torch.Tensor:
        """Every row's conditioning as the original text encoder reads it: [c ; c ; c∅ (; c_r) (; c_adv ; c_adv)]."""
        c, b = self.cache, idx.shape[0]
        empty = c.emb_empty.expand(b, -1, -1)
        cond = torch.where(d.use_concept[:, None, None], c.emb_unsafe[idx], empty)
        embs = [cond, cond, empty]
        if retain_idx is not None:
            embs.append(c.emb_retain[retain_idx])
        for emb in self.adversarial_groups(d, idx, "emb"):
            embs += [emb] * 2
        if self.cfg.lam_uncond > 0:
            embs += [empty, empty]
        return torch.cat(embs)

    @property
    def n_groups(self) -> int:
        """Adversarial row groups of a forward: one per adversary, or one with --adv-pairs split."""
        return min(len(self.adversaries), 1) if self.cfg.adv_pairs == "split" else len(self.adversaries)

    def adversarial_groups(self, d: StepDraws, idx, field: str) -> list[torch.Tensor]:
        """Each adversarial row group's `field` ("ids" or "emb") for the pairs `idx`: a group per adversary, or
        with --adv-pairs split one group, slot k under adversary k mod n (the batch's slots taken in turn)."""
        per = [getattr(a, field)[idx] for a in self.adversaries]
        if self.n_groups == len(per):
            return per
        which = d.slot.to(idx.device) % len(per)
        return [torch.stack(per)[which, torch.arange(len(idx), device=idx.device)]]

    def _loss_parts(self, policy, reference, target, n_rows: int, b: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        lam_retain = cfg.resolved_lam_retain if cfg.keep == "noise+retain" else 0.0
        parts = duo_loss(policy[:n_rows], reference[:n_rows], target, b, cfg.beta, cfg.resolved_lam, lam_retain)
        out = {name: getattr(parts, name) for name in DuoMethod.metrics}
        if self.adversaries:  # each row group's 2b rows, one preference term each (metrics: their mean)
            n_groups, terms = self.n_groups, []
            for k in range(n_groups):
                rows = slice(n_rows + 2 * b * k, n_rows + 2 * b * (k + 1))
                lose, win = preference_deltas(policy[rows], reference[rows], target)
                terms.append(preference_loss(win, lose, cfg.beta).mean())
            # split: one group stands for every adversary's term (the same expected loss as `all`)
            weight = cfg.adv_weight * len(self.adversaries) / n_groups
            out["loss"] = out["loss"] + weight * sum(terms)
            out["adv_pref"] = torch.stack(terms).mean()
            out["adv_loss"] = torch.stack([a.last_loss for a in self.adversaries]).mean().to(parts.loss.device)
        if cfg.lam_uncond > 0:  # the last 2b rows: x⁻_t, x⁺_t under c∅
            out["uncond"] = per_sample_mse(policy[-2 * b :], reference[-2 * b :]).mean()
            out["loss"] = out["loss"] + cfg.lam_uncond * out["uncond"]
        return out


@dataclass
class EsdDraws(Draws):
    pair_index: torch.Tensor  # (G,) which unsafe image
    latent_noise: torch.Tensor  # (G, C, H, W): sample of its latent distribution
    noise: torch.Tensor
    t: torch.Tensor
    prompt_index: torch.Tensor  # (G,) which concept prompt conditions the slot


class EsdMethod:
    """ESD (Gandikota et al., ICCV 2023): the concept-conditioned prediction is trained toward the frozen
    model's unconditional prediction minus η times the concept's direction.

    x_t are the curated unsafe images noised at t ∈ [t_min, t_max) (default: every timestep). The published
    method instead samples x_t from the model being trained at every step; the pairs' unsafe images are the
    same data DUO sees and cost nothing per step. Conditioning: each of the concept's unsafe words alone
    ("nudity", "red"), as ESD prompts with the concept's name, or (--esd-prompts unsafe) the pairs' prompts.
    """

    metrics = ("loss", "shift")  # shift: ‖ε_θ(c) − ε_ref(c)‖², how far the concept prediction has moved
    shown = "shift"

    @staticmethod
    def timestep_range(cfg: TrainConfig, family, pairs: PairSet) -> tuple[int, int]:
        return _checked_range(cfg, family, (0, family.num_train_timesteps))

    def __init__(self, cfg: TrainConfig, family, pairs: PairSet, device):
        words = list(pairs.concept.unsafe_words) if cfg.esd_prompts == "words" else list(pairs.unsafe_prompts)
        if not words:
            raise UserError(
                f"ESD conditions on the concept's words, and concept '{pairs.concept.name}' lists no unsafe_words; "
                "add them to the concept file."
            )
        self.cfg, self.family, self.groups, self.words = cfg, family, pairs.groups, words
        self.t_range = self.timestep_range(cfg, family, pairs)
        mean, std = encode_pair_latents(family, pairs, device)
        self.mean, self.std = mean[:, 0], std[:, 0]  # unsafe images only
        self.emb_words = family.encode_prompts(words).to(device)
        self.emb_empty = family.encode_prompts([""]).to(device)

    def draw(self, step: int, global_batch: int) -> EsdDraws:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        shape = (global_batch, *self.mean.shape[1:])
        return EsdDraws(
            pair_index=pair_indices(self.groups, self.cfg.seed, step, global_batch),
            latent_noise=torch.randn(shape, generator=g),
            noise=torch.randn(shape, generator=g),
            t=torch.randint(self.t_range[0], self.t_range[1], (global_batch,), generator=g),
            prompt_index=torch.randint(0, len(self.words), (global_batch,), generator=g),
        )

    def micro_loss(self, unet, acc, d: EsdDraws) -> dict[str, torch.Tensor]:
        fam, dev = self.family, acc.device
        d = d.to(dev)
        b = d.t.shape[0]
        x0 = fam.latents_from_distribution(self.mean[d.pair_index], self.std[d.pair_index], d.latent_noise)
        x_t = fam.add_noise(x0, d.noise, d.t)
        concept, empty = self.emb_words[d.prompt_index], self.emb_empty.expand(b, -1, -1)
        # Reference rows [x_t | c ; x_t | c∅]; the policy is asked only for the concept-conditioned one.
        latents, ts, embs = torch.cat([x_t, x_t]), torch.cat([d.t, d.t]), torch.cat([concept, empty])
        reference, policy = _reference_and_policy(fam, unet, acc, latents, ts, embs, policy_rows=b)
        eps_concept, eps_uncond = reference[:b], reference[b:]
        loss = esd_loss(policy, eps_concept, eps_uncond, self.cfg.eta)
        shift = per_sample_mse(policy.detach(), eps_concept).mean()
        return {"loss": loss, "shift": shift}


def _reference_and_policy(fam, unet, acc, latents, ts, embs, policy_rows: int | None = None, policy_embs=None):
    """The frozen model (LoRA off) on every row, and the trained one on the first policy_rows (default all);
    policy_embs: the policy's own conditioning (a LoRA on the text encoder), else it reads `embs` too."""
    n = latents.shape[0] if policy_rows is None else policy_rows
    policy_embs = embs if policy_embs is None else policy_embs
    base = acc.unwrap_model(unet)
    with acc.autocast():
        with torch.no_grad(), adapters_disabled(base):
            reference = fam.denoise(base, latents, ts, embs)
        policy = fam.denoise(unet, latents[:n], ts[:n], policy_embs[:n])
    return reference, policy


METHODS = {"duo": DuoMethod, "esd-u": EsdMethod, "esd-x": EsdMethod, "advunlearn": AdvUnlearnMethod}


def make_method(cfg: TrainConfig, family, pairs: PairSet, device):
    return METHODS[cfg.method](cfg, family, pairs, device)


def check_method(cfg: TrainConfig, family, pairs: PairSet) -> None:
    """What can be refused before anything is written: the timestep range against the loaded model."""
    METHODS[cfg.method].timestep_range(cfg, family, pairs)
