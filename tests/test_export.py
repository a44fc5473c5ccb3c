"""`duo export`: the kohya file loads back through diffusers' own kohya reader to the same images as the diffusers
LoRA (every family with a kohya layout), fused equals the LoRA, and the folder is whole or absent."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from duo.cli.main import main
from duo.models.family import family_class, load_family
from duo.models.kohya import read_layers
from duo.models.lora import TEXT_ENCODER_LAYERS, attach_lora, get_lora_state, lora_parameters
from duo.train.api import LORA_FILE, resolve_config, train

IMAGE_KW = dict(num_inference_steps=2, height=32, width=32, output_type="np")


def random_lora(family, folder: Path, targets: str, text: bool = True) -> Path:
    """A LoRA saved the way `duo train` saves one, with weights far from zero and α ≠ r on the text encoder (so a
    wrong alpha in the export shows)."""
    attach_lora(family.unet, 4, 4, targets)
    if text:
        attach_lora(family.pipe.text_encoder, 4, 8, TEXT_ENCODER_LAYERS)
    modules = [family.unet, family.pipe.text_encoder] if text else [family.unet]
    for module in modules:
        for p in lora_parameters(module):
            p.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    folder.mkdir()
    family.save_lora(folder, {k: v for m in modules for k, v in get_lora_state(m).items()})
    return folder


def images(model: str, lora: str | None) -> np.ndarray:
    pipe = load_family(model).pipe
    if lora:
        pipe.load_lora_weights(lora)
    return pipe(["a naked white woman"], generator=torch.Generator().manual_seed(1), **IMAGE_KW).images


def kohya_file(model: str, lora: Path, path: Path) -> Path:
    save_file(family_class(model).kohya_state(read_layers(lora / LORA_FILE)), str(path))
    return path


def assert_kohya_same_images(model: str, lora: Path, tmp_path: Path) -> None:
    kohya = kohya_file(model, lora, tmp_path / "kohya.safetensors")
    with safe_open(str(kohya), "pt") as f:
        assert all(k.startswith(("lora_unet_", "lora_te")) for k in f.keys())
    original, diffusers, from_kohya = images(model, None), images(model, str(lora)), images(model, str(kohya))
    assert np.abs(diffusers - original).max() > 1e-2  # the LoRA changes the images: the comparison means something
    assert np.abs(from_kohya - diffusers).max() <= 1e-5


@pytest.mark.parametrize("family_name", ["sd", "sdxl"])
def test_kohya_file_gives_the_diffusers_images(family_name, tiny_model, tmp_path):
    from duo.models.tiny_sdxl import build_tiny_sdxl_pipeline

    model = tiny_model if family_name == "sd" else str(build_tiny_sdxl_pipeline(tmp_path / "pipe"))
    family = load_family(model)
    lora = random_lora(family, tmp_path / "lora", family.lora_targets("esd-u"))  # self-attn, ResNets, ff, ...
    assert_kohya_same_images(model, lora, tmp_path)


def test_flux_kohya_fuses_qkv_and_gives_the_diffusers_images(tmp_path):
    """Double-stream blocks of the tiny FLUX (its single-stream blocks are narrower than diffusers' kohya reader
    assumes; the slow test below covers them at FLUX.1's width)."""
    from duo.models.tiny_flux import build_tiny_flux_pipeline

    model = str(build_tiny_flux_pipeline(tmp_path / "pipe"))
    family = load_family(model)
    targets = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj)|ff\.net\.2)"
    lora = random_lora(family, tmp_path / "lora", targets)
    kohya = kohya_file(model, lora, tmp_path / "k.safetensors")
    with safe_open(str(kohya), "pt") as f:
        qkv = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight")
        assert f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight").shape[0] == 12  # 3 × rank
        assert qkv[:16, 4:].abs().max() == 0  # q's rows see only q's rank block
    assert_kohya_same_images(model, lora, tmp_path)


