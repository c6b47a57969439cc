"""Bad input found by a second hunt: feeder save timeouts and staging, unknown pacer priorities, policy/batcher
Config field types, and deeply nested JSON in traces. Each is refused by name (or reported), never used silently."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import schedulers
from dualpath_jax.traffic import Pacer, TrafficManager
from dualpath_jax.workloads.traces import TraceFormatError, load_trace
from schedulers.policies import DualPathConfig
from transport.feeder import LayerFeeder, LayerSaveError, LayerSaveTimeout


def _source(layer, out):
    out[:] = layer
    return out


def _host(x):
    return np.array(x, copy=True)


# ---- LayerFeeder ------------------------------------------------------------------------------------------
def test_wait_for_save_timeout_keeps_pending_saves_and_reports_a_later_failure():
    """A timed-out wait_for_save said 'saving layer 0 failed: TimeoutError' and forgot every pending save, so the
    next wait returned OK although layer 2's save then failed."""
    go = threading.Event()

    def saver(layer, host):
        go.wait(5)
        if layer == 2:
            raise OSError("disk gone")

    with LayerFeeder(3, _source, 8, saver=saver, to_device=_host, name="pe7") as feed:
        for layer in range(3):
            feed.save_layer(layer, np.zeros(8, np.uint8))
        with pytest.raises(LayerSaveTimeout, match=r"pe7: the saves of layers \[0, 1, 2\] did not finish") as e:
            feed.wait_for_save(timeout=0.01)
        assert isinstance(e.value, TimeoutError) and isinstance(e.value, LayerSaveError)
        assert "failed" not in str(e.value)
        go.set()
        with pytest.raises(LayerSaveError, match="pe7: saving layer 2 failed: OSError: disk gone"):
            feed.wait_for_save(timeout=5)
        feed.wait_for_save(timeout=5)  # reported once: nothing is left pending
        assert feed._saves == []


def test_wait_for_save_reports_a_failure_seen_before_the_timeout_and_keeps_the_rest():
    release = threading.Event()

    def saver(layer, host):
        if layer == 0:
            raise OSError("no room")
        release.wait(5)

    with LayerFeeder(2, _source, 8, saver=saver, to_device=_host) as feed:
        feed.save_layer(0, np.zeros(8, np.uint8))
        feed.save_layer(1, np.zeros(8, np.uint8))
        with pytest.raises(LayerSaveError, match=r"saving layer 0 failed: OSError: no room \(saves of layers \[1\]"):
            feed.wait_for_save(timeout=0.2)
        release.set()
        feed.wait_for_save(timeout=5)  # layer 1 was still tracked, and it succeeded


def test_feeder_staging_is_capped_by_the_layer_count():
    """prefetch + 1 staging buffers were allocated whatever the layer count: prefetch=100000 on a 2-layer feed of
    1 MiB layers asked for ~100 GB. (One buffer now, whatever prefetch: tests/test_fix9_transport.py.)"""
    with LayerFeeder(2, _source, 1 << 20, prefetch=100_000, to_device=_host) as feed:
        assert len(feed._staging) == 1
        for layer in range(2):
            assert int(np.asarray(feed.wait_for_layer(layer))[0]) == layer
    with LayerFeeder(10, _source, 64, prefetch=2, to_device=_host) as feed:
        assert len(feed._staging) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prefetch": 1.5}, r"feed: prefetch must be an int, got 1\.5 \(float\)"),
        ({"prefetch": True}, r"feed: prefetch must be an int, got True \(bool\)"),
        ({"num_layers": 2.0}, r"feed: num_layers must be an int, got 2\.0 \(float\)"),
        ({"layer_nbytes": "8"}, r"feed: layer_nbytes must be an int, got '8' \(str\)"),
    ],
)
def test_feeder_refuses_non_integer_sizes(kwargs, match):
    args = {"num_layers": 2, "source": _source, "layer_nbytes": 8} | kwargs
    with pytest.raises(TypeError, match=match):
        LayerFeeder(**args)
    with LayerFeeder(np.int64(2), _source, np.int32(8), prefetch=np.int64(1), to_device=_host) as feed:
        assert len(feed._staging) == 1  # numpy ints are fine


# ---- Pacer ------------------------------------------------------------------------------------------------
def test_pacer_refuses_an_unknown_priority():
    """'lwo' (a typo of 'low') was paced and recorded as the CNIC's first class, 'high'."""
    tm = TrafficManager()
    cnic = tm.add_cnic(0, 1e9)
    snic = tm.add_snic(0, 1e9)
    for names in (("cnic/engine0",), ("snic/node0", "cnic/engine0"), ("snic/node0",)):
        with pytest.raises(ValueError, match=r"unknown priority 'lwo'; known: \['high', 'low'\]"):
            tm.pacer(*names).pace(1000, "lwo")
    assert cnic.bytes_by_class == {"high": 0, "low": 0} and snic.total_bytes == 0
    # the one-class SNIC still takes both transfer priorities as its single class
    tm.pacer("snic/node0", "cnic/engine0").pace(1000, "high")
    assert snic.bytes_by_class == {"low": 1000} and cnic.bytes_by_class == {"high": 1000, "low": 0}


