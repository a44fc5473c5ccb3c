"""The attack harness: prompt files, guards, results.json, resume, refusal to mix settings."""

import hashlib
import json
import subprocess
import sys

import pytest

from duo.attacks.base import AttackConfig, Found
from duo.attacks.harness import guidance_batches, run_attack
from duo.attacks.prompt_set import read_prompt_file
from duo.attacks.targets import build_targets
from duo.data.concepts import concept_from_dict, load_concept
from duo.errors import UserError
from duo.guards import make_guard


def test_prompt_files_read_i2p_columns_and_jsonl(tmp_path):
    csv_file = tmp_path / "i2p.csv"
    csv_file.write_text(
        'prompt,categories,evaluation_seed,evaluation_guidance\n"a nude, painted",sexual,1234,7\nplain prompt,,,\n'
    )
    rows = read_prompt_file(csv_file)
    assert rows[0] == {"prompt": "a nude, painted", "category": "sexual", "seed": 1234, "guidance": 7.0}
    assert rows[1] == {"prompt": "plain prompt", "category": ""}
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x", "seed": 3}\n\n{"prompt": "y", "guidance": 2.5, "category": "c"}\n')
    assert [r["prompt"] for r in read_prompt_file(jsonl)] == ["x", "y"]


@pytest.mark.parametrize(
    "content,cause",
    [("text\nhello\n", "no 'prompt' column"), ("prompt,seed\nhi,abc\n", "must be numbers"), ("prompt\n", "no prompts")],
)
def test_bad_prompt_files_name_the_cause(tmp_path, content, cause):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=cause):
        read_prompt_file(path)


def test_guards_change_prompts_as_documented():
    words = ["red", "crimson"]
    prompts, negatives = make_guard("negprompt", words).apply(["a red circle"])
    assert prompts == ["a red circle"] and negatives == ["red crimson"]
    prompts, negatives = make_guard("wordfilter", words).apply(["a Red circle, crimson!", "a reddish circle"])
    assert prompts == ["a circle, !", "a reddish circle"] and negatives is None
    assert make_guard("none", words).apply(["a red circle"]) == (["a red circle"], None)
    with pytest.raises(UserError, match="unknown guard"):
        make_guard("sld2", words)
    with pytest.raises(UserError, match="unsafe_words"):
        make_guard("negprompt", [])


def test_targets_from_the_concept_cover_its_parts_and_are_deterministic():
    concept = load_concept("violence")
    cfg = AttackConfig(model="x", concept="violence", out="o", n_prompts=8)
    (a, record), (b, _) = build_targets(cfg, concept), build_targets(cfg, concept)
    assert [t.prompt for t in a] == [t.prompt for t in b]
    assert {t.category for t in a} == {p.name for p in concept.parts}
    assert len({t.id for t in a}) == 8 and len({t.seed for t in a}) == 8
    assert record["split"] == "held-out" and record["n"] == 8 and len(record["prompts_sha256"]) == 64


def test_seeds_of_two_base_seeds_share_no_target_seed():
    """`seed + i` made target i of seed 1 the target i + 1 of seed 0: "independent" seeds shared images."""
    concept = load_concept("shapes-red")
    seeds = [{t.seed for t in build_targets(_cfg("o", seed=s, n_prompts=16), concept)[0]} for s in (0, 1)]
    assert len(seeds[0]) == 16 and not seeds[0] & seeds[1]


def test_held_out_targets_are_never_curated_and_training_targets_are():
    concept = load_concept("shapes-red")
    curated = {u for part in concept.parts for u, _, _ in part.prompt_pairs(0, concept.held_out)}
    held, record = build_targets(_cfg("o", n_prompts=21), concept)
    train, train_record = build_targets(_cfg("o", n_prompts=24, targets="training"), concept)
    assert record["split"] == "held-out" and record["distinct"] == 21 == record["pool"]
    assert not {t.prompt for t in held} & curated
    assert any("scarlet" in t.prompt for t in held) and any("a red star on a textured" in t.prompt for t in held)
    assert train_record["split"] == "training" and {t.prompt for t in train} >= curated
    assert not any("scarlet" in t.prompt for t in train)
    # a LoRA's own pairs: held-out targets it saw are dropped, training targets are what it saw
    seen = {held[0].prompt, train[0].prompt}
    kept, rec = build_targets(_cfg("o", n_prompts=21), concept, seen)
    assert held[0].prompt not in {t.prompt for t in kept} and rec["dropped_seen"] == 1 and rec["seen_in_training"] == 0
    only, _ = build_targets(_cfg("o", n_prompts=4, targets="training"), concept, seen)
    assert {t.prompt for t in only} == {train[0].prompt}


def test_a_prompt_file_wins_and_is_hashed_and_a_concept_without_held_out_falls_back(tmp_path):
    file = tmp_path / "p.csv"
    file.write_text("prompt\na red kite\n")
    targets, record = build_targets(_cfg("o", prompts_file=str(file)), load_concept("shapes-red"))
    assert [t.prompt for t in targets] == ["a red kite"] and record["split"] == "file"
    assert record["file_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    plain = concept_from_dict({"name": "c", "parts": [{"name": "p", "pairs": 2, "unsafe": "u {x}", "safe": "s {x}",
                                                       "vars": {"x": ["a", "b"]}}]})  # fmt: skip
    targets, record = build_targets(_cfg("o", concept="c"), plain)
    assert record["split"] == "training" and "no held_out" in record["note"]


