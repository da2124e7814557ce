"""Reward sources. For now: a trained reward model scoring (prompt, response) pairs."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhfkit.config import ModelSettings
from rlhfkit.data.batching import RewardBatch, reward_batches
from rlhfkit.data.formatting import TokenizedPair, fit_pair, prompt_and_response_ids
from rlhfkit.models import load_reward_model, load_tokenizer, resolve

Messages = Sequence[dict[str, str]]


def special_token_wrapper(tokenizer: Any):
    """Encoders (BERT-style) expect [CLS] ... [SEP] around the text; decoders get the ids unchanged."""
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is not None and sep is not None:
        return lambda ids: [cls, *ids, sep]
    return lambda ids: ids


def reward_model_forward(model: torch.nn.Module, batch: RewardBatch) -> torch.Tensor:
    """(2B,) scalar rewards of the batch's rows: chosen rows first, then rejected."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1).float()


class RewardModelScorer:
    """Scores (prompt, response) pairs with a reward model written by `rlhfkit reward` (or any
    one-output sequence-classification model)."""

    def __init__(self, reference: str, max_length: int = 512, template: str = "auto", device: str | None = None) -> None:
        source = resolve(reference)
        self.tokenizer = load_tokenizer(source)
        self.model = load_reward_model(source, ModelSettings(), torch.float32).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.max_length = max_length - 2  # room for an encoder's special tokens
        self.template = template
        self.wrap = special_token_wrapper(self.tokenizer)

    @torch.inference_mode()
    def score(self, prompts: Sequence[Messages | str], responses: Sequence[str], batch_size: int = 8) -> list[float]:
        pairs = []
        for prompt, response in zip(prompts, responses, strict=True):
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            prompt_ids, response_ids = prompt_and_response_ids(self.tokenizer, turns, response or " ", self.template)
            fitted_prompt, fitted_response, _ = fit_pair(prompt_ids, response_ids, response_ids, self.max_length)
            # One pair per response: its "rejected" half is a copy, scored and then dropped.
            pairs.append(TokenizedPair(fitted_prompt, fitted_response, fitted_response))
        scores: list[float] = []
        for batch in reward_batches(pairs, batch_size, self.tokenizer.pad_token_id, seed=None, wrap=self.wrap):
            rewards = reward_model_forward(self.model, batch.to(self.device))
            scores.extend(rewards[: batch.loss_units].tolist())
        return scores
