"""Run configuration: ``--config FILE.toml`` with precedence flags > config file > defaults.

A config file holds option names as keys (dashes or underscores).  Top-level keys apply to every
command that has such an option; a ``[traces]``, ``[distill]``, ... table applies to that command
only and wins over top-level keys.  A key no command knows is an error naming the file and key.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

from sdrt_cli.errors import SdrtError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """Read a TOML file; a syntax error names the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SdrtError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SdrtError(f"{what} {path} cannot be read: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SdrtError(f"{what} {path} is not valid TOML: {exc}") from None


def _key(name: str) -> str:
    return name.replace("-", "_")


# Recent Typer releases (0.29 here) vendor their own copy of click (``typer._click``), whose classes
# are not the ``click`` package's, so contexts, groups and parameters are used by duck typing here.

def _subcommands(cmd: Any) -> dict[str, Any]:
    return dict(getattr(cmd, "commands", None) or {})


def _all_option_names(ctx: Any) -> set[str]:
    root = ctx.find_root().command
    names: set[str] = set()

    def walk(cmd: Any) -> None:
        names.update(p.name for p in cmd.params if p.name)
        for sub in _subcommands(cmd).values():
            walk(sub)

    walk(root)
    return names


def resolve(ctx: Any, config_param: str = "config") -> dict[str, Any]:
    """Merge command-line flags, the ``--config`` file and defaults into one dict of options."""
    params = dict(ctx.params)
    config_path = params.get(config_param)
    if not config_path:
        return params
    raw = load_toml(Path(config_path))
    command = ctx.command.name or ""
    own = {p.name: p for p in ctx.command.params if p.name and p.name != config_param}
    everyone = _all_option_names(ctx)
    subcommands = set(_subcommands(ctx.find_root().command))

    from_file: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in subcommands:
            continue
        k = _key(key)
        if k not in everyone:
            # a misspelt [command] table should suggest the command, not an option
            candidates = everyone | subcommands if isinstance(value, dict) else everyone
            raise SdrtError(_unknown_key_message(config_path, key, candidates))
        if k in own:
            from_file[k] = value
    section = raw.get(command)
    if isinstance(section, dict):
        for key, value in section.items():
            k = _key(key)
            if k not in own:
                raise SdrtError(_unknown_key_message(config_path, f"{command}.{key}", set(own), bare=key))
            from_file[k] = value

    for name, value in from_file.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        param = own[name]
        problem = _toml_type_problem(param, value)
        if problem:
            raise SdrtError(f"config file {config_path}: key {name!r} has a bad value {value!r}: {problem}")
        try:
            if isinstance(value, list) and not param.multiple and param.nargs == 1:
                value = ",".join(str(v) for v in value)
            # the same conversion (and callback) a command-line value goes through
            params[name] = param.process_value(ctx, value)
        except Exception as exc:  # click's BadParameter, from whichever copy of click is in use
            reason = getattr(exc, "message", None) or str(exc)
            raise SdrtError(f"config file {config_path}: key {name!r} has a bad value {value!r}: {reason}") from None
    return params


def _expected_scalar_type(param: Any) -> type | None:
    """int, float or bool when the option holds such values (or lists of them), else None."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)  # vendored-click Typer
    if annotation is not None:
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) in (list, tuple) and args:
            annotation = args[0]
        return annotation if annotation in (int, float, bool) else None
    click_type_name = getattr(getattr(param, "type", None), "name", "")  # the click package
    return {"integer": int, "integer range": int, "float": float, "float range": float, "boolean": bool}.get(click_type_name)


def _toml_type_problem(param: Any, value: Any) -> str | None:
    """TOML values are typed; converters would read true as 1 (or, in click, 2.5 as 2, and crash on
    a number for a flag).  Strings still go through the command-line parsing."""
    expected = _expected_scalar_type(param)
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict):
            return "expected a single value, not a table"
        if expected is bool and not isinstance(item, (bool, str)):
            return "expected true or false"
        if expected is int and isinstance(item, (bool, float)):
            return "expected an integer"
        if expected is float and isinstance(item, bool):
            return "expected a number"
    return None


def _unknown_key_message(path: Any, key: str, known: set[str], bare: str | None = None) -> str:
    hint = did_you_mean(_key(bare or key), sorted(known))
    return f"config file {path}: unknown key {key!r}{hint}"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def describe_differences(before: dict[str, Any], now: dict[str, Any], before_label: str, shown: int = 4) -> str:
    """``"a.b: 1 (store) vs 2 (now); ..."`` for the nested keys whose values differ."""
    a, b = _flatten(before), _flatten(now)
    diffs = [f"{k}: {a.get(k)!r} ({before_label}) vs {b.get(k)!r} (now)" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    more = f"; and {len(diffs) - shown} more" if len(diffs) > shown else ""
    return "; ".join(diffs[:shown]) + more
