"""The layout's two rules (issue 22), checked on the source so a later change cannot quietly
break them: the core never imports the faces, and a module over 400 lines says why."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rlpipe"
FACES = ("rlpipe.pipeline", "rlpipe.serve", "rlpipe.cli")
CORE_DIRS = ("training", "sampling", "testing")
MAX_LINES = 400


def core_modules() -> list[Path]:
    top = [p for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]  # __init__ offers rlpipe.run, the one face
    return top + [p for d in CORE_DIRS for p in (PACKAGE / d).rglob("*.py")]


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).parts[:-1])


def imported(source: str, package: str) -> set[str]:
    """Absolute names of every module a file of `package` imports, at top level or in a function."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_no_core_module_imports_a_face():
    offenders = {str(p.relative_to(PACKAGE.parent)): sorted(n for n in imported(p.read_text(), package_of(p)) if n.startswith(FACES))
                 for p in core_modules()}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_the_import_check_sees_relative_and_lazy_imports():
    # the rule above is only as good as imported(): a core file importing a face in each way
    source = "from ..pipeline import config\nfrom . import lora\ndef f():\n    import rlpipe.serve.app\n"
    names = imported(source, "rlpipe.training")
    assert {"rlpipe.pipeline.config", "rlpipe.training.lora", "rlpipe.serve.app"} <= names


def test_a_module_over_400_lines_says_why_at_its_top():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "400" not in doc:
            long[str(path.relative_to(PACKAGE.parent))] = lines
    assert not long, f"modules over {MAX_LINES} lines without a reason in their docstring: {long}"
