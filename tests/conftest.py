"""Shared fixtures: a tiny random Llama with a small BPE tokenizer, built in code (no download)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

SOURCE = Path(__file__).resolve().parents[1] / "src" / "rlhfkit"


def raise_deprecations_from_our_calls() -> None:
    """RLHFKIT_DEPRECATIONS_AS_ERRORS=1 (a CI step, on the newest releases the ranges allow): a
    DeprecationWarning or FutureWarning raised by an API that rlhfkit's own code calls directly
    becomes an error. Libraries warn from inside the deprecated function, so the warning's own
    location is theirs; the caller is looked for a few frames up (a wrapper or decorator between)."""
    import sys
    import warnings

    real_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **options):
        kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(kind, (DeprecationWarning, FutureWarning)):
            frame = sys._getframe(1)  # the deprecated function itself
            for _ in range(3):
                frame = frame.f_back
                if frame is None:
                    break
                if Path(frame.f_code.co_filename).resolve().is_relative_to(SOURCE):
                    where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                    raise kind(f"{message} (called from rlhfkit at {where})")
        return real_warn(message, category, stacklevel + 1, source, **options)

    warnings.warn = warn


if os.environ.get("RLHFKIT_DEPRECATIONS_AS_ERRORS") == "1":
    raise_deprecations_from_our_calls()

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Questions the stage tests use as prompts (one list, shared).
QUESTIONS = [
    "Why is the sky blue?",
    "What is the sun?",
    "How does ice form?",
    "What is a magnet?",
    "Why does the moon move?",
    "What is sound?",
    "How do plants eat?",
    "What is a star?",
]

TRAINING_TEXT = [
    "The sun is a star. Plants use sunlight to make food. Water freezes into ice when it is cold.",
    "Why is the sky blue? Sunlight scatters in the air and blue light scatters the most.",
    "A magnet pulls on iron. The moon goes around the earth. Sound is a wave in the air.",
    "User: Assistant: System: question answer explain why how what is the a an of to in",
]


def build_tiny_model(directory: Path, chat_template: str | None = CHATML_TEMPLATE, seed: int = 0) -> Path:
    """Save a 2-layer Llama (hidden 64) and a byte-level BPE tokenizer to directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_reward_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model as a one-output reward model, its random score head saved (so its scores repeat)."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    directory = tmp_path_factory.mktemp("tiny-reward-model")
    torch.manual_seed(1)
    model = LlamaForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def second_reward_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model as a reward model with another random score head: an ensemble's second member."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    directory = tmp_path_factory.mktemp("second-reward-model")
    torch.manual_seed(2)
    LlamaForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_plain_model(tmp_path_factory) -> Path:
    """The same tiny model, but its tokenizer has no chat template (the plain template applies)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain-model"), chat_template=None)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture()
def sft_rows() -> list[dict]:
    facts = [
        ("Why is the sky blue?", "Sunlight scatters in the air, and blue light scatters the most."),
        ("What is the sun?", "The sun is a star. It is a huge ball of hot gas."),
        ("Why does ice float?", "Ice is lighter than the same amount of water, so it floats."),
        ("What does a magnet do?", "A magnet pulls on things made of iron."),
        ("How do plants eat?", "Plants use sunlight, water and air to make their own food."),
        ("What is sound?", "Sound is a wave that moves through the air to your ears."),
    ]
    asked = (
        "{}",
        "{} Please explain.",
        "Tell me: {}",
        "{} I am curious.",
    )  # each row its own: none held out and trained on
    return [{"prompt": ask.format(p), "completion": c} for ask in asked for p, c in facts]


@pytest.fixture()
def text_rows() -> list[dict]:
    separators = (" ", "\n", "  ", " \n", "\n\n", "\t")  # six copies of each text, no two rows equal
    return [{"text": separator.join([text] * 3)} for separator in separators for text in TRAINING_TEXT]
