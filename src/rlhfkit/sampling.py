"""Sampling: every caller that generates text goes through here (RL rollouts, evaluation, label
generation, SFT/DPO sample answers, `rlhfkit generate`), on HF `generate` with the KV cache.

Prompts are left-padded so every completion starts at the same column; completions are
right-padded after their first EOS. The response mask covers the generated tokens up to and
including that EOS, so the EOS itself is trained (a padding token equal to EOS never masks the
model's decision to stop). With `rollout.engine: vllm` the RL stages sample with a vLLM engine
colocated on each process's GPU (`rlhfkit.vllm_rollout`), and with `rollout.engine: int8` or
`bf16` a copy of the policy on the CPU (`rlhfkit.rollout_copy`, through this module's sampler and,
for Llama-layout models, `rlhfkit.decode_loop` in place of `generate`); every engine hands its
ids to :func:`rollout_from_responses`, so masks and decoding are the same.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhfkit.attention import consecutive_runs
from rlhfkit.config import SamplingSettings
from rlhfkit.decode_loop import DecodeLoop
from rlhfkit.engine.threads import follow_free_cores
from rlhfkit.models import eval_mode, weights_are_sharded


@dataclass
class Rollout:
    """N sampled completions; groups of `samples_per_prompt` for one prompt are contiguous."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P) 1 on prompt tokens
    response_ids: torch.Tensor  # (N, R) right-padded
    response_mask: torch.Tensor  # (N, R) float: 1 on generated tokens up to and including the first EOS
    ended: torch.Tensor  # (N,) bool: the completion emitted EOS within max_new_tokens
    prompt_index: torch.Tensor  # (N,) which prompt of the step each completion answers
    completions: list[str]  # decoded completions, special tokens removed
    # (N, R) the sampler's log-prob of each sampled token, when another engine than the training
    # model sampled (vLLM, the int8 copy); NaN where the sampler gave none (an EOS vLLM did not return)
    sampler_logprobs: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    def to(self, device: torch.device) -> Rollout:
        return Rollout(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})

    def select(self, indices: torch.Tensor) -> Rollout:
        """The completions at `indices`, as a smaller rollout."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, list):
                picked[f.name] = None if value is None else [value[i] for i in indices.tolist()]
            else:
                picked[f.name] = value[indices.to(value.device)]
        return Rollout(**picked)


def concat_rollouts(parts: Sequence[Rollout], pad_token_id: int, samples_per_prompt: int) -> Rollout:
    """One rollout of several (e.g. groups sampled in different rounds): prompts left-padded and
    responses right-padded to the widest, groups numbered again in order."""
    prompt_width = max(part.prompt_ids.shape[1] for part in parts)
    response_width = max(part.response_ids.shape[1] for part in parts)

    def left(value: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.nn.functional.pad(value, (prompt_width - value.shape[1], 0), value=fill)

    def right(value: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.nn.functional.pad(value, (0, response_width - value.shape[1]), value=fill)

    samplers = [part.sampler_logprobs for part in parts]
    size = sum(part.size for part in parts)
    return Rollout(
        prompt_ids=torch.cat([left(part.prompt_ids, pad_token_id) for part in parts]),
        prompt_mask=torch.cat([left(part.prompt_mask, 0) for part in parts]),
        response_ids=torch.cat([right(part.response_ids, pad_token_id) for part in parts]),
        response_mask=torch.cat([right(part.response_mask, 0) for part in parts]),
        ended=torch.cat([part.ended for part in parts]),
        prompt_index=torch.arange(size // samples_per_prompt).repeat_interleave(samples_per_prompt),
        completions=[text for part in parts for text in part.completions],
        sampler_logprobs=None
        if any(value is None for value in samplers)
        else torch.cat([right(value, float("nan")) for value in samplers]),
    )


def _move(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def encode_prompts(tokenizer: Any, prompt_texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P) left-padded ids and mask; a prompt over max_length tokens keeps its last max_length."""
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:] for text in prompt_texts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in encoded], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in encoded], dtype=torch.long)
    return ids, mask


def response_mask_from(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (N, R) float up to and including the first EOS, ended (N,) bool)."""
    is_eos = response_ids == eos_token_id
    ended = is_eos.any(dim=1)
    first_eos = torch.where(
        ended, is_eos.float().argmax(dim=1), torch.full_like(ended, response_ids.shape[1], dtype=torch.long)
    )
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    return (positions[None, :] <= first_eos[:, None]).float(), ended


def row_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, step, global sample index), well mixed."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def global_seeds(count: int) -> list[int]:
    """One seed per row from torch's global generator (so torch.manual_seed repeats them)."""
    return [int(seed) for seed in torch.randint(0, 2**62, (count,))]


