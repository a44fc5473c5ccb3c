"""`duo card RUN --eval EVAL`: a train folder's model card, refreshed with what `duo evaluate` measured on it.

Only an evaluation of this very LoRA counts. Evaluate's run.json names its LoRA by the content hash of the
train folder (duo.runs), and that must be RUN's hash today: a LoRA retrained, or another folder's, is refused.
The card's evaluation section (between the markers duo.train.card writes) is replaced and the rest stays, so
a second refresh replaces the first. Image pairs are copied into RUN/card/ and linked by relative paths, so
the folder uploads to the Hub as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from duo.data.files import atomic_save_image, atomic_write_text, load_image
from duo.errors import UserError
from duo.runs import content_hash, read_run
from duo.train.card import EVAL_END, EVAL_START
from duo.train.outputs import CARD_FILE

CARD_DIR = "card"
MAX_PAIRS = 2  # two pairs, four small PNGs: enough to see the effect without turning the card into a gallery
THUMB = 256  # longest side of a copied image, in pixels
DSR_NOTE = (
    "DSR (defense success rate): the share of an attack's images the judge finds free of the concept; higher "
    "is better. PP (prior preservation): 1 − LPIPS between the original model's and this LoRA's images of the "
    "same neutral prompt and seed. FID compares this LoRA's images of the neutral prompts with the original's."
)


def refresh_card(run: str | Path, evaluation: str | Path, concept_pairs: bool = False) -> Path:
    """Rewrite RUN's README.md with EVAL's table and image pairs; refuse (UserError) unless EVAL measured RUN.

    concept_pairs: also show pairs from the attacks' prompts. Off by default: their original images show the
    concept that was removed, which is often not fit to publish."""
    run, evaluation = Path(run), Path(evaluation)
    card = _train_card(run)
    record, results = _evaluation(evaluation)
    weight = _check_same_lora(run, evaluation, record, results)
    pairs = _copy_pairs(run, evaluation, results, concept_pairs)
    section = evaluation_section(results, evaluation, weight, pairs, concept_pairs)
    atomic_write_text(run / CARD_FILE, replace_section(card, section))
    return run / CARD_FILE


def _train_card(run: Path) -> str:
    record = read_run(run) if run.is_dir() else None
    if record is None or record.get("kind") != "train":
        raise UserError(
            f"'{run}' is not a `duo train` folder (it holds no run.json of a train run). "
            "Pass the --out folder of `duo train`."
        )
    if record.get("finished") is None:
        raise UserError(f"'{run}' holds a train run that has not finished; finish it (duo train ... --resume) first.")
    if CARD_FILE in (record.get("outputs") or {}):
        # Its hash counts the card: rewriting it would make the LoRA another one to every run built on it.
        raise UserError(
            f"'{run}' was trained before model cards could be refreshed: its run.json counts {CARD_FILE} in the "
            "folder's hash, so rewriting the card would orphan the evaluations built on it. Retrain it with this "
            "version of duo (duo train ... --overwrite) and evaluate that, or edit a copy of the card by hand."
        )
    if not (run / CARD_FILE).is_file():
        raise UserError(f"'{run}' has no {CARD_FILE}; retrain it (duo train ... --overwrite) to write its card.")
    return (run / CARD_FILE).read_text()


def _evaluation(folder: Path) -> tuple[dict, dict]:
    """EVAL's run.json and results.json, checked to be a finished evaluation left as it finished."""
    record = read_run(folder) if folder.is_dir() else None
    path = folder / "results.json"
    if record is None or record.get("kind") != "evaluate" or not record.get("finished") or not path.is_file():
        raise UserError(
            f"--eval '{folder}' is not a finished `duo evaluate` folder (no run.json of an evaluate run, or no "
            f"results.json). Run `duo evaluate --lora RUN ... --out {folder}` first and pass that folder."
        )
    content_hash(folder)  # refuses a results.json edited after the evaluation finished
    return record, json.loads(path.read_text())


def _check_same_lora(run: Path, folder: Path, record: dict, results: dict) -> float:
    """The weight EVAL loaded RUN's LoRA at, once its one LoRA is shown to be RUN's by content hash."""
    loras = [rec for role, rec in sorted(record.get("parents", {}).items()) if role.startswith("lora")]
    fix = f"Run `duo evaluate --lora {run} ... --out NEW_FOLDER` and pass that folder to --eval."
    if not loras:
        measured = (results.get("method") or {}).get("name", "original")
        raise UserError(f"--eval '{folder}' evaluated no LoRA (the {measured} model): its numbers are not "
                        f"this LoRA's. {fix}")  # fmt: skip
    if len(loras) > 1:
        raise UserError(
            f"--eval '{folder}' evaluated {len(loras)} LoRAs combined; a LoRA's card holds the numbers of that "
            f"LoRA alone. {fix}"
        )
    if loras[0].get("hash") != content_hash(run):
        raise UserError(
            f"--eval '{folder}' evaluated the LoRA in '{loras[0].get('path')}', not the one in '{run}' (their "
            f"content hashes differ: another LoRA, or this one retrained since). {fix}"
        )
    return float(results["model"]["loras"][0][1])


