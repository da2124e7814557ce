"""CPU threads that follow the free cores: the choice, the load reading, and results that do not change."""

import math
import os
import subprocess
import sys
import time

import pytest
import torch

import rlhfkit
from rlhfkit.engine import threads
from rlhfkit.engine.threads import CoreLoad, CpuTicks, ThreadPolicy, threads_for
from rlhfkit.errors import UserError


@pytest.fixture(autouse=True)
def fresh_policy(monkeypatch):
    """Each test starts with no thread policy and leaves torch's count as it found it."""
    count = torch.get_num_threads()
    monkeypatch.setattr(threads, "_policy", None)
    monkeypatch.delenv(threads.ENVIRONMENT_VARIABLE, raising=False)
    yield
    torch.set_num_threads(count)


class ScriptedLoad(CoreLoad):
    """Other processes' load, one value (in cores) per reading, each reading a second after the last."""

    def __init__(self, others: list[float]) -> None:
        super().__init__(frozenset({0, 1}))
        self.ticks_per_s = 100
        self.others = list(others)
        self.reading = CpuTicks(0, 0, time.monotonic() - 1000)  # old enough that every check is due

    def read(self) -> CpuTicks:
        busy = round(100 * self.others.pop(0)) if self.others else 0
        own = 150  # this process: 1.5 cores over the second
        self.reading = CpuTicks(self.reading.cores_busy + busy + own, self.reading.own + own, self.reading.at + 1)
        return self.reading


def scripted_policy(others: list[float], setting="auto", most=2) -> tuple[ThreadPolicy, list[int], list[str]]:
    counts, messages = [], []
    policy = ThreadPolicy(
        setting, "train.threads", most, 2, ScriptedLoad([0.0, *others]), messages.append, counts.append
    )
    return policy, counts, messages


@pytest.mark.parametrize(
    ("others", "cores", "most", "expected"),
    [
        (0.0, 2, 2, 2),
        (0.3, 2, 2, 2),  # a process that sleeps between bursts (a browser) leaves both cores
        (0.59, 2, 2, 2),
        (0.6, 2, 2, 1),
        (0.67, 2, 2, 1),  # one busy process sharing the cores with two spinning threads gets 2/3 of one
        (1.0, 2, 2, 1),
        (3.0, 2, 2, 1),  # never fewer than one
        (1.0, 8, 8, 7),
        (2.7, 8, 8, 5),
        (0.0, 8, 4, 4),  # never more than torch started with (OMP_NUM_THREADS)
    ],
)
def test_threads_leave_the_cores_other_processes_keep_busy(others, cores, most, expected):
    assert threads_for(others, cores, most) == expected


def test_auto_follows_the_load_and_says_when_the_count_changes():
    policy, counts, messages = scripted_policy([0.0, 1.0, 1.0, 0.5, 0.0])
    assert counts == [2]  # set at start: all the cores torch would use
    chosen = [policy.follow_free_cores() for _ in range(5)]
    assert chosen == [2, 1, 1, 2, 2]
    assert counts == [2, 1, 2]  # set only when it changes
    assert messages == [
        "threads: 2 → 1 (other processes keep 1.0 cores busy)",
        "threads: 1 → 2 (other processes keep 0.5 cores busy)",
    ]
    assert "auto, up to 2 on 2 cores" in policy.describe()


def test_a_check_waits_until_the_window_is_long_enough():
    policy, counts, _ = scripted_policy([1.0])
    policy.last = CpuTicks(0, 0, time.monotonic())  # just read
    assert policy.follow_free_cores() == 2 and counts == [2]


def test_a_fixed_count_never_changes_nor_reads_the_load():
    policy, counts, messages = scripted_policy([1.0, 1.0], setting=1)
    assert [policy.follow_free_cores() for _ in range(3)] == [1, 1, 1]
    assert counts == [1] and messages == [] and policy.load is None
    assert policy.describe() == "threads: 1 (fixed by train.threads)"


