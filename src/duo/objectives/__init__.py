"""Pure objectives: no I/O, no pipelines, nothing of ours imported."""

from duo.objectives.duo_loss import DuoLossParts, coupled_hparams, duo_loss, per_sample_mse, preference_loss

__all__ = ["DuoLossParts", "coupled_hparams", "duo_loss", "per_sample_mse", "preference_loss"]
