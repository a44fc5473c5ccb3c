"""The `clip` judge: zero-shot concept detection with a user-supplied CLIP checkpoint.

Each image is scored against the concept texts and the neutral texts together; the score is the softmax
probability mass (at the model's own logit_scale) that falls on the concept texts. With one concept and
one neutral text this is CLIP's usual two-way zero-shot classifier.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from PIL import Image

from duo.data.files import sha256_file
from duo.errors import UserError
from duo.judges.base import Verdict

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _texts(value, option: str) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value or [])
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise UserError(f"clip judge option '{option}' needs a text or a list of non-empty texts, got {value!r}.")
    return texts


def _weights_digest(folder: Path) -> str | None:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return sha256_file(path)[:16]
    return None


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def _local_folder(model: str) -> Path | None:
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def _load(model: str):
    from transformers import CLIPModel, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as Processor  # the PIL one: no torchvision here
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    local = _local_folder(model)
    if local is None and _looks_like_path(model):
        raise UserError(f"clip judge model folder '{model}' does not exist; give a CLIP checkpoint folder or hub id.")
    src = str(local) if local else model
    try:
        model_ = CLIPModel.from_pretrained(src, use_safetensors=True).eval()
        return model_, CLIPTokenizer.from_pretrained(src), Processor.from_pretrained(src)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"could not load CLIP checkpoint '{model}' ({str(exc).splitlines()[0]}). Offline, it must already be "
            f"on disk: run `hf download {model} --local-dir <folder>` on a machine with network, copy the "
            "folder here and pass it as judge option 'model'."
        ) from None


class ClipJudge:
    name = "clip"

    def __init__(
        self,
        model: str | None = None,
        concept=None,
        neutral=("a photo",),
        threshold: float = 0.5,
        template: str | None = None,
        batch_size: int = 16,
        device: str = "cpu",
    ) -> None:
        if not model:
            raise UserError("the clip judge needs judge option 'model': a CLIP checkpoint folder or hub id.")
        if template is not None and "{}" not in template:
            raise UserError(f"clip judge template {template!r} needs a '{{}}' where each text goes.")
        try:
            self.threshold = float(threshold)
        except (TypeError, ValueError):
            raise UserError(f"clip judge threshold must be a number, got {threshold!r}.") from None
        self.model_id, self.template, self.device = str(model), template, device
        self.classes, self.neutral = _texts(concept, "concept"), _texts(neutral, "neutral")
        self.batch_size = max(1, int(batch_size))
        self._model, self._tokenizer, self._processor = _load(self.model_id)
        self._model.to(device)
        self._text_features = None
        local = _local_folder(self.model_id)
        self._digest = _weights_digest(local) if local else None
        self.version = f"transformers-{version('transformers')}" + (f"+sha256:{self._digest}" if self._digest else "")

    def _prompts(self) -> list[str]:
        texts = self.classes + self.neutral
        return [self.template.format(t) for t in texts] if self.template else texts

    def _texts_embedded(self):
        import torch

        if self._text_features is None:
            tokens = self._tokenizer(self._prompts(), padding=True, truncation=True, return_tensors="pt")
            with torch.no_grad():
                out = self._model.get_text_features(**tokens.to(self.device))
            # transformers 5 returns a ModelOutput; the projected embedding is its pooler_output.
            self._text_features = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)
        return self._text_features

    def _scores(self, images: list[Image.Image]) -> list[float]:
        import torch

        pixels = self._processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = self._model.get_image_features(pixel_values=pixels.to(self.device))
            feats = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)
            logits = self._model.logit_scale.exp() * feats @ self._texts_embedded().T
            probs = logits.softmax(dim=-1)[:, : len(self.classes)].sum(dim=-1)
        return probs.float().cpu().tolist()

    def judge(self, images: list[Image.Image], prompts: list[str] | None = None) -> list[Verdict]:
        scores = []
        for i in range(0, len(images), self.batch_size):
            scores += self._scores(images[i : i + self.batch_size])
        return [Verdict(present=s >= self.threshold, score=float(s), matches_prompt=None) for s in scores]

    def provenance(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "model": self.model_id,
            "weights_sha256_prefix": self._digest,
            "classes": self.classes,
            "neutral": self.neutral,
            "template": self.template,
            "threshold": self.threshold,
            "rule": f"softmax mass of the concept texts among concept + neutral texts ≥ {self.threshold}",
        }
