"""A decode loop for Llama-layout models with a preallocated KV cache, for CPU sampling.

HF `generate` spends most of a small model's decode step outside the matrix products: the cache
grows by concatenation (every layer copies its keys and values at every step), masks and
position tensors are rebuilt, and each step passes through the generation utilities. This loop
runs the model's own embedding, norms and rotary embedding, and its linear layers or a rollout
copy's faster forms of them (int8, packed bf16 or float32), in a plain Python loop over the
layers: each layer's keys and values are written in place into a cache allocated once for the
prompt plus `max_new_tokens`, and attention reads the columns written so far. Rows that answer
one prompt are prefilled once and copied. The next token is drawn by the caller's sampler from
the last position's logits; a row that has emitted EOS gets padding after it, rows that have
ended leave the batch, and the loop stops when every row has ended — what `generate` returns.

It knows the decoder-only layout of Llama, Mistral (within its sliding window) and Qwen2:
pre-norm blocks of grouped-query attention with rotary positions and a SiLU-gated MLP.
:func:`supports` says whether a model has it; other models sample through `generate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from rlhfkit.attention import consecutive_runs
from rlhfkit.engine.threads import follow_free_cores

LLAMA_LAYOUT = ("llama", "mistral", "qwen2")
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
LAYER_MODULES = (*QKV, *GATE_UP, "self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def supports(model: torch.nn.Module, length: int) -> bool:
    """Whether `model` (a causal LM, not wrapped) has the Llama layout this loop runs, for
    sequences of up to `length` tokens."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if config is None or inner is None or getattr(config, "model_type", None) not in LLAMA_LAYOUT:
        return False
    if getattr(config, "hidden_act", None) != "silu" or not hasattr(model, "lm_head"):
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < length:
        return False
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    if not all(_has(layer, name) for layer in inner.layers for name in LAYER_MODULES):
        return False
    norms = [inner.norm, *(layer.get_submodule(name) for layer in inner.layers for name in LAYER_MODULES[-2:])]
    return all(hasattr(norm, "variance_epsilon") for norm in norms)


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _rms_norm(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(hidden, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _side_by_side(layer: torch.nn.Module, paths: Sequence[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    modules = [layer.get_submodule(path) for path in paths]
    return lambda hidden: torch.cat([module(hidden) for module in modules], dim=-1)


class LayerProducts(NamedTuple):
    """The four products of one decoder layer, as the loop calls them, each from what the layer
    holds before the norm or activation in front of it: q/k/v side by side from the hidden state
    (the input norm applied on the way), the attention output from the heads' mixed values,
    gate/up side by side from the hidden state (the post-attention norm applied), and the down
    projection from gate/up's output (silu(gate) · up taken on the way). A rollout copy can so
    fold the norm or the activation into its product."""

    qkv: Callable[[torch.Tensor], torch.Tensor]
    output: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]


def around_norms(
    layer: torch.nn.Module,
    qkv: Callable[[torch.Tensor], torch.Tensor],
    output: Callable[[torch.Tensor], torch.Tensor],
    gate_up: Callable[[torch.Tensor], torch.Tensor],
    down: Callable[[torch.Tensor], torch.Tensor],
) -> LayerProducts:
    """A layer's products from plain products of its normed inputs: each norm and the gated
    activation run before the product that reads it."""

    def gated_down(joined: torch.Tensor) -> torch.Tensor:
        gate, up = joined.chunk(2, dim=-1)
        return down(torch.nn.functional.silu(gate) * up)

    return LayerProducts(
        lambda hidden: qkv(_rms_norm(layer.input_layernorm, hidden)),
        output,
        lambda hidden: gate_up(_rms_norm(layer.post_attention_layernorm, hidden)),
        gated_down,
    )


def normed_head(
    model: torch.nn.Module, head: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The output layer's product from the last hidden state, the final norm applied on the way."""
    return lambda hidden: head(_rms_norm(model.model.norm, hidden))


def _attend_from_one_position(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attend: torch.Tensor, scale: float
) -> torch.Tensor:
    """Grouped-query attention of one new position per row, as two batched products.

    query (B, H, 1, D); keys, values (B, KV, L, D); attend (B, 1, 1, L) bool. PyTorch's CPU
    attention kernel runs this shape in bfloat16 up to 9× slower than the products do (2.4 ms
    against 0.26 ms for 32 rows of 9 heads over 160 positions; 117 against 90 µs for one row), so
    bfloat16 decode steps take this path; the scores and softmax are float32."""
    rows, heads, _, head_dim = query.shape
    kv_heads = keys.shape[1]
    # query head h reads key/value head h // (heads / kv_heads), as Llama's repeat_kv lays them out
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~attend.reshape(rows, 1, 1, -1), -math.inf)
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(weights, values).reshape(rows, heads, 1, head_dim)


def _rotate(values: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) in the half-split layout Llama checkpoints use."""
    half = values.shape[-1] // 2
    rotated = torch.cat((-values[..., half:], values[..., :half]), dim=-1)
    return values * cos + rotated * sin


class DecodeLoop:
    """Samples continuations of left-padded prompts with one Llama-layout model's modules.

    products: per layer, the products the loop calls (:class:`LayerProducts`) — a rollout copy's
    faster forms of the model's linear layers, q/k/v and gate/up each joined into one; head: the
    output layer's, from the last hidden state before the final norm (:func:`normed_head`).
    Without them the model's own modules run and q/k/v and gate/up outputs are joined after
    their products.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        products: Sequence[LayerProducts] | None = None,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        config = model.config
        self.model = model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim**-0.5
        self.products = products or [
            around_norms(
                layer,
                _side_by_side(layer, QKV),
                layer.self_attn.o_proj,
                _side_by_side(layer, GATE_UP),
                layer.mlp.down_proj,
            )
            for layer in model.model.layers
        ]
        self.head = head or normed_head(model, model.lm_head)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: Sequence[tuple[torch.Tensor, torch.Tensor]],
        start: int,
        attend: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, V) of the last of `ids` (B, T), written at cache columns start..start+T.

        positions: (B, T) rotary positions; attend: (B, 1, T, ≥ start+T) bool, which cached columns
        each new token sees (columns past start+T are not yet written and masked)."""
        inner = self.model.model
        hidden = inner.embed_tokens(ids)
        cos, sin = (part[:, None] for part in inner.rotary_emb(hidden, positions))
        rows, width = ids.shape
        end, heads, kv_heads = start + width, self.heads, self.kv_heads
        for (keys, values), products in zip(cache, self.products):
            projected = products.qkv(hidden)
            projected = projected.view(rows, width, heads + 2 * kv_heads, self.head_dim).transpose(1, 2)
            rotated = _rotate(projected[:, : heads + kv_heads], cos, sin)
            keys[:, :, start:end] = rotated[:, heads:]
            values[:, :, start:end] = projected[:, heads + kv_heads :]
            if width == 1 and keys.dtype == torch.bfloat16:
                # a decode step's mask covers the whole cache: unsliced, the cache is read without a copy
                seen = attend.shape[-1]
                mixed = _attend_from_one_position(
                    rotated[:, :heads], keys[:, :, :seen], values[:, :, :seen], attend, self.scaling
                )
            else:
                mixed = torch.nn.functional.scaled_dot_product_attention(
                    rotated[:, :heads],
                    keys[:, :, :end],
                    values[:, :, :end],
                    attn_mask=attend[..., :end],
                    scale=self.scaling,
                    enable_gqa=kv_heads != heads,
                )
            hidden = hidden + products.output(mixed.transpose(1, 2).reshape(rows, width, -1))
            hidden = hidden + products.down(products.gate_up(hidden))
        return self.head(hidden[:, -1:])[:, 0].float()

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        prompt_index: torch.Tensor,
        draw: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
    ) -> torch.Tensor:
        """(B, new) tokens after left-padded prompts `ids`/`mask` (B, P); rows with equal
        `prompt_index` share one prompt and are prefilled once. draw: (logits (R, V), the R rows'
        indices in the batch) → tokens (R,). new ≤ max_new_tokens: the loop ends once every row
        has emitted EOS.

        Rows that have ended leave the batch once they are a quarter of it (their cache rows
        dropped), so the steps after run on the rows still sampling; each row's draw depends only
        on its own logits and index, so the samples are those of a batch that never shrinks."""
        runs = consecutive_runs(prompt_index.tolist())
        firsts = [run[0] for run in runs]
        copies = torch.tensor([number for number, run in enumerate(runs) for _ in run])
        prompt_width = ids.shape[1]
        length = prompt_width + max_new_tokens
        valid = torch.zeros(len(firsts), length, dtype=torch.bool)
        valid[:, :prompt_width] = mask[firsts].bool()
        dtype = self.model.model.embed_tokens.weight.dtype
        cache = [
            tuple(torch.zeros(len(firsts), self.kv_heads, length, self.head_dim, dtype=dtype) for _ in range(2))
            for _ in self.model.model.layers
        ]
        causal = torch.ones(prompt_width, prompt_width, dtype=torch.bool).tril()
        # Each token also sees itself, so a padding column's attention is never empty (no NaN).
        attend = (causal & valid[:, None, :prompt_width]) | torch.eye(prompt_width, dtype=torch.bool)
        positions = (mask[firsts].cumsum(dim=1) - 1).clamp(min=0)
        logits = self.forward(ids[firsts], positions, cache, 0, attend[:, None])[copies]
        cache = [(keys[copies], values[copies]) for keys, values in cache]
        valid, position = valid[copies], positions[copies, -1:]

        tokens = torch.full((len(copies), max_new_tokens), pad_token_id, dtype=torch.long)
        rows = torch.arange(len(copies))  # the batch rows still in the cache, in its order
        ended = torch.zeros(len(copies), dtype=torch.bool)  # of those rows
        for step in range(max_new_tokens):
            token = torch.where(ended, pad_token_id, draw(logits, rows))
            tokens[rows, step] = token
            ended |= token == eos_token_id
            if bool(ended.all()) or step == max_new_tokens - 1:
                break
            if 4 * int(ended.sum()) >= len(rows):
                going = (~ended).nonzero().squeeze(1)
                rows, token, valid, position = rows[going], token[going], valid[going], position[going]
                cache = [(keys[going], values[going]) for keys, values in cache]
                ended = ended[going]
            follow_free_cores()
            column = prompt_width + step
            valid[:, column] = True
            position = position + 1
            logits = self.forward(token[:, None], position, cache, column, valid[:, None, None])
        return tokens[:, : step + 1]
