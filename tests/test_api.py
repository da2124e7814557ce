"""The Python API: the same fields, checks and one-line errors as the command line, plus Python objects."""

import inspect
import json
import re

import pytest
from datasets import Dataset

import rlhfkit
from conftest import QUESTIONS, write_jsonl
from rlhfkit import api, registry
from rlhfkit.cli import main
from rlhfkit.reward_functions import numeric_answer

TINY_SFT = {
    "train": {"max_steps": 1, "batch_size": 4, "trackers": []},
    "generation": {"num_prompts": 1, "max_new_tokens": 3},
}


def config_of(stage, config=None, overrides=None, **fields):
    return api.stage_config(stage, config, overrides, fields)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))


def test_every_stage_has_a_function_of_its_name():
    for name in registry.names():
        function = getattr(rlhfkit, name)
        assert function.__module__ == "rlhfkit.api" and function.__doc__, name
        assert inspect.signature(function).return_annotation == "StageResult"


def test_python_rows_are_written_once_under_a_name_from_their_content(sft_rows, tiny_model):
    as_list = config_of("sft", data=sft_rows).data.path
    as_dataset = config_of("sft", data=Dataset.from_list(sft_rows)).data.path
    as_frame = config_of("sft", data=Dataset.from_list(sft_rows).to_pandas()).data.path
    assert as_list == as_dataset == as_frame  # same rows, same file: a resumed run sees the same config
    assert [json.loads(line) for line in open(as_list, encoding="utf-8")] == sft_rows
    other = config_of("sft", data=sft_rows[:-1]).data.path
    assert other != as_list and open(as_list, encoding="utf-8").read().count("\n") == len(sft_rows)
    held_out = config_of("sft", data={"path": sft_rows, "eval_path": sft_rows[:4]}).data
    assert held_out.path == as_list and held_out.eval_path.endswith(".jsonl")


def test_prompts_rewards_and_models_from_python_objects(tiny_model):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    config = config_of("grpo", model=tiny_model, prompts=["What is 2+2?", chat], reward=numeric_answer)
    rows = [json.loads(line) for line in open(config.data.path, encoding="utf-8")]
    assert rows == [{"prompt": "What is 2+2?"}, {"prompt": chat}]
    assert config.reward.function == "rlhfkit.reward_functions:numeric_answer"  # importable: portable
    assert config.model.name_or_path == str(tiny_model)
    local = config_of("grpo", reward=lambda prompts, completions, **_: [1.0] * len(completions))
    assert local.reward.function == "python:tests.test_api.<lambda>" or local.reward.function.startswith("python:")
    from rlhfkit.rewards import load_reward_function

    assert load_reward_function(local.reward.function)(["p"], ["c"]) == [1.0]
    with pytest.raises(rlhfkit.UserError, match="in another process; pass the function again"):
        load_reward_function("python:__main__.gone")
    assert config_of("ppo", reward=str(tiny_model)).reward.model == str(tiny_model)
    section = config_of("ppo", reward={"function": numeric_answer, "missing_eos_penalty": 1.0}).reward
    assert section.function.endswith(":numeric_answer") and section.missing_eos_penalty == 1.0