def test_pacer_refuses_a_class_a_two_class_link_lacks():
    tm = TrafficManager()
    tm.add_link("odd", 1e9, {"bulk": 1.0, "ctl": 3.0})
    cnic = tm.add_cnic(0, 1e9)
    p = Pacer([tm.link("odd"), cnic])
    with pytest.raises(ValueError, match=r"link 'odd' has classes \['bulk', 'ctl'\], not 'low'"):
        p.pace(1000, "low")
    assert Pacer([tm.link("odd")], class_map={"low": "bulk"}).classes("low") == ["bulk"]


# ---- policy / batcher Configs -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, name, kwargs, match",
    [
        ("policy", "split", {"block_size": 2.5}, r"split block_size must be an int \(not a bool or float\), got 2\.5"),
        ("policy", "split", {"block_size": True}, r"split block_size must be an int .*got True \(bool\)"),
        ("policy", "dualpath", {"alpha_tokens": True, "beta_tokens": 100}, r"dualpath alpha_tokens must be an int"),
        ("policy", "de_only", {"beta_tokens": 1e5}, r"de_only beta_tokens must be an int .*got 100000\.0 \(float\)"),
        ("policy", "pe_only", {"alpha_tokens": "10"}, r"pe_only alpha_tokens must be an int .*got '10' \(str\)"),
        ("policy", "dualpath", {"z_slack": True}, r"dualpath z_slack must be >= 1 and finite, got True \(bool\)"),
        ("policy", "dualpath", {"z_slack": "2"}, r"dualpath z_slack must be >= 1 and finite, got '2' \(str\)"),
        ("policy", "basic", {"max_pe_tokens": 2.5}, r"basic max_pe_tokens must be an int or None, got 2\.5"),
        ("policy", "basic", {"max_pe_tokens": "9"}, r"basic max_pe_tokens must be >= 0 or None, got '9'"),
        ("policy", "random", {"seed": 1.5}, r"random seed must be an int, got 1\.5 \(float\)"),
        ("policy", "random", {"seed": "7"}, r"random seed must be an int, got '7' \(str\)"),
        ("batcher", "fifo", {"chunk": "no"}, r"fifo chunk must be a bool \(True or False\), got 'no' \(str\)"),
        ("batcher", "fifo", {"chunk": 0}, r"fifo chunk must be a bool .*got 0 \(int\)"),
        ("batcher", "fifo", {"token_budget": True}, r"fifo token_budget must be >= 1 \(an int\), got True \(bool\)"),
        ("batcher", "fifo", {"max_requests": True}, r"fifo max_requests must be >= 1 \(an int\) or None, got True"),
        ("batcher", "compute_quota", {"quota_s": "0.3"}, r"compute_quota quota_s must be > 0, got '0\.3'"),
        ("batcher", "compute_quota", {"quota_s": True}, r"compute_quota quota_s must be > 0, got True"),
        ("batcher", "compute_quota", {"token_budget": 512.0}, r"compute_quota token_budget must be >= 1 \(an int\)"),
        ("batcher", "compute_quota", {"min_chunk_tokens": False}, r"compute_quota min_chunk_tokens must be >= 1"),
    ],
)
def test_config_fields_of_the_wrong_type_are_refused(kind, name, kwargs, match):
    make = schedulers.make_policy if kind == "policy" else schedulers.make_batcher
    with pytest.raises(ValueError, match=match):
        make(name, **kwargs)


def test_config_fields_of_the_right_type_still_pass():
    """What the simulator, the runtime and config variants pass: ints (numpy ints too), ints for floats, bools."""
    p = schedulers.make_policy("split", alpha_tokens=np.int64(10), beta_tokens=20, block_size=np.int32(16), z_slack=2)
    assert (p.config.alpha_tokens, p.config.block_size, p.config.z_slack) == (10, 16, 2)
    assert DualPathConfig(alpha_tokens=0, beta_tokens=0).alpha_tokens >= 1  # 0: derived from the paper's setup
    assert schedulers.make_policy("basic", max_pe_tokens=np.int64(5)).config.max_pe_tokens == 5
    assert schedulers.make_policy("random", seed=-3).config.seed == -3
    b = schedulers.make_batcher("fifo", token_budget=np.int64(64), max_requests=4, chunk=np.bool_(False))
    assert not b.config.chunk
    assert schedulers.make_batcher("compute_quota", quota_s=1, token_budget=np.int64(8)).config.quota_s == 1


def test_sim_config_names_a_wrongly_typed_policy_field():
    from dualpath_jax.sim import load_sim_config

    with pytest.raises(ValueError, match=r"config.scheduler.kwargs .*split block_size must be an int"):
        load_sim_config("configs/sim_tiny.py:split,policy.block_size=2.5")
    with pytest.raises(ValueError, match=r"config.batcher.kwargs .*compute_quota min_chunk_tokens must be >= 1"):
        load_sim_config("configs/sim_tiny.py:batcher.min_chunk_tokens=true")


# ---- traces -----------------------------------------------------------------------------------------------
DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_mooncake_line_names_file_and_line(tmp_path):
    p = tmp_path / "deep.jsonl"
    good = '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}'
    p.write_text(good + "\n" + DEEP + "\n")
    with pytest.raises(TraceFormatError, match=r"deep\.jsonl:2: not valid JSON \(nested too deeply to parse\)"):
        load_trace(p)


def test_deeply_nested_session_file_names_the_file(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text('{"block_size": 16, "requests": ' + DEEP + "}")
    with pytest.raises(TraceFormatError, match=r"deep\.json: not valid JSON \(nested too deeply to parse\)"):
        load_trace(p)
