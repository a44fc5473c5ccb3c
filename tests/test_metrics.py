"""FID, LPIPS, CLIP score and their feature backends: closed forms, invariances, weight round-trips."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from duo.errors import UserError
from duo.metrics import (
    ClipFeatures,
    LpipsVgg,
    clip_score,
    fid,
    frechet_distance,
    get_features,
    get_lpips,
    load_lpips,
    lpips_distance,
)
from duo.metrics.lpips import CHANNELS, vgg16_features
from duo.shapes.features import ShapesFeatures, ShapesLpips
from duo.shapes.render import render_dataset

VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def exact_moments(mu: np.ndarray, var: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Samples whose sample mean is exactly mu and sample covariance exactly diag(var)."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mu + z * np.sqrt(var)


# ---------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero():
    for n, d in ((300, 16), (10, 32)):  # the second has a singular covariance
        x = np.random.default_rng(n).standard_normal((n, d)) @ np.random.default_rng(1).standard_normal((d, d))
        assert frechet_distance(x, x) < 1e-6 * np.trace(np.cov(x, rowvar=False))


def test_fid_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    a, b = exact_moments(mu1, s1, 500, 1), exact_moments(mu2, s2, 400, 2)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(expected, 1e-4)


def test_fid_is_symmetric_for_non_commuting_covariances():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    b = rng.standard_normal((150, 12)) @ rng.standard_normal((12, 12)) + 1
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_fid_shift_adds_squared_norm():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((100, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((120, 6)) * 2
    shift = rng.standard_normal(6)
    norm2 = float((shift**2).sum())
    assert frechet_distance(a, a + shift) == pytest.approx(norm2, rel=1e-9)
    # in general the mean term moves by ‖s‖² minus the cross term with the existing mean gap
    gap = a.mean(0) - b.mean(0)
    moved = frechet_distance(a, b + shift) - frechet_distance(a, b)
    assert moved == pytest.approx(norm2 - 2 * float(gap @ shift), rel=1e-8)


def test_fid_rejects_a_single_sample():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


def test_fid_through_the_shapes_backend_reports_its_network():
    _, imgs = render_dataset(24, seed=7)
    _, other = render_dataset(24, seed=8)
    same = fid(imgs, imgs, "shapes")
    assert same["fid"] < 1e-6 and same["n_a"] == same["n_b"] == 24
    assert same["features"]["name"] == "shapes" and len(same["features"]["sha256"]) == 16
    assert fid(imgs, other, ShapesFeatures())["fid"] > 0


def test_feature_specs():
    assert isinstance(get_features("shapes"), ShapesFeatures)
    assert get_features("shapes").features(render_dataset(3, seed=1)[1]).shape == (3, 128)
    with pytest.raises(UserError, match="clip:"):
        get_features("inception")


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """Random VGG + non-negative heads in the documented key layout, and the net they came from."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = LpipsVgg()
    for k in range(len(CHANNELS)):
        getattr(net, f"lin{k}").model[1].weight.data.abs_()
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, net


def images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_vgg_stack_matches_torchvision_layout_and_shapes_at_64px():
    stack = vgg16_features()
    assert len(stack) == 31
    keys = {f"features.{i}.{p}" for i in VGG_CONVS for p in ("weight", "bias")}
    keys |= {f"lin{k}.model.1.weight" for k in range(5)}
    assert set(LpipsVgg().state_dict()) == keys
    net = LpipsVgg()
    with torch.no_grad():
        taps = net.taps(images(2, 64, 0))
        assert stack(images(1, 64, 0)).shape == (1, 512, 2, 2)
    assert [tuple(t.shape) for t in taps] == [
        (2, 64, 64, 64),
        (2, 128, 32, 32),
        (2, 256, 16, 16),
        (2, 512, 8, 8),
        (2, 512, 4, 4),
    ]


def test_lpips_identity_symmetry_and_difference(lpips_file):
    _, net = lpips_file
    a, b = images(3, 32, 1), images(3, 32, 2)
    assert torch.equal(lpips_distance(a, a, net), torch.zeros(3))
    ab, ba = lpips_distance(a, b, net), lpips_distance(b, a, net)
    assert torch.equal(ab, ba)
    assert (ab > 0).all() and ab.shape == (3,)


