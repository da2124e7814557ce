"""A run left with nothing to train on stops at once with one line naming the counts; it never
loops for ever (max_steps set) nor finishes "done" after 0 steps (no max_steps)."""

import pytest

from conftest import QUESTIONS, write_jsonl
from rlhfkit.cli import main

LONG = "word " * 400


@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_steps", [["--set", "train.max_steps=3"], []])
@pytest.mark.parametrize(
    "stage, rows",
    [
        ("sft", [{"prompt": q, "completion": LONG} for q in QUESTIONS]),
        ("dpo", [{"prompt": q, "chosen": LONG, "rejected": LONG + "no"} for q in QUESTIONS]),
        ("reward", [{"prompt": q, "chosen": LONG, "rejected": LONG + "no"} for q in QUESTIONS]),
    ],
)
def test_every_example_skipped_as_overlong_stops_naming_the_counts(
    tiny_model, tmp_path, capsys, stage, rows, max_steps
):
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    settings = [
        f"model.name_or_path={tiny_model}",
        f"data.path={data}",
        "data.max_length=32",
        "data.overlong=skip",
        f"train.output_dir={tmp_path / 'run'}",
        "train.trackers=[]",
        "data.eval_fraction=0.25",
    ]
    code = main([stage, *[arg for setting in settings for arg in ("--set", setting)], *max_steps])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert (
        "nothing to train on" in err
        and "0 train" in err
        and "6 rows" in err
        and not (tmp_path / "run" / "final").exists()
    )


@pytest.mark.timeout(120)
def test_an_rl_run_without_training_prompts_stops_naming_the_counts(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 2 + 2?"}])
    code = main(
        [
            "grpo",
            "--set",
            f"model.name_or_path={tiny_model}",
            "--set",
            f"data.path={data}",
            "--set",
            "data.eval_fraction=0.99",
            "--set",
            f"train.output_dir={tmp_path / 'run'}",
            "--set",
            "train.trackers=[]",
            "--set",
            "train.max_steps=2",
            "--set",
            "reward.function=math:fsum",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no training rows left" in err, err
