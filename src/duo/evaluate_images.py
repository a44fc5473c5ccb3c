"""`duo evaluate`'s images: original and unlearned per (group, prompt, seed), drawn once and kept on disk."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from tqdm.auto import tqdm

from duo import shard
from duo.data.concepts import Concept
from duo.data.files import append_jsonl, atomic_save_image, atomic_write_bytes, load_image, read_jsonl
from duo.guards import make_guard
from duo.seeds import derive_seed


class Images:
    """Original and unlearned images per (group, prompt, seed), generated once and kept on disk."""

    def __init__(self, cfg, concept: Concept, out: Path):
        self.cfg, self.concept, self.out, self.family, self.guard = cfg, concept, out, None, None
        self.index = out / "images.jsonl"
        self.records = {(r["group"], r["model"], r["i"]): r for r in shard.recorded(self.index)}

    def _load(self):
        if self.family is None:
            from duo.models.family import load_with_loras

            c = self.cfg
            self.family = load_with_loras(c.model, c.lora, c.dtype, c.device, threads=c.threads)
            self.guard = make_guard(self.cfg.guard, self.concept.unsafe_words)
        return self.family

    def make(self, groups: list[tuple[str, list[str]]]) -> None:
        """Every group's missing images, this process's share of the batches; then (main) one images.jsonl.

        Batches of every prompt, not of those left: pixels depend on the batch an image is drawn in (CPU kernels),
        so a batch a crash cut short is redrawn whole and only its missing images are recorded."""
        prompts_of, batches = dict(groups), []  # batches of (group, model, i), each of one group and model
        for group, prompts in groups:
            for model in ("original", "unlearned"):
                batches += shard.cut([(group, model, i) for i in range(len(prompts))], self.cfg.batch_size)
        todo = shard.pending(batches, self.records)
        for batch in tqdm(todo, desc="evaluate images", leave=False, disable=not shard.is_main()):
            group, model = batch[0][:2]
            self._generate(group, model, prompts_of[group], [i for _, _, i in batch])
        shard.gather_planned(self.index, [k for b in batches for k in b], lambda r: (r["group"], r["model"], r["i"]))
        self.records = {(r["group"], r["model"], r["i"]): r for r in read_jsonl(self.index)}

    def get(self, group: str, prompts: list[str]) -> tuple[list, list]:
        """The images `make` drew (or found), original then unlearned."""
        return tuple(
            [load_image(self.out / self.records[(group, m, i)]["file"]) for i in range(len(prompts))]
            for m in ("original", "unlearned")
        )

    def _generate(self, group: str, model: str, prompts: list[str], idx: list[int]) -> None:
        c = self.cfg
        if model == "unlearned" and not c.lora and c.guard == "none" and self._copy_original(group, prompts, idx):
            return
        family = self._load()
        texts = [prompts[i] for i in idx]
        guard = self.guard if model == "unlearned" else make_guard("none", [])
        steps, guidance = c.steps or self.concept.steps, c.guidance or self.concept.guidance
        seeds = [derive_seed(c.seed, "evaluate", group, i) for i in idx]
        run = family.loras_off() if model == "original" and c.lora else nullcontext()
        with run:
            images = guard.generate(family, texts, seeds, steps, guidance, self.concept.resolution)
        for i, seed, image in zip(idx, seeds, images):
            if (group, model, i) in self.records:  # recorded before a crash cut this batch short
                continue
            rel = f"images/{group}/{model}/{i:04d}.png"
            atomic_save_image(self.out / rel, image)
            self._record(group, model, i, prompts[i], seed, rel)

    def _record(self, group: str, model: str, i: int, prompt: str, seed: int, rel: str) -> None:
        record = {"group": group, "model": model, "i": i, "prompt": prompt, "seed": seed, "file": rel}
        append_jsonl(shard.part(self.index), record)
        self.records[(group, model, i)] = record

    def _copy_original(self, group: str, prompts: list[str], idx: list[int]) -> bool:
        """The model as it was (no LoRA, no guard) draws what the original draws, from the same seeds in the same
        batches: copy those images rather than draw them again. False if this process has not drawn them."""
        if not all((group, "original", i) in self.records for i in idx):
            return False
        for i in idx:
            if (group, "unlearned", i) in self.records:
                continue
            source = self.records[(group, "original", i)]
            rel = f"images/{group}/unlearned/{i:04d}.png"
            atomic_write_bytes(self.out / rel, (self.out / source["file"]).read_bytes())
            self._record(group, "unlearned", i, prompts[i], source["seed"], rel)
        return True


def attack_originals(images: Images, cell: dict) -> list[dict]:
    """The attack's prompts on the original model (LoRAs off, no guard, same seeds): the grid's left column."""
    from duo.attacks.concept_inversion import EMBEDS, FOLDER, install_token

    examples = cell.pop("examples")
    family = images._load()
    learned = Path(cell["results"]).parent / FOLDER / EMBEDS
    if learned.is_file():  # the prompts carry the learned token: install it (the LoRAs stay off below)
        install_token(family, cell["settings"]["token"], None, learned)
    for i, ex in enumerate(examples):
        # Popped whether or not the image is drawn: a rerun that finds it on disk writes the same results.json.
        guidance = ex.pop("guidance") or images.concept.guidance
        rel = f"images/attack-{cell['hash'][:12]}/original/{i:04d}.png"  # keyed by content: never stale
        if not (images.out / rel).is_file():
            with family.loras_off() if images.cfg.lora else nullcontext():
                image = family.text2image(
                    [ex["prompt"]], [ex["seed"]], cell["sampling"]["steps"], guidance, cell["sampling"]["resolution"],
                )[0]  # fmt: skip
            atomic_save_image(images.out / rel, image)
        ex["original"] = rel
    return examples
