"""The shape of the code: layers, no import cycles, short files and functions, every module importable, --help light."""

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

# Bottom to top; a module may import its own layer and those below, never one above. A module belongs to the
# layer of the longest prefix that names it (the Shapes package spans layers: its assets sit low, its judge,
# features and world registration with the judges and metrics, its demo half with the evaluation).
LAYERS = [
    ["duo.errors", "duo.seeds", "duo.objectives", "duo.worlds", "duo.models.lora_spec"],
    ["duo.data.files", "duo.runs", "duo.shard"],
    ["duo.models", "duo.guards"],
    ["duo.shapes"],
    ["duo.judges", "duo.metrics", "duo.shapes.concept_judge", "duo.shapes.features", "duo.shapes.evaluation"],
    ["duo.shapes.world"],
    ["duo.data", "duo.sample"],
    ["duo.train", "duo.export"],
    ["duo.attacks"],
    ["duo.evaluate", "duo.evaluate_images", "duo.report", "duo.shapes.demo"],
    ["duo.compare", "duo.sweep", "duo.benchmark", "duo.benchmark_spec", "duo.tune", "duo.demo"],
    ["duo.cli", "duo.__main__"],
]
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "duo").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _owner(name: str, known: dict) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_only(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skipped |= {id(n) for n in ast.walk(node)}
    return skipped


def imports_of(path: Path, known: dict) -> set[str]:
    """Every module of ours this file imports, at the top or inside a function (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skipped, found = _type_checking_only(tree), set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("duo"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else _owner(node.module, known))
        elif isinstance(node, ast.Import):
            found |= {_owner(a.name, known) for a in node.names if a.name.startswith("duo")}
    return {m for m in found if m}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def layer_of(name: str) -> int:
    best = (-1, -1)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                best = max(best, (len(prefix), index))
    assert best[1] >= 0, f"{name} belongs to no layer: add it to LAYERS"
    return best[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_walkers_catch_what_they_look_for():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("duo.shapes.render") < layer_of("duo.shapes.world") < layer_of("duo.shapes.demo")
    assert layer_of("duo.data.files") < layer_of("duo.models.sd") < layer_of("duo.data.curate")


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_lower_layer_imports_a_higher_one():
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in graph().items()
        for b in targets
        if layer_of(b) > layer_of(a)
    ]
    assert upward == []


def test_objectives_import_nothing_of_ours():
    ours = [t for m, ts in graph().items() if m.startswith("duo.objectives") for t in ts]
    assert all(t.startswith("duo.objectives") for t in ours)


def test_files_and_functions_are_short():
    long_files, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(SRC)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert long_files == [] and long_functions == []


def test_every_module_imports():
    import duo

    names = [m.name for m in pkgutil.walk_packages(duo.__path__, "duo.")]
    assert len(names) == len(modules()) - 1  # walk_packages leaves out the top package itself
    for name in names:
        importlib.import_module(name)


@pytest.mark.parametrize("argv", [["--help"], ["attack", "ring-a-bell", "--help"], ["train", "--help"]])
def test_help_does_not_import_torch(argv):
    script = (
        "import sys\nfrom duo.cli.main import COMMANDS, main\n"
        "for args in [[c, '--help'] for c in COMMANDS] + [sys.argv[1:]]:\n"
        "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'peft') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert "usage:" in out.stdout and "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]
