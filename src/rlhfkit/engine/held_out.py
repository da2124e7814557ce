"""Passes over held-out batches split across the launch's processes (evaluation, DPO's reference table)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from rlhfkit.engine.engine import Engine
from rlhfkit.models import eval_mode


def held_out_share(engine: Engine, batches: Sequence) -> Iterator[tuple[object, bool]]:
    """This process's part of a pass over held-out batches, on its device: batch i goes to
    process i mod N. Every process makes the same number of passes, as FSDP's gathers need:
    one left short repeats batch 0 with counted=False, and must ignore what it computes."""
    share = list(batches[engine.accelerator.process_index :: engine.num_processes])
    for index in range(math.ceil(len(batches) / engine.num_processes)):
        counted = index < len(share)
        yield (share[index] if counted else batches[0]).to(engine.device), counted


@torch.no_grad()  # not inference_mode: FSDP gathers weights into buffers it reuses in training
def held_out_sums(engine: Engine, batches: Sequence, sums_of: Callable[[object], dict[str, float]]) -> dict[str, float]:
    """Σ over held-out batches of sums_of(batch) (a metric's per-batch sums), the batches split
    over the launch's processes (held_out_share) and the totals summed over them; the model
    is in eval mode meanwhile (no dropout), and back in its own mode after."""
    totals: dict[str, float] = {}
    with eval_mode(engine.model):
        for batch, counted in held_out_share(engine, batches):
            for name, value in sums_of(batch).items():
                totals[name] = totals.get(name, 0.0) + (value if counted else 0.0)
    if engine.num_processes == 1 or not totals:
        return totals
    names = sorted(totals)
    summed = engine.sum_across_processes(torch.tensor([totals[name] for name in names], dtype=torch.float64)).tolist()
    return dict(zip(names, summed))


@torch.no_grad()
def held_out_rows(
    engine: Engine, batches: Sequence, rows_of: Callable[[object], torch.Tensor], width: int
) -> torch.Tensor:
    """Every held-out batch's rows_of(batch), an (n, width) float tensor, concatenated over the
    batches and the launch's processes (for metrics that need each value, such as AUC, rather
    than sums); order follows processes, not batches. Eval mode as in held_out_sums."""
    parts = []
    with eval_mode(engine.model):
        for batch, counted in held_out_share(engine, batches):
            rows = rows_of(batch).double().cpu()
            if counted:
                parts.append(rows)
    local = torch.cat(parts) if parts else torch.zeros(0, width, dtype=torch.float64)
    if engine.num_processes == 1:
        return local
    # processes hold different counts: pad each to the largest with NaN rows, gather, drop them
    counts = torch.zeros(engine.num_processes, dtype=torch.float64)
    counts[engine.accelerator.process_index] = local.shape[0]
    counts = engine.sum_across_processes(counts)
    padded = torch.full((int(counts.max()), width), math.nan, dtype=torch.float64)
    padded[: local.shape[0]] = local
    gathered = engine.gather(padded)
    return gathered[~torch.isnan(gathered).all(dim=1)]
