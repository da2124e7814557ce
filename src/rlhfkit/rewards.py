"""Reward sources. For now: a trained reward model scoring (prompt, response) pairs."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhfkit.config import ModelSettings
from rlhfkit.data.batching import pad_right
from rlhfkit.data.formatting import fit_pair, prompt_and_response_ids
from rlhfkit.models import load_reward_model, load_tokenizer, resolve

Messages = Sequence[dict[str, str]]


def special_token_wrapper(tokenizer: Any):
    """Encoders (BERT-style) expect [CLS] ... [SEP] around the text; decoders get the ids unchanged."""
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is not None and sep is not None:
        return lambda ids: [cls, *ids, sep]
    return lambda ids: ids


def reward_model_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) float32 scalar rewards of N right-padded rows."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


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
        self.template = template
        self.wrap = special_token_wrapper(self.tokenizer)
        self.max_length = max_length - len(self.wrap([]))  # room for an encoder's [CLS]/[SEP]

    @torch.inference_mode()
    def score(self, prompts: Sequence[Messages | str], responses: Sequence[str], batch_size: int = 8) -> list[float]:
        rows = []
        for prompt, response in zip(prompts, responses, strict=True):
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            prompt_ids, (response_ids,) = prompt_and_response_ids(self.tokenizer, turns, [response or " "], self.template)
            fitted_prompt, fitted_response, _ = fit_pair(prompt_ids, response_ids, response_ids, self.max_length)
            rows.append(self.wrap(fitted_prompt + fitted_response))
        scores: list[float] = []
        for start in range(0, len(rows), batch_size):
            input_ids, attention_mask = pad_right(rows[start : start + batch_size], self.tokenizer.pad_token_id)
            scores.extend(reward_model_forward(self.model, input_ids.to(self.device), attention_mask.to(self.device)).tolist())
        return scores
