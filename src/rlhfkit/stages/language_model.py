"""The language-model loss and held-out perplexity that the pretrain and SFT stages hand the engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rlhfkit.data.batching import LMBatch
from rlhfkit.engine import Engine, LossOutput
from rlhfkit.engine.held_out import held_out_sums
from rlhfkit.passes import lm_nll_sum, perplexity_from_sums


def lm_loss(chunk_size: int):
    """A loss function for Engine.fit: summed token NLL of an LMBatch."""

    def loss_fn(model: torch.nn.Module, batch: LMBatch) -> LossOutput:
        return LossOutput(lm_nll_sum(model, batch, chunk_size), metrics={})

    return loss_fn


def perplexity_evaluator(
    engine: Engine, batches: Sequence[LMBatch], chunk_size: int
) -> Callable[[], dict[str, float]] | None:
    """A no-argument held-out evaluation of the engine's model for Engine.fit (the batches split
    over the launch's processes), or None when there is no held-out data."""
    if not batches:
        return None

    def evaluate() -> dict[str, float]:
        sums_of = lambda batch: {
            "nll": lm_nll_sum(engine.model, batch, chunk_size).item(),
            "tokens": batch.num_target_tokens,
        }  # noqa: E731
        sums = held_out_sums(engine, batches, sums_of)
        return perplexity_from_sums(sums["nll"], int(sums["tokens"]))

    return evaluate
