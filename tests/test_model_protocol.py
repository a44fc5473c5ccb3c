"""`ModelFamily`: the SD adapter satisfies it, attacks use nothing else, and its token API keeps its promises."""

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import duo.attacks
from duo.models.family import load_family
from duo.models.protocol import ModelFamily
from duo.models.sd import StableDiffusionFamily

ATTACKS = Path(duo.attacks.__file__).parent
TOKEN_API = {
    "max_prompt_tokens",
    "token_embeddings",
    "vocabulary",
    "tokenize",
    "text_token_ids",
    "token_count",
    "decode_ids",
    "encode_ids",
    "prompt_ids",
    "add_placeholder_tokens",
    "whole_word_ids",
    "regular_token_ids",
    "save_textual_inversion",
    "load_textual_inversion",
}


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_family(tiny_model)


@pytest.fixture
def fresh(tiny_model):
    """A family of its own for tests that add tokens."""
    return load_family(tiny_model)


def protocol_members() -> set[str]:
    return {n for n in vars(ModelFamily) if not n.startswith("_")} | set(ModelFamily.__annotations__)


# ---- the protocol and its one implementation ------------------------------------------------------------


def test_sd_family_is_a_model_family_and_a_partial_one_is_not(tiny):
    assert isinstance(tiny, ModelFamily)
    assert TOKEN_API <= protocol_members()
    partial = SimpleNamespace(**{n: None for n in protocol_members() - {"whole_word_ids"}})
    assert not isinstance(partial, ModelFamily)
    assert "pipe" not in protocol_members()  # the pipeline is the adapter's own business


def test_sd_methods_accept_every_parameter_the_protocol_names():
    for name in protocol_members():
        wanted = getattr(ModelFamily, name, None)
        if not inspect.isfunction(wanted):
            continue
        expected = inspect.signature(wanted).parameters
        actual = inspect.signature(getattr(StableDiffusionFamily, name)).parameters
        assert list(actual) == list(expected), name
        for p in expected.values():
            assert (actual[p.name].default is inspect.Parameter.empty) == (p.default is inspect.Parameter.empty), (
                name,
                p.name,
            )


