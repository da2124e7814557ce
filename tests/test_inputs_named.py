"""Careless inputs that ended in a traceback, or in someone else's message, now get one line
naming the setting or file; UTF-8 files with a byte-order mark are read like any other."""

import json

import pytest

from conftest import write_jsonl
from rlhfkit.cli import main
from rlhfkit.data.loading import read_rows


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse
        code = exit.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "assignment, expected",
    [
        ("train.seed=-1", "train.seed"),
        ("train.adam_betas=[2, 3]", "each beta must be in [0, 1)"),
        ("lora.target_modules=[]", "name at least one module"),
    ],
)
def test_impossible_settings_are_named(tmp_path, capsys, assignment, expected):
    code, err = run(capsys, "sft", "--set", assignment, "--set", f"train.output_dir={tmp_path / 'run'}")
    assert code == 2 and err.startswith("error: ") and expected in err and "Traceback" not in err, err


def test_lora_modules_the_model_does_not_have_are_named_with_the_ones_it_has(tiny_model, sft_rows, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    code, err = run(
        capsys,
        "sft",
        "--set",
        f"model.name_or_path={tiny_model}",
        "--set",
        f"data.path={data}",
        "--set",
        "lora.target_modules=[nonexistent_proj]",
        "--set",
        f"train.output_dir={tmp_path / 'run'}",
    )
    assert code == 2 and "lora.target_modules ['nonexistent_proj']: not in this model" in err and "q_proj" in err, err


def test_command_line_values_out_of_range_are_named(tmp_path, capsys):
    code, err = run(capsys, "label", "serve", str(tmp_path / "labels.db"), "--port", "99999")
    assert code == 2 and "--port must be in 1..65535" in err
    code, err = run(capsys, "score", str(tmp_path), "--prompt", "p", "--response", "r", "--max-length", "0")
    assert code == 2 and "--max-length must be at least 8" in err
    code, err = run(capsys, "merge", str(tmp_path / "absent"), str(tmp_path / "out"))
    assert code == 2 and "does not exist" in err and "Traceback" not in err, err


def test_utf8_files_with_a_byte_order_mark_are_read(tmp_path):
    bom = "\ufeff".encode()
    (tmp_path / "rows.jsonl").write_bytes(bom + json.dumps({"prompt": "p", "completion": "c"}).encode() + b"\n")
    (tmp_path / "rows.csv").write_bytes(bom + b"prompt,completion\np,c\n")
    (tmp_path / "rows.json").write_bytes(bom + json.dumps([{"prompt": "p", "completion": "c"}]).encode())
    for name in ("rows.jsonl", "rows.csv", "rows.json"):
        assert [row.values for row in read_rows(str(tmp_path / name))] == [{"prompt": "p", "completion": "c"}], name
