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


# ------------------------------------------------------------------------------ the weights' copies on a device
W = 28 * GiB  # a 7B model in float32, as the runtime loads checkpoints


def _nodes(base, launcher: str, pe: int = 1, de: int = 2, per_node: int = 1, slots: int = 1):
    return _caches(base, slots, engines=de).replace(
        launcher=launcher,
        transport="inproc" if launcher == "inprocess" else "tcp",
        **{"cluster.prefill_nodes": pe, "cluster.engines_per_node": per_node},
    )


@pytest.mark.parametrize(
    "launcher, pe, de, per_node, devices, copies",
    [
        ("local", 1, 2, 1, 1, [3]),  # three node processes, one GPU: three copies
        ("inprocess", 1, 2, 1, 1, [1]),  # one process: one copy for every engine
        ("local", 1, 2, 1, 2, [2, 1]),  # engines 0, 1, 2 on devices 0, 1, 0
        ("inprocess", 1, 2, 1, 2, [1, 1]),
        ("local", 1, 1, 8, 8, [2] * 8),  # two nodes of 8 engines on an 8-GPU host: each GPU has both nodes' engines
        ("local", 2, 2, 2, 8, [1] * 8),
    ],
)
def test_weight_copies_per_device(base, launcher, pe, de, per_node, devices, copies):
    assert config.weight_copies_per_device(_nodes(base, launcher, pe, de, per_node), devices) == copies


def test_the_weights_copies_and_decode_caches_of_one_device_are_checked_together(base):
    """A 28 GB model, 1P2D, one decode slot of 32K tokens (2 GiB of cache) per DE, on 60 GiB GPUs: three node
    processes on one GPU need 3 x 28 + 2 x 2 GiB (refused, naming the inprocess launcher); in one process 28 + 4 fits;
    on two GPUs the local launcher puts two node processes' copies on device 0 (60 GiB: fits)."""
    check, h100 = config.check_device_memory, 60 * GiB
    with pytest.raises(ConfigError, match=r"this host's gpu device would hold 3 copies of the model's weights") as e:
        check(_nodes(base, "local"), KV, W, "gpu", h100)
    assert "use launcher 'inprocess' (one copy of the weights for every engine)" in str(e.value), e.value
    assert "and 2 decode cache(s)" in str(e.value) and f"{3 * W + 2 * 2 * GiB} B" in str(e.value), e.value
    check(_nodes(base, "inprocess"), KV, W, "gpu", h100)
    check(_nodes(base, "local"), KV, W, "gpu", h100, devices=2)  # device 0: 2 x 28 + 2 (engine 2's cache) = 58
    with pytest.raises(ConfigError, match=r"gpu device 0 of this host's 2 would hold 2 copies") as e:
        check(_nodes(base, "local", slots=3), KV, W, "gpu", h100, devices=2)  # 56 + 6
    assert "inprocess" in str(e.value)
    with pytest.raises(ConfigError, match=r"would hold 1 copies .* 1 decode cache") as e:
        check(_nodes(base, "inprocess", de=1, slots=17), KV, W, "gpu", h100)  # 28 + 34: no launcher to advise
    assert "inprocess" not in str(e.value).split("GiB; memory_stats bytes_limit);")[1], e.value


def test_validate_checks_the_weights_only_on_an_accelerator(base, monkeypatch):
    """`validate` computes the weights' bytes (a function: ~0.1 s from the model's shapes) only where an accelerator's
    memory is checked; on XLA:CPU never."""
    calls = []

    def weights():
        calls.append(1)
        return W

    monkeypatch.setattr(config, "host_memory_bytes", lambda: (512 * GiB, "the test host's memory"))
    monkeypatch.setattr(config, "_decode_cache_device", lambda: ("cpu", None))
    config.validate(_nodes(base, "local"), KV, weight_bytes=weights)
    assert not calls
    monkeypatch.setattr(config, "_decode_cache_device", lambda: ("gpu", 60 * GiB))
    monkeypatch.setattr(config, "_local_device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"3 copies of the model's weights"):
        config.validate(_nodes(base, "local"), KV, weight_bytes=weights)
    assert calls == [1]
    config.validate(_nodes(base, "inprocess"), KV, weight_bytes=weights)


def test_the_weights_bytes_are_the_runners_own():
    """`models.registry.weight_bytes` from shapes alone equals the bytes of a built runner's weights."""
    import jax

    from models.registry import tiny_config, weight_bytes
    from models.runner import ModelRunner

    for name in ("tiny_qwen2", "tiny_deepseek"):
        c = tiny_config(name)
        r = ModelRunner(c, num_slots=1, capacity=16)
        built = sum(x.nbytes for x in jax.tree.leaves((r.embed_state, r.final_state, r.layer_states)))
        assert weight_bytes(c) == built, name
