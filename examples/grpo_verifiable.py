"""GRPO from Python on a verifiable task: two-number arithmetic, rewarded 1 for the right answer.

python examples/grpo_verifiable.py             # the embedded SmolLM2-135M-Instruct, ~5 minutes
"""

from __future__ import annotations

from collections.abc import Sequence

from common import options, quiet_training

import rlhfkit
from rlhfkit.reward_functions import numeric_answer  # 1.0 when the final number is the row's `answer`


def main(argv: Sequence[str] | None = None) -> rlhfkit.StageResult:
    args = options(__doc__.splitlines()[0], "grpo", steps=10, argv=argv)
    run = rlhfkit.grpo(
        model=args.model,
        prompts="builtin:arithmetic",  # rows with `prompt` and `answer`; the reward reads `answer`
        reward=numeric_answer,
        output_dir=args.output_dir,
        grpo={"advantage": "group", "clip_high": 0.28},  # clip-higher, as in DAPO
        rollout={"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": args.max_new_tokens},
        train={**quiet_training(args.steps), "batch_size": 16, "lr": 1e-4},
        eval={"num_prompts": 16},
    )
    before, after = run.metrics["before"], run.metrics["after"]
    print(f"held-out accuracy (mean reward) {before['reward_mean']:.3f} -> {after['reward_mean']:.3f}")
    return run


if __name__ == "__main__":
    main()
