"""`duo train --method uce`: UCE's closed-form edit of the cross-attention projections, written as a LoRA.

Which text vectors are edited follows the authors' script: for an erased text and its guide, the states
from each one's last word token to the end of the sequence (EOS and padding carry the prompt too), cut to
equal length; preserved texts (the empty prompt always, plus the concept's neighbours) with every position.
W' − W has rank ≤ the number of erased vectors, so a LoRA of that rank holds the edit exactly and the
harness loads it like any other LoRA (`uce.json` records the rank and the largest relative error).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from duo.data.files import atomic_write_text
from duo.data.pairs import load_pair_sets
from duo.errors import UserError
from duo.models.lora import ADAPTER, attach_lora, get_lora_state
from duo.objectives import uce_edit
from duo.runs import read_run
from duo.train.config import TrainConfig
from duo.train.outputs import LORA_FILE, OUTPUTS, claim_folder, legacy_config, write_config, write_lora_folder

log = logging.getLogger(__name__)
REPORT_FILE = "uce.json"


def edit_texts(cfg, pairs) -> tuple[list[tuple[str, str]], list[str]]:
    """(erased text, guide) pairs and the preserved texts."""
    if cfg.uce_erase == "prompts":
        erase = list(dict.fromkeys(zip(pairs.unsafe_prompts, pairs.safe_prompts)))
    else:
        if not pairs.concept.unsafe_words:
            raise UserError(
                f"UCE maps the concept's words, and concept '{pairs.concept.name}' lists no unsafe_words; add them "
                "to the concept file or pass --uce-erase prompts."
            )
        erase = [(w, cfg.uce_guide) for w in pairs.concept.unsafe_words]
    preserve = [""] + (list(pairs.concept.neighbours) if cfg.uce_preserve == "neighbours" else [])
    return erase, preserve


def text_vectors(family, erase: list[tuple[str, str]], preserve: list[str]):
    """(C, G, P): erased vectors, their guides row by row, and preserved vectors, each (n, d_text)."""
    # An empty guide is a space, as in the authors' script: both tokenize to BOS EOS.
    states, last = family.prompt_states([t for pair in erase for t in pair])
    cs, gs = [], []
    for i in range(len(erase)):
        (c, lc), (g, lg) = (states[2 * i], last[2 * i]), (states[2 * i + 1], last[2 * i + 1])
        n = states.shape[1] - max(lc, lg)  # both slices start at their last word and have this length
        cs.append(c[lc : lc + n])
        gs.append(g[lg : lg + n])
    keep, _ = family.prompt_states(preserve)
    return torch.cat(cs), torch.cat(gs), keep.flatten(0, 1)


def lora_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B (d_out × r), A (r × d_in) with B·A = delta up to the returned relative Frobenius error."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    b, a = u[:, :k] * root, root[:, None] * vh[:k]
    err = float((b @ a - delta.double()).norm() / delta.double().norm().clamp_min(1e-30))
    # Zero rows/columns up to the common rank: one rank for every layer keeps the LoRA's scale α/r at 1.
    b = torch.nn.functional.pad(b, (0, rank - k))
    a = torch.nn.functional.pad(a, (0, 0, 0, rank - k))
    return b.float(), a.float(), err


def edit(cfg: TrainConfig) -> Path:
    """Compute the UCE edit for cfg and write it as a LoRA folder; returns the folder."""
    from duo.models.family import load_family

    cfg.validate()
    pairs = load_pair_sets(cfg.data_folders, cfg.part)
    out = Path(cfg.out)
    _refuse_rerun(cfg, out)
    folder = claim_folder(cfg)
    device = cfg.device or "cpu"
    family = load_family(cfg.model, device=device, allow_pickle=cfg.allow_pickle)
    erase, preserve = edit_texts(cfg, pairs)
    c, g, p = text_vectors(family, erase, preserve)
    factors, rank, worst = edit_factors(cfg, family, c, g, p)
    folder.start()  # the model loaded and the edit is computed: only now is anything written or deleted
    write_config(out, cfg)
    install_factors(family.unet, factors, rank)
    write_lora_folder(cfg, pairs, family, get_lora_state(family.unet), device)
    report = {
        "rank": rank,
        "layers": len(factors),
        "erased_vectors": int(c.shape[0]),
        "preserved_vectors": int(p.shape[0]),
        "max_relative_error": worst,
        "erase": [list(e) for e in erase],
        "preserve": preserve,
    }
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2))
    folder.finish(outputs=[*OUTPUTS, REPORT_FILE])
    log.info("UCE edit of %d projections written to %s (rank %d)", len(factors), out / LORA_FILE, rank)
    return out


def _refuse_rerun(cfg: TrainConfig, out: Path) -> None:
    # Before the claim, whose refusal would suggest --resume: a flag UCE does not take.
    previous = read_run(out) if out.is_dir() else None
    ours = (previous is not None and previous.get("kind") == "train") or legacy_config(out) is not None
    if ours and not cfg.overwrite:
        raise UserError(
            f"'{out}' already holds a run; UCE is a closed form with nothing to resume: pass --overwrite "
            "to replace it, or choose another --out."
        )


def edit_factors(cfg: TrainConfig, family, c, g, p) -> tuple[dict, int, float]:
    """{projection: (B, A)} of every edited layer, the common rank, and the largest relative error of B·A."""
    rank = min(c.shape[0], c.shape[1])  # ≥ the rank of every layer's W' − W
    factors, worst = {}, 0.0
    for name, module in family.cross_attention_projections(with_keys=cfg.uce_keys):
        w = module.weight.detach().float()
        # W g, W c, W p are what the layer outputs: the edit acts on the layer's input space only.
        edited = uce_edit(w, c, g, p, cfg.uce_lambda, cfg.erase_scale, cfg.preserve_scale)
        b, a, err = lora_factors(edited.double() - w.double(), rank)
        factors[name], worst = (b, a), max(worst, err)
    return factors, rank, worst


def install_factors(unet, factors: dict, rank: int) -> None:
    """A LoRA on exactly the edited layers, holding B·A = W' − W."""
    names = "|".join(n.replace(".", r"\.") for n in factors)
    attach_lora(unet, rank, float(rank), f"^({names})$")  # alpha = rank: scale 1, B·A is the edit
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, (b, a) in factors.items():
            modules[name].lora_A[ADAPTER].weight.copy_(a)
            modules[name].lora_B[ADAPTER].weight.copy_(b)
