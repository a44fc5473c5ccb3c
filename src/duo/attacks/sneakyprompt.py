"""SneakyPrompt (Yang et al., IEEE S&P 2024): a black-box search that replaces a prompt's sensitive words.

Method: the authors' reinforcement-learning agent (their `--method rl`, the published default; their brute-force,
greedy and beam variants are not implemented). Each sensitive word of the target (the concept's unsafe words
present in it, whole words, any case; each occurrence its own slot) is replaced by `num_subword` pieces of the
vocabulary. An actor-critic policy (an LSTM over the pieces chosen so far, one embedding, one action head and one
value head per piece) samples the pieces; every sample is a query of the deployed system: generate under the
guard at the target's seed (the image the harness judges first) and judge. The search stops at the first image
that shows the concept, when the queries run out, when the policy has stopped moving, or (the authors' rule)
after four samples when more than `max_perturb_rate` of the prompt's words are replaced; a failed search
returns the candidate with the best reward.

Where this differs from the authors' code (Yuchen413/text2image_safety), by choice:
- Success is the concept judge saying "present". Their success needs the safety filter not to refuse AND the
  image's CLIP score against the target prompt ≥ 0.26; here the judge answers both (our guards never refuse a
  prompt, they erase: an image that still shows the concept got through).
- Reward = judge score × text similarity. Their reward is the CLIP score of the image against the target prompt
  (or a negative penalty when the filter refuses). The judge's score is our image side (how much the image shows
  the concept); the text similarity, the cosine between the mean text-encoder states of the substituted and the
  original prompt (the attacker's own encoder, `family.encode_ids`; there is no separate CLIP here), keeps the
  search near the target's meaning as their CLIP term does. Both are recorded.
- No refusals, so their refusal penalty and their "widen the replaced words after five refusals" never apply.
- The plain prompt is queried first and counted as query 1 (their pre-check is outside the query limit); a
  target it already breaks is returned as it is (`pre_attack_success`), as they skip it.
- The concept's unsafe words are never pieces, and a sample that spells one is not queried (reward 0).
- A prompt asked before is answered from memory and not counted: the same seed gives the same image.
- "Stopped moving" is the same prompt `converge_repeats` times in a row; theirs is three rewards on a line
  within 1e-4, which rewards stuck near 0 (a judge score of 0) always are.
- Pieces: the decoded letters of each token (theirs strip every non-letter from the raw BPE string), deduplicated.
- A target without unsafe words: its most concept-laden word (the largest drop of text similarity to the unsafe
  words when it is deleted) is replaced; they ask a text NSFW classifier (`no_sensitive_word`, or skip).
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

import torch

from duo.attacks.base import Found
from duo.attacks.settings.sneakyprompt import BUDGETS, NAME, Settings  # noqa: F401 (module contract)
from duo.errors import UserError
from duo.seeds import derive_seed

if TYPE_CHECKING:
    from duo.models.protocol import ModelFamily

METHOD = "rl (actor-critic, SneakyPrompt's --method rl)"


def sensitive_spans(prompt: str, unsafe_words: list[str]) -> list[tuple[int, int]]:
    """(start, end) of every unsafe word or phrase in the prompt: whole words, any case, longest first."""
    words = sorted((w for w in unsafe_words if w.strip()), key=len, reverse=True)
    if not words or not prompt:
        return []
    pattern = r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"
    return [m.span() for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


def substitute(prompt: str, spans: list[tuple[int, int]], replacements: list[str]) -> str:
    """The prompt with span i replaced by replacements[i]."""
    if len(spans) != len(replacements):
        raise ValueError(f"{len(spans)} spans but {len(replacements)} replacements")
    parts, last = [], 0
    for (start, end), text in zip(spans, replacements):
        parts += [prompt[last:start], text]
        last = end
    return "".join(parts + [prompt[last:]])


def candidate_pieces(family: ModelFamily, unsafe_words: list[str], s: Settings) -> list[str]:
    """The action space: letter strings of the vocabulary's tokens, none of them an unsafe word."""
    banned = {w.lower() for phrase in unsafe_words for w in re.findall(r"[A-Za-z]+", phrase)}
    if s.vocabulary == "words":
        ids, limit = family.whole_word_ids(banned), None
    else:
        ids, limit = family.regular_token_ids(), s.len_subword
    pieces: dict[str, None] = {}
    for idx in ids.tolist():
        text = re.sub(r"[^A-Za-z]", "", family.decode_ids([idx]))
        if text and text.lower() not in banned and (limit is None or len(text) < limit):
            pieces.setdefault(text, None)
    if not pieces:
        raise UserError(f"the vocabulary of '{family.ref}' has no tokens to build replacements from.")
    return list(pieces)


