"""Stable Diffusion 3 (rectified flow): the flow maths by hand, conditioning as diffusers builds it, and the
whole loop — curate, train, sample, attack, evaluate, report — on a tiny random SD3 pipeline."""

import inspect
import json

import numpy as np
import pytest
import torch

from duo.errors import UserError
from duo.models.family import load_family, load_with_loras
from duo.models.flow import FlowSchedule
from duo.models.protocol import ModelFamily
from duo.models.sd3 import StableDiffusion3Family

CONCEPT = """
name: tiny-sd3
judge: none
strength: 0.75
guidance: 5.0
steps: 3
unsafe_words: [naked, nude]
neighbours: ["a dressed man, realistic photo"]
parts:
  - name: naked
    pairs: 2
    unsafe: "a naked {race} woman, realistic photo"
    safe: "a dressed {race} woman, realistic photo"
    vars: {race: [white, black]}
"""
PROMPT = "a naked white woman, realistic photo"


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared CPU, oversubscribed threads run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    from duo.models.tiny_sd3 import build_tiny_sd3_pipeline

    return str(build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe"))


@pytest.fixture(scope="module")
def sd3(sd3_model):
    return load_family(sd3_model)


@pytest.fixture(scope="module")
def sd3_concept(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3concept") / "tiny-sd3.yaml"
    path.write_text(CONCEPT)
    return str(path)


# ---- the family and its flow maths, by hand ------------------------------------------------------------


def test_sd3_family_is_a_model_family_with_the_protocol_signatures(sd3):
    assert isinstance(sd3, ModelFamily)
    for name, wanted in vars(ModelFamily).items():
        if name.startswith("_") or not inspect.isfunction(wanted):
            continue
        expected = inspect.signature(wanted).parameters
        actual = inspect.signature(getattr(StableDiffusion3Family, name)).parameters
        assert list(actual) == list(expected), name
    assert sd3.prediction_type == "flow" and sd3.num_train_timesteps == 1000 and sd3.native_resolution == 64


def test_sd3_folders_load_as_sd3_and_unknown_pipelines_are_refused(sd3, tmp_path):
    assert sd3.unet is sd3.pipe.transformer and len(sd3.text_encoders) == 2  # no T5 in this folder
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserError, match=r"KandinskyPipeline \(model_index.json's _class_name\); duo supports"):
        load_family(str(tmp_path))


def test_sigma_table_ascends_with_the_shift_worked_out_by_hand():
    flow = FlowSchedule(1000, shift=3.0)
    s = flow.sigmas
    # σ = 3u / (1 + 2u), u = (t + 1) / 1000
    assert s[0].item() == pytest.approx(0.003 / 1.002)
    assert s[499].item() == pytest.approx(0.75)  # u = 0.5: 1.5 / 2
    assert s[749].item() == pytest.approx(0.9)  # u = 0.75: 2.25 / 2.5
    assert s[999].item() == 1.0 and bool((s[1:] > s[:-1]).all())
    assert FlowSchedule(1000).sigmas[249].item() == pytest.approx(0.25)  # no shift: σ = u
    from diffusers import FlowMatchEulerDiscreteScheduler

    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas.flip(0).double()
    torch.testing.assert_close(s, theirs, atol=1e-6, rtol=0)  # the scheduler's table, read from low noise


def test_schedules_that_sampling_would_reshape_are_refused():
    assert FlowSchedule.from_scheduler_config({"num_train_timesteps": 1000, "shift": 3.0}) == FlowSchedule(1000, 3.0)
    with pytest.raises(UserError, match="use_dynamic_shifting"):
        FlowSchedule.from_scheduler_config({"num_train_timesteps": 1000, "use_dynamic_shifting": True})


def test_noise_target_and_timesteps_worked_out_by_hand():
    flow = FlowSchedule(1000, shift=3.0)
    x0, eps = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -1.0)
    t = torch.tensor([499, 999])
    xt = flow.add_noise(x0, eps, t)
    assert xt[0].flatten().tolist() == pytest.approx([0.25 * 2 - 0.75] * 4)  # σ = 0.75: −0.25
    assert xt[1].flatten().tolist() == pytest.approx([-1.0] * 4)  # σ = 1: pure noise
    assert flow.target(x0, eps).unique().tolist() == [-3.0]  # v = ε − x₀
    assert flow.model_timestep(t).tolist() == pytest.approx([750.0, 1000.0])  # σ·1000, what the MMDiT reads
    assert flow.preference_timesteps(0.75) == (0, 750) and flow.keep_timestep() == 999


