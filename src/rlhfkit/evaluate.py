"""Evaluation metrics for the pretrain and SFT stages, and side-by-side samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rlhfkit.files import write_text_atomically


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (with stemming) of predictions against references, in [0, 1]."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(reference, prediction)["rougeL"].fmeasure for prediction, reference in zip(predictions, references)]
    return sum(scores) / len(scores)


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
    write_text_atomically(directory / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_text_atomically(directory / "samples.md", "\n".join(lines))


METRIC_LABELS = {
    "perplexity": "held-out perplexity {:.3f}",
    "rouge_l": "ROUGE-L {:.4f}",
    "accuracy": "held-out pair accuracy {:.3f}",
    "margin": "margin {:.4f}",
    "reward_model_score": "reward-model score of answers {:.3f}",
    "reward_mean": "mean reward {:.4f}",
    "reward_stderr": "± {:.4f}",
    "reward_gain": "paired gain over before {:+.4f}",
    "reward_gain_stderr": "± {:.4f}",
    "kl": "KL to reference {:.4f}",
    "length": "mean length {:.1f} tokens",
}


def describe(scores: dict) -> str:
    """One console line for a stage's held-out metrics (other keys, such as answers, are skipped)."""
    parts = [label.format(scores[name]) for name, label in METRIC_LABELS.items() if name in scores]
    return ", ".join(parts) or "no held-out data"


def write_answers_before_after(directory: Path, prompt_turns: Sequence[Sequence[dict]], metrics: dict, references: Sequence[str | None]) -> None:
    """samples.md/.jsonl comparing the answers generated before and after a stage."""
    columns = {when: metrics[when]["answers"] for when in ("before", "after") if "answers" in metrics.get(when, {})}
    prompts = [turns[-1]["content"] for turns in prompt_turns]
    write_side_by_side(directory, prompts, columns, list(references) + [None] * (len(prompts) - len(references)))
