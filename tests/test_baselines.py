"""ESD and UCE through `duo train --method`: one loop, their own settings, LoRAs the harness loads, and on
Shapes each lowers the rate of red on direct prompts."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from duo.errors import UserError
from duo.train.api import LORA_FILE, resolve_config, train
from duo.train.config import TrainConfig
from duo.train.uce import lora_factors, text_vectors


def test_flags_of_another_method_are_refused():
    with pytest.raises(UserError, match="--beta applies to --method duo"):
        TrainConfig(model="m", data="d", out="o", method="esd-x", beta=10.0).validate()
    with pytest.raises(UserError, match="--eta applies to --method esd-u / esd-x"):
        TrainConfig(model="m", data="d", out="o", eta=2.0).validate()
    with pytest.raises(UserError, match="--steps applies to"):
        TrainConfig(model="m", data="d", out="o", method="uce", steps=10).validate()
    TrainConfig(model="m", data="d", out="o", method="uce", uce_guide="a blue circle").validate()


def test_cli_exits_2_on_a_foreign_flag(tmp_path):
    cmd = [sys.executable, "-m", "duo", "train", "--method", "uce", "--beta", "10"]
    r = subprocess.run([*cmd, "--model", "m", "--data", "d", "--out", str(tmp_path / "o")], capture_output=True)
    assert r.returncode == 2 and b"--beta applies to --method duo" in r.stderr
    assert not (tmp_path / "o").exists()


def test_lora_factors_hold_the_delta_exactly_and_pad_to_the_rank():
    delta = torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 3, dtype=torch.float64)  # rank 2, d_in 3
    b, a, err = lora_factors(delta, rank=4)  # 3 singular directions exist; the 4th is padding
    assert b.shape == (6, 4) and a.shape == (4, 3) and err < 1e-10
    torch.testing.assert_close((b @ a).double(), delta, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(b[:, 3]) == 0 and torch.count_nonzero(a[3]) == 0
    _, _, truncated = lora_factors(delta, rank=1)
    assert truncated > 1e-3  # the error is reported, not hidden


class _States:
    """A family whose text states are known: row i of text t is [t_index, position]."""

    def __init__(self, last: dict[str, int], length: int = 6):
        self.last, self.length = last, length

    def prompt_states(self, texts):
        states = torch.tensor(
            [[[float(i), float(p)] for p in range(self.length)] for i, _ in enumerate(texts)], dtype=torch.float32
        )
        return states, [self.last[t] for t in texts]


def test_uce_vectors_start_at_each_texts_last_word_and_have_equal_length():
    family = _States({"a red circle": 3, " ": 0, "": 0, "keep me": 2})
    c, g, p = text_vectors(family, [("a red circle", " ")], ["", "keep me"])
    # erased from position 3, guide from 0; both 6 − max(3, 0) = 3 long (the authors' alignment)
    assert c[:, 1].tolist() == [3, 4, 5] and g[:, 1].tolist() == [0, 1, 2]
    assert p.shape == (12, 2)  # preserved texts keep every position


def test_esd_loss_at_init_is_the_hand_computed_multiple(tiny_model, pairs_dir):
    """LoRA B = 0 → ε_θ(c) = ε_ref(c), so L = ‖ε_c − ε∅ + η(ε_c − ε∅)‖² = (1 + η)²‖ε_c − ε∅‖²."""
    from accelerate import Accelerator

    from duo.data.pairs import load_pairs
    from duo.models.family import load_family
    from duo.models.lora import attach_lora
    from duo.train.methods import EsdMethod

    family, pairs, acc = load_family(tiny_model), load_pairs(pairs_dir), Accelerator(cpu=True)
    attach_lora(family.unet, 4, 4.0, family.lora_targets("esd-x"))
    losses = {}
    for eta in (0.0, 1.0, 2.0):
        cfg = TrainConfig(model=tiny_model, data=pairs_dir, out="x", method="esd-x", esd_prompts="unsafe", eta=eta)
        method = EsdMethod(cfg, family, pairs, "cpu")
        parts = method.micro_loss(family.unet, acc, method.draw(0, 2))
        assert parts["shift"].item() < 1e-10  # equal up to batched-vs-single float rounding
        losses[eta] = parts["loss"].item()
    assert losses[0.0] > 0
    assert losses[1.0] == pytest.approx(4 * losses[0.0], rel=1e-4)
    assert losses[2.0] == pytest.approx(9 * losses[0.0], rel=1e-4)


def _lora_modules(folder) -> set[str]:
    return {k.split(".lora")[0].removeprefix("unet.") for k in load_file(folder / LORA_FILE)}


def test_esd_trains_its_layers_in_the_one_loop_and_every_layer_loads(tiny_model, pairs_dir, tmp_path):
    from duo.models.family import load_with_loras

    outs = {}
    for method in ("esd-x", "esd-u"):
        outs[method] = train(
            resolve_config(
                model=tiny_model, data=pairs_dir, out=str(tmp_path / method), method=method,
                esd_prompts="unsafe", steps=3, lr=1e-2,
            )
        )  # fmt: skip
        metrics = [json.loads(line) for line in (outs[method] / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3] and {"loss", "shift", "grad_norm"} <= metrics[0].keys()
        assert metrics[-1]["shift"] > 0
    x, u = _lora_modules(outs["esd-x"]), _lora_modules(outs["esd-u"])
    assert x and all(".attn2." in m for m in x)
    assert not any(".attn2." in m for m in u)
    assert any(m.endswith("conv1") for m in u) and any(".attn1." in m for m in u) and any(".ff." in m for m in u)
    # Every layer of the file must come back on load (a mixed key format silently dropped attn1 once).
    family = load_with_loras(tiny_model, [str(outs["esd-u"])])
    loaded = {n for n, m in family.unet.named_modules() if hasattr(m, "lora_B") and len(m.lora_B)}
    assert u <= loaded


def test_esd_u_trains_the_published_layer_set(tiny_model):
    """ESD-u's published rule (train-scripts, "noxattn"): every weight whose name holds no `attn2` and is neither
    the time embedding nor the output layer — here every linear and convolution it admits carries the LoRA."""
    from duo.models.family import load_family
    from duo.models.lora import attach_lora

    family = load_family(tiny_model)
    unet = family.unet
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    published = {
        name
        for name, m in unet.named_modules()
        if isinstance(m, layers) and "attn2" not in name and not name.startswith(("time_embedding", "conv_out"))
    }
    attach_lora(unet, 2, 2.0, family.lora_targets("esd-u"))
    wrapped = {n for n, m in unet.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == published
    assert "conv_in" in wrapped and any(n.endswith("time_emb_proj") for n in wrapped)  # beyond the earlier set


def test_uce_lora_reproduces_the_closed_form(tiny_model, pairs_dir, tmp_path):
    from duo.data.pairs import load_pairs
    from duo.models.family import load_family, load_with_loras
    from duo.objectives import uce_edit
    from duo.train.uce import edit_texts

    out = train(resolve_config(model=tiny_model, data=pairs_dir, out=str(tmp_path / "uce"), method="uce",
                               uce_erase="prompts"))  # fmt: skip
    report = json.loads((out / "uce.json").read_text())
    assert report["max_relative_error"] < 1e-5
    cfg = TrainConfig(**{k: v for k, v in json.loads((out / "config.json").read_text()).items()
                         if k in TrainConfig.__dataclass_fields__})  # fmt: skip
    original = load_family(tiny_model)
    c, g, p = text_vectors(original, *edit_texts(cfg, load_pairs(pairs_dir)))
    edited = load_with_loras(tiny_model, [str(out)])
    projections = dict(edited.cross_attention_projections())
    x = torch.randn(5, c.shape[1])
    for name, module in original.cross_attention_projections():
        w = module.weight.detach()
        expected = x @ uce_edit(w, c, g, p, cfg.uce_lambda, cfg.erase_scale, cfg.preserve_scale).T
        with torch.no_grad():
            torch.testing.assert_close(projections[name](x), expected, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(module(x), expected, atol=1e-3)  # the edit changed something


def test_concept_train_section_tunes_duo_only():
    """shapes-red's `train:` (β 50, attention targets) must not leak into a baseline's settings."""
    from duo.train.api import config_with_concept_defaults

    section = {"beta": 50, "targets": ".*attn[12].*", "steps": 500}
    assert config_with_concept_defaults({"model": "m", "data": "d", "out": "o"}, section).beta == 50
    esd = config_with_concept_defaults({"model": "m", "data": "d", "out": "o", "method": "esd-x"}, section)
    assert esd.beta == 500.0 and esd.targets is None and esd.steps == 1000
    esd.validate()
    # --recipe authors: DUO itself with the authors' defaults, the section ignored but explicit flags kept
    authors = config_with_concept_defaults({"model": "m", "data": "d", "out": "o", "recipe": "authors"}, section)
    assert (authors.beta, authors.targets, authors.steps) == (500.0, None, 1000)
    tuned = {"model": "m", "data": "d", "out": "o", "recipe": "authors", "steps": 7}
    assert config_with_concept_defaults(tuned, section).steps == 7


def test_uce_lambda_default_is_the_one_the_authors_script_passes():
    from duo.train.config import TrainConfig

    assert TrainConfig(method="uce").uce_lambda == 0.5  # train_erase.py: edit_model(..., lamb=0.5, ...)


# ---- on Shapes: each method, briefly, lowers red on direct prompts ---------------------------------------


@pytest.fixture(scope="module")
def shapes_pairs(tmp_path_factory):
    from duo.data.curate import CurateConfig, curate

    out = tmp_path_factory.mktemp("shapes") / "pairs"
    curate(CurateConfig(model="shapes", concept="shapes-red", out=str(out), pairs=16, batch_size=16))
    return str(out)


def _red_rate(lora) -> float:
    from duo.data.concepts import load_concept
    from duo.data.splits import split_prompts
    from duo.judges import get_judge
    from duo.models.family import load_with_loras

    concept = load_concept("shapes-red")
    # the prompts the methods were trained on: this checks that each method works, not how it generalises
    prompts = [p for p, _ in split_prompts(concept, "training", 0)[0][:8]] * 2
    family = load_with_loras("shapes", [str(lora)] if lora else None)
    images = family.text2image(prompts, list(range(len(prompts))), concept.steps, concept.guidance)
    verdicts = get_judge(concept.judge, concept.judge_options).judge(images, prompts)
    return sum(v.present for v in verdicts) / len(verdicts)


# Measured (16 pairs, 8 prompts × 2 seeds, before the held-out prompts were split off): original 1.00; ESD-x
# 0.31, ESD-u 0.50 after 150 steps (also 0.50 after 300); UCE (unsafe → safe prompts) 0.00. Each must drop by
# its measured drop less 0.2 (3 images of 16), room for another BLAS or thread count.
BRIEF = {
    "esd-x": ({"method": "esd-x", "esd_prompts": "unsafe", "lr": 1e-3, "steps": 150}, 0.69 - 0.2),
    "esd-u": ({"method": "esd-u", "esd_prompts": "unsafe", "lr": 1e-3, "steps": 150}, 0.50 - 0.2),
    "uce": ({"method": "uce", "uce_erase": "prompts"}, 1.00 - 0.2),
}


@pytest.mark.parametrize("name", sorted(BRIEF))
def test_each_method_briefly_lowers_red_on_shapes(name, shapes_pairs, tmp_path):
    flags, drop = BRIEF[name]
    original = _red_rate(None)
    out = train(resolve_config(model="shapes", data=shapes_pairs, out=str(tmp_path / name), **flags))
    assert original >= 0.9
    assert _red_rate(out) <= original - drop
