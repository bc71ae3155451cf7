"""The training loop and what it writes: metrics, summaries, checkpoints."""

from secondorder.trainer.settings import TargetSettings, TrainerSettings
from secondorder.trainer.trainer import Trainer

__all__ = ["TargetSettings", "Trainer", "TrainerSettings"]
