"""The report: tables, plots and side-by-side answers, checked as files and in headless Chromium."""

import json
import math
import shutil
from pathlib import Path

import pytest

from rlhfkit.cli import main
from rlhfkit.config import RewardHackingThresholds
from rlhfkit.metrics import (
    agreement,
    distinct_n,
    held_out_curve,
    mean_and_stderr,
    overoptimisation_signs,
    paired_difference,
    rank_correlation,
    reward_hacking_signs,
    wilson_interval,
    win_rate,
)
from rlhfkit.report import evaluation_markdown, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_distinct_n_counts_unique_word_ngrams():
    assert distinct_n(["the cat sat", "the cat ran"], 1) == 4 / 6
    assert distinct_n(["the cat sat", "the cat ran"], 2) == 3 / 4
    assert distinct_n(["a a a a"], 2) == 1 / 3


def test_win_rate_counts_ties_as_half_and_has_a_wilson_interval():
    result = win_rate([2.0, 1.0, 0.0, 5.0], [1.0, 1.05, 1.0, 1.0], tie_margin=0.1)
    assert result["win_rate"] == (1 + 0.5 + 0 + 1) / 4 and result["ties"] == 1
    # Wilson interval for 2.5 of 4 (z = 1.96), by hand: p = 0.625, centre 0.625 + 3.8416/8 = 1.1052,
    # spread 1.96·√(0.625·0.375/4 + 3.8416/64) = 0.6750, scale 1 + 3.8416/4 = 1.9604.
    low, high = wilson_interval(2.5, 4)
    assert low == pytest.approx(0.4302 / 1.9604, abs=1e-3) and high == pytest.approx(1.7802 / 1.9604, abs=1e-3)
    assert low < result["win_rate"] < high


def test_agreement_counts_a_tie_as_half_in_float32():
    import torch

    margins = torch.tensor([0.3, 0.0, -2.0, 1e-30], dtype=torch.bfloat16)
    assert agreement(margins).tolist() == [1.0, 0.5, 0.0, 1.0] and agreement(margins).dtype == torch.float32


def test_mean_and_stderr():
    mean, stderr = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and stderr == pytest.approx((5 / 3) ** 0.5 / 2)


def test_paired_difference_by_hand():
    # differences 1, 3 (the None slot is left out): mean 2, s = √2, s/√2 = 1
    assert paired_difference([2.0, 5.0, None], [1.0, 2.0, 7.0]) == pytest.approx((2.0, 1.0))
    assert paired_difference([1.0], [0.0]) is None


