"""The one training engine shared by every stage.

It owns the plumbing a stage should not repeat: the run directory, accelerate, the optimiser and
schedule, gradient accumulation with the loss normalised over the whole optimizer step, clipping,
seeding, atomic checkpoints with optimizer/scheduler/RNG state, resume, progress and logging.
A stage hands it batches and a loss function and reads top to bottom.

Under `accelerate launch` (data parallel, DDP; sharded, FSDP2 — configs/accelerate/fsdp.yaml; or
DeepSpeed ZeRO — configs/accelerate/zero2.yaml, zero3.yaml, see deepspeed_zero.py) every process
builds the same list of micro-batches; each optimizer step's micro-batches are dealt out across
processes and the loss is normalised by the units of the whole step, so global batch size,
accumulation and learning rate mean the same at any process count. Only the main process writes
files; checkpoints hold whole tensors, so a run saved under N processes (sharded or not) resumes
under M.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhfkit.config import LoraSettings, ModelSettings, TrainSettings
from rlhfkit.engine import checkpointing, deepspeed_zero, threads, tracking
from rlhfkit.engine.deepspeed_zero import deepspeed_launch
from rlhfkit.engine.distributed import (
    LossInsideWrapper,
    claim_fsdp_root,
    fsdp_launch,
    make_accelerator,
    shard_for_launch,
    training_autocast,
    whole_weights_gathered,
)
from rlhfkit.engine.optim import decay_groups, warmup_then_decay
from rlhfkit.engine.protocol import Batch, LossOutput, Progress
from rlhfkit.engine.run_dir import RunDir
from rlhfkit.engine.threads import follow_free_cores
from rlhfkit.errors import TrainingError, UserError
from rlhfkit.models import (
    FINAL_DIR,
    ModelSource,
    enable_activation_checkpointing,
    load_for_training,
    pick_dtype,
    portable_reference,
    save_model,
    whole_tensor,
)


class Engine:
    """Training plumbing for one stage run."""

    def __init__(
        self, train: TrainSettings, device: str, run: RunDir, stage: str, find_unused_parameters: bool = False
    ) -> None:
        """find_unused_parameters: some training passes use only part of the trainable parameters
        (e.g. a critic-only update), which DDP must be told to expect."""
        from accelerate.utils import set_seed

        self.train = train
        self.run = run
        self.stage = stage
        threads.configure(train.threads)
        trackers = tracking.available_trackers(train.trackers)
        self.sharded = fsdp_launch()  # FSDP2: each process holds a shard of every weight and optimizer state
        # DeepSpeed ZeRO stage (checked before any model loads), or None
        self.zero_stage = (
            deepspeed_zero.zero_stage(train.grad_accum, train.max_grad_norm) if deepspeed_launch() else None
        )
        if self.zero_stage and train.on_nonfinite == "skip":
            raise UserError(
                "train.on_nonfinite: skip does not run under DeepSpeed (its partitioned gradients cannot be "
                "dropped mid-step); use error, which stops at the step and keeps the last good checkpoint"
            )
        self.autocast = training_autocast(train.mixed_precision, device, bool(self.sharded or self.zero_stage))
        self._gathered_depth = 0  # nesting of full_weights()
        self.accelerator = make_accelerator(device, run.root, trackers, find_unused_parameters=find_unused_parameters)
        if trackers:
            tracking.start_trackers(self.accelerator, train.tracker_project, run.root, stage)
        set_seed(train.seed)
        self.model: torch.nn.Module | None = None  # the model itself: for evaluation, generation, saving
        # LossInsideWrapper(model) as accelerate prepared it: for training passes
        self.wrapped: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.progress = Progress()
        self.extra_state: dict = {}  # stage state saved with every checkpoint (e.g. an adaptive KL coefficient)
        self.train_with_dropout = True  # False keeps dropout off while training (RL: the first-pass ratio must be 1)

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
            enable_activation_checkpointing(model)
        wrapper = LossInsideWrapper(model)
        if self.sharded:  # the optimizer must be built on the sharded parameters
            shard_for_launch(wrapper, model, self.device)
        groups = decay_groups(model, self.train.weight_decay)
        # DeepSpeed's checkpoints number parameters by these groups
        self.decay_groups = [list(group["params"]) for group in groups]
        optimizer = torch.optim.AdamW(groups, lr=self.train.lr, betas=self.train.adam_betas)
        scheduler = warmup_then_decay(optimizer, self.train, scheduler_steps or total_steps)
        # The scheduler stays outside accelerate: prepared, it would step once per process per
        # optimizer step, while our schedule counts optimizer steps of the global batch.
        if self.sharded:
            self.wrapped, self.optimizer = wrapper, optimizer
            claim_fsdp_root(wrapper, self.device)
        elif self.zero_stage:
            # `optimizer` stays the AdamW DeepSpeed steps with, whose learning rate the scheduler sets.
            engine = deepspeed_zero.prepare(
                wrapper, model, optimizer, self.zero_stage, self.num_processes, self.train.max_grad_norm
            )
            self.wrapped, self.optimizer = engine, optimizer
        else:
            self.wrapped, self.optimizer = self.accelerator.prepare(wrapper, optimizer)
        self.scheduler = scheduler
        self.model = model
        self.total_steps = total_steps
        return self.model

    @contextmanager
    def whole_weights(self) -> Iterator[None]:
        """Passes outside training (evaluation, generation, reference log-probs) under FSDP: the
        root's own weights (embeddings, final norm, head) are gathered for the duration; each
        block gathers its own as it runs. Nothing to do otherwise. Nests: only the outermost
        gathers and reshards (an evaluation samples rollouts, which gather too). Under ZeRO-3
        every weight is gathered for the duration (DeepSpeed's unwrap_model_for_generation)."""
        outermost = self._gathered_depth == 0
        self._gathered_depth += 1
        try:
            with whole_weights_gathered(self.wrapped, self.sharded, self.zero_stage) if outermost else nullcontext():
                yield
        finally:
            self._gathered_depth -= 1

    def whole_state_dict_of(self, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The model's whole tensors on the CPU (gathered from every process's shards under FSDP
        or ZeRO-3).

        Every process must call it (gathering is collective); the same on each afterwards.
        """
        return checkpointing.whole_state_dict(model if model is not None else self.model)

    def build_model(
        self, source: ModelSource, settings: ModelSettings, lora: LoraSettings, reward_model: bool = False
    ) -> torch.nn.Module:
        """Load the starting model in the dtype for this device, with fresh LoRA adapters unless fully fine-tuning."""
        return load_for_training(source, settings, lora, self.dtype(settings.dtype), reward_model)

    def resume(self, requested: bool) -> None:
        """Continue from the latest complete checkpoint when asked to."""
        if requested:
            checkpoint = self.load_checkpoint()
            print(f"resumed from {checkpoint} (step {self.progress.step} of {self.total_steps})")

    def save_final(
        self, tokenizer, base_reference: str, info: dict, model: torch.nn.Module | None = None, name: str = FINAL_DIR
    ) -> Path:
        """The trained adapter or full model (default: the prepared one), with its tokenizer, in RUN/final."""
        target = self.run.root / name
        model = model if model is not None else self.model
        state = self.whole_state_dict_of(model) if self.sharded or self.zero_stage else None
        if self.zero_stage and model is self.model:  # DeepSpeed's float32 master copies of what was trained
            state.update(deepspeed_zero.whole_weights(self.trainable_parameters()))
        self.on_main(
            lambda: save_model(model, tokenizer, target, portable_reference(base_reference), info, state_dict=state)
        )
        return target

    def complete(self, metrics: dict, data_summary: str) -> None:
        """Record the final metrics, mark the run complete, close the trackers."""
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
        return checkpointing.whole_training_state(self.trainable_parameters(), *self._placement())

    def _write_checkpoint(self, target: Path, trainable: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        state = {"progress": asdict(self.progress), "total_steps": self.total_steps, "extra": self.extra_state}
        checkpointing.write_checkpoint(
            self.run, target, trainable, optimizer_state, self.scheduler.state_dict(), state, self.train.save_limit
        )

    def _placement(self) -> tuple:
        """How this process holds the training state: (optimizer, wrapped model, ZeRO stage, FSDP, decay groups)."""
        return self.optimizer, self.wrapped, self.zero_stage, self.sharded, self.decay_groups

    def load_checkpoint(self, checkpoint: Path | None = None) -> Path:
        """Restore weights, optimizer, scheduler, RNG and progress from a checkpoint (default: latest)."""
        saved = checkpointing.read_checkpoint(self.run, checkpoint, self.total_steps)
        parameters = self.trainable_parameters()
        if set(saved.trainable) != set(parameters):
            raise UserError(f"{saved.path} does not match this model's trainable parameters (different model or LoRA?)")
        checkpointing.restore_training_state(parameters, saved.trainable, saved.optimizer, *self._placement())
        self.scheduler.load_state_dict(saved.scheduler)
        checkpointing.set_rng_state(saved.state["rng"])
        self.progress = Progress(**saved.state["progress"])
        self.extra_state = saved.state.get("extra", {})
        self.on_main(lambda: tracking.truncate_metrics_log(self.run.root, self.progress.step))
        return saved.path

    # ---- logging -----------------------------------------------------------------------

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Append to metrics.jsonl and send to the trackers (main process only)."""
        if not self.is_main:
            return
        tracking.append_metrics(self.run.root, step, metrics)
        self.accelerator.log(metrics, step=step)

    # ---- the loop ----------------------------------------------------------------------

    def fit(
        self,
        batches_for_epoch: Callable[[int], Sequence[Batch]],
        loss_fn: Callable[[torch.nn.Module, Batch], LossOutput],
        evaluate: Callable[[], dict[str, float]] | None = None,
    ) -> Progress:
        """Run optimizer steps until total_steps, checkpointing and logging on the way."""
        train = self.train
        started, units_seen = time.perf_counter(), 0
        # the bar is closed (its line ended) however the loop ends, so an error starts a line of its own
        with self.progress_bar() as bar:
            while self.progress.step < self.total_steps:
                batches = batches_for_epoch(self.progress.epoch)
                if not batches:  # an epoch without batches would loop here for ever
                    raise TrainingError(f"epoch {self.progress.epoch + 1} has no training batches; nothing to train on")
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
                        loss=f"{step_metrics['loss']:.4f}",
                        lr=f"{step_metrics['lr']:.2e}",
                        per_s=f"{step_metrics['units_per_s']:.1f}",
                    )
                    bar.update(1)
                    if evaluate is not None and train.eval_every and self.progress.step % train.eval_every == 0:
                        with self.whole_weights():
                            scores = evaluate()
                        self.log({f"eval/{k}": v for k, v in scores.items()}, self.progress.step)
                    self.checkpoint_if_due()
                    if self.progress.step >= self.total_steps:
                        break
                else:
                    self.progress.epoch += 1
                    self.progress.group_in_epoch = 0
        self.checkpoint_at_end()
        return self.progress

    def progress_bar(self) -> tqdm:
        return tqdm(
            total=self.total_steps,
            initial=self.progress.step,
            desc=self.stage,
            dynamic_ncols=True,
            disable=not self.is_main,
        )

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

    def optimizer_step(self, group: Sequence[Batch], loss_fn, already_split: bool = False) -> dict[str, float]:
        """Accumulate gradients over the group with the loss averaged over all its units, then step.

        Dividing every micro-batch's summed loss by the step's total units makes 8 micro-batches
        of 1 example equal 1 micro-batch of 8. Under several processes, the group is dealt out
        (process r takes micro-batches r, r+N, ...) unless `already_split` says each process already
        holds its own part; units and metrics are summed over processes, and each process's loss
        is multiplied by N because DDP averages the gradients it all-reduces. A process left with
        no micro-batch still joins the all-reduce, with a zero-weighted pass. Under DeepSpeed ZeRO-2/3
        gradients are reduced after every backward pass (and ZeRO-3 gathers weights in every
        forward), so every process makes the same number of passes, padding with zero-weighted ones.
        """
        follow_free_cores()
        world = self.num_processes
        if already_split:
            share = list(group)
            units = int(self.sum_across_processes(torch.tensor([sum(batch.loss_units for batch in share)]))[0])
        else:
            share = list(group[self.accelerator.process_index :: world])
            units = sum(batch.loss_units for batch in group)
        passes = [(batch, world) for batch in share]
        equal_passes = math.ceil(len(group) / world) if self.zero_stage and not already_split else 1
        passes += [(group[0], 0)] * (equal_passes - len(passes))
        if units == 0:
            raise TrainingError(f"step {self.progress.step + 1}: the batch has no target tokens")
        self.wrapped.train(self.train_with_dropout)
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
                    with self.autocast():  # train.mixed_precision; backward follows the forward's dtypes
                        _, output = self.wrapped(loss_fn, batch.to(self.device))
                    self.accelerator.backward(output.loss_sum / units * weight)
            loss_total += output.loss_sum.item() * counted
            for key, value in output.metrics.items():
                extra[key] = extra.get(key, 0.0) + value * counted
        if world > 1:
            totals = self.sum_across_processes(
                torch.tensor([loss_total, *extra.values()], dtype=torch.float64)
            ).tolist()
            loss_total, extra = totals[0], dict(zip(extra, totals[1:]))
        loss = loss_total / units
        lr = self.scheduler.get_last_lr()[0]
        if not math.isfinite(loss):
            return self.skip_nonfinite_update(
                f"loss is {loss}", {"loss": loss, "lr": lr, "grad_norm": math.nan, "units": units}
            )
        if self.zero_stage:
            # DeepSpeed clips to train.max_grad_norm (its config) and steps AdamW; a non-finite
            # norm stops the run below (on_nonfinite: skip is refused under DeepSpeed).
            self.wrapped.step()
            grad_norm = float(self.wrapped.get_global_grad_norm())
        else:
            max_norm = self.train.max_grad_norm if self.train.max_grad_norm is not None else float("inf")
            parameters = list(self.trainable_parameters().values())
            if self.sharded:  # the norm over every shard (a DTensor)
                grad_norm = float(whole_tensor(torch.nn.utils.clip_grad_norm_(parameters, max_norm)))
            else:
                grad_norm = float(self.accelerator.clip_grad_norm_(parameters, max_norm))
        if not math.isfinite(grad_norm):
            return self.skip_nonfinite_update(
                f"gradient norm is {grad_norm}", {"loss": loss, "lr": lr, "grad_norm": grad_norm, "units": units}
            )
        if not self.zero_stage:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "units": units,
            **{k: v / units for k, v in extra.items()},
        }

    def skip_updates(self, count: int) -> None:
        """Steps with nothing to learn from (DAPO's dynamic sampling dropped every group): no
        optimizer step; the schedule moves on as if they had run."""
        for _ in range(count):
            self.scheduler.step()

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
        tqdm.write(
            f"warning: step {self.progress.step + 1}: {what}; update skipped ({skipped} so far; train.on_nonfinite: skip)"
        )
        return {**step_metrics, "skipped_nonfinite": float(skipped)}
