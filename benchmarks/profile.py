"""Where an rlhfkit workload spends its time: torch.profiler over a few optimizer steps.

    python -m benchmarks.profile sft [--suite cpu] [--steps 2] [--rows 20]

Runs the workload's stage (as `benchmarks.workloads` does) under the profiler and writes the
operator table, sorted by self CPU time, to docs/benchmark-results/profile-WORKLOAD.txt.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.suites import SUITES  # noqa: E402
from benchmarks.workloads import RUNNERS  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "benchmark-results"
PROFILED = ("sft", "reward", "dpo", "grpo", "ppo", "trpo", "generation")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=PROFILED)
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    parser.add_argument("--model", default=None)
    parser.add_argument("--rows", type=int, default=25, help="operators shown")
    args = parser.parse_args(argv)
    import dataclasses

    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.data import prepare
    from rlhfkit.models import load_tokenizer, resolve

    suite = SUITES[args.suite]
    # A shorter run: a quarter of the data (at least one micro-batch) and one RL step.
    suite = dataclasses.replace(
        suite,
        sft_examples=max(suite.sft_batch_size, suite.sft_examples // 4),
        pairs=max(suite.pair_batch_size, suite.pairs // 4),
        rl_steps=1,
    )
    model = args.model or suite.model
    with tempfile.TemporaryDirectory(prefix="rlhfkit-profile-") as tmp:
        workdir = Path(tmp)
        prepare(suite, load_tokenizer(resolve(model)), workdir)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as profiler:
            result = RUNNERS[(args.workload, "rlhfkit")](suite, model, workdir)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    if "step_seconds" in result:
        timing = "step seconds under the profiler: " + ", ".join(f"{s:.1f}" for s in result["step_seconds"])
    else:  # generation: seconds per batch size
        timing = "seconds under the profiler: " + ", ".join(
            f"batch {batch}: {figures['seconds']:.1f}" for batch, figures in result["batches"].items()
        )
    text = f"rlhfkit {args.workload}, suite {suite.name} (reduced), {timing}\n\n{table}\n"
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"profile-{args.workload}.txt").write_text(text)
    print(text)
    print(f"torch threads: {torch.get_num_threads()}; wrote {RESULTS_DIR / f'profile-{args.workload}.txt'}")


if __name__ == "__main__":
    main()
