"""What a stage measures before and after training, and the answers it shows side by side."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rlhfkit.engine import Engine
from rlhfkit.metrics import describe, write_answers_before_after


def measure(engine: Engine, metrics: dict, when: str, evaluate: Callable[[], dict] | None) -> None:
    """Held-out metrics of the model now, stored as metrics[when] and printed.

    "before" is measured once per run and written at once, so a resumed run keeps it.
    """
    if evaluate is None or (when == "before" and when in metrics):
        return
    with engine.whole_weights():
        metrics[when] = evaluate()
    if when == "before":
        engine.run.update_json("metrics.json", before=metrics["before"])
    print(f"{when}: {describe(metrics[when])}")


def write_samples(engine: Engine, prompt_turns: Sequence, metrics: dict, references: Sequence[str | None]) -> None:
    """samples.md: each held-out prompt with the answers before and after (and the reference), main process only."""
    if engine.is_main:
        write_answers_before_after(engine.run.root, prompt_turns, metrics, references)
