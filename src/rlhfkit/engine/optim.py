"""AdamW's parameter groups, the learning-rate schedule, and how many steps a run takes."""

from __future__ import annotations

import math

import torch

from rlhfkit.config import TrainSettings


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D parameters). An empty group (e.g. LoRA's,
    all matrices) is left out: DeepSpeed drops empty groups, and a checkpoint's groups must match."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Linear warmup from 0 to 1 over warmup_steps, then cosine/linear decay to 0, or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_then_decay(
    optimizer: torch.optim.Optimizer, train: TrainSettings, schedule_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """train.scheduler over schedule_steps optimizer steps, after train.warmup_ratio of them warm up."""
    warmup = round(train.warmup_ratio * schedule_steps)
    kind = train.scheduler
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, schedule_steps, warmup, kind))


def steps_for(num_batches: int, train: TrainSettings) -> int:
    """Optimizer steps for the configured epochs (or max_steps)."""
    if train.max_steps is not None:
        return train.max_steps
    return train.epochs * math.ceil(num_batches / train.grad_accum)
