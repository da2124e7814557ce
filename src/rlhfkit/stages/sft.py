"""`rlhfkit sft`: supervised fine-tuning on prompt -> response pairs.

Examples are formatted with the tokenizer's chat template (or the plain template), the loss is
taken on assistant tokens only, and each micro-batch is packed into one row without padding.
Held-out response perplexity and ROUGE-L of generated answers are measured before and after, and
the base and tuned answers are written side by side to samples.md.
"""

from __future__ import annotations

from rlhfkit.config import SFTConfig
from rlhfkit.data.batching import packed_batches
from rlhfkit.data.examples import ChatExample, chat_examples, load_examples, training_data_summary
from rlhfkit.data.formatting import render_prompt, tokenize_examples
from rlhfkit.engine import Engine, RunDir, steps_for
from rlhfkit.metrics import rouge_l
from rlhfkit.models import resolve_with_tokenizer
from rlhfkit.rollout_copy import generate_answers
from rlhfkit.stages.before_after import measure, write_samples
from rlhfkit.stages.language_model import lm_loss, perplexity_evaluator

STAGE = "sft"


def held_out_prompts(examples: list, limit: int) -> tuple[list[tuple[dict, ...]], list[str]]:
    """Prompt turns and reference answers: each conversation up to its last assistant turn."""
    prompts, references = [], []
    for example in examples:
        if len(prompts) == limit:
            break
        if not isinstance(example, ChatExample):
            continue
        last = max(i for i, message in enumerate(example.messages) if message["role"] == "assistant")
        prompts.append(example.messages[:last])
        references.append(example.messages[last]["content"])
    return prompts, references


def run(config: SFTConfig, resume: bool = False) -> dict:
    run_dir = RunDir.open(config.train.output_dir, STAGE, config, resume)
    train, data, generation = config.train, config.data, config.generation

    # Data: every row is read and checked before any weights load.
    train_examples, eval_examples, report = load_examples(data, train.seed, chat_examples)
    source, tokenizer = resolve_with_tokenizer(config.model)
    train_tokens, length_counts = tokenize_examples(
        tokenizer, train_examples, data.template, data.max_length, data.overlong
    )
    eval_tokens, _ = tokenize_examples(tokenizer, eval_examples, data.template, data.max_length, data.overlong)
    print(f"data: {training_data_summary(report, length_counts, len(train_tokens), len(eval_tokens), 'examples')}")
    prompt_turns, references = held_out_prompts(eval_examples, generation.num_prompts)
    prompt_turns += [({"role": "user", "content": text},) for text in generation.extra_prompts]
    prompt_texts = [render_prompt(tokenizer, turns, data.template) for turns in prompt_turns]

    # Model and optimiser.
    engine = Engine(train, config.model.device, run_dir, STAGE)
    model = engine.build_model(source, config.model, config.lora)
    batches_for_epoch = lambda epoch: packed_batches(train_tokens, train.batch_size, seed=train.seed + epoch)  # noqa: E731
    engine.prepare(model, steps_for(len(batches_for_epoch(0)), train))
    eval_batches = packed_batches(eval_tokens, train.batch_size, seed=None)[: config.eval.max_batches]
    evaluate = perplexity_evaluator(engine, eval_batches, train.loss_chunk_tokens)

    def answer_and_score() -> dict:
        answers = generate_answers(engine.model, tokenizer, prompt_texts, generation, train.seed)
        scores = evaluate() if evaluate else {}
        if references:
            scores["rouge_l"] = rouge_l(answers[: len(references)], references)
        return {**scores, "answers": answers}

    engine.resume(resume)

    # Train, measuring response perplexity and ROUGE-L before and after.
    metrics = run_dir.read_json("metrics.json")
    if config.eval.before:
        measure(engine, metrics, "before", answer_and_score)
    engine.fit(batches_for_epoch, lm_loss(train.loss_chunk_tokens), evaluate)
    measure(engine, metrics, "after", answer_and_score)

    # Save.
    engine.save_final(tokenizer, config.model.name_or_path, {"stage": STAGE, "lora": config.lora.enabled})
    write_samples(engine, prompt_turns, metrics, references)
    engine.complete(metrics, report.summary())
    return metrics