def test_keywords_lie_over_a_config_file_and_overrides_come_last(tmp_path, tiny_model):
    path = tmp_path / "sft.yaml"
    path.write_text("train:\n  lr: 0.001\n  batch_size: 3\nlora:\n  r: 4\n")
    config = config_of("sft", path, ["train.batch_size=5"], train={"lr": 0.01}, output_dir=tmp_path / "out")
    assert (config.train.lr, config.train.batch_size, config.lora.r) == (0.01, 5, 4)
    assert config.train.output_dir == str(tmp_path / "out")
    again = config_of("sft", config)  # a config object round-trips
    assert again == config
    evaluation = config_of("evaluate", models={"base": tiny_model}, output_dir=tmp_path / "eval")
    assert evaluation.output_dir == str(tmp_path / "eval") and evaluation.models == {"base": str(tiny_model)}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"train": {"lr": -1}}, "rlhfkit.sft(): train.lr: Input should be greater than 0 (got -1)"),
        ({"trian": {"lr": 1}}, "rlhfkit.sft(): trian: unknown key"),
        ({"data": [1, 2]}, "data: row 1 is a int, expected a mapping"),
        ({"data": []}, "data: the list of rows is empty"),
        ({"data": 5}, "data: expected a path, a datasets.Dataset, a pandas DataFrame or a list of rows, got int"),
        ({"data": "missing.jsonl"}, "data.path: data file does not exist: missing.jsonl"),
        ({"model": "./no-such-model"}, "model.name_or_path: model path does not exist: ./no-such-model"),
        ({"prompts": ["a"]}, "`prompts` is for the RL stages"),
    ],
)
def test_bad_input_is_one_catchable_line(fields, message):
    with pytest.raises(rlhfkit.UserError) as caught:
        rlhfkit.sft(**fields)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_api_and_the_command_line_word_an_error_alike(capsys):
    assert main(["sft", "--set", "train.lr=-1"]) == 2
    printed = capsys.readouterr().err.strip()
    with pytest.raises(rlhfkit.ConfigError) as caught:
        rlhfkit.sft(train={"lr": -1})
    assert printed.removeprefix("error: (defaults): ") == str(caught.value).removeprefix("rlhfkit.sft(): ")


def test_a_stage_from_python_then_load_generate_score_and_resume(tiny_model, tiny_reward_model, sft_rows, tmp_path):
    run = rlhfkit.sft(model=tiny_model, data=Dataset.from_list(sft_rows), output_dir=tmp_path / "sft", **TINY_SFT)
    assert run.run_dir == tmp_path / "sft" and run.path == tmp_path / "sft" / "final"
    assert set(run.metrics) >= {"before", "after"} and run.config.train.max_steps == 1
    policy, tokenizer = rlhfkit.load(run)
    from transformers import PreTrainedModel

    assert isinstance(policy, PreTrainedModel)  # merged: plain transformers, save_pretrained works
    policy.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").is_file()
    answers = rlhfkit.generate(run.path, ["Why is the sky blue?", "What is a star?"], max_new_tokens=3, temperature=0)
    assert len(answers) == 2 and answers == rlhfkit.generate(run, ["Why is the sky blue?", "What is a star?"], 3, 0)
    scores = rlhfkit.score(tiny_reward_model, ["Q?", "Q?"], ["an answer", "another answer"])
    assert len(scores) == 2 and scores[0] != scores[1]
    with pytest.raises(rlhfkit.UserError, match="already holds a run; pass --resume"):
        rlhfkit.sft(model=tiny_model, data=sft_rows, output_dir=tmp_path / "sft", **TINY_SFT)
    with pytest.raises(rlhfkit.UserError, match="one response per prompt: 2 prompts, 1 responses"):
        rlhfkit.score(tiny_reward_model, ["Q?", "Q?"], ["a"])
    with pytest.raises(rlhfkit.UserError, match="wrap it in a list"):
        rlhfkit.generate(run, "Why?")
    with pytest.raises(rlhfkit.UserError, match="engine must be one of auto, hf, float32, got 'vllm'"):
        rlhfkit.generate(run, ["Why?"], engine="vllm")  # type: ignore[arg-type]


def test_rl_with_a_lambda_reward_and_a_list_of_prompts(tiny_model, tmp_path):
    seen = []

    def likes_short_answers(prompts, completions, **columns):
        seen.append(columns)
        return [-float(len(text)) for text in completions]

    run = rlhfkit.grpo(
        model=tiny_model,
        prompts=[{"prompt": q, "topic": "science"} for q in QUESTIONS * 2],
        reward=likes_short_answers,
        output_dir=tmp_path / "grpo",
        rollout={"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 3},
        train={"max_steps": 1, "batch_size": 4, "trackers": []},
        eval={"num_prompts": 2},
    )
    assert run.config.reward.function.startswith("python:") and seen and seen[0]["topic"][0] == "science"
    assert "reward_mean" in run.metrics["after"]


def test_a_pipeline_from_a_mapping_takes_python_objects(tiny_model, sft_rows, tmp_path):
    prefs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "Go away."} for r in sft_rows]
    tree = {
        "pipeline": {"output_dir": str(tmp_path / "run"), "model": str(tiny_model), "stages": ["sft", "dpo"]},
        "sft": {"data": Dataset.from_list(sft_rows), **TINY_SFT},
        "dpo": {"data": prefs, "train": {"max_steps": 1, "batch_size": 4, "trackers": []}},
    }
    result = rlhfkit.pipeline(tree)
    assert list(result.stages) == ["sft", "dpo"] and result.report.is_file()
    assert result["dpo"].config.model.name_or_path == str(tmp_path / "run" / "sft")
    assert "after" in result["dpo"].metrics
    with pytest.raises(rlhfkit.ConfigError, match=re.escape("rlhfkit.pipeline() [sft]: train.lr")):
        rlhfkit.pipeline({**tree, "sft": {**tree["sft"], "train": {"lr": 0}}})


