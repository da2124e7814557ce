"""Every script in examples/ runs, as written, on the tiny model (the docs link to them)."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(path.stem for path in EXAMPLES.glob("*.py") if path.stem != "common")


def load_example(name: str):
    sys.path.insert(0, str(EXAMPLES))  # as `python examples/NAME.py` puts it first
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def test_the_examples_are_the_ones_the_docs_name():
    assert SCRIPTS == [
        "dpo",
        "grpo_verifiable",
        "pipeline_from_python",
        "ppo_with_a_python_reward",
        "reward_from_labels",
        "sft_on_a_dataset",
    ]


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs_on_the_tiny_model(name, tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    output = tmp_path / name
    result = load_example(name).main(
        ["--model", str(tiny_model), "--output-dir", str(output), "--steps", "2", "--max-new-tokens", "4"]
    )
    printed = capsys.readouterr().out
    assert result.run_dir.is_dir() and str(result.run_dir).startswith(str(output))
    if name == "pipeline_from_python":
        assert list(result.stages) == ["sft", "reward", "dpo", "evaluate"] and result.report.is_file()
        assert set(result["evaluate"].metrics["models"]) == {"base", "sft", "dpo"}
    else:
        assert (result.path / "rlhfkit_model.json").is_file() and result.metrics["after"]
    assert "->" in printed  # each example prints what changed
