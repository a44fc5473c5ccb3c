"""The baselines' objectives as pure tensor functions (the comparison issue plugs them into the one loop).

ESD (Gandikota et al., ICCV 2023), negative guidance:
    target = ε_ref(x_t, t, c∅) − η · [ε_ref(x_t, t, c) − ε_ref(x_t, t, c∅)]
    L_ESD  = ‖ε_θ(x_t, t, c) − target‖²
The target is made with the frozen model, so it carries no gradient.

AdvUnlearn (Zhang et al., NeurIPS 2024) trains the text encoder with ESD's target under an adversarial prompt
c_adv (k learned token vectors before the concept prompt c), plus a retain term on other prompts c_r:
    L_AdvUnlearn = ‖ε_θ(x_t, t, c_adv) − target‖² + w · ‖ε_θ(x_r, t, c_r) − ε_ref(x_r, t, c_r)‖²
where the target is ESD's above and ε_ref encodes every prompt with the original text encoder. The lower level
(the attack) moves c_adv's vectors to minimise ‖ε_θ(x_t, t, c_adv) − ε_ref(x_t, t, c)‖²: the concept comes back.

UCE (Gandikota et al., WACV 2024), closed form for one projection W (d_out × d_in), with the text
embeddings c_i of the concepts to erase, g_i of their guides and p_j of the concepts to keep, weighted by
s_e (erase scale) and s_p (preserve scale):
    W' = (s_e Σ_i W g_i c_iᵀ + s_p Σ_j W p_j p_jᵀ + λ W) · (s_e Σ_i c_i c_iᵀ + s_p Σ_j p_j p_jᵀ + λ I)⁻¹
so that W' c_i ≈ W g_i (the concept now reads as its guide) and W' p_j ≈ W p_j (the kept ones stay).
W' − W = s_e Σ_i W (g_i − c_i) c_iᵀ · (…)⁻¹ has rank ≤ the number of erased vectors: it is exactly a LoRA.
"""

from __future__ import annotations

import torch

from duo.objectives.duo_loss import per_sample_mse


def esd_target(eps_concept: torch.Tensor, eps_uncond: torch.Tensor, eta: float) -> torch.Tensor:
    """Where ESD moves the concept-conditioned prediction: away from the concept by η times its direction."""
    return (eps_uncond - eta * (eps_concept - eps_uncond)).detach()


def esd_loss(policy_concept: torch.Tensor, eps_concept: torch.Tensor, eps_uncond: torch.Tensor, eta: float):
    """Mean over the batch of ‖ε_θ(x_t, t, c) − target‖²."""
    return per_sample_mse(policy_concept, esd_target(eps_concept, eps_uncond, eta)).mean()


def advunlearn_loss(
    policy_concept: torch.Tensor,
    eps_concept: torch.Tensor,
    eps_uncond: torch.Tensor,
    eta: float,
    policy_retain: torch.Tensor | None = None,
    eps_retain: torch.Tensor | None = None,
    retain_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, its ESD part, its retain part), each a batch mean; without retain rows the retain part is 0."""
    unlearn = esd_loss(policy_concept, eps_concept, eps_uncond, eta)
    if policy_retain is None or retain_weight == 0:
        retain = unlearn.new_zeros(())
    else:
        retain = per_sample_mse(policy_retain, eps_retain.detach()).mean()
    return unlearn + retain_weight * retain, unlearn, retain


def uce_edit(
    weight: torch.Tensor,
    erase: torch.Tensor,
    guide: torch.Tensor,
    keep: torch.Tensor | None = None,
    lam: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> torch.Tensor:
    """The edited projection W'; erase/guide are (n, d_in), keep is (m, d_in). Solved in float64."""
    if erase.shape != guide.shape:
        raise ValueError(f"erase {tuple(erase.shape)} and guide {tuple(guide.shape)} must pair up row by row")
    w, c, g = weight.double(), erase.double(), guide.double()
    p = keep.double() if keep is not None else c.new_zeros((0, c.shape[1]))
    left = erase_scale * (w @ g.T) @ c + preserve_scale * (w @ p.T) @ p + lam * w
    right = erase_scale * c.T @ c + preserve_scale * p.T @ p + lam * torch.eye(c.shape[1], dtype=torch.float64)
    return torch.linalg.solve(right, left.T).T.to(weight.dtype)  # right is symmetric: W' = left · right⁻¹
