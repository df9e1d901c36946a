"""Our native LoReFT equals pyreft's LoreftIntervention (pyreft is a test oracle only, never a dependency).

pyreft 0.1.0 pins transformers 4.45.1, so it is installed with ``--no-deps``; it imports pyvene,
installed the same way (``pip install --no-deps pyreft==0.1.0 pyvene==0.1.8``).
"""

from __future__ import annotations

import pytest
import torch

from sdrt_plugins.adapters.reft import LoreftIntervention

try:
    from pyreft.interventions import LoreftIntervention as PyreftLoreft
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(
        f"pyreft is not importable ({exc}); install the oracle with `pip install --no-deps pyreft==0.1.0 pyvene==0.1.8`",
        allow_module_level=True,
    )

HIDDEN, RANK = 32, 4


def pyreft_loreft():
    return PyreftLoreft(embed_dim=HIDDEN, low_rank_dimension=RANK, dtype=torch.float32)


def test_ours_matches_pyreft_with_our_weights_copied_in():
    torch.manual_seed(0)
    ours = LoreftIntervention(HIDDEN, RANK)
    with torch.no_grad():  # a non-trivial W, b (not just the default initialisation)
        ours.source.weight.normal_(std=0.3)
        ours.source.bias.normal_(std=0.3)
    theirs = pyreft_loreft()
    # pyreft stores R transposed (hidden x rank) and loads it through its own state-dict path
    theirs.load_state_dict(
        {"weight": ours.source.weight.detach(), "bias": ours.source.bias.detach(), "rotate_layer": ours.projection.detach().T}
    )
    h = torch.randn(2, 7, HIDDEN)
    torch.testing.assert_close(ours(h), theirs(h), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours(h), h, atol=1e-3)  # the comparison is not between two identities


def test_ours_matches_pyreft_with_pyreft_weights_copied_in():
    torch.manual_seed(1)
    theirs = pyreft_loreft()
    ours = LoreftIntervention(HIDDEN, RANK)
    with torch.no_grad():
        ours.source.weight.copy_(theirs.learned_source.weight)
        ours.source.bias.copy_(theirs.learned_source.bias)
        ours.rotate.weight = theirs.rotate_layer.weight.T.contiguous()  # through the orthogonal parametrization
    h = torch.randn(3, 5, HIDDEN)
    torch.testing.assert_close(ours(h), theirs(h), atol=1e-5, rtol=1e-5)
