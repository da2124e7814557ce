"""Turn validated examples into token ids plus a loss mask.

Chat formatting uses the tokenizer's own chat template when it has one; otherwise the plain
template below. The loss mask marks assistant tokens only, so prompt tokens never add to the
SFT loss.

Plain template (used when the tokenizer has no chat template, or with ``data.template: plain``)::

    System: {content}\\n\\n
    User: {content}\\n\\n
    Assistant: {content}{eos_token}\\n\\n

and the generation prompt is ``Assistant: ``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rlhfkit.config import PromptDataSettings
from rlhfkit.data.examples import ChatExample, FeedbackExample, PromptExample, TextExample
from rlhfkit.errors import DataError

PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[bool]  # loss_mask[t]: token t is a training target (an assistant token)

    @property
    def num_target_tokens(self) -> int:
        return sum(self.loss_mask)


def uses_chat_template(tokenizer: Any, template: Literal["auto", "plain"]) -> bool:
    return template == "auto" and bool(getattr(tokenizer, "chat_template", None))


def render_plain(messages: Sequence[dict[str, str]], eos_token: str, add_generation_prompt: bool) -> str:
    """The documented plain chat template."""
    parts = []
    for message in messages:
        end = eos_token if message["role"] == "assistant" else ""
        parts.append(f"{PLAIN_ROLE_NAMES[message['role']]}: {message['content']}{end}\n\n")
    if add_generation_prompt:
        parts.append("Assistant: ")
    return "".join(parts)


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]], template: Literal["auto", "plain"]) -> str:
    """Text that asks the model for the next assistant turn (used for generation)."""
    return _render(tokenizer, messages, template, add_generation_prompt=True)


def _bos_text(tokenizer: Any) -> str:
    """The BOS token as text, for plain-template models whose tokenizer normally starts with it."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return bos
    return ""


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], template: str, add_generation_prompt: bool) -> str:
    if uses_chat_template(tokenizer, template):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return _bos_text(tokenizer) + render_plain(messages, tokenizer.eos_token or "", add_generation_prompt)


