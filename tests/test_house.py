"""The house rules a newcomer relies on (docs/design.md §7): small modules and functions, no import
circles, no ``assert`` doing a check that ``python -O`` would strip, no citations of documents that
are not in the repository."""
import ast
import re

import pytest

from pipeline.core import parts

from conftest import ROOT

SOURCES = sorted([*(ROOT / "pipeline").rglob("*.py"), ROOT / "Main_Distill.py", ROOT / "Main_Diffusion.py",
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
    return {m: parts.imports(m) for m in parts.modules()}


def test_no_import_circles_between_pipeline_modules():
    graph = _pipeline_imports()

    def reaches(start, target, seen):
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    circles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not circles, f"modules on an import circle: {circles}"



def test_every_pipeline_module_has_a_part_and_no_part_imports_upwards():
    unplaced = [m for m in parts.modules() if parts.part_of(m) is None]
    assert not unplaced, f"place these modules in pipeline/core/parts.py PARTS: {unplaced}"
    assert not parts.misplaced(), f"move these modules into their part's folder: {parts.misplaced()}"
    wrong = parts.upward_imports({m: parts.imports(m) for m in parts.modules()})
    assert not wrong, "imports against the direction of the layers: " + "; ".join(wrong)


def test_the_direction_rule_catches_a_teacher_module_reaching_into_the_students():
    graph = {m: parts.imports(m) for m in parts.modules()}
    graph["rnet_files"] = graph["rnet_files"] | {"student_d"}  # the tangle this rule was written against
    assert parts.upward_imports(graph) == ["rnet_files (teacher) imports student_d (students)"]


def test_imports_are_read_across_the_folders():
    # relative imports of a sibling, of another part's module and of a name inside it all count
    assert parts.imports("rnet_files") == {"atomic", "checksums", "jsonfile", "errors", "rnet"}
    assert {"student_d", "teachers", "report"} <= parts.imports("evaluate")


def test_the_folder_rule_catches_a_module_filed_in_another_parts_folder(monkeypatch):
    moved = dict(parts.PARTS)
    moved["core"] = (moved["core"][0], tuple(m for m in moved["core"][1] if m != "errors"))
    moved["teacher"] = (moved["teacher"][0], (*moved["teacher"][1], "errors"))
    monkeypatch.setattr(parts, "PARTS", moved)
    assert parts.misplaced() == ["errors: in pipeline/core, listed in teacher"]


def test_a_module_name_used_in_two_parts_is_refused(tmp_path, monkeypatch):
    for part in ("core", "train"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "losses.py").write_text('"""A module."""\n')
    monkeypatch.setattr(parts, "PACKAGE", tmp_path)
    with pytest.raises(ValueError, match=r"repeat across the parts: \['losses'\]"):
        parts.files()


def test_docs_modules_md_is_made_from_the_docstrings():
    assert (ROOT / "docs" / "modules.md").read_text() == parts.markdown(), \
        "regenerate it: python -m pipeline.core.parts > docs/modules.md"
    assert all(parts.summary(path) for path in (ROOT / "pipeline").rglob("*.py")), "every module opens with a docstring"
