"""Several processes on one machine: the same SFT and GRPO runs on 1 process and on N processes,
data-parallel (DDP), sharded (FSDP2) or under DeepSpeed ZeRO.

    .venv/bin/python -m benchmarks.processes                 # embedded model, 1 vs 2 processes (DDP)
    .venv/bin/python -m benchmarks.processes --suite smoke --model DIR --output /tmp/smoke
    .venv/bin/python -m benchmarks.processes --workloads sft --full-finetune \
        --launch-configs cpu.yaml fsdp.yaml zero2.yaml zero3.yaml --output docs/benchmark-results/processes-sharding

The N-process runs go through `accelerate launch --config_file configs/accelerate/CONFIG`
(threads per process = cores / N); the 1-process run is plain `python -m rlhfkit.cli` with every
core. All use one global batch, so their losses should agree step for step: the table reports
the largest relative difference next to the throughputs and the largest process's peak resident
memory (/usr/bin/time's maximum RSS over the launch's processes), and writes
results/processes.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.data import prepare
from benchmarks.run import environment
from benchmarks.suites import SUITES, Suite
from benchmarks.workloads import _logged_steps, _rlhfkit_common, sft_token_count
from rlhfkit.files import json_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "benchmark-results"


def stage_settings(
    workload: str, suite: Suite, model: str, files: dict, output_dir: Path, full_finetune: bool = False
) -> dict:
    """SFT: one epoch, global batch = the suite's micro-batch (split in 2 accumulated halves), LoRA
    or every weight; GRPO: the suite's steps."""
    if workload == "sft":
        common = _rlhfkit_common(
            suite,
            model,
            output_dir,
            batch_size=suite.sft_batch_size // 2,
            grad_accum=2,
            epochs=1,
            lr=suite.learning_rate,
        )
        return {
            **common,
            "lora": {**common["lora"], "enabled": not full_finetune},
            "data": {"path": files["sft_rlhfkit"], "eval_fraction": 0.0, "max_length": suite.max_length},
            "eval": {"before": False},
            "generation": {"num_prompts": 0},
        }
    batch = suite.rl_prompts * suite.rl_group
    return {
        **_rlhfkit_common(
            suite,
            model,
            output_dir,
            batch_size=batch,
            max_steps=suite.rl_steps,
            lr=suite.rl_learning_rate,
            scheduler="constant",
            warmup_ratio=0.0,
        ),
        "data": {"path": files["prompts_rlhfkit"], "eval_fraction": 0.0},
        "rollout": {
            "prompts_per_step": suite.rl_prompts,
            "samples_per_prompt": suite.rl_group,
            "max_new_tokens": suite.rl_new_tokens,
            "temperature": suite.temperature,
            "batch_size": batch,
        },
        "reward": {"function": "rlhfkit.reward_functions:numeric_answer"},
        "grpo": {"beta": suite.grpo_beta},
        "eval": {"before": False, "num_prompts": 0},
    }


