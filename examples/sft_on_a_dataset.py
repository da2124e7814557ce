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
    ("What is a shadow?", "A shadow is the dark shape left where an object blocks the light."),
    (
        "Why do leaves change colour in autumn?",
        "Trees stop making green chlorophyll, so the yellow and red pigments show.",
    ),
    (
        "How do bees make honey?",
        "Bees collect nectar from flowers and dry it in the hive until it thickens into honey.",
    ),
    ("Why does bread rise?", "Yeast in the dough eats sugar and lets out gas bubbles that puff the bread up."),
    ("What is an echo?", "An echo is sound bouncing off a wall or a cliff and coming back to your ears."),
    ("Why do we need to sleep?", "Sleep lets your body rest and your brain sort out what you learned in the day."),
    ("How do birds fly?", "Birds flap their wings to push air down, and the air pushes them up."),
    ("What is a fossil?", "A fossil is the stony print or remains of a plant or animal that lived long ago."),
]
HELD_OUT = [  # questions the model is not trained on: the perplexity before and after is measured here
    (
        "Why is the sea salty?",
        "Rivers carry salt from rocks into the sea, and the water evaporates but the salt stays.",
    ),
    ("What is wind?", "Wind is air moving from a place with high pressure to a place with low pressure."),
    ("Why do we have bones?", "Bones hold your body up, protect what is inside, and let your muscles move you."),
    ("How does a fridge keep food cold?", "A fridge pumps heat out of the box and lets it out at the back."),
]


def main(argv: Sequence[str] | None = None) -> rlhfkit.StageResult:
    args = options(__doc__.splitlines()[0], "sft", steps=9, argv=argv)
    dataset = Dataset.from_list([{"prompt": q, "completion": a} for q, a in ANSWERS])
    held_out = [{"prompt": q, "completion": a} for q, a in HELD_OUT]
    run = rlhfkit.sft(
        model=args.model,
        # a path, a Dataset, a list of rows or a pandas DataFrame, each way
        data={"path": dataset, "eval_path": held_out},
        output_dir=args.output_dir,
        lora={"r": 16},
        train={**quiet_training(args.steps), "batch_size": 4, "lr": 2e-4},
        generation={"num_prompts": 4, "max_new_tokens": args.max_new_tokens},
    )
    before, after = run.metrics["before"], run.metrics["after"]
    print(f"held-out response perplexity {before['perplexity']:.3f} -> {after['perplexity']:.3f}")
    answer = rlhfkit.generate(run, ["Why is the sea salty?"], max_new_tokens=args.max_new_tokens, temperature=0)
    print(f"tuned model: {answer[0]}")
    return run


if __name__ == "__main__":
    main()
