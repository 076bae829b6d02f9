"""The package's layer order (pfedsam/__init__.py) holds for every import, lazy ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "custom" / "pfedsam"
LAYER = {"__init__": 0, "config": 1, "fileio": 1, "jobs": 1, "model": 2, "data": 2, "train": 3, "export": 4,
         "flare": 5, "cli": 6}
HEAVY = {"torch", "nvflare", "onnx", "onnxruntime", "segment_anything", "monai"}


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``; relative imports resolved inside pfedsam."""
    package = ["pfedsam", *path.relative_to(PACKAGE).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module is None:  # "from . import x": x may be a module of that package
                out += [(node.lineno, f"{module}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, module))
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    own = _part(path)
    for line, module in _imports(path):
        parts = module.split(".")
        if parts[0] == "pfedsam" and len(parts) > 1 and parts[1] in LAYER:
            assert LAYER[parts[1]] <= LAYER[own], f"{path.name}:{line} ({own}) imports {module} from a higher layer"
        if parts[0] == "nvflare":
            assert own == "flare", f"{path.name}:{line}: only pfedsam.flare imports nvflare"
        if LAYER[own] <= 1:
            assert parts[0] not in HEAVY, f"{path.name}:{line}: layer-1 module {own} imports {module}"


def test_the_table_covers_the_package():
    assert {_part(p) for p in MODULES} == set(LAYER)
