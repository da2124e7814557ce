"""An int8 rollout copy of the policy for CPU sampling (`rollout.engine: int8`).

A decode step streams every weight once and multiplies a few rows by it, so on a CPU its cost is
mostly weight bytes and small matrix products. The copy holds each linear layer's weight (LoRA
deltas merged) in int8 with one scale per output channel — a quarter of float32's bytes — and
quantises the layer's input per row at run time (symmetric, 127 levels), so every product is an
integer GEMM (`torch._int_mm`, oneDNN) with int32 accumulation. A few input channels of a language
model carry most of an activation's range; SmoothQuant's per-channel smoothing (Xiao et al. 2023,
α = 0.5) moves that range into the weights, measured from the policy's activations on a fixed set
of calibration prompts (the same for every process and step). Layers that read one input (q/k/v,
gate/up) share its smoothing and its quantisation: on a chat transcript of the embedded model the
copy's per-token KL to float32 fell from 0.062 to 0.008. In a Llama-layout copy the smoothing is divided
out where each input is produced (the norms' weights, the up projection's rows), so most
quantisers do not multiply at all. Embeddings, norms and buffers are the policy's
own tensors, shared, not copied. Rebuilding, sampling and the log-probs it keeps are every CPU
copy's (`rlhfkit.rollout_copy`); `rollout.correction` (TIS, masking) reweights the tokens where
the copy and the trainer disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhfkit.cpu_kernels import int8_linear_kernel
from rlhfkit.decode_loop import GATE_UP, QKV, LayerProducts, supports
from rlhfkit.models import eval_mode
from rlhfkit.rollout_copy import PolicyCopy, set_tensor
from rlhfkit.sampling import encode_prompts
from rlhfkit.vllm_rollout import merged_weights, unwrapped

SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength: half of the activation range to the weights


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row): symmetric, each row's largest magnitude maps to 127."""
    values = values.float()
    scale = values.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127)
    return torch.round(values / scale).to(torch.int8), scale


def smoothing(
    input_range: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = SMOOTHING_ALPHA
) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor s_j = max|X_j|^α / max|W_j|^(1-α), the weight range
    taken over every layer that reads this input: each computes (x / s)(W·diag(s))ᵀ = x Wᵀ, with
    both factors' ranges evened out before quantisation."""
    weight_range = torch.stack([weight.detach().float().abs().amax(dim=0) for weight in weights]).amax(dim=0)
    return input_range.clamp(min=1e-5) ** alpha / weight_range.clamp(min=1e-5) ** (1 - alpha)


class InputQuantizer:
    """Per-row int8 quantisation of a layer's input divided by the smoothing factor. Layers that
    read the same tensor (a block's q/k/v projections, its gate/up projections) share one, so that
    input is quantised once: it keeps the last input it saw and its quantisation, reused while
    the same tensor, unmodified (its version counter), comes again. folded: the tensor that
    produces the input already divides it by the factor (a norm's weight, the up projection's
    rows), so the quantiser does not."""

    def __init__(self, factor: torch.Tensor, folded: bool = False) -> None:
        self.width = factor.shape[0]
        self.inverse = None if folded else 1 / factor
        self.last: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.last is not None and self.last[0] is inputs and self.last[1] == inputs._version:
            return self.last[2], self.last[3]
        rows = inputs.reshape(-1, self.width)
        quantized, row_scale = quantize_rows(rows if self.inverse is None else rows * self.inverse)
        self.last = (inputs, inputs._version, quantized, row_scale)
        return quantized, row_scale


