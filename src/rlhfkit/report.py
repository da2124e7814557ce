"""The pipeline report: one HTML page (and a Markdown summary) that opens with no server.

It reads what the stages wrote — each run's metrics.json (held-out before/after) and
metrics.jsonl (training curves), and the evaluate stage's model comparison and side-by-side
answers — and writes report.html, report.md and PNG plots under report_files/.
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhfkit.config.rounds import round_key, round_of, stage_of
from rlhfkit.files import read_json_or_empty, write_text_atomically
from rlhfkit.metrics import held_out_curve, win_rate
from rlhfkit.report_plots import finite_number, plot_comparison, plot_curves, plot_held_out

PLOTS_DIR = "report_files"
# What each stage's held-out before/after shows, in order: (key, label, format).
STAGE_METRICS = {
    "pretrain": [("perplexity", "domain perplexity (held-out text)", "{:.2f}")],
    "sft": [
        ("perplexity", "response perplexity (held-out pairs)", "{:.2f}"),
        ("rouge_l", "ROUGE-L of answers", "{:.3f}"),
    ],
    "reward": [
        ("accuracy", "pair accuracy (held-out pairs)", "{:.3f}"),
        ("margin", "mean reward margin", "{:.2f}"),
        ("label_accuracy", "label agreement (held-out 👍/👎)", "{:.3f}"),
        ("auc", "AUC, 👍 above 👎", "{:.3f}"),
    ],
    "dpo": [
        ("accuracy", "implicit-reward accuracy", "{:.3f}"),
        ("margin", "implicit-reward margin", "{:.3f}"),
        ("reward_model_score", "reward-model score of answers", "{:.3f}"),
    ],
    "kto": [
        ("label_accuracy", "implicit reward agrees with the label", "{:.3f}"),
        ("margin", "implicit reward, 👍 − 👎", "{:.3f}"),
        ("reward_model_score", "reward-model score of answers", "{:.3f}"),
    ],
}
RL_METRICS = [
    ("reward_mean", "mean reward (held-out prompts)", "{:.3f}"),
    ("kl", "KL to reference (nats/answer)", "{:.2f}"),
    ("length", "answer length (tokens)", "{:.1f}"),
]
EVAL_COLUMNS = [
    ("perplexity", "perplexity", "{:.2f}"),
    ("rouge_l", "ROUGE-L", "{:.3f}"),
    ("reward_mean", "reward", "{:.3f}"),
    ("win_rate", "win rate vs baseline", "{:.2f}"),
    ("judge_win_rate", "judge's win rate", "{:.2f}"),
    ("kl", "KL to reference", "{:.2f}"),
    ("length", "length", "{:.1f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
]


def _read_curves(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return records


def _stderr(metrics: dict, key: str) -> Any:
    """The standard error stored beside a metric: KEY_stderr, or reward_stderr for reward_mean."""
    return metrics.get(f"{key}_stderr", metrics.get(f"{key.removesuffix('_mean')}_stderr"))


def _format(value: Any, fmt: str, stderr: Any = None) -> str:
    number = finite_number(value)
    if number is None:
        return "–"
    text = fmt.format(number)
    if finite_number(stderr) is not None:
        text += " ± " + fmt.format(1.96 * stderr)
    return text


def label_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """The label stage's rows: what was labelled, by whom, and how far annotators agreed."""
    unit = "answers" if metrics.get("kind") == "single" else "pairs"
    rows = [
        (
            f"{unit} labelled by {metrics.get('labeler', '?')}",
            "",
            f"{metrics.get('labelled', 0)} of {metrics.get('tasks', 0)}",
        )
    ]
    rows.append((f"{unit} exported", "", str(metrics.get("exported", 0))))
    agreement = metrics.get("agreement", {}).get("percent_agreement")
    if finite_number(agreement) is not None:
        rows.append(("percent agreement between annotators", "", f"{agreement:.3f}"))
    return rows


def stage_rows(stage: str, metrics: dict) -> list[tuple[str, str, str]]:
    """(metric, before, after) rows for one stage's held-out measurements (`stage` may be a
    round's run, STAGE@r)."""
    stage = stage_of(stage)
    if stage == "label":
        return label_rows(metrics) if metrics else []
    before, after = metrics.get("before", {}), metrics.get("after", {})
    rows = []
    for key, label, fmt in STAGE_METRICS.get(stage, RL_METRICS):
        if key in before or key in after:
            rows.append(
                (
                    label,
                    _format(before.get(key), fmt, _stderr(before, key)),
                    _format(after.get(key), fmt, _stderr(after, key)),
                )
            )
    if "reward_gain" in after:
        rows.append(
            (
                "paired reward gain (same prompts)",
                "",
                _format(after["reward_gain"], "{:+.3f}", after.get("reward_gain_stderr")),
            )
        )
    rows += group_rows("mean reward", before, after)
    if "greedy" in before or "greedy" in after:
        greedy = [side.get("greedy", {}) for side in (before, after)]
        rows.append(("reward of greedy answers (one per prompt)", *_with_gain(*greedy)))
        rows += group_rows("reward of greedy answers", *greedy)
    for name in {**before.get("judges", {}), **after.get("judges", {})}:
        judged = [side.get("judges", {}).get(name, {}) for side in (before, after)]
        rows.append(
            (
                f"held-out judge {name} (never trained against)",
                *(_format(j.get("mean"), "{:.3f}", j.get("stderr")) for j in judged),
            )
        )
    return rows