def test_a_pipeline_trains_kto_on_thumbs_and_compares_it(tiny_model, sft_rows, tmp_path):
    thumbs = [{"prompt": r["prompt"], "completion": r["completion"], "label": True} for r in sft_rows]
    thumbs += [{"prompt": r["prompt"], "completion": "Go away.", "label": False} for r in sft_rows]
    tree = {
        "pipeline": {
            "output_dir": str(tmp_path / "run"),
            "model": str(tiny_model),
            "stages": ["sft", "kto", "evaluate"],
        },
        "sft": {"data": Dataset.from_list(sft_rows), **TINY_SFT},
        "kto": {"data": thumbs, "train": {"max_steps": 1, "batch_size": 4, "trackers": []}},
        "evaluate": {"num_prompts": 2, "samples_per_prompt": 1, "sampling": {"max_new_tokens": 3}},
    }
    result = rlhfkit.pipeline(tree)
    assert result["kto"].config.model.name_or_path == str(tmp_path / "run" / "sft")
    assert "label_accuracy" in result["kto"].metrics["after"]
    assert set(result["evaluate"].metrics["models"]) == {"base", "sft", "kto"}
    assert "kto" in result.report.read_text()


def test_a_pipeline_runs_orpo_and_online_dpo_on_the_reward_model(tiny_model, sft_rows, tmp_path):
    prefs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "Go away."} for r in sft_rows]
    small = {"max_steps": 1, "batch_size": 4, "trackers": []}
    tree = {
        "pipeline": {
            "output_dir": str(tmp_path / "run"),
            "model": str(tiny_model),
            "stages": ["sft", "reward", "dpo", "online_dpo"],
        },
        "sft": {"data": Dataset.from_list(sft_rows), **TINY_SFT},
        "reward": {"data": prefs, "train": small},
        "dpo": {"data": prefs, "dpo": {"loss": "orpo"}, "train": small, "generation": {"num_prompts": 0}},
        "online_dpo": {
            "prompts": [r["prompt"] for r in sft_rows[:8]],
            "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 3},
            "train": {"max_steps": 1, "batch_size": 2, "trackers": []},
            "eval": {"num_prompts": 2},
        },
    }
    result = rlhfkit.pipeline(tree)
    assert result["dpo"].config.dpo.loss == "orpo" and "accuracy" in result["dpo"].metrics["after"]
    online = result["online_dpo"]
    assert online.config.reward.model == str(tmp_path / "run" / "reward")  # the reward stage's model judges
    assert online.config.model.name_or_path == str(tmp_path / "run" / "sft")
    log = (online.run_dir / "metrics.jsonl").read_text()
    assert "train/pairs" in log and "train/reward_chosen" in log


def test_a_pipeline_file_is_validated_before_anything_runs(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b"}])
    config = tmp_path / "p.yaml"
    config.write_text(
        f"pipeline:\n  stages: [sft]\n  output_dir: {tmp_path / 'run'}\nsft:\n  data:\n    path: {path}\n"
    )
    with pytest.raises(rlhfkit.ConfigError, match=r"\[sft\]: train.lr"):
        rlhfkit.pipeline(config, overrides=["sft.train.lr=-1"])
    assert not (tmp_path / "run").exists()
