"""Training: one model-agnostic trainer, Orbax checkpoints, run observability, experiments.

    from jaxtok.train import Trainer, TrainTask, OptimizerConfig, fit, lm_task
    from jaxtok.train import configs, pretrain      # experiment presets and the `jaxtok pretrain` job

``configs`` and ``pretrain`` are submodules (imported on use); the names below are the trainer's
public API.
"""

from .checkpoint import Checkpointer, CheckpointError, CorruptCheckpointError, Restored, fingerprint
from .observe import RunObserver, plot_metrics, read_metrics
from .trainer import (
    LoopConfig,
    OptimizerConfig,
    Trainer,
    TrainingDiverged,
    TrainState,
    TrainTask,
    fit,
    lm_objective,
    lm_task,
    lr_schedule,
    make_optimizer,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "CorruptCheckpointError",
    "LoopConfig",
    "OptimizerConfig",
    "Restored",
    "RunObserver",
    "TrainState",
    "TrainTask",
    "Trainer",
    "TrainingDiverged",
    "fingerprint",
    "fit",
    "lm_objective",
    "lm_task",
    "lr_schedule",
    "make_optimizer",
    "plot_metrics",
    "read_metrics",
]
