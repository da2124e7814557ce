"""The one training engine shared by every stage.

It owns the plumbing a stage should not repeat: the run directory, accelerate, the optimiser and
schedule, gradient accumulation with the loss normalised over the whole optimizer step, clipping,
seeding, atomic checkpoints with optimizer/scheduler/RNG state, resume, progress and logging.
A stage hands it batches and a loss function and reads top to bottom.

Under `accelerate launch` (data parallel, DDP; sharded, FSDP2 — configs/accelerate/fsdp.yaml; or
DeepSpeed ZeRO — configs/accelerate/zero2.yaml, zero3.yaml, see deepspeed_zero.py) every process
builds the same list of micro-batches; each optimizer step's micro-batches are dealt out across processes and the loss is normalised by the units of the whole step, so global
batch size, accumulation and learning rate mean the same at any process count. Only the main
process writes files; checkpoints hold whole tensors, so a run saved under N processes (sharded
or not) resumes under M.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rlhfkit import __version__, deepspeed_zero
from rlhfkit.config import LoraSettings, ModelSettings, StageConfig, TrainSettings, dump_config
from rlhfkit.deepspeed_zero import accelerate_without_deepspeed, deepspeed_launch
from rlhfkit.errors import UserError
from rlhfkit.evaluate import describe, write_answers_before_after
from rlhfkit.files import clean_stale_temporaries, remove_dir_atomically, write_dir_atomically, write_json_atomically, write_text_atomically
from rlhfkit.models import (
    FINAL_DIR,
    RUN_MARKER,
    ModelSource,
    attach_lora,
    full_tensor,
    load_causal_lm,
    load_reward_model,
    output_weights,
    pick_dtype,
    portable_reference,
    save_model,
)

CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "state.json"
METRICS_LOG = "metrics.jsonl"


class Batch(Protocol):
    @property
    def loss_units(self) -> int:
        """How many units (target tokens, pairs) the batch's summed loss runs over."""

    def to(self, device: torch.device) -> Batch: ...


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: the loss summed over the batch's loss units
    metrics: dict[str, float]  # extra per-batch sums to log, averaged over the step's loss units


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    group_in_epoch: int = 0  # accumulation groups (optimizer steps) done in this epoch


def runs_on_cpu(device: str) -> bool:
    """model.device cpu, or auto on a machine without a GPU.

    accelerate must be told: launched on several processes without a GPU and not told, each
    process would train alone (and all of them would write the same run directory).
    """
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
        raise UserError("rlhfkit shards models with FSDP2: set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml)")
    with accelerate_without_deepspeed():
        state = PartialState(cpu=runs_on_cpu(device))
    if state.distributed_type == DistributedType.MEGATRON_LM:
        raise UserError(
            f"this launch uses {state.distributed_type.value}, which rlhfkit does not support yet; launch data-parallel "
            "(configs/accelerate/ddp.yaml), sharded (configs/accelerate/fsdp.yaml) or with DeepSpeed ZeRO "
            "(configs/accelerate/zero2.yaml, zero3.yaml) instead"
        )
    return state


def shard_model(root: torch.nn.Module, model: torch.nn.Module, device: torch.device, reshard_after_forward: bool,
                compute_dtype: torch.dtype | None = None) -> None:
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
    precision = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=weights_dtype) if compute_dtype else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=precision)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=precision)


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
                        replaced[id(tensor)] = torch.nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else empty
                    store[name] = replaced[id(tensor)]
    model.to(device)
    with torch.no_grad():
        for tensor in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
            torch.distributed.broadcast(tensor.data, src=0)


