import json
import subprocess
import sys

import pytest

from conftest import write_jsonl
from rlhfkit.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize("command", ["pretrain", "sft", "generate", "merge"])
def test_help_is_useful_on_its_own(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "Example:" in result.stdout
    if command in ("pretrain", "sft"):
        assert "train.lr" in result.stdout and "Peak learning rate" in result.stdout


def user_error(*args, cwd=None):
    result = run_cli(*args, cwd=cwd)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    return result.stderr


def test_config_errors_exit_cleanly(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  lrr: 1\n")
    assert "train.lrr: unknown key" in user_error("sft", str(config))
    assert "train.lr" in user_error("sft", "--set", "train.lr=abc")
    assert "data file does not exist: missing.jsonl" in user_error("pretrain", "--set", "data.path=missing.jsonl")


def test_data_errors_stop_before_the_model_loads(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c",\n')
    message = user_error(
        "sft",
        "--set",
        f"data.path={bad}",
        "--set",
        f"train.output_dir={tmp_path / 'run'}",
        "--set",
        "model.name_or_path=/definitely/not/loaded",
    )
    # the model path is checked by the config first; with a real model, the data row is named
    assert "model path does not exist" in message
    message = user_error(
        "sft",
        "--set",
        f"data.path={bad}",
        "--set",
        f"train.output_dir={tmp_path / 'run2'}",
        "--set",
        f"model.name_or_path={tiny_model}",
    )
    assert "bad.jsonl:2: malformed JSON" in message


def test_resume_without_a_run(tmp_path, tiny_model):
    message = user_error(
        "pretrain",
        "--resume",
        "--set",
        f"train.output_dir={tmp_path / 'nothing'}",
        "--set",
        f"model.name_or_path={tiny_model}",
    )
    assert "holds no run to resume" in message


def test_pretrain_sft_generate_merge_end_to_end(tiny_model, tmp_path, text_rows, sft_rows, capsys):
    text = write_jsonl(tmp_path / "text.jsonl", text_rows)
    pairs = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"""
pretrain:
  model: {{name_or_path: {tiny_model}}}
  lora: {{enabled: false}}
  data: {{path: {text}, max_length: 32, eval_fraction: 0.2}}
  train: {{output_dir: {tmp_path / "pretrain"}, epochs: 4, lr: 3.0e-3, batch_size: 4, trackers: [tensorboard]}}
sft:
  model: {{name_or_path: {tmp_path / "pretrain"}}}
  data: {{path: {pairs}, eval_fraction: 0.25}}
  train: {{output_dir: {tmp_path / "sft"}, epochs: 6, lr: 1.0e-2, batch_size: 4}}
  generation: {{num_prompts: 3, max_new_tokens: 8, extra_prompts: [Explain quantum computing to a 10-year-old.]}}
"""
    )
    assert main(["pretrain", str(config)]) == 0
    pre = json.loads((tmp_path / "pretrain" / "metrics.json").read_text())
    assert pre["after"]["perplexity"] < pre["before"]["perplexity"]
    assert (tmp_path / "pretrain" / "final" / "model.safetensors").exists()  # full fine-tuning
    assert list((tmp_path / "pretrain" / "logs").rglob("events.out.tfevents.*"))

    assert main(["sft", str(config)]) == 0
    tuned = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert tuned["after"]["perplexity"] < tuned["before"]["perplexity"]
    assert "rouge_l" in tuned["after"]
    samples = (tmp_path / "sft" / "samples.md").read_text()
    assert "Explain quantum computing" in samples and "**before:**" in samples and "**after:**" in samples
    assert (tmp_path / "sft" / "final" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "sft" / "run.json").read_text())["status"] == "complete"

    capsys.readouterr()
    printed = []
    for engine in ("hf", "float32"):
        asked = ["generate", str(tmp_path / "sft"), "--prompt", "Why is the sky blue?", "--max-new-tokens", "5"]
        assert main([*asked, "--engine", engine]) == 0
        printed.append(capsys.readouterr().out)
    assert "### Why is the sky blue?" in printed[0] and printed[0] == printed[1]
    assert main(["merge", str(tmp_path / "sft"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert main(["merge", str(tmp_path / "sft"), str(tmp_path / "merged")]) == 2  # never overwrites


def test_hugging_face_load_bars_are_silenced_even_when_imported_first(tiny_model, capsys, monkeypatch):
    import transformers  # noqa: F401  (imported before the CLI runs, as in a notebook or these tests)
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils.logging import enable_progress_bar

    enable_progress_bar()
    enable_progress_bars()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    try:
        assert main(["generate", str(tiny_model), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
        captured = capsys.readouterr()
        assert "Loading weights" not in captured.err and "### Hi" in captured.out, captured.err
    finally:
        enable_progress_bar()
        enable_progress_bars()
