"""Supervised fine-tuning from Python on a `datasets.Dataset`, then a question to the tuned model.

python examples/sft_on_a_dataset.py            # the embedded SmolLM2-135M-Instruct, ~1 minute
"""

from __future__ import annotations

from collections.abc import Sequence

from common import options, quiet_training
from datasets import Dataset

import rlhfkit

ANSWERS = [
    (
        "Why do we see lightning before we hear thunder?",
        "Light travels much faster than sound, so the flash reaches you first.",
    ),
    ("What makes a rainbow?", "Sunlight bends and splits into colours as it passes through raindrops."),
    ("Why do cats purr?", "Cats purr when they are calm, and sometimes to soothe themselves when hurt."),
    ("How does a seed grow?", "A seed takes in water, splits open, and sends a root down and a shoot up."),
    (
        "Why is the sea salty?",
        "Rivers carry salt from rocks into the sea, and the water evaporates but the salt stays.",
    ),
    ("What is a shadow?", "A shadow is the dark shape left where an object blocks the light."),
    (
        "Why do leaves change colour in autumn?",
        "Trees stop making green chlorophyll, so the yellow and red pigments show.",
    ),
    (
        "How do bees make honey?",
        "Bees collect nectar from flowers and dry it in the hive until it thickens into honey.",
    ),
]


def main(argv: Sequence[str] | None = None) -> rlhfkit.StageResult:
    args = options(__doc__.splitlines()[0], "sft", steps=12, argv=argv)
    dataset = Dataset.from_list([{"prompt": q, "completion": a} for q, a in ANSWERS * 4])
    run = rlhfkit.sft(
        model=args.model,
        data=dataset,  # a path, a list of rows or a pandas DataFrame work the same way
        output_dir=args.output_dir,
        lora={"r": 16},
        train={**quiet_training(args.steps), "batch_size": 4, "lr": 2e-4},
        generation={"num_prompts": 2, "max_new_tokens": args.max_new_tokens},
    )
    before, after = run.metrics["before"], run.metrics["after"]
    print(f"held-out response perplexity {before['perplexity']:.3f} -> {after['perplexity']:.3f}")
    answer = rlhfkit.generate(run, ["Why is the sea salty?"], max_new_tokens=args.max_new_tokens, temperature=0)
    print(f"tuned model: {answer[0]}")
    return run


if __name__ == "__main__":
    main()
