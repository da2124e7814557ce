"""A vLLM rollout engine colocated with training (`rollout.engine: vllm`, CUDA GPUs).

vLLM only samples token ids. The behaviour log-probs, the loss, the reference and the reported
KL are still computed by the training model (`rollout.response_logprobs`) at the sampling
temperature, so a difference between vLLM's kernels and the trainer's cannot skew the ratio or
the KL: at worst the samples are very slightly off-policy.

Each process runs its own engine on its own GPU, in-process, taking `rollout.vllm_gpu_memory` of
that GPU (weights + KV cache); with `rollout.vllm_sleep` it releases that memory (KV cache
dropped, weights offloaded to CPU) while the policy trains. Before a rollout whose policy has
changed since the last one, the policy's weights — LoRA deltas added, under the plain checkpoint
names — are loaded into the engine. Each completion carries its own seed (run seed, step, global
index), as on the HF path, so a completion does not depend on its batch or process.

Written against vLLM's offline `LLM` API (sleep mode, per-request seeds, `apply_model` or the
in-process worker for weight loading); the engine has not yet been run on a GPU by this project:
tests/test_gpu.py runs it where vLLM and a GPU are present.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import RolloutSettings, SamplingSettings
from rlhfkit.errors import UserError
from rlhfkit.sampling import Rollout, encode_prompts, pad_responses, rollout_from_responses


def check_vllm_usable(device: str) -> None:
    """Refuse `rollout.engine: vllm` before any model loads when it cannot run here."""
    if device == "cpu":
        raise UserError("rollout.engine vllm needs a CUDA GPU, but model.device is cpu; use rollout.engine: hf")
    if importlib.util.find_spec("vllm") is None:
        raise UserError("rollout.engine vllm needs vLLM: pip install 'rlhfkit[vllm]' (or use rollout.engine: hf)")
    if not torch.cuda.is_available():
        raise UserError("rollout.engine vllm needs a CUDA GPU, and none is visible; use rollout.engine: hf")


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (its LoRA layers still in place), or the model itself."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of the model under its plain checkpoint name, with LoRA deltas added.

    What `merge_and_unload()` followed by `state_dict()` would hold, computed out of place: the
    base weights are never modified (merging in place and back drifts bf16 weights by rounding).
    Adapter parameters themselves are left out; tied weights appear once. Inside peft's
    `disable_adapter()` the base weights are what the model computes with, and what is yielded.
    """
    from peft.tuners.lora import LoraLayer

    inner = unwrapped(model)
    lora_layers = {name: module for name, module in inner.named_modules() if isinstance(module, LoraLayer)}
    for name, parameter in inner.named_parameters():
        if ".lora_" in name or "lora_magnitude_vector" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer") and owner[: -len(".base_layer")] in lora_layers:
            layer_name = owner[: -len(".base_layer")]
            layer = lora_layers[layer_name]
            plain = f"{layer_name}.{leaf}"
            if leaf == "weight" and not layer.merged and not layer.disable_adapters:
                yield plain, _with_lora_deltas(layer, parameter)
            else:
                yield plain, parameter.detach()
        elif ".original_module." in name:
            continue  # a fully trained module (peft modules_to_save) replaces its original
        elif ".modules_to_save." in name:
            prefix, _, rest = name.partition(".modules_to_save.")
            yield f"{prefix}.{rest.partition('.')[2]}", parameter.detach()
        else:
            yield name, parameter.detach()


def _with_lora_deltas(layer: Any, weight: torch.Tensor) -> torch.Tensor:
    if getattr(layer, "use_dora", {}) and any(layer.use_dora.values()):
        raise UserError("rollout.engine vllm cannot merge DoRA adapters; use rollout.engine: hf")
    merged = weight.detach().clone()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            merged += layer.get_delta_weight(adapter).to(merged.dtype)
    return merged


