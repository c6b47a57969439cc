"""A multi-device host's memory, as its engines use it (session 34). Engines run on their own devices since
2026-12-05 (`node.engine_device`: engine e on local device e % count), but
- the decode-cache check still counted every decode engine of the host against one device: 2 decode engines of 32 GiB
  each on a host of two 60 GiB GPUs were refused ("all run on this host's default gpu device"), though each GPU holds
  one of them (`config.decode_engines_per_device`);
- each node process made its weights on the default device and the engine on that device got a copy of its own, so
  GPU 0 held one copy per node process of the host and a second one for its own engine (checked on XLA:CPU with two
  host devices in `test_engine_devices.py`).
"""

from __future__ import annotations

import pytest
from test_fix16_small import KV, GiB, _caches

from dualpath_jax.runtime import config
from dualpath_jax.runtime.config import ConfigError


@pytest.mark.parametrize(
    "pe_nodes, de_nodes, per_node, devices, most",
    [
        (1, 2, 1, 2, 1),  # engines 1, 2 on devices 1, 0
        (1, 3, 1, 2, 2),  # 1, 2, 3 -> 1, 0, 1
        (1, 2, 1, 8, 1),
        (2, 2, 4, 8, 1),  # decode engines 8..15 on devices 0..7
        (1, 4, 2, 4, 2),  # 2..9 -> 2, 3, 0, 1, 2, 3, 0, 1
        (1, 2, 1, 1, 2),
    ],
)
def test_decode_engines_per_device_follows_the_engines_placement(base, pe_nodes, de_nodes, per_node, devices, most):
    cfg = base.replace(
        **{"cluster.prefill_nodes": pe_nodes, "cluster.decode_nodes": de_nodes, "cluster.engines_per_node": per_node}
    )
    assert config.decode_engines_per_device(cfg, devices) == most


def test_decode_caches_of_a_multi_gpu_host_are_checked_per_device(base):
    """2 decode engines of 32 GiB of cache each: refused on one 60 GiB GPU (as before), fitting on two (one each;
    refused before, as if both were on one). Three on two GPUs: two share one, refused, naming the spreading."""
    check, h100, host = config.check_decode_cache_memory, 60 * GiB, (128 * GiB, "the test host's memory")
    with pytest.raises(
        ConfigError, match=r"the 2 decode engines of launcher 'inprocess' all run on this host's default"
    ):
        check(_caches(base, 16, engines=2), KV, "gpu", h100, host)
    check(_caches(base, 16, engines=2), KV, "gpu", h100, host, devices=2)
    with pytest.raises(
        ConfigError, match=r"the 2 decode engines .* one of this host's 2 gpu devices \(engine e on dev"
    ):
        check(_caches(base, 16, engines=3), KV, "gpu", h100, host, devices=2)
    # XLA:CPU host devices share this host's memory: every engine counts (as before)
    with pytest.raises(ConfigError, match=r"more than the test host's memory"):
        check(_caches(base, 40, engines=2), KV, "cpu", None, host, devices=2)


def test_validate_passes_the_hosts_device_count(base, monkeypatch):
    monkeypatch.setattr(config, "_decode_cache_device", lambda: ("gpu", 60 * GiB))
    monkeypatch.setattr(config, "host_memory_bytes", lambda: (512 * GiB, "the test host's memory"))
    monkeypatch.setattr(config, "_local_device_count", lambda: 2)
    config.validate(_caches(base, 16, engines=2), KV)
    monkeypatch.setattr(config, "_local_device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"all run on this host's default gpu device"):
        config.validate(_caches(base, 16, engines=2), KV)
