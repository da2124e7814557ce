"""Where this process stands in a launch, and sharding: DDP, FSDP2 and the process group.

DeepSpeed ZeRO's side lives in deepspeed_zero.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from rlhfkit.engine.deepspeed_zero import accelerate_without_deepspeed
from rlhfkit.errors import UserError


def runs_on_cpu(device: str) -> bool:
    """model.device cpu, or auto on a machine without a GPU.

    accelerate must be told: launched on several processes without a GPU and not told, each
    process would train alone (and all of them would write the same run directory).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device is cuda, but no CUDA GPU is visible here (set model.device: auto or cpu)")
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def fsdp_launch() -> bool:
    """Launched with an FSDP accelerate config (configs/accelerate/fsdp.yaml): shard the model.

    accelerate's launcher says so in the environment; on CPU processes its Accelerator would
    ignore FSDP, so the engine shards the model itself with PyTorch's FSDP2 (`fully_shard`), on
    CPU and GPU alike.
    """
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state(device: str):
    """This process's place in the launch (accelerate's PartialState; a single process when not launched).

    Data parallelism (DDP), FSDP2 sharding and DeepSpeed ZeRO (configs/accelerate/) are what the
    engine is built and tested for; Megatron launches are refused rather than half-working. Under
    DeepSpeed, accelerate's state is a plain data-parallel one: the engine drives DeepSpeed itself.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if fsdp_launch() and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError(
            "rlhfkit shards models with FSDP2: set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml)"
        )
    with accelerate_without_deepspeed():
        state = PartialState(cpu=runs_on_cpu(device))
    if state.distributed_type == DistributedType.MEGATRON_LM:
        raise UserError(
            f"this launch uses {state.distributed_type.value}, which rlhfkit does not support yet; launch data-parallel "
            "(configs/accelerate/ddp.yaml), sharded (configs/accelerate/fsdp.yaml) or with DeepSpeed ZeRO "
            "(configs/accelerate/zero2.yaml, zero3.yaml) instead"
        )
    return state


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (oneDNN's AVX512-BF16 / AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def require_cpu_bf16(setting: str, instead: str) -> None:
    """Refuse a bf16 `setting` on a CPU without bf16 matrix instructions, naming what to use `instead`."""
    if not cpu_has_bf16_matmul():
        raise UserError(
            f"{setting} needs a CPU with bfloat16 matrix instructions (AVX512-BF16 or AMX), and this one has "
            f"none: bf16 products would run slower than float32; use {instead}"
        )


def without_bf16_products(device: str, sharded: bool) -> str | None:
    """Why bf16 products would not serve this run (None where they would): FSDP and DeepSpeed
    take their precision from the launch, and a CPU or GPU without bf16 hardware runs them slower."""
    if sharded:
        return "FSDP and DeepSpeed take their precision from the launch"
    if runs_on_cpu(device):
        return None if cpu_has_bf16_matmul() else "this CPU has no bf16 matrix instructions"
    return None if torch.cuda.is_bf16_supported() else "this GPU has no bfloat16 support"


def training_autocast(mixed_precision: str, device: str, sharded: bool) -> Callable[[], AbstractContextManager]:
    """The context every training pass runs in, and the passes outside them that must match
    (the RL stages' log-probs, reference and values): bf16 autocast under train.mixed_precision
    bf16 (or auto where bf16 serves), else nothing (a launch's --mixed_precision acts through
    accelerate's own wrapping). Refuses bf16 before any model loads where it cannot serve."""
    if mixed_precision == "auto":
        reason = without_bf16_products(device, sharded)
        mixed_precision = "no" if reason else "bf16"
        print(f"mixed precision: auto -> {mixed_precision}" + (f" ({reason})" if reason else ""))
    if mixed_precision != "bf16":
        return nullcontext
    on_cpu = runs_on_cpu(device)
    if sharded:
        raise UserError(
            "train.mixed_precision bf16 is for one process or data-parallel launches; FSDP and DeepSpeed "
            "take their precision from the launch: accelerate launch --mixed_precision bf16"
        )
    if on_cpu:
        require_cpu_bf16("train.mixed_precision bf16", "train.mixed_precision: no")
    if not on_cpu and not torch.cuda.is_bf16_supported():
        raise UserError("train.mixed_precision bf16 needs a GPU with bfloat16 support, and this one has none")
    device_type = "cpu" if on_cpu else "cuda"
    return lambda: torch.autocast(device_type, dtype=torch.bfloat16)


def make_accelerator(device: str, root: Path, trackers: list[str], find_unused_parameters: bool) -> Any:
    """accelerate's Accelerator for a stage run: its device and process group, trackers logging
    under RUN/logs, and DDP told whether some passes leave trainable parameters idle."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    with accelerate_without_deepspeed():
        return Accelerator(
            cpu=runs_on_cpu(device),
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(root), logging_dir=str(root / "logs")),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        )


def shard_model(
    root: torch.nn.Module,
    model: torch.nn.Module,
    device: torch.device,
    reshard_after_forward: bool,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """FSDP2: each transformer block is a unit (its weights gathered only while it runs), then the root.

    The blocks are the model's `_no_split_modules` classes (what HF marks as not to be split).
    compute_dtype (e.g. bf16 with float32 weights): weights are gathered and used in it, while the
    shards, gradients' reduction and Adam moments stay in the weights' own dtype.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    block_names = set()
    for module in model.modules():
        block_names.update(getattr(module, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise UserError(f"cannot shard {type(model).__name__}: it names no transformer block class (_no_split_modules)")
    weights_dtype = next(model.parameters()).dtype
    precision = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=weights_dtype)
        if compute_dtype
        else MixedPrecisionPolicy()
    )
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=precision)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=precision)


