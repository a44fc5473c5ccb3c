"""Family-independent LoRA plumbing on peft: attach, switch off for the reference, state in and out."""

from __future__ import annotations

from contextlib import contextmanager

import torch

ADAPTER = "duo"
# SPEC §3: UNet self-attention only.
SELF_ATTENTION = r".*attn1\.(to_q|to_k|to_v|to_out\.0)$"
# ESD-x: the cross-attention layers, the only ones that read the prompt.
CROSS_ATTENTION = r".*attn2\.(to_q|to_k|to_v|to_out\.0)$"
# ESD-u: everything but cross-attention (self-attention, feed-forward, attention in/out, ResNet convolutions).
NON_CROSS_ATTENTION = (
    r".*(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|attentions\.\d+\.proj_(in|out)|resnets\.\d+\.conv[12])$"
)


def attach_lora(unet: torch.nn.Module, rank: int, alpha: float, targets: str | list[str]) -> None:
    """Add a trainable LoRA (gaussian A, zero B, so the model is unchanged at init); base stays frozen."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    unet.add_adapter(config, adapter_name=ADAPTER)
    for p in lora_parameters(unet):
        p.data = p.data.float()  # LoRA weights in fp32 under mixed precision
    if not lora_parameters(unet):
        raise ValueError(f"LoRA targets {targets!r} matched no module of the UNet")


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad]


@contextmanager
def adapters_disabled(unet: torch.nn.Module):
    """The reference model ε_ref: same UNet, LoRA off; always switched back on, even if the body raises."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def get_lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


def set_lora_state(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA state does not fit this UNet: unexpected keys {unexpected[:3]}")
