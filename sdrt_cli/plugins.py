"""The plugin manager: loads every ``sdrt`` entry point and collects what each plugin registers.

Built-in plugins live in ``sdrt_plugins`` and are declared as entry points in sdrt's own
pyproject, so they load exactly like a third-party package's plugins.  Tests register extra
plugins with :func:`register_plugin` (see the ``plugin`` fixture in ``tests/conftest.py``).
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from sdrt_cli import hookspecs
from sdrt_cli.errors import SdrtError
from sdrt_cli.registry import Registry

ENTRY_POINT_GROUP = "sdrt"
# Comma-separated distributions whose plugins load; empty = built-ins only (for debugging a broken
# environment, as llm's LLM_LOAD_PLUGINS).  Unset = every installed plugin.
LOAD_PLUGINS_ENV = "SDRT_LOAD_PLUGINS"

# hook name -> registry kind
KINDS = {
    "register_backbones": "backbone",
    "register_adapters": "adapter",
    "register_losses": "loss",
    "register_datasets": "dataset",
    "register_metrics": "metric",
    "register_prompt_packs": "prompt pack",
}


@dataclass
class PluginInfo:
    name: str
    version: str | None
    distribution: str | None
    registered: dict[str, list[str]] = field(default_factory=dict)


_pm: pluggy.PluginManager | None = None
_registries: dict[str, Registry] | None = None
_dist_of: dict[str, tuple[str, str]] = {}


def get_plugin_manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("sdrt")
        pm.add_hookspecs(hookspecs)
        _load_entry_points(pm)
        _pm = pm
    return _pm


def _allowed_distributions() -> set[str] | None:
    value = os.environ.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    return {name.strip().lower() for name in value.split(",") if name.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    # pluggy's own loader silently skips a second entry point with the same name; we name each
    # plugin "<distribution>.<entry point>" when needed so two packages never shadow each other.
    allowed = _allowed_distributions()
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            dist_name = dist.metadata["Name"]
            seen.add(dist_name.lower())
            if allowed is not None and dist_name != "sdrt" and dist_name.lower() not in allowed:
                continue
            name = ep.name if dist_name == "sdrt" else f"{dist_name}.{ep.name}"
            if pm.has_plugin(name):
                continue  # the same distribution is visible twice on sys.path
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must not hide which one it is
                raise SdrtError(f"plugin entry point {ep.name!r} of {dist_name!r} failed to load: {exc}") from exc
            pm.register(module, name=name)
            _dist_of[name] = (dist_name, dist.version)
    unknown = sorted((allowed or set()) - seen)
    if unknown:
        installed = ", ".join(sorted(seen - {"sdrt"})) or "none"
        raise SdrtError(
            f"{LOAD_PLUGINS_ENV} names {', '.join(repr(n) for n in unknown)}, which is not an installed sdrt "
            f"plugin distribution (installed: {installed})"
        )


def register_plugin(module: Any, name: str) -> None:
    """Register a plugin object at run time (tests, notebooks); registries are rebuilt."""
    get_plugin_manager().register(module, name=name)
    _reset_registries()


def unregister_plugin(name: str) -> None:
    pm = get_plugin_manager()
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin)
    _reset_registries()


def _reset_registries() -> None:
    global _registries
    _registries = None


def registries() -> dict[str, Registry]:
    global _registries
    if _registries is None:
        pm = get_plugin_manager()
        built: dict[str, Registry] = {}
        for hook_name, kind in KINDS.items():
            registry: Registry = Registry(kind)
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                plugin = impl.plugin_name

                def register(name, value, _plugin=plugin, _registry=registry):
                    _registry.add(name, value, _plugin)

                impl.function(register=register)
            built[kind] = registry
        _registries = built
    return _registries


def registry(kind: str) -> Registry:
    return registries()[kind]


def backbones() -> Registry:
    return registry("backbone")


def datasets() -> Registry:
    return registry("dataset")


def adapters() -> Registry:
    return registry("adapter")


def losses() -> Registry:
    return registry("loss")


def metrics() -> Registry:
    return registry("metric")


def prompt_packs() -> Registry:
    return registry("prompt pack")


def plugin_infos() -> list[PluginInfo]:
    """Every loaded plugin with its version and the names it registered, for ``sdrt plugins``."""
    pm = get_plugin_manager()
    infos: dict[str, PluginInfo] = {}
    for name, _plugin in pm.list_name_plugin():
        dist, version = _dist_of.get(name, (None, getattr(_plugin, "__version__", None)))
        infos[name] = PluginInfo(name=name, version=version, distribution=dist)
    for kind, reg in registries().items():
        for entry in reg.entries():
            infos[entry.plugin].registered.setdefault(kind, []).append(entry.name)
    # commands are added to the Typer app, not a registry; record them by asking each plugin
    for name, plugin in pm.list_name_plugin():
        hook = getattr(plugin, "register_commands", None)
        if hook is not None:
            infos[name].registered.setdefault("command", []).extend(_command_names(hook))
    return sorted(infos.values(), key=lambda i: i.name)


def _command_names(hook) -> list[str]:
    import typer

    probe = typer.Typer()
    hook(app=probe)
    names = [c.name or (c.callback.__name__ if c.callback else "?") for c in probe.registered_commands]
    names += [g.name or "?" for g in probe.registered_groups]
    return names