def test_the_environment_variable_wins_and_bad_values_are_named(monkeypatch):
    monkeypatch.setenv(threads.ENVIRONMENT_VARIABLE, "1")
    assert threads.configure("auto").setting == 1 and torch.get_num_threads() == 1
    for bad in ("two", "0", "-1"):
        monkeypatch.setenv(threads.ENVIRONMENT_VARIABLE, bad)
        with pytest.raises(UserError, match=f"environment variable RLHFKIT_THREADS: .*{bad}"):
            threads.configure("auto")
    with pytest.raises(rlhfkit.UserError, match="train.threads"):
        rlhfkit.api.stage_config("sft", None, ["train.threads=0"], {})
    assert rlhfkit.api.stage_config("sft", None, ["train.threads=3"], {}).train.threads == 3


@pytest.mark.skipif(not CoreLoad.available(), reason="reads Linux /proc")
def test_the_load_reading_counts_other_processes_not_this_one():
    load = CoreLoad(frozenset(os.sched_getaffinity(0)))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # the child is running
        start = load.read()
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:  # this process busy too: it must not count as "other"
            pass
        others = load.others_busy(start, load.read())
    finally:
        busy.kill()
        busy.wait()
    assert 0.4 <= others <= len(load.cores) - 0.4, others  # the child's core, and not ours


def wider_tiny_llama():
    """A model wide enough that its matrix products run on several threads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=3000,
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def test_sampling_is_the_same_whatever_the_count_switching_between_decode_steps(monkeypatch):
    from rlhfkit import sampling

    model = wider_tiny_llama()
    ids = torch.randint(3, 3000, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def sample() -> torch.Tensor:
        torch.manual_seed(5)
        with torch.no_grad():
            return sampling.generate_new_tokens(
                model, ids, mask, do_sample=True, max_new_tokens=24, min_new_tokens=24, temperature=1.0, pad_token_id=0
            )

    torch.set_num_threads(2)
    monkeypatch.setattr(sampling, "follow_free_cores", lambda: None)
    fixed = sample()
    switched_to = []

    def switch() -> None:  # what a busy neighbour starting and stopping would do, every step
        switched_to.append(1 if torch.get_num_threads() == 2 else 2)
        torch.set_num_threads(switched_to[-1])

    monkeypatch.setattr(sampling, "follow_free_cores", switch)
    assert torch.equal(sample(), fixed)
    assert len(switched_to) >= 23 and set(switched_to) == {1, 2}


def test_training_figures_are_the_same_alone_and_beside_a_busy_process(tiny_model, sft_rows, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    settings = {
        "train": {"max_steps": 4, "batch_size": 2, "trackers": [], "lr": 1e-3},
        "generation": {"num_prompts": 2, "max_new_tokens": 6},
    }
    alone = rlhfkit.sft(model=tiny_model, data=sft_rows, output_dir=tmp_path / "alone", **settings)
    policy, counts, _ = scripted_policy([0.0, 1.0] * 100)
    monkeypatch.setattr(threads, "_policy", policy)
    busy = rlhfkit.sft(model=tiny_model, data=sft_rows, output_dir=tmp_path / "busy", **settings)
    assert 1 in counts and counts.count(2) >= 2  # the count did change, back and forth

    def figures(metrics: dict, prefix: str = "") -> dict[str, float]:
        found = {}
        for key, value in metrics.items():
            if isinstance(value, dict):
                found.update(figures(value, f"{prefix}{key}."))
            elif isinstance(value, float | int) and not isinstance(value, bool) and "seconds" not in key:
                found[prefix + key] = value
        return found

    expected, measured = figures(alone.metrics), figures(busy.metrics)
    assert expected.keys() == measured.keys() and expected
    for key, value in expected.items():
        assert math.isclose(measured[key], value, rel_tol=1e-6, abs_tol=1e-9), key
    samples = [(tmp_path / run / "samples.jsonl").read_text() for run in ("alone", "busy")]
    assert samples[0] == samples[1]
