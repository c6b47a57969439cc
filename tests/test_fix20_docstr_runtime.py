"""Defects found while checking the runtime's and the transports' docstrings against the code (helper fix20
docstr_runtime): `config.workload.gap_s`, documented as the think/tool time between turns, shapes tiny agents only; a
synthetic or trace workload ran its own gaps and ignored the setting without a word.
"""

from __future__ import annotations

import pytest

from dualpath_jax.runtime import config
from dualpath_jax.runtime.config import ConfigError, validate_workload


@pytest.mark.parametrize("kind", ["synthetic", "trace"])
def test_gap_s_of_a_synthetic_or_trace_workload_is_refused_not_ignored(base, kind):
    """`workload.gap_s` sets the tiny agents' time between turns (`lifecycle.tiny_trajectories`); a synthetic or trace
    workload's turns carry their own gaps (x `time_scale`, `driver._scaled`), so gap_s=2 there changed nothing. Refused
    where the workload is checked, naming what stretches those gaps; its default runs as before, and a tiny
    workload still takes it."""
    cfg = base.replace(**{"workload.kind": kind, "workload.gap_s": 2.0})
    with pytest.raises(ConfigError, match=rf"^config.workload.gap_s=2 .*kind='{kind}'") as e:
        validate_workload(cfg)
    assert "config.workload.time_scale" in str(e.value), e.value
    assert f"set it to {config.WorkloadConfig.gap_s:g}" in str(e.value), e.value
    validate_workload(base.replace(**{"workload.kind": kind}))  # the default gap: fine
    validate_workload(base.replace(**{"workload.gap_s": 2.0}))  # a tiny workload's own field
