"""Run the benchmark suite: every workload for rlhfkit and for TRL, back to back, as ratios.

    python -m benchmarks.run --suite cpu            # ~15 minutes on 2 CPU cores
    python -m benchmarks.run --suite smoke --model DIR --only sft
    python -m benchmarks.run --suite cpu --only sft generation --frameworks rlhfkit --competitors 1 \
        --output docs/benchmark-results/cpu-contended   # beside one busy process (a laptop doing other work)

Each (workload, framework) runs in a fresh process of the same environment, so each peak RSS
is that workload's alone (`--one-process` runs each framework's workloads in one process: quicker
to start, for checking that they run, but a peak RSS is then the largest so far). Prints a table
with both figures, their ratio and the target, and writes RESULTS.json (raw numbers +
environment), RESULTS.md (the table) and RESULTS-ratios.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from benchmarks.suites import COPY_RL, RLHFKIT_ONLY, SUITES, WORKLOADS, Suite
from benchmarks.workloads import RESULT_PREFIX
from rlhfkit.files import json_text

RESULTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "benchmark-results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import torch

    versions = {}
    for package in ("rlhfkit", "torch", "transformers", "trl", "peft", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "rlhfkit_threads": os.environ.get("RLHFKIT_THREADS", "auto"),
        "python": platform.python_version(),
        "versions": versions,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def gemm_peak_flops(suite: Suite, repeats: int = 10) -> float:
    """The suite's device's matrix-multiply rate in its dtype (FLOP/s): best of `repeats` square products
    (2048² float32 on a CPU, 8192² on a GPU)."""
    import torch

    device, dtype = torch.device(suite.device), getattr(torch, suite.dtype)
    size = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)  # warm-up
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def memory_bandwidth(suite: Suite, repeats: int = 5) -> float:
    """The suite's device's memory read rate (bytes/s): best of `repeats` sums over a tensor far
    larger than any cache (512 MB on a CPU, 4 GB on a GPU)."""
    import torch

    device = torch.device(suite.device)
    values = torch.ones((2**30 if device.type == "cuda" else 2**27), device=device, dtype=torch.float32)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    values.sum()  # warm-up
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        values.sum()
        synchronize()
        best = min(best, time.perf_counter() - started)
    return values.numel() * values.element_size() / best


def decode_bound(
    shape: dict[str, int], batch: int, context: float, peak_flops: float, bandwidth: float, dtype_bytes: int
) -> float:
    """New tokens/s that no sampler of this model can beat on this machine at this batch size.

    A decode step reads every weight once and each row's KV cache (2·layers·kv_dim values per
    position of `context`), and does 2 FLOPs per weight per row plus 4·layers·hidden per row and
    position for attention; it takes at least the longer of reading at `bandwidth` and computing
    at `peak_flops`.
    """
    weights = shape["body_params"] + shape["head_params"]
    step_bytes = (weights + 2 * shape["layers"] * shape["kv_dim"] * context * batch) * dtype_bytes
    step_flops = 2 * weights * batch + 4 * shape["layers"] * shape["hidden"] * context * batch
    return batch / max(step_bytes / bandwidth, step_flops / peak_flops)


def run_workloads(workloads: list[str], framework: str, suite: Suite, model: str, workdir: Path, log) -> list[dict]:
    """`workloads` of one framework in one subprocess; each one's RESULT line, or the error for
    each that gave none."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.workloads",
        *workloads,
        framework,
        "--suite",
        suite.name,
        "--model",
        model,
        "--workdir",
        str(workdir),
    ]
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    log.write(
        f"==== {' '.join(workloads)} / {framework} (exit {process.returncode})\n{process.stdout}\n{process.stderr}\n"
    )
    log.flush()
    results = {}
    for line in process.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            results[result["workload"]] = result
    tail = "\n".join((process.stderr or process.stdout).strip().splitlines()[-5:])
    failed = {"framework": framework, "error": tail, "wall_seconds": time.perf_counter() - started}
    return [results.get(workload, {"workload": workload, **failed}) for workload in workloads]