def test_rank_correlation_by_hand():
    assert rank_correlation([1, 2, 3, 4], [10.0, 20.0, 30.0, 45.0]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    # ties share their mean rank: x ranks 1, 2.5, 2.5, 4 and y ranks 1, 3, 2, 4, both centred on 2.5;
    # Σ dx·dy = 2.25 + 0 + 0 + 2.25 = 4.5, Σ dx² = 4.5, Σ dy² = 5, so ρ = 4.5 / √22.5
    assert rank_correlation([1, 2, 2, 3], [0.1, 0.3, 0.2, 0.4]) == pytest.approx(4.5 / 22.5**0.5)
    assert math.isnan(rank_correlation([5, 5, 5], [1.0, 2.0, 3.0]))  # no order in a constant sample
    assert math.isnan(rank_correlation([1, 2], [1.0, 2.0]))
    with pytest.raises(ValueError):
        rank_correlation([1, 2, 3], [1.0, 2.0])


def _point(step, proxy, judge):
    """A held-out evaluation whose answers got these training-reward and judge scores."""
    return {
        "step": step,
        "sample_rewards": proxy,
        "reward_mean": sum(proxy) / len(proxy),
        "judges": {"gold": {"mean": sum(judge) / len(judge), "samples": judge}},
    }


def test_overoptimisation_needs_the_judge_to_fall_beyond_its_error_while_the_proxy_rises():
    start = _point(0, [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    peak = _point(4, [1.0, 1.0, 1.0, 1.0], [2.0, 2.1, 1.9, 2.0])
    # From its best (step 4) the judge falls by −1.0, −1.1, −0.9, −1.1: −1.025, s/√4 = 0.048; the proxy rises 1.0.
    fallen = _point(8, [2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 0.9])
    (sign,) = overoptimisation_signs([start, peak, fallen])
    assert "gold fell -1.025 ± 0.048 (paired) from step 4 to step 8" in sign and "rose +1.000" in sign
    # The proxy fell too: the policy got worse, not over-optimised.
    assert overoptimisation_signs([start, peak, _point(8, [0.5] * 4, [1.0, 1.0, 1.0, 0.9])]) == []
    # Still rising, or a fall inside two paired standard errors: no sign.
    assert overoptimisation_signs([start, peak]) == []
    noisy = _point(8, [2.0] * 4, [2.5, 1.5, 2.4, 1.4])  # −0.05 ± 0.32
    assert overoptimisation_signs([start, peak, noisy]) == []


def test_held_out_curve_orders_before_during_after():
    metrics = {
        "before": {"reward_mean": 0.1},
        "during": [{"step": 4, "reward_mean": 0.2}],
        "after": {"reward_mean": 0.3},
    }
    assert [(p["step"], p["reward_mean"]) for p in held_out_curve({**metrics, "steps": 8})] == [
        (0, 0.1),
        (4, 0.2),
        (8, 0.3),
    ]


def test_reward_hacking_signs_need_a_reward_gain():
    thresholds = RewardHackingThresholds()
    baseline = {"reward_mean": 1.0, "length": 40.0, "kl": 0.0, "distinct_2": 0.8}
    hacked = {"reward_mean": 3.0, "length": 90.0, "kl": 40.0, "distinct_2": 0.3}
    signs = reward_hacking_signs(hacked, baseline, thresholds)
    assert len(signs) == 3 and "2.2x as long" in signs[0]
    assert reward_hacking_signs({**hacked, "reward_mean": 0.5}, baseline, thresholds) == []
    assert (
        reward_hacking_signs({"reward_mean": 1.5, "length": 45.0, "kl": 3.0, "distinct_2": 0.75}, baseline, thresholds)
        == []
    )


def write_run(root: Path) -> dict[str, Path]:
    """A pipeline run directory as the stages write it (metrics.json, metrics.jsonl, evaluate/)."""
    stages = {
        "pretrain": {"perplexity": (18.2, 13.1)},
        "sft": {"perplexity": (11.8, 9.2), "rouge_l": (0.19, 0.25)},
        "reward": {"accuracy": (0.46, 1.0)},
        "ppo": {"reward_mean": (2.7, 3.6), "kl": (0.0, 3.4)},
    }
    for stage, values in stages.items():
        directory = root / stage
        directory.mkdir(parents=True)
        metrics = {"before": {k: v[0] for k, v in values.items()}, "after": {k: v[1] for k, v in values.items()}}
        (directory / "metrics.json").write_text(json.dumps(metrics))
        curve = [{"step": s, "train/loss": 2.0 / s, "train/lr": 1e-4} for s in range(1, 6)]
        if stage == "ppo":
            curve = [
                {
                    **r,
                    "train/reward_mean": 0.5 * r["step"],
                    "train/kl": 0.1 * r["step"],
                    "train/entropy": 1.0,
                    "train/length": 40.0,
                }
                for r in curve
            ]
        (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve) + '{"step": 6, "trai')
    evaluate = root / "evaluate"
    evaluate.mkdir()
    models = {
        "base": {
            "perplexity": 12.0,
            "rouge_l": 0.18,
            "reward_mean": 1.0,
            "reward_stderr": 0.2,
            "kl": 4.0,
            "length": 50.0,
            "distinct_2": 0.8,
            "win_rate": 0.3,
            "win_rate_low": 0.15,
            "win_rate_high": 0.5,
        },
        "sft": {
            "perplexity": 9.0,
            "rouge_l": 0.25,
            "reward_mean": 2.0,
            "reward_stderr": 0.2,
            "kl": 0.0,
            "length": 45.0,
            "distinct_2": 0.75,
        },
        "ppo": {
            "perplexity": 9.5,
            "rouge_l": 0.24,
            "reward_mean": 3.0,
            "reward_stderr": 0.2,
            "kl": 3.0,
            "length": 48.0,
            "distinct_2": 0.7,
            "win_rate": 0.8,
            "win_rate_low": 0.6,
            "win_rate_high": 0.9,
        },
    }
    summary = {
        "models": models,
        "order": ["base", "sft", "ppo"],
        "baseline": "sft",
        "reference": "sft",
        "reward_model": "runs/x/reward",
        "prompts": 13,
        "samples_per_prompt": 1,
        "sampling": {"temperature": 0.7},
        "warnings": {"ppo": ["an example warning"]},
        "length_correlation": {
            "reward_model": {"rho": 0.42, "answers": 39, "per_model": {"base": -0.1, "sft": 0.3, "ppo": None}},
            "gold": {"rho": None, "answers": 39},
        },
    }
    (evaluate / "metrics.json").write_text(json.dumps(summary))
    samples = [
        {
            "prompt": "Explain quantum computing to a 10-year-old.",
            "base": "Quantum is hard.",
            "sft": "Tiny bits can be two things.",
            "ppo": "<script>document.title='pwned'</script>Qubits are like coins spinning.",
        },
        {
            "prompt": "Why is the sky blue?",
            "base": "Sun.",
            "sft": "Blue light scatters.",
            "ppo": "Air scatters blue light most.",
            "reference": "Sunlight scatters; blue scatters most.",
        },
    ]
    (evaluate / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (root / "timings.json").write_text(json.dumps({"pretrain": 75.2, "sft": 190.0}))
    return {stage: root / stage for stage in [*stages, "evaluate"]}


def test_report_files_hold_tables_plots_and_escaped_answers(tmp_path):
    page = write_report(tmp_path, write_run(tmp_path)).read_text()
    assert "13.10" in page and "18.20" in page and "1 min 15 s" in page  # pretrain perplexity before/after, wall time
    assert "0.80 [0.60, 0.90]" in page  # PPO's win rate with its interval
    assert "2.000 ± 0.392" in page  # SFT's reward with a 95% interval (1.96 × 0.2)
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert "Possible reward hacking — ppo: an example warning" in page
    for name in ("comparison.png", "pretrain-curves.png", "ppo-curves.png"):
        assert (tmp_path / "report_files" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "report.md").read_text()
    assert "| ppo | 9.50 |" in markdown and "![ppo training curves](report_files/ppo-curves.png)" in markdown


def test_report_command_and_metrics_table(tmp_path, capsys):
    write_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists()
    assert main(["report", str(tmp_path / "absent")]) == 2
    table = evaluation_markdown(json.loads((tmp_path / "evaluate" / "metrics.json").read_text()))
    assert table.splitlines()[2].startswith("| base | 12.00 | 0.180 | 1.000 ± 0.392 | 0.30 [0.15, 0.50] |")
    assert "| sft (baseline) |" in table
    # how each judge's score follows answer length, below the table (null: a constant score)
    assert table.endswith(
        "\n\nScore against answer length (Spearman ρ over 39 answers of every model): the reward model +0.42 "
        "(within each model: base -0.10, sft +0.30, ppo n/a); gold n/a.\n"
    )
    assert "ppo n/a); gold n/a." in (tmp_path / "report.html").read_text()


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
)
def test_report_renders_in_headless_chromium(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    write_report(tmp_path, write_run(tmp_path))
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((tmp_path / "report.html").as_uri())
        assert page.title() == f"rlhfkit report — {tmp_path.name}"  # the <script> answer did not run
        assert page.locator("table.stages tbody tr").count() == 6
        assert page.locator("table.models tbody tr").count() == 3
        assert page.locator("table.models td").first.inner_text() == "base"
        images = page.locator("img")
        assert images.count() == 5  # comparison + four stages' curves
        for index in range(images.count()):
            assert images.nth(index).evaluate("img => img.complete && img.naturalWidth > 300"), images.nth(
                index
            ).get_attribute("src")
        assert "<script>" in page.locator("table.samples").inner_text()  # shown as text
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
