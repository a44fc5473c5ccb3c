"""Family-independent LoRA plumbing on peft: attach, switch off for the reference, state in and out."""

from __future__ import annotations

from contextlib import contextmanager

import torch

ADAPTER = "duo"
# SPEC §3: UNet self-attention only.
SELF_ATTENTION = r".*attn1\.(to_q|to_k|to_v|to_out\.0)$"
# ESD-x: the cross-attention layers, the only ones that read the prompt.
CROSS_ATTENTION = r".*attn2\.(to_q|to_k|to_v|to_out\.0)$"
# ESD-u as published ("noxattn"): every weight but cross-attention, the time embedding and the output layer
# (conv_out) — here every such linear and convolution: self-attention, feed-forward, attention in/out, ResNet
# convolutions, time projections and shortcuts, down/up-samplers, conv_in. The published code also tunes the
# biases and norms a LoRA cannot hold (docs/baselines.md).
NON_CROSS_ATTENTION = (
    r"(.*(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|attentions\.\d+\.proj_(in|out)"
    r"|resnets\.\d+\.(conv[12]|time_emb_proj|conv_shortcut)|(down|up)samplers\.0\.conv)|conv_in)$"
)


# The text encoder's transformer layers: every attention projection and both feed-forward layers (AdvUnlearn's
# text_encoder_full trains these and the layer norms; a LoRA cannot hold a norm).
TEXT_ENCODER_LAYERS = r".*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$"


def attach_lora(module: torch.nn.Module, rank: int, alpha: float, targets: str | list[str]) -> None:
    """Add a trainable LoRA (gaussian A, zero B, so the model is unchanged at init); base stays frozen.

    A diffusers model registers it through its own `add_adapter` (its loaders read that registry); any other
    module (a transformers text encoder, whose `add_adapter` demands a newer peft) gets peft's layers injected.
    """
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft import LoraConfig, inject_adapter_in_model

    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    if isinstance(module, PeftAdapterMixin):
        module.add_adapter(config, adapter_name=ADAPTER)
    else:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    for p in lora_parameters(module):
        p.data = p.data.float()  # LoRA weights in fp32 under mixed precision
    if not lora_parameters(module):
        raise ValueError(f"LoRA targets {targets!r} matched no module of the {type(module).__name__}")


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


@contextmanager
def adapters_disabled(module):
    """The reference model ε_ref: same module, LoRA off; always switched back on, even if the body raises."""
    _enable_adapters(module, False)
    try:
        yield module
    finally:
        _enable_adapters(module, True)


def _enable_adapters(module, enabled: bool) -> None:
    # Each peft layer switched directly (what diffusers' disable_adapters does), so modules whose own method
    # checks the peft version (transformers) work too; anything else is asked through its methods.
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(module, torch.nn.Module):
        module.enable_adapters() if enabled else module.disable_adapters()
        return
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


def lora_scale(module: torch.nn.Module) -> float:
    """α/r of the LoRA attached by `attach_lora` (1.0 when there is none): the factor on B·A."""
    config = getattr(module, "peft_config", {}).get(ADAPTER)
    return float(config.lora_alpha) / float(config.r) if config is not None else 1.0


class LoraModules(torch.nn.ModuleDict):
    """Several modules whose LoRAs train as one (DUO `--lora-on both`: the UNet and the text encoder). Their
    states merge into one dict keyed as each module names its layers (the names are disjoint), the form a
    family's save_lora splits between its components; the parameters and the switch-off cover all of them."""


def lora_parts(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules a trained module stands for: a LoraModules' members, else the module itself."""
    return list(module.values()) if isinstance(module, LoraModules) else [module]


def get_lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {
        k: v.detach().clone()
        for part in lora_parts(module)
        for k, v in get_peft_model_state_dict(part, adapter_name=ADAPTER).items()
    }


def set_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    parts, left = lora_parts(module), dict(state)
    for part in parts:
        names = set(dict(part.named_modules())) if len(parts) > 1 else None
        own = {k: left.pop(k) for k in list(left) if names is None or k.split(".lora_")[0] in names}
        result = set_peft_model_state_dict(part, own, adapter_name=ADAPTER)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"LoRA state does not fit this {type(part).__name__}: unexpected keys {unexpected[:3]}")
    if left:
        raise ValueError(f"LoRA state does not fit these modules: unexpected keys {list(left)[:3]}")
