"""`duo card RUN --eval EVAL`: refresh a LoRA's model card with the results of its evaluation."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "card",
        help="refresh a LoRA's model card (README.md) with a `duo evaluate` folder's DSR / PP / FID table",
        description="Rewrite the evaluation section of the model card in RUN (a `duo train` folder) with the "
        "results of EVAL (a `duo evaluate --lora RUN` folder): DSR per attack with its judge, PP, FID and CLIP "
        "score, and two image pairs (original vs with the LoRA) copied into RUN/card/. The rest of the card "
        "stays. EVAL must have evaluated this very LoRA, alone (checked by content hash); anything else is "
        "refused. The folder then uploads to the Hub as it is, with the Hub's own CLI (`hf upload USER/REPO RUN . "
        "--exclude 'checkpoints/*'`); nothing in duo pushes anything.",
    )
    parser.add_argument("run", metavar="RUN", help="the --out folder of `duo train` (holds the LoRA and README.md)")
    parser.add_argument(
        "--eval", required=True, metavar="EVAL", help="the --out folder of `duo evaluate --lora RUN ...`"
    )
    parser.add_argument(
        "--concept-pairs",
        action="store_true",
        help="also show image pairs of the attacks' prompts; their original images show the removed concept, "
        "so leave this off for concepts not fit to publish (default: neutral prompts only)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from duo.report.card import refresh_card

    print(f"card: {refresh_card(args.run, args.eval, concept_pairs=args.concept_pairs)}")
    return 0
