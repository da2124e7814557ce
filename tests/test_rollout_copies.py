"""The CPU rollout copies (`rollout.engine: int8`, `bf16`): the int8 products, that each copy
follows the current policy, that its kept log-probs are what it sampled from, and that its
samples repeat."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.config import LoraSettings, ModelSettings, RolloutSettings
from rlhfkit.cpu_kernels import int8_linear_kernel
from rlhfkit.errors import UserError
from rlhfkit.int8_rollout import (
    InputQuantizer,
    Int8Linear,
    Int8Sampler,
    quantize_rows,
    smoothing,
)
from rlhfkit.models import attach_lora, load_causal_lm, load_tokenizer, resolve
from rlhfkit.passes import response_logprobs
from rlhfkit.rollout_copy import Bf16Sampler, Float32Sampler, check_copy_usable, resolve_auto_engine
from rlhfkit.sampling import sample_rollout

QUANTIZE_ROWS = quantize_rows
PROMPTS = ["User: Why is the sky blue?\nAssistant:", "User: What is a star?\nAssistant:"]


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    return float((value - expected).norm() / expected.norm())


def test_an_int8_linear_layer_computes_the_float_product_within_its_rounding():
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    inputs = torch.randn(2, 5, 64, generator=generator)
    quantized = Int8Linear(64, 48)
    quantized.load(layer.weight, layer.bias)
    with torch.no_grad():
        expected = layer(inputs)
    assert quantized(inputs).shape == (2, 5, 48) and quantized(inputs).dtype == torch.float32
    assert relative_error(quantized(inputs), expected) < 0.01  # 127 levels per row: ~0.5% noise
    assert quantized.weight.dtype == torch.int8


def test_smoothing_takes_an_outlier_channel_into_the_weights():
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=False)
    inputs = torch.randn(32, 64, generator=generator)
    inputs[:, 3] *= 60  # one channel carries most of the range, as in a language model's activations
    with torch.no_grad():
        expected = layer(inputs)
    plain, smoothed = Int8Linear(64, 48), Int8Linear(64, 48)
    plain.load(layer.weight, None)
    smoothed.load(layer.weight, None, smoothing(inputs.abs().amax(dim=0), [layer.weight]))
    plain_error, smoothed_error = relative_error(plain(inputs), expected), relative_error(smoothed(inputs), expected)
    assert smoothed_error < plain_error / 3, (plain_error, smoothed_error)


def test_layers_that_read_one_input_quantise_it_once(monkeypatch):
    import rlhfkit.int8_rollout as int8

    monkeypatch.setenv("RLHFKIT_CPU_KERNELS", "0")  # the eager path; the fused kernel quantises inside itself

    generator = torch.Generator().manual_seed(0)
    first, second = torch.nn.Linear(64, 32), torch.nn.Linear(64, 16)
    inputs = torch.randn(4, 64, generator=generator)
    factor = smoothing(inputs.abs().amax(dim=0), [first.weight, second.weight])
    shared = InputQuantizer(factor)
    layers = [Int8Linear(64, 32), Int8Linear(64, 16)]
    for layer, plain in zip(layers, (first, second)):
        layer.load(plain.weight, plain.bias, factor, shared)
    quantized = []
    monkeypatch.setattr(int8, "quantize_rows", lambda values: quantized.append(1) or QUANTIZE_ROWS(values))
    with torch.no_grad():
        for layer, plain in zip(layers, (first, second)):
            assert relative_error(layer(inputs), plain(inputs)) < 0.01
        assert len(quantized) == 1  # the second layer reused the first one's quantised input
        inputs.mul_(2)  # the same tensor changed in place: quantised again
        assert relative_error(layers[1](inputs), second(inputs)) < 0.01 and len(quantized) == 2


def fused_kernel_or_skip() -> None:
    if int8_linear_kernel() is None:
        pytest.skip("rlhfkit's CPU kernels could not be built here (see the message above)")


def test_without_a_compiler_the_int8_copy_says_so_and_runs_eagerly(monkeypatch, capsys, tmp_path):
    import subprocess

    from torch.utils import cpp_extension

    import rlhfkit.cpu_kernels as kernels

    def no_compiler(*args, **kwargs):
        raise subprocess.CalledProcessError(1, ["c++", "--version"])

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    kernels._built.cache_clear()
    try:
        assert kernels.int8_linear_kernel() is None
        assert "CPU kernels unavailable (Command '['c++', '--version']' returned" in capsys.readouterr().err
        layer = Int8Linear(64, 48)
        layer.load(torch.nn.Linear(64, 48).weight, None)
        assert layer(torch.randn(2, 64)).shape == (2, 48)  # the eager path
    finally:
        kernels._built.cache_clear()


@pytest.mark.parametrize("rows", [1, 3, 40])  # 40: more rows than one thread's share
@pytest.mark.parametrize("smoothed", [False, True])
def test_the_fused_int8_kernel_computes_the_eager_product_bit_for_bit(monkeypatch, rows, smoothed):
    fused_kernel_or_skip()
    generator = torch.Generator().manual_seed(rows)
    plain = torch.nn.Linear(64, 48)
    inputs = torch.randn(rows, 64, generator=generator) * 3
    if rows > 1:
        inputs[-1] = 0  # a zero row: the scale's floor
        # exact halves (the row's scale is 1), which round to the even neighbour as torch.round does
        inputs[0] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] * 8)
        halves = QUANTIZE_ROWS(inputs[:1])[0][0, :8]
        assert torch.equal(halves, torch.tensor([127, 0, 2, 2, 0, -2, -2, 4], dtype=torch.int8))
    layer = Int8Linear(64, 48)
    factor = torch.rand(64, generator=generator) + 0.5 if smoothed else None
    layer.load(plain.weight, plain.bias, factor)
    with torch.no_grad():
        fused = layer(inputs.reshape(1, rows, 64))
        monkeypatch.setenv("RLHFKIT_CPU_KERNELS", "0")
        eager = layer(inputs.reshape(1, rows, 64))
    assert fused.shape == eager.shape == (1, rows, 48) and torch.equal(fused, eager)


def test_the_fused_kernel_runs_the_norm_or_the_gated_activation_in_front_of_its_product(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    fused_kernel_or_skip()
    generator = torch.Generator().manual_seed(0)
    plain = torch.nn.Linear(64, 48, bias=False)
    layer = Int8Linear(64, 48)
    layer.load(plain.weight, None, torch.rand(64, generator=generator) + 0.5)
    norm = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=generator) + 0.5)
        hidden, joined = torch.randn(2, 3, 64, generator=generator), torch.randn(2, 3, 128, generator=generator)
        kernel = int8_linear_kernel()
        normed, gated = layer.fused(kernel, norm=norm)(hidden), layer.fused(kernel, gated=True)(joined)
        monkeypatch.setenv("RLHFKIT_CPU_KERNELS", "0")
        gate, up = joined.chunk(2, dim=-1)
        assert torch.equal(gated, layer(torch.nn.functional.silu(gate) * up))  # ATen's silu inside: the same bits
        assert relative_error(normed, layer(norm(hidden))) < 1e-5  # the norm's sum in another order


def test_the_int8_copy_samples_the_same_tokens_with_and_without_the_fused_kernel(lora_policy, tiny_model, monkeypatch):
    fused_kernel_or_skip()
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    nudge_adapters(lora_policy, seed=3, size=0.05)
    settings = RolloutSettings(max_new_tokens=8, temperature=1.0)
    fused = Int8Sampler(lora_policy, tokenizer, PROMPTS, 64).sample(lora_policy, 0, PROMPTS, settings, 4, 64, range(8))
    monkeypatch.setenv("RLHFKIT_CPU_KERNELS", "0")
    eager = Int8Sampler(lora_policy, tokenizer, PROMPTS, 64).sample(lora_policy, 0, PROMPTS, settings, 4, 64, range(8))
    assert torch.equal(fused.response_ids, eager.response_ids) and fused.response_mask.sum() > 8
    # the norms run inside the fused products, their sums in another order: equal up to rounding
    assert torch.allclose(fused.sampler_logprobs, eager.sampler_logprobs, atol=1e-4, equal_nan=True)


def test_the_copy_groups_the_layers_that_read_one_input(lora_policy, tiny_model):
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    sampler = Int8Sampler(lora_policy, tokenizer, PROMPTS, 64)
    groups = [
        [name.rsplit(".", 1)[-1] for name in names]
        for names, _ in sampler.input_ranges(lora_policy, *sampler.calibration)
    ]
    layers = lora_policy.get_base_model().config.num_hidden_layers
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * layers + [
        ["lm_head"]
    ]
    # the output layer's range is read from the decoder's last hidden state: its input in a full pass
    ids, mask = sampler.calibration
    seen = []
    handle = lora_policy.get_base_model().lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        lora_policy(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0))
    handle.remove()
    head_input = seen[0].reshape(-1, seen[0].shape[-1])[mask.bool().reshape(-1)]
    ranges = sampler.input_ranges(lora_policy, ids, mask)
    assert torch.allclose(ranges[-1][1], head_input.abs().amax(dim=0), rtol=0, atol=1e-6)
    sampler.load_weights(lora_policy, ranges)
    block = sampler.model.model.layers[0]
    assert block.self_attn.q_proj.quantizer is block.self_attn.v_proj.quantizer
    assert block.mlp.gate_proj.quantizer is block.mlp.up_proj.quantizer
    assert block.mlp.gate_proj.quantizer is not block.self_attn.q_proj.quantizer


@pytest.fixture()
def lora_policy(tiny_model):
    model = load_causal_lm(resolve(str(tiny_model)), ModelSettings(), torch.float32)
    return attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0)).eval()


def nudge_adapters(policy: torch.nn.Module, seed: int, size: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * size)


def next_token_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[:, -1].log_softmax(dim=-1)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return float((p_log.exp() * (p_log - q_log)).sum(dim=-1).mean())


COPIES = {
    "int8": lambda policy, tokenizer: Int8Sampler(policy, tokenizer, PROMPTS, 64),
    "bf16": lambda policy, tokenizer: Bf16Sampler(policy, tokenizer),
    "float32": lambda policy, tokenizer: Float32Sampler(policy, tokenizer),
}


@pytest.mark.parametrize("engine", COPIES)
def test_the_copy_follows_the_current_policy_after_every_update(lora_policy, tiny_model, engine):
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    sampler = COPIES[engine](lora_policy, tokenizer)
    settings = RolloutSettings(max_new_tokens=4, temperature=1.0)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7], [2, 8, 4, 11, 6, 10]])
    sampler.sample(lora_policy, 0, PROMPTS, settings, 2, 64, seeds=range(4))
    before = next_token_logprobs(lora_policy, ids)
    assert kl(before, next_token_logprobs(sampler.model, ids)) < 1e-3

    with torch.no_grad():  # an update that moves the policy far: the last block's output projection
        last = lora_policy.get_base_model().model.layers[-1].mlp.down_proj
        last.weight.add_(torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(1)))
    after = next_token_logprobs(lora_policy, ids)
    moved = kl(after, before)  # a near-uniform tiny model: the move is small in absolute terms
    sampler.sample(lora_policy, 0, PROMPTS, settings, 2, 64, seeds=range(4))  # same version: not rebuilt
    assert kl(before, next_token_logprobs(sampler.model, ids)) < moved / 20
    sampler.sample(lora_policy, 1, PROMPTS, settings, 2, 64, seeds=range(4))  # the next version: rebuilt
    copy = next_token_logprobs(sampler.model, ids)
    assert kl(after, copy) < moved / 20 and kl(before, copy) > moved / 2


def test_the_kept_log_probs_are_the_distribution_each_token_was_drawn_from(lora_policy, tiny_model):
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    settings = RolloutSettings(max_new_tokens=8, temperature=0.7, top_k=0)
    # On the training model itself the kept log-probs are its own, as a forward pass recomputes them.
    rollout = sample_rollout(lora_policy, tokenizer, PROMPTS, settings, 3, 64, range(6), keep_sampler_logprobs=True)
    recomputed, _ = response_logprobs(lora_policy, rollout, 0.7)
    mask = rollout.response_mask.bool()
    assert torch.allclose(rollout.sampler_logprobs[mask], recomputed[mask], atol=1e-4)
    # With top-k the drawn token's probability is renormalised over the k kept: higher than the trainer's.
    top_k = settings.model_copy(update={"top_k": 50})
    rollout = sample_rollout(lora_policy, tokenizer, PROMPTS, top_k, 3, 64, range(6), keep_sampler_logprobs=True)
    recomputed, _ = response_logprobs(lora_policy, rollout, 0.7)
    mask = rollout.response_mask.bool()
    assert (rollout.sampler_logprobs[mask] > recomputed[mask] + 1e-3).all()
    # Greedy (top-k 1): every drawn token had probability 1 under the processed distribution.
    greedy = sample_rollout(
        lora_policy, tokenizer, PROMPTS, settings.model_copy(update={"top_k": 1}), 1, 64, range(2), True
    )
    assert greedy.sampler_logprobs[greedy.response_mask.bool()].abs().max() == 0


@pytest.mark.parametrize("engine", COPIES)
def test_the_copy_repeats_its_samples_and_stays_close_to_the_trainer(lora_policy, tiny_model, engine):
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    nudge_adapters(lora_policy, seed=2, size=0.05)
    settings = RolloutSettings(max_new_tokens=8, temperature=1.0)
    first = COPIES[engine](lora_policy, tokenizer).sample(lora_policy, 0, PROMPTS, settings, 4, 64, range(8))
    again = COPIES[engine](lora_policy, tokenizer).sample(lora_policy, 0, PROMPTS, settings, 4, 64, range(8))
    assert torch.equal(first.response_ids, again.response_ids)
    assert torch.equal(first.sampler_logprobs.nan_to_num(), again.sampler_logprobs.nan_to_num())
    trainer, _ = response_logprobs(lora_policy, first, 1.0)
    mask = first.response_mask.bool()
    per_token_gap = (first.sampler_logprobs[mask] - trainer[mask]).abs()
    assert per_token_gap.mean() < 0.05 and first.response_mask.sum() > 8


def test_cpu_copies_are_refused_off_the_cpu_and_bf16_without_its_instructions(monkeypatch):
    from rlhfkit.engine import distributed

    for engine in ("int8", "bf16", "float32"):
        with pytest.raises(UserError, match=f"rollout.engine {engine} is a CPU sampler, but the policy is on cuda"):
            check_copy_usable(engine, torch.device("cuda"))
    check_copy_usable("int8", torch.device("cpu"))
    monkeypatch.setattr(distributed, "cpu_has_bf16_matmul", lambda: False)
    with pytest.raises(UserError, match="bf16 needs a CPU with bfloat16 matrix instructions"):
        check_copy_usable("bf16", torch.device("cpu"))
    check_copy_usable("int8", torch.device("cpu"))


def test_engine_auto_takes_the_bf16_copy_only_where_it_serves(monkeypatch, capsys):
    from rlhfkit.engine import distributed

    chosen = RolloutSettings(engine="auto", correction="tis")
    monkeypatch.setattr(distributed, "cpu_has_bf16_matmul", lambda: True)
    picked = resolve_auto_engine(chosen, "cpu", sharded=False)
    assert (picked.engine, picked.correction) == ("bf16", "tis")
    assert "rollout: engine auto -> bf16" in capsys.readouterr().out
    # sharded, or without the instructions: the training model samples, and nothing needs correcting
    for sharded, has_bf16, why in [
        (True, True, "a sharded policy samples itself"),
        (False, False, "this CPU has no bf16 matrix instructions"),
    ]:
        monkeypatch.setattr(distributed, "cpu_has_bf16_matmul", lambda has=has_bf16: has)
        picked = resolve_auto_engine(chosen, "cpu", sharded=sharded)
        assert (picked.engine, picked.correction) == ("hf", "none")
        assert f"rollout: engine auto -> hf ({why})" in capsys.readouterr().out
    named = RolloutSettings(engine="int8")
    assert resolve_auto_engine(named, "cpu", sharded=False) is named


def test_the_bf16_copy_keeps_one_embedding_for_a_tied_output_layer(lora_policy, tiny_model):
    copy = Bf16Sampler(lora_policy, load_tokenizer(resolve(str(tiny_model))))
    copy.refresh(lora_policy)
    assert copy.model.lm_head.weight.dtype == torch.bfloat16
    assert copy.model.lm_head.weight.data_ptr() == copy.model.model.embed_tokens.weight.data_ptr()
    assert copy.model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers as the policy keeps them


def test_the_float32_copy_samples_what_the_policy_samples(lora_policy, tiny_model):
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    nudge_adapters(lora_policy, seed=3, size=0.05)  # the merged LoRA deltas move the distribution
    settings = RolloutSettings(max_new_tokens=8, temperature=0.9, batch_size=4)
    copy = Float32Sampler(lora_policy, tokenizer)
    assert copy.samples_the_policy
    by_copy = copy.sample(lora_policy, 0, PROMPTS, settings, 2, 64, range(6))
    by_policy = sample_rollout(lora_policy, tokenizer, PROMPTS, settings, 2, 64, range(6), keep_sampler_logprobs=True)
    assert torch.equal(by_copy.response_ids, by_policy.response_ids)
    sampled = by_policy.response_mask.bool()
    assert torch.allclose(by_copy.sampler_logprobs[sampled], by_policy.sampler_logprobs[sampled], atol=1e-4)


def test_a_copy_made_with_the_adapters_disabled_holds_the_base_weights(lora_policy, tiny_model):
    nudge_adapters(lora_policy, seed=4, size=0.3)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    copy = Float32Sampler(lora_policy, load_tokenizer(resolve(str(tiny_model))))
    with lora_policy.disable_adapter():
        copy.refresh(lora_policy)
        base = next_token_logprobs(lora_policy, ids)
    assert kl(base, next_token_logprobs(copy.model, ids)) < 1e-6
    copy.refresh(lora_policy)
    assert kl(next_token_logprobs(lora_policy, ids), next_token_logprobs(copy.model, ids)) < 1e-6
    assert kl(base, next_token_logprobs(copy.model, ids)) > 1e-3  # the adapters move it: the test can tell


def test_the_int8_copy_divides_its_smoothing_out_where_each_input_is_produced(lora_policy, tiny_model, monkeypatch):
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    nudge_adapters(lora_policy, seed=5, size=0.3)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7], [2, 8, 4, 11, 6, 10]])
    folded = Int8Sampler(lora_policy, tokenizer, PROMPTS, 64)
    folded.refresh(lora_policy)
    block = folded.model.model.layers[0]
    for layer in (block.self_attn.q_proj, block.mlp.gate_proj, block.mlp.down_proj, folded.model.lm_head):
        assert layer.quantizer.inverse is None  # its input arrives divided by the factor
    assert block.self_attn.o_proj.quantizer.inverse is not None  # grouped-query heads: not folded
    base_norm = lora_policy.get_base_model().model.layers[0].input_layernorm.weight
    assert not torch.equal(block.input_layernorm.weight, base_norm)  # the copy's own, the policy's untouched

    monkeypatch.setattr(Int8Sampler, "smoothing_folds", lambda self: {})
    unfolded = Int8Sampler(lora_policy, tokenizer, PROMPTS, 64)
    unfolded.refresh(lora_policy)
    assert unfolded.model.model.layers[0].mlp.down_proj.quantizer.inverse is not None
    # the same products up to float rounding: dividing before or inside the quantiser is one computation
    assert kl(next_token_logprobs(unfolded.model, ids), next_token_logprobs(folded.model, ids)) < 1e-6
    assert kl(next_token_logprobs(lora_policy, ids), next_token_logprobs(folded.model, ids)) < 1e-2
