"""MOTAB distillation pipeline (models, monitor, rollout engine, trainer, CLI) on motab_kernels."""

__version__ = "0.1.0"