def _copy_pairs(run: Path, folder: Path, results: dict, concept_pairs: bool) -> list[dict]:
    """Up to MAX_PAIRS (original, with LoRA) image pairs from EVAL's grids, as thumbnails in RUN/card/."""
    grids = results.get("grids") or {}
    names = [n for n in grids if concept_pairs and n.startswith("attack:")]
    names += [n for n in grids if not n.startswith("attack:")]
    rows = [(name, row) for name in names for row in grids[name]]
    found = [(name, row) for name, row in rows if all(_image(folder, row.get(k)) for k in ("original", "unlearned"))]
    target = run / CARD_DIR
    for old in target.glob("pair-*.png") if target.is_dir() else []:
        old.unlink()  # a previous refresh's pairs: the card links only this one's
    pairs = []
    for i, (name, row) in enumerate(found[:MAX_PAIRS]):
        files = {}
        for side, suffix in (("original", "original"), ("unlearned", "lora")):
            image = load_image(_image(folder, row[side]))
            image.thumbnail((THUMB, THUMB))
            rel = f"{CARD_DIR}/pair-{i}-{suffix}.png"
            atomic_save_image(run / rel, image)
            files[side] = rel
        pairs.append({"group": name.removeprefix("attack: "), "prompt": row["prompt"], **files})
    return pairs


def _image(folder: Path, rel: str | None) -> Path | None:
    """An image a grid names: relative to EVAL (its own images) or absolute (an attack folder's)."""
    if not rel:
        return None
    path = Path(rel) if Path(rel).is_absolute() else folder / rel
    return path if path.is_file() else None


def replace_section(card: str, section: str) -> str:
    """The card with its evaluation section replaced; appended where an older card has no markers."""
    block = f"{EVAL_START}\n{section}\n{EVAL_END}"
    start, end = card.find(EVAL_START), card.find(EVAL_END)
    if start < 0 or end < start:
        return card.rstrip("\n") + "\n\n" + block + "\n"
    return card[:start] + block + card[end + len(EVAL_END) :]


def evaluation_section(
    results: dict, folder: Path, weight: float, pairs: list[dict], concept_pairs: bool = False
) -> str:
    """The Markdown of the evaluation: where it came from, the DSR / PP / FID table, the image pairs."""
    concept = (results.get("concept") or {}).get("name", "?")
    setting = f"LoRA weight {weight:g}" + (
        f", guard {results['guard']}" if results.get("guard", "none") != "none" else ""
    )
    lines = [
        "## Evaluation",
        "",
        f"Measured by `duo evaluate` (folder `{folder.name}`, written {results.get('written', '?')}) on concept "
        f"{concept}, {setting}.",
        "",
        "| measure | value | measured with |",
        "|---|---|---|",
        *metric_rows(results),
        "",
        DSR_NOTE,
        "",
        *pair_lines(pairs, concept_pairs),
    ]
    return "\n".join(lines).rstrip("\n")


def metric_rows(results: dict) -> list[str]:
    """One row per attack's DSR, then PP, FID and CLIP score where measured."""
    rows = []
    for name, cell in (results.get("attacks") or {}).items():
        dsr = cell["dsr"]
        low, high = dsr.get("ci95", [None, None])
        value = f"{dsr['rate']:.3f} (95% CI {low:.3f}–{high:.3f}, n = {dsr['n']})" if low is not None else ""
        rows.append(_row(f"DSR, attack {name}", value or f"{dsr['rate']:.3f}", _judge(cell.get("judge") or {})))
    if not rows:
        rows.append(_row("DSR", "not measured: the evaluation was given no `duo attack` folders", ""))
    pp = results["preservation"]
    network = (pp.get("network") or {}).get("name", "?")
    rows.append(_row("PP", f"{pp['pp']:.3f} (n = {pp['n']} neutral prompts)", f"LPIPS network {network}"))
    for against, fid in (results.get("fid") or {}).items():
        rows.append(_row(f"FID vs {against}", f"{fid['fid']:.2f}", f"features {fid['features'].get('name', '?')}"))
    clip = results.get("clip_score") or {}
    if "unlearned" in clip:
        model = clip["unlearned"].get("provenance", {}).get("model", "?")
        value = f"{clip['unlearned']['x100']:.2f} (original {clip['original']['x100']:.2f})"
        rows.append(_row("CLIP score ×100", value, f"CLIP {model}"))
    return rows


def _judge(judge: dict) -> str:
    details = [f"{k} {judge[k]}" for k in ("preset", "threshold") if judge.get(k) is not None]
    name = f"judge {judge.get('name', '?')} {judge.get('version', '')}".rstrip()
    return name + (f" ({', '.join(details)})" if details else "")


def pair_lines(pairs: list[dict], concept_pairs: bool) -> list[str]:
    if not pairs:
        return ["The evaluation folder holds no image pairs, so the card shows none."]
    lines = ["### Image pairs", "", "| prompt | original model | with this LoRA |", "|---|---|---|"]
    for p in pairs:
        images = f"![original]({p['original']})", f"![with this LoRA]({p['unlearned']})"
        lines.append(_row(f"{p['prompt']} ({p['group']})", *images))
    if not concept_pairs:
        lines += ["", "Images of the attacks' prompts are left out: their originals show the removed concept."]
    return lines


def _row(*cells: str) -> str:
    """A Markdown table row; a `|` or a line break inside a cell would end it early."""
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
