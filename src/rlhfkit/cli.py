"""The `rlhfkit` command: one subcommand per stage, the pipeline, evaluate, report, generate, merge and score."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pydantic import BaseModel

from rlhfkit import __version__, api, registry
from rlhfkit.config import dump_config
from rlhfkit.config.sections import ANSWER_ENGINES, default_text, field_entries
from rlhfkit.errors import UserError


def _field_lines(model: type[BaseModel]) -> list[str]:
    """`section.field = default: description` for every config field, for --help."""
    lines, section = [], None
    for name, info in field_entries(model):
        if name.rpartition(".")[0] != section:
            section = name.rpartition(".")[0]
            lines += ["", f"  {section}:"] if section else []
        lines.append(f"    {name} = {default_text(info)}\n        {info.description or ''}")
    return lines


def _add_stage(subparsers, stage: registry.Stage) -> None:
    parser = subparsers.add_parser(
        stage.command_line.split()[-1],
        help=stage.summary,
        description=f"{stage.summary}\n\nExample:\n  rlhfkit {stage.command_line} {stage.example_config} --set {stage.example_override}",
        epilog="config fields (YAML sections; override any with --set SECTION.FIELD=VALUE):\n"
        + "\n".join(_field_lines(stage.config_class)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config", nargs="?", help=f"YAML config (a file with a top-level '{stage.name}:' section works too)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=1e-4 (repeatable)",
    )
    if stage.trains:
        parser.add_argument(
            "--resume", action="store_true", help="continue the run in train.output_dir from its latest checkpoint"
        )
    parser.add_argument("--print-config", action="store_true", help="print the validated config as YAML and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfkit",
        description="Align causal language models with human feedback, stage by stage.",
        epilog="Run `rlhfkit COMMAND --help` for a command's options and config fields.",
    )
    parser.add_argument("--version", action="version", version=f"rlhfkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in registry.STAGES.values():
        if stage.command_line == stage.name:
            _add_stage(subparsers, stage)

    pipeline = subparsers.add_parser(
        "pipeline",
        help=f"Run the stages a config lists ({', '.join(registry.names())}), each from the one before.",
        description="Run every stage listed in the config's `pipeline:` section, in order, chaining their outputs, then "
        "write report.html and report.md in the run directory. Complete stages are skipped and an interrupted one resumes.\n\n"
        "Examples:\n  rlhfkit pipeline configs/quickstart.yaml\n  rlhfkit pipeline configs/quickstart.yaml --from ppo\n"
        "  rlhfkit pipeline configs/quickstart.yaml --set sft.train.lr=1e-4 --set pipeline.output_dir=runs/lr-1e-4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pipeline.add_argument("config", help="YAML with a `pipeline:` section and one section per stage")
    pipeline.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="override a field of one stage (sft.train.lr=1e-4) or of the pipeline (pipeline.output_dir=...)",
    )
    pipeline.add_argument(
        "--from", dest="from_stage", choices=registry.names(), help="re-run this stage and every later one"
    )
    pipeline.add_argument("--only", choices=registry.names(), help="re-run only this stage")
    pipeline.add_argument("--print-config", action="store_true", help="print every stage's resolved config and exit")

    label = subparsers.add_parser(
        "label",
        help="Collect feedback: candidate pairs or single answers, annotators, an AI judge, export to a dataset.",
        description="The feedback-collection loop: sample candidate pairs (or single answers, --kind single) into a "
        "labeling store, create annotators, label with a judge (or people), export majority labels as a preference "
        "dataset for `rlhfkit reward` / `dpo` (or 👍/👎 feedback for `rlhfkit kto` / a thumbs reward model).\n\n"
        "Examples:\n  rlhfkit label generate labels.db --model runs/quickstart/sft --prompts builtin:tutor-sft --limit 50\n"
        "  rlhfkit label generate thumbs.db --kind single --model runs/quickstart/sft --prompts builtin:tutor-sft\n"
        "  rlhfkit label annotator labels.db alice\n"
        "  rlhfkit label judge labels.db --reward-model runs/quickstart/reward\n"
        "  rlhfkit label export labels.db prefs.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = label.add_subparsers(dest="label_command", required=True, metavar="ACTION")
    _add_stage(actions, registry.stage("label"))  # `rlhfkit label run CONFIG`: the pipeline's label stage
    generate_pairs = actions.add_parser(
        "generate", help="sample answers per prompt and store them as pairs (or single answers)"
    )
    generate_pairs.add_argument("store", help="SQLite labeling store (created if absent)")
    generate_pairs.add_argument("--model", required=True, help="model, adapter or run dir that answers")
    generate_pairs.add_argument(
        "--prompts", required=True, help="prompt dataset (a `prompt` column), e.g. builtin:tutor-sft"
    )
    generate_pairs.add_argument(
        "--kind",
        choices=["pairwise", "single"],
        default="pairwise",
        help="what people label: pairs (A better / B better / tie / both bad) or single answers (👍/👎, a 1-5 "
        "rating); chosen once per store",
    )
    generate_pairs.add_argument(
        "--responses", type=int, default=2, help="answers per prompt (pairwise: consecutive ones are paired)"
    )
    generate_pairs.add_argument("--limit", type=int, help="use the first N prompts")
    generate_pairs.add_argument("--required", type=int, default=1, help="labels each task needs before export")
    generate_pairs.add_argument("--max-new-tokens", type=int, default=128)
    generate_pairs.add_argument("--temperature", type=float, default=0.9)
    generate_pairs.add_argument("--seed", type=int, default=0)
    add_engine_option(generate_pairs)
    annotator = actions.add_parser("annotator", help="create an annotator and print their sign-in token (shown once)")
    annotator.add_argument("store")
    annotator.add_argument("name")
    judge = actions.add_parser(
        "judge", help="label every pair or answer with a reward model or LLM (stored under the judge's name)"
    )
    judge.add_argument("store")
    judge_source = judge.add_mutually_exclusive_group(required=True)
    judge_source.add_argument(
        "--reward-model", help="reward run dir, adapter or one-output model: the higher score wins"
    )
    judge_source.add_argument(
        "--llm", help="a local chat model asked 'which is better, A or B?' in both orders (single: 'good? Yes or No')"
    )
    judge_source.add_argument(
        "--function", help="a Python reward `module:function` (the RL stages' signature) scoring each answer"
    )
    judge.add_argument(
        "--tie-margin",
        type=float,
        help="ties: reward differences up to this (default 0), or "
        "|P(A better) - 0.5| up to this for --llm (default 0.05)",
    )
    judge.add_argument(
        "--threshold",
        type=float,
        help="single answers: 👍 above this score (default 0) or P(Yes) (default 0.5 for --llm)",
    )
    judge.add_argument("--name", help="the judge's name in the store (default: reward-model:REF or llm:REF)")
    serve = actions.add_parser("serve", help="serve the labeling page (annotators sign in with their token)")
    serve.add_argument("store")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    export = actions.add_parser(
        "export", help="majority labels -> preference (or 👍/👎 feedback) JSONL (+ OUTPUT.stats.json with agreement)"
    )
    export.add_argument("store")
    export.add_argument(
        "output",
        help=".jsonl to write: prompt, chosen, rejected (pairwise store) or prompt, completion, label, rating (single)",
    )
    export.add_argument(
        "--pairs",
        help="single-answer stores: also write each prompt's liked x disliked answers as preference rows here",
    )
    export.add_argument(
        "--from",
        dest="sources",
        default="human",
        choices=["human", "judge", "all"],
        help="whose judgements count (default: human)",
    )
    export.add_argument("--annotator", action="append", help="only these annotators or judges (repeatable)")
    export.add_argument("--min-votes", type=int, help="judgements a pair needs (default: its required count)")

    report = subparsers.add_parser(
        "report",
        help="Rewrite report.html / report.md of a pipeline run directory.",
        description="Rewrite the report of a pipeline run directory from what its stages wrote.",
    )
    report.add_argument("run_dir", help="the pipeline's output_dir")

    generate = subparsers.add_parser(
        "generate",
        help="Sample answers from a model, an adapter or a run directory.",
        description="Sample answers from a base model, a LoRA adapter dir or a run dir.\n\n"
        "Example:\n  rlhfkit generate runs/quickstart/sft --prompt 'Why is the sky blue?'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("model", help="built-in name, hub id, model/adapter dir, .gguf file or run dir")
    generate.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    generate.add_argument("--top-p", type=float, default=0.9)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument(
        "--template",
        choices=["auto", "plain"],
        default="auto",
        help="chat template: the tokenizer's (auto) or rlhfkit's plain one",
    )
    generate.add_argument("--raw", action="store_true", help="continue the prompt text as is, without a chat template")
    add_engine_option(generate)

    merge = subparsers.add_parser(
        "merge",
        help="Merge a LoRA adapter (or a run's adapter) into its base and save a standalone model.",
        description="Merge a LoRA adapter into its base model.\n\nExample:\n  rlhfkit merge runs/quickstart/sft merged-model/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("model", help="adapter dir or run dir")
    merge.add_argument("output_dir", help="where to write the merged model (must not exist)")

    score = subparsers.add_parser(
        "score",
        help="Score responses with a reward model.",
        description="Score (prompt, response) pairs with a reward model.\n\nExamples:\n"
        "  rlhfkit score runs/quickstart/reward --prompt 'Why is the sky blue?' --response 'Light scatters.'\n"
        "  rlhfkit score runs/quickstart/reward --data answers.jsonl --output scored.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("model", help="reward run dir, reward adapter dir, or a one-output classification model")
    score.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable, paired with --response)")
    score.add_argument("--response", action="append", default=[], help="a response to score (repeatable)")
    score.add_argument("--data", help="a dataset with `prompt` and `completion` (or `response`) columns")
    score.add_argument("--output", help="write the rows with a `score` column as JSONL here (default: stdout)")
    score.add_argument("--max-length", type=int, default=512)
    return parser


def _run_stage(args: argparse.Namespace) -> None:
    config = api.stage_config(args.command, args.config, args.overrides, where="(defaults)")
    if args.print_config:
        print(dump_config(config), end="")
        return
    result = api.run_stage(args.command, config, resume=getattr(args, "resume", False))
    print(f"done: {result.run_dir}")


def _pipeline(args: argparse.Namespace) -> None:
    from rlhfkit.config.loading import load_pipeline
    from rlhfkit.pipeline_runner import resolved_yaml

    if args.print_config:
        print(resolved_yaml(load_pipeline(args.config, args.overrides)[1]), end="")
        return
    result = api.pipeline(args.config, args.overrides, args.from_stage, args.only)
    print(f"done: {result.run_dir} (open {result.report})")


def add_engine_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=ANSWER_ENGINES,
        default="auto",
        help="what samples: float32 (rlhfkit's decode loop over the model's own float32 weights, Llama-layout "
        "models on the CPU), hf (transformers generate) or auto (float32 where it runs); both sample the model",
    )


def _report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rlhfkit.report import write_report

    root = Path(args.run_dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such run directory")
    stages = {stage: root / stage for stage in registry.names() if (root / stage).is_dir()}
    if not stages:
        raise UserError(f"{root}: holds no stage directories ({', '.join(registry.names())})")
    print(f"report written to {write_report(root, stages)}")


def _label(args: argparse.Namespace) -> None:
    from rlhfkit.labeling import commands
    from rlhfkit.labeling.store import LabelStore

    if args.label_command == "run":
        args.command = "label"
        _run_stage(args)
    elif args.label_command == "generate":
        from rlhfkit.config import SamplingSettings

        if (
            args.max_new_tokens <= 0
            or args.temperature <= 0
            or args.required <= 0
            or (args.limit is not None and args.limit <= 0)
        ):
            raise UserError("--max-new-tokens, --temperature, --required and --limit must be > 0")
        sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        added = commands.generate_candidates(
            args.store,
            args.model,
            args.prompts,
            args.responses,
            args.limit,
            sampling,
            args.required,
            args.seed,
            args.kind,
            args.engine,
        )
        print(f"{added} {'pairs' if args.kind == 'pairwise' else 'answers'} added to {args.store}")
    elif args.label_command == "annotator":
        store = LabelStore(args.store)
        token = store.add_annotator(args.name)
        store.close()
        print(f"annotator {args.name!r} created; sign-in token (shown once, keep it secret):\n{token}")
    elif args.label_command == "serve":
        from rlhfkit.labeling.server import serve

        if not 1 <= args.port <= 65535:
            raise UserError(f"--port must be in 1..65535, got {args.port}")
        serve(args.store, args.host, args.port)
    elif args.label_command == "judge":
        if args.tie_margin is not None and args.tie_margin < 0:
            raise UserError("--tie-margin must be >= 0")
        if args.llm:
            counts = commands.judge_with_llm(
                args.store,
                args.llm,
                0.05 if args.tie_margin is None else args.tie_margin,
                args.name,
                0.5 if args.threshold is None else args.threshold,
            )
        else:
            judge = commands.judge_with_function if args.function else commands.judge_with_reward_model
            counts = judge(
                args.store, args.function or args.reward_model, args.tie_margin or 0.0, args.name, args.threshold or 0.0
            )
        if "up" in counts:
            print(f"judged {sum(counts.values())} answers: 👍 {counts['up']}, 👎 {counts['down']}")
            warning = commands.one_sided_warning(counts)
            if warning:
                print(warning, file=sys.stderr)
        else:
            print(
                f"judged {sum(counts.values())} pairs: A better {counts['a']}, B better {counts['b']}, "
                f"ties {counts['tie']}"
            )
    else:
        kinds = {"human": ("human",), "judge": ("judge",), "all": ("human", "judge")}[args.sources]
        store = LabelStore(args.store)
        single = store.kind == "single"
        store.close()
        if args.pairs and not single:
            raise UserError("--pairs derives pairs from single-answer labels; this store already labels pairs")
        if single:
            stats = commands.export_feedback(args.store, args.output, kinds, args.annotator, args.min_votes, args.pairs)
            derived = f"; {stats['derived_pairs']} derived pairs in {args.pairs}" if args.pairs else ""
            print(
                f"{stats['exported']} labelled answers ({stats['desirable']} 👍, {stats['undesirable']} 👎) written to "
                f"{args.output} ({stats['labelled']} of {stats['answers']} answers labelled; {stats['too_few_votes']} "
                f"with too few votes, {stats['no_majority']} without a majority{derived}); details in "
                f"{args.output}.stats.json"
            )
            return
        stats = commands.export_preferences(args.store, args.output, kinds, args.annotator, args.min_votes)
        agreement = stats["agreement"]["percent_agreement"]
        print(
            f"{stats['exported']} preference pairs written to {args.output} ({stats['labelled']} of {stats['pairs']} pairs "
            f"labelled; {stats['too_few_votes']} with too few votes, {stats['no_majority']} without a majority; "
            f"percent agreement {agreement:.3f}); details in {args.output}.stats.json"
        )


def _generate(args: argparse.Namespace) -> None:
    template = "raw" if args.raw else args.template
    answers = api.generate(
        args.model, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed, template, args.engine
    )
    for prompt, answer in zip(args.prompt, answers):
        print(f"### {prompt}\n{answer}\n")


def _merge(args: argparse.Namespace) -> None:
    print(f"merged model written to {api.merge(args.model, args.output_dir)}")


def _score(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rlhfkit.data.examples import row_problem
    from rlhfkit.data.loading import read_rows
    from rlhfkit.files import check_output_files, json_text, write_text_atomically

    if args.data is None and (not args.prompt or len(args.prompt) != len(args.response)):
        raise UserError("give --data FILE, or as many --prompt as --response values")
    if args.output:
        check_output_files([Path(args.output)], [Path(args.data)] if args.data else [], "--output")
    if args.max_length < 8:
        raise UserError(f"--max-length must be at least 8 tokens, got {args.max_length}")  # before reading data
    if args.data is not None:
        read = read_rows(args.data)
        for row in read:
            values = row.values
            if not isinstance(values.get("prompt"), str) or not isinstance(
                values.get("completion", values.get("response")), str
            ):
                raise UserError(f"{row.where}: needs string `prompt` and `completion` (or `response`) columns")
            if (problem := row_problem(row)) is not None:
                raise UserError(f"{row.where}: {problem}")
        rows = [row.values for row in read]
        prompts = [row["prompt"] for row in rows]
        responses = [row.get("completion", row.get("response")) for row in rows]
    else:
        rows = [{"prompt": p, "response": r} for p, r in zip(args.prompt, args.response)]
        prompts, responses = args.prompt, args.response
    scores = api.score(args.model, prompts, responses, args.max_length)
    lines = [json_text({**row, "score": score}) for row, score in zip(rows, scores)]
    if args.output:
        write_text_atomically(Path(args.output), "\n".join(lines) + "\n")
        print(f"{len(lines)} scores written to {args.output} (mean {sum(scores) / len(scores):.4f})")
    else:
        print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    api.library_defaults()
    args = build_parser().parse_args(argv)
    # Only the stages that train through the engine run data-parallel under accelerate launch.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in registry.training_stages():
        print(
            f"error: `rlhfkit {args.command}` runs on one process; under accelerate launch run the training stages "
            f"({', '.join(registry.training_stages())}) one at a time",
            file=sys.stderr,
        )
        return 2
    if int(os.environ.get("RANK", "0")) > 0:
        # Under accelerate launch / torchrun, only the main process reports to the console; the
        # others still print errors (stderr).
        sys.stdout = open(os.devnull, "w")
    handlers = {
        "generate": _generate,
        "merge": _merge,
        "score": _score,
        "pipeline": _pipeline,
        "report": _report,
        "label": _label,
    }
    try:
        handlers.get(args.command, _run_stage)(args)
    except UserError as error:
        print_line(f"error: {error}")
        return 2
    except OSError as error:  # a full disk or a read-only filesystem: named, with what was being written
        where = f"{error.filename}: " if error.filename else ""
        print_line(f"error: {where}{error.strerror or error}")
        return 2
    except KeyboardInterrupt:
        print("interrupted; a stage run continues from its last checkpoint with --resume", file=sys.stderr)
        return 130
    return 0


def print_line(message: str) -> None:
    """A message on a line of its own on stderr, even while a progress bar is drawn there (tqdm
    clears the bar's line, prints, and draws the bar again below)."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
