"""Rows of the results pages, written from run directories rather than by hand.

    python scripts/results_rows.py runs/examples/grpo-arithmetic [more run dirs] [--versus RUN_DIR]

For each run: the command that made it, the reward, the held-out set, the held-out reward before
and after (± standard error, with the paired gain), each held-out judge before and after, the KL
to the reference, the wall time and the mean seconds per step — read from its run.json (command, versions, machine, start
and finish), config.yaml and metrics.json. Below the table, one line per run says when and on
what it was measured; runs evaluated per group (eval.group_by) or greedily (eval.greedy) get a
second table, a row per group; runs evaluated during training (eval.every) a table of the held-out
training reward, each judge and the KL at every evaluated step. With --versus, a column compares each run's held-out rewards after
training with that run's on the same prompts and sample slots (paired mean difference ± its
standard error), for runs evaluated alike. Reward-model runs (`rlhfkit reward`) get a table of
their own: held-out pair (or label) accuracy before and after, per data source, and the wall
time; any other stage's run (SFT, pretraining, DPO, KTO, ...) its held-out measurements before
and after, as the pipeline's report lists them; an evaluation's run (`rlhfkit evaluate`, the
pipeline's last stage) the table of the models it compared, as its report renders it from
metrics.json. Rerunning a run and this script rewrites its rows: no figure is typed.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

import yaml

from rlhfkit.metrics import held_out_curve, paired_difference, win_rate
from rlhfkit.report import evaluation_markdown, stage_rows

EVALUATED_ALIKE = ("num_prompts", "samples_per_prompt", "seed")
COLUMNS = ["run", "reward", "held-out", "before", "after", "judges (before → after)", "KL", "time", "s/step"]


def _mean(side: dict, key: str = "reward_mean", stderr: str = "reward_stderr") -> str:
    return f"{side[key]:.3f} ± {side[stderr]:.3f}" if key in side else "–"


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _duration(marker: dict) -> str:
    """The run's wall time; a resumed run's without the time it lay stopped (from its last write
    to the resume), or said to include it where run.json predates that record."""
    started, finished = marker.get("started"), marker.get("finished")
    if not (started and finished):
        return "–"
    seconds = _seconds_between(started, finished)
    resumed, stopped = marker.get("resumed", []), marker.get("stopped", [])
    note = ""
    if resumed and len(stopped) == len(resumed):
        seconds -= sum(_seconds_between(stop, resume) for stop, resume in zip(stopped, resumed))
        note = f" in {len(resumed) + 1} sittings"
    elif resumed:
        note = " (resumed: includes the time it lay stopped)"
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s{note}"


def _seconds_per_step(run_dir: Path) -> str:
    """Mean seconds of an RL step (sampling and scoring, then the update) over the logged steps."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    steps = [r["train/time_generation_s"] + r["train/time_update_s"] for r in records if "train/time_update_s" in r]
    return f"{sum(steps) / len(steps):.1f}" if steps else "–"


def _reward_name(config: dict) -> str:
    reward = config.get("reward", {})
    if reward.get("function"):
        return f"`{reward['function'].rsplit(':', 1)[-1]}`"
    return f"`{reward.get('model', '?')}`"


def versus(run_dir: Path, baseline_dir: Path) -> str:
    """Paired difference of the after-training held-out rewards of a run and a baseline run that
    was evaluated on the same held-out prompts, samples per prompt and seed."""
    if run_dir.resolve() == baseline_dir.resolve():
        return "—"
    configs = [yaml.safe_load((d / "config.yaml").read_text()) for d in (run_dir, baseline_dir)]
    alike = [(c.get("data", {}).get("path"), {k: c.get("eval", {}).get(k) for k in EVALUATED_ALIKE}) for c in configs]
    if alike[0] != alike[1]:
        raise SystemExit(f"{run_dir} and {baseline_dir} differ in data.path or eval ({', '.join(EVALUATED_ALIKE)})")
    after, baseline = (json.loads((d / "metrics.json").read_text())["after"] for d in (run_dir, baseline_dir))
    difference = paired_difference(after["sample_rewards"], baseline["sample_rewards"])
    return "–" if difference is None else f"{difference[0]:+.3f} ± {difference[1]:.3f}"


def _complete_run(run_dir: Path) -> tuple[dict, dict, dict]:
    """run.json, config.yaml and metrics.json of a finished run."""
    marker = json.loads((run_dir / "run.json").read_text())
    if marker.get("status") != "complete":
        raise SystemExit(f"{run_dir}: the run is {marker.get('status')}, not complete")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return marker, config, json.loads((run_dir / "metrics.json").read_text())


def run_kind(run_dir: Path) -> str:
    """rl (held-out sampled rewards), reward (a reward model's run), evaluate (models compared),
    or stage (any other stage)."""
    after = json.loads((run_dir / "metrics.json").read_text()).get("after", {})
    if "sample_rewards" in after:
        return "rl"
    stage = json.loads((run_dir / "run.json").read_text()).get("stage")
    if stage == "evaluate":
        return "evaluate"
    return "reward" if stage == "reward" and ("accuracy" in after or "label_accuracy" in after) else "stage"


