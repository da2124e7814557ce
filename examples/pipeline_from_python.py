"""The whole pipeline from Python: SFT -> reward model -> DPO -> evaluation, then the report.

The mapping is the YAML of `rlhfkit pipeline` as a dict; any stage section takes the same Python
objects the stage functions do (rows, datasets, reward callables). A second call finds the stages
complete and only rewrites the report.

    python examples/pipeline_from_python.py        # the embedded SmolLM2-135M-Instruct, ~6 minutes
"""

from __future__ import annotations

from collections.abc import Sequence

from common import options, quiet_training

import rlhfkit


def main(argv: Sequence[str] | None = None) -> rlhfkit.PipelineResult:
    args = options(__doc__.splitlines()[0], "pipeline", steps=12, argv=argv)
    train = {**quiet_training(args.steps), "batch_size": 4}
    result = rlhfkit.pipeline(
        {
            "pipeline": {
                "output_dir": args.output_dir,
                "model": args.model,
                "stages": ["sft", "reward", "dpo", "evaluate"],
            },
            "sft": {
                "train": {**train, "lr": 2e-4},
                "generation": {"num_prompts": 4, "max_new_tokens": args.max_new_tokens},
            },
            "reward": {"train": {**train, "lr": 1e-4}},
            "dpo": {"train": {**train, "lr": 5e-5}},
            "evaluate": {"num_prompts": 8, "sampling": {"max_new_tokens": args.max_new_tokens}},
        }
    )
    for name, model in result["evaluate"].metrics["models"].items():
        shown = {key: round(model[key], 3) for key in ("reward_mean", "win_rate", "kl") if key in model}
        print(f"{name}: {shown}")
    print(f"report: {result.report}")
    return result


if __name__ == "__main__":
    main()
