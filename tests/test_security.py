"""Security (issue 15): no remote code and no pickles unless `--allow-pickle`; report text can never become markup;
secrets in the environment are never written to disk or logs.

1. A static scan (ast) of every module under src/duo: the loading rules the code follows, with the few known
   exceptions named (and a self-check that the scanner flags bad snippets).
2. `duo report` on arbitrary text (hypothesis): the page has exactly the template's elements; then one page of the
   nastiest strings rendered in headless Chromium holds no element the template does not.
3. A small Shapes pipeline (curate, train, attack with the VLM judge, evaluate, report) run with fake secrets in
   the environment: no output file, run.json, log record, stdout or stderr holds them.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import tempfile
import uuid
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_judges import fake_vlm  # noqa: F401, F811 (a fixture)
from test_report import browser, fake_run, needs_browser

from duo.cli.main import main
from duo.report import build_report

SRC = Path(__file__).parents[1] / "src" / "duo"

# ---- 1. static scan: trust_remote_code, pickles, use_safetensors ---------------------------------------------

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
WEIGHTLESS = re.compile(r"Tokenizer|Processor|Scheduler|FeatureExtractor|Config\b")  # from_pretrained of no weights
GATE = "allow_pickle"

# (file under src/duo, enclosing function, rule) -> why it is allowed. A new call outside this list fails the test;
# an entry that no longer matches anything fails too (delete it once the code is fixed).
KNOWN: dict[tuple[str, str, str], str] = {}  # (file, function, rule) → why it is allowed; none today


def _mentions_gate(node: ast.AST) -> bool:
    return any(
        (isinstance(n, ast.Name) and GATE in n.id) or (isinstance(n, ast.Attribute) and GATE in n.attr)
        for n in ast.walk(node)
    )


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _safetensors_value_ok(node: ast.AST) -> bool:
    """use_safetensors=True, or `None if allow_pickle else True` (True whenever the gate is off)."""
    if _is_true(node):
        return True
    return isinstance(node, ast.IfExp) and _mentions_gate(node.test) and _is_true(node.orelse)


class _Scanner(ast.NodeVisitor):
    def __init__(self, name: str) -> None:
        self.name, self.findings, self.gated_loads = name, [], 0
        self.funcs: list[str] = []
        self.gates = 0  # depth of enclosing `if <allow_pickle ...>:` bodies
        self.torch_names: set[str] = set()  # local names of torch and of torch.load
        self.pickle_names: set[str] = set()
        self.calls_by_func: dict[str, list[tuple[int, str]]] = {}

    def add(self, node: ast.AST, rule: str) -> None:
        self.findings.append((self.name, ".".join(self.funcs) or "<module>", rule, node.lineno))

    # scopes and gates
    def visit_FunctionDef(self, node) -> None:  # noqa: N802 - ast's naming
        self.funcs.append(node.name)
        self.generic_visit(node)
        self.funcs.pop()

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_ClassDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:  # noqa: N802
        self.visit(node.test)
        gated = _mentions_gate(node.test)
        self.gates += gated
        for child in node.body:
            self.visit(child)
        self.gates -= gated
        for child in node.orelse:
            self.visit(child)

    # imports
    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802
        for alias in node.names:
            root = alias.name.split(".")[0]
            if root in PICKLE_MODULES:
                self.add(node, f"imports {alias.name}")
                self.pickle_names.add(alias.asname or root)
            if alias.name == "torch":
                self.torch_names.add(alias.asname or "torch")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        root = (node.module or "").split(".")[0]
        if root in PICKLE_MODULES:
            self.add(node, f"imports from {node.module}")
        if node.module == "torch":
            self.torch_names.update(f"load:{a.asname or a.name}" for a in node.names if a.name == "load")

    # calls
    def visit_Call(self, node: ast.Call) -> None:  # noqa: N802
        func, kw = node.func, {k.arg: k.value for k in node.keywords}
        attr = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
        scope = ".".join(self.funcs)
        self.calls_by_func.setdefault(scope, []).append((node.lineno, attr))
        if owner in self.pickle_names or (attr in ("load", "loads", "Unpickler") and owner in PICKLE_MODULES):
            self.add(node, f"{owner}.{attr}")
        is_torch_load = (attr == "load" and owner in self.torch_names | {"torch"}) or (
            isinstance(func, ast.Name) and f"load:{func.id}" in self.torch_names
        )
        if is_torch_load and not _is_true(kw.get("weights_only")) and not self.gates:
            self.add(node, "torch.load without weights_only=True")
        if attr == "load" and owner in ("np", "numpy") and _is_true(kw.get("allow_pickle")) and not self.gates:
            self.add(node, "numpy.load(allow_pickle=True)")
        if attr in ("from_pretrained", "from_single_file"):
            value = kw.get("use_safetensors")
            if isinstance(value, ast.Constant) and value.value is False:
                self.add(node, "use_safetensors=False")
            elif value is not None and not _safetensors_value_ok(value):
                self.add(node, "use_safetensors not True unless allow_pickle")
            elif value is None and any(k.arg is None for k in node.keywords):
                self.add(node, f"{attr}(**kwargs) without an explicit use_safetensors")
            elif value is None and not WEIGHTLESS.search(owner):
                self.add(node, f"{attr} without use_safetensors")
            elif value is not None:
                self.gated_loads += 1
        if attr == "save_pretrained" and isinstance(kw.get("safe_serialization"), ast.Constant):
            if kw["safe_serialization"].value is False:
                self.add(node, "save_pretrained(safe_serialization=False)")
        self.generic_visit(node)

    def finish(self) -> None:
        # LoRAs: diffusers' load_lora_weights falls back to pickles, so every call sits after _require_safetensors
        for scope, calls in self.calls_by_func.items():
            guard = [line for line, name in calls if name == "_require_safetensors"]
            for line, name in calls:
                if name == "load_lora_weights" and not any(g <= line for g in guard):
                    self.findings.append((self.name, scope, "load_lora_weights without _require_safetensors", line))


def scan_source(source: str, name: str = "<snippet>") -> tuple[list[tuple], int]:
    """Findings (file, function, rule, line) of one module, and how many loads pass use_safetensors correctly."""
    scanner = _Scanner(name)
    if "trust_remote_code" in source:  # text, not ast: a comment, string or **{...} counts too
        line = source[: source.index("trust_remote_code")].count("\n") + 1
        scanner.findings.append((name, "<text>", "trust_remote_code", line))
    scanner.visit(ast.parse(source))
    scanner.finish()
    return scanner.findings, scanner.gated_loads


def scan_package() -> tuple[list[tuple], int]:
    findings, gated = [], 0
    for path in sorted(SRC.rglob("*.py")):
        found, n = scan_source(path.read_text(), str(path.relative_to(SRC)))
        findings += found
        gated += n
    return findings, gated


BAD_SNIPPETS = {
    "from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)\n": "trust_remote_code",
    "import torch\ndef f(p):\n    return torch.load(p)\n": "torch.load without weights_only=True",
    "import torch as th\nth.load('p', weights_only=False)\n": "torch.load without weights_only=True",
    "from torch import load\nload('p')\n": "torch.load without weights_only=True",
    "import pickle\npickle.loads(b'')\n": "pickle.loads",
    "from pickle import load\n": "imports from pickle",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)\n": "numpy.load(allow_pickle=True)",
    "import diffusers\ndiffusers.UNet2DModel.from_pretrained('x', use_safetensors=False)\n": "use_safetensors=False",
    "def load(p, allow_pickle):\n    P.from_pretrained(p, use_safetensors=None if allow_pickle else False)\n": (
        "use_safetensors not True unless allow_pickle"
    ),
    "from diffusers import StableDiffusionPipeline as P\nP.from_pretrained('x')\n": "from_pretrained without",
    "CLIPTokenizer.from_single_file('x.ckpt', **options)\n": "without an explicit use_safetensors",
    "def f(pipe, d):\n    pipe.load_lora_weights(d)\n": "load_lora_weights without _require_safetensors",
    "pipe.save_pretrained('d', safe_serialization=False)\n": "safe_serialization=False",
}
GOOD_SNIPPET = """
import torch
def load(path, allow_pickle=False, cfg=None):
    P.from_pretrained(path, use_safetensors=None if allow_pickle else True)
    CLIPTokenizer.from_pretrained(path)
    torch.load(path, weights_only=True)
    if cfg.allow_pickle:
        torch.load(path)
