"""Every random number of one optimizer step, drawn for the whole global batch from (seed, step).

Each process and micro-batch then takes its slice. So a run is a function of the seed alone: resuming,
gradient accumulation and the number of processes do not change what any pair sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Draws:
    """A dataclass of tensors with the global batch first: sliced per process and micro-batch."""

    def slice(self, start: int, stop: int):
        return type(self)(**{k: v[start:stop] for k, v in self.__dict__.items()})

    def to(self, device):
        return type(self)(**{k: v.to(device) for k, v in self.__dict__.items()})


@dataclass
class StepDraws(Draws):
    pair_index: torch.Tensor  # (G,) which pair fills each slot
    latent_noise: torch.Tensor  # (G, 2, C, H, W): samples of the cached latent distributions of x⁻, x⁺
    noise: torch.Tensor  # (G, C, H, W): ε, shared by the two images of a pair
    t_lose: torch.Tensor
    t_win: torch.Tensor
    noise_T: torch.Tensor  # (G, C, H, W): x_T of the keep term
    use_concept: torch.Tensor  # (G,) bool: preference prompt is the unsafe prompt (else empty)
    retain_noise: torch.Tensor
    t_retain: torch.Tensor
    retain_prompt: torch.Tensor  # (G,) index into the retain prompts
    slot: torch.Tensor  # (G,) the slot's place in the run's endless sequence (step·G + k): no random draw


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    return torch.randperm(n, generator=g)


def pair_indices(n: int | tuple[int, ...], seed: int, step: int, global_batch: int) -> torch.Tensor:
    """Slots [step·G, (step+1)·G) of an endless sequence of seeded permutations of the n pairs.

    n as block sizes (pairs of several concepts joined, `PairSet.groups`): slot k goes to block k mod K, which
    runs through its own permutations, so each concept fills the same share of slots whatever its pair count.
    One block is the plain sequence, draw for draw."""
    groups = (n,) if isinstance(n, int) else tuple(n)
    K, starts = len(groups), [sum(groups[:k]) for k in range(len(groups))]
    start = step * global_batch
    out = []
    for pos in range(start, start + global_batch):
        k, inner = pos % K, pos // K
        epoch, offset = divmod(inner, groups[k])
        out.append(starts[k] + int(epoch_order(groups[k], seed, epoch * K + k)[offset]))
    return torch.tensor(out, dtype=torch.long)


def draw_step(
    seed: int,
    step: int,
    global_batch: int,
    groups: int | tuple[int, ...],
    latent_shape: tuple[int, ...],
    t_range: tuple[int, int],
    shared_t: bool,
    conditioning: str,
    t_retain_max: int,
    n_retain_prompts: int,
) -> StepDraws:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    G = global_batch
    t_lose = torch.randint(t_range[0], t_range[1], (G,), generator=g)
    t_win = t_lose.clone() if shared_t else torch.randint(t_range[0], t_range[1], (G,), generator=g)
    if conditioning == "mixed":
        use_concept = torch.rand(G, generator=g) < 0.5
    else:
        use_concept = torch.full((G,), conditioning == "concept")
    return StepDraws(
        pair_index=pair_indices(groups, seed, step, G),
        latent_noise=torch.randn((G, 2, *latent_shape), generator=g),
        noise=torch.randn((G, *latent_shape), generator=g),
        t_lose=t_lose,
        t_win=t_win,
        noise_T=torch.randn((G, *latent_shape), generator=g),
        use_concept=use_concept,
        retain_noise=torch.randn((G, *latent_shape), generator=g),
        t_retain=torch.randint(0, t_retain_max, (G,), generator=g),
        retain_prompt=torch.randint(0, max(1, n_retain_prompts), (G,), generator=g),
        slot=torch.arange(step * G, (step + 1) * G),
    )
