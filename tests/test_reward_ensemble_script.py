"""scripts/reward_ensemble_eval.py: held-out pair accuracy of reward runs alone and as an ensemble."""

import pytest
from test_reward_dpo_stages import stage_config

from conftest import write_jsonl
from rlhfkit.stages import reward
from scripts.reward_ensemble_eval import main, tables


def train(model, prefs, other, output_dir, *overrides):
    config = stage_config("reward", model, prefs, output_dir, f"data.mix=[{other}]", "eval.before=false", *overrides)
    return reward.run(config)


def test_members_score_as_their_runs_did_and_the_ensemble_is_reported(tiny_model, sft_rows, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    prefs = write_jsonl(
        tmp_path / "a" / "prefs.jsonl",
        [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "No idea, go away."} for r in sft_rows],
    )
    other = write_jsonl(
        tmp_path / "b" / "prefs.jsonl",
        [
            {"prompt": f"Count to {n}.", "chosen": " ".join(map(str, range(1, n + 1))), "rejected": "No."}
            for n in range(2, 14)
        ],
    )
    first = train(tiny_model, prefs, other, tmp_path / "rm1", "train.max_steps=3", "train.lr=3e-3")
    second = train(tiny_model, prefs, other, tmp_path / "rm2", "train.max_steps=1", "lora.r=4")
    written = tables([tmp_path / "rm1", tmp_path / "rm2"], penalty=1.0)
    for run, metrics in (("rm1", first), ("rm2", second)):
        after = metrics["after"]
        row = next(line for line in written.splitlines() if line.startswith(f"| `{tmp_path / run}`"))
        assert row == (
            f"| `{tmp_path / run}` | {after['accuracy/a/prefs.jsonl']:.3f} | {after['accuracy/b/prefs.jsonl']:.3f} "
            f"| {after['accuracy']:.3f} |"
        )
    assert "| reward model | a/prefs.jsonl (6) | b/prefs.jsonl (3) | all |" in written
    for objective in ("mean", "worst_case", "uncertainty_weighted (λ 1)"):
        assert f"| ensemble, {objective} |" in written
    assert "| a/prefs.jsonl | 6 |" in written  # the disagreement table, a row per source

    train(tiny_model, prefs, other, tmp_path / "rm3", "train.max_steps=1", "train.seed=7")
    with pytest.raises(SystemExit, match="rm3: trained on [0-9]+ of the held-out pairs of .*rm1"):
        main([str(tmp_path / "rm1"), str(tmp_path / "rm3")])
