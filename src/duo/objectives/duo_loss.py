"""The DUO objective (SPEC §3) as pure tensor functions.

Convention, stated once and pinned by tests:

    Δ(x₀, t)  = ‖ε_θ(x_t, t, c) − y‖² − ‖ε_ref(x_t, t, c) − y‖²          (mean over C, H, W)
    L_pref    = −log σ( −β · [ Δ(x⁺, t⁺) − Δ(x⁻, t⁻) ] )
    L_keep    = ‖ε_θ(x_T, T, c∅) − ε_ref(x_T, T, c∅)‖²
    L_DUO     = L_pref + λ · L_keep

There is no ½ factor: DUO β = 500 equals Diffusion-DPO's "−0.5·β" form with β = 1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖pred − target‖² averaged over every dimension but the first."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class DuoLossParts:
    loss: torch.Tensor
    pref: torch.Tensor
    keep: torch.Tensor
    retain: torch.Tensor
    delta_win: torch.Tensor  # Δ(x⁺): negative when the policy fits the safe image better than the reference
    delta_lose: torch.Tensor  # Δ(x⁻): positive when the policy fits the unsafe image worse
    accuracy: torch.Tensor  # share of pairs where the policy already prefers x⁺ (Δ⁺ < Δ⁻)


def preference_loss(delta_win: torch.Tensor, delta_lose: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair −log σ(−β(Δ⁺ − Δ⁻)); logsigmoid keeps large β finite."""
    return -F.logsigmoid(-beta * (delta_win - delta_lose))


def preference_deltas(
    policy: torch.Tensor, reference: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ(x⁻), Δ(x⁺)) per pair of rows laid out as [x⁻ ; x⁺] (B each): policy error minus reference error."""
    delta = per_sample_mse(policy, target) - per_sample_mse(reference, target)
    b = delta.shape[0] // 2
    return delta[:b], delta[b:]


def duo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    target: torch.Tensor,
    n_pairs: int,
    beta: float,
    lam: float,
    lam_retain: float = 0.0,
) -> DuoLossParts:
    """DUO loss over one batched forward laid out as [x⁻ ; x⁺ ; x_T ; (x_r)].

    policy / reference: UNet outputs with and without the LoRA, shape (3B or 4B, C, H, W).
    target: the training target y of the preference rows (ε or v); rows of x_T and x_r are ignored,
    their term compares policy with reference only.
    """
    b = n_pairs
    if policy.shape != reference.shape or policy.shape[0] not in (3 * b, 4 * b):
        raise ValueError(f"expected policy/reference of 3B or 4B rows with B={b}, got {tuple(policy.shape)}")
    delta_lose, delta_win = preference_deltas(policy[: 2 * b], reference[: 2 * b], target[: 2 * b])
    pref = preference_loss(delta_win, delta_lose, beta).mean()
    keep = per_sample_mse(policy[2 * b : 3 * b], reference[2 * b : 3 * b]).mean()
    retain = (
        per_sample_mse(policy[3 * b :], reference[3 * b :]).mean()
        if policy.shape[0] == 4 * b
        else torch.zeros((), device=policy.device)
    )
    loss = pref + lam * keep + lam_retain * retain
    accuracy = (delta_win < delta_lose).float().mean()
    return DuoLossParts(loss, pref, keep, retain, delta_win.mean(), delta_lose.mean(), accuracy)


def coupled_hparams(beta: float, base_lr: float = 3e-4, base_lambda: float = 1e6) -> tuple[float, float]:
    """The authors' coupling: lr = base_lr·100/β, λ = base_λ·β/100 (β=500 → lr 6e-5, λ 5e6)."""
    if beta <= 0:
        raise ValueError("β must be positive")
    return base_lr * 100.0 / beta, base_lambda * beta / 100.0