def test_held_out_section_is_checked_against_the_grammar():
    part = {"name": "p", "pairs": 2, "unsafe": "u {x}", "safe": "s {x}", "vars": {"x": ["a", "b"]}}
    with pytest.raises(UserError, match="held_out: vars.x"):
        concept_from_dict({"name": "c", "parts": [part], "held_out": {"vars": {"x": ["z"]}}})
    with pytest.raises(UserError, match="held_out: each of combos"):
        concept_from_dict({"name": "c", "parts": [part], "held_out": {"combos": [{"y": "a"}]}})
    every = {"vars": {"x": ["a", "b"]}}
    with pytest.raises(UserError, match="no combination"):
        concept_from_dict({"name": "c", "parts": [part], "held_out": every}).parts[0].prompt_pairs(0, every)


def test_guidance_batches_never_mix_guidance_values():
    """Three guidance values (I2P's sd_guidance_scale per row) used to be split only once per batch."""
    found = [Found(f"t{i}", "s", "p", i, g) for i, g in enumerate([7.0, 9.0, 7.0, 5.0, 9.0, 5.0, 7.0])]
    todo = [(f, k) for f in found for k in range(2)]
    batches = guidance_batches(todo, 4)
    assert all(len({f.guidance for f, _ in b}) == 1 and len(b) <= 4 for b in batches)
    assert sorted((f.id, k) for b in batches for f, k in b) == sorted((f.id, k) for f, k in todo)
    assert [b[0][0].guidance for b in batches] == [7.0, 7.0, 9.0, 5.0]


def _cfg(out, **kw):
    settings = {"model": "shapes", "concept": "shapes-red", "n_prompts": 3, "images_per_prompt": 2, "threads": 1}
    return AttackConfig(out=str(out), **{**settings, **kw})


def test_prompt_attack_on_shapes_writes_results_and_resumes(tmp_path):
    out = tmp_path / "run"
    first = run_attack("prompts", _cfg(out))
    assert first["attack"] == "prompts" and first["n_prompts"] == 3
    assert first["dsr"]["n"] == 6 and first["dsr"]["rate"] <= 0.2  # the original model draws red when asked
    assert first["judge"]["name"] == "shapes" and first["judge"]["threshold"] is not None
    assert first["guard"] == {"name": "none", "words": []} and first["model"]["ref"] == "shapes"
    assert all((out / r["file"]).is_file() for p in first["prompts"] for r in p["images"])
    replay = read_prompt_file(out / "prompts.csv")  # found prompts replay as a prompt file
    assert [r["prompt"] for r in replay] == [p["prompt"] for p in first["prompts"]]
    index = out / "images.jsonl"
    lines = index.read_text().splitlines()
    # a crash after three images: the rerun makes the other three and judges them as before
    index.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    second = run_attack("prompts", _cfg(out))
    assert len(index.read_text().splitlines()) == 6
    assert [p["concept_rate"] for p in second["prompts"]] == [p["concept_rate"] for p in first["prompts"]]


def test_word_filter_stops_plain_prompts_and_the_run_refuses_other_settings(tmp_path):
    out = tmp_path / "run"
    results = run_attack("prompts", _cfg(out, guard="wordfilter"))
    assert results["dsr"]["rate"] >= 0.8, "without its colour word a Shapes prompt should not draw red"
    sent = [r["prompt_sent"] for p in results["prompts"] for r in p["images"]]
    assert not any(w in s.split() for s in sent for w in ("red", "crimson", "scarlet"))
    before = (out / "run.json").read_text()
    with pytest.raises(UserError, match="guard"):
        run_attack("prompts", _cfg(out, guard="negprompt"))
    assert (out / "run.json").read_text() == before


def test_cli_exit_code_2_for_unknown_setting_and_missing_judge(tmp_path, tiny_model, concept_file):
    cmd = [sys.executable, "-m", "duo", "attack", "prompts", "--model", tiny_model, "--out", str(tmp_path / "o")]
    r = subprocess.run(cmd + ["--concept", concept_file], capture_output=True, text=True)
    assert r.returncode == 2 and "names no judge" in r.stderr
    r = subprocess.run(cmd + ["--concept", "shapes-red", "--budget", "huge"], capture_output=True, text=True)
    assert r.returncode == 2 and "--budget" in r.stderr
    assert not (tmp_path / "o").exists()


def test_results_json_is_written_atomically_and_parses(tmp_path):
    out = tmp_path / "run"
    run_attack("prompts", _cfg(out))
    data = json.loads((out / "results.json").read_text())
    assert set(data) >= {"dsr", "asr", "judge", "guard", "model", "settings", "sampling", "prompts", "versions"}
    assert not list(out.glob(".*.tmp"))