def loras(pipe, folder):
    _require_safetensors(folder)
    pipe.load_lora_weights(folder)
"""


@pytest.mark.parametrize("snippet, rule", BAD_SNIPPETS.items())
def test_the_scanner_flags_bad_code(snippet, rule):
    findings, _ = scan_source(snippet)
    assert any(rule in f[2] for f in findings), (rule, findings)


def test_the_scanner_passes_gated_and_safe_code():
    assert scan_source(GOOD_SNIPPET) == ([], 1)


def test_no_remote_code_and_only_safetensors_unless_allow_pickle():
    """The rule the code follows: every weight load passes use_safetensors=True, or `None if allow_pickle else
    True` (the family adapters, behind load_family); torch.load only with weights_only=True or under an
    allow_pickle gate; no pickle module; LoRAs only after _require_safetensors; trust_remote_code nowhere."""
    findings, gated = scan_package()
    unknown = [f for f in findings if (f[0], f[1], f[2]) not in KNOWN]
    assert unknown == [], "\n".join(f"src/duo/{f}:{n} in {fn}: {rule}" for f, fn, rule, n in unknown)
    stale = set(KNOWN) - {(f[0], f[1], f[2]) for f in findings}
    assert not stale, f"KNOWN exceptions that no longer occur (delete them): {sorted(stale)}"
    assert gated >= 2, "the family adapters' from_pretrained(use_safetensors=...) calls were not seen"
    assert (SRC / "models" / "pipeline_loras.py").read_text().count("_require_safetensors(") >= 2


# ---- 2. the report: arbitrary text stays text ---------------------------------------------------------------

JS = "document.body.appendChild(document.createElement('pwned'))"  # no spaces: works unquoted in on*= too
NASTY = [
    f"<script>{JS}</script>",
    f"</script><script>{JS}</script>",
    "</script><script>document.body.innerHTML='PWNED'</script>",
    f"<img src=x onerror={JS}>",
    f'"><img src=x onerror="{JS}">',
    f"'><svg onload={JS}>",
    f'<iframe srcdoc="<script>{JS.replace("document", "parent.document")}</script>"></iframe>',
    f'<a href="javascript:{JS}">click</a>',
    f"</title><script>{JS}</script>",
    f"</style><script>{JS}</script>",
    f"</pre><script>{JS}</script>",
    f"</summary></details><script>{JS}</script>",
    f"<math><mtext><table><mglyph><style><img src=x onerror={JS}>",
    f"<body onload={JS}>",
    "<base href='//evil.example/'>",
    "<!--",
    "-->",
    "<![CDATA[",
    "]]>",
    "&lt;script&gt; &#60;script&#62; &amp;",
    "javascript:void(0)",
    "$$ $\\x$ $^$",
    "\u2028\u2029\ufeff\u202e 𝕏 猫 🐈",
]
FRAGMENTS = [*NASTY, "<", ">", "'", '"', "&", "</", "<!", "=", "on", "script", "style", "\\", "$", "\x00", "\n"]


def texts():
    fragments = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(FRAGMENTS)), max_size=6).map("".join)
    return st.one_of(st.text(), fragments)


FIELDS = ("title", "label", "method", "attack", "concept", "prompt", "folder", "parent")
PLAIN = {k: f"plain-{k}" for k in FIELDS}


def _dirname(prefix: str, text: str) -> str:
    """A folder name holding `text` (what a filesystem allows: no '/' or NUL, at most 255 bytes)."""
    name = prefix + text.replace("/", "∕").replace("\x00", "␀")
    while len(name.encode()) > 200:
        name = name[:-1]
    return name


def report_page(root: Path, t: dict) -> str:
    """A `duo evaluate` folder (test_report.fake_run) whose every text field is one of t's, with a lineage parent
    in a folder named by t; the page `duo report` makes of it."""
    run = fake_run(root / _dirname("run-", t["folder"]), "x", 50, 0.9, 0.8)
    data = json.loads((run / "results.json").read_text())
    cell = {**data["attacks"]["prompts"], "note": t["prompt"]}
    grid = [{"prompt": t["prompt"], "original": "images/a.png", "unlearned": "images/b.png"}]
    data.update(label=t["label"], concept=t["concept"], attacks={t["attack"]: cell}, grids={t["attack"]: grid})
    data["method"] = {"name": t["method"], "beta": 50, "concept": t["concept"]}
    (run / "results.json").write_text(json.dumps(data))
    parent = root / _dirname("parent-", t["parent"])
    parent.mkdir()
    rec = {"path": str(parent), "kind": t["method"], "hash": t["prompt"] + "0" * 12}
    (run / "run.json").write_text(json.dumps({"kind": "evaluate", "parents": {t["concept"]: rec}}))
    return build_report([str(run)], str(root / "report.html"), title=t["title"]).read_text()


class _Shape(HTMLParser):
    """Every tag, attribute, comment and declaration of a page, in order (data: image payloads cut off)."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.events: list[tuple] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        keep = tuple((k, (v or "")[:22] if k == "src" else v) for k, v in attrs)  # 'data:image/png;base64,'
        self.events.append(("start", tag, keep))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        self.events.append(("end", tag))

    def handle_comment(self, data):
        self.events.append(("comment",))

    def handle_decl(self, decl):
        self.events.append(("decl", decl))

    def unknown_decl(self, data):
        self.events.append(("unknown_decl",))

    def handle_pi(self, data):
        self.events.append(("pi",))


