"""Reward sources: a trained reward model, any sequence classifier with a chosen label, or a Python function.

Every source maps (prompts, completions, columns) to one float per completion. `score_completions`
wraps a source with the checks an RL step needs: a reward that raises or is not finite stops the
step naming the source and the sample (or, with ``on_invalid: skip``, leaves it out of the update
with a count), and optional shaping penalises completions that never emitted EOS.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit.attention import consecutive_runs, pack_shared_prefixes, shares_prompts
from rlhfkit.config import ModelSettings, RewardSourceSettings
from rlhfkit.data.batching import pad_right
from rlhfkit.data.formatting import fit_pair, prompt_and_response_ids
from rlhfkit.engine.threads import follow_free_cores
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.models import (
    backbone_and_score_head,
    load_reward_model,
    load_tokenizer,
    packs_by_position_ids,
    resolve,
)
from rlhfkit.passes import packed_reward_forward, reward_model_forward

Messages = Sequence[dict[str, str]]
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class RewardError(UserError):
    """A reward source failed or returned something that is not a finite number."""


def special_token_wrapper(tokenizer: Any):
    """Encoders (BERT-style) expect [CLS] ... [SEP] around the text; decoders get the ids unchanged."""
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is not None and sep is not None:
        return lambda ids: [cls, *ids, sep]
    return lambda ids: ids


def _as_turns(prompt: Messages | str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def learned_positions(backbone: torch.nn.Module) -> int | None:
    """How many token positions a backbone's learned position table covers (BERT-family encoders,
    GPT-2); None where positions are rotary or relative and a longer input still runs."""
    embeddings = getattr(backbone, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if table is None:
        table = getattr(backbone, "wpe", None)
    table = getattr(table, "base_layer", table)  # LoRA on the embeddings wraps the table
    if not isinstance(table, torch.nn.Embedding):
        return None
    # RoBERTa-style embeddings number positions from after the padding index
    padding_index = getattr(embeddings, "padding_idx", None)
    return table.num_embeddings - (padding_index + 1 if padding_index is not None else 0)


def refuse_beyond_learned_positions(backbone: torch.nn.Module, max_length: int, field: str, reference: str) -> None:
    """A clear error, before any step, where `field` asks for more tokens than the model has positions for
    (the model itself would stop mid-run with a tensor-size error)."""
    limit = learned_positions(backbone)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"{field}={max_length}: {reference} has learned positions for {limit} tokens only; "
            f"set {field} to {limit} or less"
        )


class RewardModelScorer:
    """Scores (prompt, response) pairs with a reward model written by `rlhfkit reward` (or any
    one-output sequence-classification model), or with one label of a multi-label classifier.

    A one-output model reads the conversation in its chat template, as `rlhfkit reward` trained it.
    With `label` set, the classifier reads the plain text "prompt completion" (how off-the-shelf
    classifiers such as sentiment models were trained) and the reward is that label's logit or
    softmax probability.
    """

    def __init__(
        self,
        reference: str,
        max_length: int = 512,
        template: str = "auto",
        device: str | None = None,
        label: str | int | None = None,
        output: str = "logit",
        max_length_field: str = "max_length",
    ) -> None:
        source = resolve(reference)
        self.tokenizer = load_tokenizer(source)
        self.model = load_reward_model(
            source, ModelSettings(), torch.float32, num_labels=None if label is not None else 1, trained_head=True
        ).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.template, self.output = template, output
        self.label_index = None if label is None else self._label_index(reference, label)
        self.wrap = special_token_wrapper(self.tokenizer)
        self.max_length = max_length - len(self.wrap([]))  # room for an encoder's [CLS]/[SEP]
        backbone, _ = backbone_and_score_head(self.model)
        refuse_beyond_learned_positions(backbone, max_length, max_length_field, reference)
        # one-output decoders running rlhfkit's attention score packed rows, answers sharing their prompt
        self.packs = self.label_index is None and packs_by_position_ids(backbone) and shares_prompts(backbone)

    def _label_index(self, reference: str, label: str | int) -> int:
        labels = self.model.config.id2label
        if isinstance(label, int):
            if label not in labels:
                raise UserError(
                    f"reward.label: {reference} has labels {dict(labels)}; index {label} is not one of them"
                )
            return label
        by_name = {str(name).lower(): index for index, name in labels.items()}
        if label.lower() not in by_name:
            raise UserError(
                f"reward.label: {reference} has labels {sorted(labels.values())}; {label!r} is not one of them"
            )
        return by_name[label.lower()]

    def _row(self, prompt: Messages | str, response: str) -> list[int]:
        if self.label_index is not None:
            text = f"{_as_turns(prompt)[-1]['content']} {response}"
            return self.wrap(self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_length])
        prompt_ids, (response_ids,) = prompt_and_response_ids(
            self.tokenizer, _as_turns(prompt), [response or " "], self.template
        )
        fitted_prompt, fitted_response, _ = fit_pair(prompt_ids, response_ids, response_ids, self.max_length)
        return self.wrap(fitted_prompt + fitted_response)

    @torch.inference_mode()
    def score(self, prompts: Sequence[Messages | str], responses: Sequence[str], batch_size: int = 8) -> list[float]:
        rows = [self._row(prompt, response) for prompt, response in zip(prompts, responses, strict=True)]
        if self.packs:
            return self._score_packed(prompts, rows)
        scores: list[float] = []
        for start in range(0, len(rows), batch_size):
            follow_free_cores()
            input_ids, attention_mask = pad_right(rows[start : start + batch_size], self.tokenizer.pad_token_id)
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
            if self.label_index is None:
                scores.extend(reward_model_forward(self.model, input_ids, attention_mask).tolist())
                continue
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            chosen = logits.softmax(-1) if self.output == "probability" else logits
            scores.extend(chosen[:, self.label_index].tolist())
        return scores

    def _score_packed(
        self, prompts: Sequence[Messages | str], rows: list[list[int]], pack_tokens: int = 8192
    ) -> list[float]:
        """Rows packed padding-free, about pack_tokens per forward; consecutive answers to one
        prompt (a rollout's samples) share their common prefix, run once."""
        scores = [math.nan] * len(rows)
        groups = consecutive_runs(prompts)
        chunk: list[list[int]] = []
        size = 0
        for position, group in enumerate(groups):
            chunk.append(group)
            size += sum(len(rows[i]) for i in group)
            if size < pack_tokens and position + 1 < len(groups):
                continue
            follow_free_cores()
            members = [i for g in chunk for i in g]
            local = {row: k for k, row in enumerate(members)}
            pack = pack_shared_prefixes(
                [torch.tensor(rows[i]) for i in members], [[local[i] for i in g] for g in chunk]
            )
            values = packed_reward_forward(
                self.model,
                pack.input_ids.to(self.device),
                pack.position_ids.to(self.device),
                pack.last_positions().to(self.device),
                pack.layout,
            )
            for row, value in zip(members, values.tolist()):
                scores[row] = value
            chunk, size = [], 0
        return scores


IN_PROCESS_PREFIX = "python:"
_in_process_functions: dict[str, Callable[..., Sequence[float]]] = {}


def reward_function_spec(function: Callable[..., Sequence[float]]) -> str:
    """How a config names a Python callable: `module:function` when it can be imported by that
    name (so the run's config.yaml works from the command line too), else `python:NAME` for this
    process only (a lambda, a closure, a function defined in a notebook or a script)."""
    module, name = getattr(function, "__module__", None), getattr(function, "__qualname__", None)
    if module and name and module != "__main__" and "<" not in name and "." not in name:
        imported = sys.modules.get(module)
        if imported is not None and getattr(imported, name, None) is function:
            return f"{module}:{name}"
    spec = f"{IN_PROCESS_PREFIX}{module or 'object'}.{name or type(function).__name__}"
    _in_process_functions[spec] = function
    return spec


def load_reward_function(spec: str) -> Callable[..., Sequence[float]]:
    """`package.module:function` or `path/to/file.py:function`; only what the user names is imported.
    A `python:NAME` spec is a callable handed to the Python API in this process."""
    if spec.startswith(IN_PROCESS_PREFIX):
        if spec not in _in_process_functions:
            raise UserError(
                f"reward.function {spec!r}: a Python function given to rlhfkit's API in another process; "
                "pass the function again (reward=function), or name it as module:function"
            )
        return _in_process_functions[spec]
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UserError(f"reward.function {spec!r}: expected module:function or path/to/file.py:function")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise UserError(f"reward.function {spec!r}: file {path} does not exist")
        module_name = f"rlhfkit_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: report what went wrong in it
            raise UserError(f"reward.function {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UserError(f"reward.function {spec!r}: cannot import {target}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"reward.function {spec!r}: {target} has no function {name!r}")
    return function


def _prompt_text(prompt: Messages) -> str:
    return prompt[-1]["content"]


def combine_ensemble(
    member_scores: torch.Tensor, objective: str, uncertainty_penalty: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """An ensemble's reward per completion and its members' disagreement, from their scores (M, N).

    Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization", with r̄ the mean
    over the M members and Var their (population) variance:

        mean:                  r = r̄ = (1/M) Σ_m r_m
        worst_case (WCO):      r = min_m r_m
        uncertainty_weighted:  r = r̄ − λ · Var_m(r_m),  Var_m(r_m) = (1/M) Σ_m (r_m − r̄)²

    The disagreement is the members' standard deviation, √Var_m(r_m): where members disagree, the
    answer lies outside what their shared training data pinned down.
    """
    mean = member_scores.mean(dim=0)
    variance = member_scores.var(dim=0, correction=0)
    if objective == "mean":
        reward = mean
    elif objective == "worst_case":
        reward = member_scores.min(dim=0).values
    elif objective == "uncertainty_weighted":
        reward = mean - uncertainty_penalty * variance
    else:
        raise ValueError(f"unknown ensemble objective {objective!r}")
    return reward, variance.sqrt()


class RewardSource:
    """The configured reward: call it with prompts (as chat turns), completions and the rows' other columns."""

    def __init__(self, settings: RewardSourceSettings, template: str = "auto", where: str = "reward") -> None:
        """`where` names the settings' place in the config, for errors (`reward`, `eval.judges.gold`)."""
        self.settings = settings
        self.members: list[RewardModelScorer] = []
        if settings.function is not None:
            self.name = settings.function
            self.function = load_reward_function(settings.function)
        else:
            self.name = settings.model if not settings.ensemble else f"an ensemble of {1 + len(settings.ensemble)}"
            self.function = None
            self.members = [
                RewardModelScorer(
                    model,
                    settings.max_length,
                    template,
                    label=settings.label,
                    output=settings.output,
                    max_length_field=f"{where}.max_length",
                )
                for model in (settings.model, *settings.ensemble)
            ]

    def scores_and_disagreement(
        self, prompts: Sequence[Messages], completions: Sequence[str], columns: Sequence[dict]
    ) -> tuple[list[Any], list[float] | None]:
        """One reward per completion and, for an ensemble, its members' disagreement per completion."""
        if len(self.members) > 1:
            member_scores = torch.tensor(
                [member.score(prompts, completions) for member in self.members], dtype=torch.float64
            )
            reward, disagreement = combine_ensemble(
                member_scores, self.settings.ensemble_objective, self.settings.uncertainty_penalty
            )
            return reward.tolist(), disagreement.tolist()
        if self.members:
            return self.members[0].score(prompts, completions), None
        return self._function_scores(prompts, completions, columns), None

    def raw_scores(self, prompts: Sequence[Messages], completions: Sequence[str], columns: Sequence[dict]) -> list[Any]:
        """One reward per completion (an ensemble's combined reward)."""
        return self.scores_and_disagreement(prompts, completions, columns)[0]

    def _function_scores(
        self, prompts: Sequence[Messages], completions: Sequence[str], columns: Sequence[dict]
    ) -> list[Any]:
        names = dict.fromkeys(name for row in columns for name in row)  # every column, in first-seen order
        keyword_lists = {name: [row.get(name) for row in columns] for name in names}
        try:
            scores = self.function([_prompt_text(p) for p in prompts], list(completions), **keyword_lists)
        except Exception as exc:  # the user's code: name it and the batch, never poison the update
            raise RewardError(f"reward function {self.name} raised {type(exc).__name__}: {exc}") from None
        if not isinstance(scores, (list, tuple, torch.Tensor)) or len(scores) != len(completions):
            got = len(scores) if hasattr(scores, "__len__") else type(scores).__name__
            raise RewardError(
                f"reward function {self.name} must return one float per completion ({len(completions)}); got {got}"
            )
        return list(scores.tolist() if isinstance(scores, torch.Tensor) else scores)


@dataclass
class ScoredBatch:
    scores: torch.Tensor  # (N,) float32 rewards after shaping; 0 where invalid
    valid: torch.Tensor  # (N,) bool: False for samples left out of the update (on_invalid: skip)
    raw_mean: float  # mean reward before shaping over valid samples
    skipped: int
    disagreement: torch.Tensor | None = None  # (N,) an ensemble's spread over its members; None for one source

    def per_answer(self) -> list[float | None]:
        """Each completion's score, None where the reward gave none (on_invalid: skip)."""
        return [float(score) if valid else None for score, valid in zip(self.scores, self.valid)]


def score_completions(
    source: RewardSource,
    prompts: Sequence[Messages],
    completions: Sequence[str],
    columns: Sequence[dict],
    ended: torch.Tensor,
) -> ScoredBatch:
    """Rewards of a batch of completions with validity checks and EOS shaping."""
    settings = source.settings
    raw, disagreement = source.scores_and_disagreement(prompts, completions, columns)
    values, valid = [], []
    for index, value in enumerate(raw):
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        # Rewards are float32 tensors from here on: 1e308 is finite in Python and infinite there.
        if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
            if settings.on_invalid == "error":
                beyond = " (beyond float32's range)" if math.isfinite(number) else ""
                raise RewardError(
                    f"reward {source.name} returned {value!r}{beyond} for sample {index} "
                    f"(prompt {_prompt_text(prompts[index])[:80]!r}, completion {completions[index][:80]!r}); "
                    "set reward.on_invalid: skip to leave such samples out"
                )
            values.append(0.0)
            valid.append(False)
            continue
        values.append(number)
        valid.append(True)
    scores = torch.tensor(values, dtype=torch.float32)
    valid_mask = torch.tensor(valid, dtype=torch.bool)
    raw_mean = float(scores[valid_mask].mean()) if valid_mask.any() else math.nan
    if settings.missing_eos_penalty is not None:
        scores = scores - settings.missing_eos_penalty * (~ended.cpu()).float()
    spread = None if disagreement is None else torch.tensor(disagreement, dtype=torch.float32)
    return ScoredBatch(scores * valid_mask, valid_mask, raw_mean, int((~valid_mask).sum()), spread)


def concat_scored(parts: Sequence[ScoredBatch]) -> ScoredBatch:
    """The scores of several batches, in order, as one."""
    scores, valid = torch.cat([part.scores for part in parts]), torch.cat([part.valid for part in parts])
    counts = [int(part.valid.sum()) for part in parts]
    total = sum(counts)
    raw_mean = sum(part.raw_mean * n for part, n in zip(parts, counts) if n) / total if total else math.nan
    spreads = [part.disagreement for part in parts]
    disagreement = None if any(spread is None for spread in spreads) else torch.cat(spreads)
    return ScoredBatch(scores, valid, raw_mean, sum(part.skipped for part in parts), disagreement)


def group_scores(scored: ScoredBatch, group_size: int) -> torch.Tensor:
    """Rewards with left-out (invalid) samples set to their group's valid mean, so they shift nothing."""
    scores = scored.scores.reshape(-1, group_size).clone()
    valid = scored.valid.reshape(-1, group_size)
    means = (scores * valid).sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(valid, scores, means).reshape(-1)
