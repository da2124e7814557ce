"""Statistics over the masked elements of a batch (response tokens, not padding).

A statistic whose batch is split over processes takes ``reduce``: a function that sums a tensor
over the processes holding the batch's parts, so the mean or variance is the whole batch's (the
engine's ``sum_across_processes``). With the default, the batch is this process's alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def this_process_only(values: torch.Tensor) -> torch.Tensor:
    """The reduce of a statistic held by one process: nothing to add."""
    return values


def masked_mean(values: torch.Tensor, mask: torch.Tensor, reduce: Reduce = this_process_only) -> torch.Tensor:
    """Σ v·m / Σ m over all elements (0 when the mask is empty)."""
    # At least float32: the token count must stay exact when the values are half precision.
    dtype = torch.promote_types(values.dtype, torch.float32)
    sums = reduce(torch.stack([(values * mask).sum().to(dtype), mask.sum().to(dtype)]))
    return sums[0] / sums[1].clamp(min=1)


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Reduce = this_process_only,
) -> torch.Tensor:
    """(v − μ)/σ over masked elements (σ the population std); with shift_mean=False the mean is added back.

    Padding positions come back as 0.
    """
    mean = masked_mean(values, mask, reduce)
    variance = masked_mean((values - mean) ** 2, mask, reduce)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask
