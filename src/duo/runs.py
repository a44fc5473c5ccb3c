"""Run folders: how every stage claims its output folder and names the folders it came from.

Each stage writes `run.json` in its folder before anything else:

    kind        curate | train | sample | attack | evaluate | compare | demo
    config      the resolved settings that decide the folder's content
    parents     {role: {path, kind, hash}}: the folders it read, with a hash of their outputs
    overrides   flags that were allowed to contradict the parents (`--override KEY`)
    versions    package versions; started / finished timestamps
    outputs     {file: sha256} of what the stage declares as its result, written at finish

A rerun into the same folder resumes when kind, config and parents' hashes are the same, and is refused
with the differing keys otherwise; `--overwrite` deletes the folder first, but only a folder holding a
run.json (never one that is not ours). Nothing is written until `start()`, so a stage can check every
setting and load its model before the folder is touched.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from duo.data.files import atomic_write_text, sha256_file
from duo.errors import UserError

RUN_FILE = "run.json"
# Never part of a folder's content hash: resumable state that changes without changing the result.
SKIPPED_DIRS = {"checkpoints", "fused", "__pycache__"}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = ("duo-unlearn", "torch", "diffusers", "transformers", "peft", "accelerate", "nudenet")
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def read_run(folder: str | Path) -> dict | None:
    """The run.json of a folder, or None when it has none (a legacy or foreign folder)."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); restore it or rerun that stage with --overwrite.") from None


def jsonable(value):
    """Round-trip through JSON so tuples, paths and numbers compare as they will be read back."""
    return json.loads(json.dumps(value, default=str))


def content_hash(folder: str | Path) -> str:
    """sha256 naming a folder's result: its declared outputs if it is a finished run, else every file in it.

    A finished run's outputs are hashed afresh and checked against what it recorded, so a parent edited
    after it finished is caught rather than silently trusted.
    """
    folder = Path(folder)
    run = read_run(folder)
    if run is not None and run.get("outputs") is not None:
        files = {rel: sha256_file(folder / rel) if (folder / rel).is_file() else None for rel in run["outputs"]}
        changed = sorted(rel for rel, h in files.items() if h != run["outputs"][rel])
        if changed:
            raise UserError(
                f"'{folder}' changed after its {run.get('kind')} run finished ({', '.join(changed[:3])} differ). "
                f"Rerun that stage (with --overwrite) so that what is built on it is built on what it holds."
            )
        return _digest(files)
    if not folder.exists():
        raise UserError(f"'{folder}' does not exist.")
    if folder.is_file():
        return sha256_file(folder)
    return _digest({str(p.relative_to(folder)): sha256_file(p) for p in _files(folder)})


def _files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
        found += [Path(root) / n for n in sorted(names) if n != RUN_FILE and not n.startswith(".")]
    return found


