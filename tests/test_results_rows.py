"""scripts/results_rows.py on run directories written by hand: the paired comparison with a baseline run."""

import json

import pytest
import yaml

from scripts.results_rows import table


def fake_run(folder, after_rewards, seed=1234):
    folder.mkdir()
    (folder / "run.json").write_text(
        json.dumps(
            {
                "status": "complete",
                "command": f"rlhfkit grpo {folder.name}.yaml",
                "started": "2026-12-06T10:00:00+00:00",
                "finished": "2026-12-06T10:08:30+00:00",
            }
        )
    )
    config = {"reward": {"function": "m:numeric_answer"}, "data": {"path": "builtin:arithmetic"}}
    config["eval"] = {"num_prompts": 2, "samples_per_prompt": 2, "seed": seed}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    before = {"reward_mean": 0.25, "reward_stderr": 0.25, "sample_rewards": [0.0, 1.0, 0.0, 0.0], "answers": ["a", "b"]}
    mean = sum(after_rewards) / len(after_rewards)
    after = {"reward_mean": mean, "reward_stderr": 0.1, "sample_rewards": after_rewards, "answers": ["c", "d"]}
    (folder / "metrics.json").write_text(json.dumps({"before": before, "after": {**after, "kl": 1.5}}))
    return folder


def test_rows_compare_each_run_with_the_baseline_slot_by_slot(tmp_path):
    grpo = fake_run(tmp_path / "grpo", [0.0, 1.0, 0.0, 1.0])
    gspo = fake_run(tmp_path / "gspo", [1.0, 1.0, 0.0, 1.0])
    steps = [{"step": 1, "train/time_generation_s": 2.0, "train/time_update_s": 1.0}]
    steps.append({"step": 2, "train/time_generation_s": 3.0, "train/time_update_s": 2.0})
    (gspo / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in steps))
    written = table([grpo, gspo], baseline=grpo)
    assert "| run | reward | held-out | before | after | vs `grpo` (paired) | judges (before → after) |" in written
    # slot differences 1, 0, 0, 0: mean 0.25, s = 0.5, standard error 0.25
    assert "| **0.750 ± 0.100** | +0.250 ± 0.250 | – | 1.50 | 8 min 30 s | 4.0 |" in written  # (3 + 5) / 2
    assert "| **0.500 ± 0.100** | — | – | 1.50 | 8 min 30 s | – |" in written
    assert "vs `grpo`" not in table([gspo])

    other = fake_run(tmp_path / "other-seed", [1.0, 1.0, 1.0, 1.0], seed=7)
    with pytest.raises(SystemExit, match="differ in data.path or eval"):
        table([other], baseline=grpo)


def test_a_resumed_run_counts_the_time_it_ran_not_the_time_it_lay_stopped(tmp_path):
    run = fake_run(tmp_path / "grpo", [0.0, 1.0, 0.0, 1.0])
    marker = json.loads((run / "run.json").read_text())  # 10:00 to 10:08:30
    marker |= {"stopped": ["2026-12-06T10:02:00+00:00"], "resumed": ["2026-12-06T10:05:00+00:00"]}
    (run / "run.json").write_text(json.dumps(marker))
    assert "| 5 min 30 s in 2 sittings |" in table([run])
    del marker["stopped"]  # a run.json written before resumes recorded the last write
    (run / "run.json").write_text(json.dumps(marker))
    assert "| 8 min 30 s (resumed: includes the time it lay stopped) |" in table([run])


def test_a_held_out_judge_gets_its_paired_gain_and_win_rate_over_the_start(tmp_path):
    run = fake_run(tmp_path / "ppo", [0.0, 1.0, 0.0, 1.0])
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["before"]["judges"] = {"gold": {"mean": 0.0, "stderr": 0.1, "samples": [0.0, 0.0, 1.0, 0.0]}}
    metrics["after"]["judges"] = {"gold": {"mean": 0.75, "stderr": 0.2, "samples": [1.0, 1.0, 1.0, 0.0]}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    written = table([run])
    # slot differences 1, 1, 0, 0: mean 0.5, s = 0.577, standard error 0.289; 2 wins, 2 ties of 4
    assert "gold: 0.000 ± 0.100 → 0.750 ± 0.200 (paired +0.500 ± 0.289; after beats before on 0.75 [" in written


def test_reward_model_runs_get_their_own_table_with_accuracy_per_source(tmp_path):
    run = tmp_path / "rm"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps(
            {
                "stage": "reward",
                "status": "complete",
                "command": "rlhfkit reward rm.yaml",
                "started": "2026-12-07T10:00:00+00:00",
                "finished": "2026-12-07T10:11:53+00:00",
                "environment": {"cpu": "AMD EPYC", "cores": 2, "torch": "2.13.0", "cpu_instructions": "AVX2"},
            }
        )
    )
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"path": "hh/pairs.jsonl"}}))
    after = {"accuracy": 0.579, "pairs": 401, "reward_mean": -0.45, "margin": 0.1}
    after |= {"accuracy/hh": 0.569, "pairs/hh": 360, "accuracy/oasst": 0.659, "pairs/oasst": 41}
    (run / "metrics.json").write_text(json.dumps({"before": {"accuracy": 0.5, "pairs": 401}, "after": after}))
    grpo = fake_run(tmp_path / "grpo", [0.0, 1.0, 0.0, 1.0])
    written = table([run, grpo])
    assert "| run | held-out | accuracy: before | after | after, per source | time |" in written
    assert (
        "| `rlhfkit reward rm.yaml` | 401 pairs | 0.500 | **0.579** | hh: 0.569 (360); oasst: 0.659 (41) | 11 min 53 s |"
        in written
    )
    assert "- `" + str(run) + "`: 2026-12-07, rlhfkit ?, torch 2.13.0, on AMD EPYC, AVX2 (2 cores)." in written
    assert "| `rlhfkit grpo grpo.yaml` |" in written  # the RL run keeps its own table


