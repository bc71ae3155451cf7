"""The training loop and what it writes: metrics, summaries, checkpoints."""

from secondorder.trainer.parts import DataFeed, RunOutput, RunParts
from secondorder.trainer.settings import TargetSettings, TrainerSettings
from secondorder.trainer.trainer import Trainer

__all__ = ["DataFeed", "RunOutput", "RunParts", "TargetSettings", "Trainer", "TrainerSettings"]