class Int8Linear(torch.nn.Module):
    """y = x Wᵀ + b with W in int8 per output channel and x quantised per row: an integer GEMM."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8), persistent=False)
        self.register_buffer("weight_scale", torch.ones(1, out_features), persistent=False)
        self.bias: torch.Tensor | None = None
        self.quantizer = InputQuantizer(torch.ones(in_features))

    @torch.no_grad()
    def load(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        factor: torch.Tensor | None = None,
        quantizer: InputQuantizer | None = None,
    ) -> None:
        """Quantise `weight` (out, in) times the smoothing `factor` (per input channel, none: 1);
        quantizer: the one shared with the other layers that read this layer's input."""
        factor = torch.ones(self.in_features) if factor is None else factor
        quantized, scale = quantize_rows(weight.detach().float() * factor)
        self.weight = quantized  # (out, in), handed to _int_mm transposed: oneDNN's fast layout here
        self.weight_scale = scale.reshape(1, -1)
        self.bias = None if bias is None else bias.detach()
        self.quantizer = quantizer or InputQuantizer(factor)

    @classmethod
    def joined(cls, layers: Sequence[Int8Linear]) -> Int8Linear:
        """One layer computing the outputs of `layers` side by side: they read one input through one
        quantiser, so one product (and one quantisation) serves them all."""
        first = layers[0]
        if any(layer.quantizer is not first.quantizer for layer in layers):
            raise ValueError("only layers that share one input quantiser can be joined")
        joined = cls(first.in_features, sum(layer.out_features for layer in layers))
        joined.weight = torch.cat([layer.weight for layer in layers])
        joined.weight_scale = torch.cat([layer.weight_scale for layer in layers], dim=1)
        if any(layer.bias is not None for layer in layers):
            joined.bias = torch.cat(
                [torch.zeros(layer.out_features) if layer.bias is None else layer.bias for layer in layers]
            )
        joined.quantizer = first.quantizer
        return joined

    def fused(
        self, kernel: Callable[..., torch.Tensor], norm: torch.nn.Module | None = None, gated: bool = False
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """This layer as one call of the fused kernel (`cpu_kernels.int8_linear_kernel`) on float32
        inputs, with the RMS `norm` in front of it or (gated) silu(gate) · up of an input twice
        its width: the decode loop's product, built after each refresh."""
        weight, weight_scale, bias, inverse = self.weight, self.weight_scale, self.bias, self.quantizer.inverse
        norm_weight, eps = (None, 0.0) if norm is None else (norm.weight.detach(), float(norm.variance_epsilon))
        width = self.in_features * (2 if gated else 1)

        def product(inputs: torch.Tensor) -> torch.Tensor:
            output = kernel(inputs.reshape(-1, width), weight, weight_scale, bias, inverse, norm_weight, eps, gated)
            return output.reshape(*inputs.shape[:-1], self.out_features)

        return product

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        kernel = int8_linear_kernel() if inputs.dtype == torch.float32 and inputs.device.type == "cpu" else None
        if kernel is not None:  # the same arithmetic as below, in one call
            return self.fused(kernel)(inputs)
        quantized, row_scale = self.quantizer(inputs)
        # int32 times the float scales promotes to float32 in the product: one kernel, no cast
        output = torch._int_mm(quantized, self.weight.t()) * (row_scale * self.weight_scale)
        if self.bias is not None:
            output = output + self.bias
        return output.to(inputs.dtype).reshape(*inputs.shape[:-1], self.out_features)


class Int8Sampler(PolicyCopy):
    """The int8 copy of one policy (`rollout.engine: int8`), smoothed on calibration prompts."""

    def __init__(
        self, policy: torch.nn.Module, tokenizer: Any, calibration_texts: Sequence[str], max_prompt_length: int
    ) -> None:
        """calibration_texts: formatted prompts whose activations set the smoothing at every rebuild."""
        super().__init__(policy, tokenizer)
        self.calibration = encode_prompts(tokenizer, list(calibration_texts), max_prompt_length)
        for name in self.linear_names:
            module = self.model.get_submodule(name)
            set_tensor(self.model, name, Int8Linear(module.in_features, module.out_features))

    def refresh(self, policy: torch.nn.Module) -> None:
        self.load_weights(policy, self.input_ranges(policy, *self.calibration))

    def join(self, layers: Sequence[torch.nn.Module]) -> Int8Linear | None:
        """Layers that share one input quantiser as one (one product, one quantisation)."""
        if any(layer.quantizer is not layers[0].quantizer for layer in layers):
            return None
        return Int8Linear.joined(layers)

    def layer_products(self, layer: torch.nn.Module, layers: LayerProducts) -> LayerProducts:
        """With the fused kernel, each norm and the gated activation run inside the product that
        reads them: four calls a layer."""
        kernel = self.float32_kernel()
        if kernel is None:
            return super().layer_products(layer, layers)
        qkv, output, gate_up, down = layers
        return LayerProducts(
            qkv.fused(kernel, norm=layer.input_layernorm),
            output.fused(kernel),
            gate_up.fused(kernel, norm=layer.post_attention_layernorm),
            down.fused(kernel, gated=True),
        )

    def head_product(self) -> Callable[[torch.Tensor], torch.Tensor]:
        kernel = self.float32_kernel()
        if kernel is None:
            return super().head_product()
        return self.model.lm_head.fused(kernel, norm=self.model.model.norm)

    def float32_kernel(self) -> Callable[..., torch.Tensor] | None:
        """The fused kernel where the copy's hidden states are float32 (its embedding is the policy's)."""
        return int8_linear_kernel() if self.model.model.embed_tokens.weight.dtype == torch.float32 else None

    @torch.no_grad()
    def input_ranges(
        self, policy: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
    ) -> list[tuple[list[str], torch.Tensor]]:
        """The policy's linear layers grouped by the input they read (consecutive calls on one
        tensor), each group with the largest |x_j| per input channel over the prompt tokens of
        (ids, mask): what smoothing evens out."""
        inner, calls = unwrapped(policy), []
        kept = mask.bool().reshape(-1)

        def record(name: str) -> Any:
            def hook(module: torch.nn.Module, arguments: tuple) -> None:
                inputs = arguments[0]  # its identity tells which layers read one tensor
                if calls and calls[-1][1] is inputs:
                    calls[-1][0].append(name)
                else:
                    rows = inputs.detach().reshape(-1, inputs.shape[-1])[kept]
                    calls.append(([name], inputs, rows.abs().amax(dim=0).float()))

            return hook

        # In a Llama-layout model the output layer reads the decoder's last hidden state: its range
        # is taken there, without the vocabulary-wide product (a fifth of SmolLM2-135M's FLOPs).
        decoder = inner.get_decoder() if supports(self.model, 1) else None
        hooks = [inner.get_submodule(name).register_forward_pre_hook(record(name)) for name in self.linear_names]
        try:
            with eval_mode(policy):
                positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
                if decoder is None:
                    inner(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
                else:
                    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)[0]
                    record("lm_head")(inner.lm_head, (hidden,))
        finally:
            for hook in hooks:
                hook.remove()
        return [(names, input_range) for names, _, input_range in calls]

    def smoothing_folds(self) -> dict[tuple[str, ...], str]:
        """Where a group's smoothing can be divided out before its input exists (SmoothQuant's
        fold), in a Llama-layout copy: q/k/v read the input norm's output, gate/up the
        post-attention norm's, the output layer the final norm's — each norm's weight takes the
        division; the down projection reads silu(gate) · up, so the up projection's output rows
        take it. The attention output projection keeps its own: with grouped-query attention a
        value channel feeds several heads, which need not share a factor."""
        if not supports(self.model, 1):
            return {}
        folds: dict[tuple[str, ...], str] = {("lm_head",): "model.norm.weight"}
        for index in range(len(self.model.model.layers)):
            prefix = f"model.layers.{index}."
            folds[tuple(prefix + path for path in QKV)] = prefix + "input_layernorm.weight"
            folds[tuple(prefix + path for path in GATE_UP)] = prefix + "post_attention_layernorm.weight"
            folds[(prefix + "mlp.down_proj",)] = prefix + "mlp.up_proj"
        return folds

    @torch.no_grad()
    def load_weights(self, policy: torch.nn.Module, groups: list[tuple[list[str], torch.Tensor]] = ()) -> None:
        """The policy's weights, LoRA merged, each linear layer quantised; the layers of each
        group (one input, its range) smoothed together and sharing one input quantiser."""
        inner = unwrapped(policy)
        weights = dict(merged_weights(policy))
        folds, folded = self.smoothing_folds(), []
        ungrouped = set(self.linear_names) - {name for names, _ in groups for name in names}
        for names, input_range in [*groups, *(([name], None) for name in sorted(ungrouped))]:
            # a tied output layer has no weight of its own in the policy's list: it is the embedding
            layer_weights = [weights.pop(f"{name}.weight", None) for name in names]
            layer_weights = [
                inner.get_submodule(name).weight if weight is None else weight
                for name, weight in zip(names, layer_weights)
            ]
            factor = None if input_range is None else smoothing(input_range, layer_weights)
            source = folds.get(tuple(names)) if factor is not None else None
            quantizer = None if factor is None else InputQuantizer(factor, folded=source is not None)
            for name, weight in zip(names, layer_weights):
                layer = self.model.get_submodule(name)
                layer.load(weight, weights.pop(f"{name}.bias", None), factor, quantizer)
            if source is not None:
                folded.append((source, factor))
        for name, tensor in weights.items():
            set_tensor(self.model, name, tensor)
        for source, factor in folded:  # each input divided by its factor where it is produced
            if source.endswith(".weight"):  # a norm's weight, replaced (the policy's stays as it is)
                set_tensor(self.model, source, self.model.get_parameter(source).detach() / factor)
            else:  # the up projection, whose output rows multiply the down projection's input
                up = self.model.get_submodule(source)
                up.weight_scale = up.weight_scale / factor.reshape(1, -1)
                up.bias = None if up.bias is None else up.bias / factor
        for name, buffer in inner.named_buffers():
            if not any(name.startswith(f"{linear}.") for linear in self.linear_names):
                set_tensor(self.model, name, buffer)
