"""One LoRA for several concepts (`duo train --data A B`): balanced draws, a joint retain set that erases none of
them, lineage naming every pairs folder, and stages told which concept they measure."""

from collections import Counter

import pytest
import torch

from duo.attacks import AttackConfig, run_attack
from duo.cli.main import main
from duo.data.concepts import load_concept, merge_concepts
from duo.data.curate import CurateConfig, curate
from duo.data.lineage import lora_lineage, seen_prompts
from duo.data.pairs import load_pair_sets
from duo.errors import UserError
from duo.runs import read_run
from duo.train.api import resolve_config, train
from duo.train.draws import pair_indices


def test_one_block_draws_exactly_as_before():
    from duo.train.draws import epoch_order

    n, seed = 7, 3
    expected = [int(epoch_order(n, seed, pos // n)[pos % n]) for pos in range(8, 12)]
    assert pair_indices(n, seed, 2, 4).tolist() == expected
    assert pair_indices((n,), seed, 2, 4).tolist() == expected


def test_blocks_are_drawn_equally_often_whatever_their_sizes():
    groups = (3, 12)  # a concept with 3 pairs beside one with 12
    drawn = torch.cat([pair_indices(groups, 0, step, 4) for step in range(30)]).tolist()
    per_block = Counter(i >= 3 for i in drawn)
    assert per_block[False] == per_block[True] == 60
    assert set(drawn) == set(range(15))  # every pair of both blocks is seen
    first = Counter(i for i in drawn if i < 3)
    assert set(first.values()) == {20}  # within a block: whole permutations, so each pair equally often


def test_merged_concept_keeps_only_neighbours_showing_no_concept():
    red, circle = load_concept("shapes-red"), load_concept("shapes-circle")
    joint = merge_concepts([red, circle])
    assert joint.name == "shapes-red+shapes-circle"
    assert {"red", "scarlet", "circle"} <= set(joint.unsafe_words)
    assert "a purple circle on a black background" in red.neighbours  # retained by red's own LoRA ...
    assert not any("circle" in n or "red" in n.split() for n in joint.neighbours)  # ... but not by the joint one
    assert "a yellow star on a gray background" in joint.neighbours


def test_pairs_whose_safe_side_shows_another_concept_are_dropped(tmp_path):
    from PIL import Image

    from duo.data.pairs import PairSet, _safe_for_others

    def record(safe: str) -> dict:
        return {"id": safe, "safe": {"prompt": safe}, "unsafe": {"prompt": "x"}}

    safe = ["a red square on a gray background", "a blue square on a black background", "a Crimson star"]
    images = [Image.new("RGB", (2, 2), (i, 0, 0)) for i in range(3)]
    circles = PairSet(tmp_path, [record(p) for p in safe], load_concept("shapes-circle"), images, images, "h")
    kept = _safe_for_others(circles, [load_concept("shapes-red")])
    assert [r["id"] for r in kept.records] == [safe[1]] and kept.unsafe_images == [images[1]]
    assert kept.data_hash != circles.data_hash
    with pytest.raises(UserError, match="shows shapes-red on its safe side"):
        _safe_for_others(PairSet(tmp_path, [record(safe[0])], circles.concept, images[:1], images[:1], "h"),
                         [load_concept("shapes-red")])  # fmt: skip


@pytest.fixture(scope="module")
def two_concepts(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    for concept, n in (("shapes-red", 2), ("shapes-circle", 4)):
        curate(CurateConfig(model="shapes", concept=concept, out=str(root / concept), pairs=n, batch_size=4))
    lora = root / "lora"
    data = [str(root / "shapes-red"), str(root / "shapes-circle")]
    threads = torch.get_num_threads()
    train(resolve_config(model="shapes", data=data, out=str(lora), steps=2, threads=threads))
    return root, data, lora


def test_joint_pairs_and_lineage(two_concepts):
    root, data, lora = two_concepts
    pairs = load_pair_sets(data)
    assert pairs.concept.name == "shapes-red+shapes-circle" and sum(pairs.groups) == len(pairs)
    # a pair whose safe side shows the other concept would teach it back: dropped (circle's edit keeps the colour)
    red, circle = (load_pair_sets(f) for f in data)
    keep = [r for r in red.records if "circle" not in r["safe"]["prompt"]]
    keep += [r for r in circle.records if "red" not in r["safe"]["prompt"].split()]
    assert pairs.records == keep
    run = read_run(lora)
    assert run["config"]["data"] == data
    folders = [str(root / c) for c in ("shapes-red", "shapes-circle")]
    assert [run["parents"][k]["path"] for k in ("data", "data1")] == folders
    lineage = lora_lineage(lora)
    assert [c.name for c in lineage.concepts] == ["shapes-red", "shapes-circle"]
    prompts = seen_prompts([str(lora)])
    assert set(pairs.unsafe_prompts) <= prompts  # both folders' prompts: held-out checks see every concept's
    card = (lora / "README.md").read_text()
    assert "shapes-red+shapes-circle" in card and str(root / "shapes-circle") in card


def test_stages_need_one_of_the_loras_concepts(two_concepts, tmp_path, capsys):
    _, _, lora = two_concepts
    small = dict(n_prompts=2, images_per_prompt=1, threads=torch.get_num_threads(), lora=[str(lora)])
    with pytest.raises(UserError, match="learned several concepts"):
        run_attack("prompts", AttackConfig(out=str(tmp_path / "a"), **small))
    results = run_attack("prompts", AttackConfig(out=str(tmp_path / "b"), concept="shapes-circle", **small))
    assert results["concept"]["name"] == "shapes-circle"
    argv = ["attack", "prompts", "--lora", str(lora), "--concept", "nudity", "--out", str(tmp_path / "c")]
    assert main(argv) == 2 and "none of the concepts" in capsys.readouterr().err


def test_one_folder_is_stored_as_before_and_disagreeing_recipes_are_refused(two_concepts, tmp_path):
    root, data, _ = two_concepts
    assert resolve_config(model="shapes", data=[data[0]], out=str(tmp_path / "x")).data == data[0]
    custom = tmp_path / "custom.yaml"
    text = load_concept("shapes-circle").source
    custom.write_text(open(text).read().replace("beta: 50", "beta: 25").replace("name: shapes-circle", "name: c2"))
    curate(CurateConfig(model="shapes", concept=str(custom), out=str(tmp_path / "c2"), pairs=2, batch_size=2))
    with pytest.raises(UserError, match="--beta"):
        resolve_config(model="shapes", data=[data[0], str(tmp_path / "c2")], out=str(tmp_path / "y"))
    cfg = resolve_config(model="shapes", data=[data[0], str(tmp_path / "c2")], out=str(tmp_path / "y"), beta=40.0)
    assert cfg.beta == 40.0
