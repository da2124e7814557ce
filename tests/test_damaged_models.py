"""Model folders that are not what they claim: each is refused in one line naming the path and the fault."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


# One process for every case (imports are most of a refusal's time), each case in a fork of it
# with its own stderr: transformers' logging in a test's own process would write into an earlier
# test's capture, and a process per case would import everything again.
REFUSE_EACH = """
import os, sys, traceback
import peft, transformers
from rlhfkit.cli import main
for path in sys.argv[1:]:
    child = os.fork()
    if child == 0:
        os.dup2(os.open(path + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        try:
            code = main(["generate", path, "--prompt", "Hi", "--max-new-tokens", "2"])
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
"""


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[str, tuple[str, int, str]]:
    """For each kind of damage: the path given to `rlhfkit generate`, its exit code and its stderr."""
    folder = tmp_path_factory.mktemp("damaged")
    paths = {how: damage(build_tiny_model(folder / f"model{i}"), how, folder) for i, how in enumerate(CASES)}
    done = subprocess.run(
        [sys.executable, "-c", REFUSE_EACH, *map(str, paths.values())],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    codes = [int(line) for line in done.stdout.split()]
    assert done.returncode == 0 and len(codes) == len(CASES), done.stderr
    return {
        how: (str(path), code, Path(f"{path}.stderr").read_text()) for (how, path), code in zip(paths.items(), codes)
    }


@pytest.mark.parametrize("how", list(CASES))
def test_a_damaged_model_folder_is_named_in_one_line(how, refusals):
    path, code, error = refusals[how]
    assert code == 2, error
    last = error.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in error, error
    assert CASES[how] in last and path in last, error


def test_model_device_cuda_without_a_gpu_is_refused(tiny_model, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    rows = tmp_path / "sft.jsonl"
    rows.write_text('{"prompt": "Why?", "completion": "Because."}\n')
    arguments = ["sft", "--set", f"model.name_or_path={tiny_model}", "--set", f"data.path={rows}"]
    assert main([*arguments, "--set", "model.device=cuda", "--set", f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert "model.device is cuda, but no CUDA GPU is visible" in capsys.readouterr().err
