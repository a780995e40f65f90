"""The package layering, read from the imports themselves (every ``import`` statement of
every module, those inside functions too): a package imports only packages below it, so
no import runs upward and no cycle can form between packages (docs/ARCHITECTURE.md)."""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "ditq"
LAYERS = (
    ("errors", "version"),
    ("io",),
    ("quant",),
    ("models",),
    ("diffusion",),
    ("calib",),
    ("kernels",),
    ("pipeline",),
    ("methods",),
    ("api",),
    ("eval", "distributed"),
    ("cli",),
    ("__main__", "__init__"),
)
"""Bottom to top. ``quant`` (formats: specs, quantizers, observers, packing, quantized
layers) sits under everything that has a workflow; ``__init__`` is the package's front
door (``ditq.quantize``, ``ditq.save``, ``ditq.load_model``)."""
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """``ditq.quant.spec`` → ``quant``; ``ditq`` → ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def ditq_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``ditq`` import in the file (``from ditq import x`` names
    the package itself)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "ditq" or node.module.startswith("ditq."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("ditq")]
    return found


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE.parent).with_suffix("")
        found.append((".".join(relative.parts).removesuffix(".__init__"), path))
    return found


def test_every_module_belongs_to_a_layer():
    units = {unit_of(name) for name, _ in modules()}
    assert units <= set(RANK), f"place {sorted(units - set(RANK))} in LAYERS"


@pytest.mark.parametrize("name, path", modules(), ids=[name for name, _ in modules()])
def test_no_import_runs_upward_or_sideways(name, path):
    unit = unit_of(name)
    for line, imported in ditq_imports(path):
        target = unit_of(imported)
        if target == unit:
            continue
        assert RANK[target] < RANK[unit], (
            f"{path.relative_to(SOURCE.parent)}:{line} imports {imported}: {unit} (layer "
            f"{RANK[unit]}) may only import layers below it, {target} is layer {RANK[target]}"
        )


def test_the_checker_sees_upward_and_inner_imports(tmp_path):
    """The rule is not vacuous: an upward import inside a function is found."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from ditq.cli import main\n    import ditq.methods.rtn\n")
    assert [target for _, target in ditq_imports(sample)] == ["ditq.cli", "ditq.methods.rtn"]
    assert RANK[unit_of("ditq.cli")] > RANK[unit_of("ditq.quant.spec")]
