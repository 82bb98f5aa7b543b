"""The packages form layers: a module imports only from layers below its own (or from its own package).

    base           config, console, raylib, storage, metrics, presets; then tracking (on storage)
    data < model < verify < infer < artifact < {train, scoring, serving} < {demo, stack} < cli

Every import counts, also those inside functions (where a cycle would otherwise hide), and front ends
do not import each other: what scoring and serving share lives below both.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "medisee"

LAYERS = [
    {"config", "console", "raylib", "storage", "metrics", "presets"},
    {"tracking"},
    {"data", "doctor"},
    {"model"},
    {"verify"},
    {"infer"},
    {"artifact"},
    {"train", "scoring", "serving"},
    {"demo", "stack"},
    {"cli"},
]
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    """`medisee.scoring.stages` -> `scoring`; `medisee.cli` -> `cli`."""
    return module.split(".")[1]


def imported_units(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, unit) of every `medisee.*` import anywhere in a module, relative imports excluded."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, unit_of(a.name)) for a in node.names if a.name.startswith("medisee.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "medisee":  # from medisee import storage, tracking
                found += [(node.lineno, a.name) for a in node.names]
            elif node.module.startswith("medisee."):
                found.append((node.lineno, unit_of(node.module)))
    return found


def modules() -> list[tuple[str, Path]]:
    return [
        (".".join(("medisee", *path.relative_to(PACKAGE).with_suffix("").parts)), path)
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def test_every_unit_has_a_layer():
    units = {unit_of(name) for name, _ in modules() if name != "medisee.__init__"}
    assert units <= set(LAYER_OF), f"give these a layer: {sorted(units - set(LAYER_OF))}"


def test_no_module_imports_upward_or_sideways():
    wrong = []
    for name, path in modules():
        if name == "medisee.__init__":
            continue
        own = unit_of(name)
        for line, unit in imported_units(ast.parse(path.read_text(), str(path))):
            if unit != own and LAYER_OF.get(unit, len(LAYERS)) >= LAYER_OF[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {unit}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_walk_sees_imports_inside_functions():
    tree = ast.parse(
        "def f():\n    from medisee.serving.app import build\n    from medisee import tracking\n"
    )
    assert imported_units(tree) == [(2, "serving"), (3, "tracking")]