def evaluation_section(run_dir: Path) -> list[str]:
    """An evaluation's table of the models it compared, then the command, its time and where it ran."""
    marker, _, metrics = _complete_run(run_dir)
    time = _duration(marker)
    command = f"`{marker.get('command', run_dir.name)}`, evaluate stage: {time}"
    return [*evaluation_markdown(metrics).rstrip("\n").splitlines(), "", command, _measured_on(run_dir, marker)]


def stage_run_rows(run_dir: Path) -> tuple[list[list[str]], str]:
    """Rows of any other stage's run (SFT, pretraining, DPO, ...): its held-out measurements
    before and after, as the pipeline's report shows them."""
    marker, _, metrics = _complete_run(run_dir)
    measured = stage_rows(marker.get("stage", "?"), metrics) or [("(no held-out measurement)", "–", "–")]
    time = _duration(marker)
    rows = [
        [
            f"`{marker.get('command', run_dir.name)}`" if index == 0 else "",
            label,
            before,
            after,
            time if index == 0 else "",
        ]
        for index, (label, before, after) in enumerate(measured)
    ]
    return rows, _measured_on(run_dir, marker)


def reward_row(run_dir: Path) -> tuple[list[str], str]:
    """The table row of one reward-model run: held-out accuracy before and after, per data source."""
    marker, _, metrics = _complete_run(run_dir)
    before, after = metrics.get("before", {}), metrics["after"]
    accuracy, count = ("accuracy", "pairs") if "accuracy" in after else ("label_accuracy", "examples")
    sources = [key.split("/", 1)[1] for key in after if key.startswith(f"{accuracy}/")]
    per_source = "; ".join(
        f"{source}: {after[f'{accuracy}/{source}']:.3f} ({after[f'{count}/{source}']})" for source in sources
    )
    cells = [
        f"`{marker.get('command', run_dir.name)}`",
        f"{after[count]} {count}",
        f"{before[accuracy]:.3f}" if accuracy in before else "–",
        f"**{after[accuracy]:.3f}**",
        per_source or "–",
        _duration(marker),
    ]
    return cells, _measured_on(run_dir, marker)


def row(run_dir: Path) -> tuple[list[str], str]:
    """The table row of one RL run and the line saying when and on what it was measured."""
    marker, config, metrics = _complete_run(run_dir)
    if "after" not in metrics or "reward_mean" not in metrics["after"]:
        raise SystemExit(f"{run_dir}: not an RL or reward-model run with a held-out evaluation")
    before, after = metrics.get("before", {}), metrics["after"]
    samples = config.get("eval", {}).get("samples_per_prompt", 1)
    gain = (
        f" (paired gain {after['reward_gain']:+.3f} ± {after['reward_gain_stderr']:.3f})"
        if "reward_gain" in after
        else ""
    )
    judges = [
        f"{name}: {_mean(before.get('judges', {}).get(name, {}), 'mean', 'stderr')} → {_mean(judge, 'mean', 'stderr')}"
        + _judge_gain(before.get("judges", {}).get(name, {}), judge)
        for name, judge in after.get("judges", {}).items()
    ]
    cells = [
        f"`{marker.get('command', run_dir.name)}`",
        _reward_name(config),
        f"{len(after.get('answers', []))} × {samples}",
        _mean(before),
        f"**{_mean(after)}**{gain}",
        "; ".join(judges) or "–",
        f"{after['kl']:.2f}" if "kl" in after else "–",
        _duration(marker),
        _seconds_per_step(run_dir),
    ]
    return cells, _measured_on(run_dir, marker)


def _measured_on(run_dir: Path, marker: dict) -> str:
    """The line saying when, with which versions and on what machine a run was measured."""
    environment = marker.get("environment", {})
    versions = ", ".join(
        f"{name} {environment[name]}" for name in ("torch", "transformers", "peft") if name in environment
    )
    cpu = ", ".join(
        filter(None, [environment.get("cpu", "an unrecorded machine"), environment.get("cpu_instructions")])
    )
    where = f"{cpu} ({environment.get('cores', '?')} cores)"
    when = (marker.get("finished") or marker.get("updated", ""))[:10]
    note = f"- `{run_dir}`: {when}, rlhfkit {marker.get('rlhfkit', '?')}" + (f", {versions}" if versions else "")
    return f"{note}, on {where}."


def _judge_gain(before: dict, after: dict) -> str:
    """A held-out judge's paired gain over the same answer slots, and how often the answer after
    training beats the one before it (win rate, 95% interval): the policy against its start."""
    if not (before.get("samples") and after.get("samples")) or len(before["samples"]) != len(after["samples"]):
        return ""
    pairs = [(a, b) for a, b in zip(after["samples"], before["samples"]) if a is not None and b is not None]
    gain, stderr = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
    wins = win_rate([a for a, _ in pairs], [b for _, b in pairs])
    return (
        f" (paired {gain:+.3f} ± {stderr:.3f}; after beats before on "
        f"{wins['win_rate']:.2f} [{wins['win_rate_low']:.2f}, {wins['win_rate_high']:.2f}] of the slots)"
    )