def shard_for_launch(wrapper: torch.nn.Module, model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 for this launch: every process starts from the main one's weights, then each keeps its
    shards; `accelerate launch --mixed_precision bf16` gives float32 shards and bf16 compute."""
    start_from_main_process(wrapper, device)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    )
    reshard_after_forward = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
    shard_model(wrapper, model, device, reshard_after_forward, compute_dtype)


def claim_fsdp_root(wrapper: torch.nn.Module, device: torch.device) -> None:
    """FSDP makes the first module it runs the root of the sharding; evaluation may run a block on
    its own first, so one empty pass through the wrapper claims the root."""
    with torch.no_grad():
        wrapper(lambda _model, _batch: SimpleNamespace(loss_sum=torch.zeros((), device=device)), None)
    wrapper.reshard()


@contextmanager
def whole_weights_gathered(wrapped: torch.nn.Module, sharded: bool, zero_stage: int | None) -> Iterator[None]:
    """Under FSDP the root's own weights (embeddings, final norm, head) gathered for the block, each
    transformer block gathering its own as it runs; under ZeRO-3 every weight; otherwise nothing."""
    from rlhfkit.engine import deepspeed_zero

    if zero_stage == 3:
        with deepspeed_zero.whole_model(wrapped):
            yield
    elif sharded:
        wrapped.unshard()
        try:
            yield
        finally:
            wrapped.reshard()
    else:
        yield


def start_from_main_process(model: torch.nn.Module, device: torch.device) -> None:
    """Move the model to `device` with the main process's weights on every process (as DDP does).

    Under an FSDP launch, transformers leaves the weights a checkpoint lacks (e.g. the new score
    head of a reward model or critic) on the meta device on every process but the first, expecting
    them to be broadcast from it; sharding would otherwise split weights that differ by process.
    """
    replaced: dict[int, torch.Tensor] = {}  # a tied weight is replaced once, and stays tied
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.is_meta:
                    if id(tensor) not in replaced:
                        empty = torch.empty_like(tensor, device=device)
                        replaced[id(tensor)] = (
                            torch.nn.Parameter(empty, tensor.requires_grad)
                            if isinstance(tensor, torch.nn.Parameter)
                            else empty
                        )
                    store[name] = replaced[id(tensor)]
    model.to(device)
    with torch.no_grad():
        for tensor in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
            torch.distributed.broadcast(tensor.data, src=0)


def leave_process_group() -> None:
    """At the end of a multi-process launch: wait for every process, then close the process group.

    Left to interpreter teardown, the communication threads of one process can be cut off by
    another's exit, which aborts that process after a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def like_parameter(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out like the parameter: this process's shard of it under FSDP."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(parameter, DTensor):
        return distribute_tensor(
            value.to(parameter.device, parameter.dtype), parameter.device_mesh, parameter.placements
        )
    return value


class LossInsideWrapper(torch.nn.Module):
    """Holds the model behind accelerate's wrapper (DDP, FSDP, DeepSpeed).

    Stages compute losses from the model's decoder and head directly, which would bypass the
    wrapper's hooks (DDP's gradient all-reduce, FSDP's parameter gathering). Running the loss
    function as this module's forward puts every training pass inside the wrapper.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        # accelerate keeps a 4-bit (QLoRA) model where it was loaded instead of moving it; it
        # looks for these on the module it prepares.
        for name in ("is_loaded_in_4bit", "is_loaded_in_8bit", "hf_device_map"):
            if getattr(model, name, None):
                setattr(self, name, getattr(model, name))

    def forward(self, loss_fn: Callable, batch) -> tuple[torch.Tensor, object]:
        # The loss tensor is returned on its own too: FSDP hooks its backward through the tensors
        # of the output (a dataclass is opaque to it).
        output = loss_fn(self.model, batch)
        return output.loss_sum, output
