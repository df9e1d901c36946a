import pytest

from sdrt_cli.errors import RegistryCollisionError, UnknownNameError
from sdrt_cli.hookspecs import hookimpl
from sdrt_cli.plugins import backbones, datasets, get_plugin_manager, registry
from sdrt_cli.registry import Registry


def test_registry_unknown_name_lists_known_and_suggests():
    reg = Registry("backbone")
    reg.add("llava-next", object(), "builtin")
    reg.add("llava-next-tiny", object(), "builtin")
    with pytest.raises(UnknownNameError) as info:
        reg.get("llava-nxt")
    message = str(info.value)
    assert "unknown backbone 'llava-nxt'" in message
    assert "llava-next, llava-next-tiny" in message
    assert "Did you mean 'llava-next'?" in message


def test_registry_collision_names_both_plugins():
    reg = Registry("dataset")
    reg.add("docvqa", object(), "first-plugin")
    with pytest.raises(RegistryCollisionError, match="'first-plugin' and 'second-plugin'"):
        reg.add("docvqa", object(), "second-plugin")


def test_every_hook_has_a_one_line_docstring():
    from sdrt_cli import hookspecs

    names = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert set(names) == {
        "register_backbones",
        "register_adapters",
        "register_losses",
        "register_datasets",
        "register_prompt_packs",
        "register_commands",
    }
    for name in names:
        doc = getattr(hookspecs, name).__doc__
        assert doc and len(doc.strip().splitlines()) == 1, name


def test_builtins_load_through_entry_points():
    pm = get_plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"backbones", "datasets", "packs", "adapters", "losses"} <= names


class FirstLossPlugin:
    @staticmethod
    @hookimpl
    def register_losses(register):
        register("my-loss", lambda student, teacher, **kw: 0.0)


class SecondLossPlugin(FirstLossPlugin):
    pass


def test_two_plugins_claiming_one_name_fail_naming_both(plugin, cli):
    plugin(FirstLossPlugin, "first-loss-plugin")
    plugin(SecondLossPlugin, "second-loss-plugin")
    result = cli("plugins")
    assert result.exit_code == 1
    assert "loss 'my-loss' is registered by two plugins" in result.err
    assert "first-loss-plugin" in result.err and "second-loss-plugin" in result.err


class CommandPlugin:
    @staticmethod
    @hookimpl
    def register_commands(app):
        @app.command("hello-plugin")
        def hello():
            """Say hello from a plugin."""
            print("hello from a plugin command")


def test_plugin_can_add_a_command(plugin, cli):
    plugin(CommandPlugin, "command-plugin")
    assert "hello from a plugin command" in cli("hello-plugin").out
    listing = cli("plugins")
    assert "command-plugin" in listing.out and "hello-plugin" in listing.out


def test_unimplemented_command_exits_nonzero_with_one_line(cli):
    result = cli("ablate")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
