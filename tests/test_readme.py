from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci_lines) == 1
    assert ci_lines[0] in (ROOT / "README.md").read_text()


def test_readme_quickstart_uses_the_shipped_config():
    readme = (ROOT / "README.md").read_text()
    assert ".venv/bin/rlhfkit pipeline configs/quickstart.yaml" in readme
    assert (ROOT / "configs/quickstart.yaml").exists()


def test_quickstart_config_validates_as_a_pipeline():
    from rlhfkit.config.loading import load_pipeline

    pipeline, configs = load_pipeline(ROOT / "configs/quickstart.yaml")
    assert pipeline.stages == ["pretrain", "sft", "reward", "ppo", "evaluate"]
    assert configs["ppo"].model.name_or_path == "runs/quickstart/sft"
    assert configs["ppo"].reward.model == "runs/quickstart/reward"
    # DPO stays one --set away: its section chains from SFT as well
    _, with_dpo = load_pipeline(
        ROOT / "configs/quickstart.yaml", ["pipeline.stages=[pretrain,sft,reward,dpo,evaluate]"]
    )
    assert with_dpo["dpo"].model.name_or_path == "runs/quickstart/sft"
    assert "Explain quantum computing to a 10-year-old." in configs["evaluate"].extra_prompts


def test_the_readme_stays_a_short_users_document_whose_links_resolve():
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200  # results go to docs/results.md, history to docs/changelog.md
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)\)", document.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (document.parent / target).exists(), (document.name, target)
