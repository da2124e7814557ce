import pytest
import torch
from transformers import AutoTokenizer

from rlhfkit.data.batching import IGNORE_INDEX, block_batches, corpus_blocks, pack_examples, packed_batches
from rlhfkit.data.examples import ChatExample, TextExample
from rlhfkit.data.formatting import TokenizedExample, chat_segments, render_plain, tokenize_examples
from rlhfkit.errors import DataError


def pair(prompt, completion):
    return ChatExample(({"role": "user", "content": prompt}, {"role": "assistant", "content": completion}), "row 1")


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_plain_model):
    return AutoTokenizer.from_pretrained(tiny_plain_model)


def test_prompt_tokens_are_masked_with_chat_template(chat_tokenizer):
    [example], _ = tokenize_examples(
        chat_tokenizer, [pair("Why is the sky blue?", "Light scatters.")], "auto", 512, "truncate"
    )
    target_text = chat_tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])
    prompt_text = chat_tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if not m])
    assert target_text == "Light scatters.<|im_end|>\n"
    assert "Why is the sky blue?" in prompt_text and "Light scatters" not in prompt_text
    assert prompt_text.endswith("<|im_start|>assistant\n")


def test_plain_template_when_tokenizer_has_none(plain_tokenizer):
    segments = chat_segments(plain_tokenizer, pair("Hi?", "Hello."), "auto")
    assert segments == [("User: Hi?\n\nAssistant: ", False), ("Hello.<|im_end|>\n\n", True)]
    assert render_plain([{"role": "user", "content": "Q"}], "</s>", True) == "User: Q\n\nAssistant: "


def test_only_assistant_turns_of_a_multi_turn_chat_train(chat_tokenizer):
    example = ChatExample(
        (
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "second answer"},
        ),
        "row 1",
    )
    trained = [text for text, is_assistant in chat_segments(chat_tokenizer, example, "auto") if is_assistant]
    assert trained == ["first answer<|im_end|>\n", "second answer<|im_end|>\n"]


def test_text_rows_train_on_all_tokens(chat_tokenizer):
    [example], _ = tokenize_examples(
        chat_tokenizer, [TextExample("The sun is a star.", "row 1")], "auto", 512, "truncate"
    )
    assert all(example.loss_mask)


def test_overlong_examples_truncate_skip_or_fail(chat_tokenizer):
    examples = [pair("Why?", "word " * 200), pair("Short?", "Yes.")]
    kept, counts = tokenize_examples(chat_tokenizer, examples, "auto", 64, "truncate")
    assert len(kept) == 2 and len(kept[0].input_ids) == 64 and counts["truncated to max_length"] == 1
    kept, counts = tokenize_examples(chat_tokenizer, examples, "auto", 64, "skip")
    assert len(kept) == 1 and counts["skipped: longer than max_length"] == 1
    with pytest.raises(DataError, match="row 1: .* longer than data.max_length=64"):
        tokenize_examples(chat_tokenizer, examples, "auto", 64, "error")


def test_prompt_that_fills_max_length_is_skipped(chat_tokenizer):
    kept, counts = tokenize_examples(chat_tokenizer, [pair("long " * 100, "answer")], "auto", 16, "truncate")
    assert kept == [] and counts["skipped: no response tokens within max_length"] == 1


def test_packed_targets_never_cross_examples():
    # Example A = [5, 6, 7] with loss on 6 and 7; example B = [8, 9] with loss on 9.
    a = TokenizedExample([5, 6, 7], [False, True, True])
    b = TokenizedExample([8, 9], [False, True])
    batch = pack_examples([a, b])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # position 2 (token 7) must not predict token 8 of the next example
    assert batch.targets.tolist() == [[6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert batch.num_target_tokens == 3


def test_packed_batches_cover_every_example_once():
    examples = [TokenizedExample([i, i + 1], [False, True]) for i in range(10)]
    batches = packed_batches(examples, batch_size=4, seed=3)
    assert [b.num_target_tokens for b in batches] == [4, 4, 2]
    seen = sorted(t for b in batches for t in b.input_ids[0, ::2].tolist())
    assert seen == list(range(10))


def test_corpus_blocks_and_block_targets():
    blocks = corpus_blocks(list(range(10)), block_size=4)  # tail [8, 9] dropped
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    [batch] = block_batches(blocks, batch_size=2, seed=None)
    assert batch.targets.tolist() == [[1, 2, 3, IGNORE_INDEX], [5, 6, 7, IGNORE_INDEX]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert torch.equal(batch.input_ids, blocks)
