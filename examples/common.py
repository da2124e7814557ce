"""Command-line options every example shares: the model, the run directory and the budget.

The defaults run each example on the embedded SmolLM2-135M-Instruct in a few minutes on a laptop
CPU; the tests run them on a tiny random model with `--steps 2`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def options(description: str, name: str, steps: int, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, hub id or model directory")
    parser.add_argument("--output-dir", default=f"runs/examples/{name}", help="where the run writes")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps to train")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest sampled answer")
    return parser.parse_args(argv)


def quiet_training(steps: int) -> dict:
    """The `train` section the examples share: a fixed step budget, no tracker folders."""
    return {"max_steps": steps, "trackers": []}
