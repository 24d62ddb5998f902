"""The embedded tiny model is reproducible from its seed and cached once written."""

from __future__ import annotations

import torch

from cascade import tiny


def test_same_seed_same_weights_other_seed_differs(tiny_models):
    again = tiny.build_tiny_models(seed=0).state_dicts()
    other = tiny.build_tiny_models(seed=1).state_dicts()
    for kind, state in tiny_models.state_dicts().items():
        assert all(torch.equal(state[k], again[kind][k]) for k in state), kind
        assert any(not torch.equal(state[k], other[kind][k]) for k in state if state[k].is_floating_point()), kind


def test_ensure_tiny_checkpoints_writes_once(tmp_path):
    prior, decoder = tiny.ensure_tiny_checkpoints(tmp_path)
    stamp = (prior.stat().st_mtime_ns, decoder.stat().st_mtime_ns)
    assert tiny.ensure_tiny_checkpoints(tmp_path) == (prior, decoder)
    assert (prior.stat().st_mtime_ns, decoder.stat().st_mtime_ns) == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([prior.name, decoder.name])  # no temp files left


def test_random_state_of_the_caller_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_models(seed=5)
    assert torch.equal(torch.rand(3), expected)
