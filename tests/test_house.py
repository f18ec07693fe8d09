"""The house rules a newcomer relies on (docs/design.md §7): small modules and functions, no import
circles, no ``assert`` doing a check that ``python -O`` would strip, no citations of documents that
are not in the repository."""
import ast
import re

import pytest

from conftest import ROOT

SOURCES = sorted([*(ROOT / "pipeline").glob("*.py"), ROOT / "Main_Distill.py", ROOT / "Main_Diffusion.py",
                  *(ROOT / "benchmarks").glob("*.py")])
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _tree(path):
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_modules_and_functions_are_small(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} has {length} lines"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_assert_outside_tests(path):
    asserts = [node.lineno for node in ast.walk(_tree(path)) if isinstance(node, ast.Assert)]
    assert not asserts, f"{path.name} uses assert on lines {asserts}; raise UserError or ValueError instead"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_citations_point_into_the_repository(path):
    text = path.read_text()
    assert not re.search(r"DESIGN §|research/|\.\./shared|seed 00\d", text), path.name
    for doc in re.findall(r"docs/[\w.]+\.md", text):
        assert (ROOT / doc).is_file(), f"{path.name} cites {doc}, which does not exist"


def _pipeline_imports():
    """{module: set of pipeline modules it imports at any level}."""
    graph = {}
    for path in (ROOT / "pipeline").glob("*.py"):
        imports = set()
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imports |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                imports |= {node.module.partition(".")[2]} if "." in node.module else {a.name for a in node.names}
        graph[path.stem] = {m.partition(".")[0] for m in imports}
    return graph


def test_no_import_circles_between_pipeline_modules():
    graph = _pipeline_imports()

    def reaches(start, target, seen):
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    circles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not circles, f"modules on an import circle: {circles}"