def per_second(result: dict) -> float:
    return result["units"] / sum(result["step_seconds"])


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(
    results: dict[str, dict[str, dict]],
    peak_flops: float,
    bandwidth: float | None = None,
    shape: dict[str, int] | None = None,
    dtype_bytes: int = 4,
) -> list[dict]:
    """Table rows: metric, rlhfkit value, TRL value, ratio (rlhfkit / TRL), target and whether it is met.
    With the memory bandwidth and the model's shape, sampling also reads as a fraction of its bound."""
    rows: list[dict] = []

    def add(
        metric: str,
        ours: float | None,
        theirs: float | None,
        target: str | None = None,
        better: str = "higher",
        unit: str = "",
    ) -> None:
        ratio = ours / theirs if ours is not None and theirs else None
        met = None
        if target is not None and ratio is not None:
            bound = float(target[2:])
            met = ratio >= bound if target.startswith(">=") else ratio <= bound
        rows.append(
            {
                "metric": metric,
                "rlhfkit": ours,
                "trl": theirs,
                "ratio": ratio,
                "target": target,
                "met": met,
                "better": better,
                "unit": unit,
            }
        )

    def pair(workload: str) -> tuple[dict | None, dict | None]:
        found = results.get(workload, {})
        ok = lambda r: r if r is not None and "error" not in r else None  # noqa: E731
        return ok(found.get("rlhfkit")), ok(found.get("trl"))

    def rss(workload: str, ours: dict | None, theirs: dict | None) -> None:
        add(
            f"{workload}: peak RSS",
            ours and ours["peak_rss_mb"],
            theirs and theirs["peak_rss_mb"],
            "<=1.0",
            "lower",
            "MB",
        )
        gpu = lambda r: r and r.get("peak_gpu_mb")  # noqa: E731
        if gpu(ours) or gpu(theirs):
            add(f"{workload}: peak GPU memory", gpu(ours), gpu(theirs), "<=1.0", "lower", "MB")

    ours, theirs = pair("sft")
    if ours or theirs:
        add("sft: training tokens/s", ours and per_second(ours), theirs and per_second(theirs), ">=1.5", unit="tok/s")
        if ours:
            mfu = lambda r: ours["useful_flops"] / sum(r["step_seconds"]) / peak_flops  # noqa: E731
            add("sft: MFU (useful FLOP/s ÷ GEMM peak)", mfu(ours), theirs and mfu(theirs), None, unit="fraction")
        rss("sft", ours, theirs)
    for workload in ("reward", "dpo"):
        ours, theirs = pair(workload)
        if ours or theirs:
            add(
                f"{workload}: pairs/s",
                ours and per_second(ours),
                theirs and per_second(theirs),
                ">=1.5",
                unit="pairs/s",
            )
            rss(workload, ours, theirs)
    ours, theirs = pair("grpo")
    grpo_step = ours and mean(ours["step_seconds"])
    if ours or theirs:
        add("grpo: s/step", grpo_step, theirs and mean(theirs["step_seconds"]), "<=0.67", "lower", "s")
        for _framework, result in (("rlhfkit", ours), ("trl", theirs)):
            if result:
                result["split"] = {
                    "generation_s": mean(result["generation_seconds"]),
                    "training_s": mean(result["step_seconds"]) - mean(result["generation_seconds"]),
                }
        add(
            "grpo: generation s/step",
            ours and ours["split"]["generation_s"],
            theirs and theirs["split"]["generation_s"],
            None,
            "lower",
            "s",
        )
        add(
            "grpo: training s/step",
            ours and ours["split"]["training_s"],
            theirs and theirs["split"]["training_s"],
            None,
            "lower",
            "s",
        )
        add(
            "grpo: mean completion length",
            ours and ours["completion_length"],
            theirs and theirs["completion_length"],
            None,
            "",
            "tokens",
        )
        rss("grpo", ours, theirs)
    _, peer = pair("generation")
    copies = (
        ("generation_int8", "generation, int8 copy"),
        ("generation_bf16", "generation, bf16 copy"),
        ("generation_float32", "generation, float32 copy"),
    )
    for workload, label in (("generation", "generation"), *copies):
        ours, theirs = pair(workload)[0], peer
        if not ours and not (workload == "generation" and theirs):
            continue
        for batch in (ours or theirs)["batches"]:
            rate = lambda r: r and r["batches"][batch]["new_tokens"] / r["batches"][batch]["seconds"]  # noqa: B023 (called at once)
            add(f"{label}: new tokens/s, batch {batch}", rate(ours), rate(theirs), None, unit="tok/s")
            measured = ours or theirs
            if bandwidth and shape and "prompt_width" in measured["batches"][batch]:
                # the cache grows from the prompt's width by one position per step: its mean size
                context = measured["batches"][batch]["prompt_width"] + measured["new_tokens_per_row"] / 2
                bound = decode_bound(shape, int(batch), context, peak_flops, bandwidth, dtype_bytes)
                share = lambda r: r and rate(r) / bound  # noqa: B023 (called at once)
                add(
                    f"{label}: fraction of the bound ({bound:,.0f} tok/s), batch {batch}",
                    share(ours),
                    share(theirs),
                    None,
                    unit="fraction",
                )
        rss(workload, ours, theirs)
    _, trl_grpo = pair("grpo")
    for workload, label in COPY_RL:
        ours, own_peer = pair(workload)
        peer = own_peer or trl_grpo  # TRL's run of the same workload (its bf16), else its default GRPO
        if own_peer:
            label += " (TRL: bf16 autocast)"
        if ours and "step_seconds" in ours:
            theirs_step = peer and mean(peer["step_seconds"])
            add(f"{label}: s/step", mean(ours["step_seconds"]), theirs_step, "<=0.5", "lower", "s")
            theirs_generation = peer and mean(peer["generation_seconds"])
            add(f"{label}: generation s/step", mean(ours["generation_seconds"]), theirs_generation, None, "lower", "s")
            rss(workload, ours, peer)
    for workload in RLHFKIT_ONLY:
        ours, _ = pair(workload)
        if workload in dict(COPY_RL):
            continue
        if ours and "step_seconds" in ours:  # the RL steps (the copies' sampling is read above)
            step = mean(ours["step_seconds"])
            generation = mean(ours["generation_seconds"])
            rows.append(
                {
                    "metric": f"{workload}: s/step (no TRL trainer; ratio = ÷ rlhfkit GRPO)",
                    "rlhfkit": step,
                    "trl": None,
                    "ratio": step / grpo_step if grpo_step else None,
                    "target": None,
                    "met": None,
                    "better": "lower",
                    "unit": "s",
                    "split": {"generation_s": generation, "training_s": step - generation},
                }
            )
            for name, key in (("peak RSS", "peak_rss_mb"), ("peak GPU memory", "peak_gpu_mb")):
                if ours.get(key):
                    rows.append(
                        {
                            "metric": f"{workload}: {name}",
                            "rlhfkit": ours[key],
                            "trl": None,
                            "ratio": None,
                            "target": None,
                            "met": None,
                            "better": "lower",
                            "unit": "MB",
                        }
                    )
    return rows


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| metric | rlhfkit | TRL | rlhfkit ÷ TRL | target | met |", "|---|---|---|---|---|---|"]
    for row in rows:
        met = {True: "yes", False: "**no**", None: ""}[row["met"]]
        unit = row["unit"]
        value = lambda v: _number(v) + (f" {unit}" if v is not None and unit not in ("", "fraction") else "")  # noqa: B023
        ours = value(row["rlhfkit"])
        if "split" in row:
            ours += f" (gen {_number(row['split']['generation_s'])} + train {_number(row['split']['training_s'])})"
        lines.append(
            f"| {row['metric']} | {ours} | {value(row['trl'])} | {_number(row['ratio'])} | {row['target'] or ''} | {met} |"
        )
    return "\n".join(lines)


