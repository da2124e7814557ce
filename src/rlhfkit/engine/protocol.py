"""What a stage hands the engine (batches, a loss function's output) and where training stands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Batch(Protocol):
    @property
    def loss_units(self) -> int:
        """How many units (target tokens, pairs) the batch's summed loss runs over."""

    def to(self, device: torch.device) -> Batch: ...


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: the loss summed over the batch's loss units
    metrics: dict[str, float]  # extra per-batch sums to log, averaged over the step's loss units


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    group_in_epoch: int = 0  # accumulation groups (optimizer steps) done in this epoch
