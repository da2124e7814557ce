"""The benchmark harness: its arithmetic by hand, and a smoke run of every workload on a tiny model.

Timings are never asserted: only that every workload ran for both tools and reported its figures.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from launching import run_bounded

from benchmarks.run import decode_bound, markdown_table, summarise
from benchmarks.suites import RLHFKIT_ONLY, WORKLOADS
from rlhfkit.engine.distributed import cpu_has_bf16_matmul

REPO = Path(__file__).resolve().parents[1]


def _by_metric(rows: list[dict]) -> dict[str, dict]:
    return {row["metric"]: row for row in rows}


def test_summary_ratios_targets_and_splits_by_hand():
    results = {
        "sft": {
            "rlhfkit": {"units": 600, "step_seconds": [1.0, 1.0], "peak_rss_mb": 100.0, "useful_flops": 1e12},
            "trl": {"units": 300, "step_seconds": [2.0, 1.0], "peak_rss_mb": 200.0},
        },
        "grpo": {
            "rlhfkit": {
                "step_seconds": [2.0, 4.0],
                "generation_seconds": [1.0, 1.0],
                "completion_length": 10.0,
                "peak_rss_mb": 50.0,
            },
            "trl": {
                "step_seconds": [6.0, 6.0],
                "generation_seconds": [3.0, 3.0],
                "completion_length": 12.0,
                "peak_rss_mb": 40.0,
            },
        },
        "ppo": {"rlhfkit": {"step_seconds": [6.0, 6.0], "generation_seconds": [2.0, 2.0], "peak_rss_mb": 70.0}},
        "dpo": {"rlhfkit": {"units": 8, "step_seconds": [4.0], "peak_rss_mb": 10.0}, "trl": {"error": "boom"}},
    }
    rows = _by_metric(summarise(results, peak_flops=1e12))
    sft = rows["sft: training tokens/s"]
    assert (sft["rlhfkit"], sft["trl"], sft["ratio"], sft["met"]) == (300.0, 100.0, 3.0, True)  # 600/2 vs 300/3
    mfu = rows["sft: MFU (useful FLOP/s ÷ GEMM peak)"]
    assert mfu["rlhfkit"] == pytest.approx(0.5) and mfu["trl"] == pytest.approx(1 / 3)  # 1e12 FLOP in 2 s and 3 s
    assert rows["sft: peak RSS"]["ratio"] == 0.5 and rows["sft: peak RSS"]["met"] is True
    grpo = rows["grpo: s/step"]
    assert (grpo["rlhfkit"], grpo["trl"], grpo["ratio"], grpo["met"]) == (3.0, 6.0, 0.5, True)
    assert rows["grpo: training s/step"]["rlhfkit"] == 2.0 and rows["grpo: generation s/step"]["trl"] == 3.0
    assert rows["grpo: peak RSS"]["met"] is False  # 50 MB > 40 MB
    ppo = rows["ppo: s/step (no TRL trainer; ratio = ÷ rlhfkit GRPO)"]
    assert ppo["ratio"] == 2.0 and ppo["split"] == {"generation_s": 2.0, "training_s": 4.0}
    dpo = rows["dpo: pairs/s"]  # a failed TRL run leaves its column empty instead of breaking the table
    assert dpo["rlhfkit"] == 2.0 and dpo["trl"] is None and dpo["ratio"] is None and dpo["met"] is None
    table = markdown_table(list(rows.values()))
    assert "| sft: training tokens/s | 300 tok/s | 100 tok/s | 3.00 | >=1.5 | yes |" in table
    assert "| grpo: peak RSS | 50.00 MB | 40.00 MB | 1.25 | <=1.0 | **no** |" in table
    assert not any("GPU" in metric for metric in rows)  # CPU runs report no GPU memory


def test_gpu_runs_add_a_peak_gpu_memory_row_per_workload():
    results = {
        "reward": {
            "rlhfkit": {"units": 8, "step_seconds": [2.0], "peak_rss_mb": 100.0, "peak_gpu_mb": 300.0},
            "trl": {"units": 8, "step_seconds": [4.0], "peak_rss_mb": 100.0, "peak_gpu_mb": 400.0},
        },
        "trpo": {
            "rlhfkit": {"step_seconds": [6.0], "generation_seconds": [2.0], "peak_rss_mb": 70.0, "peak_gpu_mb": 900.0}
        },
    }
    rows = _by_metric(summarise(results, peak_flops=1e12))
    gpu = rows["reward: peak GPU memory"]
    assert (gpu["rlhfkit"], gpu["trl"], gpu["ratio"], gpu["met"]) == (300.0, 400.0, 0.75, True)
    assert rows["trpo: peak GPU memory"]["rlhfkit"] == 900.0 and rows["trpo: peak GPU memory"]["trl"] is None


SHAPE = {"layers": 2, "hidden": 8, "kv_dim": 4, "body_params": 900, "head_params": 100}


def test_the_sampling_bound_by_hand():
    # a step reads (1000 weights + 2·2 layers·4 kv·10 positions·B rows) × 4 bytes and does
    # 2·1000·B + 4·2·8·10·B FLOPs
    memory_bound = decode_bound(SHAPE, batch=1, context=10, peak_flops=1e12, bandwidth=1160.0, dtype_bytes=4)
    assert memory_bound == pytest.approx(1 / ((1000 + 160) * 4 / 1160))  # 0.25 tok/s: 4 s per step
    compute_bound = decode_bound(SHAPE, batch=4, context=10, peak_flops=2640.0, bandwidth=1e12, dtype_bytes=4)
    assert compute_bound == pytest.approx(4 / ((2000 + 640) * 4 / 2640))  # 1 tok/s: 4 s per step


def test_sampling_reads_as_a_fraction_of_its_bound():
    batches = {"2": {"seconds": 4.0, "new_tokens": 8, "prompt_width": 6}}
    results = {
        "generation": {
            "rlhfkit": {"batches": batches, "new_tokens_per_row": 8, "peak_rss_mb": 1.0},
            "trl": {"batches": {"2": {**batches["2"], "seconds": 8.0}}, "new_tokens_per_row": 8, "peak_rss_mb": 1.0},
        },
        "generation_int8": {
            "rlhfkit": {"batches": {"2": {**batches["2"], "seconds": 2.0}}, "new_tokens_per_row": 8, "peak_rss_mb": 1.0}
        },
        "generation_bf16": {
            "rlhfkit": {"batches": {"2": {**batches["2"], "seconds": 1.0}}, "new_tokens_per_row": 8, "peak_rss_mb": 1.0}
        },
    }
    bound = decode_bound(SHAPE, 2, 6 + 8 / 2, 1e12, 4000.0, 4)  # context: prompt width + half the new tokens
    rows = _by_metric(summarise(results, peak_flops=1e12, bandwidth=4000.0, shape=SHAPE))
    share = rows[f"generation: fraction of the bound ({bound:,.0f} tok/s), batch 2"]
    assert share["rlhfkit"] == pytest.approx(2.0 / bound) and share["trl"] == pytest.approx(1.0 / bound)
    assert share["ratio"] == pytest.approx(2.0)
    # the rollout copies read against the same peer (generate) and the same bound
    int8_rate = rows["generation, int8 copy: new tokens/s, batch 2"]
    assert int8_rate["rlhfkit"] == pytest.approx(4.0) and int8_rate["ratio"] == pytest.approx(4.0)
    int8_share = rows[f"generation, int8 copy: fraction of the bound ({bound:,.0f} tok/s), batch 2"]
    assert int8_share["rlhfkit"] == pytest.approx(4.0 / bound)
    assert rows["generation, bf16 copy: new tokens/s, batch 2"]["ratio"] == pytest.approx(8.0)
    assert not any("bound" in metric for metric in _by_metric(summarise(results, peak_flops=1e12)))


def run_smoke_benchmark(model: Path, output: Path, *options: str, seconds: int):
    """`benchmarks.run --suite smoke` on `model`, results under `output`, in a bounded subprocess."""
    command = [sys.executable, "-m", "benchmarks.run", "--suite", "smoke", "--model", str(model)]
    return run_bounded([*command, "--output", str(output), *options], seconds=seconds, cwd=REPO)


# The bf16 rollout copy and update need bf16 matrix instructions (refused on CPUs without them).
BF16_WORKLOADS = ("generation_bf16", "grpo_bf16", "grpo_bf16_mixed")


@pytest.mark.slow
def test_smoke_suite_runs_every_workload_for_both_tools(tiny_model, tmp_path):
    output = tmp_path / "smoke"
    workloads = [workload for workload in WORKLOADS if cpu_has_bf16_matmul() or workload not in BF16_WORKLOADS]
    # one process per tool: each workload's own process would add ~5 s of imports to it
    process = run_smoke_benchmark(tiny_model, output, "--only", *workloads, "--one-process", seconds=900)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    report = json.loads(output.with_suffix(".json").read_text())
    assert set(report["results"]) == set(workloads) >= {"sft", "reward", "dpo", "grpo", "generation", "ppo", "trpo"}
    for workload, by_tool in report["results"].items():
        tools = {"rlhfkit"} if workload in RLHFKIT_ONLY else {"rlhfkit", "trl"}
        assert set(by_tool) == tools
        for result in by_tool.values():
            assert "error" not in result and result["peak_rss_mb"] > 0
            timings = result.get("step_seconds") or [b["seconds"] for b in result["batches"].values()]
            assert timings and all(t > 0 for t in timings)
    assert report["gemm_peak_flops"] > 0 and report["memory_bandwidth"] > 0 and report["environment"]["versions"]["trl"]
    assert any("fraction of the bound" in row["metric"] for row in report["table"])
    assert all(row["rlhfkit"] is not None for row in report["table"])
    assert "| sft: training tokens/s |" in output.with_suffix(".md").read_text()
    assert (tmp_path / "smoke-ratios.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_workload_runs_beside_busy_competitors_that_stop_after_it(tiny_model, tmp_path):
    import psutil

    from benchmarks.run import busy_competitors

    with busy_competitors(2):
        children = psutil.Process().children()
        assert len(children) == 2 and all(child.is_running() for child in children)
        time.sleep(0.5)
        assert all(child.cpu_percent(interval=0.2) > 50 for child in children)  # each keeps a core busy
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    output = tmp_path / "contended"
    process = run_smoke_benchmark(
        tiny_model, output, "--only", "sft", "--frameworks", "rlhfkit", "--competitors", "1", seconds=600
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    report = json.loads(output.with_suffix(".json").read_text())
    assert report["competitors"] == 1 and "error" not in report["results"]["sft"]["rlhfkit"]
    assert "beside 1 busy process(es)" in output.with_suffix(".md").read_text()


@pytest.mark.slow
def test_processes_benchmark_runs_one_and_two_processes(tiny_model, tmp_path):
    output = tmp_path / "processes"
    done = run_bounded(
        [
            sys.executable,
            "-m",
            "benchmarks.processes",
            "--suite",
            "smoke",
            "--model",
            str(tiny_model),
            "--output",
            str(output),
            "--workdir",
            str(tmp_path / "work"),
            "--launch-configs",
            "cpu.yaml",  # (DeepSpeed and FSDP launches: tests/distributed)
        ],
        seconds=900,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(output.with_suffix(".json").read_text())["results"]
    for workload in ("sft", "grpo"):
        alone, *split = results[workload]
        assert [run["processes"] for run in results[workload]] == [1, 2]
        assert [run["launch"] for run in split] == ["cpu.yaml"]
        for run in split:  # one global batch: one loss curve
            assert run["losses"] == pytest.approx(alone["losses"], rel=1e-3, abs=1e-6)
        assert all(0 < run["peak_rss_gb"] < 24 for run in results[workload])
    assert "| grpo | 2 | cpu.yaml |" in output.with_suffix(".md").read_text()


def test_grpo_on_a_rollout_copy_reads_against_trls_grpo_step():
    trl = {"step_seconds": [10.0], "generation_seconds": [6.0], "completion_length": 40.0, "peak_rss_mb": 2.0}
    copy = {"step_seconds": [4.0, 6.0], "generation_seconds": [2.0, 2.0], "peak_rss_mb": 1.0}
    rows = _by_metric(summarise({"grpo": {"trl": trl}, "grpo_int8": {"rlhfkit": copy}}, peak_flops=1e12))
    step = rows["grpo, int8 copy: s/step"]
    assert step["rlhfkit"] == pytest.approx(5.0) and step["ratio"] == pytest.approx(0.5) and step["met"]
    assert rows["grpo, int8 copy: generation s/step"]["ratio"] == pytest.approx(2.0 / 6.0)
    assert not any(metric.startswith("grpo_int8: s/step") for metric in rows)  # not read as a lone workload
    # a copy workload TRL also ran (its bf16 autocast) reads against that run, not TRL's default GRPO
    trl_bf16 = {**trl, "step_seconds": [8.0], "generation_seconds": [5.0]}
    both = {"grpo": {"trl": trl}, "grpo_bf16_mixed": {"rlhfkit": copy, "trl": trl_bf16}}
    mixed = _by_metric(summarise(both, peak_flops=1e12))["grpo, bf16 copy + bf16 update (TRL: bf16 autocast): s/step"]
    assert mixed["trl"] == pytest.approx(8.0) and mixed["ratio"] == pytest.approx(5.0 / 8.0) and not mixed["met"]
