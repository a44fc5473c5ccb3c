"""An exponential moving average of the LoRA weights (`duo train --ema-decay`), saved in place of the last ones.

Adversarial training is a game: the LoRA closes the inner attack's current direction, the attack moves, and the
weights at the last step may sit anywhere on that cycle. Averaging the iterates (as SWA and EMA do for robust
image classifiers) keeps what held across the last rounds instead. The average follows the parameters the
optimizer updates (A and B of every adapter, each averaged on its own, as diffusers' trainers do); the run's
metrics and the inner attack read the live weights, the saved LoRA is the average.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class LoraEma:
    """shadow ← decay·shadow + (1 − decay)·param after every optimizer step, starting from the initial LoRA."""

    def __init__(self, module: torch.nn.Module, decay: float):
        """Every trainable LoRA parameter of `module` (those duo.models.lora.lora_parameters gives the optimizer)."""
        named = [(n, p) for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]
        self.names, self.params, self.decay = [n for n, _ in named], [p for _, p in named], decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - self.decay)

    @contextmanager
    def in_place(self):
        """The averaged weights in the parameters while active (what save reads); the live ones back after."""
        live = [p.detach().clone() for p in self.params]
        try:
            _copy(self.params, self.shadow)
            yield
        finally:
            _copy(self.params, live)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average keyed by parameter name (as module.named_parameters names them)."""
        return {n: s.clone() for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.names):
            raise ValueError(f"the checkpoint's average does not fit this LoRA ({len(state)} vs {len(self.names)})")
        _copy(self.shadow, [state[n] for n in self.names])


@torch.no_grad()
def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    for d, s in zip(dst, src):
        d.copy_(s)