def round_rows(stage_dirs: dict[str, Path], evaluation: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """One row per round's aligned model: the labels it learned from (count, agreement), its
    held-out reward, win rate against the baseline and against the same stage one round earlier
    (same prompts and samples), and KL; and a verdict per later round, read off the 95% interval
    of its win rate over the round before. Empty without rounds."""
    models = evaluation.get("models", {})
    rounds = [key for key in models if key in stage_dirs and round_of(key) > 1]
    if not rounds:
        return [], [], []
    header = ["round", "model", "labels (agreement)", "reward", "win rate vs baseline", "vs previous round", "KL"]
    rows, verdicts = [], []
    for key in [k for k in models if k in stage_dirs and stage_of(k) in {stage_of(r) for r in rounds}]:
        number, metrics = round_of(key), models[key]
        label = read_json_or_empty(stage_dirs.get(round_key("label", number), Path("-")) / "metrics.json")
        agreement = label.get("agreement", {}).get("percent_agreement")
        labels = f"{label.get('exported', '–')}" + (
            f" ({agreement:.2f})" if finite_number(agreement) is not None else ""
        )
        previous_key = round_key(stage_of(key), number - 1) if number > 1 else None
        previous = models.get(previous_key) if previous_key else None
        against_previous = "–"
        if previous and metrics.get("sample_rewards") and previous.get("sample_rewards"):
            pairs = [
                (a, b) for a, b in zip(metrics["sample_rewards"], previous["sample_rewards"]) if None not in (a, b)
            ]
            if pairs:
                outcome = win_rate([a for a, _ in pairs], [b for _, b in pairs], evaluation.get("tie_margin", 0.0))
                low, high = outcome["win_rate_low"], outcome["win_rate_high"]
                against_previous = f"{outcome['win_rate']:.2f} [{low:.2f}, {high:.2f}]"
                if low > 0.5:
                    verdicts.append(f"{key} beat {previous_key} on the held-out prompts ({against_previous}).")
                elif high < 0.5:
                    verdicts.append(
                        f"{key} was worse than {previous_key} on the held-out prompts ({against_previous})."
                    )
                else:
                    verdicts.append(
                        f"{key} was not clearly better than {previous_key}: its win rate over it, "
                        f"{against_previous}, spans 0.5."
                    )
        rows.append(
            [
                str(number),
                key,
                labels,
                _format(metrics.get("reward_mean"), "{:.3f}", _stderr(metrics, "reward_mean")),
                _format(metrics.get("win_rate"), "{:.2f}"),
                against_previous,
                _format(metrics.get("kl"), "{:.2f}"),
            ]
        )
    return header, rows, verdicts


def _with_gain(before: dict, after: dict) -> tuple[str, str]:
    """Before and after cells of a held-out reward; the after cell carries its paired gain."""
    after_cell = _format(after.get("reward_mean"), "{:.3f}", after.get("reward_stderr"))
    if "reward_gain" in after:
        after_cell += f" (paired gain {_format(after['reward_gain'], '{:+.3f}', after.get('reward_gain_stderr'))})"
    return _format(before.get("reward_mean"), "{:.3f}", before.get("reward_stderr")), after_cell


def group_rows(label: str, before: dict, after: dict) -> list[tuple[str, str, str]]:
    """One row per group of eval.group_by (e.g. `add`, `subtract`): its reward before and after."""
    sides = before.get("groups", {}), after.get("groups", {})
    return [
        (f"{label}, {group} prompts", *_with_gain(sides[0].get(group, {}), sides[1].get(group, {})))
        for group in {**sides[0], **sides[1]}
    ]


def evaluation_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Header and one row per model of the evaluate stage's comparison (95% intervals); a judge's
    cell is marked † where the model was trained against that judge."""
    models = summary.get("models", {})
    present = [(key, label, fmt) for key, label, fmt in EVAL_COLUMNS if any(key in m for m in models.values())]
    judges = list(dict.fromkeys(judge for m in models.values() for judge in m.get("judges", {})))
    header = ["model"] + [label for _, label, _ in present] + [f"judge {judge} (win rate)" for judge in judges]
    rows = []
    for name in summary.get("order", list(models)):
        metrics = models[name]
        marked = metrics.get("trained_against", [])
        cells = [name + (" (baseline)" if name == summary.get("baseline") else "")]
        for key, _, fmt in present:
            cells.append(_cell(metrics, key, fmt) + (" †" if key == "reward_mean" and "reward_model" in marked else ""))
        for judge in judges:
            judged = metrics.get("judges", {}).get(judge, {})
            cell = _cell(judged, "reward_mean", "{:.3f}")
            if "win_rate" in judged:
                cell += f" ({_cell(judged, 'win_rate', '{:.2f}')})"
            cells.append(cell + (" †" if judge in marked else ""))
        rows.append(cells)
    return header, rows


def _cell(metrics: dict, key: str, fmt: str) -> str:
    cell = _format(metrics.get(key), fmt, _stderr(metrics, key))
    if finite_number(metrics.get(f"{key}_low")) is not None and finite_number(metrics.get(key)) is not None:
        cell += f" [{metrics[f'{key}_low']:.2f}, {metrics[f'{key}_high']:.2f}]"
    return cell


def length_note(summary: dict) -> str:
    """How strongly each judge's score follows answer length (Spearman ρ over every model's answers);
    empty without judges. A judge that rewards length can prefer a model for its length alone."""
    correlations = {
        judge: value for judge, value in summary.get("length_correlation", {}).items() if value.get("answers")
    }
    if not correlations:
        return ""

    def signed(rho: Any) -> str:
        return f"{rho:+.2f}" if finite_number(rho) is not None else "n/a"

    named = []
    for judge, value in correlations.items():
        within = ", ".join(f"{model} {signed(rho)}" for model, rho in value.get("per_model", {}).items())
        named.append(
            f"{'the reward model' if judge == 'reward_model' else judge} {signed(value['rho'])}"
            + (f" (within each model: {within})" if within else "")
        )
    answers = max(value["answers"] for value in correlations.values())
    return f"Score against answer length (Spearman ρ over {answers} answers of every model): " + "; ".join(named) + "."


def evaluation_markdown(summary: dict) -> str:
    """The evaluate stage's comparison as a Markdown table, and how each judge's score follows length."""
    note = length_note(summary)
    return _md_table(*evaluation_rows(summary)) + (f"\n{note}\n" if note else "")


def _read_samples(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _html_table(header: list[str], rows: list[list[str]], css_class: str) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda cell: cell.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f5f8; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
.warning { background: #fff4e0; border-left: 4px solid #e39b2f; padding: 0.5rem 0.8rem; margin: 0.5rem 0; }
.samples td { white-space: pre-wrap; min-width: 14rem; max-width: 28rem; }
.note { color: #666; font-size: 0.85rem; }
"""


