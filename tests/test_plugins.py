import pytest

from sdrt_cli.errors import RegistryCollisionError, UnknownNameError
from sdrt_cli.hookspecs import hookimpl
from sdrt_cli.plugins import get_plugin_manager
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
        "register_metrics",
        "register_commands",
    }
    for name in names:
        doc = getattr(hookspecs, name).__doc__
        assert doc and len(doc.strip().splitlines()) == 1, name


def test_builtins_load_through_entry_points():
    pm = get_plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"backbones", "datasets", "packs", "adapters", "losses", "metrics"} <= names


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


def _install_plugin_distribution(root, dist_name: str, module_name: str) -> None:
    """A real installed distribution on sys.path: a module plus a dist-info with an entry point."""
    (root / f"{module_name}.py").write_text(
        "from sdrt_cli.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def register_losses(register):\n"
        f"    register('{module_name}-loss', lambda student, teacher, **kw: 0.0)\n"
    )
    info = root / f"{dist_name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[sdrt]\n{module_name} = {module_name}\n")


@pytest.fixture
def fresh_plugin_manager(monkeypatch, tmp_path):
    """Reload the plugin manager from entry points with a third-party distribution installed."""
    from sdrt_cli import plugins

    _install_plugin_distribution(tmp_path, "sdrt-extra-loss", "sdrt_extra_loss")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_pm", None)
    monkeypatch.setattr(plugins, "_registries", None)
    yield plugins
    plugins._pm = None
    plugins._registries = None


def test_third_party_distribution_loads_by_default(fresh_plugin_manager, monkeypatch):
    monkeypatch.delenv("SDRT_LOAD_PLUGINS", raising=False)
    assert "sdrt_extra_loss-loss" in fresh_plugin_manager.losses().names()


def test_load_plugins_env_empty_loads_only_builtins(fresh_plugin_manager, monkeypatch):
    monkeypatch.setenv("SDRT_LOAD_PLUGINS", "")
    names = fresh_plugin_manager.losses().names()
    assert "sdrt_extra_loss-loss" not in names
    assert {"mse", "kl"} <= set(names)  # built-ins always load
    monkeypatch.setenv("SDRT_LOAD_PLUGINS", "sdrt-extra-loss")
    monkeypatch.setattr(fresh_plugin_manager, "_pm", None)
    monkeypatch.setattr(fresh_plugin_manager, "_registries", None)
    assert "sdrt_extra_loss-loss" in fresh_plugin_manager.losses().names()


def test_load_plugins_env_naming_an_unknown_distribution_is_one_sentence(fresh_plugin_manager, monkeypatch):
    from sdrt_cli.errors import SdrtError

    monkeypatch.setenv("SDRT_LOAD_PLUGINS", "sdrt-extra-los")
    with pytest.raises(SdrtError, match="SDRT_LOAD_PLUGINS names 'sdrt-extra-los', which is not an installed sdrt plugin distribution \\(installed: sdrt-extra-loss\\)"):
        fresh_plugin_manager.get_plugin_manager()


class LengthMetricPlugin:
    """A dataset plugin's own metric: right when the answer has as many words as the gold one."""

    @staticmethod
    @hookimpl
    def register_metrics(register):
        from sdrt_cli.metrics import Metric

        class SameLength(Metric):
            name = "same-length"

            def score_answers(self, prediction, answers, example):
                return float(any(len(prediction.split()) == len(a.split()) for a in answers))

        register("same-length", SameLength)
        register("not-a-metric", object)


def test_a_plugin_metric_is_scored_like_a_builtin_and_is_listed(plugin, cli):
    from sdrt_cli.data import Example
    from sdrt_cli.metrics import get_metric, metric_names

    plugin(LengthMetricPlugin, "length-metric-plugin")
    item = Example(id="q", images=[], question="?", answers=["two words"], metadata={})
    assert get_metric("same-length").score("three words here", item) == 0.0
    assert get_metric("same-length").score("ok then", item) == 1.0
    assert "same-length" in metric_names() and "anls" in metric_names()
    with pytest.raises(Exception, match="metric 'not-a-metric' registered by plugin 'length-metric-plugin' is not a subclass"):
        get_metric("not-a-metric")
    assert "same-length" in cli("plugins").out


class ClashingMetricPlugin:
    @staticmethod
    @hookimpl
    def register_metrics(register):
        from sdrt_cli.metrics.base import ExactMatch

        register("anls", ExactMatch)


def test_a_plugin_metric_cannot_shadow_a_builtin(plugin):
    from sdrt_cli.metrics import get_metric

    plugin(ClashingMetricPlugin, "clashing-metric-plugin")
    with pytest.raises(RegistryCollisionError, match="metric 'anls' is registered by two plugins: 'metrics' and 'clashing-metric-plugin'"):
        get_metric("anls")
