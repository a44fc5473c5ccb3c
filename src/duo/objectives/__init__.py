"""Pure objectives: no I/O, no pipelines, nothing of ours imported."""

from duo.objectives.baselines import advunlearn_loss, esd_loss, esd_target, uce_edit
from duo.objectives.duo_loss import (
    DuoLossParts,
    coupled_hparams,
    duo_loss,
    per_sample_mse,
    preference_deltas,
    preference_loss,
)

__all__ = [
    "DuoLossParts",
    "advunlearn_loss",
    "coupled_hparams",
    "duo_loss",
    "per_sample_mse",
    "preference_deltas",
    "preference_loss",
    "esd_loss",
    "esd_target",
    "uce_edit",
]
