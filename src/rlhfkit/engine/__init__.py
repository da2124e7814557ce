"""The training engine every stage shares, in parts.

engine.py         Engine: prepare (device, wrapper, optimiser, schedule) · optimizer_step · fit
protocol.py       what a stage hands it: batches, LossOutput; Progress
held_out.py       held-out passes split over the processes
distributed.py    this process's place in a launch; FSDP2 sharding; the process group
deepspeed_zero.py DeepSpeed ZeRO-2/3, driven by the engine itself
run_dir.py        a stage's output directory (run.json, config.yaml, checkpoints/, final/)
checkpointing.py  checkpoint files: weights, optimizer, scheduler, RNG, progress
optim.py          AdamW groups, the learning-rate schedule, steps per run
tracking.py       metrics.jsonl and the trackers (TensorBoard, W&B, MLflow)
threads.py        CPU threads that follow the cores other processes leave free
"""

from rlhfkit.engine.checkpointing import read_torch_state
from rlhfkit.engine.distributed import fsdp_launch, leave_process_group, process_state
from rlhfkit.engine.engine import Engine
from rlhfkit.engine.optim import lr_multiplier, steps_for
from rlhfkit.engine.protocol import Batch, LossOutput, Progress
from rlhfkit.engine.run_dir import RunDir
from rlhfkit.errors import TrainingError

__all__ = [
    "Batch",
    "Engine",
    "LossOutput",
    "Progress",
    "RunDir",
    "TrainingError",
    "fsdp_launch",
    "leave_process_group",
    "lr_multiplier",
    "process_state",
    "read_torch_state",
    "steps_for",
]