def dangerous(events: list[tuple]) -> list[tuple]:
    """Elements and attributes that can run code or load something."""
    bad = []
    for event in events:
        if event[0] != "start":
            continue
        tag, attrs = event[1], event[2]
        if tag in ("script", "iframe", "object", "embed", "frame", "base", "link", "form"):
            bad.append(event)
        for k, v in attrs:
            value = re.sub(r"[\s\x00-\x1f]", "", v or "").lower()
            if k.startswith("on") or (
                k in ("href", "src", "action", "formaction", "srcdoc", "xlink:href")
                and (value.startswith(("javascript:", "vbscript:")) or (value and not value.startswith("data:image/")))
            ):
                bad.append(event)
    return bad


_plain: list = []


def plain_page() -> str:
    """The page of PLAIN (built once: each build draws the figure)."""
    if not _plain:
        with tempfile.TemporaryDirectory() as tmp:
            _plain.append(report_page(Path(tmp), PLAIN))
    return _plain[0]


def baseline_shape() -> list[tuple]:
    return _Shape(plain_page()).events


def test_the_shape_check_catches_markup_that_is_not_escaped():
    """The property below can fail: a page with one unescaped string differs from the template."""
    events = baseline_shape()
    assert dangerous(events) == [] and sum(e[:2] == ("start", "img") for e in events) == 3
    page = build_report_unescaped()
    assert _Shape(page).events != events and dangerous(_Shape(page).events)


