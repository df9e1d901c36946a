"""The module layout's promises: what eval imports, and names importable from the package roots."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import sdrt_cli

TRAINING_MODULES = [
    "sdrt_cli.distill.trainer",
    "sdrt_cli.distill.students",
    "sdrt_cli.distill.sources",
    "sdrt_cli.distill.cache",
    "sdrt_cli.ensemble.predictor",
    "sdrt_cli.ensemble.finetune",
    "sdrt_cli.ensemble.build",
]


def test_eval_runtime_imports_no_training_code():
    probe = (
        "import sys\n"
        "import sdrt_cli.commands.evaluate, sdrt_cli.evaluate, sdrt_cli.ensemble.runtime\n"
        "from sdrt_cli.ensemble import load_ensemble, predictor_entropy\n"
        "from sdrt_cli.distill import load_adapters, read_manifest\n"
        f"print(sorted(set({TRAINING_MODULES!r}) & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("package", ["sdrt_cli.distill", "sdrt_cli.ensemble"])
def test_every_public_name_resolves_from_the_package_root(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        home = getattr(value, "__module__", None)
        assert home is None or not isinstance(value, type) or home.startswith(package), (name, home)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = module.not_a_name


def import_graph() -> dict[str, set[str]]:
    """sdrt_cli module -> the sdrt_cli modules it imports (module level and inside functions); a
    name taken from a package root counts as an import of the submodule that defines it."""
    root = Path(sdrt_cli.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = ("sdrt_cli", *path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    homes = {name: getattr(importlib.import_module(name), "_HOMES", {}) for name in modules if modules[name].name == "__init__.py"}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    home = homes.get(node.module, {}).get(alias.name)
                    deps |= {node.module, f"{node.module}.{alias.name}"}
                    if home:
                        deps.add(home if "." in home else f"{node.module}.{home}")
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that import each other, directly or through others."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        return seen

    reachable = {name: reach(name) for name in graph}
    groups = {frozenset({a} | {b for b in reachable[a] if a in reachable[b]}) for a in graph if a in reachable[a]}
    return [set(g) for g in groups]


def test_the_student_prompt_and_its_users_import_no_cycle():
    pipeline = ("sdrt_cli.prompting", "sdrt_cli.teacher_forcing", "sdrt_cli.evaluate", "sdrt_cli.traces", "sdrt_cli.distill", "sdrt_cli.ensemble")
    tangled = [sorted(group) for group in cycles(import_graph()) if any(m.startswith(pipeline) for m in group)]
    assert tangled == []


def test_the_core_never_imports_its_built_in_plugins():
    """Built-ins are plugins like any other: the core reaches them through the registries only."""
    graph_sources = Path(sdrt_cli.__file__).parent.rglob("*.py")
    offenders = []
    for path in graph_sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}:{node.lineno}" for name in names if name.split(".")[0] == "sdrt_plugins"]
    assert offenders == []


def test_one_did_you_mean_helper():
    roots = [Path(sdrt_cli.__file__).parent, Path(sdrt_cli.__file__).parent.parent / "plugins"]
    users = sorted(p.name for root in roots for p in root.rglob("*.py") if "get_close_matches" in p.read_text(encoding="utf-8"))
    assert users == ["errors.py"]
    from sdrt_cli.errors import did_you_mean

    assert did_you_mean("sdr", ["prompt", "sdrt"]) == "; did you mean 'sdrt'?"
    assert did_you_mean("docvq", ["docvqa"], sentence=True) == " Did you mean 'docvqa'?"
    assert did_you_mean("zzz", ["docvqa"]) == ""


def test_command_line_defaults_are_the_library_defaults():
    import typer.main

    from sdrt_cli.cli import build_app
    from sdrt_cli.distill import StudentSpec, TrainSettings
    from sdrt_cli.evaluate import GenerationSettings
    from sdrt_cli.traces import TraceSettings

    group = typer.main.get_command(build_app())

    def default(command: str, flag: str):
        (param,) = [p for p in group.commands[command].params if flag in p.opts]
        return param.default

    assert default("traces", "--pos") == TraceSettings().pos == StudentSpec().pos
    assert default("traces", "--max-new-tokens-step1") == TraceSettings().max_new_tokens_step1
    assert default("eval", "--max-new-tokens-step1") == GenerationSettings().max_new_tokens_step1
    assert default("distill", "--epochs") == TrainSettings().epochs
    assert default("traces", "--pack") == default("eval", "--pack")


def imported_modules(source: str, package: str) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports, at module level or inside
    functions, relative imports made absolute; ``from a import b`` counts as importing ``a`` and ``a.b``."""
    parts = package.split(".")
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(parts[: len(parts) + 1 - node.level] + ([node.module] if node.module else [])) if node.level else node.module
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def imports_the_command_layer(source: str, package: str) -> bool:
    return any(name == "sdrt_cli.commands" or name.startswith("sdrt_cli.commands.") for name in imported_modules(source, package))


def test_the_command_layer_check_sees_every_kind_of_import():
    assert imports_the_command_layer("def f():\n    from sdrt_cli.commands.ablate import run_grid\n", "sdrt_cli")
    assert imports_the_command_layer("from sdrt_cli import commands\n", "sdrt_cli")
    assert imports_the_command_layer("import sdrt_cli.commands.common as c\n", "sdrt_cli")
    assert imports_the_command_layer("from . import commands\n", "sdrt_cli")
    assert imports_the_command_layer("from ..commands import common\n", "sdrt_cli.calibration")
    assert not imports_the_command_layer("from sdrt_cli import stages\nfrom . import pure\n", "sdrt_cli.calibration")


def test_the_library_and_the_benchmarks_never_import_the_commands():
    """Commands are thin and call the library; the library (and a script using it) never reaches up
    into the command layer, so each helper a command and the library share lives in the library."""
    root = Path(sdrt_cli.__file__).parent
    sources = {}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if relative.parts[0] == "commands" or relative == Path("cli.py"):
            continue
        sources[path] = ".".join(("sdrt_cli", *relative.parent.parts))  # the package it sits in
    benchmarks = sorted((root.parent / "bench").glob("*.py"))
    sources.update({path: "bench" for path in benchmarks})
    assert root / "calibration" / "pools.py" in sources and benchmarks
    offenders = sorted(str(path.relative_to(root.parent)) for path, package in sources.items() if imports_the_command_layer(path.read_text(encoding="utf-8"), package))
    assert offenders == []
