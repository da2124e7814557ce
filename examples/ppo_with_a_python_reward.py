"""PPO from Python with a reward written as a Python function: answers of about 25 words score best.

The function takes the prompts, the sampled completions and the prompt rows' other columns, and
returns one float per completion; a lambda, a closure or a function in a notebook works as well.

    python examples/ppo_with_a_python_reward.py    # the embedded SmolLM2-135M-Instruct, ~5 minutes
"""

from __future__ import annotations

from collections.abc import Sequence

from common import options, quiet_training

import rlhfkit

PROMPTS = [
    "Why is the sky blue?",
    "How do magnets work?",
    "What is a volcano?",
    "Why do we have seasons?",
    "How do fish breathe?",
    "What is gravity?",
    "Why does ice float?",
    "How do plants drink water?",
]


def about_25_words(prompts: list[str], completions: list[str], **columns: list) -> list[float]:
    """1 at 25 words, falling linearly to 0 at 0 and at 50 words."""
    return [max(0.0, 1.0 - abs(len(text.split()) - 25) / 25) for text in completions]


def main(argv: Sequence[str] | None = None) -> rlhfkit.StageResult:
    args = options(__doc__.splitlines()[0], "ppo", steps=10, argv=argv)
    run = rlhfkit.ppo(
        model=args.model,
        reward=about_25_words,  # or a reward-model run: reward="runs/examples/reward/model"
        prompts=PROMPTS * 4,  # texts, chat turns, or rows with more columns for the reward
        output_dir=args.output_dir,
        rollout={"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": args.max_new_tokens},
        ppo={"critic": "head", "kl_coef": 0.02},
        train={**quiet_training(args.steps), "batch_size": 8, "lr": 1e-4},
        eval={"num_prompts": 8},
    )
    before, after = run.metrics["before"], run.metrics["after"]
    print(f"held-out reward {before['reward_mean']:.3f} -> {after['reward_mean']:.3f} (KL {after['kl']:.4f})")
    return run


if __name__ == "__main__":
    main()
