"""Training: ``python -m pfp.train pretrain|finetune`` (see :mod:`pfp.train.loop`)."""
from .checkpoint import load_checkpoint, save_checkpoint
from .loop import MODES, TrainArgs, apply_lora, export_weights, merge_lora, step_generator, train
from .objectives import ObjectiveConfig, finetune_loss, pretrain_loss, random_omega, shifted_logit_normal

__all__ = ["TrainArgs", "train", "MODES", "apply_lora", "merge_lora", "export_weights", "step_generator",
           "save_checkpoint", "load_checkpoint", "ObjectiveConfig", "pretrain_loss", "finetune_loss",
           "random_omega", "shifted_logit_normal"]
