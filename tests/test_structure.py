"""The layout's rules, read from the source (no imports run): no stage script imports another stage, ``utils``
never imports a stage, no import circle among ``utils`` modules (lazy imports inside functions included), no
two public ``utils`` names alike, and the README's Layout lists every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = {"finetune", "prepare_data", "generate", "export_hf", "export_state_dict", "apply_delta", "quantize",
          "serve"}


def python_files(root: Path) -> list[Path]:
    skip = {".venv", "tests", ".git", "__pycache__", "bench"}  # benchmarks drive the stages from outside
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (at any depth: lazy imports count), with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            # ``from utils import forward`` imports the module utils.forward
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def stage_import_problems(root: Path) -> list[str]:
    """An import of a stage script from a stage script, from utils, or from any other script of the suite."""
    problems = []
    for path in python_files(root):
        rel = path.relative_to(root).as_posix()
        hits = {(line, mod.split(".")[0]) for line, mod in imported_modules(path)}
        problems += [f"{rel}:{line} imports the stage {top}" for line, top in sorted(hits)
                     if top in STAGES and (root / f"{top}.py").is_file()]
    return problems


def utils_graph(root: Path) -> dict[str, set[str]]:
    modules = {module_name(root, p): p for p in (root / "utils").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for _, mod in imported_modules(path):
            # the deepest known module named (``utils.weights.merge`` for ``from utils.weights.merge import x``)
            while mod and mod not in modules:
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not (modules[mod].name == "__init__.py"):
                deps.add(mod)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_stage_imports_a_stage():
    assert stage_import_problems(REPO) == []


def test_the_stage_import_rule_catches_a_breaking_fixture(tmp_path):
    (tmp_path / "finetune.py").write_text("def main():\n    pass\n")
    (tmp_path / "export_hf.py").write_text("def main():\n    from finetune import main as m\n")
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "helper.py").write_text("import os\nimport finetune\n")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "tool.py").write_text("import json\n")
    assert stage_import_problems(tmp_path) == ["export_hf.py:2 imports the stage finetune",
                                               "utils/helper.py:2 imports the stage finetune"]


def test_no_import_circle_among_utils_modules():
    assert cycles(utils_graph(REPO)) == []


def test_the_circle_check_finds_a_lazy_circle(tmp_path):
    pkg = tmp_path / "utils" / "weights"
    pkg.mkdir(parents=True)
    (tmp_path / "utils" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from utils.weights.b import x\n")
    (pkg / "b.py").write_text("def x():\n    from utils.weights import a\n")
    (tmp_path / "utils" / "c.py").write_text("from utils.weights.a import x\n")
    assert cycles(utils_graph(tmp_path)) == [["utils.weights.a", "utils.weights.b", "utils.weights.a"]]


def public_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")}


def test_no_two_public_utils_functions_or_classes_share_a_name():
    owners: dict[str, list[str]] = {}
    for path in sorted((REPO / "utils").rglob("*.py")):
        for name in public_names(path):
            owners.setdefault(name, []).append(path.relative_to(REPO).as_posix())
    assert {n: o for n, o in owners.items() if len(o) > 1} == {}


def layout_paths(readme: str) -> set[str]:
    """The files the README's Layout tree names, as paths (a name indented under ``folder/`` is inside it)."""
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    tree = layout.split("```", 2)[1]
    paths, stack = set(), []
    for line in tree.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        stack = stack[:depth] + [name]
        if name.endswith(".py"):
            paths.add("".join(stack))
    return paths


def test_readme_layout_lists_every_module():
    listed = layout_paths((REPO / "README.md").read_text(encoding="utf-8"))
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "utils").rglob("*.py") if p.name != "__init__.py"}
    stages = {p.name for p in REPO.glob("*.py")}
    scripts = {p.relative_to(REPO).as_posix() for p in [*(REPO / "scripts").glob("*.py"), *(REPO / "eval").glob("*.py")]}
    assert sorted((modules | stages | scripts) - listed) == []
    assert sorted(listed - (modules | stages | scripts)) == []


def test_layout_tree_reading():
    readme = "## Layout\n```\nrun.py  x\nutils/\n  a.py   y\n  sub/\n    b.py  z\nscripts/\n  c.py\n```\n## Next\n"
    assert layout_paths(readme) == {"run.py", "utils/a.py", "utils/sub/b.py", "scripts/c.py"}


@pytest.mark.parametrize("path", [p.relative_to(REPO).as_posix() for p in python_files(REPO)
                                  if p.parent == REPO or p.parent.name in ("scripts", "eval")])
def test_scripts_run_from_the_repository_root(path):
    """Every script runs as ``python PATH`` from the root and finds ``utils``: top-level stages by Python's own
    path rule; scripts in sub-folders (scripts/, eval/) put the root on sys.path themselves, the one way chosen."""
    text = (REPO / path).read_text(encoding="utf-8")
    if "/" in path and "utils" in text:
        assert "sys.path.insert(0, str(Path(__file__).resolve().parents[1]))" in text, path


def test_every_slow_test_says_why_it_cannot_be_smaller():
    """The slow tiers are where CI's minutes go: each test in them says why in its docstring."""
    silent = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            marks = {d.attr for d in node.decorator_list if isinstance(d, ast.Attribute)}
            if marks & {"slow", "multiprocess"} and not ast.get_docstring(node):
                silent.append(f"{path.name}::{node.name}")
    assert silent == []
