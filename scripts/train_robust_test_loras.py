"""Train the two LoRAs the fast robust-DUO test attacks, and install them in tests/assets/robust_ci/.

`tests/test_robust_duo_shapes.py` has a slow test that trains plain DUO and DUO-adv itself and a fast one that
only attacks these two files (Concept Inversion on each), so `make test` pays for the attack, not the training.
Both LoRAs come from the same reduced Shapes run the slow test makes: the shapes-red preset on 24 pairs, 250
steps, seed 42, one thread; the robust one adds the robust study's first finalist (a 5-vector soft-prompt
inner attack and the unconditional anchor). About 4 minutes on one core.

    python scripts/train_robust_test_loras.py [--work runs/robust_ci]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the settings live with the tests that use them

from test_robust_duo_shapes import PAIRS, ROBUST, STEPS  # noqa: E402

from duo.data.curate import CurateConfig, curate  # noqa: E402
from duo.train.api import resolve_config, train  # noqa: E402

ASSETS = ROOT / "tests" / "assets" / "robust_ci"
KEPT = ("pytorch_lora_weights.safetensors", "README.md")  # the LoRA and its model card (settings, data hash)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/robust_ci", help="folder for the pairs and the two training runs")
    args = parser.parse_args()
    work = Path(args.work)
    pairs = work / "pairs"
    curate(CurateConfig(model="shapes", concept="shapes-red", out=str(pairs), pairs=PAIRS, batch_size=PAIRS))
    for name, flags in (("plain", {}), ("robust", ROBUST)):
        out = work / name
        if not (out / KEPT[0]).is_file():
            train(resolve_config(model="shapes", data=str(pairs), out=str(out), steps=STEPS, threads=1, **flags))
        (ASSETS / name).mkdir(parents=True, exist_ok=True)
        for file in KEPT:
            shutil.copyfile(out / file, ASSETS / name / file)
        print(f"{name}: {ASSETS / name}")


if __name__ == "__main__":
    main()
