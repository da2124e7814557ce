"""PPO, GRPO and TRPO on a tiny random model: rewarding one token makes its probability rise."""

import json

import pytest
import torch

from conftest import write_jsonl
from rlhfkit.cli import main
from rlhfkit.config import load_config
from rlhfkit.data.formatting import render_prompt
from rlhfkit.models import ModelSettings, load_causal_lm, load_tokenizer, resolve
from rlhfkit.stages import grpo, ppo, trpo

QUESTIONS = ["Why is the sky blue?", "What is the sun?", "How does ice form?", "What is a magnet?",
             "Why does the moon move?", "What is sound?", "How do plants eat?", "What is a star?"]
TARGET = "Why"

REWARD_SOURCE = f'''
def target_count(prompts, completions, **columns):
    return [float(completion.count("{TARGET}")) for completion in completions]


def broken(prompts, completions, **columns):
    return [float("nan")] + [0.0] * (len(completions) - 1)
'''


@pytest.fixture()
def prompt_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q, "answer": i} for i, q in enumerate(QUESTIONS * 2)])


@pytest.fixture()
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_SOURCE)
    return path


def rl_config(stage, model, prompts, reward, output_dir, *overrides):
    return load_config(stage, None, [
        f"model.name_or_path={model}", f"data.path={prompts}", "data.eval_fraction=0.25", f"reward.function={reward}:target_count",
        f"train.output_dir={output_dir}", "train.trackers=[]", "train.batch_size=16", "lora.dropout=0.0", "train.lr=2e-2",
        "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6", "rollout.temperature=1.0",
        "eval.num_prompts=4", *overrides,
    ])


def target_logprob(model_reference, tokenizer_source) -> float:
    """Mean log π(TARGET | prompt) at the first answer position over the questions."""
    tokenizer = load_tokenizer(resolve(str(tokenizer_source)))
    model = load_causal_lm(resolve(str(model_reference)), ModelSettings(), torch.float32).eval()
    (target_id,) = tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    total = 0.0
    for question in QUESTIONS:
        text = render_prompt(tokenizer, [{"role": "user", "content": question}], "auto")
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            total += torch.log_softmax(model(ids).logits[0, -1], -1)[target_id].item()
    return total / len(QUESTIONS)


def metrics_steps(overrides):
    return next(int(o.split("=")[1]) for o in overrides if o.startswith("train.max_steps="))


@pytest.mark.parametrize("stage, module, extra", [
    # PPO's critic starts untrained, so its advantages are noisy at first: more steps, smaller ones.
    ("ppo", ppo, ["train.max_steps=16", "ppo.kl_coef=0.01", "ppo.epochs=4", "ppo.minibatch_size=16", "train.lr=3e-3"]),
    ("grpo", grpo, ["train.max_steps=12", "grpo.beta=0.0"]),
    ("trpo", trpo, ["train.max_steps=12", "trpo.max_kl=0.05"]),
])
def test_rewarding_one_token_makes_it_more_likely(tiny_model, prompt_file, reward_file, tmp_path, stage, module, extra):
    out = tmp_path / stage
    metrics = module.run(rl_config(stage, tiny_model, prompt_file, reward_file, out, *extra))
    before, after = target_logprob(tiny_model, tiny_model), target_logprob(out, tiny_model)
    assert after > before + 0.5, (stage, before, after)
    assert metrics["after"]["kl"] > 0 and metrics["before"]["kl"] == pytest.approx(0.0, abs=1e-5)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == metrics_steps(extra) and {"train/reward_mean", "train/kl", "train/entropy", "train/length", "train/time_generation_s"} <= set(log[0])
    assert (out / "final" / "adapter_config.json").exists() and (out / "samples.md").exists()
