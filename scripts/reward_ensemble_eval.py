"""Held-out pair accuracy of reward models alone and as an ensemble, per data source.

    python scripts/reward_ensemble_eval.py runs/rm-a runs/rm-b [more reward runs] [--penalty 1.0]

Each run is a directory written by `rlhfkit reward`. The held-out pairs are those of the first
run's data settings (path, mix, eval_fraction, train.seed), and no run may have trained on one
of them (checked: members trained with another seed or split are refused). Every member scores
every held-out answer at the max_length it was trained with; the ensemble combines the scores as
`reward.ensemble` does in the RL stages (mean, worst case, mean − λ·variance). Printed as
markdown: accuracy per source and over all pairs, then how the members' disagreement on a pair
(their standard deviation of chosen − rejected) sorts right from wrong — the accuracy of their
mean on the half of pairs they agree on most and on the other half. Answers are scored one at a
time, as the RL stages score them, so where a conversation is cut to max_length a run's figure
can differ a little from its reward stage's, which cuts a pair's prompt once for both answers.
Rerunning it on new runs rewrites the tables: no figure is typed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rlhfkit.config.loading import load_config
from rlhfkit.data.examples import load_examples_by_source, preference_examples
from rlhfkit.data.loading import source_labels
from rlhfkit.rewards import RewardModelScorer, combine_ensemble

OBJECTIVES = ("mean", "worst_case", "uncertainty_weighted")


def _config(run_dir: Path):
    return load_config("reward", run_dir / "config.yaml")


def held_out_pairs(run_dirs: list[Path]) -> dict[str, list]:
    """The first run's held-out pairs per source, once no run is found to have trained on one."""
    first = _config(run_dirs[0])
    _, parts, _ = load_examples_by_source(first.data, first.train.seed, preference_examples)
    held_out = {_pair_key(pair) for pairs in parts.values() for pair in pairs}
    for run_dir in run_dirs:
        config = _config(run_dir)
        trained, _, _ = load_examples_by_source(config.data, config.train.seed, preference_examples)
        seen = sum(_pair_key(pair) in held_out for pair in trained)
        if seen:
            raise SystemExit(
                f"{run_dir}: trained on {seen} of the held-out pairs of {run_dirs[0]} (another data split: "
                "train every member with the same data settings and train.seed)"
            )
    labels = source_labels(list(parts))
    return {labels[source]: pairs for source, pairs in parts.items() if pairs}


def _pair_key(pair) -> str:
    return json.dumps([pair.prompt, pair.chosen, pair.rejected], sort_keys=True)


def answer_scores(scorers: list[RewardModelScorer], pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, N) scores of the chosen and of the rejected answers by each member, scored as the RL
    stages score."""
    prompts = [list(pair.prompt) for pair in pairs]
    chosen = [scorer.score(prompts, [pair.chosen for pair in pairs]) for scorer in scorers]
    rejected = [scorer.score(prompts, [pair.rejected for pair in pairs]) for scorer in scorers]
    return torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)


def accuracy(margin: torch.Tensor) -> float:
    """Pairs whose chosen answer scored higher; ties count half."""
    return float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())


def tables(run_dirs: list[Path], penalty: float) -> str:
    pairs = held_out_pairs(run_dirs)
    # each member loaded once, at the max_length it was trained with
    scorers = [RewardModelScorer(str(run / "final"), max_length=_config(run).data.max_length) for run in run_dirs]
    scores = {source: answer_scores(scorers, rows) for source, rows in pairs.items()}
    by_model = {
        f"`{run}`": {source: accuracy(chosen[index] - rejected[index]) for source, (chosen, rejected) in scores.items()}
        for index, run in enumerate(run_dirs)
    }
    for objective in OBJECTIVES:  # each answer's members combined, then chosen against rejected
        label = f"ensemble, {objective}" + (f" (λ {penalty:g})" if objective == "uncertainty_weighted" else "")
        by_model[label] = {
            source: accuracy(
                combine_ensemble(chosen, objective, penalty)[0] - combine_ensemble(rejected, objective, penalty)[0]
            )
            for source, (chosen, rejected) in scores.items()
        }
    counts = {source: len(rows) for source, rows in pairs.items()}
    lines = [
        "| reward model | " + " | ".join(f"{source} ({count})" for source, count in counts.items()) + " | all |",
        "|---|" + "---|" * (len(counts) + 1),
    ]
    for name, by_source in by_model.items():
        joined = sum(by_source[source] * count for source, count in counts.items()) / sum(counts.values())
        cells = " | ".join(f"{by_source[source]:.3f}" for source in counts)
        lines.append(f"| {name} | {cells} | {joined:.3f} |")
    lines += [
        "",
        "| source | pairs | disagreement (mean) | accuracy of the mean, surer half | other half |",
        "|---|---|---|---|---|",
    ]
    for source, (chosen, rejected) in scores.items():
        margins = chosen - rejected  # (M, N)
        spread = margins.std(dim=0, correction=0)
        order = torch.argsort(spread)
        surer, other = order[: len(order) // 2], order[len(order) // 2 :]
        mean_margin = margins.mean(dim=0)
        lines.append(
            f"| {source} | {len(order)} | {float(spread.mean()):.3f} | "
            f"{accuracy(mean_margin[surer]):.3f} | {accuracy(mean_margin[other]):.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--penalty", type=float, default=1.0, help="λ of the uncertainty-weighted ensemble")
    args = parser.parse_args(argv)
    sys.stdout.write(tables(args.run_dirs, args.penalty))
    return 0


if __name__ == "__main__":
    sys.exit(main())
