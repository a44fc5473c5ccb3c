"""ESD's target and UCE's closed form against numbers worked out by hand."""

import torch

from duo.objectives.baselines import esd_loss, esd_target, uce_edit


def test_esd_target_by_hand():
    concept, uncond = torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    # uncond − η·(concept − uncond) = [1, 1] − 2·[2, 0] = [−3, 1]
    assert torch.equal(esd_target(concept, uncond, eta=2.0), torch.tensor([[-3.0, 1.0]]))
    policy = torch.tensor([[-1.0, 3.0]], requires_grad=True)
    loss = esd_loss(policy, concept, uncond, eta=2.0)  # mean of (2², 2²) = 4
    assert loss.item() == 4.0
    loss.backward()
    assert torch.allclose(policy.grad, torch.tensor([[2.0, 2.0]]))  # d/dp mean((p − t)²) = (p − t)
    assert esd_target(concept, uncond, 2.0).requires_grad is False


def test_uce_maps_the_concept_to_its_guide_and_keeps_the_rest():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    c, g = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # without keeps and λ → 0 the concept direction must read as the guide: W' e1 = W e2 = [2, 4]
    edited = uce_edit(w, c, g, keep=torch.tensor([[0.0, 1.0]]), lam=1e-9)
    assert torch.allclose(edited @ c[0], w @ g[0], atol=1e-6)
    assert torch.allclose(edited @ torch.tensor([0.0, 1.0]), w @ torch.tensor([0.0, 1.0]), atol=1e-6)
    # by hand with λ = 1 and no keeps: W' = (W g cᵀ + W)(c cᵀ + I)⁻¹ = [[1+2, 2], [3+4, 4]] · diag(1/2, 1)
    by_hand = torch.tensor([[1.5, 2.0], [3.5, 4.0]])
    assert torch.allclose(uce_edit(w, c, g, lam=1.0), by_hand)
    assert torch.allclose(uce_edit(w, c, c, lam=1.0), w)  # guide = concept: nothing to change


def test_uce_scales_weigh_erase_against_preserve():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    c, g = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    keep = torch.tensor([[1.0, 0.0]])  # keeping exactly what is erased: the scales decide who wins
    erased = uce_edit(w, c, g, keep=keep, lam=1e-9, erase_scale=1.0, preserve_scale=1e-6)
    kept = uce_edit(w, c, g, keep=keep, lam=1e-9, erase_scale=1e-6, preserve_scale=1.0)
    assert torch.allclose(erased @ c[0], w @ g[0], atol=1e-4)
    assert torch.allclose(kept @ c[0], w @ c[0], atol=1e-4)
    # by hand, λ = 1, s_e = 2, no keeps: (2 W g cᵀ + W)(2 c cᵀ + I)⁻¹ = [[2·2+1, 2], [2·4+3, 4]] · diag(1/3, 1)
    by_hand = torch.tensor([[5.0 / 3.0, 2.0], [11.0 / 3.0, 4.0]])
    assert torch.allclose(uce_edit(w, c, g, lam=1.0, erase_scale=2.0), by_hand)
