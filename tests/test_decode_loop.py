"""The decode loop with a preallocated cache (`rlhfkit.decode_loop`): it samples what `generate`
samples from the same logits — padding, shared prompts, EOS and the early stop included — and
the copies' joined (int8) and packed (bf16) products change nothing but the number and speed of
the calls."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.config import ModelSettings, RolloutSettings, SamplingSettings
from rlhfkit.decode_loop import DecodeLoop, _attend_from_one_position, _rms_norm, supports
from rlhfkit.int8_rollout import Int8Sampler
from rlhfkit.models import load_causal_lm, load_tokenizer, resolve
from rlhfkit.rollout_copy import Bf16Sampler, PackedLinear, onednn_packs
from rlhfkit.sampling import RowSeededSampler, sample_rollout

PROMPTS = ["User: Why is the sky blue?\nAssistant:", "User: What?\nAssistant:", "User: A star is\nAssistant:"]


class EndsRowsEarly(RowSeededSampler):
    """Draws as RowSeededSampler does, but the batch rows `ending[step]` emit EOS at decode step `step`."""

    def __init__(self, seeds: list[int], settings: SamplingSettings, eos: int, ending: dict[int, list[int]]) -> None:
        super().__init__(seeds, settings, keep_logprobs=True)
        self.eos, self.ending, self.calls = eos, ending, 0

    def draw(self, scores: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        tokens = super().draw(scores, rows)
        rows = torch.arange(len(tokens)) if rows is None else rows
        tokens[torch.isin(rows, torch.tensor(self.ending.get(self.calls, [-1])))] = self.eos
        self.calls += 1
        return tokens


def float_model(tiny_model):
    return load_causal_lm(resolve(str(tiny_model)), ModelSettings(), torch.float32).eval()


def test_the_loop_samples_what_generate_samples(tiny_model, monkeypatch):
    import rlhfkit.sampling as sampling

    model, tokenizer = float_model(tiny_model), load_tokenizer(resolve(str(tiny_model)))
    assert supports(model, 64)
    settings = RolloutSettings(max_new_tokens=10, temperature=0.9, batch_size=4)
    # Prompts of three lengths (left padding), two samples each, a batch that splits a group.
    by_generate = sample_rollout(model, tokenizer, PROMPTS, settings, 2, 64, range(6), keep_sampler_logprobs=True)
    by_loop = sample_rollout(
        model, tokenizer, PROMPTS, settings, 2, 64, range(6), keep_sampler_logprobs=True, decode_loop=DecodeLoop(model)
    )
    assert by_generate.response_ids.shape == by_loop.response_ids.shape
    assert torch.equal(by_generate.response_ids, by_loop.response_ids)
    assert torch.equal(by_generate.response_mask, by_loop.response_mask)
    # the log-probs of every sampled token (after a row's EOS the loop may have stopped drawing for it)
    sampled = by_generate.response_mask.bool()
    assert torch.allclose(by_generate.sampler_logprobs[sampled], by_loop.sampler_logprobs[sampled], atol=1e-5)

    # A row that ends early is padded after its EOS; once every row has ended, sampling stops.
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    monkeypatch.setattr(sampling, "RowSeededSampler", lambda seeds, s, keep: EndsRowsEarly(seeds, s, eos, {2: [1]}))
    both = [
        sample_rollout(model, tokenizer, PROMPTS[:1], settings, 2, 64, [3, 4], True, loop)
        for loop in (None, DecodeLoop(model))
    ]
    assert torch.equal(both[0].response_ids, both[1].response_ids)
    assert both[1].response_ids[1, 2] == eos and (both[1].response_ids[1, 3:] == pad).all()
    assert both[1].lengths[1] == 3 and not both[1].ended[0]


def test_rows_that_ended_leave_the_batch_without_changing_any_sample(tiny_model, monkeypatch):
    import rlhfkit.sampling as sampling

    model, tokenizer = float_model(tiny_model), load_tokenizer(resolve(str(tiny_model)))
    eos = tokenizer.eos_token_id
    # 8 rows end at different steps: the batch shrinks after steps 1 (2 of 8 ended), 3 (2 of 6)
    # and 5 (1 of 4), and its rows keep their own seeds and positions in the result
    ending = {1: [2, 5], 3: [0, 7], 5: [3]}
    monkeypatch.setattr(sampling, "RowSeededSampler", lambda seeds, s, keep: EndsRowsEarly(seeds, s, eos, ending))
    settings = RolloutSettings(max_new_tokens=9, temperature=0.9, batch_size=8)
    both = [
        sample_rollout(model, tokenizer, PROMPTS, settings, 3, 64, range(9), True, loop)
        for loop in (None, DecodeLoop(model))
    ]
    assert torch.equal(both[0].response_ids, both[1].response_ids)
    assert both[1].lengths.tolist() == [4, 9, 2, 6, 9, 2, 9, 4, 4]  # the 9th is row 0 of a second batch
    sampled = both[0].response_mask.bool()
    assert torch.allclose(both[0].sampler_logprobs[sampled], both[1].sampler_logprobs[sampled], atol=1e-5)
    assert both[1].sampler_logprobs[2, 3:].isnan().all()  # no draws for a row once it has left


def test_the_loop_stops_when_every_row_has_ended(tiny_model):
    model = float_model(tiny_model)
    ids, mask = torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    eos = 3
    sampler = EndsRowsEarly([1, 2], SamplingSettings(temperature=1.0), eos, {1: [0]})
    draw = lambda scores, rows: torch.where(rows == 1, eos, sampler.draw(scores, rows))  # noqa: E731
    new = DecodeLoop(model).generate(ids, mask, torch.tensor([0, 1]), draw, 20, eos, 0)
    assert new.shape == (2, 2) and new[0, 1] == eos and new[1, 0] == eos and new[1, 1] == 0


def test_only_llama_layout_models_take_the_loop(tiny_model):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert not supports(gpt2, 64)
    model = float_model(tiny_model)
    assert supports(model, 64)
    model.config.sliding_window = 32  # a window shorter than the sequence: generate handles it
    assert not supports(model, 64) and supports(model, 32)


@pytest.mark.parametrize("kernels", ["1", "0"])  # the fused CPU kernel (norms inside it) and the eager path
def test_the_int8_copy_joins_its_products_and_samples_as_its_modules_do(tiny_model, monkeypatch, kernels):
    monkeypatch.setenv("RLHFKIT_CPU_KERNELS", kernels)
    model, tokenizer = float_model(tiny_model), load_tokenizer(resolve(str(tiny_model)))
    copy = Int8Sampler(model, tokenizer, PROMPTS, 64)
    settings = RolloutSettings(max_new_tokens=8, temperature=1.0, batch_size=8)
    joined = copy.sample(model, 0, PROMPTS, settings, 2, 64, range(6))
    loop = copy.decode_loop
    block = copy.model.model.layers[0]
    attention = block.self_attn
    hidden = torch.randn(3, 1, attention.q_proj.in_features, generator=torch.Generator().manual_seed(0))
    normed = _rms_norm(block.input_layernorm, hidden)
    separate = torch.cat([attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)], dim=-1)
    # the input norm and the same integer products, in one call
    assert float((loop.products[0].qkv(hidden) - separate).norm() / separate.norm()) < 1e-3
    by_modules = sample_rollout(copy.model, tokenizer, PROMPTS, settings, 2, 64, range(6), True)
    assert torch.equal(joined.response_ids, by_modules.response_ids)
    assert torch.allclose(joined.sampler_logprobs, by_modules.sampler_logprobs, atol=1e-4, equal_nan=True)


def test_one_position_attention_matches_sdpa_with_grouped_heads():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 6, 1, 8, generator=generator)
    keys, values = (torch.randn(3, 2, 5, 8, generator=generator) for _ in range(2))
    attend = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=attend, scale=0.3, enable_gqa=True
    )
    assert torch.allclose(_attend_from_one_position(query, keys, values, attend, 0.3), expected, atol=1e-6)
    in_bf16 = _attend_from_one_position(*(t.bfloat16() for t in (query, keys, values)), attend, 0.3)
    assert in_bf16.dtype == torch.bfloat16 and torch.allclose(in_bf16.float(), expected, atol=0.05)


@pytest.mark.skipif(not onednn_packs(torch.bfloat16), reason="this PyTorch build does not pack bf16 weights for oneDNN")
def test_the_bf16_copy_samples_through_packed_products_as_its_modules_do(tiny_model):
    model, tokenizer = float_model(tiny_model), load_tokenizer(resolve(str(tiny_model)))
    copy = Bf16Sampler(model, tokenizer)
    settings = RolloutSettings(max_new_tokens=8, temperature=1.0, batch_size=8)
    by_loop = copy.sample(model, 0, PROMPTS, settings, 2, 64, range(6))
    loop = copy.decode_loop
    assert loop is not None and all(isinstance(layer.output, PackedLinear) for layer in loop.products)
    block = copy.model.model.layers[0]
    attention = block.self_attn
    hidden = torch.randn(3, 2, attention.q_proj.in_features).bfloat16()
    normed = _rms_norm(block.input_layernorm, hidden)
    separate = torch.cat([attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)], dim=-1)
    assert torch.allclose(loop.products[0].qkv(hidden).float(), separate.float(), atol=0.02)
    # generate over the copy's plain bf16 modules: the same draws, log-probs within bf16's rounding
    by_modules = sample_rollout(copy.model, tokenizer, PROMPTS, settings, 2, 64, range(6), True)
    assert torch.equal(by_loop.response_ids, by_modules.response_ids)
    assert torch.allclose(by_loop.sampler_logprobs, by_modules.sampler_logprobs, atol=0.02, equal_nan=True)