@pytest.mark.slow
def test_flux_single_blocks_at_flux_width(tmp_path):
    """FLUX.1's single-stream linear1 (q, k, v and the MLP input fused, 3072 + 3072 + 3072 + 12288 rows): a LoRA on
    q, k, v only becomes a block-diagonal LoRA with a zero MLP block, read back exactly."""
    from diffusers import FluxTransformer2DModel

    from duo.models.flux import FluxFamily
    from duo.models.tiny_flux import TINY_FLUX_TRANSFORMER

    wide = {"num_layers": 0, "attention_head_dim": 128, "num_attention_heads": 24, "axes_dims_rope": (16, 56, 56)}
    torch.manual_seed(0)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**{**TINY_FLUX_TRANSFORMER, **wide}, guidance_embeds=False)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    attach_lora(model, 4, 4, r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)")
    for p in lora_parameters(model):
        p.data.normal_(0, 0.3)
    state = {f"transformer.{k}": v for k, v in get_lora_state(model).items()}
    save_file(state, str(tmp_path / LORA_FILE))
    kohya = FluxFamily.kohya_state(read_layers(tmp_path / LORA_FILE))
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 16)

    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    mlp = back["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"]
    assert mlp.abs().max() == 0


def test_sd3_has_no_kohya_layout(tmp_path):
    from duo.models.sd3 import StableDiffusion3Family

    with pytest.raises(Exception, match="--format diffusers"):
        StableDiffusion3Family.kohya_state({"transformer": {}})


# ---- the command ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model, pairs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "lora"
    train(resolve_config(model=tiny_model, data=pairs_dir, out=str(out), steps=3, lr=1e-2))
    return out


def test_export_kohya_and_diffusers_folders(trained, tiny_model, tmp_path):
    assert main(["export", str(trained), "--out", str(tmp_path / "k"), "--name", "no-nudity"]) == 0  # kohya: default
    record = json.loads((tmp_path / "k" / "export.json").read_text())
    assert record["format"] == "kohya" and record["source"] == str(trained)
    assert set(record["files"]) == {"no-nudity.safetensors", "README.md"}
    with safe_open(str(tmp_path / "k" / "no-nudity.safetensors"), "pt") as f:
        assert f.metadata()["duo.format"] == "kohya"
        assert any(k.endswith(".alpha") for k in f.keys())
    assert main(["export", str(trained), "--out", str(tmp_path / "d"), "--format", "diffusers"]) == 0
    same = images(tiny_model, str(tmp_path / "d")) - images(tiny_model, str(tmp_path / "k" / "no-nudity.safetensors"))
    assert np.abs(same).max() <= 1e-5


def test_export_fused_equals_the_lora(trained, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    assert main(["export", str(trained), "--out", str(tmp_path / "f"), "--format", "fused"]) == 0
    fused = StableDiffusionPipeline.from_pretrained(tmp_path / "f")
    out = fused(["a naked white woman"], generator=torch.Generator().manual_seed(1), **IMAGE_KW).images
    np.testing.assert_allclose(out, images(tiny_model, str(trained)), atol=1e-4)
    assert (tmp_path / "f" / "export.json").is_file() and (tmp_path / "f" / "model_index.json").is_file()


def test_export_refusals_exit_2_and_keep_files(trained, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", str(trained), "--out", str(foreign)]) == 2
    assert main(["export", str(trained), "--out", str(foreign), "--overwrite"]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert "not an export folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(trained), "--out", str(trained / "inside")]) == 2
    # an earlier export is replaced with --overwrite, and no temporary folder is left behind
    assert main(["export", str(trained), "--out", str(tmp_path / "e"), "--format", "diffusers"]) == 0
    assert main(["export", str(trained), "--out", str(tmp_path / "e"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "e" / "export.json").read_text())["format"] == "kohya"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "mine"]


def test_fused_layer_equals_its_slices_and_a_missing_slice_is_zero():
    from duo.models.kohya import fused_layer

    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g))
    v = (torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g))
    down, up = fused_layer([q, None, v, None], [3, 3, 3, 12])
    assert down.shape == (8, 5) and up.shape == (21, 8)
    product = up @ down
    torch.testing.assert_close(product[:3], q[1] @ q[0])
    torch.testing.assert_close(product[6:9], v[1] @ v[0])
    assert product[3:6].abs().max() == 0 and product[9:].abs().max() == 0