GROUP_COLUMNS = ["run", "prompts", "sampled: before", "after", "greedy: before", "after"]


def _before_after(before: dict, after: dict) -> list[str]:
    gain = f" ({after['reward_gain']:+.3f} ± {after['reward_gain_stderr']:.3f})" if "reward_gain" in after else ""
    return [_mean(before), f"**{_mean(after)}**{gain}" if after else "–"]


def group_rows(run_dir: Path) -> list[list[str]]:
    """Rows of the per-group table for one run: all its held-out prompts, then each group's."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    before, after = metrics.get("before", {}), metrics["after"]
    if "groups" not in after and "greedy" not in after:
        return []
    greedy_before, greedy_after = before.get("greedy", {}), after.get("greedy", {})
    rows = [[f"`{run_dir}`", "all", *_before_after(before, after), *_before_after(greedy_before, greedy_after)]]
    for group in {**after.get("groups", {}), **greedy_after.get("groups", {})}:
        sides = [side.get("groups", {}).get(group, {}) for side in (before, after, greedy_before, greedy_after)]
        rows.append(["", f"`{group}`", *_before_after(*sides[:2]), *_before_after(*sides[2:])])
    return rows


def curve_rows(run_dir: Path) -> list[list[str]]:
    """Rows of the over-training table for one run: the held-out training reward, each judge's mean
    and the KL at every step it was evaluated (before, eval.every, after); none without a point
    during training."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if not metrics.get("during"):
        return []
    curve = held_out_curve(metrics)
    judges = list(dict.fromkeys(name for point in curve for name in point.get("judges", {})))  # as the plot
    rows = []
    for index, point in enumerate(curve):
        judged = point.get("judges", {})
        rows.append(
            [
                f"`{run_dir}`" if index == 0 else "",
                str(point["step"]),
                f"{point['reward_mean']:.3f}" if "reward_mean" in point else "–",
                "; ".join(f"{name}: {judged[name]['mean']:.3f}" for name in judges if name in judged) or "–",
                f"{point['kl']:.2f}" if "kl" in point else "–",
            ]
        )
    return rows


CURVE_COLUMNS = ["run", "step", "held-out training reward", "judges", "KL"]


def _markdown(columns: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


REWARD_COLUMNS = ["run", "held-out", "accuracy: before", "after", "after, per source", "time"]


STAGE_COLUMNS = ["run", "held-out", "before", "after", "time"]


def table(run_dirs: list[Path], baseline: Path | None = None) -> str:
    """Markdown: a table of other stages' runs, one of reward-model runs, one of RL runs and one per
    evaluation (each with its when-and-where lines), as many as the runs given need."""
    kinds = {run_dir: run_kind(run_dir) for run_dir in run_dirs}
    sections: list[list[str]] = []
    if stage_runs := [run_dir for run_dir in run_dirs if kinds[run_dir] == "stage"]:
        stage_tables = [stage_run_rows(run_dir) for run_dir in stage_runs]
        rows_of_stages = [cells for rows, _ in stage_tables for cells in rows]
        sections.append(_markdown(STAGE_COLUMNS, rows_of_stages) + [""] + [note for _, note in stage_tables])
    if reward_runs := [run_dir for run_dir in run_dirs if kinds[run_dir] == "reward"]:
        reward_rows = [reward_row(run_dir) for run_dir in reward_runs]
        sections.append(
            _markdown(REWARD_COLUMNS, [cells for cells, _ in reward_rows]) + [""] + [n for _, n in reward_rows]
        )
    if rl_runs := [run_dir for run_dir in run_dirs if kinds[run_dir] == "rl"]:
        sections.append(_rl_section(rl_runs, baseline))
    sections += [evaluation_section(run_dir) for run_dir in run_dirs if kinds[run_dir] == "evaluate"]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def _rl_section(run_dirs: list[Path], baseline: Path | None) -> list[str]:
    rows = [row(run_dir) for run_dir in run_dirs]
    columns = COLUMNS
    if baseline is not None:
        columns = [*COLUMNS[:5], f"vs `{baseline.name}` (paired)", *COLUMNS[5:]]
        for (cells, _), run_dir in zip(rows, run_dirs):
            cells.insert(5, versus(run_dir, baseline))
    lines = _markdown(columns, [cells for cells, _ in rows]) + [""] + [note for _, note in rows]
    grouped = [cells for run_dir in run_dirs for cells in group_rows(run_dir)]
    if grouped:
        lines += ["", *_markdown(GROUP_COLUMNS, grouped)]
    if curves := [cells for run_dir in run_dirs for cells in curve_rows(run_dir)]:
        lines += ["", *_markdown(CURVE_COLUMNS, curves)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--versus", type=Path, help="a run whose after-training rewards each row is compared with")
    args = parser.parse_args(argv)
    sys.stdout.write(table(args.run_dirs, args.versus))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