def pipe_accesses(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename)
    return [f"{filename}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "pipe"]


def bpe_literals(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename)
    return [
        f"{filename}:{n.lineno}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and "</w>" in n.value
    ]


def test_the_checks_below_catch_what_they_look_for():
    assert pipe_accesses("tok = family.pipe.tokenizer\n", "x.py") == ["x.py:1"]
    assert pipe_accesses("pipe = 1\nfamily.pipeline\n", "x.py") == []
    assert bpe_literals("word = token[: -len('</w>')]\n", "x.py") == ["x.py:1"]


def test_attacks_reach_the_model_only_through_the_protocol():
    files = sorted(ATTACKS.glob("*.py"))
    assert {"tokens.py", "ring_a_bell.py", "concept_inversion.py", "unlearndiff.py"} <= {f.name for f in files}
    found = [hit for f in files for hit in pipe_accesses(f.read_text(), f.name)]
    assert not found, f".pipe used in attacks: {found}"
    literals = [hit for f in files for hit in bpe_literals(f.read_text(), f.name)]
    assert not literals, f"tokenizer conventions in attacks: {literals}"


# ---- the token API on the tiny CLIP tokenizer -------------------------------------------------------------


def test_tokenize_pads_to_the_prompt_length_and_token_count_counts_bos_and_eos(tiny):
    assert tiny.token_count("") == 2
    words = tiny.text_token_ids("a cat")
    assert len(words) == 2 and tiny.token_count("a cat") == 4
    ids = tiny.tokenize(["a cat", "a " * 100])
    assert ids.shape == (2, tiny.max_prompt_tokens)
    assert ids[0, 1:3].tolist() == words
    assert tiny.token_count("a " * 100) == 102 > tiny.max_prompt_tokens  # counted before truncation
    assert tiny.decode_ids(ids[0].tolist()) == "a cat"


def test_prompt_ids_is_the_layout_tokenize_gives(tiny):
    words = tiny.text_token_ids("a red cat on the street")
    laid_out = tiny.prompt_ids(torch.tensor([words]))
    assert torch.equal(laid_out, tiny.tokenize(["a red cat on the street"]).cpu())


@pytest.mark.parametrize("which", ["tiny", "shapes"])
def test_whole_word_ids_round_trip_through_text(which, tiny):
    family = tiny if which == "tiny" else load_family("shapes")
    ids = family.whole_word_ids()
    assert len(ids) > 20 and torch.equal(ids, ids.sort().values)
    g = torch.Generator().manual_seed(0)
    tokens = ids[torch.randint(len(ids), (8, 6), generator=g)]
    texts = [family.decode_ids(row.tolist()) for row in tokens]
    assert torch.equal(family.tokenize(texts).cpu(), family.prompt_ids(tokens))
    # word pieces, punctuation and specials are left out (CLIP marks a word's last piece with </w>)
    word_ends = {i for t, i in family.vocabulary().items() if t.endswith("</w>")}
    assert set(ids.tolist()) < word_ends
    assert all(family.decode_ids([i]).isalpha() for i in ids.tolist())
    assert not {family.vocabulary()[t] for t in ("<|startoftext|>", "<|endoftext|>")} & set(ids.tolist())


def test_whole_word_ids_exclude_words_in_any_case_and_short_words(tiny):
    naked = tiny.vocabulary()["naked</w>"]
    everything = tiny.whole_word_ids()
    assert naked in everything.tolist()
    assert naked not in tiny.whole_word_ids({"NAKED"}).tolist()
    assert len(tiny.whole_word_ids({"naked"})) == len(everything) - 1
    letters = [i for i in everything.tolist() if len(tiny.decode_ids([i])) == 1]
    assert letters and not set(letters) & set(tiny.whole_word_ids(min_length=2).tolist())


def test_regular_token_ids_are_every_id_but_the_special_and_added_ones(fresh):
    regular = set(fresh.regular_token_ids().tolist())
    vocab = fresh.vocabulary()
    added = fresh.add_placeholder_tokens(["<probe-a>"])
    after = set(fresh.regular_token_ids().tolist())
    special = {i for t, i in vocab.items() if t.startswith("<|")}
    assert special and not special & regular
    assert len(regular) == len(vocab) - len(special)
    assert set(fresh.whole_word_ids().tolist()) < regular  # sub-word pieces are in, whole words too
    assert after == regular and added[0] not in after


def test_placeholder_tokens_get_new_ids_grow_the_table_and_leave_seeds_alone(fresh):
    size = len(fresh.vocabulary())
    torch.manual_seed(7)
    state = torch.get_rng_state()
    ids = fresh.add_placeholder_tokens(["<p0>", "<p1>"])
    assert torch.equal(torch.get_rng_state(), state)
    assert sorted(ids) == [size, size + 1]
    assert fresh.token_embeddings[0].num_embeddings >= size + 2
    assert fresh.add_placeholder_tokens(["<p1>", "<p0>"]) == ids[::-1]  # added once
    assert len(fresh.vocabulary()) == size + 2
    assert ids[0] in fresh.tokenize(["a <p0> cat"])[0].tolist()
    assert fresh.whole_word_ids().tolist() == load_family(fresh.ref).whole_word_ids().tolist()


def test_encode_ids_is_differentiable_through_the_embedding_table(tiny):
    table = tiny.token_embeddings[0]
    shift = torch.nn.Parameter(torch.zeros(table.embedding_dim))
    handle = table.register_forward_hook(lambda module, args, out: out + shift)
    try:
        tiny.encode_ids(tiny.tokenize(["a cat"])).sum().backward()
    finally:
        handle.remove()
    assert shift.grad is not None and shift.grad.abs().sum() > 0


def test_textual_inversion_loads_then_overwrites_without_touching_the_rng(fresh, tmp_path):
    dim = fresh.token_embeddings[0].embedding_dim
    first, second = torch.randn(2, dim), torch.randn(2, dim)
    path = tmp_path / "ti.safetensors"
    fresh.save_textual_inversion(path, "<c>", first)
    state = torch.get_rng_state()
    fresh.load_textual_inversion(path, "<c>")
    assert torch.equal(torch.get_rng_state(), state)
    vocab = fresh.vocabulary()
    weight = fresh.token_embeddings[0].weight
    assert torch.equal(weight[[vocab["<c>"], vocab["<c>_1"]]], first)

    fresh.save_textual_inversion(path, "<c>", second)
    fresh.load_textual_inversion(path, "<c>")  # no "token already in the tokenizer"
    assert torch.equal(fresh.token_embeddings[0].weight[[vocab["<c>"], vocab["<c>_1"]]], second)
    fresh.load_textual_inversion(path, "<c>", first)  # vectors in memory win over a re-read
    assert torch.equal(fresh.token_embeddings[0].weight[vocab["<c>"]], first[0])
    assert len(fresh.vocabulary()) == len(vocab)
