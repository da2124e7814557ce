"""The RL stages' CPU copies of the policy (`rollout.engine: int8`, `bf16` or `float32`).

A copy holds the policy's weights (LoRA deltas merged) in a faster form, is rebuilt from the
policy before a rollout whose policy changed since the last (its update count moved), and
samples through :func:`rlhfkit.sampling.sample_rollout` with one seed per completion, keeping
its own log-prob of every sampled token; the behaviour log-probs, the loss, the reference and the
KL still come from the training model, and every step logs `sampler_kl`, how far the copy is from
it. Llama-layout models sample through :mod:`rlhfkit.decode_loop` (a preallocated cache, each
layer's q/k/v and gate/up products joined into one, rows that have ended dropped); other models
through `generate`.

The bf16 copy (:class:`Bf16Sampler`) casts every weight to bfloat16. On a CPU with bfloat16
matrix instructions (AVX512-BF16, AMX) a bf16 product runs several times faster than a float32
one and streams half the bytes; without them it is slower than float32, so the engine is refused
there. The float32 copy (:class:`Float32Sampler`) keeps the policy's precision and only changes
the kernels: its weights are packed for oneDNN, which on some CPUs multiplies faster than the
default BLAS. The int8 copy (`rlhfkit.int8_rollout`) needs no special instructions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhfkit.config import GenerationSettings, RolloutSettings, SamplingSettings
from rlhfkit.decode_loop import GATE_UP, QKV, DecodeLoop, LayerProducts, around_norms, normed_head, supports
from rlhfkit.engine.distributed import require_cpu_bf16, runs_on_cpu, without_bf16_products
from rlhfkit.errors import UserError
from rlhfkit.models import weights_are_sharded
from rlhfkit.sampling import Rollout, generate_texts, sample_rollout
from rlhfkit.vllm_rollout import merged_weights, unwrapped

COPY_ENGINES = ("int8", "bf16", "float32")


def resolve_auto_engine(rollout: RolloutSettings, device: str, sharded: bool) -> RolloutSettings:
    """`rollout.engine: auto` made concrete for this run: the bf16 copy on a CPU with bf16 matrix
    instructions in a one-process or data-parallel run, else the training model itself (hf, whose
    samples need no correction)."""
    if rollout.engine != "auto":
        return rollout
    if sharded:
        reason = "a sharded policy samples itself"
    elif not runs_on_cpu(device):
        reason = "the policy is on a GPU"
    else:
        reason = without_bf16_products(device, sharded=False)
    engine = "hf" if reason else "bf16"
    print(f"rollout: engine auto -> {engine}" + (f" ({reason})" if reason else ""))
    return rollout.model_copy(update={"engine": engine, "correction": "none" if reason else rollout.correction})


def check_copy_usable(engine: str, device: torch.device) -> None:
    """Refuse a CPU copy engine before the policy loads where it cannot serve."""
    if device.type != "cpu":
        raise UserError(
            f"rollout.engine {engine} is a CPU sampler, but the policy is on {device.type}; "
            "on a GPU use rollout.engine: vllm (or hf)"
        )
    if engine == "bf16":
        require_cpu_bf16("rollout.engine bf16", "rollout.engine: int8 (or hf)")


def set_tensor(root: torch.nn.Module, name: str, value: Any) -> None:
    """Put `value` (a module, parameter or buffer) at dotted `name` under root."""
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if isinstance(value, torch.nn.Module):
        setattr(module, leaf, value)
    elif isinstance(getattr(module, leaf, None), torch.nn.Parameter) or leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


class PolicyCopy:
    """A copy of one policy, refreshed from it when its update count moved; `sample` mirrors
    `sampling.sample_rollout` and adds the copy's log-probs to the rollout. Subclasses say how
    the weights are copied (`refresh`) and how two or three linear layers become one (`join`)."""

    samples_the_policy = False  # its distribution is the copy's: evaluations sample the policy

    def __init__(self, policy: torch.nn.Module, tokenizer: Any) -> None:
        from transformers import AutoModelForCausalLM

        self.tokenizer = tokenizer
        with torch.device("meta"):  # the skeleton only: every tensor comes from the policy
            self.model = AutoModelForCausalLM.from_config(unwrapped(policy).config)
        self.model.eval()
        self.linear_names = [name for name, module in self.model.named_modules() if isinstance(module, torch.nn.Linear)]
        self.synced_version: int | None = None
        self.decode_loop: DecodeLoop | None = None

    def refresh(self, policy: torch.nn.Module) -> None:
        raise NotImplementedError

    def join(self, layers: Sequence[torch.nn.Module]) -> torch.nn.Module | None:
        """One layer computing `layers`' outputs side by side, or None where they cannot be joined."""
        raise NotImplementedError

    def sample(
        self,
        policy: torch.nn.Module,
        version: int,
        prompt_texts: Sequence[str],
        settings: SamplingSettings,
        samples_per_prompt: int,
        max_prompt_length: int,
        seeds: Sequence[int],
    ) -> Rollout:
        """Completions of the policy at `version` (an update counter), sampled by its copy,
        rebuilt when the version moved."""
        if version != self.synced_version:
            self.refresh(policy)
            self.decode_loop = self.joined_decode_loop(max_prompt_length + settings.max_new_tokens)
            self.synced_version = version
        return sample_rollout(
            self.model,
            self.tokenizer,
            prompt_texts,
            settings,
            samples_per_prompt,
            max_prompt_length,
            seeds,
            keep_sampler_logprobs=True,
            decode_loop=self.decode_loop,
        )

    def product(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The module the decode loop runs for one linear layer (the layer itself unless a copy
        has a faster form)."""
        return layer

    def joined_decode_loop(self, length: int) -> DecodeLoop | None:
        """A decode loop over the copy (None for a model without the Llama layout: generate
        samples), each layer's q/k/v and gate/up products joined where they can be."""
        if not supports(self.model, length):
            return None
        products = []
        for layer in self.model.model.layers:
            qkv, gate_up = (self.join([layer.get_submodule(path) for path in paths]) for paths in (QKV, GATE_UP))
            if qkv is None or gate_up is None:
                return DecodeLoop(self.model)
            layers = LayerProducts(qkv, layer.self_attn.o_proj, gate_up, layer.mlp.down_proj)
            products.append(self.layer_products(layer, layers))
        return DecodeLoop(self.model, products, self.head_product())

    def layer_products(self, layer: torch.nn.Module, layers: LayerProducts) -> LayerProducts:
        """One layer's products for the loop from its linear `layers` (q/k/v and gate/up joined,
        the output and down projections as they are): each one's faster form, the norms and the
        gated activation run in front (a copy that fuses them overrides this)."""
        qkv, output, gate_up, down = layers
        return around_norms(layer, qkv, self.product(output), gate_up, self.product(down))

    def head_product(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The output layer's product for the loop, the final norm run in front of it."""
        return normed_head(self.model, self.product(self.model.lm_head))

    def close(self) -> None:
        self.model = None


class CastCopy(PolicyCopy):
    """The policy's weights in `dtype` (LoRA deltas merged); buffers (the rotary frequencies) stay
    as the policy keeps them. The decode loop multiplies by the weights packed for oneDNN where
    this PyTorch build can (:class:`PackedLinear`), by the plain weights elsewhere."""

    dtype = torch.float32

    @torch.no_grad()
    def refresh(self, policy: torch.nn.Module) -> None:
        inner, cast = unwrapped(policy), {}
        weights = dict(merged_weights(policy))
        for name, _ in self.model.named_parameters(remove_duplicate=False):
            # a tied output layer has no weight of its own in the merged list: it is the embedding's,
            # cast once and shared again
            weight = weights[name] if name in weights else inner.get_parameter(name)
            if weight.data_ptr() not in cast:
                cast[weight.data_ptr()] = weight.detach().to(self.dtype)
            set_tensor(self.model, name, cast[weight.data_ptr()])
        for name, buffer in inner.named_buffers():
            set_tensor(self.model, name, buffer)

    def product(self, layer: torch.nn.Module) -> torch.nn.Module:
        return PackedLinear(layer.weight, layer.bias, self.dtype) if onednn_packs(self.dtype) else layer

    def join(self, layers: Sequence[torch.nn.Module]) -> torch.nn.Module:
        weight = torch.cat([layer.weight for layer in layers])
        joined = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        joined.weight = torch.nn.Parameter(weight, requires_grad=False)
        if any(layer.bias is not None for layer in layers):
            biases = [
                torch.zeros(layer.out_features, dtype=self.dtype) if layer.bias is None else layer.bias
                for layer in layers
            ]
            joined.bias = torch.nn.Parameter(torch.cat(biases), requires_grad=False)
        return self.product(joined)


class Bf16Sampler(CastCopy):
    """The policy's weights in bfloat16 (`rollout.engine: bf16`)."""

    dtype = torch.bfloat16


class Float32Sampler(CastCopy):
    """The policy's own float32 weights, packed for oneDNN (`rollout.engine: float32`): the
    policy's distribution computed by other kernels, so held-out evaluations sample it too. On
    the 2-core AMD EPYC oneDNN's float32 products run 1.4–4.7× faster than the default BLAS's
    (product by product, 1 to 64 rows; a 32-row product by the 49,152 × 576 output layer: 24.5 ms
    plain, 9.8 ms packed)."""

    samples_the_policy = True


def build_copy(
    engine: str, policy: torch.nn.Module, tokenizer: Any, calibration_texts: Sequence[str], max_prompt_length: int
) -> PolicyCopy:
    """The CPU copy `engine` (int8, bf16 or float32) names; calibration_texts: the formatted
    prompts the int8 copy is smoothed on."""
    if engine == "int8":
        from rlhfkit.int8_rollout import Int8Sampler  # it builds on this module

        return Int8Sampler(policy, tokenizer, calibration_texts, max_prompt_length)
    return {"bf16": Bf16Sampler, "float32": Float32Sampler}[engine](policy, tokenizer)


def answering_loop(model: torch.nn.Module, engine: str, length: int) -> DecodeLoop | None:
    """The decode loop that answers prompts with `model`'s own distribution, for sequences of up
    to `length` tokens (`engine` of the held-out answers, evaluation and candidates): the float32
    copy's, the model's weights (LoRA merged) packed for oneDNN. None where `generate` samples:
    engine hf; a model without the Llama layout; and, with engine auto, a model on a GPU, sharded
    over processes, or not in float32 (the copy would sample another distribution)."""
    if engine == "hf":
        return None
    device = next(model.parameters()).device
    whole_on_cpu = device.type == "cpu" and not weights_are_sharded(model)
    if engine == "float32":
        if not whole_on_cpu:
            where = "sharded over processes" if device.type == "cpu" else f"on {device.type}"
            raise UserError(f"engine float32 samples a whole model on the CPU, but this one is {where}: use auto or hf")
    elif not whole_on_cpu or any(p.dtype != torch.float32 for p in model.parameters()):
        return None
    copy = Float32Sampler(model, tokenizer=None)
    if not supports(copy.model, length):
        return None
    copy.refresh(model)
    return copy.joined_decode_loop(length)


def generate_answers(
    model: torch.nn.Module, tokenizer: Any, prompt_texts: Sequence[str], settings: GenerationSettings, seed: int
) -> list[str]:
    """generate_texts with a stage's `generation` settings, sampled by its engine."""
    if not prompt_texts:
        return []
    longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in prompt_texts)
    return generate_texts(
        model,
        tokenizer,
        prompt_texts,
        settings.max_new_tokens,
        settings.temperature,
        settings.top_p,
        settings.batch_size,
        seed=seed,
        decode_loop=answering_loop(model, settings.engine, longest + settings.max_new_tokens),
    )


# The layout's batch-size hint: measured on the 2-core EPYC, 32 rows packs float32 weights best
# for products of 8 rows and more and as well as any for 1; bf16 products did not depend on it.
PACKING_ROWS = 32


class PackedLinear(torch.nn.Module):
    """y = x Wᵀ + b with the weight reordered once into oneDNN's blocked layout, in bf16 or float32.

    A plain product repacks its weight at every call: on the 2-core EPYC a 1-row bf16 product by
    SmolLM2's 49,152 × 576 output layer takes 4.4 ms plain and 1.4 ms packed, a 32-row one by its
    3,072 × 576 gate/up layer 453 µs against 284 µs. The op is the one PyTorch's compiler emits
    for frozen CPU linear layers; :func:`onednn_packs` checks it before any copy uses it.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), PACKING_ROWS)
        self.bias = None if bias is None else bias.detach().to(dtype)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(inputs, self.packed, self.bias, "none", [], "")


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build packs and multiplies `dtype` linear weights through oneDNN and
    gets the plain product's answer (a private op: checked once, never assumed)."""
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    weight, inputs, bias = (
        torch.randn(*shape, generator=generator).to(dtype) for shape in ((24, 16), (3, 2, 16), (24,))
    )
    try:
        packed = PackedLinear(weight, bias, dtype)(inputs)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    expected = torch.nn.functional.linear(inputs.float(), weight.float(), bias.float())
    return packed.shape == expected.shape and torch.allclose(packed.float(), expected, atol=0.05, rtol=0.02)
