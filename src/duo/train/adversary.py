"""The inner attack of adversarial DUO (`duo train --adversarial`): token vectors that bring the concept back.

Every `adv_every` optimizer steps, `adv_steps` Adam steps move a few placeholder-token vectors (through the frozen
text encoder) to minimise the denoising loss of the model being trained — LoRA on — on the pairs' unsafe images:
Concept Inversion's objective, run against the current LoRA instead of the finished one. The vectors and their
Adam state carry over from round to round (a persistent adversary: each round starts where the last one ended,
so a few steps a round keep up with the LoRA). Between rounds, the prompts with the vectors in them are encoded
once; DuoMethod adds each pair once more under them (the same x⁻_t, x⁺_t, a second preference term weighted
`adv_weight`), so the preference for the safe image is also learned under the conditioning that brings the
concept back, while the plain term keeps its full weight.

With the LoRA on the text encoder (`--lora-on text-encoder`) the policy the attack runs against is the frozen UNet
reading the encoder with its LoRA on (`family.encode_ids` calls the module the LoRA is attached to), and the
adversarial rows cannot be encoded once per round: DuoMethod encodes them every step through the LoRA, with the
vectors in place (`vectors_in_place`); `emb` is then the original encoder's reading, the reference's.

With `--adv-init fresh` each round instead restarts from random vocabulary rows with a new Adam (what a new
attacker would do), so the LoRA cannot just outrun one token's trajectory; rounds then need more steps.

Placement (`--adversarial`):
- `concept-inversion`: the vectors replace each concept word of the pair's unsafe prompt (as the attack does);
- `soft-prompt`: the vectors come before the unsafe prompt with its concept words deleted (as the attack does);
- `unlearndiff`: a prefix before the whole unsafe prompt, made of real tokens as UnlearnDiffAtk's is: the forward
  pass uses each vector's nearest vocabulary token (cosine), and the gradient passes straight through to the
  vector (PEZ's relaxation; the published attack's simplex relaxation needs far more steps than a round has).

Several placements joined with '+' (`soft-prompt+unlearndiff`) are several adversaries, each with its own
placeholder tokens and vectors; their rounds take turns (round k refreshes adversary k mod n, so the inner attack
costs what one does; `--adv-rounds all` refreshes each every round instead) and every pair is trained under each
one's current prompt (`--adv-pairs split`: under one's, slot k of the run's sequence under adversary k mod n, so the
adversarial rows cost what one adversary's do; their term is weighted n to keep `all`'s expected loss).

The whole state is a function of (seed, step): each round draws from its own generator seeded by the round's
step, and the vectors and Adam moments are checkpointed with the LoRA, so `--resume` continues exactly.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

from duo.data.concepts import token_prompt
from duo.data.pairs import PairSet
from duo.models.lora import adapters_disabled
from duo.models.token_slots import TokenSlots, project, random_vocabulary_vectors, token_weight, word_vectors
from duo.objectives import per_sample_mse

INIT_WORD = "a"  # not a concept word: the vectors must find the concept, not start from it
SALT = 7_777_777  # separates the inner attack's draws from the training draws of the same step


def adversarial_texts(kind: str, prompts: list[str], unsafe_words: list[str], slots_text: str) -> list[str]:
    """Each prompt with the trainable tokens placed as `kind` places them."""
    if kind == "concept-inversion":
        return [token_prompt(p, unsafe_words, slots_text) for p in prompts]
    if kind == "soft-prompt":
        stripped = [re.sub(r"\s+", " ", token_prompt(p, unsafe_words, "")).strip() for p in prompts]
        return [f"{slots_text} {s}".strip() for s in stripped]
    if kind == "unlearndiff":
        return [f"{slots_text} {p}" for p in prompts]
    raise ValueError(f"unknown adversary {kind!r}")


class Adversary:
    """Persistent token vectors learned against the policy; `emb` conditions the adversarial preference pairs."""

    def __init__(self, cfg, family, pairs: PairSet, mean, std, device, kind: str, number: int = 0):
        """`kind`: one of the placements below; `number`: this adversary's place among several (`a+b`), which
        gives it its own placeholder tokens and its own draws."""
        self.cfg, self.family, self.device, self.kind, self.number = cfg, family, device, kind, number
        self.mean, self.std = mean, std  # (N, C, H, W): the unsafe images' latent distributions
        self.slots = TokenSlots(family, cfg.adv_vectors, first=number * cfg.adv_vectors)
        texts = adversarial_texts(kind, pairs.unsafe_prompts, pairs.concept.unsafe_words, self.slots.text)
        self.texts = texts
        self.ids = family.tokenize(texts).to(device)
        self.vectors = torch.nn.Parameter(word_vectors(family, INIT_WORD, cfg.adv_vectors).to(device))
        self.optimizer = torch.optim.Adam([self.vectors], lr=cfg.adv_lr)
        self.discrete = kind == "unlearndiff"
        self.candidates = family.regular_token_ids() if self.discrete else None
        # the tables are final once the slots exist: read them side by side once, not at every inner step
        self.token_weight = token_weight(family).detach() if self.discrete else None
        self.last_loss = torch.zeros(())
        self.emb = self._encode()

    def due(self, step: int, of: int = 1) -> bool:
        """A round every adv_every steps; with `of` adversaries their rounds take turns (the cost of one), unless
        --adv-rounds all refreshes every adversary each round."""
        if step % self.cfg.adv_every:
            return False
        return self.cfg.adv_rounds == "all" or (step // self.cfg.adv_every) % of == self.number

    def refresh(self, policy: torch.nn.Module, step: int) -> None:
        """One round: adv_steps Adam steps on the vectors against `policy` (gradients reach the vectors only)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step + SALT * (1 + self.number))
        if self.cfg.adv_init == "fresh":
            self._restart(g)
        with self.slots.hooked(), torch.enable_grad():
            for _ in range(self.cfg.adv_steps):
                self.slots.vectors = self.used_vectors()
                loss = self._loss(policy, g)
                (grad,) = torch.autograd.grad(loss, [self.vectors])
                self.vectors.grad = grad
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach().cpu()
        self.emb = self._encode()

    def used_vectors(self) -> torch.Tensor:
        """What the text encoder sees: the vectors, or (unlearndiff) their nearest tokens' rows with the
        vectors' gradient (straight-through)."""
        if not self.discrete:
            return self.vectors
        _, rows = project(self.vectors, self.candidates, self.token_weight)
        return self.vectors + (rows.to(self.vectors) - self.vectors).detach()

    def prefix_ids(self) -> list[int]:
        """The tokens of an unlearndiff prefix as it stands (for logs and tests)."""
        return project(self.vectors, self.candidates, self.token_weight)[0].tolist()

    def _restart(self, g: torch.Generator) -> None:
        """Random vocabulary rows as the new start, and a new Adam: no memory of earlier rounds."""
        with torch.no_grad():
            self.vectors.copy_(random_vocabulary_vectors(self.family, self.cfg.adv_vectors, g).to(self.device))
        self.optimizer = torch.optim.Adam([self.vectors], lr=self.cfg.adv_lr)

    def _loss(self, policy: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        fam, n = self.family, self.cfg.adv_batch
        idx = torch.randint(len(self.ids), (n,), generator=g)
        t = torch.randint(0, fam.num_train_timesteps, (n,), generator=g)
        latent_noise = torch.randn((n, *self.mean.shape[1:]), generator=g)
        noise = torch.randn((n, *self.mean.shape[1:]), generator=g)
        idx, t, latent_noise, noise = (x.to(self.device) for x in (idx, t, latent_noise, noise))
        x0 = fam.latents_from_distribution(self.mean[idx], self.std[idx], latent_noise)
        pred = fam.denoise(policy, fam.add_noise(x0, noise, t), t, fam.encode_ids(self.ids[idx]))
        return per_sample_mse(pred, fam.training_target(x0, noise, t)).mean()

    @contextmanager
    def vectors_in_place(self):
        """Prompts with the placeholders encode with the current vectors while this is active (their gradient
        stops here: the outer loss trains the LoRA, the inner attack alone moves the vectors)."""
        with self.slots.hooked():
            self.slots.vectors = self.used_vectors().detach()
            yield

    @torch.no_grad()
    def _encode(self, chunk: int = 64) -> torch.Tensor:
        """(N, L, D) conditioning of every pair's adversarial prompt with the current vectors, read by the original
        text encoder: a LoRA on it (--lora-on text-encoder) is off, so this is the reference's conditioning."""
        with self.vectors_in_place(), adapters_disabled(self.family.text_encoders[0]):
            parts = [self.family.encode_ids(self.ids[i : i + chunk]) for i in range(0, len(self.ids), chunk)]
        return torch.cat(parts).detach()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Vectors and Adam moments as flat tensors (what a checkpoint stores)."""
        state = self.optimizer.state.get(self.vectors, {})
        out = {"vectors": self.vectors.detach().clone(), "last_loss": self.last_loss.clone()}
        out.update({f"adam.{k}": torch.as_tensor(v).detach().clone() for k, v in state.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.vectors.copy_(state["vectors"].to(self.vectors.device))
        self.last_loss = state["last_loss"].clone()
        moments = {k.removeprefix("adam."): v.to(self.device) for k, v in state.items() if k.startswith("adam.")}
        if moments:
            moments["step"] = moments["step"].cpu()  # Adam keeps its step count on the CPU
            self.optimizer.state[self.vectors] = moments
        self.emb = self._encode()
