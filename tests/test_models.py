import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.config import LoraSettings, ModelSettings
from rlhfkit.data.batching import pack_examples
from rlhfkit.data.formatting import TokenizedExample
from rlhfkit.errors import UserError
from rlhfkit.models import attach_lora, load_causal_lm, load_tokenizer, merge_to_directory, resolve, save_model
from rlhfkit.passes import lm_nll_sum

SEQUENCES = [[5, 17, 33, 2, 90], [44, 12, 7, 7, 61, 150, 3, 9], [300, 21, 8]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(tiny_model, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn).eval()
    packed = pack_examples([TokenizedExample(s, [True] * len(s)) for s in SEQUENCES])
    with torch.no_grad():
        packed_logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[0]
        offset = 0
        for sequence in SEQUENCES:
            alone = model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0]
            torch.testing.assert_close(packed_logits[offset : offset + len(sequence)], alone, rtol=1e-4, atol=1e-5)
            offset += len(sequence)
        # Through packed_hidden_states, which adds rlhfkit's boundary keywords: other attentions ignore them.
        from rlhfkit.attention import packed_hidden_states

        hidden = packed_hidden_states(model.model, packed.input_ids, packed.position_ids)
        torch.testing.assert_close(model.lm_head(hidden)[0], packed_logits, rtol=1e-4, atol=1e-5)


def test_packed_loss_equals_sum_of_separate_losses_with_lora(tiny_model):
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model), LoraSettings(dropout=0.0)).eval()
    examples = [TokenizedExample(s, [False] + [True] * (len(s) - 1)) for s in SEQUENCES]
    with torch.no_grad():
        packed = lm_nll_sum(model, pack_examples(examples), chunk_size=4).item()
        separate = sum(lm_nll_sum(model, pack_examples([e]), chunk_size=4).item() for e in examples)
    assert packed == pytest.approx(separate, rel=1e-5)


def test_packed_attention_matches_a_block_diagonal_mask():
    import torch.nn.functional as F

    from rlhfkit.attention import packed_sdpa_attention, sequence_boundaries

    torch.manual_seed(0)
    lengths = [5, 1, 8, 3]
    positions = torch.cat([torch.arange(n) for n in lengths])[None, :]
    kwargs = sequence_boundaries(positions)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 5, 6, 14, 17] and kwargs["max_length_q"] == 8
    query, key, value = torch.randn(1, 4, 17, 8), torch.randn(1, 2, 17, 8), torch.randn(1, 2, 17, 8)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 2, False
    output, _ = packed_sdpa_attention(module, query, key, value, None, **kwargs)
    segment = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    mask = (segment[:, None] == segment[None, :]) & torch.ones(17, 17, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=mask
    )
    torch.testing.assert_close(output, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
    # The boundaries also come as host integers (no per-layer device sync); the device edges alone give the same.
    assert kwargs["shared_prompt_groups"] == [(0, 5, []), (5, 6, []), (6, 14, []), (14, 17, [])]
    device_only = {k: v for k, v in kwargs.items() if k != "shared_prompt_groups"}
    torch.testing.assert_close(packed_sdpa_attention(module, query, key, value, None, **device_only)[0], output)
    assert sequence_boundaries(torch.zeros(2, 4, dtype=torch.long)) == {}  # several rows: the mask does it


def test_shared_prompt_attention_matches_separate_prompt_response_sequences():
    """A row [prompt A, a1, a2, prompt B, b1, c1, c2] attends as the sequences A+a1, A+a2, B+b1,
    c1, c2 would (c1 and c2: a group with nothing in common, an empty prefix)."""
    import torch.nn.functional as F

    from rlhfkit.attention import packed_sdpa_attention

    torch.manual_seed(0)
    layout = [(0, 4, [(4, 7), (7, 9)]), (9, 11, [(11, 16)]), (16, 16, [(16, 18), (18, 21)])]
    query, key, value = torch.randn(1, 4, 21, 8), torch.randn(1, 2, 21, 8), torch.randn(1, 2, 21, 8)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 2, False
    output, _ = packed_sdpa_attention(module, query, key, value, None, shared_prompt_groups=layout)
    key, value = key.repeat_interleave(2, 1), value.repeat_interleave(2, 1)
    for prompt_start, prompt_end, responses in layout:
        prompt = list(range(prompt_start, prompt_end))
        if prompt:
            expected = F.scaled_dot_product_attention(
                query[:, :, prompt], key[:, :, prompt], value[:, :, prompt], is_causal=True
            )
            torch.testing.assert_close(output[:, prompt], expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
        for start, end in responses:  # the separate sequence prompt + this response
            sequence = prompt + list(range(start, end))
            expected = F.scaled_dot_product_attention(
                query[:, :, sequence], key[:, :, sequence], value[:, :, sequence], is_causal=True
            )
            torch.testing.assert_close(
                output[:, start:end], expected.transpose(1, 2)[:, len(prompt) :], rtol=1e-5, atol=1e-6
            )


def test_models_load_with_packed_attention_and_packed_loss_equals_separate_losses(tiny_model, tmp_path):
    from rlhfkit.attention import PACKED_SDPA

    model = load_causal_lm(resolve(str(tiny_model)), ModelSettings(name_or_path=str(tiny_model)), torch.float32).eval()
    assert model.config._attn_implementation == PACKED_SDPA
    examples = [TokenizedExample(s, [False] + [True] * (len(s) - 1)) for s in SEQUENCES]
    with torch.no_grad():
        packed = lm_nll_sum(model, pack_examples(examples), chunk_size=4).item()
        separate = sum(lm_nll_sum(model, pack_examples([e]), chunk_size=4).item() for e in examples)
    assert packed == pytest.approx(separate, rel=1e-5)
    model.save_pretrained(tmp_path / "saved")  # the attention choice is not written into the saved config
    assert PACKED_SDPA not in (tmp_path / "saved" / "config.json").read_text()


def _randomise_lora(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # B starts at zero; make the adapter actually change outputs


def test_lora_save_load_merge_gives_the_same_logits(tiny_model, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = attach_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0)).eval()
    _randomise_lora(model)
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    inputs = torch.tensor([SEQUENCES[1]])
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=inputs).logits
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter matters

    adapter_dir = tmp_path / "adapter"
    save_model(model, tokenizer, adapter_dir, str(tiny_model), {"stage": "test"})
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    source = resolve(str(adapter_dir))
    assert source.adapter_dir == adapter_dir and source.base.path == str(tiny_model)
    reloaded = load_causal_lm(source, ModelSettings(), torch.float32).eval()
    merged_dir = merge_to_directory(str(adapter_dir), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=inputs).logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=inputs).logits, expected, rtol=1e-4, atol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_an_adapter_moved_together_with_its_base_still_finds_it(tiny_model, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    pipeline = tmp_path / "runs" / "pipeline"
    shutil.copytree(tiny_model, pipeline / "sft")
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model), LoraSettings(r=4, alpha=8, dropout=0.0))
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    save_model(model, tokenizer, pipeline / "dpo" / "final", str((pipeline / "sft").resolve()), {"stage": "dpo"})
    assert resolve(str(pipeline / "dpo" / "final")).base.path == str((pipeline / "sft").resolve())

    moved = tmp_path / "elsewhere" / "renamed"
    shutil.move(str(pipeline), moved)  # the recorded absolute base path is gone
    source = resolve(str(moved / "dpo" / "final"))
    assert source.base.path == str((moved / "sft").resolve())
    load_causal_lm(source, ModelSettings(), torch.float32)  # and it loads
    shutil.rmtree(moved / "sft")  # moved apart: the recorded path is named, as before
    with pytest.raises(UserError, match="does not exist"):
        resolve(str(moved / "dpo" / "final"))


