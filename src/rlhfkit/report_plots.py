"""The report's plots: training curves, the held-out proxy-vs-judge curves of RL runs, and the
models' rewards and win rates, as PNG files (matplotlib's file-only Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

CURVES = [
    ("train/loss", "loss"),
    ("eval/perplexity", "held-out perplexity"),
    ("train/accuracy", "pair accuracy (train)"),
    ("train/label_accuracy", "label agreement (train)"),
    ("train/reward_mean", "reward"),
    ("train/kl", "KL to reference"),
    ("train/entropy", "entropy"),
    ("train/length", "length (tokens)"),
]


def finite_number(value: Any) -> float | None:
    return (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(rows: int, columns: int):
    """A figure of rows × columns panels (4.2 × 3.0 in each); returns (pyplot, figure, axes)."""
    plt = _pyplot()
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    return plt, figure, axes


def _over_steps(axis, label: str) -> None:
    axis.set_title(label, fontsize=10)
    axis.set_xlabel("step", fontsize=8)
    axis.grid(alpha=0.3)
    axis.tick_params(labelsize=8)


def _save(plt, figure, title: str, target: Path) -> bool:
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return True


def plot_curves(stage: str, records: list[dict], target: Path) -> bool:
    """One PNG with a panel per logged curve of a stage; False when nothing was logged."""
    panels = [(key, label) for key, label in CURVES if any(key in r for r in records)]
    if not panels:
        return False
    columns = min(3, len(panels))
    plt, figure, axes = _panels(math.ceil(len(panels) / columns), columns)
    for axis, (key, label) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in records if finite_number(r.get(key)) is not None]
        axis.plot(
            [p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None, color="#3b6ea8"
        )
        _over_steps(axis, label)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    return _save(plt, figure, f"{stage}: training curves", target)


def plot_held_out(stage: str, curve: list[dict], target: Path) -> bool:
    """The proxy-vs-gold picture of an RL run: its training reward and each held-out judge on the
    same held-out answers, over training steps (95% intervals), a panel each; False without judges."""
    judges = list(dict.fromkeys(name for point in curve for name in point.get("judges", {})))
    if not judges or len(curve) < 2:
        return False
    series = {"training reward": [(p["step"], p.get("reward_mean"), p.get("reward_stderr")) for p in curve]}
    for name in judges:
        judged = [(p["step"], p.get("judges", {}).get(name, {})) for p in curve]
        series[f"held-out judge {name}"] = [(step, j.get("mean"), j.get("stderr")) for step, j in judged]
    plt, figure, axes = _panels(1, len(series))
    for axis, (label, points) in zip(axes.flat, series.items()):
        points = [p for p in points if finite_number(p[1]) is not None]
        errors = [1.96 * (finite_number(p[2]) or 0.0) for p in points]
        color = "#3b6ea8" if label == "training reward" else "#c0783c"
        axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=errors, marker="o", capsize=3, color=color)
        _over_steps(axis, label)
    return _save(plt, figure, f"{stage}: held-out answers scored by the training reward and by judges", target)


def plot_comparison(summary: dict, target: Path) -> bool:
    """Bar charts of reward and win rate per model (95% intervals); False without reward scores."""
    models = summary.get("models", {})
    order = [
        name
        for name in summary.get("order", list(models))
        if finite_number(models[name].get("reward_mean")) is not None
    ]
    if not order:
        return False
    plt = _pyplot()

    figure, (reward_axis, win_axis) = plt.subplots(1, 2, figsize=(9, 3.2))
    means = [models[n]["reward_mean"] for n in order]
    errors = [1.96 * (finite_number(models[n].get("reward_stderr")) or 0.0) for n in order]
    reward_axis.bar(order, means, yerr=errors, capsize=4, color="#3b6ea8")
    reward_axis.set_title("mean reward-model score (95% CI)", fontsize=10)
    challengers = [n for n in order if finite_number(models[n].get("win_rate")) is not None]
    rates = [models[n]["win_rate"] for n in challengers]
    low = [models[n]["win_rate"] - models[n]["win_rate_low"] for n in challengers]
    high = [models[n]["win_rate_high"] - models[n]["win_rate"] for n in challengers]
    win_axis.bar(challengers, rates, yerr=[low, high], capsize=4, color="#c0783c")
    win_axis.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    win_axis.set_ylim(0, 1)
    win_axis.set_title(f"win rate vs {summary.get('baseline')} (Wilson 95%)", fontsize=10)
    for axis in (reward_axis, win_axis):
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return True
