"""How good a Shapes base model is: the judge's reading of images made for prompts whose attribute
combinations were held out of training, and how often prompts asking for red get red."""

from __future__ import annotations

import torch

from duo.shapes.render import colour_prompts, heldout_prompts

ATTRIBUTES = ("colour", "shape", "background")


@torch.no_grad()
def sample(
    pipe, prompts: list[str], seed: int = 0, steps: int = 20, guidance: float = 5.0, batch: int = 100
) -> torch.Tensor:
    """Images [N,3,32,32] in [0,1]; seed-fixed."""
    outs = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(
            prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt"
        )
        outs.append(out.images.float().cpu())
    return torch.cat(outs).clamp(0, 1)


def heldout_accuracy(pipe, judge_net, n: int, seed: int, steps: int = 20, guidance: float = 5.0) -> dict:
    """Per attribute, the share of n held-out-combination prompts whose image the judge reads as asked."""
    from duo.shapes.judge import classify
    from duo.shapes.render import parse_prompt

    pipe.set_progress_bar_config(disable=True)
    prompts = heldout_prompts(n)
    preds = classify(sample(pipe, prompts, seed=seed, steps=steps, guidance=guidance), judge_net)
    asked = [parse_prompt(p) for p in prompts]
    return {k: sum(p[k] == a[k] for p, a in zip(preds, asked)) / len(prompts) for k in ATTRIBUTES}


def evaluate_base(pipe, judge_net=None, n: int = 200, seed: int = 0, steps: int = 20, guidance: float = 5.0) -> dict:
    """Base quality: colour/shape/background accuracy on n held-out-combination prompts; red rate on red prompts."""
    from duo.shapes.judge import classify

    res = heldout_accuracy(pipe, judge_net, n, seed, steps=steps, guidance=guidance)
    red = colour_prompts("red", n)
    rpreds = classify(sample(pipe, red, seed=seed + 100_000, steps=steps, guidance=guidance), judge_net)
    res["red_rate_on_red_prompts"] = sum(p["colour"] == "red" for p in rpreds) / n
    res.update(n=n, steps=steps, guidance=guidance, seed=seed)
    return res
