import pytest
import torch

from conftest import write_jsonl
from rlhfkit.data.batching import pack_pairs, reward_batches
from rlhfkit.data.examples import preference_examples, split_shared_prefix
from rlhfkit.data.formatting import TokenizedPair, fit_pair
from rlhfkit.data.loading import read_rows
from rlhfkit.errors import DataError


def examples(tmp_path, rows, on_invalid="error"):
    return preference_examples(read_rows(str(write_jsonl(tmp_path / "prefs.jsonl", rows))), on_invalid)


def test_explicit_and_conversational_rows(tmp_path):
    rows = [
        {"prompt": "Why?", "chosen": "Because.", "rejected": "No.", "margin": 1.5},
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
    ]
    (first, second), _ = examples(tmp_path, rows)
    assert first.prompt == ({"role": "user", "content": "Why?"},) and first.margin == 1.5
    assert second.chosen == "Hello!" and second.rejected == "Go away."


def test_whole_conversations_in_chosen_and_rejected_keep_their_last_turn(tmp_path):
    """UltraFeedback-style rows: chosen/rejected repeat the prompt's turns, then the answer."""
    prompt = "What is 2 + 2?"
    row = {
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "5"}],
    }
    (example,), _ = examples(tmp_path, [row])
    assert example.prompt == ({"role": "user", "content": prompt},) and (example.chosen, example.rejected) == ("4", "5")
    other = {
        **row,
        "rejected": [{"role": "user", "content": "Another question"}, {"role": "assistant", "content": "5"}],
    }
    with pytest.raises(
        DataError, match="prefs.jsonl:1: .*'rejected' holds a conversation that does not start with the row's prompt"
    ):
        examples(tmp_path, [other])
    ends_with_user = {**row, "chosen": [{"role": "user", "content": prompt}]}
    with pytest.raises(DataError, match="prefs.jsonl:1: .*messages ending with an assistant turn"):
        examples(tmp_path, [ends_with_user])


def test_implicit_prompt_from_hh_transcripts():
    chosen = "\n\nHuman: What is a star?\n\nAssistant: A ball of gas.\n\nHuman: Hot?\n\nAssistant: Yes, very hot."
    rejected = "\n\nHuman: What is a star?\n\nAssistant: A ball of gas.\n\nHuman: Hot?\n\nAssistant: Yes. Cold."
    prompt, chosen_answer, rejected_answer = split_shared_prefix(chosen, rejected)
    assert prompt == (
        {"role": "user", "content": "What is a star?"},
        {"role": "assistant", "content": "A ball of gas."},
        {"role": "user", "content": "Hot?"},
    )
    # The answers share "Yes" but the cut is at the last shared "Assistant:", not inside the answer.
    assert (chosen_answer, rejected_answer) == ("Yes, very hot.", "Yes. Cold.")


def test_implicit_prompt_from_plain_text():
    prompt, chosen, rejected = split_shared_prefix("Q: why is it so? It is blue", "Q: why is it so? It is red")
    assert prompt == ({"role": "user", "content": "Q: why is it so? It is"},) and (chosen, rejected) == ("blue", "red")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "prefs.jsonl:1: chosen and rejected are identical"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "prefs.jsonl:1: column 'chosen' is empty"),
        ({"prompt": "q", "chosen": "a", "rejected": 7}, "column 'rejected' must be a string"),
        ({"chosen": "abc", "rejected": "xyz"}, "share no prompt"),
        ({"chosen": "same text", "rejected": "same text"}, "identical"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a number"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        examples(tmp_path, [row])


def test_skip_counts_and_missing_columns(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "a"}, {"prompt": "q", "chosen": "a", "rejected": "b"}]
    kept, report = examples(tmp_path, rows, "skip")
    assert len(kept) == 1 and report.skipped == {"chosen equals rejected": 1}
    with pytest.raises(DataError, match="prefs.jsonl:1: missing column: expected `chosen` and `rejected`"):
        examples(tmp_path, [{"prompt": "q", "answer": "a"}])


