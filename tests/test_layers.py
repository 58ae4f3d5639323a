"""The imports run one way: every module of src/mergeforge imports only modules of its own layer
or of layers below it (docs/architecture.md, "Layers"). Read from the source, imports inside
functions and under TYPE_CHECKING included."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "mergeforge"

# Module prefix -> layer (the longest matching prefix wins); the table of docs/architecture.md.
LAYERS = {
    "mergeforge.errors": 1, "mergeforge.dtypes": 1, "mergeforge._lazy": 1, "mergeforge.cache": 1,
    "mergeforge.tasks": 2,
    "mergeforge.checkpoint": 3, "mergeforge.tokenizer": 3,
    "mergeforge.methods.registry": 4, "mergeforge.methods.params": 4, "mergeforge.methods.kernels": 4,
    "mergeforge.methods.__init__": 4,  # the package itself: the registry's loader of the built-in modules
    "mergeforge.calibration": 5,
    "mergeforge.methods": 6,
    "mergeforge.engine": 7,
    "mergeforge.evaluate": 8, "mergeforge.zoo": 8, "mergeforge.bench": 8, "mergeforge.demo": 8, "mergeforge.moe": 8, "mergeforge.lora": 8, "mergeforge.analysis": 8,
    "mergeforge.evolve": 8,
    "mergeforge.federated": 8, "mergeforge.config_file": 8,
    "mergeforge.cli": 9, "mergeforge.__main__": 9, "mergeforge": 9,
}


def layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def module_name(path: Path) -> str:
    """``mergeforge.engine.plan``; a package's own module keeps its ``__init__``."""
    return ".".join(path.relative_to(SOURCE.parent).with_suffix("").parts)


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            package = SOURCE.parent / node.module.replace(".", "/")
            names.add(f"{node.module}.__init__" if (package / "__init__.py").is_file() else node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names if (SOURCE.parent / node.module.replace(".", "/")
                                                                                 / f"{alias.name}.py").is_file()}
    return {name for name in names if name.split(".")[0] == "mergeforge"}


def test_every_import_goes_to_the_same_layer_or_below():
    upward = []
    for path in sorted(SOURCE.rglob("*.py")):
        module = module_name(path)
        for imported in imports_of(path):
            if imported != "mergeforge.__init__" and layer(imported) > layer(module):
                upward.append(f"{module} (layer {layer(module)}) imports {imported} (layer {layer(imported)})")
    assert not upward, "\n".join(upward)


def test_every_module_has_a_layer_of_its_own():
    # A new top-level module or package must be given its layer above (only the package's own
    # __init__ falls to the catch-all entry).
    for path in SOURCE.rglob("*.py"):
        module = module_name(path)
        prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
        assert prefix != "mergeforge" or module == "mergeforge.__init__", module
