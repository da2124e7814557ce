"""Bad input × every stage: a non-zero exit and one line naming the file/row or the field, no traceback."""

from __future__ import annotations

import pytest

from rlhfkit.cli import main
from rlhfkit.data.examples import MAX_ROW_CHARACTERS

# One valid row per dataset kind; the cases below break it.
GOOD_ROWS = {
    "pretrain": '{"text": "The sun is a star."}',
    "sft": '{"prompt": "Why?", "completion": "Because."}',
    "reward": '{"prompt": "Why?", "chosen": "Because.", "rejected": "No."}',
    "dpo": '{"prompt": "Why?", "chosen": "Because.", "rejected": "No."}',
    "grpo": '{"prompt": "What is 2 + 2?", "answer": 4}',
    "ppo": '{"prompt": "What is 2 + 2?", "answer": 4}',
    "trpo": '{"prompt": "What is 2 + 2?", "answer": 4}',
}
MAIN_COLUMN = {
    "pretrain": "text",
    "sft": "completion",
    "reward": "chosen",
    "dpo": "rejected",
    "grpo": "prompt",
    "ppo": "prompt",
    "trpo": "prompt",
}
STAGES = list(GOOD_ROWS)


def data_cases(stage: str) -> dict[str, tuple[bytes, str]]:
    """name -> (file content, text the error must contain); FILE stands for the file's path."""
    good, column = GOOD_ROWS[stage], MAIN_COLUMN[stage]
    import json

    row = json.loads(good)
    with_value = lambda value: json.dumps({**row, column: value})  # noqa: E731
    lone_surrogate = with_value("ok\ud800")
    cases = {
        "empty file": (b"", "FILE: no rows"),
        "malformed JSON line": (f'{good}\n{{"text": \n'.encode(), "FILE:2"),
        "wrong encoding": (f"{good}\n".encode() + '{"text": "caf\u00e9"}\n'.encode("latin-1"), "FILE:2: not UTF-8"),
        "not an object": (f"{good}\n[1, 2]\n".encode(), "FILE:2"),
        "missing column": (f'{good}\n{{"other": "x"}}\n'.encode(), "FILE:2: missing column"),
        "empty string": (f"{good}\n{with_value('')}\n".encode(), "FILE:2"),
        "whitespace-only string": (f"{good}\n{with_value('   ')}\n".encode(), "FILE:2"),
        "non-string value": (f"{good}\n{with_value(17)}\n".encode(), "FILE:2"),
        # valid JSON, not valid Unicode: json.loads keeps the lone surrogate that "\ud800" escapes
        "lone surrogate": (f"{good}\n{lone_surrogate}\n".encode(), f"FILE:2: {column} is not valid Unicode"),
        "oversized row": (
            f"{good}\n{with_value('a' * (MAX_ROW_CHARACTERS + 1))}\n".encode(),
            "FILE:2: more than 8,000,000 characters of text",
        ),
    }
    if stage in ("reward", "dpo"):
        same = json.dumps({**row, "rejected": row["chosen"]})
        cases["chosen == rejected"] = (f"{good}\n{same}\n".encode(), "FILE:2: chosen and rejected are identical")
    return cases


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse
        code = exit.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, expected: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr and stderr.startswith("error: "), stderr
    assert expected in stderr, stderr


@pytest.mark.parametrize("stage", STAGES)
def test_bad_data_is_named_for_every_stage(stage, tiny_model, tmp_path, capsys):
    for case, (content, expected) in data_cases(stage).items():
        path = tmp_path / f"{stage}-{case.replace(' ', '_')}.jsonl"
        path.write_bytes(content)
        code, stderr = run_cli(
            capsys,
            stage,
            "--set",
            f"data.path={path}",
            "--set",
            f"model.name_or_path={tiny_model}",
            "--set",
            f"train.output_dir={tmp_path / 'runs' / case.replace(' ', '_')}",
            "--set",
            "data.eval_fraction=0",
        )
        assert_one_line_error(code, stderr, expected.replace("FILE", str(path)))


@pytest.mark.parametrize("stage", ["sft", "grpo", "ppo"])
def test_csv_rows_wider_than_the_header_are_named(stage, tiny_model, tmp_path, capsys):
    path = tmp_path / "rows.csv"
    header = "prompt,completion" if stage == "sft" else "prompt,answer"
    path.write_text(f"{header}\nWhy?,Because\nWhat is 2, plus 2?,4\n", encoding="utf-8")
    code, stderr = run_cli(
        capsys,
        stage,
        *("--set", f"data.path={path}", "--set", f"model.name_or_path={tiny_model}"),
        *("--set", f"train.output_dir={tmp_path / 'run'}", "--set", "data.eval_fraction=0"),
    )
    assert_one_line_error(code, stderr, f"{path}:3: 3 fields, but the header names 2")