def test_fit_pair_keeps_final_turns_and_answer_starts():
    prompt, chosen, rejected = list(range(100, 120)), [1, 2, 3, 4, 5, 6], [7, 8]
    assert fit_pair(prompt, chosen, rejected, 30) == (prompt, chosen, rejected)  # fits: unchanged
    # long prompt and long answer split the 10 tokens evenly: the prompt keeps its last 5, the answer its first 5
    assert fit_pair(prompt, chosen, rejected, 10) == (list(range(115, 120)), [1, 2, 3, 4, 5], [7, 8])
    # a short answer leaves its room to the prompt: 10 - 2 = 8 prompt tokens
    assert fit_pair(prompt, [1, 2], [3], 10) == (list(range(112, 120)), [1, 2], [3])
    # a short prompt leaves its room to the answer: 10 - 3 = 7 answer tokens
    assert fit_pair([100, 101, 102], list(range(50)), [9], 10) == ([100, 101, 102], list(range(7)), [9])


def test_pack_pairs_targets_only_answers():
    # pair 0: prompt [1, 2], chosen [3], rejected [4, 5]; pair 1: prompt [6], chosen [7, 8], rejected [9]
    pairs = [TokenizedPair([1, 2], [3], [4, 5]), TokenizedPair([6], [7, 8], [9])]
    batch = pack_pairs(pairs, [10, 11])
    # row: [1 2 3][6 7 8][1 2 4 5][6 9] -- chosen sequences first, then rejected
    assert batch.input_ids.tolist() == [[1, 2, 3, 6, 7, 8, 1, 2, 4, 5, 6, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1]]
    # each answer token is predicted from the position before it
    assert batch.predictors.tolist() == [1, 3, 4, 7, 8, 10] and batch.target_ids.tolist() == [3, 7, 8, 4, 5, 9]
    assert batch.sequence_index.tolist() == [0, 1, 1, 2, 2, 3] and batch.layout is None
    assert batch.answer_lengths.tolist() == [1, 2, 2, 1] and batch.pair_ids.tolist() == [10, 11]


def test_pack_pairs_with_shared_prompts_stores_each_prompt_once():
    pairs = [TokenizedPair([1, 2], [3], [4, 5]), TokenizedPair([6], [7, 8], [9])]
    batch = pack_pairs(pairs, [10, 11], share_prompts=True)
    # row: [1 2][3][4 5] [6][7 8][9] -- per pair the prompt, then chosen, then rejected, positions continuing the prompt
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 1]]
    assert batch.layout == [(0, 2, [(2, 3), (3, 5)]), (5, 6, [(6, 8), (8, 9)])]
    # the prompt's last position predicts the first token of both answers
    assert batch.predictors.tolist() == [1, 5, 6, 1, 3, 5] and batch.target_ids.tolist() == [3, 7, 8, 4, 5, 9]
    assert batch.sequence_index.tolist() == [0, 1, 1, 2, 2, 3] and batch.answer_lengths.tolist() == [1, 2, 2, 1]


