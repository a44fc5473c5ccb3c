import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402

TEST_CONCEPT = """
name: tiny-test
judge: none
strength: 0.75
guidance: 5.0
steps: 4
neighbours: ["a dressed man, realistic photo"]
parts:
  - name: naked
    pairs: 4
    unsafe: "a naked {race} woman, realistic photo"
    safe: "a dressed {race} woman, realistic photo"
    vars: {race: [white, black]}
"""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from duo.models.tiny import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe"))


@pytest.fixture(scope="session")
def concept_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("concept") / "tiny.yaml"
    path.write_text(TEST_CONCEPT)
    return str(path)


@pytest.fixture(scope="session")
def pairs_dir(tiny_model, concept_file, tmp_path_factory):
    from duo.data.curate import CurateConfig, curate

    out = tmp_path_factory.mktemp("pairs") / "pairs"
    curate(CurateConfig(model=tiny_model, concept=concept_file, out=str(out)))
    return str(out)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A command run in-process with --threads sets torch's thread count for the whole process; under
    `pytest -n 2` (make test) a later test left with two threads per worker oversubscribes two cores and runs
    several times slower. Every test starts with the worker's count (OMP_NUM_THREADS)."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
