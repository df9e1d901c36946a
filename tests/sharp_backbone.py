"""llava-next-tiny with its LM head scaled up: a backbone whose KL values are not float noise.

llava-next-tiny's random LM head gives almost uniform next-token distributions (top log-prob ≈ −9.8
of −10.4 for uniform), so its KL to any teacher sits at float32 rounding noise.  Registered as
``llava-next-tiny-sharp``, the same tiny model with the LM head scaled by ``HEAD_SCALE`` gives the
teacher's distributions a shape a student can move towards (and a test can tell apart).

Run as a script, ``python tests/sharp_backbone.py ARGS`` is ``sdrt ARGS`` with the backbone
registered: subprocess and torchrun tests use it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sdrt_cli.hookspecs import hookimpl

HEAD_SCALE = 50.0
NAME = "llava-next-tiny-sharp"
SCRIPT = str(Path(__file__).resolve())  # `python SCRIPT ARGS` = `sdrt ARGS` with NAME registered


def sharp_tiny(seed: int = 0, device: str = "auto", dtype: str = "auto", **_):
    from sdrt_plugins.backbones.llava_next import build_random

    backbone = build_random("tiny", seed=seed, device=device, dtype=dtype)
    with torch.no_grad():
        backbone.model.lm_head.weight.mul_(HEAD_SCALE)
    backbone.name = NAME
    backbone.source = f"random:tiny-sharp:seed={seed}"
    return backbone


class SharpBackbonePlugin:
    @hookimpl
    def register_backbones(self, register):
        register(NAME, sharp_tiny)


if __name__ == "__main__":
    from sdrt_cli.cli import main
    from sdrt_cli.plugins import register_plugin

    register_plugin(SharpBackbonePlugin(), "sharp-tiny")
    main(sys.argv[1:])
