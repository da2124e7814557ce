import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.config import LoraSettings, ModelSettings
from rlhfkit.data.batching import pack_examples
from rlhfkit.data.formatting import TokenizedExample
from rlhfkit.errors import UserError
from rlhfkit.forward import lm_nll_sum
from rlhfkit.models import attach_lora, load_causal_lm, load_tokenizer, merge_to_directory, resolve, save_model

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


def test_packed_loss_equals_sum_of_separate_losses_with_lora(tiny_model):
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model), LoraSettings(dropout=0.0)).eval()
    examples = [TokenizedExample(s, [False] + [True] * (len(s) - 1)) for s in SEQUENCES]
    with torch.no_grad():
        packed = lm_nll_sum(model, pack_examples(examples), chunk_size=4).item()
        separate = sum(lm_nll_sum(model, pack_examples([e]), chunk_size=4).item() for e in examples)
    assert packed == pytest.approx(separate, rel=1e-5)


def test_rows_with_padding_segments_give_the_same_loss_as_separate_examples(tiny_model, monkeypatch):
    import rlhfkit.data.batching as batching

    monkeypatch.setattr(batching, "ROW_TOKENS", 9)  # rows [5 + 3 tokens], [8 tokens], [4 tokens + 4 padding]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    examples = [TokenizedExample(s, [False] + [True] * (len(s) - 1)) for s in [*SEQUENCES, [7, 7, 1, 2]]]
    packed_batch = pack_examples(examples)
    assert packed_batch.input_ids.shape == (3, 8) and packed_batch.position_ids[2].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    with torch.no_grad():
        packed = lm_nll_sum(model, packed_batch, chunk_size=4).item()
        separate = sum(lm_nll_sum(model, pack_examples([e]), chunk_size=4).item() for e in examples)
    assert packed == pytest.approx(separate, rel=1e-5)


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
