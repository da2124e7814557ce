"""Held-out RL evaluation per group of a prompt column (eval.group_by) and of greedy answers
(eval.greedy), and the built-in two-digit arithmetic whose held-out rows split by operation."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import QUESTIONS, write_jsonl
from rlhfkit.config.loading import load_config
from rlhfkit.data.formatting import render_prompt
from rlhfkit.data.loading import builtin_file
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.metrics import by_group, describe, paired_difference
from rlhfkit.models import ModelSettings, load_causal_lm, load_tokenizer, resolve
from rlhfkit.reward_functions import final_number, numeric_answer
from rlhfkit.sampling import generate_texts
from rlhfkit.stages import grpo

REWARDS = """
def letters(prompts, completions, **columns):
    return [float(sum(c.isalpha() for c in completion)) for completion in completions]
"""


def test_by_group_means_errors_and_paired_gains_by_hand():
    later = [1.0, 0.0, 1.0, None, 1.0, 1.0]
    earlier = [0.0, 0.0, 1.0, 1.0, 0.0, None]
    groups = ["sub", "add", "add", "sub", "sub", "add"]
    summary = by_group(later, groups, earlier)
    assert list(summary) == ["add", "sub"]
    # add: slots 1, 2, 5 score 0, 1, 1 → mean 2/3, s² = 1/3, stderr √(1/9) = 1/3
    assert summary["add"]["reward_mean"] == pytest.approx(2 / 3)
    assert summary["add"]["reward_stderr"] == pytest.approx(1 / 3)
    assert summary["add"]["count"] == 3
    # sub: slot 3 is left out (None) → 1, 1; paired with before: slots 0, 4 → differences 1, 1
    assert summary["sub"]["reward_mean"] == 1.0 and summary["sub"]["count"] == 2
    assert summary["sub"]["reward_gain"] == 1.0 and summary["sub"]["reward_gain_stderr"] == 0.0
    # add pairs: slots 1, 2 (slot 5 has no before) → differences 0, 0
    assert summary["add"]["reward_gain"] == 0.0
    assert "add 0.667, sub 1.000" in describe({"groups": summary})
    with pytest.raises(ValueError, match="2 group labels for 3 scores"):
        by_group([1.0, 0.0, 1.0], ["a", "b"])


def test_two_digit_arithmetic_holds_out_a_hundred_of_each_operation_with_negative_results():
    train_path, eval_path = builtin_file("two-digit-arithmetic")
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    held_out = [json.loads(line) for line in eval_path.read_text().splitlines()]
    assert len(train) == 800 and len(held_out) == 200
    assert sum(row["operation"] == "add" for row in held_out) == 100
    differences = [row for row in held_out if row["operation"] == "subtract"]
    assert 30 <= sum(row["answer"] < 0 for row in differences) <= 70

    def problem(row):  # the numbers and the operation, whatever the phrasing
        a, b = (int(n) for n in row["prompt"].replace("?", " ").replace(".", " ").split() if n.isdigit())
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert row["answer"] == (a + b if row["operation"] == "add" else a - b), row
        return a, row["operation"], b

    assert not {problem(row) for row in train} & {problem(row) for row in held_out}
    # the worked answers (an SFT warm-up's completions) restate the problem and end with its answer
    for row in train + held_out:
        a, operation, b = problem(row)
        sign = "+" if operation == "add" else "-"
        assert row["worked"].startswith(f"{a} {sign} {b} = ") and final_number(row["worked"]) == row["answer"], row


def test_the_two_digit_example_configs_evaluate_each_operation_greedily_on_every_held_out_problem():
    # (they run as the arithmetic example does: test_slow_end_to_end runs grpo_arithmetic.yaml)
    root = Path(__file__).resolve().parents[1]
    for stage, name in (("grpo", "grpo_two_digit_arithmetic.yaml"), ("grpo", "two_digit_arithmetic.yaml")):
        config = load_config(stage, root / "configs/examples" / name, ["model.name_or_path=smollm2-135m-instruct"])
        assert config.data.path == "builtin:two-digit-arithmetic" and config.eval.greedy, name
        assert config.eval.group_by == "operation" and config.eval.num_prompts == 200, name


def test_numeric_answer_reads_negative_results_written_either_way():
    completions = ["64 - 79 = -15", "The answer is \u221215.", "64 - 79 = 15", "It is minus fifteen."]
    assert numeric_answer([""] * 4, completions, answer=[-15] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert final_number("12 - 30 = \u221218") == -18.0


@pytest.fixture()
def grouped_prompts(tmp_path):
    prompts = QUESTIONS + [question.replace("?", " today?") for question in QUESTIONS]
    rows = [{"prompt": prompt, "kind": "why" if index % 2 else "other"} for index, prompt in enumerate(prompts)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def grouped_config(model, prompts, tmp_path, *overrides):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS)
    return load_config(
        "grpo",
        None,
        [
            f"model.name_or_path={model}",
            f"data.path={prompts}",
            "data.eval_fraction=0.5",
            f"reward.function={rewards}:letters",
            f"train.output_dir={tmp_path / 'run'}",
            "train.trackers=[]",
            "train.max_steps=2",
            "train.lr=1e-2",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=6",
            "rollout.temperature=1.0",
            "eval.num_prompts=6",
            "eval.samples_per_prompt=3",
            "eval.group_by=kind",
            "eval.greedy=true",
            *overrides,
        ],
    )


def test_held_out_rewards_per_group_and_of_greedy_answers(tiny_model, grouped_prompts, tmp_path):
    """Each group's mean is its slots' mean, the groups add up to the whole, gains pair slot by slot,
    the greedy answers are the model's greedy continuations, and the report shows every row."""
    from rlhfkit.report import write_report

    metrics = grpo.run(grouped_config(tiny_model, grouped_prompts, tmp_path))
    before, after = metrics["before"], metrics["after"]
    for side in (before, after):
        rewards, groups = side["sample_rewards"], side["sample_groups"]
        assert len(rewards) == len(groups) == 18 and set(groups) == {"why", "other"}
        for name, group in side["groups"].items():
            mine = [r for r, g in zip(rewards, groups) if g == name]
            assert group["reward_mean"] == pytest.approx(sum(mine) / len(mine)) and group["count"] == len(mine)
        total = sum(group["reward_mean"] * group["count"] for group in side["groups"].values())
        assert total / 18 == pytest.approx(side["reward_mean"])
        assert len(side["greedy"]["sample_rewards"]) == 6 and len(side["greedy"]["answers"]) == 6
    for name, group in after["groups"].items():
        slots = [i for i, g in enumerate(after["sample_groups"]) if g == name]
        gain = paired_difference(
            [after["sample_rewards"][i] for i in slots], [before["sample_rewards"][i] for i in slots]
        )
        assert group["reward_gain"] == pytest.approx(gain[0])
    assert after["greedy"]["reward_gain"] == pytest.approx(
        paired_difference(after["greedy"]["sample_rewards"], before["greedy"]["sample_rewards"])[0]
    )

    # Before training the policy is the starting model (LoRA's B is zero): its greedy answers are
    # the model's greedy continuations, whatever eval.seed samples.
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    model = load_causal_lm(resolve(str(tiny_model)), ModelSettings(), torch.float32).eval()
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    texts = [render_prompt(tokenizer, [{"role": "user", "content": s["prompt"]}], "auto") for s in samples]
    greedy = generate_texts(model, tokenizer, texts, 6, 0.0, 1.0, 8, seed=0)
    assert before["greedy"]["answers"] == greedy
    assert [s["before (greedy)"] for s in samples] == greedy
    assert before["greedy"]["sample_rewards"] == [float(sum(c.isalpha() for c in g)) for g in greedy]

    page = write_report(tmp_path, {"grpo": tmp_path / "run"}).read_text()
    for label in (
        "mean reward, why prompts",
        "reward of greedy answers (one per prompt)",
        "reward of greedy answers, other prompts",
    ):
        assert label in page
    assert math.isfinite(after["groups"]["why"]["reward_gain"])

    from scripts.results_rows import table

    written = table([tmp_path / "run"])
    why_before, why_after = before["greedy"]["groups"]["why"], after["greedy"]["groups"]["why"]
    assert f"| `why` | {before['groups']['why']['reward_mean']:.3f} ± " in written
    assert (
        f"**{why_after['reward_mean']:.3f} ± {why_after['reward_stderr']:.3f}** ({why_after['reward_gain']:+.3f}"
        in written
    )
    assert f"{why_before['reward_mean']:.3f} ± {why_before['reward_stderr']:.3f}" in written


def test_a_missing_group_column_is_named_before_any_model_loads(grouped_prompts, tmp_path):
    config = grouped_config("nobody/no-such-model", grouped_prompts, tmp_path, "eval.group_by=operation")
    with pytest.raises(DataError, match=r"prompts.jsonl:\d+: eval.group_by is 'operation', but this held-out row"):
        grpo.run(config)
    for setting in ("eval.group_by=kind", "eval.greedy=true"):
        name = setting.split("=")[0]
        with pytest.raises(ConfigError, match=f"{name} needs held-out prompts, but eval.num_prompts is 0"):
            load_config("grpo", None, [setting, "eval.num_prompts=0"])
    with pytest.raises(ConfigError, match="eval.group_by: name a column"):
        load_config("grpo", None, ["eval.group_by= "])
