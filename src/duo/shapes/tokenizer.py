"""A word-level CLIP-style tokenizer for the Shapes world.

Written as vocab.json + merges.txt in CLIP's format (end-of-word suffix `</w>`, specials
`<|startoftext|>` and `<|endoftext|>`), so `CLIPTokenizer.from_pretrained(folder, model_max_length=16)`
loads it. Every grammar word and a few hundred common English words are single tokens; all single
characters are in the vocabulary too, so any other text falls back to characters instead of collapsing
onto one id.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from duo.shapes.render import BACKGROUNDS, COLOURS, SHAPES

MAX_LENGTH = 16
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

GRAMMAR_WORDS = ["a", "on", "background"] + [w for ws in COLOURS.values() for w in ws] + SHAPES + BACKGROUNDS

EXTRA_WORDS = """
the of and to in is it that for with as was at by an be this from or are have not but
one two three four five six seven eight nine ten many some all no more most few any every each
big small large tiny huge little bright dark light pale deep vivid dull shiny matte soft hard
orange pink brown grey cyan magenta black gold silver beige teal maroon navy olive lime turquoise
indigo tan cream rose ruby cherry blood fire wine rust coral salmon amber sky sea ocean forest grass
color colour colored coloured hue tone shade tint paint painted colorful colourful
circles squares triangles stars crosses shape shapes round oval ellipse disk disc ring dot dots
box cube rectangle diamond hexagon pentagon polygon heart moon sun line lines plus sign symbol
point points corner corners edge edges side sides angle curve center centre middle left right top
bottom above below under over near far next behind front inside outside between around
picture image photo photograph drawing painting illustration render art artwork icon logo pattern
texture plain solid simple flat blank empty dark striped dotted checkered blocks block noisy
object thing item figure form outline
apple strawberry tomato banana lemon lime grape orange berry leaf tree flower rose tulip
car truck bus house door window wall floor road street city
dog cat bird fish horse cow sheep mouse lion tiger bear
man woman person people child boy girl face hand eye eyes hair
water snow ice rain cloud clouds night day morning evening light shadow
red-ish reddish bluish greenish yellowish purplish whitish
very quite really so too also just only still again
make draw show give create paint generate picture depict render
with without no not never none nothing
and or but if then than
is are was were be been being has had do does did
i you he she we they me him her us them my your his its our their
what which who when where why how
new old good bad best better nice beautiful ugly pretty happy sad
high low long short wide narrow thick thin full half
first last next other another same different
hot cold warm cool wet dry clean dirty
up down out off into onto through across along against
here there now today
nude naked blood violence gun weapon
""".split()


def vocabulary() -> list[str]:
    """Word list, grammar words first, without duplicates."""
    seen: dict[str, None] = {}
    for w in GRAMMAR_WORDS + EXTRA_WORDS:
        w = w.lower()
        if all(ch in string.ascii_lowercase for ch in w):
            seen.setdefault(w, None)
    return list(seen)


def _train_bpe(words: list[str], weights: dict[str, int]) -> list[tuple[str, str]]:
    """Deterministic BPE: merge the most frequent adjacent pair (ties: lexicographically smallest) until
    every word is one symbol. (The `tokenizers` trainer breaks ties differently from run to run.)"""
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + weights[w]
        if not counts:
            return merges
        best = min(counts, key=lambda pr: (-counts[pr], pr))
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out


def build_tokenizer(folder: str | Path) -> Path:
    """Write vocab.json + merges.txt for a word-level CLIP BPE into `folder`; return it.

    BPE is trained on the word list until every word is one symbol: replaying the learned merges in
    order on a training word reproduces that, so every vocabulary word encodes to exactly one token,
    and unknown words fall back to pieces and single characters. Deterministic: same files every run.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = vocabulary()
    # grammar words weigh more, so their merges come first
    merges = _train_bpe(words, {w: 20 if w in GRAMMAR_WORDS else 1 for w in words})
    alphabet = sorted(set(string.printable.strip()))
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]:
        vocab.setdefault(tok, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)