def chat_segments(tokenizer: Any, example: ChatExample, template: Literal["auto", "plain"]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_assistant) segments.

    Rendering the conversation up to each assistant turn, with and without that turn, gives the
    exact text the template puts around it; this works for any template whose renderings of
    successive prefixes extend one another, and fails loudly for one that does not.
    """
    segments: list[tuple[str, bool]] = []
    emitted = ""
    messages = example.messages
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = _render(tokenizer, messages[:index], template, add_generation_prompt=True) if index else ""
        full_text = _render(tokenizer, messages[: index + 1], template, add_generation_prompt=False)
        if not prompt_text.startswith(emitted) or not full_text.startswith(prompt_text):
            raise DataError(
                f"{example.where}: the chat template does not render conversation prefixes consistently, "
                "so assistant tokens cannot be located; use data.template: plain"
            )
        segments.append((prompt_text[len(emitted) :], False))
        segments.append((full_text[len(prompt_text) :], True))
        emitted = full_text
    return [(text, is_assistant) for text, is_assistant in segments if text]


def tokenize_examples(
    tokenizer: Any,
    examples: Sequence[ChatExample | TextExample],
    template: Literal["auto", "plain"],
    max_length: int,
    overlong: Literal["truncate", "skip", "error"],
) -> tuple[list[TokenizedExample], Counter]:
    """Tokenise SFT examples; returns them and a count of truncated/skipped ones by reason."""
    counts: Counter = Counter()
    tokenized = []
    for example in examples:
        if isinstance(example, TextExample):
            ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            mask = [True] * len(ids)
        else:
            ids, mask = [], []
            for text, is_assistant in chat_segments(tokenizer, example, template):
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids.extend(piece)
                mask.extend([is_assistant] * len(piece))
        if len(ids) > max_length:
            if overlong == "error":
                raise DataError(
                    f"{example.where}: {len(ids)} tokens, longer than data.max_length={max_length} "
                    "(set data.overlong: truncate or skip)"
                )
            if overlong == "skip":
                counts["skipped: longer than max_length"] += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            counts["truncated to max_length"] += 1
        # Position 0 is never a target: nothing precedes it.
        if not any(mask[1:]):
            counts["skipped: no response tokens within max_length"] += 1
            continue
        tokenized.append(TokenizedExample(ids, mask))
    return tokenized, counts


def tokenize_corpus(tokenizer: Any, examples: Sequence[TextExample]) -> list[int]:
    """One token stream: every document followed by EOS, so blocks may span documents."""
    stream: list[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for example in examples:
        stream.extend(tokenizer(example.text, add_special_tokens=False)["input_ids"])
        stream.extend(separator)
    return stream


# ---- preference pairs ------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None


def prompt_and_response_ids(
    tokenizer: Any, prompt: Sequence[dict[str, str]], responses: Sequence[str], template: Literal["auto", "plain"]
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the formatted prompt (ending with the generation prompt) and of each answer turn."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_text = _render(tokenizer, prompt, template, add_generation_prompt=True)
    answers = []
    for response in responses:
        full_text = _render(
            tokenizer, [*prompt, {"role": "assistant", "content": response}], template, add_generation_prompt=False
        )
        if not full_text.startswith(prompt_text):
            raise DataError(
                "the chat template does not render the prompt as a prefix of the conversation; use data.template: plain"
            )
        answers.append(encode(full_text[len(prompt_text) :]))
    return encode(prompt_text), answers


def fit_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int
) -> tuple[list[int], list[int], list[int]]:
    """Truncate to max_length: the prompt loses its start (the final turns are kept), an answer its end.

    A long prompt and a long answer split max_length evenly; a short one leaves its unused room to
    the other. Both answers get the same prompt, so their scores stay comparable.
    """
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected
    answer_budget = min(longest, max(max_length - len(prompt), max_length // 2))
    prompt_budget = max_length - answer_budget
    return prompt[len(prompt) - prompt_budget :], chosen[:answer_budget], rejected[:answer_budget]


def keep_overlong(where: str, length: str, max_length: int, overlong: str, counts: Counter) -> bool:
    """data.overlong for an example past max_length: stop naming it (error), leave it out (skip:
    False), or keep it truncated (truncate: True); skips and truncations are counted."""
    if overlong == "error":
        raise DataError(
            f"{where}: {length}, longer than data.max_length={max_length} (set data.overlong: truncate or skip)"
        )
    if overlong == "skip":
        counts["skipped: longer than max_length"] += 1
        return False
    counts["truncated to max_length"] += 1
    return True


def tokenize_pairs(
    tokenizer: Any,
    examples: Sequence[Any],
    template: Literal["auto", "plain"],
    max_length: int,
    overlong: Literal["truncate", "skip", "error"] = "truncate",
) -> tuple[list[TokenizedPair], Counter]:
    """Tokenise preference examples; a pair longer than max_length (prompt + the longer answer)
    stops the run naming it, is skipped, or is truncated as :func:`fit_pair` says (counted)."""
    counts: Counter = Counter()
    pairs = []
    for example in examples:
        prompt, (chosen, rejected) = prompt_and_response_ids(
            tokenizer, example.prompt, [example.chosen, example.rejected], template
        )
        fitted = fit_pair(prompt, chosen, rejected, max_length)
        length = len(prompt) + max(len(chosen), len(rejected))
        if fitted != (prompt, chosen, rejected) and not keep_overlong(
            example.where, f"{length} tokens (prompt and the longer answer)", max_length, overlong, counts
        ):
            continue
        if fitted[1] == fitted[2]:
            counts["skipped: answers identical after truncation"] += 1
            continue
        pairs.append(TokenizedPair(*fitted, margin=example.margin))
    return pairs, counts


@dataclass(frozen=True)
class TokenizedFeedback:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool  # True: desirable (👍)


def tokenize_feedback(
    tokenizer: Any,
    examples: Sequence[FeedbackExample],
    template: Literal["auto", "plain"],
    max_length: int,
    overlong: Literal["truncate", "skip", "error"] = "truncate",
) -> tuple[list[TokenizedFeedback], Counter]:
    """Tokenise labelled answers; one longer than max_length (prompt + answer) stops the run
    naming it, is skipped, or is truncated as :func:`fit_pair` truncates a pair (counted)."""
    counts: Counter = Counter()
    tokenized = []
    for example in examples:
        prompt, (completion,) = prompt_and_response_ids(tokenizer, example.prompt, [example.completion], template)
        fitted_prompt, fitted, _ = fit_pair(prompt, completion, completion, max_length)
        length = f"{len(prompt) + len(completion)} tokens (prompt and answer)"
        if (fitted_prompt, fitted) != (prompt, completion) and not keep_overlong(
            example.where, length, max_length, overlong, counts
        ):
            continue
        tokenized.append(TokenizedFeedback(fitted_prompt, fitted, example.label))
    return tokenized, counts


# ---- RL prompts ------------------------------------------------------------------------


def with_system_prompt(turns: tuple[dict[str, str], ...], system_prompt: str | None) -> tuple[dict[str, str], ...]:
    if system_prompt is None or turns[0]["role"] == "system":
        return turns
    return ({"role": "system", "content": system_prompt}, *turns)


def render_rl_prompt(tokenizer: Any, example: PromptExample, data: PromptDataSettings) -> str:
    """An RL prompt as the policy sees it: data.system_prompt put first where it has none, then
    the chat template (or the plain one), ending with the generation prompt."""
    return render_prompt(tokenizer, with_system_prompt(example.prompt, data.system_prompt), data.template)


def fit_prompts(
    examples: list[PromptExample], tokenizer: Any, data: PromptDataSettings
) -> tuple[list[PromptExample], Counter]:
    """Prompts longer than data.max_length tokens once formatted, as data.overlong says: stop
    naming the first, leave them out, or keep them (sampling keeps their last max_length tokens);
    counted either way, so the data line says how many."""
    kept, counts = [], Counter()
    for example in examples:
        length = len(tokenizer(render_rl_prompt(tokenizer, example, data), add_special_tokens=False)["input_ids"])
        if length > data.max_length:
            if data.overlong == "error":
                raise DataError(
                    f"{example.where}: the formatted prompt is {length} tokens, longer than "
                    f"data.max_length={data.max_length} (set data.overlong: truncate or skip)"
                )
            if data.overlong == "skip":
                counts["prompts skipped: longer than max_length"] += 1
                continue
            counts["prompts cut to their last max_length tokens"] += 1
        kept.append(example)
    return kept, counts