def test_lpips_weights_round_trip_through_safetensors(lpips_file):
    path, net = lpips_file
    loaded = load_lpips(path)
    a, b = images(2, 32, 3), images(2, 32, 4)
    assert torch.equal(lpips_distance(a, b, loaded), lpips_distance(a, b, net))
    prov = loaded.provenance()
    assert prov["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16] and prov["weights"] == str(path)
    assert torch.equal(lpips_distance(a, b, get_lpips(f"vgg:{path}")), lpips_distance(a, b, net))


def test_lpips_reads_the_lpips_package_layout(lpips_file, tmp_path):
    from safetensors.torch import save_file

    path, net = lpips_file
    slices = {
        i: s
        for s, idx in enumerate((range(4), range(4, 9), range(9, 16), range(16, 23), range(23, 30)), 1)
        for i in idx
    }
    state = {}
    for k, v in net.state_dict().items():
        parts = k.split(".")
        key = f"net.slice{slices[int(parts[1])]}.{parts[1]}.{parts[2]}" if parts[0] == "features" else k
        state[key] = v.contiguous()
    state["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    save_file(state, str(tmp_path / "pkg.safetensors"))
    a, b = images(1, 32, 5), images(1, 32, 6)
    assert torch.equal(lpips_distance(a, b, load_lpips(tmp_path / "pkg.safetensors")), lpips_distance(a, b, net))


def test_lpips_weight_file_errors(lpips_file, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = lpips_file
    state = load_file(str(path))
    with pytest.raises(UserError, match="not found"):
        load_lpips(tmp_path / "absent.safetensors")
    save_file(
        {k: v for k, v in state.items() if k not in ("lin3.model.1.weight", "features.7.bias")}, str(tmp_path / "m")
    )
    with pytest.raises(UserError, match=r"features\.7\.bias, lin3\.model\.1\.weight"):
        load_lpips(tmp_path / "m")
    save_file({**state, "lin0.model.1.weight": -state["lin0.model.1.weight"]}, str(tmp_path / "neg"))
    with pytest.raises(UserError, match="non-negative"):
        load_lpips(tmp_path / "neg")


def test_shapes_lpips_uses_the_judges_intermediate_features():
    _, imgs = render_dataset(4, seed=11)
    net = get_lpips("shapes")
    assert isinstance(net, ShapesLpips) and net.provenance()["mode"] == "intermediate-features"
    assert torch.equal(lpips_distance(imgs, imgs, net), torch.zeros(4))
    ab, ba = lpips_distance(imgs, imgs[::-1].copy(), net), lpips_distance(imgs[::-1].copy(), imgs, net)
    assert torch.equal(ab, ba) and (ab > 0).all() and (ab <= 2).all()


# ---------------------------------------------------------------- CLIP score and CLIP features


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from duo.models.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


PROMPTS = ["a red circle", "a photo of a cat", "a blue square on green", "a man in the city at night", "tree"]


def random_pil(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def test_clip_score_matches_a_hand_computation(tiny_clip):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    ims = random_pil(5, 0)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(tiny_clip)(images=ims, return_tensors="pt")["pixel_values"]
    tok = CLIPTokenizer.from_pretrained(tiny_clip)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**tok).pooler_output
    cos = (img / img.norm(dim=1, keepdim=True) * txt / txt.norm(dim=1, keepdim=True)).sum(1)

    result = clip_score(ims, PROMPTS, str(tiny_clip))
    assert torch.allclose(torch.tensor(result["per_image"]["cosine"]), cos, atol=1e-6)
    assert result["cosine"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert result["per_image"]["x100"] == pytest.approx([100 * max(c, 0.0) for c in result["per_image"]["cosine"]])
    assert result["x100"] == pytest.approx(float((100 * cos.clamp(min=0)).mean()), abs=1e-4)
    prov = result["provenance"]
    assert prov["model"] == str(tiny_clip) and set(prov["scales"]) == {"cosine", "x100"}
    assert prov["sha256"] == hashlib.sha256((tiny_clip / "model.safetensors").read_bytes()).hexdigest()[:16]


class FixedClip(ClipFeatures):
    """Chosen embeddings (the random tiny CLIP scores every pair below zero, so it cannot test the clamp)."""

    def __init__(self, img: torch.Tensor, txt: torch.Tensor) -> None:
        self.img, self.txt = img, txt

    def features(self, images):
        return self.img

    def text_features(self, prompts):
        return self.txt

    def provenance(self):
        return {"name": "fixed"}


def test_clip_score_x100_clamps_negative_cosines_only():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 3.0]])
    result = clip_score([None] * 3, ["a", "b", "c"], FixedClip(img, txt))
    assert result["per_image"]["cosine"] == pytest.approx([2**-0.5, -1.0, 1.0])
    assert result["per_image"]["x100"] == pytest.approx([100 * 2**-0.5, 0.0, 100.0])
    assert result["cosine"] == pytest.approx((2**-0.5) / 3)
    assert result["x100"] == pytest.approx((100 * 2**-0.5 + 100) / 3)


def test_clip_score_identical_inputs_and_batch_size(tiny_clip):
    ims = random_pil(5, 1)
    same = clip_score([ims[0], ims[0]], [PROMPTS[0], PROMPTS[0]], ClipFeatures(tiny_clip))
    # the same image twice in one batch: equal up to batched-matmul rounding (seen: 1.5e-8)
    assert same["per_image"]["cosine"][0] == pytest.approx(same["per_image"]["cosine"][1], abs=1e-6)
    one = clip_score(ims, PROMPTS, ClipFeatures(tiny_clip, batch_size=1))
    many = clip_score(ims, PROMPTS, ClipFeatures(tiny_clip, batch_size=8))
    assert np.allclose(one["per_image"]["cosine"], many["per_image"]["cosine"], atol=1e-6)
    assert clip_score(ims, PROMPTS, ClipFeatures(tiny_clip)) == clip_score(ims, PROMPTS, ClipFeatures(tiny_clip))


def test_clip_features_backend(tiny_clip):
    backend = get_features(f"clip:{tiny_clip}")
    ims = random_pil(4, 2)
    feats = backend.features(ims)
    assert feats.shape == (4, 16)
    as_tensor = torch.from_numpy(np.stack([np.asarray(i) for i in ims])).permute(0, 3, 1, 2) / 255.0
    assert torch.allclose(backend.features(as_tensor), feats, atol=1e-6)
    result = fid(ims, ims, backend)
    assert result["fid"] < 1e-6 and result["features"]["network"].startswith("CLIPModel")


def test_missing_clip_weights_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nobody/no-such-clip.*huggingface-cli download nobody/no-such-clip"):
        ClipFeatures("nobody/no-such-clip")
    with pytest.raises(UserError, match="save_pretrained"):
        get_features(f"clip:{tmp_path / 'absent'}")