def sampling_arguments(settings: SamplingSettings, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """vLLM SamplingParams keyword arguments, one per completion (its own seed).

    The distribution is softmax(logits / T) restricted by top-k/top-p, as on the HF path: vLLM's
    other knobs (repetition penalties, min-p) stay at their neutral values, and EOS is never ignored.
    """
    common = {
        "n": 1,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k or -1,
        "max_tokens": settings.max_new_tokens,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "ignore_eos": False,
        "skip_special_tokens": True,
        "detokenize": False,
    }
    return [{**common, "seed": int(seed)} for seed in seeds]


def sampler_logprob_rows(outputs: Sequence[Any], rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """(N, R) vLLM's log-prob of each token in `rows` (response_rows of the same outputs), NaN
    where it gave none (an EOS appended after a stop) and on padding; R = the longest row.

    vLLM (SamplingParams(logprobs=0)) returns one dict per generated token, token id -> Logprob,
    holding at least the sampled token's."""
    width = max((len(row) for row in rows), default=0)
    table = torch.full((len(rows), max(width, 1)), float("nan"))
    for index, (output, row) in enumerate(zip(outputs, rows)):
        for position, entries in enumerate(output.outputs[0].logprobs or []):
            if position < len(row) and row[position] in entries:
                table[index, position] = float(entries[row[position]].logprob)
    return table


def response_rows(outputs: Sequence[Any], eos_token_id: int) -> list[list[int]]:
    """Generated token ids per request; a completion that stopped on EOS ends with it (the
    response mask trains the decision to stop), whether or not vLLM returned the stop token."""
    rows = []
    for output in outputs:
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        if completion.finish_reason == "stop" and (not ids or ids[-1] != eos_token_id):
            ids.append(eos_token_id)
        rows.append(ids)
    return rows


class VLLMSampler:
    """One colocated vLLM engine per process; `sample` mirrors `rollout.sample_rollout`."""

    samples_the_policy = True  # the policy's weights and distribution, other kernels: evaluations use it too

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: Any,
        settings: RolloutSettings,
        max_model_len: int,
        processes: int,
        seed: int,
        version: int,
    ) -> None:
        from vllm import LLM

        self.tokenizer, self.settings = tokenizer, settings
        # rollout.correction compares the trainer's probabilities with the sampler's: the same
        # distribution (after temperature and top-k/top-p), so vLLM reports processed log-probs.
        self.keep_logprobs = settings.correction != "none"
        # vLLM starts from a checkpoint on disk: the policy's starting weights (adapters merged),
        # written once per process; later weights are loaded in memory.
        self.start_dir = tempfile.TemporaryDirectory(prefix="rlhfkit-vllm-")
        write_checkpoint(policy, tokenizer, Path(self.start_dir.name))
        dtype = next(policy.parameters()).dtype
        options: dict[str, Any] = {
            "model": self.start_dir.name,
            "dtype": str(dtype).removeprefix("torch."),
            "seed": seed,
            "gpu_memory_utilization": settings.vllm_gpu_memory,
            "max_model_len": max_model_len,
            "enable_sleep_mode": settings.vllm_sleep,
            "enable_prefix_caching": True,
            **({"logprobs_mode": "processed_logprobs"} if self.keep_logprobs else {}),
        }
        if processes > 1:
            # Under accelerate/torchrun each process drives its own engine on its own GPU.
            options["distributed_executor_backend"] = "external_launcher"
        os.environ.setdefault(
            "VLLM_ENABLE_V1_MULTIPROCESSING", "0"
        )  # in-process: weights load without copies between processes
        self.llm = LLM(**options)
        self.synced_version = version  # the checkpoint written above holds the policy's weights now
        self.asleep = False
        if settings.vllm_sleep:
            self.sleep()

    def sleep(self) -> None:
        if self.settings.vllm_sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def load_weights(self, policy: torch.nn.Module) -> None:
        weights = list(merged_weights(policy))
        apply_model = getattr(self.llm, "apply_model", None)
        if apply_model is not None:
            apply_model(lambda model: model.load_weights(weights))
        else:  # older vLLM: the in-process worker's model
            self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights

    @torch.no_grad()
    def sample(
        self,
        policy: torch.nn.Module,
        version: int,
        prompt_texts: Sequence[str],
        settings: SamplingSettings,
        samples_per_prompt: int,
        max_prompt_length: int,
        seeds: Sequence[int],
    ) -> Rollout:
        """Completions of the policy at `version` (an update counter): weights are loaded only when it changed."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        if version != self.synced_version:
            self.load_weights(policy)
            self.synced_version = version
        repeated = [text for text in prompt_texts for _ in range(samples_per_prompt)]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, repeated, max_prompt_length)
        requests = [
            TokensPrompt(prompt_token_ids=row[mask.bool()].tolist()) for row, mask in zip(prompt_ids, prompt_mask)
        ]
        logprobs = {"logprobs": 0} if self.keep_logprobs else {}
        params = [SamplingParams(**arguments, **logprobs) for arguments in sampling_arguments(settings, seeds)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        self.sleep()
        rows = response_rows(outputs, self.tokenizer.eos_token_id)
        response_ids = pad_responses(rows, self.tokenizer.pad_token_id, settings.max_new_tokens)
        rollout = rollout_from_responses(prompt_ids, prompt_mask, response_ids, self.tokenizer, samples_per_prompt)
        if self.keep_logprobs:
            table = sampler_logprob_rows(outputs, rows)
            padded = torch.full(response_ids.shape, float("nan"))
            padded[:, : min(table.shape[1], padded.shape[1])] = table[:, : padded.shape[1]]
            rollout.sampler_logprobs = padded
        return rollout

    def close(self) -> None:
        self.start_dir.cleanup()


def write_checkpoint(model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
    """A plain HF checkpoint (config, tokenizer, safetensors) of the model with its adapters merged."""
    from safetensors.torch import save_file

    inner = unwrapped(model)
    inner.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tensors = {name: tensor.contiguous() for name, tensor in merged_weights(model)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
