"""`duo shapes`: train the Shapes world's base model from scratch, and measure its quality."""

from __future__ import annotations

import json
from pathlib import Path

from duo.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "shapes",
        help="the Shapes world: train its base model, measure it",
        description="The Shapes world: a miniature text-to-image world shipped with duo.",
    )
    ssub = p.add_subparsers(dest="shapes_command", metavar="SUBCOMMAND")

    t = ssub.add_parser(
        "train-base",
        help="train tokenizer, VAE, judge, text encoder and UNet from scratch",
        description="Train the whole Shapes world from a seed (about 47 minutes on 2 CPU "
        "cores). A rerun with the same --out resumes. --ship installs the result as the "
        "shipped weights and rewrites their SHA256SUMS.",
    )
    t.add_argument(
        "--out", default=None, help="output folder (default: runs/shapes-base/seed<SEED>); never the shipped assets"
    )
    t.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    t.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-time cap on the UNet phase; without it the run is step-for-step reproducible",
    )
    t.add_argument("--unet-steps", type=int, default=8400, help="UNet+text-encoder steps (default: 8400)")
    t.add_argument("--vae-steps", type=int, default=2000, help="VAE steps (default: 2000)")
    t.add_argument("--judge-steps", type=int, default=1000, help="judge pre-training steps (default: 1000)")
    t.add_argument("--n-images", type=int, default=60_000, help="training renders (default: 60000)")
    t.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, fastest here)")
    t.add_argument("--log", default=None, help="progress log file (default: OUT/train.log)")
    t.add_argument(
        "--ship", action="store_true", help="copy the result into the package's shapes/assets and update SHA256SUMS"
    )
    t.set_defaults(func=run_train_base)

    e = ssub.add_parser(
        "eval-base",
        help="base quality on held-out combinations, as JSON",
        description="Colour/shape/background accuracy (judge) on 200 prompts whose attribute "
        "combinations were held out of training, and the red rate on prompts asking for red. "
        "DDIM 20 steps, CFG 5.",
    )
    e.add_argument("--model", default="shapes", help="pipeline folder or 'shapes' (default: the shipped one)")
    e.add_argument("--judge", default=None, help="judge weights (default: the shipped ones)")
    e.add_argument("--n", type=int, default=200, help="prompts per measurement (default: 200)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    e.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    e.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default: 5.0)")
    e.set_defaults(func=run_eval_base)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_train_base(args) -> int:
    from duo.shapes import ASSETS
    from duo.shapes.train_base import ship, train_base

    out = Path(args.out) if args.out else Path("runs") / "shapes-base" / f"seed{args.seed}"
    if out.resolve() == ASSETS.resolve() or ASSETS.resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is inside the shipped assets folder; train elsewhere and use --ship.")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another path.")
    for name in ("unet_steps", "vae_steps", "judge_steps", "n_images", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1.")
    result = train_base(
        out,
        seed=args.seed,
        minutes=args.minutes,
        unet_steps=args.unet_steps,
        vae_steps=args.vae_steps,
        judge_steps=args.judge_steps,
        n_images=args.n_images,
        threads=args.threads,
        log_path=args.log,
    )
    if args.ship:
        ship(out)
        print(f"shipped {out} into {ASSETS}")
    print(json.dumps(result["quality"], indent=2))
    return 0


def resolve_model(model: str) -> Path:
    from duo.shapes import pipeline_path

    if model in ("shapes", "", None):
        return pipeline_path()
    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise UserError(
            f"--model {model}: no diffusers pipeline there (model_index.json missing); "
            "give a folder written by `duo shapes train-base` or 'shapes'."
        )
    return path


def run_eval_base(args) -> int:
    import torch
    from diffusers import StableDiffusionPipeline

    from duo.shapes.judge import load_judge
    from duo.shapes.quality import evaluate_base

    if args.n < 1:
        raise UserError("--n must be at least 1.")
    path = resolve_model(args.model)
    if args.judge and not Path(args.judge).is_file():
        raise UserError(f"--judge {args.judge}: file not found; give a judge .safetensors or omit it.")
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True)
    res = evaluate_base(
        pipe,
        load_judge(args.judge) if args.judge else None,
        n=args.n,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
    )
    res["model"] = str(path)
    print(json.dumps(res, indent=2))
    return 0