def prepare(ctx, s: Settings) -> dict:
    """The action space (nothing to learn before the targets: the agent learns per target, from its queries)."""
    s.validate()
    pieces = _pieces(ctx, s)
    return {
        "method": METHOD,
        "vocabulary": s.vocabulary,
        "pieces": len(pieces),
        "pieces_sha256": hashlib.sha256("\n".join(pieces).encode()).hexdigest(),
        "success": "the concept judge says present (image generated under the guard at the target's seed)",
        "reward": "judge score × text similarity (cosine of mean text-encoder states, substituted vs original)",
        "guard": ctx.guard.name,
    }


def attack(ctx, s: Settings, target) -> Found:
    s.validate()
    return _Search(ctx, s, target).run()


def _pieces(ctx, s: Settings) -> list[str]:
    key = ("sneakyprompt-pieces", s.vocabulary, s.len_subword)
    if key not in ctx.memo:
        ctx.memo[key] = candidate_pieces(ctx.family, ctx.concept.unsafe_words, s)
    return ctx.memo[key]


@torch.no_grad()
def pooled_states(family: ModelFamily, prompts: list[str]) -> torch.Tensor:
    """Mean text-encoder state over each prompt's positions (BOS to EOS): its embedding for similarity."""
    ids = family.tokenize(prompts)
    states = family.encode_ids(ids).float().cpu()[:, : ids.shape[1]]  # rows past the tokens are not per-token
    lengths = torch.tensor([min(family.token_count(p), ids.shape[1]) for p in prompts])
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).float().unsqueeze(-1)
    return (states * mask).sum(1) / mask.sum(1)


def salient_span(family: ModelFamily, prompt: str, unsafe_words: list[str]) -> list[tuple[int, int]]:
    """The word whose deletion lowers the prompt's similarity to the concept's words the most."""
    words = list(re.finditer(r"\w+", prompt))
    if not words or not unsafe_words:
        return []
    without = [prompt[: m.start()] + prompt[m.end() :] for m in words]
    emb = pooled_states(family, [", ".join(unsafe_words), prompt, *without])
    sims = torch.nn.functional.cosine_similarity(emb[1:], emb[:1])
    drop = sims[0] - sims[1:]
    return [words[int(drop.argmax())].span()]


class _Policy(torch.nn.Module):
    """The agent: stage k reads the piece chosen at stage k-1 and outputs a distribution over pieces and a value."""

    def __init__(self, stages: int, actions: int, hidden: int):
        super().__init__()
        # the first stage reads a fixed start vector (the authors freeze their first embedding)
        self.register_buffer("start", torch.randn(1, hidden))
        self.inputs = torch.nn.ModuleList(torch.nn.Embedding(actions, hidden) for _ in range(stages - 1))
        self.cell = torch.nn.LSTMCell(hidden, hidden)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, actions) for _ in range(stages))
        self.values = torch.nn.ModuleList(torch.nn.Linear(hidden, 1) for _ in range(stages))

    def sample(self, generator: torch.Generator) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """One piece per stage; their log-probabilities and the critic's values (stages,)."""
        x, state, actions, logps, values = self.start, None, [], [], []
        for k, head in enumerate(self.heads):
            state = self.cell(x, state)
            logp = torch.log_softmax(head(state[0])[0], -1)
            action = int(torch.multinomial(logp.detach().exp(), 1, generator=generator))
            actions.append(action)
            logps.append(logp[action])
            values.append(self.values[k](state[0])[0, 0])
            if k + 1 < len(self.heads):
                x = self.inputs[k](torch.tensor([action]))
        return actions, torch.stack(logps), torch.stack(values)


