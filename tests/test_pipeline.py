"""The pipeline on a tiny model: stage chaining, skip/resume, --from/--only, evaluate and the report."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import QUESTIONS, write_jsonl
from rlhfkit.cli import main
from rlhfkit.config.loading import load_config, load_pipeline
from rlhfkit.errors import ConfigError
from rlhfkit.metrics import rank_correlation
from rlhfkit.pipeline_runner import stage_status


@pytest.fixture()
def pipeline_file(tmp_path, tiny_model, sft_rows, text_rows):
    """A five-stage pipeline (pretrain, sft, reward, grpo rewarded by the reward model, evaluate) on the tiny model."""
    texts = write_jsonl(tmp_path / "corpus.jsonl", text_rows)
    sft = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    prefs = write_jsonl(
        tmp_path / "prefs.jsonl",
        [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "No idea, go away."} for r in sft_rows],
    )
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS * 2])
    common = {"lora": {"dropout": 0.0}}
    config = {
        "pipeline": {
            "output_dir": str(tmp_path / "run"),
            "model": str(tiny_model),
            "stages": ["pretrain", "sft", "reward", "grpo", "evaluate"],
        },
        "pretrain": {
            **common,
            "data": {"path": str(texts), "max_length": 32},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "trackers": [], "save_every": 1},
        },
        "sft": {
            **common,
            "data": {"path": str(sft), "eval_fraction": 0.25, "max_length": 96},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "trackers": []},
            "generation": {"num_prompts": 2, "max_new_tokens": 4},
        },
        "reward": {
            **common,
            "data": {"path": str(prefs), "eval_fraction": 0.25, "max_length": 96},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 3e-3, "trackers": []},
        },
        "grpo": {
            **common,
            "data": {"path": str(prompts), "eval_fraction": 0.25},
            "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "trackers": []},
            "eval": {"num_prompts": 2},
        },
        "evaluate": {
            "num_prompts": 3,
            "samples_per_prompt": 2,
            "sampling": {"max_new_tokens": 5},
            "extra_prompts": ["Explain quantum computing to a 10-year-old."],
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_stage_configs_chain_outputs_to_inputs(pipeline_file, tiny_model, tmp_path):
    pipeline, configs = load_pipeline(pipeline_file)
    run = tmp_path / "run"
    assert configs["pretrain"].model.name_or_path == str(tiny_model)
    assert configs["sft"].model.name_or_path == str(run / "pretrain")
    assert configs["reward"].model.name_or_path == str(run / "sft")
    assert configs["grpo"].model.name_or_path == str(run / "sft")
    assert configs["grpo"].reward.model == str(run / "reward") and configs["grpo"].reward.function is None
    assert [configs[s].train.output_dir for s in ("pretrain", "sft", "reward", "grpo")] == [
        str(run / s) for s in ("pretrain", "sft", "reward", "grpo")
    ]
    evaluate = configs["evaluate"]
    assert evaluate.models == {"base": str(tiny_model), "sft": str(run / "sft"), "grpo": str(run / "grpo")}
    assert evaluate.reward_model == str(run / "reward") and evaluate.baseline_name == "sft"
    assert evaluate.data.path == configs["sft"].data.path  # the same held-out pairs as SFT
    # A single-stage command on the same file follows the pipeline too (once the stage before has
    # written its model); explicit values win.
    (run / "pretrain").mkdir(parents=True)
    assert load_config("sft", pipeline_file).model.name_or_path == str(run / "pretrain")
    assert load_config("sft", pipeline_file, ["model.name_or_path=elsewhere"]).model.name_or_path == "elsewhere"
    pipeline, configs = load_pipeline(pipeline_file, ["pipeline.output_dir=other", "sft.train.lr=0.5"])
    assert configs["sft"].train.output_dir == str(Path("other") / "sft") and configs["sft"].train.lr == 0.5


@pytest.mark.parametrize(
    "override, message",
    [
        ("pipeline.stages=[sft, pretrain]", "stages must run in the order"),
        ("pipeline.stages=[sft, sft]", "listed twice"),
        ("pipeline.stages=[]", "at least one stage"),
        ("sft.train.lr=-1", "[sft]: train.lr"),
        ("evaluate.baseline=nobody", "baseline: 'nobody' is not one of models"),
        ("sftt.train.lr=1", "unknown top-level section(s) sftt"),
        ("sft=5", "[sft]: expected a section, got int"),
        ("pipeline.model=./no-such-model", "[pretrain]: model.name_or_path: model path does not exist"),
    ],
)
def test_pipeline_config_errors_name_the_stage_and_field(pipeline_file, override, message):
    with pytest.raises(ConfigError) as error:
        load_pipeline(pipeline_file, [override])
    assert message in str(error.value)


def test_a_single_stage_before_the_stage_it_needs_names_that_stage(pipeline_file, tmp_path, capsys):
    assert main(["sft", str(pipeline_file)]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'run' / 'pretrain'} does not exist yet: the pretrain stage writes it" in error
    assert f"rlhfkit pretrain {pipeline_file}" in error and "Traceback" not in error
    with pytest.raises(ConfigError, match=r"reward.model: .*/run/reward does not exist yet: the reward stage"):
        load_config("grpo", pipeline_file, [f"model.name_or_path={tmp_path}"])


def test_a_single_stage_names_an_unknown_top_level_section(pipeline_file):
    tree = yaml.safe_load(pipeline_file.read_text())
    tree["sftt"] = {"train": {"lr": 1.0}}
    pipeline_file.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"unknown top-level section\(s\) sftt"):
        load_config("pretrain", pipeline_file)


@pytest.mark.parametrize("reference", ["runs/quickstart/pretrain", "my runs/sft", "tests\\model"])
def test_a_missing_local_looking_model_is_named_not_sent_to_the_hub(reference, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"model.name_or_path: model path does not exist: {reference}")):
        load_config("sft", None, [f"model.name_or_path={reference}"])
    from rlhfkit.errors import UserError
    from rlhfkit.models import resolve

    with pytest.raises(UserError, match="model path does not exist"):
        resolve(reference)
    assert resolve("HuggingFaceTB/SmolLM2-135M").path == "HuggingFaceTB/SmolLM2-135M"  # a hub id stays one


def test_pipeline_runs_skips_and_reruns(pipeline_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pipeline", str(pipeline_file)]) == 0
    for stage in ("pretrain", "sft", "reward", "grpo", "evaluate"):
        assert stage_status(run / stage) == "complete", stage
    summary = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert summary["order"] == ["base", "sft", "grpo"] and summary["baseline"] == "sft"
    for name, metrics in summary["models"].items():
        for key in ("perplexity", "rouge_l", "reward_mean", "kl", "length", "distinct_1", "distinct_2"):
            assert key in metrics, (name, key)
        assert len(metrics["sample_rewards"]) == 4 * 2  # (3 held-out + 1 extra prompt) x 2 samples
    assert summary["models"]["sft"]["kl"] == 0.0  # the reference is the baseline, SFT
    assert "win_rate" in summary["models"]["grpo"] and "win_rate" not in summary["models"]["sft"]
    samples = [json.loads(line) for line in (run / "evaluate" / "samples.jsonl").read_text().splitlines()]
    assert samples[-1]["prompt"] == "Explain quantum computing to a 10-year-old."
    assert {"base", "sft", "grpo"} <= set(samples[0])

    report = (run / "report.html").read_text()
    for text in (
        "What each stage did",
        "Models compared",
        "Training curves",
        "Side by side",
        "report_files/grpo-curves.png",
    ):
        assert text in report
    assert (run / "report_files" / "comparison.png").stat().st_size > 1000
    assert "## Models compared" in (run / "report.md").read_text()

    # A second run skips every complete stage and changes nothing.
    before = (run / "sft" / "final" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["pipeline", str(pipeline_file)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 5
    assert (run / "sft" / "final" / "adapter_model.safetensors").read_bytes() == before

    # --only re-runs one stage and keeps the earlier output beside it; --from re-runs the rest.
    assert main(["pipeline", str(pipeline_file), "--only", "evaluate"]) == 0
    assert (run / "evaluate.previous" / "metrics.json").exists() and stage_status(run / "evaluate") == "complete"
    capsys.readouterr()
    assert main(["pipeline", str(pipeline_file), "--from", "grpo"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 3 and "grpo: running" in out and "evaluate: running" in out
    assert main(["pipeline", str(pipeline_file), "--from", "dpo"]) == 2  # not a stage of this pipeline


def test_killed_pipeline_resumes_from_the_last_checkpoint(pipeline_file, tmp_path):
    """SIGKILL during pretraining (after a checkpoint), then a plain re-run finishes every stage."""
    run = tmp_path / "run"
    config = yaml.safe_load(pipeline_file.read_text())
    config["pipeline"]["stages"] = ["pretrain", "sft"]
    config["pretrain"]["train"]["max_steps"] = 40
    pipeline_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "rlhfkit.cli", "pipeline", str(pipeline_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = run / "pretrain" / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(checkpoints.glob("step-*"))) < 2 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert stage_status(run / "pretrain") == "resumable"
    killed_at = max(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    assert killed_at < 40

    result = subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", "pipeline", str(pipeline_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pretrain: resuming" in result.stdout
    assert stage_status(run / "pretrain") == "complete" and stage_status(run / "sft") == "complete"
    steps = [json.loads(line)["step"] for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # every step logged once, none repeated after the resume
    assert (run / "sft" / "final").is_dir() and (run / "report.html").exists()


def test_held_out_prompts_honours_a_limit_of_zero():
    from rlhfkit.data.examples import ChatExample
    from rlhfkit.stages.sft import held_out_prompts

    example = ChatExample(({"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}), "f:1")
    assert held_out_prompts([example] * 3, 0) == ([], [])
    assert held_out_prompts([example] * 3, 2)[1] == ["A.", "A."]


def test_evaluate_command_compares_models_without_a_reward_model(
    tiny_model, tiny_plain_model, sft_rows, tmp_path, capsys
):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    config = tmp_path / "evaluate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "evaluate": {
                    "models": {"first": str(tiny_model), "second": str(tiny_model), "plain": str(tiny_plain_model)},
                    "data": {"path": str(data), "eval_fraction": 0.25},
                    "num_prompts": 3,
                    "sampling": {"max_new_tokens": 4},
                    "judge": str(tiny_model),
                    "output_dir": str(tmp_path / "eval"),
                }
            }
        )
    )
    assert main(["evaluate", str(config)]) == 0
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary["baseline"] == "first" and summary["reference"] == "first"
    first, second = summary["models"]["first"], summary["models"]["second"]
    assert first["kl"] == 0.0 and abs(second["kl"]) < 1e-4  # the same weights: no divergence
    assert first["length"] == second["length"] and "reward_mean" not in first and "win_rate" not in second
    # The LLM judge compares each model's answers with the baseline's; identical answers are ties.
    assert second["judge_win_rate"] == 0.5 and second["judge_ties"] == 3 and "judge_win_rate" not in first
    assert (
        0 <= summary["models"]["plain"]["judge_win_rate_low"] <= summary["models"]["plain"]["judge_win_rate_high"] <= 1
    )
    assert "| first (baseline) |" in (tmp_path / "eval" / "metrics.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(config), "--set", "baseline=nobody"]) == 2
    assert "baseline: 'nobody' is not one of models" in capsys.readouterr().err


def test_evaluate_scores_with_several_judges_and_marks_the_one_a_policy_was_trained_against(
    tiny_model, tiny_reward_model, sft_rows, tmp_path
):
    """Each judge scores every model's answers (mean, win rate against the baseline); a model whose
    training info names a judge as its reward has that judge marked, in metrics.json and with † in
    the table."""
    import shutil

    from rlhfkit.models import MODEL_INFO
    from rlhfkit.report import evaluation_markdown

    policy = tmp_path / "policy"
    shutil.copytree(tiny_model, policy)
    (policy / MODEL_INFO).write_text(json.dumps({"stage": "grpo", "reward": str(tiny_reward_model)}))
    judges_file = tmp_path / "judges.py"
    judges_file.write_text(
        "def length(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"
    )
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    config = tmp_path / "evaluate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "evaluate": {
                    "models": {"base": str(tiny_model), "policy": str(policy)},
                    "reward_model": str(tiny_reward_model),
                    "judges": {
                        "length": {"function": f"{judges_file}:length"},
                        "rm": {"model": str(tiny_reward_model)},
                    },
                    "data": {"path": str(data), "eval_fraction": 0.25},
                    "num_prompts": 3,
                    "samples_per_prompt": 2,
                    "sampling": {"max_new_tokens": 6},
                    "output_dir": str(tmp_path / "eval"),
                }
            }
        )
    )
    assert main(["evaluate", str(config)]) == 0
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    base, trained = summary["models"]["base"], summary["models"]["policy"]
    assert trained["trained_against"] == ["reward_model", "rm"] and "trained_against" not in base
    # The judge "rm" is the reward model itself: the same scores; the same weights answer alike.
    assert trained["judges"]["rm"]["reward_mean"] == pytest.approx(trained["reward_mean"], abs=1e-5)
    assert base["judges"]["length"]["reward_mean"] == trained["judges"]["length"]["reward_mean"] > 0
    assert trained["judges"]["length"]["win_rate"] == 0.5 and "win_rate" not in base["judges"]["length"]
    table = evaluation_markdown(summary)
    assert "judge rm (win rate)" in table and table.count("†") == 2
    # every answer's length and each judge's score of it are kept, and how the two go together
    assert len(trained["sample_lengths"]) == len(trained["judges"]["length"]["sample_rewards"]) == 6
    lengths = base["sample_lengths"] + trained["sample_lengths"]
    scores = base["judges"]["length"]["sample_rewards"] + trained["judges"]["length"]["sample_rewards"]
    correlation = summary["length_correlation"]
    assert set(correlation) == {"length", "rm", "reward_model"} and correlation["length"]["answers"] == 12
    expected = rank_correlation(lengths, scores)
    assert correlation["length"]["rho"] == (None if math.isnan(expected) else pytest.approx(expected))
    assert "Score against answer length (Spearman ρ over 12 answers" in table


def test_length_correlations_pool_every_models_answers_and_leave_out_unscored_ones():
    """Pooled over both models and within each one, worked by hand (ρ = 1 − 6Σd² / (n(n² − 1)))."""
    from rlhfkit.stages.evaluate import length_correlations

    results = {
        "sft": {
            "sample_lengths": [3, 9, 4],
            "sample_rewards": [0.1, 0.9, 0.3],
            "judges": {"j": {"sample_rewards": [1.0, None, 0.5]}},
        },
        "ppo": {
            "sample_lengths": [5, 7, 6],
            "sample_rewards": [0.5, 0.2, 0.4],
            "judges": {"j": {"sample_rewards": [3.0, 2.0, 2.5]}},
        },
    }
    correlations = length_correlations(results, ["j"], reward_model=True)
    # the reward model: length ranks 1 6 2 3 5 4 against score ranks 1 6 3 5 2 4: Σd² = 1 + 4 + 9 = 14,
    # ρ = 1 - 84/210 = 0.6; within sft the ranks agree (ρ 1), within ppo they are reversed (ρ -1)
    reward_model = correlations["reward_model"]
    assert reward_model["rho"] == pytest.approx(0.6) and reward_model["answers"] == 6
    assert reward_model["per_model"] == {"sft": pytest.approx(1.0), "ppo": pytest.approx(-1.0)}
    # judge j gave the 9-token answer no score: length ranks 1 2 3 5 4 against 2 1 5 3 4, Σd² = 10,
    # ρ = 1 - 60/120 = 0.5; sft has two scored answers left (no ρ below three), ppo's are reversed
    judge = correlations["j"]
    assert judge["rho"] == pytest.approx(0.5) and judge["answers"] == 5
    assert math.isnan(judge["per_model"]["sft"]) and judge["per_model"]["ppo"] == pytest.approx(-1.0)
