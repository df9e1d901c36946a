"""Run configuration: ``--config FILE.toml`` with precedence flags > config file > defaults.

A config file holds option names as keys (dashes or underscores).  Top-level keys apply to every
command that has such an option; a ``[traces]``, ``[distill]``, ... table applies to that command
only and wins over top-level keys.  A key no command knows is an error naming the file and key.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from sdrt_cli.errors import SdrtError

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


def _all_option_names(ctx: click.Context) -> set[str]:
    root = ctx.find_root().command
    names: set[str] = set()

    def walk(cmd: click.Command) -> None:
        names.update(p.name for p in cmd.params if p.name)
        if isinstance(cmd, click.Group):
            for sub in cmd.commands.values():
                walk(sub)

    walk(root)
    return names


def resolve(ctx: click.Context, config_param: str = "config") -> dict[str, Any]:
    """Merge command-line flags, the ``--config`` file and defaults into one dict of options."""
    params = dict(ctx.params)
    config_path = params.get(config_param)
    if not config_path:
        return params
    raw = load_toml(Path(config_path))
    command = ctx.command.name or ""
    own = {p.name: p for p in ctx.command.params if p.name and p.name != config_param}
    everyone = _all_option_names(ctx)
    subcommands = set(ctx.find_root().command.commands) if isinstance(ctx.find_root().command, click.Group) else set()

    from_file: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in subcommands:
            continue
        k = _key(key)
        if k not in everyone:
            raise SdrtError(_unknown_key_message(config_path, key, everyone))
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
        if source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue
        param = own[name]
        try:
            if isinstance(value, list) and not param.multiple and param.nargs == 1:
                value = ",".join(str(v) for v in value)
            params[name] = param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise SdrtError(f"config file {config_path}: key {name!r} has a bad value {value!r}: {exc.message}") from None
    return params


def _unknown_key_message(path: Any, key: str, known: set[str], bare: str | None = None) -> str:
    close = difflib.get_close_matches(_key(bare or key), sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"config file {path}: unknown key {key!r}{hint}"
