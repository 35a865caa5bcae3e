"""The packages' layering, read from the import graph (every import, module-level or inside a
function): each layer imports only itself and the layers below it, no two modules import each
other even indirectly, the toy task is a leaf that only the front ends import, the ground truth
imports nothing of the fast paths, and the configuration loads without torch. ARCHITECTURE.md draws the same layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("motab_kernels", "motab")

# Lowest first. A module may import modules of its own layer and of the layers below, never above.
LAYERS = [
    ("kernels", ("motab_kernels",)),
    ("configuration and the toy task", ("motab.config", "motab.runs", "motab.toy")),
    ("models on the paged cache", ("motab.models", "motab.graphs", "motab.profiling", "motab.tiny")),
    ("rollout", ("motab.monitor", "motab.steps", "motab.policy", "motab.engine", "motab.backends")),
    (
        "pipeline",
        (
            "motab.losses",
            "motab.checkpoint",
            "motab.trainer",
            "motab.data",
            "motab.evaluate",
            "motab.plots",
            "motab.sft",
            "motab.synthesis",
        ),
    ),
    ("front ends", ("motab.cli", "motab.demo", "motab.integrations")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = all_modules()


def all_imports(name: str) -> set[str]:
    """Every module ``name`` imports ("from a import b" counts as a.b when a.b is one of our
    modules, else as a)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            }
    return found - {name}


def imports_of(name: str) -> set[str]:
    """The modules of our packages that ``name`` imports."""
    return {t for t in all_imports(name) if t.split(".")[0] in PACKAGES}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name: str) -> int | None:
    """Index in LAYERS of the module's layer (the longest matching prefix); None for the bare
    ``motab`` package, which holds nothing but its version."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def test_every_module_has_a_layer():
    assert [name for name in MODULES if layer_of(name) is None] == ["motab"]
    assert GRAPH["motab"] == set()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name):
    if name == "motab":
        return
    upward = sorted(t for t in GRAPH[name] if t != "motab" and layer_of(t) > layer_of(name))
    names = [layer for layer, _ in LAYERS]
    assert not upward, f"{name} ({names[layer_of(name)]}) imports from higher layers: " + ", ".join(
        f"{t} ({names[layer_of(t)]})" for t in upward
    )


def test_no_import_cycles():
    state: dict[str, str] = {}

    def visit(name, path):
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " → ".join(path[path.index(target) :] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])


def test_the_toy_task_is_a_leaf():
    for name in MODULES:
        if name.startswith("motab.toy"):
            outside = sorted(t for t in GRAPH[name] if not t.startswith("motab.toy"))
            assert not outside, f"{name} imports {outside}: the toy task must not depend on the pipeline"


def test_only_the_front_ends_know_the_toy_task():
    """The toy task is the demo's: below the front ends no module imports it (``motab.evaluate``
    grades its answers through a format the demo registers), nor does any module through another."""
    front_ends = dict(LAYERS)["front ends"]

    def reaches_toy(name, seen):
        for target in GRAPH[name] - seen:
            seen.add(target)
            if target.startswith("motab.toy") or (layer_of(target) is not None and reaches_toy(target, seen)):
                return True
        return False

    below = [name for name in MODULES if name != "motab" and not name.startswith(("motab.toy", *front_ends))]
    assert "motab.evaluate" in below
    knowing = sorted(name for name in below if reaches_toy(name, set()))
    assert not knowing, f"{knowing} import the toy task: only front ends (the demo, the CLI) may"


def test_the_reference_imports_no_fast_path():
    assert GRAPH["motab_kernels.reference"] == set()


def test_kernels_know_nothing_of_the_pipeline_or_transformers():
    for name in MODULES:
        if name.startswith("motab_kernels"):
            roots = {t.split(".")[0] for t in all_imports(name)}
            assert not roots & {"motab", "transformers"}, f"{name} imports {sorted(roots & {'motab', 'transformers'})}"


def test_configuration_loads_without_torch():
    code = "import sys, motab.config; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
