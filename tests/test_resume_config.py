"""--resume continues the run that was started: a changed setting is refused by name, and the
run's config.yaml is left as it was; where the run writes and logs may change."""

import json

from conftest import write_jsonl
from rlhfkit.cli import main


def pretrain_args(model, data, output_dir, *extra):
    settings = [
        f"model.name_or_path={model}",
        f"data.path={data}",
        "data.max_length=32",
        f"train.output_dir={output_dir}",
        "train.max_steps=4",
        "train.batch_size=2",
        "train.trackers=[]",
        *extra,
    ]
    return ["pretrain", *[arg for setting in settings for arg in ("--set", setting)]]


def test_resume_refuses_a_changed_setting_and_keeps_the_saved_config(tiny_model, tmp_path, text_rows, capsys):
    data = write_jsonl(tmp_path / "text.jsonl", text_rows)
    run = tmp_path / "run"
    assert main(pretrain_args(tiny_model, data, run)) == 0
    (run / "run.json").write_text(json.dumps({"stage": "pretrain", "status": "running"}))  # as if it had stopped
    saved = (run / "config.yaml").read_text()
    other_data = write_jsonl(tmp_path / "other.jsonl", text_rows[::-1])
    capsys.readouterr()
    assert main([*pretrain_args(tiny_model, other_data, run, "train.batch_size=1"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: the config differs" in err and "train.batch_size: 2 -> 1" in err and "data.path" in err
    assert (run / "config.yaml").read_text() == saved
    # Where it logs may change on resume.
    assert main([*pretrain_args(tiny_model, data, run, "train.log_every=2"), "--resume"]) == 0