def test_dpo_answer_logps_and_gradients_with_shared_prompts_equal_separate_sequences(tiny_model):
    from rlhfkit.attention import shares_prompts
    from rlhfkit.config import ModelSettings
    from rlhfkit.models import backbone_and_head, load_causal_lm, resolve
    from rlhfkit.passes import answer_logps

    model = load_causal_lm(resolve(str(tiny_model)), ModelSettings(name_or_path=str(tiny_model)), torch.float32).eval()
    assert shares_prompts(backbone_and_head(model)[0])
    # answers that begin alike (shared beyond the prompt), a one-token answer, a one-token prompt
    pairs = [
        TokenizedPair([5, 6, 7], [8, 9, 30], [8, 9, 31, 32]),
        TokenizedPair([11], [12], [16, 17]),
        TokenizedPair([18, 19], [20, 21], [22]),
    ]
    results = []
    for share in (False, True):
        model.zero_grad()
        logps = answer_logps(model, pack_pairs(pairs, [0, 1, 2], share_prompts=share), chunk_size=4)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    (separate, separate_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared, separate, rtol=1e-5, atol=1e-5)
    for a, b in zip(shared_grads, separate_grads):
        # float32 sums in another order: an element that cancels may differ by ~1e-4 of itself, so
        # the tolerance scales with the tensor's largest entry
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_reward_batches_put_chosen_first_and_pad_right():
    pairs = [TokenizedPair([1, 2], [3], [4, 5])]
    [batch] = reward_batches(pairs, batch_size=4, pad_id=0, seed=None)
    assert batch.input_ids.tolist() == [[1, 2, 3, 0], [1, 2, 4, 5]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch.margins is None and batch.loss_units == 1
    wrapped = reward_batches(pairs, 4, 0, None, wrap=lambda ids: [101] + ids + [102])[0]
    assert wrapped.input_ids[0].tolist() == [101, 1, 2, 3, 102, 0]
    assert torch.equal(
        reward_batches([TokenizedPair([1], [2], [3], margin=2.0)], 4, 0, None)[0].margins, torch.tensor([2.0])
    )


def test_packed_reward_batches_score_like_padded_rows(tiny_model):
    from transformers import BertConfig, BertForSequenceClassification

    from rlhfkit.config import ModelSettings
    from rlhfkit.models import load_reward_model, packs_by_position_ids, resolve
    from rlhfkit.passes import packed_reward_forward, reward_model_forward

    model = load_reward_model(
        resolve(str(tiny_model)), ModelSettings(name_or_path=str(tiny_model)), torch.float32
    ).eval()
    model.config.pad_token_id = 0
    assert packs_by_position_ids(model)
    tiny_bert = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    assert not packs_by_position_ids(tiny_bert)  # encoders get padded rows
    pairs = [
        TokenizedPair([5, 6, 7], [8, 9], [10]),
        TokenizedPair([11], [12, 13, 14, 15], [16, 17]),
        TokenizedPair([18, 19], [20], [21, 22, 23]),
    ]
    [packed] = reward_batches(pairs, batch_size=3, pad_id=0, seed=None, packed=True)
    [shared] = reward_batches(pairs, batch_size=3, pad_id=0, seed=None, packed=True, share_prompts=True)
    [padded] = reward_batches(pairs, batch_size=3, pad_id=0, seed=None)
    assert packed.input_ids.shape[0] == 1 and packed.num_pairs == padded.num_pairs == shared.num_pairs == 3
    assert shared.input_ids.shape[1] == packed.input_ids.shape[1] - 6  # the three prompts (3 + 1 + 2 tokens) once each
    with torch.no_grad():
        from_packed = packed_reward_forward(model, packed.input_ids, packed.position_ids, packed.last_positions)
        from_shared = packed_reward_forward(
            model, shared.input_ids, shared.position_ids, shared.last_positions, shared.layout
        )
        from_padded = reward_model_forward(model, padded.input_ids, padded.attention_mask)
    torch.testing.assert_close(from_packed, from_padded, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_shared, from_padded, rtol=1e-4, atol=1e-5)


def test_rl_prompts_come_from_preference_rows_that_share_a_transcript(tmp_path):
    from rlhfkit.data.examples import prompt_examples

    rows = [
        {
            "chosen": "\n\nHuman: What is a star?\n\nAssistant: A ball of hot gas.",
            "rejected": "\n\nHuman: What is a star?\n\nAssistant: No idea.",
            "source": "hh",
        },
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    (example,), report = prompt_examples(read_rows(str(path)), "skip")
    assert example.prompt == ({"role": "user", "content": "What is a star?"},)
    assert example.columns == {"source": "hh"}  # the answers stay out of the reward's columns
    assert report.kept == 1 and sum(report.skipped.values()) == 1
    with pytest.raises(DataError, match="pairs.jsonl:2: chosen and rejected are identical"):
        prompt_examples(read_rows(str(path)))