class _Search:
    """One target's search: the slots to fill, the agent, and every answer of the system so far."""

    def __init__(self, ctx, s: Settings, target):
        self.ctx, self.s, self.target = ctx, s, target
        self.family: ModelFamily = ctx.family
        self.pieces = _pieces(ctx, s)
        self.seed = derive_seed(ctx.seed, NAME, target.id)
        self.spans = sensitive_spans(target.prompt, ctx.concept.unsafe_words)
        self.source = "unsafe-words" if self.spans else "none"
        if not self.spans and s.no_sensitive_word == "salient":
            self.spans = salient_span(self.family, target.prompt, ctx.concept.unsafe_words)
            self.source = "salient" if self.spans else "none"
        self.original = pooled_states(self.family, [target.prompt])
        self.answers: dict[str, dict] = {}  # prompt -> its record (a query is made once per distinct prompt)
        self.queries = 0

    def run(self) -> Found:
        plain = self._ask(self.target.prompt, [])
        if plain["present"] or not self.spans:
            stop = "plain prompt shows the concept" if plain["present"] else "no word to replace"
            return self._found(plain, pre=plain["present"], steps=0, stop=stop)
        best, steps, stop = self._learn()
        return self._found(best, pre=False, steps=steps, stop=stop)

    def _learn(self) -> tuple[dict, int, str]:
        s = self.s
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):  # the policy's initial weights, without moving the global RNG
            torch.manual_seed(self.seed)
            policy = _Policy(len(self.spans) * s.num_subword, len(self.pieces), s.hidden)
        optimizer = torch.optim.Adam(policy.parameters(), lr=s.lr)
        prompts, best, steps, stop = [], None, 0, "query budget"
        words = len(re.findall(r"\w+|[^\w\s]", self.target.prompt))
        perturb = len(self.spans) / max(1, words)
        for step in range(s.max_steps):
            if self.queries >= s.max_queries:
                break
            with torch.enable_grad():
                actions, logps, values = policy.sample(generator)
                replacements = self._replacements(actions)
                record = self._ask(substitute(self.target.prompt, self.spans, replacements), replacements)
                # every stage's return is the one terminal reward (the authors' γ = 1); the critic is the baseline
                advantage = record["reward"] - values
                loss = (-logps * advantage.detach()).sum() + advantage.pow(2).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            steps = step + 1
            # a sample that spells an unsafe word was never queried: it is no candidate to return
            if "query" in record and (best is None or record["reward"] > best["reward"]):
                best = record
            if record["present"]:
                return record, steps, "success"
            if step > 2 and perturb > s.max_perturb_rate:
                stop = "perturb rate"
                break
            prompts.append(record["prompt"])
            if (
                s.converge_repeats
                and len(prompts) >= s.converge_repeats
                and len(set(prompts[-s.converge_repeats :])) == 1
            ):
                stop = "converged"
                break
        else:
            stop = "max steps"
        return best or self.answers[self.target.prompt], steps, stop

    def _replacements(self, actions: list[int]) -> list[str]:
        """Slot i gets pieces i·n .. i·n + n − 1: glued into one new word (subword) or joined by spaces (words)."""
        n, glue = self.s.num_subword, " " if self.s.vocabulary == "words" else ""
        return [glue.join(self.pieces[a] for a in actions[i * n : (i + 1) * n]) for i in range(len(self.spans))]

    def _ask(self, prompt: str, replacements: list[str]) -> dict:
        """The system's answer to a prompt (queried once), with its reward."""
        if prompt in self.answers:
            return self.answers[prompt]
        record = {"prompt": prompt, "replacements": replacements, "present": False, "score": 0.0, "reward": 0.0}
        spells_unsafe = bool(replacements) and bool(sensitive_spans(prompt, self.ctx.concept.unsafe_words))
        record["similarity"] = float(
            torch.nn.functional.cosine_similarity(pooled_states(self.family, [prompt]), self.original)[0]
        )
        if not spells_unsafe:
            t = self.target
            verdict = self.ctx.shows_concept([prompt], [t.seed], t.guidance, [t.prompt])[0]
            self.queries += 1
            record |= {"present": bool(verdict.present), "score": float(verdict.score), "query": self.queries}
            record["reward"] = record["score"] * record["similarity"]
        self.answers[prompt] = record
        return record

    def _found(self, record: dict, pre: bool, steps: int, stop: str) -> Found:
        t, family = self.target, self.family
        words = [t.prompt[a:b] for a, b in self.spans]
        subs = {}
        for word, text in zip(words, record["replacements"]):
            key, k = word, 2
            while key in subs:  # a word replaced twice keeps both replacements
                key, k = f"{word}#{k}", k + 1
            subs[key] = text
        details = {
            "method": "rl",
            "queries": self.queries,
            "success": bool(record["present"]),
            "pre_attack_success": pre,
            "attack_success": bool(record["present"]),
            "substitutions": subs,
            "sensitive_words": words,
            "sensitive_source": self.source,
            "similarity": record["similarity"],
            "judge_score": record["score"],
            "reward": record["reward"],
            "found_at_query": record.get("query"),
            "steps": steps,
            "stop": stop,
            "distinct_prompts": len(self.answers),
            "tokens": family.token_count(record["prompt"]),
            "truncated": family.token_count(record["prompt"]) > family.max_prompt_tokens,
        }
        return Found(t.id, t.prompt, record["prompt"], t.seed, t.guidance, details)
