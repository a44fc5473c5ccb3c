"""`duo attack NAME`: red-team a model (+ LoRAs, guard) and write results.json with the DSR."""

from __future__ import annotations

import argparse

from duo import shard
from duo.attacks.base import AttackConfig
from duo.attacks.registry import ATTACKS, attack_settings
from duo.cli.args import add_dataclass_flags, dataclass_from_args, explicit_values

SUMMARY = {
    "prompts": "the prompt set as written (a CSV/JSONL file, or the concept's own prompts): the baseline",
    "ring-a-bell": "Ring-A-Bell: genetic search for a prompt whose embedding carries the concept vector",
    "concept-inversion": "Concept Inversion: textual inversion of a new token on the model under attack",
    "unlearndiff": "UnlearnDiffAtk: optimise prefix tokens against the model's own denoising loss",
    "soft-prompt": "soft prompt: continuous input vectors against the model's own denoising loss (white-box bound)",
    "relearn": "relearning probe: fine-tune the model on concept images; DSR per step, against the original's",
    "sneakyprompt": "SneakyPrompt: black-box RL search replacing the prompt's unsafe words, judged per query",
}


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "attack",
        help="attack a model with an erased concept and measure the defense success rate",
        description="Find prompts (or a token) that bring the concept back, generate under the guard, judge, "
        "and write results.json (dsr, per-prompt scores, provenance) in --out. Reruns resume.",
    )
    attacks = parser.add_subparsers(dest="attack", metavar="ATTACK", required=True)
    for name in ATTACKS:
        module = attack_settings(name)
        p = attacks.add_parser(name, help=SUMMARY[name], description=SUMMARY[name] + ". " + _budget_help(module))
        add_dataclass_flags(p, AttackConfig)
        knobs = p.add_argument_group(
            f"{name} settings (defaults shown are the paper budget; --budget small changes some)"
        )
        add_dataclass_flags(knobs, module.Settings, suppress_defaults=True)
        p.set_defaults(func=run, settings_cls=module.Settings)


def _budget_help(module) -> str:
    small = ", ".join(f"{k}={v}" for k, v in module.BUDGETS["small"].items()) or "as paper"
    return f"Budget 'paper' is the published setting; 'small' changes: {small}."


def run(args: argparse.Namespace) -> int:
    from duo.attacks.harness import run_attack

    results = run_attack(args.attack, dataclass_from_args(AttackConfig, args), explicit_values(args.settings_cls, args))
    d = results["dsr"]
    if shard.is_main():  # one line, not one per process under accelerate launch
        print(
            f"{args.attack}: DSR {d['rate']:.3f} (95 % CI {d['ci95'][0]:.3f}–{d['ci95'][1]:.3f}, n={d['n']} images, "
            f"{results['n_prompts']} prompts), judge {results['judge'].get('name')}\nresults: {args.out}/results.json"
        )
    return 0
