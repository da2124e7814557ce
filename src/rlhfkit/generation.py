"""Batched sampling with the KV cache (HF generate, left-padded prompts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhfkit.models import eval_mode, weights_are_sharded


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
) -> list[str]:
    """Continue each already-formatted prompt (in eval mode: no dropout); returns only the new text. temperature 0 is greedy."""
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generated tokens must follow the prompt directly
    torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
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
                generated = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    synced_gpus=weights_are_sharded(model),  # sharded: every process runs each decode step
                    **sampling,
                )
                new_tokens = generated[:, encoded["input_ids"].shape[1] :]  # (B, new)
                outputs.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        finally:
            tokenizer.padding_side = padding_side
    return outputs


def generate_answers(
    model: torch.nn.Module, tokenizer: Any, prompt_texts: Sequence[str], settings: Any, seed: int
) -> list[str]:
    """generate_texts with a stage's `generation` settings."""
    if not prompt_texts:
        return []
    return generate_texts(
        model,
        tokenizer,
        prompt_texts,
        settings.max_new_tokens,
        settings.temperature,
        settings.top_p,
        settings.batch_size,
        seed=seed,
    )
