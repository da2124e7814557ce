"""Untrusted files: code shipped with a model or hidden in a checkpoint is never run unless asked."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from conftest import build_tiny_model
from rlhfkit.config import ModelSettings
from rlhfkit.engine import read_torch_state
from rlhfkit.errors import UserError
from rlhfkit.models import load_causal_lm, load_tokenizer, resolve


def model_with_custom_code(directory, marker, model_type=None):
    build_tiny_model(directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    if model_type:
        config["model_type"] = model_type
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig as CustomConfig, LlamaForCausalLM as CustomModel\n"
    )
    return directory


def test_code_shipped_with_a_known_architecture_is_not_run(tmp_path):
    marker = tmp_path / "ran.txt"
    directory = model_with_custom_code(tmp_path / "model", marker)
    settings = ModelSettings(name_or_path=str(directory))
    assert settings.trust_remote_code is False
    model = load_causal_lm(resolve(str(directory)), settings, torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_an_architecture_that_needs_its_own_code_is_refused_with_the_setting_named(tmp_path):
    marker = tmp_path / "ran.txt"
    directory = model_with_custom_code(tmp_path / "model", marker, model_type="somethingnew")
    with pytest.raises(UserError, match="trust_remote_code: true"):
        load_causal_lm(resolve(str(directory)), ModelSettings(name_or_path=str(directory)), torch.float32)
    assert not marker.exists()
    load_tokenizer(resolve(str(directory)))  # the tokenizer files themselves are data, not code
    assert not marker.exists()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_file_holding_pickled_objects_is_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    state = tmp_path / "optimizer.pt"
    with state.open("wb") as out:
        pickle.dump({"state": _RunsCode(marker)}, out)
    with pytest.raises(UserError, match="refused"):
        read_torch_state(state)
    assert not marker.exists()
    torch.save({"step": torch.tensor(3), "groups": [{"lr": 0.1}]}, tmp_path / "plain.pt")
    assert read_torch_state(tmp_path / "plain.pt")["groups"] == [{"lr": 0.1}]
