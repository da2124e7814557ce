"""The documentation cannot rot: generated pages are current, commands in it parse, configs and
files it names exist, and its Python blocks compile (the examples they show run in test_examples)."""

import ast
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from rlhfkit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def code_blocks(language: str) -> list[tuple[Path, str]]:
    found = []
    for document in DOCUMENTS:
        for block in re.findall(rf"```{language}\n(.*?)```", document.read_text(encoding="utf-8"), re.S):
            found.append((document, block))
    return found


def rlhfkit_commands() -> list[tuple[Path, list[str]]]:
    commands = []
    for document, block in code_blocks("bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.split("#")[0], posix=True) if part.split("#")[0].strip() else []
                if words and words[0].endswith("rlhfkit"):
                    commands.append((document, words[1:]))
                elif len(words) > 3 and words[:2] == ["accelerate", "launch"] and "rlhfkit.cli" in words:
                    commands.append((document, words[words.index("rlhfkit.cli") + 1 :]))
    return commands


def test_the_generated_references_are_current():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "scripts" / "docs_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run: python scripts/docs_reference.py"
    reference = (ROOT / "docs" / "reference" / "config.md").read_text(encoding="utf-8")
    from rlhfkit import registry
    from rlhfkit.config.sections import field_entries

    for stage in registry.STAGES.values():  # every stage and every field has an entry
        assert f"## {stage.name}\n" in reference
        for name, _ in field_entries(stage.config_class):
            assert f"| `{name}` |" in reference, (stage.name, name)


def test_every_rlhfkit_command_in_the_docs_parses_and_names_files_that_exist(capsys):
    commands = rlhfkit_commands()
    assert len(commands) > 30
    parser = build_parser()
    for document, words in commands:
        if not words or words[0] in ("--help", "--version") or "--help" in words:
            continue
        try:
            args = parser.parse_args(words)
        except SystemExit:
            pytest.fail(f"{document.name}: `rlhfkit {' '.join(words)}` does not parse")
        config = getattr(args, "config", None)
        if config and config.startswith("configs/"):
            assert (ROOT / config).is_file(), (document.name, config)
    capsys.readouterr()


def test_the_commands_that_only_read_run_as_written_on_a_fresh_clone(monkeypatch, capsys):
    """`--help` and `--print-config` lines validate configs without training: run each for real,
    from the repository root, with no runs/ written yet."""
    from rlhfkit.cli import main

    monkeypatch.chdir(ROOT)
    reading = [(d, w) for d, w in rlhfkit_commands() if "--print-config" in w or w[-1:] == ["--help"]]
    assert len(reading) >= 3
    for document, words in reading:
        if any(word.startswith("my_") for word in words):
            continue  # a user's own file, named as an example
        try:
            code = main(words)
        except SystemExit as exit:  # --help exits after printing
            code = exit.code
        assert code == 0, (document.name, words, capsys.readouterr().err)
    capsys.readouterr()


def test_the_config_files_the_docs_name_exist():
    for document in DOCUMENTS:
        for name in re.findall(r"`(configs/[\w./-]+\.yaml)`", document.read_text(encoding="utf-8")):
            assert (ROOT / name).is_file(), (document.name, name)


def test_python_blocks_in_the_docs_compile():
    blocks = code_blocks("python")
    assert blocks
    for document, block in blocks:
        if block.lstrip().startswith("--8<--"):  # an included file: examples/, run by test_examples
            (path,) = re.findall(r'"(.+?)"', block)
            assert (ROOT / path).is_file(), (document.name, path)
            continue
        ast.parse(block, filename=str(document))
