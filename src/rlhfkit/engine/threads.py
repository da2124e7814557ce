"""CPU threads that follow the cores other processes leave free.

PyTorch starts one OpenMP thread per core, and OpenMP threads spin while they wait for each
other. When another process holds a core, the thread sharing it is descheduled and its peers
spin on: on 2 cores beside one busy process, sampling runs ~20× and training ~4.5× slower than
alone, where a fair share is 2×. With one thread fewer the same work is ~1.6–1.9× slower.

So under `threads: auto` the count is re-chosen between training steps, decode steps and
held-out or scoring batches: the cores this process may use, less the cores other processes kept
busy since the last check (a core counts as taken from 0.6 of it; a process that sleeps between
bursts, like a browser, leaves both). `threads: N` fixes the count; the environment variable
RLHFKIT_THREADS overrides the config.

The count never changes what a forward pass computes (sampling, evaluation, scoring are bitwise
the same with 1 or 2 threads; tested). A training step's weight gradients come from matrix
products whose summation order the BLAS splits by thread count, so they agree to float
rounding (~1e-7 relative), not bitwise: a fixed `threads: N` is bitwise reproducible.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.errors import UserError

ENVIRONMENT_VARIABLE = "RLHFKIT_THREADS"
TAKEN_FROM = 0.6  # a core busy this much of the time with other work counts as taken
CHECK_EVERY_S = 0.5  # shorter windows measure a process that works in bursts as idle or as busy


def parse_setting(value: str | int, where: str) -> str | int:
    """'auto' or a thread count >= 1, from a config field or the environment variable."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    else:
        raise UserError(f"{where}: expected 'auto' or a thread count (1, 2, ...), got {value!r}")
    if number < 1:
        raise UserError(f"{where}: a thread count must be at least 1, got {number}")
    return number


def setting_in_force(configured: str | int) -> tuple[str | int, str]:
    """The setting that applies and where it came from: RLHFKIT_THREADS over the config."""
    from_environment = os.environ.get(ENVIRONMENT_VARIABLE)
    if from_environment:
        return parse_setting(from_environment, f"environment variable {ENVIRONMENT_VARIABLE}"), ENVIRONMENT_VARIABLE
    return parse_setting(configured, "train.threads"), "train.threads"


@dataclass(frozen=True)
class CpuTicks:
    """Cumulative busy clock ticks: of the cores this process may run on, and of this process."""

    cores_busy: int
    own: int
    at: float


class CoreLoad:
    """Reads how much of this process's cores other processes used (Linux /proc)."""

    def __init__(self, cores: frozenset[int]) -> None:
        self.cores = cores
        self.ticks_per_s = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def available() -> bool:
        return Path("/proc/stat").exists() and Path("/proc/self/stat").exists()

    def read(self) -> CpuTicks:
        busy = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cores:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                busy += user + nice + system + irq + softirq + steal
        own_stat = Path("/proc/self/stat").read_text()
        after_name = own_stat[own_stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
        own = int(after_name[11]) + int(after_name[12])  # utime + stime of all this process's threads
        return CpuTicks(busy, own, time.monotonic())

    def others_busy(self, since: CpuTicks, now: CpuTicks) -> float:
        """Cores other processes kept busy between two readings, averaged over the interval."""
        elapsed = now.at - since.at
        if elapsed <= 0:
            return 0.0
        others = (now.cores_busy - since.cores_busy) - (now.own - since.own)
        return max(0.0, others / self.ticks_per_s / elapsed)


def threads_for(others_busy: float, cores: int, most: int) -> int:
    """Threads to use when other processes keep `others_busy` of `cores` busy, at most `most`."""
    taken = int(others_busy + (1 - TAKEN_FROM))
    return max(1, min(most, cores - taken))


class ThreadPolicy:
    """The process's intra-op thread count: fixed, or following the free cores."""

    def __init__(
        self,
        setting: str | int,
        source: str,
        most: int,
        cores: int,
        load: CoreLoad | None,
        announce: Callable[[str], None],
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        self.setting, self.source, self.most, self.cores = setting, source, most, cores
        self.load = load if setting == "auto" else None
        self.announce, self.set_threads = announce, set_threads
        self.threads = setting if isinstance(setting, int) else most
        self.set_threads(self.threads)
        self.last = self.load.read() if self.load else None

    def describe(self) -> str:
        if isinstance(self.setting, int):
            return f"threads: {self.setting} (fixed by {self.source})"
        if self.load is None:
            return f"threads: {self.most} (auto; this system does not report other processes' load, so it stays)"
        return (
            f"threads: auto, up to {self.most} on {self.cores} cores; fewer while other processes keep cores "
            f"busy (checked between steps; fix it with train.threads or {ENVIRONMENT_VARIABLE})"
        )

    def follow_free_cores(self) -> int:
        """Re-choose the count if CHECK_EVERY_S has passed since the last check; the count in force."""
        if self.load is None or self.last is None or time.monotonic() - self.last.at < CHECK_EVERY_S:
            return self.threads
        now = self.load.read()
        others = self.load.others_busy(self.last, now)
        self.last = now
        chosen = threads_for(others, self.cores, self.most)
        if chosen != self.threads:
            self.announce(f"threads: {self.threads} → {chosen} (other processes keep {others:.1f} cores busy)")
            self.threads = chosen
            self.set_threads(chosen)
        return self.threads


_policy: ThreadPolicy | None = None
_most: int | None = None  # torch's count before rlhfkit first set it: one per core, or OMP_NUM_THREADS


def _print_on_first_process(message: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":
        from tqdm import tqdm

        tqdm.write(message)


def configure(configured: str | int = "auto") -> ThreadPolicy:
    """Apply a thread setting to this process (RLHFKIT_THREADS wins); says what applies once,
    and again only when the setting changes."""
    global _policy, _most
    setting, source = setting_in_force(configured)
    if _policy is not None and (_policy.setting, _policy.source) == (setting, source):
        return _policy
    if _most is None:
        _most = torch.get_num_threads()
    cores = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset(range(_most))
    load = CoreLoad(cores) if setting == "auto" and CoreLoad.available() else None
    _policy = ThreadPolicy(setting, source, _most, len(cores), load, _print_on_first_process)
    _print_on_first_process(_policy.describe())
    return _policy


def follow_free_cores() -> None:
    """Between steps: let the thread count follow the free cores (configured with the default,
    auto, on first use by a caller that configured nothing)."""
    (_policy or configure()).follow_free_cores()