def build_report_unescaped() -> str:
    return plain_page().replace(PLAIN["label"], NASTY[3], 1)


@pytest.mark.filterwarnings("ignore:Glyph")  # matplotlib: a label's character the font has not
@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({k: texts() for k in FIELDS}))
@example({k: "".join(NASTY) for k in FIELDS})
@example({**PLAIN, "label": "$$", "method": "$\\x$", "attack": "$^$"})  # crashed matplotlib's mathtext once
def test_report_of_arbitrary_text_has_exactly_the_template_elements(t):
    with tempfile.TemporaryDirectory() as tmp:
        events = _Shape(report_page(Path(tmp), t)).events
    assert dangerous(events) == []
    assert events == baseline_shape()


def dom_tags(dom: str) -> Counter:
    """Elements in a --dump-dom serialisation: text is serialised with &lt;, so every '<name' is an element."""
    return Counter(m.lower() for m in re.findall(r"<([A-Za-z][\w:-]*)", dom))


@needs_browser
def test_nastiest_strings_render_in_chromium_as_text(tmp_path):
    report_page(tmp_path, {k: "".join(NASTY) for k in FIELDS})
    unsafe = tmp_path / "unsafe.html"
    unsafe.write_text(build_report_unescaped().replace(PLAIN["prompt"], "".join(NASTY)))
    doms = {}
    for name, path in (("nasty", tmp_path / "report.html"), ("unsafe", unsafe)):
        result = browser("--dump-dom", url=path.as_uri())
        assert result.returncode == 0, result.stderr[-2000:]
        doms[name] = result.stdout
    # the template's elements: those of the plain page, with the <tbody> an HTML parser adds to every table
    template = Counter(e[1] for e in baseline_shape() if e[0] == "start")
    template["tbody"] = template["table"]
    assert template["script"] == 0 and template["iframe"] == 0 and template["img"] == 3
    assert "Summary" in doms["nasty"]  # innerHTML='PWNED' did not replace the page
    assert dom_tags(doms["nasty"]) == template, dom_tags(doms["nasty"]) - template
    # the same check on a page that does not escape fails: the scripts ran (and one replaced the body)
    assert dom_tags(doms["unsafe"]) != template and dom_tags(doms["unsafe"])["pwned"]