def test_preference_range_is_where_image_to_image_starts_and_goes():
    """SD3's img2img at strength 0.75 (20 steps) starts at the σ of the range's top, within one sampling step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow, steps = FlowSchedule(1000, shift=3.0), 20
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps)
    lo, hi = flow.preference_timesteps(0.75)
    start = sched.sigmas[int(steps - steps * 0.75)].item()  # the first σ of diffusers' get_timesteps
    assert flow.sigmas[hi - 1 - 1000 // (steps - 1)].item() < start <= flow.sigmas[hi - 1].item() + 1e-6
    assert sched.sigmas[-2].item() >= flow.sigmas[lo].item()  # its last noisy step is inside the range too


def test_vae_latents_are_shifted_then_scaled(sd3):
    mean, std = torch.ones(1, 16, 2, 2), torch.zeros(1, 16, 2, 2)
    x0 = sd3.latents_from_distribution(mean, std, torch.randn(1, 16, 2, 2))
    assert x0.unique().tolist() == pytest.approx([(1 - 0.0609) * 1.5305])


def test_denoise_gives_the_transformer_sigma_times_1000_and_the_pooled_row(sd3):
    seen = {}

    def transformer(**kw):
        seen.update(kw)
        return type("Out", (), {"sample": kw["hidden_states"]})

    emb = sd3.encode_prompts([PROMPT])
    sd3.denoise(transformer, torch.zeros(1, 16, 8, 8), torch.tensor([749]), emb)
    assert seen["timestep"].tolist() == pytest.approx([900.0])
    assert seen["encoder_hidden_states"].shape == (1, 77 + 256, 96)
    torch.testing.assert_close(seen["pooled_projections"], emb[:, -1, :80])


# ---- conditioning and generation ----------------------------------------------------------------------


def test_without_t5_conditioning_is_diffusers_and_generation_matches(sd3):
    emb = sd3.encode_prompts([PROMPT, "a cat"])
    assert emb.shape == (2, 77 + 256 + 1, 96)
    assert not emb[:, 77:-1].any()  # T5's place: zeros, as diffusers fills it
    assert not emb[:, :77, 80:].any() and emb[:, :77, :80].abs().sum() > 0  # CLIP-L ⊕ CLIP-G, padded to 96
    assert not emb[:, -1, 80:].any()
    torch.testing.assert_close(sd3.encode_ids(sd3.tokenize([PROMPT, "a cat"])), emb)
    direct = sd3.text2image([PROMPT, "a cat"], [3, 4], steps=2, guidance=5.0)
    packed = sd3.text2image(["ignored", "ignored"], [3, 4], steps=2, guidance=5.0, prompt_embeds=emb)
    assert direct[0].size == (64, 64)
    np.testing.assert_array_equal(np.asarray(direct[0]), np.asarray(packed[0]))  # our packing = encode_prompt
    assert not np.array_equal(np.asarray(direct[0]), np.asarray(direct[1]))
    again = sd3.text2image([PROMPT], [3], steps=2, guidance=5.0, negative_prompts=["a dressed woman"])
    assert not np.array_equal(np.asarray(again[0]), np.asarray(direct[0]))


def test_clip_g_reads_its_own_padding(sd3):
    ids = sd3.tokenize(["a cat"])
    second = sd3._second_clip_ids(ids)
    pad_g = sd3.vocabulary()["!"]
    assert second[0, :4].tolist() == ids[0, :4].tolist() and set(second[0, 4:].tolist()) == {pad_g}


def test_with_t5_the_decoded_prompt_conditions_t5(tmp_path):
    from duo.models.tiny_sd3 import build_tiny_sd3_pipeline

    family = load_family(str(build_tiny_sd3_pipeline(tmp_path / "t5", with_t5=True)))
    emb = family.encode_prompts([PROMPT, "a cat"])
    assert emb[:, 77:-1].abs().sum() > 0 and not torch.allclose(emb[0, 77:-1], emb[1, 77:-1])
    # T5 reads the ids decoded by CLIP: the same text unless CLIP's decoding changes it ("woman , realistic")
    torch.testing.assert_close(family.encode_ids(family.tokenize(["a cat"])), emb[1:])
    from_ids = family.encode_ids(family.tokenize([PROMPT]))
    torch.testing.assert_close(from_ids[:, :77], emb[:1, :77])
    assert not torch.allclose(from_ids[:, 77:-1], emb[:1, 77:-1])
    calls = []
    family.text_encoders[2].register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(family.encode_prompts([PROMPT, "a cat"]), emb)
    assert not calls  # T5 is frozen: a text it has read is not read again
    direct = family.text2image([PROMPT], [0], steps=2, guidance=5.0)
    packed = family.text2image(["x"], [0], steps=2, guidance=5.0, prompt_embeds=emb[:1])
    # the same conditioning by two float paths: a pixel may round the other way on some CPUs (1/255 on 1 of 12288
    # values was seen), so equal up to one level of 8-bit rounding
    np.testing.assert_allclose(np.asarray(direct[0], dtype=int), np.asarray(packed[0], dtype=int), atol=1, rtol=0)


def test_placeholders_get_one_id_in_both_clip_tables(sd3_model):
    family = load_family(sd3_model)
    ids = family.add_placeholder_tokens(["<s0>", "<s1>"])
    assert all(t.num_embeddings > max(ids) for t in family.token_embeddings)
    assert [t.embedding_dim for t in family.token_embeddings] == [32, 48]
    table = family.token_embeddings[1]
    shift = torch.nn.Parameter(torch.zeros(table.embedding_dim))
    handle = table.register_forward_hook(lambda module, args, out: out + shift)
    try:
        family.encode_ids(family.tokenize(["a <s0> cat"])).sum().backward()
    finally:
        handle.remove()
    assert shift.grad is not None and shift.grad.abs().sum() > 0  # CLIP-G's table is in the graph too


def test_safe_latent_diffusion_is_refused_with_exit_code_2(sd3_model, sd3_concept, tmp_path, capsys):
    family = load_family(sd3_model)
    with pytest.raises(UserError, match="Stable Diffusion 3"):
        family.text2image([PROMPT], [0], 2, 5.0, safe_guidance={"safety_concept": "nudity"})
    from duo.cli.main import main

    args = ["sample", "--model", sd3_model, "--concept", sd3_concept, "--guard", "sld", "--prompt", PROMPT]
    assert main(args + ["--steps", "2", "--out", str(tmp_path / "s")]) == 2  # what `duo` exits with
    assert "Safe Latent Diffusion" in capsys.readouterr().err


# ---- the whole loop -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_pairs(sd3_model, sd3_concept, tmp_path_factory):
    from duo.data.curate import CurateConfig, curate

    out = tmp_path_factory.mktemp("sd3pairs") / "pairs"
    curate(CurateConfig(model=sd3_model, concept=sd3_concept, out=str(out)))
    return str(out)


@pytest.fixture(scope="module")
def sd3_lora(sd3_model, sd3_pairs, tmp_path_factory):
    from duo.train.api import resolve_config, train

    out = tmp_path_factory.mktemp("sd3lora") / "lora"
    return train(resolve_config(model=sd3_model, data=sd3_pairs, out=str(out), steps=4, lr=1e-2, batch_size=2))


def test_duo_trains_and_plain_diffusers_loads_the_lora(sd3_model, sd3_lora):
    from diffusers import StableDiffusion3Pipeline

    metrics = [json.loads(line) for line in (sd3_lora / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(np.isfinite(m["loss"]) for m in metrics)
    card = (sd3_lora / "README.md").read_text()  # the card names the layers this family's default trained
    assert "transformer_blocks" in card and "the model family's default" in card and "| resolution | 64 px |" in card
    # a folder without T5 needs diffusers' documented way of saying so
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_model, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, output_type="np")
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(sd3_lora))
    loaded = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_B") and len(m.lora_B)}
    # DUO's default: the image stream's attention, SD3.5's image-only attn2 included
    assert {n.split(".")[2] for n in loaded} == {"attn", "attn2"} and all(".to_" in n for n in loaded)
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(after - before).max() > 1e-4


@pytest.fixture(scope="module")
def clip_judge(tmp_path_factory):
    """The CLIP judge on a tiny random CLIP: attacks need some judge, and it reads any image."""
    from duo.models.tiny import build_tiny_clip

    clip = build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")
    return json.dumps({"model": str(clip), "concept": ["naked"], "neutral": ["a photo"]})


def attack_config(out, lora, judge, **kw):
    from duo.attacks import AttackConfig

    settings = dict(lora=[str(lora)], n_prompts=1, images_per_prompt=1, steps=2, judge="clip", threads=1)
    return AttackConfig(out=str(out), judge_options=judge, **{**settings, **kw})


def test_saved_lora_folds_alpha_over_rank_into_b(sd3_model, tmp_path):
    """The file has no α, so loaders take α = r: an adapter trained at α/r = 4 must be saved with 4·B."""
    from safetensors.torch import load_file

    from duo.models.lora import attach_lora, get_lora_state, lora_parameters
    from duo.models.sd3 import IMAGE_ATTENTION

    family = load_family(sd3_model)
    attach_lora(family.unet, rank=2, alpha=8, targets=IMAGE_ATTENTION)
    for p in lora_parameters(family.unet):
        p.data.normal_()
    state = get_lora_state(family.unet)
    family.save_lora(tmp_path, state)
    saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert len(saved) == len(state) and all(k.startswith("transformer.") for k in saved)
    for key, value in state.items():
        torch.testing.assert_close(saved[f"transformer.{key}"], 4 * value if ".lora_B." in key else value)


def test_sample_attack_evaluate_report_on_sd3(sd3_model, sd3_lora, clip_judge, tmp_path):
    from duo.attacks import run_attack
    from duo.evaluate import EvaluateConfig, evaluate
    from duo.report import build_report
    from duo.sample import SampleConfig, sample

    records = sample(SampleConfig(model=sd3_model, out=str(tmp_path / "s"), prompt=[PROMPT], seeds=[0, 1], steps=2,
                                  lora=[str(sd3_lora)]))  # fmt: skip
    assert len(records) == 2 and all((tmp_path / "s" / r["file"]).is_file() for r in records)
    attack = tmp_path / "attack"
    results = run_attack("prompts", attack_config(attack, sd3_lora, clip_judge, n_prompts=2))
    assert results["dsr"]["n"] == 2 and results["model"]["ref"] == sd3_model
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("a red car on the street\na dog in a house\n")
    cfg = EvaluateConfig(out=str(tmp_path / "e"), lora=[str(sd3_lora)], attacks=[str(attack)], n_prompts=2,
                         prompts_file=str(neutral), lpips="shapes", steps=2, threads=1)  # fmt: skip
    r = evaluate(cfg)
    assert 0.0 < r["preservation"]["pp"] < 1.0  # the LoRA changed the neutral images, not beyond recognition
    assert r["attacks"]["prompts@training"]["dsr"]["n"] == 2  # the concept has no held-out prompts
    page = build_report([str(tmp_path / "e")], str(tmp_path / "report.html"))
    assert page.is_file() and "prompts" in page.read_text()


def test_uce_edits_the_context_embedder_in_closed_form(sd3_model, sd3_pairs, tmp_path):
    from duo.train.api import resolve_config, train

    out = train(resolve_config(model=sd3_model, data=sd3_pairs, out=str(tmp_path / "uce"), method="uce"))
    assert json.loads((out / "uce.json").read_text())["max_relative_error"] < 1e-4
    original, edited = load_family(sd3_model), load_with_loras(sd3_model, [str(out)])
    words, guide = original.prompt_states(["naked"]), original.prompt_states([" "])
    (name, before), after = original.cross_attention_projections()[0], edited.cross_attention_projections()[0][1]
    assert name == "context_embedder"
    with torch.no_grad():
        last = words[1][0]
        moved = (after(words[0][0, last]) - after(guide[0][0, guide[1][0]])).norm()
        was = (before(words[0][0, last]) - before(guide[0][0, guide[1][0]])).norm()
    assert moved < 0.5 * was  # the erased word now reads (nearly) as the guide


# Each attack at the smallest settings that still take every step of it once.
ATTACK_SETTINGS = {
    "ring-a-bell": {"length": 2, "population": 4, "generations": 1, "n_pairs": 1},
    "sneakyprompt": {"max_queries": 3, "max_steps": 3},
    "soft-prompt": {"iterations": 2, "k": 2, "n_images": 2, "batch": 1, "eval_every": 1, "eval_draws": 1,
                    "check_seeds": 1},
    "unlearndiff": {"timesteps": 2, "iterations": 2, "k": 2},
    "concept-inversion": {"n_images": 2, "train_steps": 2, "train_batch": 1, "checkpoint_every": 1, "num_vectors": 2},
    "relearn": {"n_images": 2, "checkpoints": [0, 1], "curve_targets": 1, "batch": 1},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ATTACK_SETTINGS))
def test_every_attack_runs_on_sd3(name, sd3_lora, clip_judge, tmp_path):
    """The token-level attacks search CLIP ids and learn one vector per CLIP table; the others need the flow maths."""
    from duo.attacks import run_attack

    results = run_attack(name, attack_config(tmp_path / name, sd3_lora, clip_judge), **ATTACK_SETTINGS[name])
    assert results["attack"] == name and results["dsr"]["n"] == 1
    learned = list((tmp_path / name).rglob("*.safetensors"))
    if name == "concept-inversion":  # two vectors per CLIP table, in the SDXL/SD3 embedding layout
        from safetensors.torch import load_file

        tensors = next(load_file(f) for f in learned if set(load_file(f)) == {"clip_l", "clip_g"})
        assert tensors["clip_l"].shape == (2, 32) and tensors["clip_g"].shape == (2, 48)


def test_esd_x_trains_the_context_stream_and_plain_diffusers_loads_it(sd3_model, sd3_pairs, tmp_path):
    """ESD's target ε(c∅) − η·(ε(c) − ε(c∅)) has weights summing to 1, and at fixed x_t, σ the velocity is an
    affine map of ε, so the same combination of velocities is the same target: ESD runs unchanged."""
    from diffusers import StableDiffusion3Pipeline

    from duo.train.api import resolve_config, train

    out = train(resolve_config(model=sd3_model, data=sd3_pairs, out=str(tmp_path / "esd"), method="esd-x", steps=2,
                               lr=1e-2, batch_size=2))  # fmt: skip
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_model, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(out))
    loaded = {n.rpartition(".")[2] for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_B") and m.lora_B}
    assert loaded == {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
