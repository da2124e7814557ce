"""The package layout in CONTRIBUTING.md is the one the imports follow, and files stay a readable size."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "rlhfkit"


def layers() -> dict[str, int]:
    """module prefix (e.g. `config.loading`) -> layer number, from CONTRIBUTING.md's table."""
    table = {}
    for line in (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8").splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for name in re.findall(r"`([\w.]+)`", row.group(2)):
                table[name] = int(row.group(1))
    return table


def layer_of(module: str, table: dict[str, int]) -> int | None:
    """The layer of the longest table prefix of an rlhfkit module path (`engine.run_dir` -> `engine`)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in table:
            return table[".".join(parts[:end])]
    return None


def imports(path: Path) -> list[str]:
    """The rlhfkit modules a file imports (at the top or inside functions), without the `rlhfkit.` prefix."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhfkit"):
            if node.module == "rlhfkit":
                found += [alias.name for alias in node.names]
            else:
                found.append(node.module.removeprefix("rlhfkit."))
        elif isinstance(node, ast.Import):
            found += [alias.name.removeprefix("rlhfkit.") for alias in node.names if alias.name.startswith("rlhfkit.")]
    return found


def test_every_module_has_a_layer_and_imports_point_down():
    table = layers()
    assert len(set(table.values())) >= 5, "CONTRIBUTING.md has lost its layer table"
    upward, unplaced = [], []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        if module == "__init__":
            continue
        own = layer_of(module, table)
        if own is None:
            unplaced.append(module)
            continue
        for target in imports(path):
            if target == "__version__":
                continue
            theirs = layer_of(target, table)
            if theirs is None:
                unplaced.append(target)
            elif theirs < own:
                upward.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    assert not unplaced, f"modules missing from CONTRIBUTING.md's layer table: {sorted(set(unplaced))}"
    assert not upward, "imports that point up:\n" + "\n".join(sorted(upward))


def test_the_layer_check_catches_an_upward_import():
    table = layers()
    assert layer_of("engine.run_dir", table) > layer_of("registry", table)  # so engine -> registry would be caught
    assert layer_of("config.loading", table) < layer_of("config.sections", table)


def test_no_source_file_grows_past_500_lines_and_the_engine_stays_under_450():
    sizes = {
        path.relative_to(PACKAGE): len(path.read_text(encoding="utf-8").splitlines()) for path in PACKAGE.rglob("*.py")
    }
    assert {str(path): n for path, n in sizes.items() if n > 500} == {}
    assert sizes[Path("engine/engine.py")] < 450