# ---- 3. secrets in the environment are never written ---------------------------------------------------------

SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "OPENAI_API_KEY", "WANDB_API_KEY", "DUO_VLM_KEY")
RUN_KEYS = {"kind", "config", "parents", "overrides", "versions", "started", "resumed", "finished", "outputs"}


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    else:
        yield str(value)


def test_secrets_in_the_environment_are_never_written(tmp_path, monkeypatch, capfd, caplog, fake_vlm):  # noqa: F811
    secrets = {var: f"secret-{var.lower()}-{uuid.uuid4().hex}" for var in SECRET_VARS}
    for var, value in secrets.items():
        monkeypatch.setenv(var, value)
    caplog.set_level(logging.DEBUG)
    url, server = fake_vlm
    server.answers = ["no"] * 4
    out = tmp_path / "runs"
    (tmp_path / "attack.csv").write_text("prompt,evaluation_seed\na red circle,3\n")
    (tmp_path / "neutral.txt").write_text("a blue square\na green circle\n")
    judge = json.dumps({"url": url, "model": "m", "concept": "red", "timeout": 10, "retries": 0})
    pairs, lora, attack, evaluation = out / "pairs", out / "lora", out / "attack", out / "eval"
    commands = [
        ["curate", "--model", "shapes", "--concept", "shapes-red", "--pairs", 4, "--steps", 4, "--out", pairs],
        ["train", "--model", "shapes", "--data", pairs, "--steps", 2, "--batch-size", 2, "--threads", 1, "--out", lora],
        ["attack", "prompts", "--lora", lora, "--prompts-file", tmp_path / "attack.csv", "--steps", 2, "--threads", 1]
        + ["--images-per-prompt", 1, "--judge", "vlm", "--judge-options", judge, "--out", attack],
        ["evaluate", "--lora", lora, "--attacks", attack, "--n-prompts", 2, "--steps", 1, "--threads", 1]
        + ["--lpips", "shapes", "--prompts-file", tmp_path / "neutral.txt", "--out", evaluation],
        ["report", evaluation, "--out", out / "report.html"],
    ]
    for argv in commands:
        assert main([str(a) for a in argv]) == 0, capfd.readouterr().err[-3000:]
    # the judge did read its key, and sent it
    assert [r["auth"] for r in server.seen] == [f"Bearer {secrets['OPENAI_API_KEY']}"]

    captured = capfd.readouterr()
    streams = {"stdout": captured.out, "stderr": captured.err, "log": caplog.text}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 20 and (out / "report.html") in files
    for var, value in secrets.items():
        for stream, text in streams.items():
            assert value not in text, f"{var} written to {stream}"
        for path in files:
            assert value.encode() not in path.read_bytes(), f"{var} written to {path}"

    # run.json (provenance): a fixed set of keys, package versions only, no environment
    records = [json.loads(p.read_text()) for p in files if p.name == "run.json"]
    assert len(records) == 4
    for record in records:
        assert set(record) <= RUN_KEYS, set(record) - RUN_KEYS
        assert all(re.fullmatch(r"[\w.+-]+", v) for v in record["versions"].values()), record["versions"]
        strings = set(_strings(record))
        assert not strings & set(SECRET_VARS), strings & set(SECRET_VARS)
        assert not any(value in s for value in secrets.values() for s in strings)