def leave_process_group() -> None:
    """At the end of a multi-process launch: wait for every process, then close the process group.

    Left to interpreter teardown, the communication threads of one process can be cut off by
    another's exit (seen once in CI: a process aborted after a finished sharded run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class RunDir:
    """A stage's output directory: run.json, config.yaml, checkpoints/, final/, metrics."""

    def __init__(self, root: Path, main: bool = True) -> None:
        self.root = root
        self.main = main  # only the main process of a launch writes

    @classmethod
    def open(cls, output_dir: str, stage: str, config: StageConfig, resume: bool) -> RunDir:
        """Create a run dir, or reopen one to resume; never overwrite a run that is there.

        Every process of a launch checks; the main one writes, and the others wait for it.
        """
        state = process_state(config.model.device)
        run = cls(Path(output_dir).expanduser(), state.is_main_process)
        with state.main_process_first():
            if state.is_main_process:
                run._open(stage, config, resume)
        return run

    def _open(self, stage: str, config: StageConfig, resume: bool) -> None:
        marker = self.root / RUN_MARKER
        holds_work = self.checkpoint_dirs() or (self.root / FINAL_DIR).exists()
        if marker.exists() and not resume:
            if holds_work:
                raise UserError(
                    f"{self.root} already holds a run; pass --resume to continue it, or choose another train.output_dir"
                )
            # A run that stopped before its first checkpoint has nothing to keep: start it afresh.
            print(f"note: {self.root} holds a run that stopped before its first checkpoint; starting it again")
            for stale in (METRICS_LOG, "metrics.json"):
                (self.root / stale).unlink(missing_ok=True)
        if resume and not marker.exists():
            raise UserError(f"--resume: {self.root} holds no run to resume")
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"train.output_dir {self.root} exists and is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"train.output_dir {self.root} is not writable: {exc.strerror}") from None
        if resume:
            recorded = json.loads(marker.read_text())
            if recorded.get("stage") != stage:
                raise UserError(f"--resume: {self.root} is a {recorded.get('stage')} run, not a {stage} run")
        write_text_atomically(self.root / "config.yaml", dump_config(config))
        self.write_marker(stage, "running")
        clean_stale_temporaries(self.root)
        clean_stale_temporaries(self.root / CHECKPOINTS)

    def write_marker(self, stage: str, status: str) -> None:
        if not self.main:
            return
        write_json_atomically(
            self.root / RUN_MARKER,
            {"stage": stage, "status": status, "rlhfkit": __version__, "updated": datetime.now(timezone.utc).isoformat()},
        )

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first (incomplete ones are hidden temporaries)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob("step-*") if (p / CHECKPOINT_STATE).exists()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def read_json(self, name: str) -> dict:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else {}

    def update_json(self, name: str, **values) -> None:
        if not self.main:
            return
        write_json_atomically(self.root / name, {**self.read_json(name), **values})


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D parameters). An empty group (e.g. LoRA's,
    all matrices) is left out: DeepSpeed drops empty groups, and a checkpoint's groups must match."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Linear warmup from 0 to 1 over warmup_steps, then cosine/linear decay to 0, or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [state.tolist() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class ForwardInWrapper(torch.nn.Module):
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

    def forward(self, loss_fn: Callable, batch) -> tuple[torch.Tensor, LossOutput]:
        # The loss tensor is returned on its own too: FSDP hooks its backward through the tensors
        # of the output (a dataclass is opaque to it).
        output = loss_fn(self.model, batch)
        return output.loss_sum, output


