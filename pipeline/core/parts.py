"""The package's architecture as data (docs/design.md §7): the part every module belongs to (its sub-package), the
parts each part may import, and docs/modules.md, the module table made from the modules' own docstrings
(``python -m pipeline.core.parts > docs/modules.md``; a test keeps it current and checks the import direction).

Nothing here is imported by the pipeline; the modules are read as text, never imported."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # pipeline/

# part (its folder under pipeline/; "cli" is the package's top) -> (what it is, its modules in reading order),
# lowest first: a part imports only the parts listed for it in MAY_IMPORT.
PARTS = {
    "core": ("configuration, errors, files, processes: what every part uses",
             ("errors", "config_keys", "config", "atomic", "jsonfile", "checksums", "cpu", "runtime", "distributed",
              "launch", "stop_request", "checkpoint", "run_record", "images", "parts")),
    "teacher": ("the pretrained teacher, its DDIM chain and its rectified form (the RNet and its ring)",
                ("teachers", "trajectory", "spaces", "film", "lora", "rnet", "ring", "rnet_files")),
    "data": ("the dataset images and the offline teacher data: codecs, shards, manifest, the stages that write them",
             ("datasets", "quant", "codec", "code_layout", "npz_zstd", "store", "teacher_data", "generate", "verify",
              "reference_layout")),
    "students": ("the one-step students: D, its 1-bit copy B, the binarizers, the packed B file",
                 ("student_d", "binary", "student_b", "packed", "student_folders")),
    "train": ("the shared training loop, its losses and terms, the training stages",
              ("trainer", "student_trainer", "losses", "feature_losses", "adversarial", "distribution_matching",
               "d_outputs", "pretrain", "rectify", "train_d", "binarize")),
    "evaluation": ("metrics, reports, samples and the Python API",
                   ("fid", "metrics", "report", "latent_walk", "api", "evaluate", "teacher_eval", "sample")),
    "cli": ("the command line: modes, keys, exit statuses (the package's top)", ("cli",)),
}
MAY_IMPORT = {
    "core": (),
    "teacher": ("core",),
    "data": ("core", "teacher"),
    "students": ("core", "teacher"),
    "train": ("core", "teacher", "data", "students"),
    "evaluation": ("core", "teacher", "data", "students"),
    "cli": ("core", "teacher", "data", "students", "train", "evaluation"),
}
TOP = "cli"  # the part whose modules sit at the top of the package


def folder_of(part: str) -> Path:
    return PACKAGE if part == TOP else PACKAGE / part


def files() -> dict:
    """{module name: its file} for every module of the package, package ``__init__`` files left out (their names
    repeat; they hold a docstring only). Module names are unique across the parts, so the map and the docs can name a
    module by its file name alone."""
    paths = [path for path in sorted(PACKAGE.rglob("*.py")) if path.stem != "__init__"]
    found = {path.stem: path for path in paths}
    if len(found) != len(paths):
        repeated = sorted({p.stem for p in paths if sum(q.stem == p.stem for q in paths) > 1})
        raise ValueError(f"module names repeat across the parts: {repeated}; rename one of each")
    return found


def modules() -> list:
    return sorted(files())


def part_of(module: str):
    """The part ``module`` is listed in, or None when it is not placed."""
    return next((part for part, (_, members) in PARTS.items() if module in members), None)


def misplaced() -> list:
    """'module: in folder, listed in part' for every module whose file is not in its part's folder."""
    return sorted(f"{m}: in {path.parent.relative_to(PACKAGE.parent)}, listed in {part_of(m)}"
                  for m, path in files().items() if part_of(m) and path.parent != folder_of(part_of(m)))


def _package_of(path: Path) -> list:
    return list(path.parent.relative_to(PACKAGE).parts)


def _target(base: list, name: str) -> list:
    """The module names ``from <base> import name`` brings in: name itself when base is a package, else base's."""
    where = PACKAGE.joinpath(*base)
    return [name] if (where / f"{name}.py").is_file() or (where / name).is_dir() else base[-1:]


def imports(module: str) -> set:
    """The pipeline modules ``module`` imports, at any level (functions included)."""
    path = files()[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = _package_of(path)[:len(_package_of(path)) - node.level + 1]
        elif node.module and node.module.split(".")[0] == "pipeline":
            base = []
            node = ast.ImportFrom(module=node.module.partition(".")[2] or None, names=node.names, level=0)
        else:
            continue
        base = base + (node.module.split(".") if node.module else [])
        for alias in node.names:
            found.update(_target(base, alias.name))
    return found & set(files())


def upward_imports(graph: dict) -> list:
    """'a (part) imports b (part)' for every import in ``graph`` ({module: imported modules}) against MAY_IMPORT."""
    return sorted(f"{m} ({part_of(m)}) imports {i} ({part_of(i)})" for m, found in graph.items() for i in found
                  if part_of(i) not in (*MAY_IMPORT[part_of(m)], part_of(m)))


def summary(path: Path) -> str:
    """The first paragraph of a module's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")


def markdown() -> str:
    """docs/modules.md: the parts in import order, each with its folder, its modules and their docstrings."""
    lines = ["# Modules of `pipeline/`", "",
             "Made from the modules' docstrings and the part map in `pipeline/core/parts.py` by "
             "`python -m pipeline.core.parts > docs/modules.md`; a test keeps it current. Each part but cli "
             "(the package's top) is a folder of `pipeline/` and imports only the parts listed beside it "
             "(tests/test_house.py checks every import).", ""]
    paths = files()
    for part, (what, members) in PARTS.items():
        folder = folder_of(part).relative_to(PACKAGE.parent)
        may = ", ".join(MAY_IMPORT[part]) or "nothing of the package"
        lines += ["", f"## {part}: {what}", "", f"`{folder}/`. Imports {may}.", "",
                  "| module | what it holds |", "|---|---|"]
        lines += [f"| `{m}.py` | {summary(paths[m])} |" for m in members if m in paths]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
