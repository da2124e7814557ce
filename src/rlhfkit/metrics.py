"""Evaluation metrics shared by the stages and `rlhfkit evaluate`, and side-by-side samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rlhfkit.files import json_text, write_text_atomically

if TYPE_CHECKING:
    import torch


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (with stemming) of predictions against references, in [0, 1]."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(reference, prediction)["rougeL"].fmeasure for prediction, reference in zip(predictions, references)
    ]
    return sum(scores) / len(scores)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error s/√n (nan for the error when n < 2)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def paired_difference(later: Sequence[float | None], earlier: Sequence[float | None]) -> tuple[float, float] | None:
    """Mean later − earlier over the same held-out prompts and sample slots, and its standard error
    (None below two pairs; slots with None on either side are left out).

    Pairing removes the spread between prompts (some are easy for every policy), so the error of
    the difference is much smaller than that of either mean.
    """
    differences = [a - b for a, b in zip(later, earlier) if a is not None and b is not None]
    if len(differences) < 2:
        return None
    return mean_and_stderr(differences)


def by_group(
    later: Sequence[float | None], groups: Sequence[str], earlier: Sequence[float | None] | None = None
) -> dict[str, dict[str, float]]:
    """Each group's mean score and standard error (e.g. per operation of an arithmetic task), groups
    in sorted order; with `earlier` (the same slots before training), also each group's paired gain.

    Slots scored None (left out of the reward) are left out of their group.
    """
    if len(groups) != len(later):
        raise ValueError(f"{len(groups)} group labels for {len(later)} scores")
    summary = {}
    for group in sorted(set(groups)):
        slots = [index for index, label in enumerate(groups) if label == group]
        scores = [later[index] for index in slots if later[index] is not None]
        mean, stderr = mean_and_stderr(scores)
        summary[group] = {"reward_mean": mean, "reward_stderr": stderr, "count": float(len(scores))}
        gain = None if earlier is None else paired_difference([later[i] for i in slots], [earlier[i] for i in slots])
        if gain is not None:
            summary[group].update(reward_gain=gain[0], reward_gain_stderr=gain[1])
    return summary


def held_out_curve(metrics: dict) -> list[dict]:
    """An RL run's held-out evaluations in step order — before (step 0), during training
    (eval.every), after (step metrics["steps"], the last) — from its metrics.json."""
    during = metrics.get("during", [])
    last = metrics.get("steps", during[-1]["step"] + 1 if during else 1)
    before = [{"step": 0, **metrics["before"]}] if "before" in metrics else []
    after = [{"step": last, **metrics["after"]}] if "after" in metrics else []
    return before + during + after


def overoptimisation_signs(curve: Sequence[dict], stderrs: float = 2.0) -> list[str]:
    """Held-out judges that fell while the training reward rose (Gao et al. 2022: the proxy keeps
    rising while the gold reward turns down), one sentence per judge; empty when none did.

    Args:
        curve: held-out evaluations in step order, each {"step", "sample_rewards" (the training
            reward per answer), "judges": {name: {"mean", "samples"}}}, all on the same prompts and
            seeds, so answers pair by slot.
        stderrs: how many paired standard errors the judge's fall from its best must exceed.
    """
    signs = []
    last = curve[-1] if curve else {}
    for name in last.get("judges", {}):
        points = [point for point in curve if name in point.get("judges", {})]
        best = max(points, key=lambda point: point["judges"][name]["mean"])  # the earliest of equals
        if best is last:
            continue
        fall = paired_difference(last["judges"][name]["samples"], best["judges"][name]["samples"])
        rise = paired_difference(last["sample_rewards"], best["sample_rewards"])
        if fall is None or rise is None or rise[0] <= 0:
            continue
        change, error = fall
        if change < 0 and -change > stderrs * (error if math.isfinite(error) else math.inf):
            signs.append(
                f"held-out judge {name} fell {change:+.3f} ± {error:.3f} (paired) from step {best['step']} to step "
                f"{last['step']} while the training reward rose {rise[0]:+.3f}: the policy may be over-optimising "
                "the training reward"
            )
    return signs


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique word n-grams / all word n-grams over every text.

    A collapsing policy repeats itself across answers, so this falls; nan when no text has n words.
    """
    grams = [tuple(words[i : i + n]) for words in (t.lower().split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def agreement(margin: torch.Tensor) -> torch.Tensor:
    """Per item (a tensor of margins: chosen − rejected, or a reward signed by its label), 1 where
    the margin is positive, ½ at a tie, 0 below — summed or averaged, an accuracy with ties
    counted half (as before training, when every margin is 0)."""
    return (margin.sign().float() + 1) / 2  # float32 whatever the margin's dtype: sums stay exact


def wilson_interval(successes: float, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion: (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)."""
    if trials == 0:
        return math.nan, math.nan
    p = successes / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    scale = 1 + z * z / trials
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float], tie_margin: float = 0.0) -> dict[str, float]:
    """How often a model's answer out-scores the baseline's answer to the same prompt.

    win = 1 when score − baseline > tie_margin, 0 when < −tie_margin, ½ for a tie; the rate is the
    mean over prompts, with a 95% Wilson interval.
    """
    if len(scores) != len(baseline_scores):
        raise ValueError(f"{len(scores)} scores for {len(baseline_scores)} baseline scores")
    outcomes = [
        1.0 if s - b > tie_margin else 0.0 if b - s > tie_margin else 0.5 for s, b in zip(scores, baseline_scores)
    ]
    if not outcomes:
        return {"win_rate": math.nan, "win_rate_low": math.nan, "win_rate_high": math.nan, "ties": 0}
    rate = sum(outcomes) / len(outcomes)
    low, high = wilson_interval(sum(outcomes), len(outcomes))
    return {"win_rate": rate, "win_rate_low": low, "win_rate_high": high, "ties": sum(o == 0.5 for o in outcomes)}


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of values, tied values sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda index: values[index])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def rank_correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the two samples' average ranks (ties share a rank).

    nan below three pairs or where either sample is constant (no order to correlate).
    """
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} values against {len(ys)}")
    if len(xs) < 3:
        return math.nan
    rx, ry = average_ranks(xs), average_ranks(ys)
    mean = (len(xs) + 1) / 2  # the mean of average ranks is always (n + 1) / 2
    covariance = sum((a - mean) * (b - mean) for a, b in zip(rx, ry))
    spread = math.sqrt(sum((a - mean) ** 2 for a in rx) * sum((b - mean) ** 2 for b in ry))
    return covariance / spread if spread > 0 else math.nan


def reward_hacking_signs(model: dict, baseline: dict, thresholds) -> list[str]:
    """Why a model whose reward beat the baseline's may have gamed the reward (empty: no sign)."""
    if not model.get("reward_mean", -math.inf) > baseline.get("reward_mean", math.inf):
        return []
    signs = []
    if baseline.get("length") and model["length"] > thresholds.length_ratio * baseline["length"]:
        signs.append(f"answers are {model['length'] / baseline['length']:.1f}x as long as the baseline's")
    if model.get("kl", 0.0) > thresholds.kl:
        signs.append(f"KL to the reference is {model['kl']:.1f} nats per answer (> {thresholds.kl:g})")
    base_distinct = baseline.get("distinct_2")
    if base_distinct and model.get("distinct_2", math.inf) < thresholds.distinct_ratio * base_distinct:
        signs.append(
            f"distinct-2 fell to {model['distinct_2']:.2f} from the baseline's {base_distinct:.2f} (repetitive answers)"
        )
    return signs


def write_side_by_side(
    directory: Path, prompts: Sequence[str], columns: dict[str, Sequence[str]], references: Sequence[str | None]
) -> None:
    """samples.jsonl (one record per prompt) and samples.md (readable) with every model's answer."""
    records = []
    lines = ["# Side-by-side samples", ""]
    for index, prompt in enumerate(prompts):
        record = {"prompt": prompt, **{name: answers[index] for name, answers in columns.items()}}
        if references[index] is not None:
            record["reference"] = references[index]
        records.append(record)
        lines += [f"## {index + 1}. {prompt}", ""]
        for name, answers in columns.items():
            lines += [f"**{name}:**", "", answers[index] or "_(empty)_", ""]
        if references[index] is not None:
            lines += ["**reference:**", "", references[index], ""]
    write_text_atomically(directory / "samples.jsonl", "".join(json_text(r) + "\n" for r in records))
    write_text_atomically(directory / "samples.md", "\n".join(lines))


METRIC_LABELS = {
    "perplexity": "held-out perplexity {:.3f}",
    "rouge_l": "ROUGE-L {:.4f}",
    "accuracy": "held-out pair accuracy {:.3f}",
    "label_accuracy": "held-out label agreement {:.3f}",
    "auc": "AUC {:.3f}",
    "margin": "margin {:.4f}",
    "reward_model_score": "reward-model score of answers {:.3f}",
    "reward_mean": "mean reward {:.4f}",
    "reward_stderr": "± {:.4f}",
    "reward_gain": "paired gain over before {:+.4f}",
    "reward_gain_stderr": "± {:.4f}",
    "kl": "KL to reference {:.4f}",
    "length": "mean length {:.1f} tokens",
    "win_rate": "win rate {:.3f}",
    "distinct_2": "distinct-2 {:.3f}",
}


def describe(scores: dict) -> str:
    """One console line for a stage's held-out metrics (other keys, such as answers, are skipped)."""
    parts = [label.format(scores[name]) for name, label in METRIC_LABELS.items() if name in scores]
    for name, value in scores.items():  # per data source: "accuracy/hh/pairs.jsonl"
        metric, _, source = name.partition("/")
        if source and metric in ("accuracy", "label_accuracy"):
            parts.append(f"{source}: {METRIC_LABELS[metric].format(value)}")
    parts += [f"{name} {group['reward_mean']:.3f}" for name, group in scores.get("groups", {}).items()]
    if "greedy" in scores:
        greedy = scores["greedy"]
        parts.append(f"greedy answers' reward {greedy['reward_mean']:.4f}")
        parts += [f"greedy {name} {group['reward_mean']:.3f}" for name, group in greedy.get("groups", {}).items()]
    parts += [f"judge {name} {judge['mean']:.4f}" for name, judge in scores.get("judges", {}).items()]
    return ", ".join(parts) or "no held-out data"


def write_answers_before_after(
    directory: Path, prompt_turns: Sequence[Sequence[dict]], metrics: dict, references: Sequence[str | None]
) -> None:
    """samples.md/.jsonl comparing the answers generated before and after a stage."""
    columns = {when: metrics[when]["answers"] for when in ("before", "after") if "answers" in metrics.get(when, {})}
    for when in ("before", "after"):  # eval.greedy's answers, beside the sampled ones
        if "answers" in metrics.get(when, {}).get("greedy", {}):
            columns[f"{when} (greedy)"] = metrics[when]["greedy"]["answers"]
    prompts = [turns[-1]["content"] for turns in prompt_turns]
    write_side_by_side(directory, prompts, columns, list(references) + [None] * (len(prompts) - len(references)))


def ranking_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting half — the Mann–Whitney U statistic, from average ranks in
    O(n log n). NaN when either class is empty."""
    ranks = average_ranks(scores)
    positives = sum(1 for label in positive if label)
    negatives = len(scores) - positives
    if not positives or not negatives:
        return float("nan")
    rank_sum = sum(rank for rank, label in zip(ranks, positive) if label)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