class Engine:
    """Training plumbing for one stage run."""

    def __init__(self, train: TrainSettings, device: str, run: RunDir, stage: str, some_parameters_idle: bool = False) -> None:
        """some_parameters_idle: some training passes use only part of the trainable parameters
        (e.g. a critic-only update), which DDP must be told to expect."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

        self.train = train
        self.run = run
        self.stage = stage
        trackers = [t for t in train.trackers if t == "tensorboard" or _installed(t)]
        self.sharded = fsdp_launch()  # FSDP2: each process holds a shard of every weight and optimizer state
        # DeepSpeed ZeRO stage (checked before any model loads), or None
        self.zero_stage = deepspeed_zero.zero_stage(train.grad_accum, train.max_grad_norm) if deepspeed_launch() else None
        if self.zero_stage and train.on_nonfinite == "skip":
            raise UserError("train.on_nonfinite: skip does not run under DeepSpeed (its partitioned gradients cannot be "
                            "dropped mid-step); use error, which stops at the step and keeps the last good checkpoint")
        self._gathered_depth = 0  # nesting of full_weights()
        with accelerate_without_deepspeed():
            self.accelerator = Accelerator(
                cpu=runs_on_cpu(device), log_with=trackers or None,
                project_config=ProjectConfiguration(project_dir=str(run.root), logging_dir=str(run.root / "logs")),
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=some_parameters_idle)],
            )
        if trackers:
            # TensorBoard writes to RUN/logs/PROJECT; W&B and MLflow file the run under the project,
            # named after its directory (e.g. "quickstart/ppo"), with the resolved config attached.
            name = f"{run.root.parent.name}/{run.root.name}"
            init_kwargs = {"wandb": {"name": name, "dir": str(run.root), "config": {"stage": stage}}, "mlflow": {"run_name": name}}
            self.accelerator.init_trackers(train.tracker_project, config=_flat_config(run.root), init_kwargs=init_kwargs)
        set_seed(train.seed)
        self.model: torch.nn.Module | None = None  # the model itself: for evaluation, generation, saving
        self.wrapped: torch.nn.Module | None = None  # ForwardInWrapper(model) as accelerate prepared it: for training passes
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.progress = Progress()
        self.extra_state: dict = {}  # stage state saved with every checkpoint (e.g. an adaptive KL coefficient)
        self.train_mode = True  # False keeps dropout off while training (RL: the first-pass ratio must be 1)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def sum_across_processes(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a tensor over the processes of the launch (itself with one process); no gradient."""
        if self.num_processes == 1:
            return values
        return self.accelerator.reduce(values.detach().to(self.device), "sum").to(values.device)

    def held_out_share(self, batches: Sequence) -> Iterator[tuple[object, bool]]:
        """This process's part of a pass over held-out batches, on its device: batch i goes to
        process i mod N. Every process makes the same number of passes, as FSDP's gathers need:
        one left short repeats batch 0 with counted=False, and must ignore what it computes."""
        share = list(batches[self.accelerator.process_index :: self.num_processes])
        for index in range(math.ceil(len(batches) / self.num_processes)):
            counted = index < len(share)
            yield (share[index] if counted else batches[0]).to(self.device), counted

    @torch.no_grad()  # not inference_mode: FSDP gathers weights into buffers it reuses in training
    def held_out_sums(self, batches: Sequence, sums_of: Callable[[object], dict[str, float]]) -> dict[str, float]:
        """Σ over held-out batches of sums_of(batch) (a metric's per-batch sums), the batches split
        over the launch's processes (held_out_share) and the totals summed over them; the model
        is in eval mode meanwhile (no dropout), and back in its own mode after."""
        totals: dict[str, float] = {}
        was_training = self.model.training
        self.model.eval()
        for batch, counted in self.held_out_share(batches):
            for name, value in sums_of(batch).items():
                totals[name] = totals.get(name, 0.0) + (value if counted else 0.0)
        self.model.train(was_training)
        if self.num_processes == 1 or not totals:
            return totals
        names = sorted(totals)
        summed = self.sum_across_processes(torch.tensor([totals[name] for name in names], dtype=torch.float64)).tolist()
        return dict(zip(names, summed))

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate each process's rows (equal shapes), in process order."""
        if self.num_processes == 1:
            return values
        return self.accelerator.gather(values.to(self.device).contiguous()).to(values.device)

    def on_main(self, write: Callable[[], object]) -> None:
        """Run a file-writing action on the main process only, then let every process go on together."""
        if self.is_main:
            write()
        self.accelerator.wait_for_everyone()

    def dtype(self, requested: str) -> torch.dtype:
        return pick_dtype(requested, self.device)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def prepare(self, model: torch.nn.Module, total_steps: int, scheduler_steps: int | None = None) -> torch.nn.Module:
        """Move the model to the device and build AdamW with warmup and decay.

        total_steps counts progress steps; scheduler_steps (default: the same) counts optimizer
        steps, for stages (RL) that take several optimizer steps per progress step.
        """
        if self.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        wrapper = ForwardInWrapper(model)
        if self.sharded:  # the optimizer must be built on the sharded parameters
            start_from_main_process(wrapper, self.device)
            # `accelerate launch --mixed_precision bf16`: float32 shards, bf16 compute.
            compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
            shard_model(wrapper, model, self.device, os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true",
                        compute_dtype)
        groups = _decay_groups(model, self.train.weight_decay)
        self.decay_groups = [list(group["params"]) for group in groups]  # DeepSpeed's checkpoints number parameters by them
        optimizer = torch.optim.AdamW(groups, lr=self.train.lr, betas=self.train.adam_betas)
        schedule = scheduler_steps or total_steps
        warmup = round(self.train.warmup_ratio * schedule)
        kind = self.train.scheduler
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, schedule, warmup, kind))
        # The scheduler stays outside accelerate: prepared, it would step once per process per
        # optimizer step, while our schedule counts optimizer steps of the global batch.
        if self.sharded:
            self.wrapped, self.optimizer = wrapper, optimizer
            # FSDP makes the first module it runs the root of the sharding; evaluation may run a
            # block on its own first, so one empty pass through the wrapper claims the root.
            with torch.no_grad():
                wrapper(lambda _model, _batch: LossOutput(torch.zeros((), device=self.device), {}), None)
            wrapper.reshard()
        elif self.zero_stage:
            # DeepSpeed partitions the moments (and with ZeRO-3 the weights); `optimizer` stays the
            # AdamW it steps with, whose learning rate the scheduler sets.
            bf16 = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16" or next(model.parameters()).dtype == torch.bfloat16
            config = deepspeed_zero.deepspeed_config(self.zero_stage, self.num_processes, self.train.max_grad_norm, bf16,
                                                     deepspeed_zero.hidden_size_of(model))
            self.wrapped, self.optimizer = deepspeed_zero.initialize(wrapper, optimizer, config), optimizer
            if self.zero_stage == 3:  # the losses use the LM head's weight outside the head's own forward
                for weight in output_weights(model):
                    deepspeed_zero.used_by_whole_forward(wrapper, weight)
        else:
            self.wrapped, self.optimizer = self.accelerator.prepare(wrapper, optimizer)
        self.scheduler = scheduler
        self.model = model
        self.total_steps = total_steps
        return self.model

    @contextmanager
    def full_weights(self) -> Iterator[None]:
        """Passes outside training (evaluation, generation, reference log-probs) under FSDP: the
        root's own weights (embeddings, final norm, head) are gathered for the duration; each
        block gathers its own as it runs. Nothing to do otherwise. Nests: only the outermost
        gathers and reshards (an evaluation samples rollouts, which gather too). Under ZeRO-3
        every weight is gathered for the duration (DeepSpeed's unwrap_model_for_generation)."""
        outermost = (self.sharded or self.zero_stage == 3) and self._gathered_depth == 0
        gathered = deepspeed_zero.whole_model(self.wrapped) if outermost and self.zero_stage == 3 else nullcontext()
        if outermost and self.sharded:
            self.wrapped.unshard()
        self._gathered_depth += 1
        try:
            with gathered:
                yield
        finally:
            self._gathered_depth -= 1
            if outermost and self.sharded:
                self.wrapped.reshard()

    def full_state_dict(self, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The model's whole tensors on the CPU (gathered from every process's shards under FSDP
        or ZeRO-3).

        Every process must call it (gathering is collective); the same on each afterwards.
        """
        model = model if model is not None else self.model
        # A tied weight (e.g. head = embeddings) is one parameter: saved once, under its first name.
        names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        with deepspeed_zero.gathered(list(model.parameters())):  # a copy: the gathered weights are freed after
            return {name: full_tensor(value).detach().cpu().clone().contiguous() for name, value in model.state_dict().items()
                    if name in names}

    def build_model(
        self, source: ModelSource, settings: ModelSettings, lora: LoraSettings, reward_model: bool = False
    ) -> torch.nn.Module:
        """Load the starting model in the chosen dtype, with fresh LoRA adapters unless fully fine-tuning."""
        loader = load_reward_model if reward_model else load_causal_lm
        model = loader(source, settings, self.dtype(settings.dtype))
        if lora.enabled:
            model = attach_lora(model, lora, "SEQ_CLS" if reward_model else "CAUSAL_LM")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"model: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable ({'LoRA' if lora.enabled else 'full'})")
        return model

    def resume(self, requested: bool) -> None:
        """Continue from the latest complete checkpoint when asked to."""
        if requested:
            checkpoint = self.load_checkpoint()
            print(f"resumed from {checkpoint} (step {self.progress.step} of {self.total_steps})")

    def save_final(self, tokenizer, base_reference: str, info: dict, model: torch.nn.Module | None = None, name: str = FINAL_DIR) -> Path:
        """The trained adapter or full model (default: the prepared one), with its tokenizer, in RUN/final."""
        target = self.run.root / name
        model = model if model is not None else self.model
        state = self.full_state_dict(model) if self.sharded or self.zero_stage else None
        if self.zero_stage and model is self.model:  # DeepSpeed's float32 master copies of what was trained
            state.update(deepspeed_zero.whole_weights(self.trainable_parameters()))
        self.on_main(lambda: save_model(model, tokenizer, target, portable_reference(base_reference), info, state_dict=state))
        return target

    def measure(self, metrics: dict, when: str, evaluate: Callable[[], dict] | None) -> None:
        """Held-out metrics of the model now, stored as metrics[when] and printed.

        "before" is measured once per run and written at once, so a resumed run keeps it.
        """
        if evaluate is None or (when == "before" and when in metrics):
            return
        with self.full_weights():
            metrics[when] = evaluate()
        if when == "before":
            self.run.update_json("metrics.json", before=metrics["before"])
        print(f"{when}: {describe(metrics[when])}")

    def complete(self, metrics: dict, data_summary: str, samples: tuple[Sequence, Sequence[str | None]] | None = None) -> None:
        """Record the final metrics (and samples.md from (prompt turns, references)), mark the run complete, close the trackers."""
        if samples is not None and self.is_main:
            write_answers_before_after(self.run.root, samples[0], metrics, samples[1])
        self.run.update_json("metrics.json", **{**metrics, "data": data_summary})
        self.run.write_marker(self.stage, "complete")
        self.accelerator.end_training()

    # ---- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """The full state, as one process would hold it (shards gathered), written by the main process."""
        target = self.run.checkpoints / f"step-{self.progress.step:06d}"
        if self.sharded or self.zero_stage:  # gathering the shards is collective: every process takes part
            state = self._whole_training_state()
            self.on_main(lambda: self._write_checkpoint(target, *state))
        else:
            self.on_main(lambda: self._write_checkpoint(target, *self._whole_training_state()))
        return target

    def _whole_training_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(trainable weights, optimizer state) on the CPU, sharded tensors gathered whole."""
        if self.zero_stage:
            return (deepspeed_zero.whole_weights(self.trainable_parameters()),
                    deepspeed_zero.whole_optimizer_state(self.wrapped, self.decay_groups))
        trainable = {name: full_tensor(p).detach().contiguous().cpu() for name, p in self.trainable_parameters().items()}
        optimizer_state = self.optimizer.state_dict()
        if self.sharded:
            optimizer_state["state"] = {index: {key: full_tensor(value).cpu() for key, value in entry.items()}
                                        for index, entry in optimizer_state["state"].items()}
        return trainable, optimizer_state

    def _write_checkpoint(self, target: Path, trainable: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        def write(tmp: Path) -> None:
            save_file(trainable, str(tmp / "trainable.safetensors"))
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            # state.json is written last: its presence marks a checkpoint as complete.
            (tmp / CHECKPOINT_STATE).write_text(
                json.dumps({"progress": asdict(self.progress), "rng": _rng_state(), "total_steps": self.total_steps,
                            "extra": self.extra_state})
            )

        try:
            write_dir_atomically(target, write)
        except OSError as exc:
            previous = self.run.checkpoint_dirs()
            kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
            raise TrainingError(f"could not write checkpoint {target}: {exc.strerror or exc}{kept}") from None
        for stale in self.run.checkpoint_dirs()[: -self.train.save_limit]:
            remove_dir_atomically(stale)  # a kill mid-way must not leave a half-deleted checkpoint

    def load_checkpoint(self, checkpoint: Path | None = None) -> Path:
        """Restore weights, optimizer, scheduler, RNG and progress from a checkpoint (default: latest)."""
        if checkpoint is None:
            found = self.run.checkpoint_dirs()
            if not found:
                raise UserError(f"--resume: {self.run.checkpoints} holds no complete checkpoint")
            checkpoint = found[-1]
        if not (checkpoint / CHECKPOINT_STATE).exists() or not (checkpoint / "trainable.safetensors").exists():
            raise UserError(f"{checkpoint} is not an rlhfkit checkpoint (no {CHECKPOINT_STATE} / trainable.safetensors)")
        state = json.loads((checkpoint / CHECKPOINT_STATE).read_text())
        if state["total_steps"] != self.total_steps:
            raise UserError(
                f"{checkpoint} was written for {state['total_steps']} total steps, this config gives "
                f"{self.total_steps}; resume with the same data and train settings"
            )
        saved = load_file(str(checkpoint / "trainable.safetensors"))
        parameters = self.trainable_parameters()
        if set(saved) != set(parameters):
            raise UserError(f"{checkpoint} does not match this model's trainable parameters (different model or LoRA?)")
        optimizer_state = read_torch_state(checkpoint / "optimizer.pt")
        if self.zero_stage:  # DeepSpeed keeps its partitions of the saved whole tensors
            deepspeed_zero.set_whole_weights(parameters, saved)
            deepspeed_zero.set_whole_optimizer_state(self.wrapped, self.decay_groups, optimizer_state)
        else:
            with torch.no_grad():
                for name, parameter in parameters.items():
                    parameter.copy_(like_parameter(saved[name], parameter))
            if self.sharded:  # each process keeps its shard of the saved whole moments
                by_index = [p for group in self.optimizer.param_groups for p in group["params"]]
                optimizer_state["state"] = {index: {key: like_parameter(value, by_index[index]) if value.dim() else value
                                                    for key, value in entry.items()}
                                            for index, entry in optimizer_state["state"].items()}
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(read_torch_state(checkpoint / "scheduler.pt"))
        _set_rng_state(state["rng"])
        self.progress = Progress(**state["progress"])
        self.extra_state = state.get("extra", {})
        self.on_main(lambda: self._truncate_metrics_log(self.progress.step))
        return checkpoint

    # ---- logging -----------------------------------------------------------------------

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        with (self.run.root / METRICS_LOG).open("a", encoding="utf-8") as out:
            out.write(json.dumps({"step": step, **metrics}) + "\n")
        self.accelerator.log(metrics, step=step)

    def _truncate_metrics_log(self, step: int) -> None:
        """After a resume, drop records of steps the resumed run will redo."""
        path = self.run.root / METRICS_LOG
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
            write_text_atomically(path, "".join(line + "\n" for line in kept))

    # ---- the loop ----------------------------------------------------------------------

    def fit(
        self,
        batches_for_epoch: Callable[[int], Sequence[Batch]],
        loss_fn: Callable[[torch.nn.Module, Batch], LossOutput],
        evaluate: Callable[[], dict[str, float]] | None = None,
    ) -> Progress:
        """Run optimizer steps until total_steps, checkpointing and logging on the way."""
        train = self.train
        bar = self.progress_bar()
        started, units_seen = time.perf_counter(), 0
        while self.progress.step < self.total_steps:
            batches = batches_for_epoch(self.progress.epoch)
            groups = [batches[i : i + train.grad_accum] for i in range(0, len(batches), train.grad_accum)]
            for group in groups[self.progress.group_in_epoch :]:
                step_started = time.perf_counter()
                step_metrics = self.optimizer_step(group, loss_fn)
                step_metrics["step_s"] = time.perf_counter() - step_started
                self.progress.step += 1
                self.progress.group_in_epoch += 1
                units_seen += int(step_metrics.pop("units"))
                step_metrics["units_per_s"] = units_seen / (time.perf_counter() - started)
                self.log_step(step_metrics)
                bar.set_postfix(
                    loss=f"{step_metrics['loss']:.4f}", lr=f"{step_metrics['lr']:.2e}", per_s=f"{step_metrics['units_per_s']:.1f}"
                )
                bar.update(1)
                if evaluate is not None and train.eval_every and self.progress.step % train.eval_every == 0:
                    with self.full_weights():
                        scores = evaluate()
                    self.log({f"eval/{k}": v for k, v in scores.items()}, self.progress.step)
                self.checkpoint_if_due()
                if self.progress.step >= self.total_steps:
                    break
            else:
                self.progress.epoch += 1
                self.progress.group_in_epoch = 0
        bar.close()
        self.checkpoint_at_end()
        return self.progress

    def progress_bar(self) -> tqdm:
        return tqdm(total=self.total_steps, initial=self.progress.step, desc=self.stage, dynamic_ncols=True, disable=not self.is_main)

    def log_step(self, metrics: dict[str, float]) -> None:
        """Log a finished step's metrics as train/NAME, every train.log_every steps; on a GPU also
        train/gpu_peak_gb, the most memory PyTorch's allocator has held for tensors on it so far."""
        if self.progress.step % self.train.log_every == 0:
            if self.device.type == "cuda":
                metrics = {**metrics, "gpu_peak_gb": torch.cuda.max_memory_allocated(self.device) / 2**30}
            self.log({f"train/{k}": v for k, v in metrics.items()}, self.progress.step)

    def checkpoint_if_due(self) -> None:
        """A checkpoint every train.save_every steps."""
        if self.train.save_every and self.progress.step % self.train.save_every == 0:
            self.save_checkpoint()

    def checkpoint_at_end(self) -> None:
        """The last step's checkpoint, unless checkpoint_if_due has just written it."""
        if not self.train.save_every or self.progress.step % self.train.save_every:
            self.save_checkpoint()

    def optimizer_step(self, group: Sequence[Batch], loss_fn, sharded: bool = False) -> dict[str, float]:
        """Accumulate gradients over the group with the loss averaged over all its units, then step.

        Dividing every micro-batch's summed loss by the step's total units makes 8 micro-batches
        of 1 example equal 1 micro-batch of 8. Under several processes, the group is dealt out
        (process r takes micro-batches r, r+N, ...) unless `sharded` says each process already
        holds its own part; units and metrics are summed over processes, and each process's loss
        is multiplied by N because DDP averages the gradients it all-reduces. A process left with
        no micro-batch still joins the all-reduce, with a zero-weighted pass. Under DeepSpeed
        ZeRO-2/3 gradients are reduced after every backward pass (and ZeRO-3 gathers weights in
        every forward), so there every process makes the same number of passes, padding its share
        with zero-weighted ones.
        """
        world = self.num_processes
        if sharded:
            share = list(group)
            units = int(self.sum_across_processes(torch.tensor([sum(batch.loss_units for batch in share)]))[0])
        else:
            share = list(group[self.accelerator.process_index :: world])
            units = sum(batch.loss_units for batch in group)
        passes = [(batch, world) for batch in share]
        equal_passes = math.ceil(len(group) / world) if self.zero_stage and not sharded else 1
        passes += [(group[0], 0)] * (equal_passes - len(passes))
        if units == 0:
            raise TrainingError(f"step {self.progress.step + 1}: the batch has no target tokens")
        self.wrapped.train(self.train_mode)
        loss_total, extra = 0.0, {}
        for index, (batch, weight) in enumerate(passes):
            syncing, counted = index == len(passes) - 1, weight != 0
            if self.sharded:  # FSDP reduce-scatters gradients after the last micro-batch only
                self.wrapped.set_requires_gradient_sync(syncing)
            if self.zero_stage:  # the optimizer step's last micro-batch; no scaling by DeepSpeed's own count
                self.wrapped.set_gradient_accumulation_boundary(syncing)
                _, output = self.wrapped(loss_fn, batch.to(self.device))
                self.wrapped.backward(output.loss_sum / units * weight, scale_wrt_gas=False)
            else:
                with nullcontext() if syncing or self.sharded else self.accelerator.no_sync(self.wrapped):
                    _, output = self.wrapped(loss_fn, batch.to(self.device))
                    self.accelerator.backward(output.loss_sum / units * weight)
            loss_total += output.loss_sum.item() * counted
            for key, value in output.metrics.items():
                extra[key] = extra.get(key, 0.0) + value * counted
        if world > 1:
            totals = self.sum_across_processes(torch.tensor([loss_total, *extra.values()], dtype=torch.float64)).tolist()
            loss_total, extra = totals[0], dict(zip(extra, totals[1:]))
        loss = loss_total / units
        lr = self.scheduler.get_last_lr()[0]
        if not math.isfinite(loss):
            return self.skip_nonfinite_update(f"loss is {loss}", {"loss": loss, "lr": lr, "grad_norm": math.nan, "units": units})
        if self.zero_stage:
            # DeepSpeed clips to train.max_grad_norm (its config) and steps AdamW; a non-finite
            # norm stops the run below (on_nonfinite: skip is refused under DeepSpeed).
            self.wrapped.step()
            grad_norm = float(self.wrapped.get_global_grad_norm())
        else:
            max_norm = self.train.max_grad_norm if self.train.max_grad_norm is not None else float("inf")
            parameters = list(self.trainable_parameters().values())
            if self.sharded:  # the norm over every shard (a DTensor)
                grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(parameters, max_norm)))
            else:
                grad_norm = float(self.accelerator.clip_grad_norm_(parameters, max_norm))
        if not math.isfinite(grad_norm):
            return self.skip_nonfinite_update(f"gradient norm is {grad_norm}", {"loss": loss, "lr": lr, "grad_norm": grad_norm, "units": units})
        if not self.zero_stage:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "units": units, **{k: v / units for k, v in extra.items()}}

    def skip_nonfinite_update(self, what: str, step_metrics: dict[str, float]) -> dict[str, float]:
        """A NaN/inf loss or gradient: stop (train.on_nonfinite: error), or drop this update and count it.

        A skipped update takes no optimizer step and drops the gradients; the schedule still moves
        on with the step count. The count lives in the checkpointed extra state, so it survives resume.
        """
        if self.train.on_nonfinite == "error":
            checkpoints = self.run.checkpoint_dirs()
            last = checkpoints[-1] if checkpoints else "none"
            raise TrainingError(f"step {self.progress.step + 1}: {what}; stopping (last good checkpoint: {last})")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        skipped = self.extra_state["skipped_nonfinite"] = self.extra_state.get("skipped_nonfinite", 0) + 1
        tqdm.write(f"warning: step {self.progress.step + 1}: {what}; update skipped ({skipped} so far; train.on_nonfinite: skip)")
        return {**step_metrics, "skipped_nonfinite": float(skipped)}


