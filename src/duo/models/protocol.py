"""`ModelFamily`: everything the stages above `models` may ask of a model family, and nothing more.

Training, generation, baselines and attacks talk to a family only through these members; tokenizers, text
encoders, schedulers and BPE conventions (such as CLIP's `</w>` end-of-word suffix) stay inside the adapter.
`StableDiffusionFamily` (SD 1.x/2.x, sd.py), `StableDiffusionXLFamily` (sdxl.py), `StableDiffusion3Family`
(sd3.py) and `FluxFamily` (flux.py) implement it; `family.FAMILIES` maps a pipeline class to its adapter.
A new family also brings a tiny random pipeline builder (tiny_*.py) and a tests/test_family_*.py.

Conditioning is always one tensor: families with a pooled embedding append it as a row (packed.py). Flow
families keep the integer-timestep interface by indexing their σ table in ascending noise (flow.py).

How a family with two text encoders (SDXL: CLIP ViT-L and OpenCLIP ViT-bigG) satisfies the token API:
its two CLIP tokenizers share one BPE vocabulary, so `vocabulary`, `tokenize`, `prompt_ids`, `whole_word_ids`
and `text_token_ids` keep one id space (ids in the first tokenizer's layout; `encode_ids` re-pads them for
the second, whose pad token differs, and joins both encoders' states as SDXL's UNet expects).
`add_placeholder_tokens` adds each name to both tokenizers, so it gets the same id in both, and grows both
tables; `token_embeddings` returns the two tables (768 and 1280 wide), and an attack that learns token
vectors learns one per table (`duo.models.token_slots`: the tables' rows side by side, (n, 768 + 1280)). Its
textual-inversion files hold one tensor per encoder. Families whose encoders do not share a vocabulary (SD3,
FLUX: CLIP + T5) search prompts in the CLIP vocabulary and re-tokenize the decoded text for T5 inside
`encode_ids`, so learned token vectors act on the CLIP tables only.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from PIL import Image


@runtime_checkable
class ModelFamily(Protocol):
    ref: str  # the model as the user named it (hub id, folder or alias): for messages and provenance
    device: str  # where the family's modules run; tensors it returns live there unless said otherwise
    dtype: torch.dtype  # weight dtype of the denoiser; inputs are cast to it inside `denoise`

    # ---- properties ------------------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser that LoRAs attach to and the trainer optimises."""
        ...

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """The text encoders, in encoder order: where a text-side LoRA attaches (AdvUnlearn trains the first)."""
        ...

    @property
    def native_resolution(self) -> int:
        """Image side in pixels the model was trained at: the default for generation and training."""
        ...

    @property
    def num_train_timesteps(self) -> int:
        """Length of the training noise schedule; timesteps are integers in [0, this)."""
        ...

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts ('epsilon', 'v_prediction', ...); `training_target` follows it."""
        ...

    # ---- training maths ------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Conditioning for `denoise` of each prompt (no gradient): what training and the baselines feed the UNet."""
        ...

    def encode_images(self, images: list[Image.Image], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent distribution (mean, std) of each image on the CPU, cached once so every step samples afresh."""
        ...

    def latents_from_distribution(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A scaled latent x₀ drawn from `encode_images`' distribution with the caller's noise (RNG stays theirs)."""
        ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t of the family's forward process at integer timesteps t."""
        ...

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What `denoise` should output for x_t = add_noise(x0, noise, t): the regression target of every loss."""
        ...

    def preference_timesteps(self, strength: float) -> tuple[int, int]:
        """[lo, hi) timesteps that image-to-image at `strength` passes through: where DUO's preference term acts."""
        ...

    def keep_timestep(self) -> int:
        """The timestep of pure noise, at which the keep term compares the model with its original."""
        ...

    def denoise(self, unet: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """One denoiser prediction; `unet` is passed so that a wrapped (accelerate, LoRA) copy can be used."""
        ...

    def offload_encoders(self) -> None:
        """Free the accelerator of everything but the denoiser once encodings are cached (on a CPU: drop them)."""
        ...

    def lora_targets(self, method: str, module: str | None = None) -> str:
        """The layers a method trains, as a module-name pattern for PEFT: of the denoiser for 'duo', 'esd-x' and
        'esd-u', of the first text encoder for 'advunlearn' or whenever `module` is 'text_encoder' (DUO's
        --lora-on text-encoder)."""
        ...

    # ---- generation ----------------------------------------------------------------------------------------
    def text2image(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance: float,
        resolution: int | None = None,
        negative_prompts: list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        safe_guidance: dict | None = None,
    ) -> list[Image.Image]:
        """One image per (prompt, seed), each seed its own generator; loaded LoRAs and learned tokens apply."""
        ...

    def image2image(
        self,
        images: list[Image.Image],
        prompts: list[str],
        seeds: list[int],
        strength: float,
        steps: int,
        guidance: float,
        negative_prompts: list[str] | None = None,
    ) -> list[Image.Image]:
        """SDEdit of each image towards its prompt at `strength`: how DUO's preference pairs are made."""
        ...

    # ---- LoRA files ----------------------------------------------------------------------------------------
    def save_lora(self, folder: Path, state: dict[str, torch.Tensor]) -> None:
        """Write a trained LoRA in the format the family's own loader (and `load_loras`) reads.

        `state` holds PEFT LoRA weights of the denoiser, of a text encoder, or of both, keyed by module name as
        `duo.models.lora.get_lora_state` returns them; each goes with the component that has that module. The
        LoRA scale α/r of the adapter attached to that component is folded into the file, so loaders that assume
        α = r read the same update."""
        ...

    def load_loras(self, loras: list[tuple[str, float]]) -> None:
        """Load LoRA folders and combine them with their weights; an empty list loads nothing."""
        ...

    def loras_off(self) -> AbstractContextManager:
        """Inside the block the original model generates, without unloading the LoRAs."""
        ...

    def save_fused(self, folder: Path) -> None:
        """Bake the loaded LoRAs into the weights and save a standalone model folder."""
        ...

    # ---- baselines (ESD, UCE) ------------------------------------------------------------------------------
    def cross_attention_projections(self, with_keys: bool = True) -> list[tuple[str, torch.nn.Linear]]:
        """(name, layer) of every text-to-image projection: the matrices UCE edits in closed form."""
        ...

    def prompt_states(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Text states (N, L, D) and, per text, the position of its last word token: UCE's edit keys."""
        ...

    # ---- token level (attacks) -----------------------------------------------------------------------------
    @property
    def max_prompt_tokens(self) -> int:
        """Token positions of an encoded prompt, BOS and EOS included: the length `tokenize` pads to."""
        ...

    @property
    def token_embeddings(self) -> tuple[torch.nn.Embedding, ...]:
        """The input embedding table of each text encoder, in encoder order (looked up afresh: tables grow)."""
        ...

    def vocabulary(self) -> dict[str, int]:
        """Token string → id, added tokens included (a copy: changing it changes nothing)."""
        ...

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Padded, truncated ids (N, max_prompt_tokens) on `device`: exactly what generation encodes."""
        ...

    def text_token_ids(self, text: str) -> list[int]:
        """Ids of `text` without BOS, EOS or padding (a word may take several)."""
        ...

    def token_count(self, text: str) -> int:
        """Positions `text` takes in a prompt, BOS and EOS included, before any truncation."""
        ...

    def decode_ids(self, ids: list[int]) -> str:
        """Text of ids with special tokens dropped: what a found prompt is returned as."""
        ...

    def encode_ids(self, ids: torch.Tensor, encoder: torch.nn.Module | None = None) -> torch.Tensor:
        """Text-encoder states for ids from `tokenize`/`prompt_ids`; differentiable through the embedding tables.

        `encoder`: a wrapped (accelerate) copy of `text_encoders[0]` to call instead, as `denoise` takes `unet`."""
        ...

    def prompt_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, K) token ids laid out as `tokenize` lays out a prompt of those K tokens (BOS, tokens, EOS, padding)."""
        ...

    def add_placeholder_tokens(self, names: list[str]) -> list[int]:
        """Ids of new tokens (added once, tables grown, global RNG untouched so seeds keep their meaning)."""
        ...

    def whole_word_ids(self, exclude: Iterable[str] = (), min_length: int = 1) -> torch.Tensor:
        """Sorted ids of non-special tokens that are a whole alphabetic word of ≥ min_length letters, not in
        `exclude` (any case), and tokenize back to themselves alone: decoding them and tokenizing the text
        gives the same ids, so a searched token sequence survives being returned as a prompt."""
        ...

    def regular_token_ids(self) -> torch.Tensor:
        """Sorted ids of every token of the vocabulary except special and added tokens (BOS, EOS, padding,
        placeholders, learned tokens): the search space of attacks that use the whole vocabulary, as the
        published Ring-A-Bell and UnlearnDiffAtk do. Decoding such ids need not give text that tokenizes back
        to them (sub-word pieces merge); attacks that return text record what the text encodes to."""
        ...

    def save_textual_inversion(self, path: Path, token: str, vectors: torch.Tensor) -> None:
        """Write (n, Σ table widths) vectors for `token` in the format the family's textual-inversion loader reads."""
        ...

    def load_textual_inversion(self, path: Path, token: str, vectors: torch.Tensor | None = None) -> None:
        """Make prompts with `token` use the file's vectors (`vectors`: what `save_textual_inversion` wrote, if
        already in memory); a token loaded before has its rows overwritten; the global RNG is left as it was."""
        ...