def plot_ratios(rows: list[dict], path: Path) -> None:
    """Bars of rlhfkit's advantage (> 1: rlhfkit better) for every row with both figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row["ratio"] and row["trl"] is not None and row["better"] in ("higher", "lower")]
    advantage = [row["ratio"] if row["better"] == "higher" else 1 / row["ratio"] for row in shown]
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.2))
    colours = ["#2a9d8f" if value >= 1 else "#e76f51" for value in advantage]
    axes.barh([row["metric"] for row in shown], advantage, color=colours)
    for row_index, row in enumerate(shown):
        if row["target"]:
            bound = float(row["target"][2:])
            goal = bound if row["better"] == "higher" else 1 / bound
            axes.plot([goal, goal], [row_index - 0.4, row_index + 0.4], color="black", linewidth=2)
    axes.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.invert_yaxis()
    axes.set_xlabel("rlhfkit advantage over TRL (× ; > 1 is better; black tick = target)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# Busy for `duty` of every 100 ms, asleep for the rest: 1.0 is a build or an indexer, ~0.3 a
# browser playing a video.
COMPETITOR = """
import sys, time
duty = float(sys.argv[1])
while True:
    started = time.perf_counter()
    while time.perf_counter() - started < duty * 0.1:
        pass
    if duty < 1:
        time.sleep((1 - duty) * 0.1)