def test_resolve_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve("./no/such/model")
    with pytest.raises(UserError, match="not a model directory"):
        resolve(str(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(UserError, match="no finished model"):
        resolve(str(run))


def test_merge_refuses_a_full_model(tiny_model, tmp_path):
    with pytest.raises(UserError, match="no LoRA adapter"):
        merge_to_directory(str(tiny_model), tmp_path / "out")


def test_output_weights_finds_each_lm_head_once_inside_wrappers(tiny_model):
    """ZeRO-3 registers these as used outside their module's forward: the policy's head (tied to
    the embeddings, LoRA-wrapped) beside an RL critic, and nothing for a model without an LM head."""
    from rlhfkit.critic import PolicyAndCritic
    from rlhfkit.models import load_reward_model, output_weights

    source = resolve(str(tiny_model))
    settings = ModelSettings(name_or_path=str(tiny_model))
    policy = attach_lora(load_causal_lm(source, settings, torch.float32), LoraSettings(), "CAUSAL_LM")
    critic = load_reward_model(source, settings, torch.float32)
    head = policy.get_base_model().lm_head.weight
    assert [id(w) for w in output_weights(PolicyAndCritic(policy, critic))] == [id(head)]
    assert output_weights(critic) == []


def test_learned_positions_count_a_position_table_and_nothing_for_rotary_models(tiny_model):
    """BERT's table holds max_position_embeddings positions (LoRA on it or not), RoBERTa's two fewer
    (it numbers them after the padding index), GPT-2's n_positions; rotary decoders have no table."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, RobertaConfig, RobertaModel

    from rlhfkit.rewards import learned_positions

    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    bert = BertModel(BertConfig(vocab_size=50, max_position_embeddings=64, **small))
    assert learned_positions(bert) == 64
    from peft import LoraConfig, get_peft_model

    with_lora_on_positions = get_peft_model(bert, LoraConfig(r=2, target_modules=["position_embeddings"]))
    assert learned_positions(with_lora_on_positions.get_base_model()) == 64
    roberta = RobertaConfig(vocab_size=50, max_position_embeddings=66, pad_token_id=1, **small)
    assert learned_positions(RobertaModel(roberta)) == 64
    assert learned_positions(GPT2Model(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2))) == 32
    settings = ModelSettings(name_or_path=str(tiny_model))
    assert learned_positions(load_causal_lm(resolve(str(tiny_model)), settings, torch.float32).model) is None
