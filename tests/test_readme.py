from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci_lines) == 1
    assert ci_lines[0] in (ROOT / "README.md").read_text()


def test_readme_quickstart_uses_the_shipped_config():
    readme = (ROOT / "README.md").read_text()
    for stage in ("pretrain", "sft", "reward", "dpo"):
        assert f"rlhfkit {stage} configs/quickstart.yaml" in readme
    assert (ROOT / "configs/quickstart.yaml").exists()
