"""Training sparse dictionaries: the loop, its schedule, initialisation, bookkeeping, checkpoints and DDP."""

from lmscope.training.schedule import Schedule
from lmscope.training.trainer import BatchSource, RunSpec, TensorSource, TrainConfig, Trainer, default_lr

__all__ = ["BatchSource", "RunSpec", "Schedule", "TensorSource", "TrainConfig", "Trainer", "default_lr"]
