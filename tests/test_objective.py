"""The DUO objective against numbers worked out by hand, its β convention and its sign."""

import math

import pytest
import torch
import torch.nn.functional as F

from duo.objectives import coupled_hparams, duo_loss, preference_loss


def rows(*values):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)


def test_hand_computed_example():
    # rows: x⁻, x⁺, x_T.  policy errors: x⁻ (1−1)² = 0, x⁺ (0.5−1)² = 0.25
    # reference errors: x⁻ (0.8−1)² = 0.04, x⁺ (0.9−1)² = 0.01 → Δ⁻ = −0.04, Δ⁺ = 0.24
    # β = 1: L_pref = −log σ(−(0.24 + 0.04)) = log(1 + e^0.28) = 0.842915
    # keep = (0.3 − 0.1)² = 0.04, λ = 2 → L = 0.842915 + 0.08
    parts = duo_loss(rows(1.0, 0.5, 0.3), rows(0.8, 0.9, 0.1), rows(1.0, 1.0, 0.0), n_pairs=1, beta=1.0, lam=2.0)
    assert parts.delta_lose.item() == pytest.approx(-0.04, abs=1e-6)
    assert parts.delta_win.item() == pytest.approx(0.24, abs=1e-6)
    assert parts.pref.item() == pytest.approx(0.842915, abs=1e-5)
    assert parts.keep.item() == pytest.approx(0.04, abs=1e-6)
    assert parts.loss.item() == pytest.approx(0.922915, abs=1e-5)
    assert parts.accuracy.item() == 0.0  # the policy fits x⁺ worse: it does not prefer it yet


def test_mean_over_channels_and_pixels():
    policy = torch.zeros(3, 2, 2, 2)
    policy[1, 0, 0, 0] = 2.0  # one of 8 elements of x⁺ off by 2 → mean squared error 4/8
    parts = duo_loss(policy, torch.zeros_like(policy), torch.zeros_like(policy), n_pairs=1, beta=1.0, lam=0.0)
    assert parts.delta_win.item() == pytest.approx(0.5)


def test_beta_convention_has_no_half_factor():
    dw, dl = torch.tensor([0.003, -0.001]), torch.tensor([0.001, 0.002])
    ours = preference_loss(dw, dl, beta=500)
    diffusion_dpo = -F.logsigmoid(-0.5 * 1000 * (dw - dl))  # Diffusion-DPO's form with its β = 1000
    torch.testing.assert_close(ours, diffusion_dpo)
    assert not torch.allclose(ours, -F.logsigmoid(-0.5 * 500 * (dw - dl)))


def test_large_beta_stays_finite():
    assert math.isfinite(preference_loss(torch.tensor([10.0]), torch.tensor([-10.0]), beta=1e4).item())


def test_descent_step_lowers_error_on_safe_relative_to_unsafe():
    torch.manual_seed(0)
    target = torch.randn(6, 4, 2, 2)
    reference = target + 0.3 * torch.randn_like(target)
    policy = reference.clone().requires_grad_(True)
    parts = duo_loss(policy, reference, target, n_pairs=2, beta=10.0, lam=1.0)
    parts.loss.backward()
    with torch.no_grad():
        stepped = policy - 0.05 * policy.grad
    after = duo_loss(stepped, reference, target, n_pairs=2, beta=10.0, lam=1.0)
    assert (after.delta_win - after.delta_lose).item() < (parts.delta_win - parts.delta_lose).item()
    assert after.delta_win.item() < 0 < after.delta_lose.item()


def test_keep_term_scales_with_lambda():
    torch.manual_seed(1)
    policy, reference, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    one = duo_loss(policy, reference, target, 1, beta=5.0, lam=1.0)
    three = duo_loss(policy, reference, target, 1, beta=5.0, lam=3.0)
    assert (three.loss - three.pref).item() == pytest.approx(3 * (one.loss - one.pref).item(), rel=1e-5)


def test_keep_term_is_zero_at_lora_init():
    from diffusers import UNet2DConditionModel

    from duo.models.lora import SELF_ATTENTION, adapters_disabled, attach_lora
    from duo.models.tiny import TINY_UNET

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    attach_lora(unet, rank=4, alpha=4, targets=SELF_ATTENTION)
    x, t, emb = torch.randn(3, 4, 8, 8), torch.tensor([10, 20, 999]), torch.randn(3, 5, 32)
    with torch.no_grad(), adapters_disabled(unet):
        reference = unet(x, t, encoder_hidden_states=emb).sample
    policy = unet(x, t, encoder_hidden_states=emb).sample
    parts = duo_loss(policy, reference, torch.randn_like(x), 1, beta=500.0, lam=5e6)
    assert parts.keep.item() == 0.0
    assert parts.pref.item() == pytest.approx(math.log(2))


def test_adapters_come_back_after_an_error():
    from duo.models.lora import adapters_disabled

    class Fake:
        on = True

        def disable_adapters(self):
            self.on = False

        def enable_adapters(self):
            self.on = True

    fake = Fake()
    with pytest.raises(RuntimeError):
        with adapters_disabled(fake):
            raise RuntimeError("forward failed")
    assert fake.on


def test_lr_and_lambda_coupling():
    assert coupled_hparams(500) == pytest.approx((6e-5, 5e6))
    assert coupled_hparams(100) == pytest.approx((3e-4, 1e6))
    with pytest.raises(ValueError):
        coupled_hparams(0)
