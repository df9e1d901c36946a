"""Any intervention kind a plugin registers can be ensembled, unless its class says it cannot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdrt_cli.adapters import Intervention
from sdrt_cli.ensemble import build_ensemble, load_ensemble
from sdrt_cli.errors import SdrtError
from sdrt_cli.evaluate import GenerationSettings, SdrtMethod
from sdrt_cli.hookspecs import hookimpl
from sdrt_cli.prompting import prefill_single_step
from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts
from test_eval_fixtures import tiny, traces_dir, write_intervention_run  # noqa: F401


class ShiftIntervention(Intervention):
    """A third-party kind: adds a learned vector to the state."""

    def __init__(self, hidden_size, rank, init_std=None):
        super().__init__(hidden_size, rank, init_std)
        self.shift = nn.Parameter(torch.full((hidden_size,), 0.5))

    def delta(self, h):
        return self.shift.to(h.dtype).expand_as(h)


class SoloIntervention(ShiftIntervention):
    ensemble_member = False


class KindsPlugin:
    @staticmethod
    @hookimpl
    def register_adapters(register):
        register("shift-test", ShiftIntervention)
        register("solo-test", SoloIntervention)


def test_a_plugin_intervention_kind_is_ensembled_and_evaluated(plugin, tiny, traces_dir, tmp_path):  # noqa: F811
    plugin(KindsPlugin, "kinds-plugin")
    run = write_intervention_run(tmp_path / "run", tiny, traces_dir, kind="shift-test")
    directory, _ = build_ensemble(run, tiny, None, uniform=True)
    ensemble = load_ensemble(run, tiny, directory.name)
    assert [type(a.interventions[str(a.layers[0])]) for a in ensemble.adapters] == [ShiftIntervention] * len(ensemble.members)
    data = SyntheticCharts(limit=2)
    examples = list(data)[:2]
    with torch.no_grad():
        _, _, plain = prefill_single_step(tiny, data, examples)
        with ensemble.attach(tiny) as handle:
            _, _, edited = prefill_single_step(tiny, data, examples, handle, ensemble.vision)
    assert not torch.allclose(plain.last_hidden[:, -1], edited.last_hidden[:, -1])  # the members' edits reach the answer
    method = SdrtMethod(run, ensemble)
    with method.active(tiny):
        steered = method.generate(tiny, data, examples, GenerationSettings(max_new_tokens=3, batch_size=2))
    assert all(g.extra["weights"] == {m: pytest.approx(1 / len(ensemble.members)) for m in ensemble.members} for g in steered)


def test_a_kind_that_declares_itself_no_ensemble_member_is_refused(plugin, tiny, traces_dir, tmp_path):  # noqa: F811
    plugin(KindsPlugin, "kinds-plugin")
    run = write_intervention_run(tmp_path / "run", tiny, traces_dir, kind="solo-test")
    with pytest.raises(SdrtError, match=r"are 'solo-test' adapters .*\(registered kinds: loreft, reft, shift-test\)"):
        build_ensemble(run, tiny, None, uniform=True)