def write_report(root: Path, stage_dirs: dict[str, Path]) -> Path:
    """Write root/report.html, root/report.md and root/report_files/*.png; returns the HTML path."""
    plots = root / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    timings = read_json_or_empty(root / "timings.json")
    html_parts: list[str] = []
    md_parts: list[str] = []

    # 1. What each training stage did, on its own held-out data.
    header = ["stage", "held-out metric", "before", "after", "wall time"]
    rows = []
    trained = {
        stage: read_json_or_empty(directory / "metrics.json")
        for stage, directory in stage_dirs.items()
        if stage != "evaluate"
    }
    for stage, metrics in trained.items():
        wall = _duration(timings.get(stage))
        missing = "(not run yet)" if not metrics else "(no held-out measurement in the stage; see Models compared)"
        for index, (label, before, after) in enumerate(stage_rows(stage, metrics) or [(missing, "", "")]):
            rows.append([stage if index == 0 else "", label, before, after, wall if index == 0 else ""])
    html_parts.append("<h2>What each stage did</h2>" + _html_table(header, rows, "stages"))
    md_parts.append("## What each stage did\n\n" + _md_table(header, rows))
    for stage, metrics in trained.items():
        for sign in metrics.get("warnings", []):
            html_parts.append(
                f'<div class="warning">Possible over-optimisation — {html.escape(stage)}: {html.escape(sign)}</div>'
            )
            md_parts.append(f"\n> **Possible over-optimisation** — {stage}: {sign}\n")

    # 2. All models side by side on the same prompts.
    evaluation = read_json_or_empty(stage_dirs["evaluate"] / "metrics.json") if "evaluate" in stage_dirs else {}
    if evaluation.get("models"):
        eval_header, eval_rows = evaluation_rows(evaluation)
        with_references = evaluation.get("prompts_with_references", evaluation["prompts"])
        per_prompt = evaluation["samples_per_prompt"]
        note = (
            f"{evaluation['prompts']} prompts ({with_references} held-out with references) × {per_prompt} "
            f"answer{'s' if per_prompt != 1 else ''} per model, sampled at "
            f"temperature {evaluation['sampling']['temperature']} with the same seed; ± is a 95% interval. KL is measured "
            f"to {evaluation['reference']}, win rate against {evaluation['baseline']}"
            + (
                f" as judged by the reward model {evaluation['reward_model']}."
                if evaluation.get("reward_model")
                else "."
            )
        )
        if any(m.get("trained_against") for m in evaluation["models"].values()):
            note += " † The model was trained against this judge: its score there is not held-out evidence."
        if length_bias := length_note(evaluation):
            note += " " + length_bias
        warnings = [f"{name}: {'; '.join(signs)}" for name, signs in evaluation.get("warnings", {}).items()]
        html_parts.append(
            "<h2>Models compared</h2>"
            + _html_table(eval_header, eval_rows, "models")
            + f'<p class="note">{html.escape(note)}</p>'
        )
        html_parts += [f'<div class="warning">Possible reward hacking — {html.escape(w)}</div>' for w in warnings]
        md_parts.append("## Models compared\n\n" + _md_table(eval_header, eval_rows) + f"\n{note}\n")
        md_parts += [f"\n> **Possible reward hacking** — {w}\n" for w in warnings]
        if plot_comparison(evaluation, plots / "comparison.png"):
            html_parts.append(f'<img src="{PLOTS_DIR}/comparison.png" alt="reward and win rate per model">')
            md_parts.append(f"\n![reward and win rate per model]({PLOTS_DIR}/comparison.png)\n")

    # 2b. Rounds of sample -> label -> train, side by side.
    round_header, round_table, verdicts = round_rows(stage_dirs, evaluation)
    if round_table:
        note = " ".join(
            [
                "Each round labelled the previous round's policy and trained from it; win rates over the same prompts.",
                *verdicts,
            ]
        )
        html_parts.append(
            "<h2>Rounds</h2>" + _html_table(round_header, round_table, "rounds") + f'<p class="note">{note}</p>'
        )
        md_parts.append("## Rounds\n\n" + _md_table(round_header, round_table) + f"\n{note}\n")

    # 3. Training curves; for RL runs with held-out judges, the training reward beside them.
    curve_html, curve_md = [], []
    for stage, directory in stage_dirs.items():
        judged = plots / f"{stage}-held-out.png"
        if stage in trained and plot_held_out(stage, held_out_curve(trained[stage]), judged):
            alt = f"{stage}: training reward and held-out judges over steps"
            curve_html.append(
                f'<h3>{html.escape(stage)}</h3><img src="{PLOTS_DIR}/{judged.name}" alt="{html.escape(alt)}">'
            )
            curve_md.append(f"![{alt}]({PLOTS_DIR}/{judged.name})\n")
        image = plots / f"{stage}-curves.png"
        if stage != "evaluate" and plot_curves(stage, _read_curves(directory / "metrics.jsonl"), image):
            curve_html.append(
                f'<h3>{html.escape(stage)}</h3><img src="{PLOTS_DIR}/{image.name}" alt="{html.escape(stage)} training curves">'
            )
            curve_md.append(f"![{stage} training curves]({PLOTS_DIR}/{image.name})\n")
    if curve_html:
        html_parts.append("<h2>Training curves</h2>" + "".join(curve_html))
        md_parts.append("## Training curves\n\n" + "\n".join(curve_md))

    # 4. Side-by-side answers.
    samples = _read_samples(stage_dirs["evaluate"] / "samples.jsonl") if "evaluate" in stage_dirs else []
    if samples:
        names = evaluation.get("order") or [k for k in samples[0] if k not in ("prompt", "reference")]
        sample_header = ["prompt", *names] + (["reference"] if any("reference" in s for s in samples) else [])
        sample_rows = [
            [s["prompt"], *(s.get(n, "") for n in names)]
            + ([s.get("reference", "")] if "reference" in sample_header else [])
            for s in samples
        ]
        html_parts.append("<h2>Side by side</h2>" + _html_table(sample_header, sample_rows, "samples"))
        md_parts.append(f"## Side by side\n\n{len(samples)} prompts: see `evaluate/samples.md`.\n")

    title = f"rlhfkit report — {root.name}"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="note">{html.escape(str(root))} · written {stamp}</p>'
        + "".join(html_parts)
        + "</body></html>\n"
    )
    target = root / "report.html"
    write_text_atomically(target, page)
    write_text_atomically(root / "report.md", f"# {title}\n\nWritten {stamp}.\n\n" + "\n".join(md_parts))
    return target


def _duration(seconds: Any) -> str:
    number = finite_number(seconds)
    if number is None:
        return ""
    minutes, rest = divmod(round(number), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"