def _digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _sweep_temporaries(folder: Path) -> None:
    """The `.NAME.xxxx.tmp` files (and `.lora.xxxx.tmp/` folders) an atomic write leaves when killed inside it:
    only ours carry that shape, and nothing reads them, so a resumed run removes them."""
    for path in sorted(folder.rglob(".*.tmp"), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def parent_record(path: str | Path) -> dict:
    """What a child records of a folder it read: where it is, what kind of run made it, and its hash."""
    path = Path(path)
    run = read_run(path) if path.is_dir() else None
    if run is not None and run.get("finished") is None:
        raise UserError(
            f"'{path}' holds a {run.get('kind')} run that has not finished; rerun that stage to the end first."
        )
    return {"path": str(path.resolve()), "kind": run["kind"] if run else "external", "hash": content_hash(path)}


def diff_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ, down to the first key that is not a dict on both sides."""
    keys = []
    for k in sorted(set(before) | set(after)):
        a, b = before.get(k), after.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys += diff_keys(a, b, f"{prefix}{k}.")
        else:
            keys.append(prefix + k)
    return keys


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass
class RunFolder:
    """A stage's claim on its output folder; see the module docstring for the contract."""

    path: Path
    kind: str
    config: dict
    parents: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    # Config keys and parent roles (glob patterns) recorded but free to change on resume (train's --steps).
    volatile: tuple[str, ...] = ()
    defaults: dict = field(default_factory=dict)  # values of config keys a previous run did not record
    state: str = "new"  # new | resume | overwrite
    previous: dict | None = None

    @classmethod
    def claim(
        cls,
        path: str | Path,
        kind: str,
        config: dict,
        parents: dict | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        auto_resume: bool = True,
        overrides: list[str] | None = None,
        volatile: tuple[str, ...] = (),
        defaults: dict | None = None,
        legacy: dict | None = None,
    ) -> RunFolder:
        """Check that `path` may hold this run; writes nothing (see `start`).

        parents: {role: folder} (a folder of None is left out). auto_resume: an existing run with the same
        settings resumes without --resume (every stage but train, whose resume is a deliberate act).
        defaults: config values a previous run did not record (settings added since it ran). legacy: the config
        of a folder this stage wrote before run.json existed (train's config.json), or None where there is none.
        """
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other: pick one.")
        records = {role: parent_record(p) for role, p in (parents or {}).items() if p is not None}
        run = cls(Path(path), kind, jsonable(config), records, sorted(overrides or []), tuple(volatile))
        run.defaults = jsonable(defaults or {})
        run.state = run._check(resume, overwrite, auto_resume, legacy)
        return run

    def _check(self, resume: bool, overwrite: bool, auto_resume: bool, legacy: dict | None = None) -> str:
        p = self.path
        if p.exists() and not p.is_dir():
            raise UserError(f"--out '{p}' is a file, not a folder; choose another --out.")
        if not p.exists() or not any(p.iterdir()):
            return "new"
        previous = read_run(p)
        if previous is None and legacy is not None:
            # Such a folder named its parents by path only, and its config holds those paths.
            previous = {"kind": self.kind, "config": jsonable(legacy), "parents": self.parents}
            previous.update(overrides=self.overrides, versions=package_versions(), started=None)
        if previous is None:
            verb = "refuses to delete" if overwrite else "will not write into"
            raise UserError(
                f"duo {verb} '{p}': it is not empty and holds no {RUN_FILE}, so it is not a duo run folder "
                "(or one written before run folders had a run.json). Choose another --out."
            )
        if previous.get("kind") != self.kind:
            raise UserError(
                f"'{p}' holds a `duo {previous.get('kind')}` run, not a `duo {self.kind}` run; choose another --out."
            )
        if overwrite:
            return "overwrite"
        self.previous = previous
        if not (resume or auto_resume):
            raise UserError(
                f"'{p}' already holds a run. Pass --resume to continue it, --overwrite to replace it, "
                "or choose another --out."
            )
        changed = self.differences(previous)
        if changed:
            raise UserError(
                f"'{p}' holds a {self.kind} run with other settings (differs in: {', '.join(changed)}). "
                "Rerun with the original settings to resume it, pass --overwrite to replace it, "
                "or choose another --out."
            )
        return "resume"

    def differences(self, previous: dict) -> list[str]:
        def settled(config: dict) -> dict:
            return {k: v for k, v in config.items() if not _matches(k, self.volatile)}

        def hashes(parents: dict) -> dict:
            # The hash names the content; the path may move (a copied run folder stays resumable).
            return {role: rec.get("hash") for role, rec in parents.items() if not _matches(role, self.volatile)}

        mine = {"config": settled(self.config), "parents": hashes(self.parents)}
        theirs = {
            "config": settled({**self.defaults, **previous.get("config", {})}),
            "parents": hashes(previous.get("parents", {})),
        }
        return [k.removeprefix("config.") for k in diff_keys(theirs, mine)]

    def start(self) -> RunFolder:
        """Claim the folder: delete it first with --overwrite (it holds a run.json: it is ours), write run.json."""
        if self.state == "overwrite":
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if self.state == "resume" and self.previous is not None:
            _sweep_temporaries(self.path)
            record = {**self.previous, "config": self.config, "parents": self.parents}
            record.update(resumed=now(), finished=None, outputs=None)
        else:
            record = {
                "kind": self.kind,
                "config": self.config,
                "parents": self.parents,
                "overrides": self.overrides,
                "versions": package_versions(),
                "started": now(),
                "finished": None,
                "outputs": None,
            }
        self._write(record)
        return self

    def finish(self, outputs: list[str], **extra) -> dict:
        """Record the declared outputs' hashes: children name this folder by them."""
        record = read_run(self.path) or {}
        hashes = {rel: sha256_file(self.path / rel) for rel in outputs if (self.path / rel).is_file()}
        record.update(extra, outputs=hashes, finished=now())
        self._write(record)
        return record

    def lineage(self) -> dict:
        """What results files carry: kind, parents with hashes, overrides."""
        return {"kind": self.kind, "parents": self.parents, "overrides": self.overrides}

    def _write(self, record: dict) -> None:
        atomic_write_text(self.path / RUN_FILE, json.dumps(record, indent=2, default=str))


def ancestors(folder: str | Path) -> dict:
    """The lineage tree of a folder: {role: {path, kind, hash, parents: {...}}}, as far as run.json files go."""
    run = read_run(folder)
    if run is None:
        return {}
    tree = {}
    for role, rec in run.get("parents", {}).items():
        tree[role] = {**rec, "parents": ancestors(rec["path"]) if Path(rec["path"]).is_dir() else {}}
    return tree


def find_ancestor(folder: str | Path, kind: str) -> Path | None:
    """The nearest folder of `kind` this one was built from (breadth first), or None."""
    queue = [Path(folder)]
    seen = set()
    while queue:
        current = queue.pop(0)
        if current in seen:
            continue
        seen.add(current)
        run = read_run(current)
        if run is None:
            continue
        for rec in run.get("parents", {}).values():
            if rec.get("kind") == kind and Path(rec["path"]).is_dir():
                return Path(rec["path"])
            queue.append(Path(rec["path"]))
    return None
