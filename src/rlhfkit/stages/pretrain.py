"""`rlhfkit pretrain`: continue causal-LM training on raw domain text.

Texts are tokenised, joined with EOS and cut into full blocks of ``data.max_length`` tokens (no
padding). Held-out perplexity is measured before and after training.
"""

from __future__ import annotations

from rlhfkit.config import PretrainConfig
from rlhfkit.data.batching import block_batches, corpus_blocks
from rlhfkit.data.examples import load_examples, text_examples
from rlhfkit.data.formatting import tokenize_corpus
from rlhfkit.engine import Engine, RunDir, steps_for
from rlhfkit.errors import DataError
from rlhfkit.models import resolve_with_tokenizer
from rlhfkit.stages.before_after import measure
from rlhfkit.stages.language_model import lm_loss, perplexity_evaluator

STAGE = "pretrain"


def run(config: PretrainConfig, resume: bool = False) -> dict:
    run_dir = RunDir.open(config.train.output_dir, STAGE, config, resume)
    train, data = config.train, config.data

    # Data: every row is read and checked before any weights load.
    train_texts, eval_texts, report = load_examples(data, train.seed, text_examples)
    source, tokenizer = resolve_with_tokenizer(config.model)
    train_blocks = corpus_blocks(tokenize_corpus(tokenizer, train_texts), data.max_length)  # (N, T)
    eval_blocks = corpus_blocks(tokenize_corpus(tokenizer, eval_texts), data.max_length)
    if len(train_blocks) == 0:
        raise DataError(f"{data.path}: the training text is shorter than one block of {data.max_length} tokens")
    print(
        f"data: {report.summary()}; {len(train_blocks)} train / {len(eval_blocks)} eval blocks of {data.max_length} tokens"
    )

    # Model and optimiser.
    engine = Engine(train, config.model.device, run_dir, STAGE)
    model = engine.build_model(source, config.model, config.lora)
    batches_for_epoch = lambda epoch: block_batches(train_blocks, train.batch_size, seed=train.seed + epoch)  # noqa: E731
    engine.prepare(model, steps_for(len(batches_for_epoch(0)), train))
    eval_batches = block_batches(eval_blocks, train.batch_size, seed=None)[: config.eval.max_batches]
    evaluate = perplexity_evaluator(engine, eval_batches, train.loss_chunk_tokens)
    engine.resume(resume)

    # Train, measuring held-out perplexity before and after.
    metrics = run_dir.read_json("metrics.json")
    if config.eval.before:
        measure(engine, metrics, "before", evaluate)
    engine.fit(batches_for_epoch, lm_loss(train.loss_chunk_tokens), evaluate)
    measure(engine, metrics, "after", evaluate)

    # Save.
    engine.save_final(tokenizer, config.model.name_or_path, {"stage": STAGE, "lora": config.lora.enabled})
    engine.complete(metrics, report.summary())
    return metrics
