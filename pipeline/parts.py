"""The package's architecture as data (docs/design.md §7): the part every module belongs to, the parts each part may
import, and docs/modules.md, the module table made from the modules' own docstrings
(``python -m pipeline.parts > docs/modules.md``; a test keeps it current and checks the import direction).

Nothing here is imported by the pipeline; the modules are read as text, never imported."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent

# part -> (what it is, its modules), lowest first: a part imports only the parts before it in MAY_IMPORT.
PARTS = {
    "core": ("configuration, errors, files, processes: what every part uses",
             ("errors", "config_keys", "config", "atomic", "jsonfile", "checksums", "cpu", "runtime", "distributed",
              "launch", "stop_request", "checkpoint", "run_record", "images", "parts", "__init__")),
    "teacher": ("the pretrained teacher, its DDIM chain and its rectified form (the RNet and its ring)",
                ("teachers", "trajectory", "spaces", "film", "lora", "rnet", "ring", "rnet_files")),
    "data": ("the dataset images and the offline teacher data: codecs, shards, manifest, the stages that write them",
             ("datasets", "quant", "codec", "code_layout", "npz_zstd", "store", "teacher_data", "generate", "verify",
              "reference_layout")),
    "students": ("the one-step students: D, its 1-bit copy B, the binarizers, the packed B file",
                 ("students", "binary", "student_b", "packed", "student_folders")),
    "train": ("the shared training loop, its losses and terms, the training stages",
              ("trainer", "student_trainer", "losses", "feature_losses", "adversarial", "distribution_matching",
               "d_outputs", "pretrain", "rectify", "train_d", "binarize")),
    "eval": ("metrics, reports, samples and the Python API",
             ("fid", "metrics", "report", "latent_walk", "api", "evaluate", "teacher_eval", "sample")),
    "cli": ("the command line: modes, keys, exit statuses", ("cli",)),
}
MAY_IMPORT = {
    "core": (),
    "teacher": ("core",),
    "data": ("core", "teacher"),
    "students": ("core", "teacher"),
    "train": ("core", "teacher", "data", "students"),
    "eval": ("core", "teacher", "data", "students"),
    "cli": ("core", "teacher", "data", "students", "train", "eval"),
}


def part_of(module: str):
    """The part ``module`` (a name in ``pipeline``) belongs to, or None when it is not placed."""
    return next((part for part, (_, modules) in PARTS.items() if module in modules), None)


def modules() -> list:
    return sorted(path.stem for path in PACKAGE.glob("*.py"))


def imports(module: str) -> set:
    """The pipeline modules ``module`` imports, at any level (functions included)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found |= {node.module.partition(".")[2]} if "." in node.module else {a.name for a in node.names}
    return {name.partition(".")[0] for name in found}


def upward_imports(graph: dict) -> list:
    """'a (part) imports b (part)' for every import in ``graph`` ({module: imported modules}) against MAY_IMPORT."""
    return sorted(f"{m} ({part_of(m)}) imports {i} ({part_of(i)})" for m, found in graph.items() for i in found
                  if part_of(i) not in (*MAY_IMPORT[part_of(m)], part_of(m)))


def summary(module: str) -> str:
    """The first paragraph of a module's docstring, on one line."""
    doc = ast.get_docstring(ast.parse((PACKAGE / f"{module}.py").read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")


def markdown() -> str:
    """docs/modules.md: the parts in import order, each with its modules and their docstrings' first paragraphs."""
    lines = ["# Modules of `pipeline/`", "",
             "Made from the modules' docstrings and the part map in `pipeline/parts.py` by "
             "`python -m pipeline.parts > docs/modules.md`; a test keeps it current. A part imports only the parts "
             "listed beside it (tests/test_house.py checks every import).", ""]
    for part, (what, members) in PARTS.items():
        may = ", ".join(MAY_IMPORT[part]) or "nothing of the package"
        lines += ["", f"## {part}: {what}", "", f"Imports {may}.", "", "| module | what it holds |", "|---|---|"]
        lines += [f"| `{m}.py` | {summary(m)} |" for m in members if m != "__init__"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
