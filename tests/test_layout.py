"""The layout of issue 24: the support package pwopsd/ never imports a stage file (no cycles), and train.py reads
like CleanRL (its ``main`` near the top)."""
import ast

from conftest import ROOT

STAGES = {"data", "rollout", "teacher", "loss", "train", "evaluate", "diagnose"}


def imported_modules(path) -> set[str]:
    """Top-level names of every module ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant):
            out.add(str(node.args[0].value).split(".")[0])
    return out


def test_support_package_imports_no_stage_file():
    files = sorted((ROOT / "pwopsd").glob("*.py"))
    assert len(files) >= 5
    bad = {f.name: sorted(imported_modules(f) & STAGES) for f in files if imported_modules(f) & STAGES}
    assert bad == {}, f"pwopsd/ must not import stage files: {bad}"


def test_train_main_is_near_the_top():
    lines = (ROOT / "train.py").read_text().splitlines()
    assert next(i for i, line in enumerate(lines, 1) if line.startswith("def main(")) <= 350