CONFIG_CASES = {
    "unknown key": ("train.nonsense=1", "train.nonsense: unknown key"),
    "wrong type": ("train.batch_size=abc", "train.batch_size"),
    "zero size": ("train.batch_size=0", "train.batch_size: Input should be greater than 0"),
    "negative size": ("train.lr=-1", "train.lr: Input should be greater than 0"),
    "missing data file": ("data.path=/nonexistent/rows.jsonl", "data file does not exist: /nonexistent/rows.jsonl"),
    "missing model": ("model.name_or_path=/nonexistent/model", "model path does not exist: /nonexistent/model"),
    "unknown section": ("sampling.top_p=0.5", "sampling: unknown key"),
    "a part that is not K of N": ("data.part=3/2", "data.part: write K/N with 1 ≤ K ≤ N and N ≥ 2"),
}


@pytest.mark.parametrize(
    "stage, assignment, expected",
    [
        ("trpo", "trpo.fisher_batch_size=0", "trpo.fisher_batch_size: Input should be greater than 0"),
        ("grpo", "eval.every=-1", "eval.every: Input should be greater than or equal to 0"),
        ("ppo", "eval.judges.reward.function=rlhfkit.reward_functions:numeric_answer", "cannot name a judge"),
        ("grpo", "eval.judges.gold.max_length=64", "eval.judges.gold: set exactly one of function and model"),
        ("evaluate", "judges.reward_model.function=rlhfkit.reward_functions:numeric_answer", "cannot name a judge"),
    ],
)
def test_bad_judge_and_fisher_settings_are_named(stage, assignment, expected, tmp_path, capsys):
    output = "output_dir" if stage == "evaluate" else "train.output_dir"
    code, stderr = run_cli(capsys, stage, "--set", assignment, "--set", f"{output}={tmp_path / 'run'}")
    assert_one_line_error(code, stderr, expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", STAGES)
def test_bad_config_values_are_named_for_every_stage(stage, tmp_path, capsys):
    for assignment, expected in CONFIG_CASES.values():
        code, stderr = run_cli(capsys, stage, "--set", assignment, "--set", f"train.output_dir={tmp_path / 'run'}")
        assert_one_line_error(code, stderr, expected)


@pytest.mark.parametrize("stage", STAGES)
def test_an_output_dir_that_cannot_be_created_is_named(stage, tiny_model, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    data = tmp_path / "data.jsonl"
    data.write_text(GOOD_ROWS[stage] + "\n")
    code, stderr = run_cli(
        capsys,
        stage,
        "--set",
        f"data.path={data}",
        "--set",
        f"model.name_or_path={tiny_model}",
        "--set",
        f"train.output_dir={blocker / 'run'}",
    )
    assert_one_line_error(code, stderr, f"train.output_dir {blocker / 'run'} is not writable")


LONG = "very long answer " * 40
LONG_ROWS = {
    "sft": {"prompt": "Why?", "completion": LONG},
    "reward": {"prompt": "Why?", "chosen": LONG, "rejected": "No."},
    "dpo": {"prompt": "Why?", "chosen": "Because.", "rejected": LONG},
    "grpo": {"prompt": LONG, "answer": 4},
}


@pytest.mark.parametrize("stage", list(LONG_ROWS))
def test_an_example_longer_than_max_length_follows_data_overlong(stage, tiny_model, tmp_path, capsys):
    import json

    data = tmp_path / "long.jsonl"
    data.write_text(f"{GOOD_ROWS[stage]}\n{GOOD_ROWS[stage]}\n{json.dumps(LONG_ROWS[stage])}\n")
    (tmp_path / "lengths.py").write_text(
        "def length(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"
    )
    common = [
        *("--set", f"data.path={data}", "--set", f"model.name_or_path={tiny_model}", "--set", "data.max_length=64"),
        *("--set", "data.eval_fraction=0", "--set", "train.max_steps=1", "--set", "train.trackers=[]"),
        *(["--set", f"reward.function={tmp_path / 'lengths.py'}:length"] if stage == "grpo" else []),
        *(["--set", "rollout.prompts_per_step=2", "--set", "rollout.max_new_tokens=2"] if stage == "grpo" else []),
    ]
    code, stderr = run_cli(
        capsys, stage, *common, "--set", "data.overlong=error", "--set", f"train.output_dir={tmp_path / 'a'}"
    )
    assert_one_line_error(code, stderr, f"{data}:3: ")
    assert "longer than data.max_length=64" in stderr
    code = main([stage, *common, "--set", "data.overlong=skip", "--set", f"train.output_dir={tmp_path / 'b'}"])
    out = capsys.readouterr().out
    assert code == 0 and "skipped: longer than max_length" in out and "2 train" in out, out