def launch(workload: str, processes: int, launch_config: str, config_path: Path, log_path: Path) -> tuple[float, float]:
    """Run the stage; returns its wall time in seconds and the largest process's peak RSS in GB."""
    cli = ["-m", "rlhfkit.cli", workload, str(config_path)]
    environment_variables = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, *cli]
    else:
        threads = max(1, (os.cpu_count() or processes) // processes)
        environment_variables["OMP_NUM_THREADS"] = str(threads)
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "configs/accelerate" / launch_config),
            "--num_processes",
            str(processes),
            *cli,
        ]
    # GNU time reports the maximum resident set of the command and every descendant it waited for
    command = ["/usr/bin/time", "-f", "PEAK_RSS_KB %M", *command]
    started = time.perf_counter()
    with log_path.open("a") as log:
        done = subprocess.run(command, env=environment_variables, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{workload} on {processes} processes ({launch_config}) failed; see {log_path}")
    wall = time.perf_counter() - started
    peak_kb = [int(m) for m in re.findall(r"^PEAK_RSS_KB (\d+)$", log_path.read_text(), flags=re.M)][-1]
    return wall, peak_kb / 2**20


def measure(
    workload: str,
    processes: int,
    launch_config: str,
    suite: Suite,
    model: str,
    files: dict,
    workdir: Path,
    full_finetune: bool = False,
) -> dict:
    name = f"{workload}-{processes}" + (f"-{launch_config.removesuffix('.yaml')}" if processes > 1 else "")
    output_dir = workdir / name
    settings = stage_settings(workload, suite, model, files, output_dir, full_finetune)
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump({workload: settings}))  # under its stage key: the grpo section would clash
    wall, peak_rss_gb = launch(workload, processes, launch_config, config_path, workdir / "processes.log")
    steps = _logged_steps(output_dir)
    result = {
        "processes": processes,
        "launch": launch_config if processes > 1 else "-",
        "wall_s": wall,
        "peak_rss_gb": peak_rss_gb,
        "losses": [s["train/loss"] for s in steps],
    }
    if workload == "sft":
        from rlhfkit.config.loading import load_config

        tokens, _ = sft_token_count(load_config("sft", config_path))
        seconds = [s["train/step_s"] for s in steps]
        result.update(step_seconds=seconds, units=tokens, unit="tokens", per_s=tokens / sum(seconds))
    else:
        generation = [s["train/time_generation_s"] for s in steps]
        update = [s["train/time_update_s"] for s in steps]
        result.update(
            step_seconds=[g + u for g, u in zip(generation, update)],
            generation_seconds=generation,
            update_seconds=update,
            units=len(steps),
            unit="steps",
            per_s=len(steps) / sum(generation + update),
            rewards=[s["train/reward_mean"] for s in steps],
        )
    return result


def largest_relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| workload | processes | launch | throughput | step s (median) | wall s | peak RSS, largest process | loss vs 1 process (max rel. diff) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for workload, runs in results.items():
        alone = runs[0]
        for run in runs:
            difference = largest_relative_difference(alone["losses"], run["losses"]) if run is not alone else 0.0
            lines.append(
                f"| {workload} | {run['processes']} | {run.get('launch', 'cpu.yaml')} "
                f"| {run['per_s']:.3g} {run['unit']}/s ({run['per_s'] / alone['per_s']:.2f}×) "
                f"| {statistics.median(run['step_seconds']):.2f} | {run['wall_s']:.0f} | {run.get('peak_rss_gb', math.nan):.2f} GB "
                f"| {difference:.1e} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="cpu", choices=sorted(SUITES))
    parser.add_argument("--model", help="model (default: the suite's)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", default=["sft", "grpo"], choices=["sft", "grpo"])
    parser.add_argument(
        "--launch-configs", nargs="+", default=["cpu.yaml"], help="configs/accelerate/ files for the N-process runs"
    )
    parser.add_argument(
        "--full-finetune", action="store_true", help="SFT trains every weight (the sharding configs' case)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "processes", help="results file stem (.json, .md)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/benchmarks-processes"))
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    model = args.model or suite.model

    from rlhfkit.models import load_tokenizer, resolve

    args.workdir.mkdir(parents=True, exist_ok=True)
    data = prepare(suite, load_tokenizer(resolve(model)), args.workdir / "data")
    results: dict[str, list[dict]] = {}
    (args.workdir / "processes.log").write_text("")
    for workload in args.workloads:
        runs = [(1, "-")] + [(args.processes, launch_config) for launch_config in args.launch_configs]
        results[workload] = [
            measure(workload, n, launch_config, suite, model, data["files"], args.workdir, args.full_finetune)
            for n, launch_config in runs
        ]
        print(table({workload: results[workload]}), end="", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(
        json_text(
            {
                "suite": suite.as_dict(),
                "model": model,
                "environment": environment(),
                "data": data,
                "full_finetune": args.full_finetune,
                "results": results,
            },
            indent=2,
        )
    )
    args.output.with_suffix(".md").write_text(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
