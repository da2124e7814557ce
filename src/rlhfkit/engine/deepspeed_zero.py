"""DeepSpeed ZeRO under `accelerate launch` (configs/accelerate/zero2.yaml, zero3.yaml).

accelerate's launcher starts the processes and says in the environment which ZeRO stage the
accelerate config asks for; the engine then hands its model and AdamW to `deepspeed.initialize`
itself, as it shards with FSDP2 itself, instead of going through accelerate's DeepSpeed wrapper:
that wrapper steps the optimizer inside `backward` on its own accumulation count, which would
fight the engine's token-weighted accumulation, and accelerate refuses DeepSpeed on CPU processes
(where tests/test_distributed.py runs it, over gloo).

What stays the engine's: the global batch (micro-batches dealt out over processes), the loss
normalised over the whole optimizer step, the learning-rate schedule (a LambdaLR on the AdamW
that DeepSpeed partitions) and the checkpoint format (whole tensors, gathered here), so a ZeRO
run resumes on any number of processes, with or without DeepSpeed, and its outputs load anywhere.
What is DeepSpeed's: partitioning Adam moments and gradients (stage 2) and the weights too
(stage 3), the gradient reduction, clipping, and bf16 mixed precision with float32 master weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from rlhfkit.errors import UserError

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def deepspeed_launch() -> bool:
    """Launched with a DeepSpeed accelerate config (distributed_type: DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


@contextmanager
def accelerate_without_deepspeed() -> Iterator[None]:
    """accelerate's state built as for a plain data-parallel launch (its process group, its
    device): the engine drives DeepSpeed itself, so accelerate must not wrap anything in it."""
    saved = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    if saved is not None:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = saved


def zero_stage(grad_accum: int, max_grad_norm: float | None) -> int:
    """The ZeRO stage the launch asks for, once the accelerate config is checked against what
    rlhfkit supports and against the run's own train settings (before any model loads)."""
    env = os.environ.get
    config_file = env("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file.lower() != "none":
        raise UserError(
            f"accelerate config: deepspeed_config_file ({config_file}) is not read by rlhfkit, which builds "
            "DeepSpeed's config from train.* and the accelerate config's zero_stage; use "
            "configs/accelerate/zero2.yaml or zero3.yaml"
        )
    stage = env("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if stage not in ("1", "2", "3"):
        raise UserError(
            f"accelerate config: zero_stage {stage} is not supported; use 1, 2 or 3 "
            "(or configs/accelerate/ddp.yaml for plain data parallelism)"
        )
    for field in ("offload_optimizer_device", "offload_param_device"):
        device = env(f"ACCELERATE_DEEPSPEED_{field.upper()}", "none").lower()
        if device != "none":
            raise UserError(
                f"accelerate config: {field}: {device} is not supported by rlhfkit yet (set it to none); "
                "for a model that does not fit, use zero_stage 3 on more GPUs, or QLoRA"
            )
    accumulation = env("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if accumulation not in ("1", "auto"):
        raise UserError(
            f"accelerate config: gradient_accumulation_steps {accumulation}: set train.grad_accum in the "
            f"rlhfkit config instead (now {grad_accum}) and leave the accelerate config's at 1"
        )
    clipping = env("ACCELERATE_GRADIENT_CLIPPING", "none").lower()
    if clipping not in ("none", "auto") and (max_grad_norm is None or float(clipping) != max_grad_norm):
        raise UserError(
            f"accelerate config: gradient_clipping {clipping} differs from train.max_grad_norm "
            f"({max_grad_norm}); rlhfkit clips to train.max_grad_norm — remove gradient_clipping from the "
            "accelerate config"
        )
    mixed_precision = env("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision == "fp16":
        raise UserError("DeepSpeed with fp16 mixed precision (loss scaling) is not supported; use bf16 or no")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError(
            "this launch uses DeepSpeed, which is not installed: pip install 'rlhfkit[deepspeed]'"
        ) from None
    if env("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true":
        print("note: zero3_init_flag is ignored: each process loads the whole model, then DeepSpeed partitions it")
    return int(stage)


def deepspeed_config(
    stage: int, world_size: int, max_grad_norm: float | None, bf16: bool, hidden_size: int | None
) -> dict:
    """DeepSpeed's config for the engine's way of stepping.

    One micro-batch per DeepSpeed step and no accumulation of its own: the engine marks the last
    micro-batch of each optimizer step itself (set_gradient_accumulation_boundary) and scales
    each micro-batch's loss by the step's total units, so DeepSpeed's batch figures are nominal.
    Communication buckets are sized from the model's hidden size H, as transformers' DeepSpeed
    integration sizes its "auto" values (reduce bucket H², ZeRO-3 prefetch 0.9 H², weights under
    10 H elements kept whole): DeepSpeed's fixed defaults (5e8 elements, 2 GB in float32)
    outweigh a small model (measured, SmolLM2-135M on 2 CPU processes: ZeRO-3 peak RSS 6.4 GB
    with them, 5.7 GB without).
    """
    buckets = (
        {}
        if hidden_size is None
        else {
            "reduce_bucket_size": hidden_size * hidden_size,
            **(
                {
                    "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                    "stage3_param_persistence_threshold": 10 * hidden_size,
                }
                if stage == 3
                else {}
            ),
        }
    )
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "zero_optimization": {"stage": stage, **buckets},
        "gradient_clipping": max_grad_norm if max_grad_norm is not None else 0.0,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, partitioned by ZeRO
        "steps_per_print": 2**31 - 1,  # progress and metrics are the engine's
        "wall_clock_breakdown": False,
    }


def hidden_size_of(model: torch.nn.Module) -> int | None:
    """The hidden size of the first transformers model inside `model` (None if there is none)."""
    return next(
        (m.config.hidden_size for m in model.modules() if hasattr(getattr(m, "config", None), "hidden_size")), None
    )


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict) -> torch.nn.Module:
    """The DeepSpeed engine around `model` (the engine's LossInsideWrapper); `optimizer` stays
    the one whose param_groups DeepSpeed steps with, so a scheduler on it sets the learning rate."""
    import deepspeed

    skip_shared_memory_all_reduce()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def skip_shared_memory_all_reduce() -> None:
    """DeepSpeed's CPU backend compiles a C++ extension (its shared-memory all-reduce, which only
    its inference path calls) whenever it opens communication. rlhfkit never calls it, and the
    build costs a compiler run under a lock file that every later launch waits on forever if a
    build is ever killed; marking the op unavailable makes DeepSpeed use the process group as is."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def used_by_whole_forward(wrapper: torch.nn.Module, weight: torch.nn.Parameter) -> None:
    """ZeRO-3: a weight used outside its own module's forward (the LM head's, which the losses
    multiply hidden states by in chunks) is gathered for the whole training forward instead of
    only while its module runs; DeepSpeed's own way to say so (register_external_parameter)."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    register_external_parameter(wrapper, weight)
    weight.is_external_param = True  # as DeepSpeed marks one it finds itself: its module must not free it


def whole_model(engine):
    """ZeRO-3: every weight gathered and the partitioning hooks off for passes outside training
    (evaluation, generation, reference log-probs); a collective on entry and exit."""
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    return unwrap_model_for_generation(engine)


def gathered(parameters: list[torch.nn.Parameter], written: bool = False):
    """A context in which ZeRO-3 partitioned parameters are whole (a collective); nothing otherwise.
    written: what the first process writes into them is partitioned anew on leaving (otherwise
    writes are dropped)."""
    if not any(hasattr(p, "ds_id") for p in parameters):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=0 if written else None)


def whole_weights(parameters: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The float32 master weights, whole, on the CPU (a collective: every process calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().cpu().contiguous() for name, p in parameters.items()}


def set_whole_weights(parameters: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    """Load whole weights into both DeepSpeed's float32 master partitions and the model's own
    (possibly partitioned) weights, which DeepSpeed otherwise refreshes only after a step."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, parameter in parameters.items():
        value = values[name].to(parameter.device)
        safe_set_full_fp32_param(parameter, value.float())
        with gathered([parameter], written=True), torch.no_grad():
            parameter.data.copy_(value.to(parameter.dtype))  # gathered: every process holds and writes the whole


def _adam_state(engine) -> torch.optim.Optimizer:
    """The AdamW DeepSpeed steps (its parameters: this process's flat partitions), with its
    state created if it has not stepped yet (AdamW creates it lazily), and ZeRO-1/2's per-weight
    views of it linked (DeepSpeed links them itself only after a step)."""
    zero, adam = engine.optimizer, engine.optimizer.optimizer
    # ZeRO-3 swaps its flat partitions into AdamW's groups only while stepping; ZeRO-1/2 leave them there
    flats = list(getattr(zero, "fp32_partitioned_groups_flat", [])) or [
        flat for group in adam.param_groups for flat in group["params"]
    ]
    for flat in flats:
        if not adam.state[flat]:
            adam.state[flat] = {"step": torch.tensor(0.0), **{key: torch.zeros_like(flat) for key in ADAM_MOMENTS}}
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        # Linked anew every time: DeepSpeed 0.19 links after stepping the first of several
        # parameter groups (bf16), leaving the later groups' views empty for good.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    return adam


def whole_optimizer_state(engine, groups: list[list[torch.nn.Parameter]]) -> dict:
    """AdamW's state_dict as one process without DeepSpeed would write it (whole moments, the
    parameters numbered in the order of `groups`, the engine's decay groups); a collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    adam = _adam_state(engine)
    step = next(iter(adam.state.values()))["step"]
    state, param_groups, index = {}, [], 0
    for hyper, parameters in zip(adam.param_groups, groups):
        numbers = list(range(index, index + len(parameters)))
        for number, parameter in zip(numbers, parameters):
            moments = {key: safe_get_full_optimizer_state(parameter, key).detach().cpu() for key in ADAM_MOMENTS}
            if float(step) > 0:  # an optimizer that never stepped has no state, as torch's
                state[number] = {"step": step.detach().clone().cpu(), **moments}
        param_groups.append({**{k: v for k, v in hyper.items() if k != "params"}, "params": numbers})
        index += len(parameters)
    return {"state": state, "param_groups": param_groups}


def set_whole_optimizer_state(engine, groups: list[list[torch.nn.Parameter]], saved: dict) -> None:
    """Load an AdamW state_dict with whole moments (whole_optimizer_state's, or one process's)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    adam = _adam_state(engine)
    if len(saved["param_groups"]) != len(groups):
        raise UserError(
            f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, this run {len(groups)}"
        )
    for hyper, saved_group in zip(adam.param_groups, saved["param_groups"]):
        hyper.update({k: v for k, v in saved_group.items() if k != "params"})
    parameters = [p for group in groups for p in group]
    for number, parameter in enumerate(parameters):
        entry = saved["state"].get(number)
        for key in ADAM_MOMENTS:
            whole = (
                entry[key]
                if entry is not None
                else torch.zeros(parameter.ds_shape if hasattr(parameter, "ds_id") else parameter.shape)
            )
            safe_set_full_optimizer_state(parameter, whole.to(parameter.device, torch.float32), key)
    step = max((float(entry["step"]) for entry in saved["state"].values()), default=0.0)
    for flat_state in adam.state.values():
        flat_state["step"] = torch.tensor(step)


def prepare(
    wrapper: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stage: int,
    num_processes: int,
    max_grad_norm: float | None,
) -> torch.nn.Module:
    """The DeepSpeed engine around the wrapped model: it partitions the Adam moments (and with ZeRO-3
    the weights) and steps `optimizer`; bf16 when the launch or the weights ask for it."""
    from rlhfkit.models import output_weights

    bf16 = (
        os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16" or next(model.parameters()).dtype == torch.bfloat16
    )
    config = deepspeed_config(stage, num_processes, max_grad_norm, bf16, hidden_size_of(model))
    engine = initialize(wrapper, optimizer, config)
    if stage == 3:  # the losses use the LM head's weight outside the head's own forward
        for weight in output_weights(model):
            used_by_whole_forward(wrapper, weight)
    return engine
