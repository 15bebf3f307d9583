"""The shape of the house: no import cycles among mupsweep modules (imports inside functions
count), every module says its one job in a docstring, and the low modules stay low."""

from __future__ import annotations

import ast
from pathlib import Path

import mupsweep

PACKAGE = Path(mupsweep.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), filename=str(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


def project_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Every mupsweep module `name` imports, anywhere in the file. Importing a.b.c also runs
    the packages a.b and a (their __init__), so those count as edges too, except the
    importer's own parent packages: Python has always initialized those first."""
    is_package = name in {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    package = name if is_package else name.rpartition(".")[0]
    ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in names:
            while target:
                if target in known and target != name and target not in ancestors:
                    targets.add(target)
                target = target.rpartition(".")[0]
    return targets


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: project_imports(name, tree, known) for name, tree in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_cycle():
    """The check has teeth: a made-up graph with a loop is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_every_module_states_its_job():
    missing = [name for name, tree in modules().items()
               if not (ast.get_docstring(tree) or "").strip()]
    assert not missing, f"modules without a docstring: {missing}"


def test_low_modules_import_nothing_of_the_project():
    graph = import_graph()
    for name in ("mupsweep.errors", "mupsweep.util", "mupsweep.roles"):
        assert graph.get(name, set()) <= {"mupsweep"}, (name, graph.get(name))


def private_imports(mods: dict[str, ast.Module]) -> list[str]:
    """`from mupsweep.x import _name` and `x._name` on an imported project module, from any
    other module: a private name is its module's own business."""
    known = set(mods)
    found = []
    for name, tree in mods.items():
        imported_as: dict[str, str] = {}  # local name -> the project module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = name.split(".")[: -node.level]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in known:
                        imported_as[alias.asname or alias.name] = full
                    elif base in known and base != name and _is_private(alias.name):
                        found.append(f"{name} imports {base}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known and alias.asname:
                        imported_as[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_as and _is_private(node.attr)
                    and imported_as[node.value.id] != name):
                found.append(f"{name} uses {imported_as[node.value.id]}.{node.attr}")
    return sorted(set(found))


def _is_private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def test_no_private_name_crosses_a_module():
    found = private_imports(modules())
    assert not found, "private names used across modules: " + "; ".join(found)


def test_private_name_finder_finds_one():
    """The check has teeth: made-up modules that reach into each other's privates."""
    mods = {"p.a": ast.parse("def _helper(): pass"),
            "p.b": ast.parse("from p.a import _helper"),
            "p.c": ast.parse("from p import a\na._helper()"),
            "p.d": ast.parse("from p.a import helper")}
    assert private_imports(mods) == ["p.b imports p.a._helper", "p.c uses p.a._helper"]


# The layers of docs/design.md, top to bottom: a module imports only from its own layer or the
# layers below it. Every module has a place here, so a new module must be given one.
LAYERS = [
    ("entry", ["mupsweep.__main__", "mupsweep.cli", "mupsweep.cli_io", "mupsweep.launch"]),
    ("commands", ["mupsweep.demo", "mupsweep.validate", "mupsweep.coordcheck", "mupsweep.report",
                  "mupsweep.encode"]),
    ("transfer", ["mupsweep.transfer", "mupsweep.transfer_cost", "mupsweep.presets"]),
    ("sweep", ["mupsweep.sweep.*"]),
    ("training", ["mupsweep.train", "mupsweep.training", "mupsweep.training.*", "mupsweep.group*",
                  "mupsweep.batches", "mupsweep.train_images", "mupsweep.checkpoint", "mupsweep.metrics",
                  "mupsweep.progress_display", "mupsweep.images", "mupsweep.rundir",
                  "mupsweep.evaluation"]),
    # Storage URLs are read (and their passwords hidden) by the run directory, below training.
    ("storage", ["mupsweep.sweep.storage", "mupsweep.sweep.optuna_adapter"]),
    ("model", ["mupsweep.parametrize", "mupsweep.models", "mupsweep.models.*", "mupsweep.data",
               "mupsweep.array_files", "mupsweep.vae", "mupsweep.diffusion", "mupsweep.conditioning", "mupsweep.completep",
               "mupsweep.text_settings", "mupsweep.flops", "mupsweep.sample_quality"]),
    ("config", ["mupsweep.config", "mupsweep.config.*"]),
    ("base", ["mupsweep", "mupsweep.sweep", "mupsweep.errors", "mupsweep.util", "mupsweep.roles",
              "mupsweep.stopping", "mupsweep.drift", "mupsweep.plots", "mupsweep.vendor",
              "mupsweep.vendor.*"]),
]


def layer_of(module: str) -> int | None:
    """The layer index of `module` (0 = top); the most specific pattern wins, so
    sweep.storage sits in "storage" although sweep.* is "sweep"."""
    import fnmatch

    best = None
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if fnmatch.fnmatchcase(module, pattern):
                exact = "*" not in pattern
                if best is None or (exact and not best[1]) or (exact == best[1] and len(pattern) > best[2]):
                    best = (index, exact, len(pattern))
    return None if best is None else best[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        if here is None:
            out.append(f"{module} has no layer in LAYERS")
            continue
        for target in sorted(targets):
            there = layer_of(target)
            if there is not None and there < here:
                out.append(f"{module} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    return out


def test_imports_go_down_the_layers():
    found = layer_violations(import_graph())
    assert not found, "; ".join(found)


def test_layer_check_finds_an_upward_import():
    """The check has teeth: the config importing the training loop is refused."""
    graph = {"mupsweep.config.schema": {"mupsweep.train"}, "mupsweep.train": {"mupsweep.config"}}
    assert layer_violations(graph) == [
        "mupsweep.config.schema (config) imports mupsweep.train (training)"]


def test_model_files_know_nothing_of_mupsweeps_config():
    """The built-in models are built by keyword arguments, as a user's class is
    (`parametrize.builtin_args` is the one place a config becomes them): no model file
    imports the config, CompleteP or the caption settings."""
    graph = import_graph()
    config_side = ("mupsweep.config", "mupsweep.completep", "mupsweep.text_settings")
    found = [f"{module} imports {target}" for module, targets in sorted(graph.items())
             if module.startswith("mupsweep.models") for target in sorted(targets)
             if target.startswith(config_side)]
    assert not found, "; ".join(found)
