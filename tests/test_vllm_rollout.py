"""The vLLM rollout engine's CPU-checkable parts: the weights it is given, its sampling settings,
how its outputs become a rollout, and its refusals. The engine itself runs in tests/test_gpu.py."""

from __future__ import annotations

import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from rlhfkit.config import LoraSettings, ModelSettings, RolloutSettings
from rlhfkit.config.loading import load_config
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.models import attach_lora, load_causal_lm, load_tokenizer, resolve
from rlhfkit.sampling import pad_responses, rollout_from_responses
from rlhfkit.vllm_rollout import check_vllm_usable, merged_weights, response_rows, sampling_arguments, write_checkpoint


@pytest.fixture()
def trained_lora_policy(tiny_model):
    """The tiny model with LoRA adapters whose B matrices are non-zero, as after some training."""
    model = load_causal_lm(resolve(str(tiny_model)), ModelSettings(), torch.float32)
    policy = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return policy


def test_merged_weights_equal_merge_and_unload_and_leave_the_base_alone(trained_lora_policy):
    base_before = {n: p.detach().clone() for n, p in trained_lora_policy.named_parameters() if "base_layer" in n}
    merged = dict(merged_weights(trained_lora_policy))
    reference = copy.deepcopy(trained_lora_policy).merge_and_unload()
    expected = dict(reference.named_parameters())
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[name], expected[name], atol=1e-6) for name in expected)
    # The deltas are really in there (B ≠ 0), and the training copy's base weights did not move.
    changed = [name for name in expected if "q_proj.weight" in name]
    base = dict(trained_lora_policy.get_base_model().named_parameters())
    assert changed and all(
        not torch.allclose(merged[n], base[n.replace("q_proj.", "q_proj.base_layer.")]) for n in changed
    )
    assert all(torch.equal(p, base_before[n]) for n, p in trained_lora_policy.named_parameters() if "base_layer" in n)


def test_a_written_checkpoint_computes_what_the_lora_policy_computes(trained_lora_policy, tiny_model, tmp_path):
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    write_checkpoint(trained_lora_policy, tokenizer, tmp_path)
    reloaded = load_causal_lm(resolve(str(tmp_path)), ModelSettings(), torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, trained_lora_policy.eval()(ids).logits, atol=1e-5)


def test_sampling_arguments_are_the_plain_tempered_distribution_with_a_seed_per_completion():
    settings = RolloutSettings(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12)
    arguments = sampling_arguments(settings, [11, 12, 13])
    assert [a["seed"] for a in arguments] == [11, 12, 13]
    first = arguments[0]
    assert (first["temperature"], first["top_p"], first["top_k"], first["max_tokens"]) == (0.7, 0.9, -1, 12)
    assert first["repetition_penalty"] == 1.0 and first["min_p"] == 0.0 and first["ignore_eos"] is False
    assert sampling_arguments(RolloutSettings(top_k=5), [0])[0]["top_k"] == 5


def test_vllm_outputs_become_a_rollout_that_trains_the_stop(tiny_model):
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    output = lambda ids, reason: SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason=reason)])  # noqa: E731
    # Stopped on EOS with the token returned, stopped without it, and cut at max_tokens.
    rows = response_rows([output([5, 6, eos], "stop"), output([5], "stop"), output([7, 8, 9, 10], "length")], eos)
    assert rows == [[5, 6, eos], [5, eos], [7, 8, 9, 10]]
    prompt_ids, prompt_mask = torch.tensor([[pad, 3], [4, 3], [pad, 2]]), torch.tensor([[0, 1], [1, 1], [0, 1]])
    rollout = rollout_from_responses(
        prompt_ids, prompt_mask, pad_responses(rows, pad, 4), tokenizer, samples_per_prompt=1
    )
    assert rollout.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert rollout.ended.tolist() == [True, True, False] and rollout.prompt_index.tolist() == [0, 1, 2]


def test_vllm_engine_is_refused_where_it_cannot_run(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="rollout.engine vllm needs a CUDA GPU, but model.device is cpu"):
        load_config("grpo", None, [f"model.name_or_path={tiny_model}", "model.device=cpu", "rollout.engine=vllm"])
    with pytest.raises(UserError, match="model.device is cpu"):
        check_vllm_usable("cpu")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(UserError, match=r"pip install 'rlhfkit\[vllm\]'"):
            check_vllm_usable("auto")
    elif not torch.cuda.is_available():
        with pytest.raises(UserError, match="none is visible"):
            check_vllm_usable("auto")
