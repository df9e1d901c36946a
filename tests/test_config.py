"""Run configuration (flags > --config file > defaults) and the run.json every output directory gets."""

from __future__ import annotations

import enum
import json
import subprocess
from pathlib import Path

import pytest
import typer

from sdrt_cli.config import resolve
from sdrt_cli.errors import SdrtError
from sdrt_cli.runinfo import RUN_INFO, write_run_info

REPO = Path(__file__).resolve().parents[1]


def make_app(seen: dict) -> typer.Typer:
    """Two commands, so ``[train]`` / ``[evaluate]`` tables are meaningful; each stores its resolved options."""
    app = typer.Typer()

    @app.command("train")
    def train(
        ctx: typer.Context,
        config: str = typer.Option(None, "--config"),
        batch_size: int = typer.Option(8, "--batch-size"),
        learning_rate: float = typer.Option(0.001, "--learning-rate"),
        run_name: str = typer.Option("default-run", "--run-name"),
        layers: str = typer.Option("-1", "--layers"),
        shuffle: bool = typer.Option(True, "--shuffle/--no-shuffle"),
    ) -> None:
        seen.clear()
        seen.update(resolve(ctx))

    @app.command("evaluate")
    def evaluate(
        ctx: typer.Context,
        config: str = typer.Option(None, "--config"),
        batch_size: int = typer.Option(4, "--batch-size"),
        split: str = typer.Option("validation", "--split"),
    ) -> None:
        seen.clear()
        seen.update(resolve(ctx))

    return app


def run(*args: str) -> dict:
    """Invoke the test app in-process; SdrtError propagates (standalone_mode=False)."""
    seen: dict = {}
    typer.main.get_command(make_app(seen)).main(args=[str(a) for a in args], standalone_mode=False)
    return seen


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_config():
    seen = run("train")
    assert seen["batch_size"] == 8 and seen["learning_rate"] == 0.001 and seen["run_name"] == "default-run"
    assert seen["shuffle"] is True and seen["config"] is None


def test_config_file_beats_defaults_and_flags_beat_config_file(tmp_path):
    path = write(tmp_path, 'batch_size = 32\nlearning_rate = 0.5\nrun_name = "from-file"\nshuffle = false\n')
    seen = run("train", "--config", path)
    assert (seen["batch_size"], seen["learning_rate"], seen["run_name"], seen["shuffle"]) == (32, 0.5, "from-file", False)

    seen = run("train", "--config", path, "--batch-size", "2", "--shuffle")
    assert seen["batch_size"] == 2, "a flag wins over the config file"
    assert seen["shuffle"] is True, "a flag wins even when it equals the default"
    assert seen["learning_rate"] == 0.5 and seen["run_name"] == "from-file"


def test_flag_equal_to_default_still_wins_over_file(tmp_path):
    path = write(tmp_path, "batch_size = 32\n")
    assert run("train", "--config", path, "--batch-size", "8")["batch_size"] == 8


def test_command_table_overrides_top_level_and_applies_only_to_its_command(tmp_path):
    path = write(tmp_path, 'batch_size = 16\nsplit = "test"\n\n[train]\nbatch_size = 64\n\n[evaluate]\nbatch_size = 3\n')
    assert run("train", "--config", path)["batch_size"] == 64
    seen = run("evaluate", "--config", path)
    assert seen["batch_size"] == 3
    # a top-level key another command knows ("split") is fine for train, and used by evaluate
    assert seen["split"] == "test"


def test_top_level_key_applies_when_command_table_does_not_set_it(tmp_path):
    path = write(tmp_path, 'batch_size = 16\n\n[train]\nrun_name = "x"\n')
    seen = run("evaluate", "--config", path)
    assert seen["batch_size"] == 16
    assert run("train", "--config", path)["batch_size"] == 16


def test_dashes_and_underscores_are_the_same_key(tmp_path):
    path = write(tmp_path, 'batch-size = 5\nlearning_rate = 0.25\n\n[train]\nrun-name = "dashed"\n')
    seen = run("train", "--config", path)
    assert (seen["batch_size"], seen["learning_rate"], seen["run_name"]) == (5, 0.25, "dashed")


def test_list_value_for_a_string_option_is_joined_with_commas(tmp_path):
    path = write(tmp_path, "layers = [-1, -2, -3]\n")
    assert run("train", "--config", path)["layers"] == "-1,-2,-3"


def test_unknown_top_level_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "batch_szie = 3\n")
    with pytest.raises(SdrtError) as info:
        run("train", "--config", path)
    message = str(info.value)
    assert str(path) in message and "'batch_szie'" in message and "did you mean 'batch_size'?" in message


