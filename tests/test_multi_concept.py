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
    assert pairs.groups == (2, 4) and len(pairs) == 6 and pairs.concept.name == "shapes-red+shapes-circle"
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
    with pytest.raises(UserError, match="--concept is required"):
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