"""


@contextmanager
def busy_competitors(count: int, duty: float = 1.0) -> Iterator[None]:
    """`count` processes that each keep a core busy `duty` of the time (a browser, an IDE, an
    indexer stand-in) while the block runs; stopped however it ends."""
    processes = [
        subprocess.Popen([sys.executable, "-c", COMPETITOR, str(duty)], stdin=subprocess.DEVNULL) for _ in range(count)
    ]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rlhfkit vs TRL, side by side.")
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    parser.add_argument("--model", default=None, help="override the suite's model (e.g. a local tiny model dir)")
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, default=None, help="run only these workloads")
    parser.add_argument("--frameworks", nargs="+", choices=("rlhfkit", "trl"), default=["rlhfkit", "trl"])
    parser.add_argument(
        "--output", type=Path, default=None, help="results file stem (default: docs/benchmark-results/SUITE)"
    )
    parser.add_argument(
        "--competitors",
        type=int,
        default=0,
        help="busy processes (one core each) running beside every workload: the machine shared with other work",
    )
    parser.add_argument(
        "--competitor-duty",
        type=float,
        default=1.0,
        help="fraction of each 100 ms a competitor is busy (1.0: always; 0.3: browser-like bursts)",
    )
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="each framework's workloads in one process: they start quicker, but peak RSS is no longer each one's own",
    )
    args = parser.parse_args(argv)
    if args.competitors < 0:
        parser.error("--competitors must be >= 0")
    if not 0 < args.competitor_duty <= 1:
        parser.error("--competitor-duty must be in (0, 1]")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    suite = SUITES[args.suite]
    model = args.model or suite.model
    output = args.output or RESULTS_DIR / suite.name
    output.parent.mkdir(parents=True, exist_ok=True)

    from benchmarks.data import prepare
    from rlhfkit.models import load_tokenizer, resolve

    started = time.perf_counter()
    env = environment()
    peak, bandwidth = gemm_peak_flops(suite), memory_bandwidth(suite)
    print(
        f"{env['gpu'] or env['cpu']}, {env['cores']} cores, torch {env['versions']['torch']}; "
        f"{suite.dtype} GEMM peak {peak / 1e9:.1f} GFLOP/s, memory read {bandwidth / 1e9:.1f} GB/s",
        flush=True,
    )
    import torch

    from benchmarks.workloads import model_shape

    # the sampling bound holds for plain weights (a 4-bit base reads differently)
    shape = None if suite.load_in_4bit else model_shape(model)
    dtype_bytes = getattr(torch, suite.dtype).itemsize
    results: dict[str, dict[str, dict]] = {}

    def write_report() -> dict:
        """RESULTS.json with every workload finished so far (rewritten after each: a run cut short keeps them)."""
        report = {
            "suite": suite.as_dict(),
            "model": model,
            "environment": env,
            "gemm_peak_flops": peak,
            "memory_bandwidth": bandwidth,
            "model_shape": shape,
            "competitors": args.competitors,
            "competitor_duty": args.competitor_duty,
            "data": data,
            "results": results,
            "table": summarise(results, peak, bandwidth, shape, dtype_bytes),
            "total_seconds": time.perf_counter() - started,
        }
        output.with_suffix(".json").write_text(json_text(report, indent=2))
        return report

    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-") as tmp, open(output.with_suffix(".log"), "w") as log:
        workdir = Path(tmp)
        data = prepare(suite, load_tokenizer(resolve(model)), workdir)
        plan = [
            (workload, framework)
            for workload in args.only or WORKLOADS
            for framework in args.frameworks
            if not (framework == "trl" and workload in RLHFKIT_ONLY)
        ]
        if args.one_process:
            batches = [[w for w, f in plan if f == framework] for framework in args.frameworks]
            batches = [(batch, framework) for batch, framework in zip(batches, args.frameworks) if batch]
        else:
            batches = [([workload], framework) for workload, framework in plan]
        for workloads, framework in batches:
            print(f"{' '.join(workloads):>10} / {framework:<8} ...", end=" ", flush=True)
            with busy_competitors(args.competitors, args.competitor_duty):
                done = run_workloads(workloads, framework, suite, model, workdir, log)
            for result in done:
                results.setdefault(result["workload"], {})[framework] = result
            failures = [f"{r['workload']}: {r['error']}" for r in done if "error" in r]
            seconds = sum(r["wall_seconds"] for r in done if "error" not in r)
            print("FAILED: " + "\n".join(failures) if failures else f"{seconds:.0f} s", flush=True)
            write_report()
    report = write_report()
    rows = report["table"]
    table = markdown_table(rows)
    machine = f"{env['gpu']} · {env['cpu']}" if suite.device == "cuda" else env["cpu"]
    heading = f"{env['date']} · {machine} · {env['cores']} cores · {suite.dtype}{' (4-bit base)' if suite.load_in_4bit else ''}"
    versions = env["versions"]
    heading += " · gradient checkpointing" if suite.gradient_checkpointing else ""
    heading += f" · torch {versions['torch']} · transformers {versions['transformers']} · trl {versions['trl']}"
    if args.competitors:
        duty = f" ({args.competitor_duty:.0%} of the time)" if args.competitor_duty < 1 else ""
        heading += f" · beside {args.competitors} busy process(es){duty}"
    output.with_suffix(".md").write_text(f"{heading}\n\n{table}\n")
    plot_ratios(rows, output.parent / f"{output.name}-ratios.png")
    print(f"\n{heading}\n\n{table}\n\nwrote {output}.json/.md/-ratios.png in {report['total_seconds'] / 60:.1f} min")
    failed = [f"{w}/{f}" for w, by in results.items() for f, r in by.items() if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)} (see {output}.log)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