def test_unknown_key_in_command_table_names_table_and_key(tmp_path):
    # "split" is an option of evaluate, not of train: inside [train] it is an error
    path = write(tmp_path, '[train]\nsplit = "test"\n')
    with pytest.raises(SdrtError) as info:
        run("train", "--config", path)
    assert str(path) in str(info.value) and "'train.split'" in str(info.value)

    path = write(tmp_path, "[train]\nlearning_rat = 0.1\n", name="typo.toml")
    with pytest.raises(SdrtError, match=r"unknown key 'train.learning_rat'; did you mean 'learning_rate'\?"):
        run("train", "--config", path)


def test_misspelt_command_table_suggests_the_command(tmp_path):
    path = write(tmp_path, "[trian]\nbatch_size = 3\n")
    with pytest.raises(SdrtError, match=r"unknown key 'trian'; did you mean 'train'\?"):
        run("train", "--config", path)


@pytest.mark.parametrize(
    "line, key",
    [
        ('batch_size = "many"', "batch_size"),  # click's own parsing rejects it
        ("batch_size = 2.5", "batch_size"),  # would silently truncate to 2
        ("batch_size = true", "batch_size"),  # would silently become 1
        ("shuffle = 5", "shuffle"),  # used to crash inside click with a traceback
        ('shuffle = "maybe"', "shuffle"),
        ("learning_rate = false", "learning_rate"),
        ('learning_rate = "fast"', "learning_rate"),
        ("batch_size = { value = 3 }", "batch_size"),
    ],
)
def test_bad_value_type_names_file_key_and_value(tmp_path, line, key):
    path = write(tmp_path, line + "\n")
    with pytest.raises(SdrtError) as info:
        run("train", "--config", path)
    message = str(info.value)
    assert str(path) in message and f"key {key!r} has a bad value" in message


def test_string_values_are_parsed_like_flags(tmp_path):
    path = write(tmp_path, 'batch_size = "12"\nshuffle = "no"\nlearning_rate = 3\n')
    seen = run("train", "--config", path)
    assert (seen["batch_size"], seen["shuffle"], seen["learning_rate"]) == (12, False, 3.0)


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(SdrtError, match=r"config file .*absent\.toml does not exist"):
        run("train", "--config", path)


def test_invalid_toml_names_file_and_line(tmp_path):
    path = write(tmp_path, "batch_size = 3\nlearning_rate = = 0.1\n")
    with pytest.raises(SdrtError) as info:
        run("train", "--config", path)
    message = str(info.value)
    assert str(path) in message and "not valid TOML" in message and "line 2" in message


def test_config_errors_reach_the_user_as_one_line_through_the_real_cli(tmp_path, cli, plugin):
    # the same resolve() behind a real sdrt subcommand added by a plugin: one red line, exit 1
    from sdrt_cli.hookspecs import hookimpl

    class ConfigProbePlugin:
        @staticmethod
        @hookimpl
        def register_commands(app):
            @app.command("config-probe")
            def config_probe(ctx: typer.Context, config: str = typer.Option(None, "--config"), steps: int = typer.Option(1, "--steps")):
                """Print the resolved steps."""
                print("steps", resolve(ctx)["steps"])

    plugin(ConfigProbePlugin, "config-probe-plugin")
    good = write(tmp_path, "steps = 7\n", name="good.toml")
    result = cli("config-probe", "--config", good)
    assert result.exit_code == 0 and "steps 7" in result.out
    bad = write(tmp_path, "stesp = 7\n", name="bad.toml")
    result = cli("config-probe", "--config", bad)
    assert result.exit_code == 1
    assert "bad.toml" in result.err and "'stesp'" in result.err and "Traceback" not in result.err


class Mode(enum.Enum):
    FAST = "fast"


def test_write_run_info_records_config_seed_versions_and_git(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # not a git checkout: the "cwd" revision must be None
    out_dir = tmp_path / "runs" / "r1"
    config = {"batch_size": 8, "output": Path("runs/r1"), "mode": Mode.FAST, "layers": (-1, -2)}
    path = write_run_info(out_dir, "train", config, seed=1234)

    assert path == out_dir / RUN_INFO and path.is_file()
    assert sorted(p.name for p in out_dir.iterdir()) == [RUN_INFO], "no temporary files are left behind"
    info = json.loads(path.read_text())
    assert info["command"] == "train"
    assert info["seed"] == 1234
    assert info["config"] == {"batch_size": 8, "output": "runs/r1", "mode": "fast", "layers": [-1, -2]}
    assert info["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["versions"]["sdrt"] == "0.1.0" and info["versions"]["python"].count(".") == 2

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert info["git"]["sdrt"]["commit"] == head
    assert isinstance(info["git"]["sdrt"]["dirty"], bool)
    assert info["git"]["cwd"] is None
    assert info["world_size"] == 1 and info["created"]


def test_write_run_info_overwrites_atomically(tmp_path):
    write_run_info(tmp_path, "traces", {"a": 1}, seed=0)
    write_run_info(tmp_path, "traces", {"a": 2}, seed=None)
    info = json.loads((tmp_path / RUN_INFO).read_text())
    assert info["config"] == {"a": 2} and info["seed"] is None
