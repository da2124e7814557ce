"""Metrics: RUN/metrics.jsonl (one record per logged step) and the trackers accelerate drives
(TensorBoard in RUN/logs, Weights & Biases, MLflow)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from rlhfkit.engine.run_dir import METRICS_LOG
from rlhfkit.files import json_text, write_text_atomically


def available_trackers(requested: list[str]) -> list[str]:
    """The requested trackers that are installed; a missing one is skipped with a warning."""
    available = []
    for tracker in requested:
        if tracker == "tensorboard" or importlib.util.find_spec(tracker) is not None:
            available.append(tracker)
        else:
            print(f"warning: tracker {tracker!r} requested but not installed (pip install {tracker}); skipping it")
    return available


def start_trackers(accelerator: Any, project: str, root: Path, stage: str) -> None:
    """TensorBoard writes to RUN/logs/PROJECT; W&B and MLflow file the run under the project,
    named after its directory (e.g. "quickstart/ppo"), with the resolved config attached."""
    name = f"{root.parent.name}/{root.name}"
    init_kwargs = {"wandb": {"name": name, "dir": str(root), "config": {"stage": stage}}, "mlflow": {"run_name": name}}
    accelerator.init_trackers(project, config=flat_config(root), init_kwargs=init_kwargs)


def append_metrics(root: Path, step: int, metrics: dict[str, float]) -> None:
    with (root / METRICS_LOG).open("a", encoding="utf-8") as out:
        out.write(json_text({"step": step, **metrics}) + "\n")


def truncate_metrics_log(root: Path, step: int) -> None:
    """After a resume, drop records of steps the resumed run will redo."""
    path = root / METRICS_LOG
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if logged_step(line) <= step]
        write_text_atomically(path, "".join(line + "\n" for line in kept))


def flat_config(root: Path) -> dict[str, str | int | float | bool]:
    """The run's resolved config as flat `section.field` hyperparameters, for the trackers."""
    import yaml

    flat: dict[str, str | int | float | bool] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (str, int, float, bool)) else str(value)

    walk(yaml.safe_load((root / "config.yaml").read_text()) or {}, "")
    return flat


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl record; inf for a line a crash cut short (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
