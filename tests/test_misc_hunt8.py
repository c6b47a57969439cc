"""Defects of the eighth miscellaneous hunt (transport, models, runtime); each test failed on the commit before.

- transport/inproc: a write took the peer's destination region when it was posted, so one still queued (behind a
  paced transfer, in a busy lane) when the peer deregistered the region landed in the old buffer, and one to a
  name registered again (a new buffer) landed in the old buffer too. The peer's region is now looked up as the
  bytes land, as tcp's receiver takes a frame's region when the frame arrives: a region gone fails the transfer
  with `RegionError` (the link stays up), a name registered again takes the bytes (reads likewise). The
  backend-independent part is in test_transport_conformance.py.
- models: HF's `hidden_act: "swish"` (SiLU by another name: transformers' ACT2FN maps both to nn.SiLU) was refused;
  it loads as the "silu" config, fingerprint included. Other activations are still refused by name.
- runtime/scheduler_service: a group declared dead (stopped past the heartbeat timeout, then continued) kept its
  last report's storage-NIC queue gauges (read_queue_tokens, pending_writes) in `stats`, the run's node stats, as if
  its reads were still queued; its later reports were dropped, counters (bytes read) included. Its gauges are 0 now
  and `dead` is True; its counters follow its later reports. Its requests' read tokens stay out of the policy's
  snapshot (it was already so: guarded here).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_transport_conformance import _HeldPacer, make_pair

from dualpath_jax.block_keys import block_keys
from transport.base import RegionError

# ---------------------------------------------------------------- transport


@pytest.fixture
def held():
    """(a, b, pacer): a's transfers held by the pacer until its gate opens."""
    pairs = []

    def make(backend):
        pacer = _HeldPacer()
        a, b = make_pair(backend, pacer=pacer)
        pairs.append((a, b, pacer))
        return a, b, pacer

    yield make
    for a, b, pacer in pairs:
        pacer.gate.set()
        a.close()
        b.close()


@pytest.mark.parametrize("backend", ["inproc", "tcp"])
@pytest.mark.parametrize("batch", [False, True], ids=["write", "write_many"])
def test_a_write_queued_before_the_region_was_registered_again_lands_in_the_new_buffer(held, backend, batch):
    a, b, pacer = held(backend)
    a.register("src", np.arange(64, dtype=np.uint8))
    old = np.zeros(64, np.uint8)
    b.register("kv", old)
    if batch:
        f = a.write_many(b.name, [("src", 0, 32, "kv", 0), ("src", 32, 32, "kv", 32)], notify=9)
    else:
        f = a.write(b.name, "src", 0, "kv", 0, 64, notify=9)
    assert pacer.held.wait(10)
    b.deregister("kv")
    new = np.zeros(128, np.uint8)
    b.register("kv", new)
    pacer.gate.set()
    assert f.result(10) == 64
    assert not old.any(), "the write landed in the deregistered buffer"
    assert new[:64].tolist() == list(range(64)) and not new[64:].any()
    n = b.wait_notification(tag=9, timeout=10)
    assert (n.region, n.offset + n.length) == ("kv", 64)


def test_inproc_a_queued_write_to_a_deregistered_region_is_a_region_error_and_the_link_stays(held):
    a, b, pacer = held("inproc")
    a.register("src", np.full(64, 3, np.uint8))
    old, other = np.zeros(64, np.uint8), np.zeros(64, np.uint8)
    b.register("kv", old)
    b.register("other", other)
    f = a.write(b.name, "src", 0, "kv", 0, 64, notify=1)
    g = a.write_many(b.name, [("src", 0, 8, "other", 0), ("src", 0, 8, "kv", 8)])
    assert pacer.held.wait(10)
    b.deregister("kv")
    pacer.gate.set()
    with pytest.raises(RegionError, match="no region 'kv'"):
        f.result(10)
    with pytest.raises(RegionError, match="no region 'kv'"):
        g.result(10)
    assert not old.any()
    assert len(b.completions) == 0
    assert a.write(b.name, "src", 0, "other", 0, 64).result(10) == 64  # the link is up
    assert (other == 3).all() and a.peers() == [b.name]