def like_parameter(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out like the parameter: this process's shard of it under FSDP."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(parameter, DTensor):
        return distribute_tensor(value.to(parameter.device, parameter.dtype), parameter.device_mesh, parameter.placements)
    return value


def read_torch_state(path: Path) -> dict:
    """A state dict saved with torch.save, read with weights_only: tensors and plain containers only.

    A file that would need arbitrary objects unpickled (which can run code) is refused.
    """
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: refused: it holds more than tensors and plain values ({str(exc).splitlines()[0]})") from None


def _flat_config(root: Path) -> dict[str, str | int | float | bool]:
    """The run's resolved config as flat `section.field` hyperparameters, for the trackers."""
    import yaml

    flat: dict[str, str | int | float | bool] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (str, int, float, bool)) else str(value)

    walk(yaml.safe_load((root / "config.yaml").read_text()) or {}, "")
    return flat


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl record; inf for a line a crash cut short (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _installed(module: str) -> bool:
    import importlib.util

    available = importlib.util.find_spec(module) is not None
    if not available:
        print(f"warning: tracker {module!r} requested but not installed (pip install {module}); skipping it")
    return available


def steps_for(num_batches: int, train: TrainSettings) -> int:
    """Optimizer steps for the configured epochs (or max_steps)."""
    if train.max_steps is not None:
        return train.max_steps
    return train.epochs * math.ceil(num_batches / train.grad_accum)