class RowSeededSampler:
    """A logits processor that draws each row's next token with that row's own random generator.

    A completion then depends only on its prompt, the weights and its seed — not on which other
    rows share its batch, nor on which process generates it — so rollouts sharded across
    processes sample what one process would. The draw is an inverse-CDF lookup of one uniform
    number per row and step in softmax of the processed logits (temperature, then top-k, top-p);
    it hands generate a one-hot score row, and generate runs greedy. With `keep_logprobs` it also
    keeps each drawn token's log-prob under that processed distribution (:meth:`logprob_table`).
    """

    def __init__(self, seeds: Sequence[int], settings: SamplingSettings, keep_logprobs: bool = False) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.kept: list[torch.Tensor] | None = [] if keep_logprobs else None
        self.warpers = [TemperatureLogitsWarper(settings.temperature)]
        if settings.top_k:
            self.warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(settings.top_p))

    def draw(self, scores: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(R,) one token per row of the logits `scores` (R, V), which are the batch rows `rows`
        (all, in order, when None); the kept log-prob of a row not drawn for is NaN."""
        rows = torch.arange(len(self.generators)) if rows is None else rows
        for warper in self.warpers:
            scores = warper(None, scores)
        cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1)
        # 1 - U(0, 1) lies in (0, 1], so a token of probability 0 is never drawn.
        uniform = torch.stack([1 - torch.rand((), generator=self.generators[row]) for row in rows.tolist()])
        tokens = torch.searchsorted(cdf, (uniform.to(cdf.device) * cdf[:, -1])[:, None]).clamp(max=cdf.shape[1] - 1)
        if self.kept is not None:
            kept = torch.full((len(self.generators),), math.nan)
            kept[rows] = torch.log_softmax(scores.float(), dim=-1).gather(1, tokens).squeeze(1).cpu()
            self.kept.append(kept)
        return tokens.squeeze(1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """generate's logits-processor call: a score row that makes greedy decoding pick the draw."""
        return torch.full_like(scores, -math.inf).scatter_(1, self.draw(scores)[:, None], 0.0)

    def logprob_table(self, width: int) -> torch.Tensor:
        """(rows, width) the kept log-probs, one column per decode step, NaN after the last step."""
        table = torch.full((len(self.generators), width), math.nan)
        if self.kept:
            steps = torch.stack(self.kept[:width], dim=1)
            table[:, : steps.shape[1]] = steps
        return table


@torch.no_grad()
def sample_rollout(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_texts: Sequence[str],
    settings: SamplingSettings,
    samples_per_prompt: int,
    max_prompt_length: int,
    seeds: Sequence[int] | None = None,
    keep_sampler_logprobs: bool = False,
    decode_loop: DecodeLoop | None = None,
) -> Rollout:
    """Sample `samples_per_prompt` completions for each formatted prompt with the KV cache.

    With `seeds` (one per completion, prompt-major), each completion is drawn with its own
    generator (:class:`RowSeededSampler`); without, the seeds come from torch's global generator.
    keep_sampler_logprobs: the rollout keeps this model's log-prob of each sampled token (when it
    is not the training model). decode_loop: samples in place of `generate` (same draws, masks
    and EOS handling; `model` is the loop's).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    repeated = [text for text in prompt_texts for _ in range(samples_per_prompt)]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, repeated, max_prompt_length)
    # A full config replaces the model's defaults (e.g. a top_k of 50 or a repetition penalty);
    # RowSeededSampler applies temperature/top-k/top-p itself and generate decodes greedily, so
    # the distribution sampled is exactly softmax(logits / temperature) restricted by top-p/top-k.
    generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    seeds = global_seeds(len(repeated)) if seeds is None else seeds
    with eval_mode(model):
        pieces, logprob_pieces = [], []
        for start in range(0, len(repeated), settings.batch_size):
            ids = prompt_ids[start : start + settings.batch_size].to(device)
            mask = prompt_mask[start : start + settings.batch_size].to(device)
            sampler = RowSeededSampler(seeds[start : start + settings.batch_size], settings, keep_sampler_logprobs)
            processors = LogitsProcessorList([sampler])
            prompt_index = torch.arange(start, start + len(ids)) // samples_per_prompt
            if decode_loop is not None:
                new = decode_loop.generate(
                    ids,
                    mask,
                    prompt_index,
                    sampler.draw,
                    settings.max_new_tokens,
                    tokenizer.eos_token_id,
                    tokenizer.pad_token_id,
                )
            else:
                prefix = shared_prompt_cache(model, ids, mask, prompt_index)
                new = generate_new_tokens(
                    model, ids, mask, prefix, generation_config=generation_config, logits_processor=processors
                ).cpu()
            pad = torch.full(
                (new.shape[0], settings.max_new_tokens - new.shape[1]), tokenizer.pad_token_id, dtype=torch.long
            )
            pieces.append(torch.cat([new, pad], dim=1))
            logprob_pieces.append(sampler.logprob_table(settings.max_new_tokens))
    rollout = rollout_from_responses(prompt_ids, prompt_mask, torch.cat(pieces), tokenizer, samples_per_prompt)
    if keep_sampler_logprobs:
        rollout.sampler_logprobs = torch.cat(logprob_pieces)
    return rollout


def _generate_cache_keyword() -> str:
    """generate's keyword for a ready KV cache: transformers 5.24 renames `past_key_values` to `cache`
    (the old name warns, and goes in 6.0)."""
    import transformers

    release = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    return "cache" if release >= (5, 24) else "past_key_values"


class FollowFreeCores:
    """A stopping criterion that never stops: it lets the CPU thread count follow the free cores
    between decode steps (a forward pass computes the same with any count)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        follow_free_cores()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_new_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_cache: Any | None = None,
    **generation: Any,
) -> torch.Tensor:
    """(B, new) the tokens HF `generate` adds after left-padded prompts: the one call of `generate`
    that every sampler here makes. prompt_cache: a KV cache of all but each prompt's last token."""
    from transformers import StoppingCriteriaList

    if prompt_cache is not None:
        generation[_generate_cache_keyword()] = prompt_cache
    generation["stopping_criteria"] = StoppingCriteriaList([FollowFreeCores()])
    # Sharded weights (FSDP, ZeRO-3): every process runs each decode step, as the gathers need.
    generated = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, synced_gpus=weights_are_sharded(model), **generation
    )
    return generated[:, input_ids.shape[1] :]