def stage_run(folder, command, times, config, metrics):
    """A finished run of the stage named by `folder` on 2026-12-07, (start, finish) times of day."""
    folder.mkdir()
    marker = {"stage": folder.name, "status": "complete", "command": command}
    marker |= {"started": f"2026-12-07T{times[0]}+00:00", "finished": f"2026-12-07T{times[1]}+00:00"}
    (folder / "run.json").write_text(json.dumps(marker))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_any_other_stage_gets_its_held_out_measurements_as_the_report_lists_them(tmp_path):
    sides = {"before": {"perplexity": 2.731, "rouge_l": 0.2249}, "after": {"perplexity": 1.116, "rouge_l": 0.7857}}
    run = stage_run(tmp_path / "sft", "rlhfkit sft my.yaml", ("10:00:00", "10:07:15"), {"data": {}}, sides)
    written = table([run])
    assert written.startswith("| run | held-out | before | after | time |")
    assert "| `rlhfkit sft my.yaml` | response perplexity (held-out pairs) | 2.73 | 1.12 | 7 min 15 s |" in written
    assert "|  | ROUGE-L of answers | 0.225 | 0.786 |  |" in written


def test_an_evaluation_run_gives_its_comparison_table_from_metrics_json(tmp_path):
    common = {"kl_stderr": 0.5, "length": 63.0, "length_stderr": 3.0, "distinct_2": 0.83}
    models = {
        "sft": {**common, "perplexity": 9.5, "reward_mean": 1.0, "reward_stderr": 0.1, "kl": 0.0},
        "ppo": {**common, "perplexity": 9.9, "reward_mean": 1.4, "reward_stderr": 0.05, "kl": 6.0}
        | {"win_rate": 0.79, "win_rate_low": 0.62, "win_rate_high": 0.90},
    }
    summary = {"models": models, "order": ["sft", "ppo"], "baseline": "sft", "reference": "sft", "judges": {}}
    command = "rlhfkit pipeline configs/quickstart.yaml"
    run = stage_run(tmp_path / "evaluate", command, ("08:38:00", "08:40:20"), {"baseline": "sft"}, summary)
    written = table([run])
    assert "| ppo | 9.90 | 1.400 ± 0.098 | 0.79 [0.62, 0.90] | 6.00 ± 0.98 |" in written
    assert "`rlhfkit pipeline configs/quickstart.yaml`, evaluate stage: 2 min 20 s" in written


def test_a_run_evaluated_during_training_gets_its_proxy_and_judges_at_every_step(tmp_path):
    run = fake_run(tmp_path / "ppo", [0.0, 1.0, 0.0, 1.0])
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["steps"] = 10
    metrics["before"].update(kl=0.0, judges={"gold": {"mean": 0.125, "stderr": 0.1, "samples": [0, 0, 0.5, 0]}})
    metrics["after"]["judges"] = {"gold": {"mean": 0.75, "stderr": 0.2, "samples": [1, 1, 1, 0]}}
    point = {"step": 5, "reward_mean": 0.375, "kl": 0.5, "judges": {"gold": {"mean": 0.25, "stderr": 0.1}}}
    metrics["during"] = [point]
    (run / "metrics.json").write_text(json.dumps(metrics))
    written = table([run])
    assert "| run | step | held-out training reward | judges | KL |" in written
    assert f"| `{run}` | 0 | 0.250 | gold: 0.125 | 0.00 |" in written
    assert "|  | 5 | 0.375 | gold: 0.250 | 0.50 |" in written
    assert "|  | 10 | 0.500 | gold: 0.750 | 1.50 |" in written
    assert "held-out training reward" not in table([fake_run(tmp_path / "grpo", [0.0, 1.0, 0.0, 1.0])])
