"""The module layout's promises: what eval imports, and names importable from the package roots."""

import importlib
import subprocess
import sys

import pytest

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
        module.not_a_name
