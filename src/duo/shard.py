"""Work shared by the processes of `accelerate launch` (curate, sample, evaluate, attack's images).

Every process plans the same batches and draws batches rank, rank + world, ...: an image is drawn in the
batch it is drawn in by one process, so its pixels are the same. A process appends its records to its own
part file (`images.jsonl.part-1`); once all are done the main process merges the manifest and every part in
planned order into the manifest and deletes the parts. Parts a crash left behind count as recorded work
(`recorded`) and are merged at the end of the rerun, whatever its number of processes.

With one process (no launch) nothing here creates a process group or a file, and a barrier is a no-op.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from duo.data.files import atomic_write_text, read_jsonl

# A barrier may wait for the main process's own work (an attack's search, evaluate's metrics): hours, not the
# 30 minutes torch allows by default.
WAIT = timedelta(days=7)
_state = None


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device: str | None) -> None:
    """Join the process group (once); a GPU process then works on its own GPU (`cuda` is its LOCAL_RANK's)."""
    global _state
    if world() == 1 or _state is not None:
        return
    import torch
    from accelerate import PartialState

    # Without cpu=True accelerate ignores a multi-process launch on a machine with no GPU.
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    _state = PartialState(cpu=on_cpu, timeout=WAIT)


def barrier() -> None:
    if world() > 1:
        assert _state is not None, "duo.shard.init(device) must run before a barrier"
        _state.wait_for_everyone()


def start(run) -> None:
    """Main claims the folder once every process has read it, and nobody writes into it before main did."""
    barrier()
    if is_main():
        run.start()
    barrier()


def main_first(work: Callable):
    """`work` on the main process, then on the others (which then find its result on disk)."""
    result = work() if is_main() else None
    barrier()
    return result if is_main() else work()


def mine(batches: list) -> list:
    return batches[rank() :: world()]


def cut(plan: list, size: int) -> list[list]:
    """The whole plan in batches of `size`: every process cuts the same batches, resumed or not."""
    return [plan[start : start + size] for start in range(0, len(plan), size)]


def pending(batches: list, done, key: Callable = lambda item: item) -> list:
    """This process's batches that still hold an item whose key is not in `done`."""
    return [b for b in mine(batches) if any(key(item) not in done for item in b)]


def gather_planned(manifest: Path, keys: list, record_key: Callable[[dict], object]) -> None:
    """`gather` in the order of `keys` (every planned item's key, as a single process draws them)."""
    place = {k: n for n, k in enumerate(keys)}
    gather(manifest, lambda r: place.get(record_key(r)))


def part(manifest: Path) -> Path:
    """Where this process appends: the manifest itself when it works alone."""
    return manifest if world() == 1 else manifest.with_name(f"{manifest.name}.part-{rank()}")


def parts(manifest: Path) -> list[Path]:
    return sorted(manifest.parent.glob(f"{manifest.name}.part-*"))


def recorded(manifest: Path) -> list[dict]:
    """Records of the manifest and of every part file. A line a crash cut is dropped; it is cut off only where
    this process appends (each its own file), so no process truncates a file another is reading for work."""
    own = part(manifest)
    return [r for f in [manifest, *parts(manifest)] for r in read_jsonl(f, repair=f == own)]


def gather(manifest: Path, key: Callable[[dict], object]) -> None:
    """Wait for every process, then (main) merge the parts into the manifest: its records and theirs in planned
    order (`key`: a record's place in the plan, None for one the plan no longer holds: those first, as they
    were), one record per place, written atomically; the parts are deleted only then."""
    barrier()
    found = parts(manifest)
    if not is_main() or not found:
        return
    records, seen = [], set()
    for r in read_jsonl(manifest) + [r for p in found for r in read_jsonl(p)]:
        k = key(r)
        if k is None or k not in seen:  # twice where a crash fell between the merge and the deletes
            seen.add(k)
            records.append(r)
    records.sort(key=lambda r: (0,) if key(r) is None else (1, key(r)))
    # append_jsonl's serialisation: a merged manifest is the same bytes as one a single process appended
    atomic_write_text(manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    for p in found:
        p.unlink()