def test_inproc_a_queued_write_past_a_smaller_buffer_registered_again_is_a_region_error(held):
    a, b, pacer = held("inproc")
    a.register("src", np.full(64, 3, np.uint8))
    old = np.zeros(64, np.uint8)
    b.register("kv", old)
    f = a.write(b.name, "src", 0, "kv", 32, 32)
    assert pacer.held.wait(10)
    b.deregister("kv")
    small = np.zeros(16, np.uint8)
    b.register("kv", small)
    pacer.gate.set()
    with pytest.raises(RegionError, match="outside region 'kv'"):
        f.result(10)
    assert not old.any() and not small.any()


def test_inproc_a_queued_read_takes_the_region_registered_now(held):
    a, b, pacer = held("inproc")
    back = np.zeros(16, np.uint8)
    a.register("back", back)
    b.register("kv", np.full(16, 1, np.uint8))
    b.register("gone", np.full(16, 1, np.uint8))
    f = a.read(b.name, "back", 0, "kv", 0, 16)
    g = a.read(b.name, "back", 0, "gone", 0, 16)
    assert pacer.held.wait(10)
    b.deregister("kv")
    b.register("kv", np.full(16, 2, np.uint8))
    b.deregister("gone")
    pacer.gate.set()
    assert f.result(10) == 16
    with pytest.raises(RegionError, match="no region 'gone'"):
        g.result(10)
    assert (back == 2).all(), "the read copied the deregistered buffer"


def test_inproc_a_zero_byte_write_to_a_region_deregistered_meanwhile_fails():
    from transport.inproc import InProcFabric, InProcTransport

    fabric = InProcFabric()
    a, b = InProcTransport("z8a", fabric=fabric), InProcTransport("z8b", fabric=fabric)
    try:
        a.connect("z8b")
        a.register("src", np.zeros(8, np.uint8))
        b.register("kv", np.zeros(8, np.uint8))
        gate = threading.Event()
        lane_hold = a._submit("z8b", "low", lambda: gate.wait(10))  # (holds the lane: the write stays queued)
        f = a.write("z8b", "src", 0, "kv", 0, 0)
        b.deregister("kv")
        gate.set()
        assert lane_hold.result(10)
        with pytest.raises(RegionError, match="no region 'kv'"):
            f.result(10)
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- models

_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
}
_DEEPSEEK_V2 = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
}


@pytest.mark.parametrize(
    "hf", [_QWEN2, dict(_QWEN2, architectures=["LlamaForCausalLM"]), _DEEPSEEK_V2], ids=["qwen2", "llama", "deepseek"]
)
def test_hidden_act_swish_is_silu_with_the_same_fingerprint(hf):
    from models.registry import config_from_hf

    silu = config_from_hf(dict(hf, hidden_act="silu"))
    swish = config_from_hf(dict(hf, hidden_act="swish"))
    assert swish == silu == config_from_hf(dict(hf))  # (absent: HF's default, silu)
    assert swish.fingerprint() == silu.fingerprint()
    for act in ("gelu", "Swish", "swish_beta", "silu ", None, ["silu"]):
        with pytest.raises(ValueError, match="hidden_act=.* is not supported"):
            config_from_hf(dict(hf, hidden_act=act))


# ---------------------------------------------------------------- runtime


def _service(groups, heartbeat_timeout_s=60.0, clock=None):
    import schedulers
    from dualpath_jax.runtime.lifecycle import ConversationBook
    from dualpath_jax.runtime.scheduler_service import GlobalScheduler
    from dualpath_jax.workloads.types import Trajectory, Turn

    trajs = [Trajectory(i, [Turn(40, 3)]) for i in range(2)]
    kw = {} if clock is None else {"clock": clock}
    return GlobalScheduler(
        groups,
        schedulers.make_policy("basic"),
        ConversationBook(trajs, vocab_size=50, seed=0),
        lookup_hit_blocks=lambda keys: len(keys),  # every whole block is a hit: reads queued on the SNICs
        block_keys_of=lambda ids: block_keys(ids, 4),
        block_size=4,
        hbm_tokens_per_decode_engine=4096,
        heartbeat_timeout_s=heartbeat_timeout_s,
        **kw,
    )


