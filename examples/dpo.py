"""DPO from Python on the built-in tutor preferences, with the IPO loss one keyword away.

python examples/dpo.py                         # the embedded SmolLM2-135M-Instruct, ~2 minutes
"""

from __future__ import annotations

from collections.abc import Sequence

from common import options, quiet_training

import rlhfkit


def main(argv: Sequence[str] | None = None) -> rlhfkit.StageResult:
    args = options(__doc__.splitlines()[0], "dpo", steps=8, argv=argv)
    run = rlhfkit.dpo(
        model=args.model,
        data={"path": "builtin:tutor-prefs", "max_length": 256},
        output_dir=args.output_dir,
        dpo={"loss": "sigmoid", "beta": 0.1},  # or "ipo", "simpo" (`rlhfkit dpo --help`)
        train={**quiet_training(args.steps), "batch_size": 4, "lr": 5e-5},
    )
    before, after = run.metrics["before"], run.metrics["after"]
    print(
        f"held-out implicit-reward accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
        f"margin {before['margin']:.3f} -> {after['margin']:.3f}"
    )
    return run


if __name__ == "__main__":
    main()
