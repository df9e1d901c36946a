"""Built-in prompt packs: every TOML file shipped in ``sdrt_prompt_packs``."""

from __future__ import annotations

from importlib import resources

from sdrt_cli.hookspecs import hookimpl


@hookimpl
def register_prompt_packs(register):
    for item in sorted(resources.files("sdrt_prompt_packs").iterdir(), key=lambda p: p.name):
        if item.name.endswith(".toml"):
            register(item.name[: -len(".toml")], str(item))