def test_a_node_declared_dead_reports_no_stale_storage_nic_queue():
    """PE node 0 reports 36 hit tokens queued on its SNIC, is stopped past the heartbeat timeout and declared dead,
    then continues and fetches again: its node stats show no queue (it was cancelled), its later counters are kept,
    and neither its engines nor its read tokens are in the policy's snapshot."""
    from dualpath_jax.runtime.control import GroupReport
    from dualpath_jax.runtime.scheduler_service import GroupSpec

    now = [1000.0]
    groups = [GroupSpec(0, "prefill", [0]), GroupSpec(1, "prefill", [1]), GroupSpec(2, "decode", [2])]
    svc = _service(groups, heartbeat_timeout_s=5.0, clock=lambda: now[0])

    def fetch(node, **stats):
        g = groups[node]
        rep = GroupReport(node, g.role, g.engine_ids, address={e: "a" for e in g.engine_ids}, stats=stats)
        return svc.fetch(rep)

    fetch(2)
    fetch(1)
    tasks = fetch(0).tasks
    assert tasks and all(t.prefill_engine == 0 for t in tasks)
    queued = sum(t.pe_read_blocks for t in tasks) * 4
    assert queued > 0
    assert svc.snapshot().nodes[0].read_queue_tokens == queued
    fetch(0, read_queue_tokens=queued, pending_writes=2, snic_bytes_read=100, failed_reads=0)
    now[0] += 6.0  # node 0 is stopped; the others go on fetching
    fetch(1)
    fetch(2)
    assert svc.check_heartbeats() == [0]
    st = svc.stats[0]
    assert (st["read_queue_tokens"], st["pending_writes"], st["dead"]) == (0, 0, True)
    assert st["snic_bytes_read"] == 100
    snap = svc.snapshot()
    assert 0 not in snap.nodes and 0 not in snap.engines
    assert sum(n.read_queue_tokens for n in snap.nodes.values()) == 0  # its re-run requests are not placed yet
    # Continued: its next fetch (the SNIC still holding its old reads) is told to stop; its counters are taken.
    assert fetch(0, read_queue_tokens=queued, pending_writes=1, snic_bytes_read=300, failed_reads=1).shutdown
    st = svc.stats[0]
    assert (st["read_queue_tokens"], st["pending_writes"], st["dead"]) == (0, 0, True)
    assert (st["snic_bytes_read"], st["failed_reads"]) == (300, 1)
    # The re-run requests go to the live PE; its read queue holds only theirs.
    placed = fetch(1).tasks
    assert {t.request_id for t in placed} == {t.request_id for t in tasks}
    assert all(t.prefill_engine == 1 for t in placed)
    snap = svc.snapshot()
    assert 0 not in snap.nodes
    assert snap.nodes[1].read_queue_tokens == sum(t.pe_read_blocks for t in placed) * 4
    assert "dead" not in svc.stats[1]


def test_a_dead_nodes_report_with_bad_stats_is_still_told_to_stop():
    from dualpath_jax.runtime.control import GroupReport
    from dualpath_jax.runtime.scheduler_service import GroupSpec

    groups = [GroupSpec(0, "prefill", [0]), GroupSpec(1, "decode", [1])]
    svc = _service(groups)
    svc.declare_dead(0)
    assert 0 not in svc.stats  # never reported: nothing made up
    assert svc.fetch(GroupReport(0, "prefill", [0], address=None, stats=None)).shutdown
    assert svc.stats[0] == {"dead": True}