def shared_prompt_cache(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, prompt_index: torch.Tensor
) -> Any | None:
    """The KV cache of every row's prompt but its last token, each distinct prompt run once.

    Rows answering one prompt (equal prompt_index) start from one copy of its cache, so with n
    samples per prompt generate's prefill does 1/n of the work; it then runs the last prompt
    token and decodes as usual. None when no prompt repeats (generate prefills itself).
    """
    runs = consecutive_runs(prompt_index.tolist())
    if len(runs) == len(ids) or ids.shape[1] < 2:
        return None
    first_rows = [run[0] for run in runs]
    prefix_ids, prefix_mask = ids[first_rows, :-1], mask[first_rows, :-1]
    positions = (prefix_mask.cumsum(dim=1) - 1).clamp(min=0)
    output = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions, use_cache=True)
    cache = next(value for key, value in output.items() if key in ("cache", "past_key_values"))
    cache.reorder_cache(torch.tensor([number for number, run in enumerate(runs) for _ in run], device=ids.device))
    return cache


def pad_responses(rows: Sequence[Sequence[int]], pad_token_id: int, width: int) -> torch.Tensor:
    """(N, width) generated ids, right-padded (rows longer than width are cut)."""
    return torch.tensor(
        [list(row[:width]) + [pad_token_id] * (width - len(row[:width])) for row in rows], dtype=torch.long
    )


def rollout_from_responses(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    tokenizer: Any,
    samples_per_prompt: int,
) -> Rollout:
    """A rollout from left-padded prompts and right-padded generated ids (prompt-major groups),
    whichever engine sampled them: masks up to and including the first EOS, decoded completions."""
    response_mask, ended = response_mask_from(response_ids, tokenizer.eos_token_id)
    completions = [
        tokenizer.decode(row[: int(length)], skip_special_tokens=True).strip()
        for row, length in zip(response_ids, response_mask.sum(dim=1))
    ]
    prompt_index = torch.arange(response_ids.shape[0] // samples_per_prompt).repeat_interleave(samples_per_prompt)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, ended, prompt_index, completions)


@torch.no_grad()  # not inference_mode: FSDP gathers weights into buffers it reuses in training
def generate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_texts: Sequence[str],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    show_progress: bool = True,
    decode_loop: DecodeLoop | None = None,
) -> list[str]:
    """Continue each already-formatted prompt (in eval mode: no dropout); returns only the new text.
    temperature 0 is greedy. decode_loop: samples in place of `generate` (same draws and EOS
    handling; `model` is the loop's, or the model it copies)."""
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generated tokens must follow the prompt directly
    from transformers import LogitsProcessorList

    torch.manual_seed(seed)
    draw = SamplingSettings(temperature=temperature, top_p=top_p) if temperature > 0 else None
    outputs: list[str] = []
    starts = range(0, len(prompt_texts), batch_size)
    with eval_mode(model):
        try:
            for start in tqdm(starts, desc="generate", disable=not show_progress or len(starts) < 2):
                encoded = tokenizer(
                    list(prompt_texts[start : start + batch_size]),
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(device)
                ids, mask = encoded["input_ids"], encoded["attention_mask"]
                sampler = RowSeededSampler(global_seeds(ids.shape[0]), draw) if draw else None
                if decode_loop is not None:
                    new_tokens = decode_loop.generate(
                        ids,
                        mask,
                        torch.arange(ids.shape[0]),
                        sampler.draw if sampler else greedy,
                        max_new_tokens,
                        tokenizer.eos_token_id,
                        tokenizer.pad_token_id,
                    )
                else:
                    new_tokens = generate_new_tokens(
                        model,
                        ids,
                        mask,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        do_sample=False,
                        logits_processor=LogitsProcessorList([sampler] if sampler else []),
                    )
                outputs.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        finally:
            tokenizer.padding_side = padding_side
    return outputs


def greedy(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A decode loop's draw of the most likely token of each row (greedy decoding)."""
    return logits.argmax(dim=-1)
