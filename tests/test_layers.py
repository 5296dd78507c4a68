"""The layers the folders show, checked by reading every module's imports (ast: nothing is imported or run).

0. what everything uses: errors, input files, the embedded models, backends, the dedup engine, the console;
1. the pipelines and the store;
2. what runs on them: the library's runs (datagen/runs.py), export, report, evaluation, the e2e loop, jobs, training;
3. the clients on top: the CLI (datagen/cli/: app, options, commands) and the viewer (datagen/ui/).

A module may import its own layer and those below, never one above; no module below the CLI imports typer or the
CLI. Imports inside functions and under `if TYPE_CHECKING:` count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("datagen", "pipelines", "storage", "train")

LAYERS: list[tuple[str, ...]] = [
    ("datagen.errors", "datagen.jsonl", "datagen.models", "datagen.backends", "datagen.dedup", "datagen.console", "datagen.sigterm",
     "datagen.degeneration"),
    ("pipelines", "storage", "datagen.generate", "datagen.cost"),
    ("datagen.runs", "datagen.dedup_store", "datagen.export", "datagen.export_config", "datagen.card", "datagen.report", "datagen.evaluate", "datagen.e2e",
     "datagen.e2e_report", "datagen.jobs", "datagen.shards", "train"),
    ("datagen.cli", "datagen.ui"),
]  # fmt: skip
"""Module prefixes by layer, bottom first; a module belongs to its longest matching prefix."""
PACKAGE_LAYER = 2
"""datagen/__init__.py exports the library (lazily, by name), so it sits with it."""
CLIENT_ONLY = ("typer", "datagen.cli")
"""Imported only by the top layer."""


def layer_of(module: str) -> int | None:
    if module == "datagen":
        return PACKAGE_LAYER
    best: tuple[int, int] | None = None
    for number, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (number, len(prefix))
    return None if best is None else best[0]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement of the file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from datagen import runs` imports the module datagen.runs; `from datagen.x import name` imports datagen.x.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    """Every import of a higher layer, or of a client-only module below the top, under the packages of `root`."""
    found = []
    top = len(LAYERS) - 1
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(root, path)
            own = layer_of(module)
            if own is None:
                found.append(f"{path.relative_to(root)}: module {module} is in no layer: add it to LAYERS")
                continue
            for line, imported in imports(path, module):
                target = layer_of(imported)
                if own < top and any(imported == name or imported.startswith(name + ".") for name in CLIENT_ONLY):
                    found.append(f"{path.relative_to(root)}:{line}: {module} (layer {own}) imports {imported}, a client-only module")
                elif target is not None and target > own and not _names_the_package(imported, target):
                    found.append(f"{path.relative_to(root)}:{line}: {module} (layer {own}) imports {imported} (layer {target})")
    return found


def _names_the_package(imported: str, target: int) -> bool:
    """`from datagen import __version__` names the package's own attribute, not a module of a higher layer."""
    return imported.startswith("datagen.__")


def test_no_module_imports_a_higher_layer():
    assert violations(REPO) == []


@pytest.mark.parametrize(
    "path, source, expected",
    [
        ("pipelines/bad.py", "from datagen.cli import app\n", "pipelines/bad.py:1: pipelines.bad (layer 1) imports datagen.cli.app, a client-only module"),
        ("storage/bad.py", "def f():\n    import typer\n", "storage/bad.py:2: storage.bad (layer 1) imports typer, a client-only module"),
        ("datagen/jobs/bad.py", "from datagen.cli.commands import dedup\n", "datagen/jobs/bad.py:1: datagen.jobs.bad (layer 2) imports datagen.cli.commands.dedup, a client-only module"),
        ("datagen/backends/bad.py", "from storage.store import open_engine\n", "datagen/backends/bad.py:1: datagen.backends.bad (layer 0) imports storage.store.open_engine (layer 1)"),
        ("pipelines/bad.py", "from ..datagen import runs\n", "pipelines/bad.py:1: pipelines.bad (layer 1) imports datagen.runs (layer 2)"),
        ("datagen/newthing.py", "x = 1\n", "datagen/newthing.py: module datagen.newthing is in no layer: add it to LAYERS"),
        ("datagen/cli/commands/run.py", "import typer\nfrom datagen.runs import Store\n", None),
        ("datagen/ui/app.py", "from datagen.runs import Store\n", None),
    ],
)
def test_the_checker_flags_a_lower_module_importing_a_higher_one(tmp_path, path, source, expected):
    """The check itself, on a synthetic tree: each bad import is named with its file and line; the top layer (today's
    datagen.cli.commands, tomorrow's datagen/cli/ package) and the viewer may import the library."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    file = tmp_path / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(source)
    assert violations(tmp_path) == ([] if expected is None else [expected])
