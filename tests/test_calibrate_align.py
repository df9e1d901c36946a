"""`sdrt calibrate --align`: MmDC's multimodal alignment runs once before iteration 1, and every
later stage runs on the aligned projector (recorded in the manifests); the setting is part of the
run's configuration."""

from __future__ import annotations

import json

from test_calibrate_command import TINY


def test_align_trains_the_projector_first_and_every_later_stage_records_it(cli, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--assessor", "metric", "--iterations", "1", "--align", "--set", "align.max_steps=1", "--out", out]
    result = cli(*args)
    assert result.exit_code == 0, result.output[-3000:]
    assert json.loads((out / "stages" / "align.done").read_text())["stage"] == "align"
    align = json.loads((out / "align" / "manifest.json").read_text())
    assert (align["adapter"], align["mode"], align["prompts"]) == ("projector", "gold", ["gold"])
    assert align["training"]["steps"] == 1  # --set align.OPTION reaches the alignment's distill
    assert align["backbone"]["options"] == {"seed": 0}  # trained on the plain backbone
    projector = (out / "align" / "adapters" / "gold").resolve()
    sha = json.loads((projector / "adapter.json").read_text())["tensors_sha256"]
    for manifest in (out / "iter-1" / "traces" / "manifest.json", out / "iter-1" / "adapters" / "manifest.json"):
        document = json.loads(manifest.read_text())
        backbone = document.get("backbone") or document["fingerprint"]["backbone"]
        assert backbone["options"]["projector"] == {"path": str(projector), "tensors_sha256": sha}, manifest
    assert json.loads((out / "calibrate.json").read_text())["align"] is True
    assert "align\n" in result.err and "iteration 1: update" in result.err
    alignment = json.loads((out / "report.json").read_text())["alignment"]
    assert (alignment["projector"], alignment["steps"], alignment["examples"]) == (str(out / "align" / "adapters" / "gold"), 1, 2)
    assert "Alignment (MmDC stage 1, --align): projector" in (out / "report.md").read_text()

    # the same command again reuses the alignment; without --align it is another configuration
    again = cli(*args)
    assert again.exit_code == 0 and "align\n" not in again.err
    other = cli(*TINY, "--assessor", "metric", "--iterations", "1", "--no-align", "--out", out)
    assert other.exit_code == 1
    assert "holds a calibration with another configuration" in other.err and "align" in other.err


def test_align_options_without_align_are_refused(cli, tmp_path):
    out = tmp_path / "run"
    result = cli(*TINY, "--set", "align.epochs=2", "--out", out)
    assert result.exit_code == 1
    assert result.err.strip() == "Error: --set align.epochs: there is no alignment stage without --align"
    result = cli(*TINY, "--align", "--set", "align.adapter=lora", "--out", out)
    assert result.exit_code == 1 and "--set align.adapter" in result.err
    result = cli(*TINY, "--set", "distill.adapter=projector", "--out", out)  # the student is an ensemble
    assert result.exit_code == 1 and "--set distill.adapter=projector" in result.err and "needs reft or loreft" in result.err
    assert not out.exists()
