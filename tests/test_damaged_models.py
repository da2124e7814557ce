"""Model folders that are not what they claim: each is refused in one line naming the path and the fault."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny_model
from rlhfkit.cli import main

DAMAGED_LAYER = "model.layers.0.mlp.down_proj.weight"


class _RunsAShell:
    def __reduce__(self):
        return (os.system, ("echo ran",))


def damage(directory, how: str, tmp_path):
    """A copy of the tiny model's folder damaged in one way; the path to give the CLI."""
    weights_file = directory / "model.safetensors"
    weights = load_file(str(weights_file))
    if how == "missing tensor":
        save_file({k: v for k, v in weights.items() if k != DAMAGED_LAYER}, str(weights_file), {"format": "pt"})
    elif how == "wrong shape":
        shaped = {k: v[:-1] if k == DAMAGED_LAYER else v for k, v in weights.items()}
        save_file(shaped, str(weights_file), {"format": "pt"})
    elif how == "truncated safetensors":
        data = weights_file.read_bytes()
        weights_file.write_bytes(data[: len(data) // 2])
    elif how == "pickle that runs code":
        weights_file.unlink()
        torch.save({"model.embed_tokens.weight": _RunsAShell()}, directory / "pytorch_model.bin")
    elif how == "fake gguf":
        fake = tmp_path / "model.gguf"
        fake.write_bytes(b"GGUF" + bytes(100))
        return fake
    elif how == "adapter based on itself":
        shutil.rmtree(directory)
        directory.mkdir()
        config = {"base_model_name_or_path": str(directory), "peft_type": "LORA", "task_type": "CAUSAL_LM"}
        (directory / "adapter_config.json").write_text(json.dumps(config))
    elif how == "reward model":
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(
            json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]})
        )
    return directory


CASES = {
    "missing tensor": f"the weights lack 1 tensor(s) the model needs ({DAMAGED_LAYER}); it is incomplete",
    "wrong shape": "its weights do not have the shapes its config.json describes",
    "truncated safetensors": "a damaged safetensors file",
    "pickle that runs code": "holds code, not only tensors, and is not run",
    "fake gguf": "not a GGUF file this reader takes",
    "adapter based on itself": "an adapter whose base model is itself",
    "reward model": "is a reward model (a score head, no language-model head)",
}


@pytest.mark.parametrize("how", list(CASES))
def test_a_damaged_model_folder_is_named_in_one_line(how, tmp_path):
    path = damage(build_tiny_model(tmp_path / "model"), how, tmp_path)
    # a process of its own: transformers' logging would otherwise write into an earlier test's capture
    done = subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", "generate", str(path), "--prompt", "Hi", "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    error = done.stderr
    assert done.returncode == 2, error
    last = error.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in error, error
    assert CASES[how] in last and str(path) in last, error


def test_model_device_cuda_without_a_gpu_is_refused(tiny_model, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    rows = tmp_path / "sft.jsonl"
    rows.write_text('{"prompt": "Why?", "completion": "Because."}\n')
    arguments = ["sft", "--set", f"model.name_or_path={tiny_model}", "--set", f"data.path={rows}"]
    assert main([*arguments, "--set", "model.device=cuda", "--set", f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert "model.device is cuda, but no CUDA GPU is visible" in capsys.readouterr().err
