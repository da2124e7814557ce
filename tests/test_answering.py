"""What answers prompts outside RL rollouts (held-out answers, `rlhfkit evaluate`, feedback
candidates, `rlhfkit generate`): the float32 decode loop samples the model's own distribution —
the answers `generate` gives, adapters merged — and `generate` remains where the loop cannot run."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.config import GenerationSettings, LoraSettings, ModelSettings, RolloutSettings
from rlhfkit.decode_loop import DecodeLoop
from rlhfkit.models import attach_lora, load_causal_lm, load_tokenizer, resolve
from rlhfkit.rollout_copy import answering_loop, generate_answers
from rlhfkit.sampling import sample_rollout

PROMPTS = ["User: Why is the sky blue?\nAssistant:", "User: What?\nAssistant:", "User: A star is\nAssistant:"]


@pytest.fixture()
def tuned(tiny_model):
    """A LoRA policy whose adapters move its distribution (the loop must sample the merged weights)."""
    model = load_causal_lm(resolve(str(tiny_model)), ModelSettings(), torch.float32)
    policy = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return policy, load_tokenizer(resolve(str(tiny_model)))


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_the_float32_loop_gives_the_answers_generate_gives(tuned, temperature):
    policy, tokenizer = tuned
    answers = {
        engine: generate_answers(
            policy,
            tokenizer,
            PROMPTS * 2,
            GenerationSettings(max_new_tokens=12, temperature=temperature, batch_size=4, engine=engine),
            seed=5,
        )
        for engine in ("hf", "float32", "auto")
    }
    assert answers["float32"] == answers["hf"] == answers["auto"]
    assert len(set(answers["hf"][:3])) > 1  # the prompts get different answers: nothing trivial compared
    with policy.disable_adapter():  # without the adapters the answers differ: the loop samples the tuned policy
        untuned = generate_answers(
            policy, tokenizer, PROMPTS * 2, GenerationSettings(max_new_tokens=12, temperature=temperature), seed=5
        )
    assert untuned != answers["hf"]


def test_evaluation_and_candidates_sample_the_same_completions_through_the_loop(tuned):
    policy, tokenizer = tuned
    settings = RolloutSettings(max_new_tokens=10, temperature=0.9, batch_size=4)
    loop = answering_loop(policy, "auto", 64 + settings.max_new_tokens)
    assert isinstance(loop, DecodeLoop)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        by_generate = sample_rollout(policy, tokenizer, PROMPTS, settings, 2, 64)
        torch.manual_seed(0)
        by_loop = sample_rollout(policy, tokenizer, PROMPTS, settings, 2, 64, decode_loop=loop)
    assert torch.equal(by_generate.response_ids, by_loop.response_ids)
    assert by_generate.completions == by_loop.completions


def test_generate_answers_where_the_loop_cannot_run(tuned):
    from transformers import GPT2Config, GPT2LMHeadModel

    policy, _ = tuned
    assert answering_loop(policy, "hf", 64) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert answering_loop(gpt2, "auto", 64) is None and answering_loop(gpt2, "float32", 64) is None
    # auto never samples a different distribution: a bf16 model keeps generate; float32 is asked for by name
    in_bf16 = load_causal_lm(resolve(str(policy.get_base_model().name_or_path)), ModelSettings(), torch.bfloat16)
    assert answering_loop(in_bf16, "auto", 64) is None
    assert isinstance(answering_loop(in_bf16, "float32", 64), DecodeLoop)
