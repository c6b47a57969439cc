"""Tests that kill hand mutations the rest of the suite let pass (an audit of the suite: each test names the
mutation of the code it guards against, e.g. "the CNIC weights 99:1 changed to 9:1")."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import socket
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from dualpath_jax import compiled
from dualpath_jax.host_buffers import HostBufferPool
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.metrics import percentile
from dualpath_jax.traffic import DEFAULT_CNIC_WEIGHTS, ClusterLinks, Link, Pacer, TrafficManager
from schedulers import ClusterSnapshot, EngineState, NodeState, PendingRequest, make_policy
from schedulers.api import PrefillWork
from schedulers.batching import ComputeQuotaBatcher
from transport import tcp
from transport.feeder import KVMissError, LayerFeeder, StoreLayerSource

# ---- traffic: CNIC classes and start-time fair queuing -----------------------------------------------------


def test_cnic_classes_share_99_to_1_under_contention():
    """PAPER.md "QoS": model collectives (high) get ~99% of a CNIC under contention, KV (low) ~1%: the default
    weights of a CNIC, of ClusterLinks and the SFQ charge of a chunk (its bytes / its class's weight)."""
    assert DEFAULT_CNIC_WEIGHTS == {"high": 99.0, "low": 1.0}
    assert ClusterLinks(snic_bytes_per_s=1e9, cnic_bytes_per_s=1e9).cnic_weights == {"high": 99.0, "low": 1.0}
    tm = TrafficManager()
    link = tm.add_cnic(0, math.inf)
    assert link.weights == {"high": 99.0, "low": 1.0}
    hi = link.enqueue(9900, "high")
    lo = link.enqueue(9900, "low")
    assert hi.charge - hi.start_tag == pytest.approx(100.0)  # 9900 B / 99
    assert lo.charge - lo.start_tag == pytest.approx(9900.0)  # 9900 B / 1


def test_a_class_back_from_idle_starts_at_the_virtual_time():
    """Start-time fair queuing: a chunk's start tag is max(virtual time, its class's last finish tag), so a class
    that was idle while the other moved on does not get the bytes it did not ask for then (a start tag at its
    old finish tag would put it ahead of every chunk of the other class queued since)."""
    link = Link("cnic/engine0", 1e12, weights={"high": 1.0, "low": 1.0})
    first = link.enqueue(1000, "low")
    highs = [link.enqueue(1000, "high") for _ in range(10)]
    for t in (first, *highs):
        link.wait(t, time.monotonic() + 5.0)
        assert t.slot is not None
    assert highs[-1].start_tag == pytest.approx(9000.0)
    back = link.enqueue(1000, "low")  # low's last finish tag is 1000; the virtual time is 9000
    assert back.start_tag == pytest.approx(9000.0)
    link.cancel(back)


def test_the_virtual_time_never_goes_back():
    """SFQ's virtual time is the largest start tag granted so far: a chunk held back (its path's previous chunk
    had no slot yet) and granted after later ones must not move it back, or a class back from idle would start
    at a tag below chunks already served."""
    link = Link("cnic/engine0", 1e12, weights={"high": 1.0, "low": 1.0})
    joint = link.enqueue(1000, "low", joint=True)  # a multi-link chunk: its turn, no slot here yet
    assert joint.ready
    held = link.enqueue(1000, "low", after=joint)  # waits for `joint`'s slot (start tag 1000)
    highs = [link.enqueue(1000, "high") for _ in range(5)]  # start tags 0..4000, granted now
    for t in highs:
        link.wait(t, time.monotonic() + 5.0)
        assert t.slot is not None
    assert held.slot is None
    link.cancel(joint)  # the path gave up its chunk: `held` may go now (start tag 1000 < virtual time 4000)
    link.wait(held, time.monotonic() + 5.0)
    assert held.slot is not None
    back = link.enqueue(1000, "low")  # low's last finish tag is 2000; the virtual time is 4000
    assert back.start_tag == pytest.approx(4000.0)
    link.cancel(back)


def test_a_joint_slot_is_free_on_every_link_of_the_path():
    """A multi-link chunk's slot is the earliest one free on every link at once (searched until no link moves it
    later): link a is booked for [0, 1) s from now, link b for [1.2, 2.0); a 0.5 s chunk fits a after 1.0 but
    overlaps b there, so it starts at 2.0, not 1.0."""
    a = Link("dram/node0", 1e6, weights={"low": 1.0}, burst_s=0.0)
    b = Link("cnic/engine0", 1e6, weights={"low": 1.0}, burst_s=0.0)
    now = time.monotonic()
    with a.lock, b.lock:
        a._hold(now + 1e-3, 1.0 - 1e-3)
        b._hold(now + 1.2, 0.8)
    tickets = [a.enqueue(500_000, "low", joint=True), b.enqueue(500_000, "low", joint=True)]  # 0.5 s on each
    start = Pacer([a, b])._reserve(tickets)
    assert start == pytest.approx(now + 2.0, abs=1e-6)


def test_a_link_twice_on_a_path_is_booked_twice():
    """A chunk whose path crosses one link twice (a DRAM link read and written) holds that link for both
    crossings: 2 x 1 ms for 1000 B at 1 MB/s."""
    a = Link("dram/node0", 1e6, weights={"low": 1.0}, burst_s=0.0)
    tickets = [a.enqueue(1000, "low", joint=True), a.enqueue(1000, "low", joint=True)]
    start = Pacer([a, a])._reserve(tickets)
    assert a._busy_until - start == pytest.approx(2e-3)


# ---- host buffers -------------------------------------------------------------------------------------------


def test_contiguous_slots_are_not_handed_out_again():
    """A contiguous acquire takes its slots out of the free list too: a later (non-contiguous) acquire must not
    get any of them (two requests would write the same host memory)."""
    pool = HostBufferPool(slot_nbytes=4096, num_slots=4, name="t")
    a = pool.acquire(nslots=2, contiguous=True)
    b = pool.acquire(nslots=2, timeout=0)
    assert not set(a.slots) & set(b.slots)
    assert sorted(a.slots + b.slots) == [0, 1, 2, 3]
    with pytest.raises(Exception, match="no 1 free"):
        pool.acquire(nslots=1, timeout=0)
    a.release()
    b.release()
    assert pool.free_slots == 4


# ---- transport: the shared-secret handshake -----------------------------------------------------------------


def test_proofs_of_the_two_roles_differ():
    """The HMAC proof names its role, so a server's proof cannot be reflected back as a client's (or the
    reverse) for the same nonces and names."""
    args = (b"n" * 32, b"m" * 32, "a", "b")
    assert tcp._proof(b"s", b"server", *args) != tcp._proof(b"s", b"client", *args)


def _frame(sock: socket.socket, op: int, payload: bytes) -> None:
    sock.sendall(tcp.pack_header(op, length=len(payload)) + payload)


def _recv_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """(op, payload) of the next frame, or None when the peer closed the connection."""
    buf = b""
    while len(buf) < tcp.HEADER.size:
        chunk = sock.recv(tcp.HEADER.size - len(buf))
        if not chunk:
            return None
        buf += chunk
    op, _, _, _, length, _, _ = tcp.unpack_header(buf)
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            return None
        data += chunk
    return op, data


def test_the_server_checks_the_clients_proof():
    """A client that skips the check of the server's proof and answers with a made-up proof of its own is
    refused by the server (no AUTH_OK, the connection closed), not admitted as a peer."""
    srv = tcp.TcpTransport("guarded", secret="s3cret")
    try:
        sock = socket.create_connection(srv.address, timeout=10)
        sock.settimeout(10)
        hello = {
            "name": "intruder",
            "peer": "guarded",
            "session": "x",
            "stream": tcp.STREAMS[0],
            "nonce": os.urandom(32).hex(),
            "auth": True,
        }
        _frame(sock, tcp.OP_HELLO, json.dumps(hello).encode())
        op, data = _recv_frame(sock)
        assert op == tcp.OP_HELLO_ACK and json.loads(data)["auth"] is True
        _frame(sock, tcp.OP_AUTH, b"0" * 64)  # not a proof of the secret
        try:
            reply = _recv_frame(sock)
        except OSError:  # (reset by the server)
            reply = None
        assert reply is None or reply[0] != tcp.OP_AUTH_OK
        sock.close()
        assert "intruder" not in srv.peers()
    finally:
        srv.close()


def test_the_server_refuses_an_oversized_hello_at_once():
    """A HELLO longer than HANDSHAKE_MAX is refused when its header arrives (the connection closed), not read: an
    unauthenticated client must not make the server wait for (or buffer) a payload of any length it names."""
    srv = tcp.TcpTransport("guarded", handshake_timeout_s=60.0)
    try:
        sock = socket.create_connection(srv.address, timeout=20)
        sock.settimeout(20)
        sock.sendall(tcp.pack_header(tcp.OP_HELLO, length=tcp.HANDSHAKE_MAX + 1))
        try:
            got = sock.recv(1)
        except ConnectionResetError:
            got = b""
        assert got == b""  # closed by the server (a timeout here: it waited for the payload)
        sock.close()
    finally:
        srv.close()


def test_a_header_with_a_changed_field_fails_its_checksum():
    """Every frame header carries a crc32 of its first 44 bytes: a flipped bit in a field (here the length) is
    a ProtocolError, not a frame of another length."""
    hdr = bytearray(tcp.pack_header(tcp.OP_WRITE, region=3, offset=64, length=4096, tag=7, req=9))
    assert tcp.unpack_header(bytes(hdr)) == (tcp.OP_WRITE, 0, 3, 64, 4096, 7, 9)
    hdr[25] ^= 0x10  # a bit of the length field (bytes 20-27)
    with pytest.raises(tcp.ProtocolError, match="checksum"):
        tcp.unpack_header(bytes(hdr))


def test_a_reply_of_another_length_completes_no_request():
    """A write or read reply must match its request's length (and kind): a mismatch is a ProtocolError that
    leaves the request pending (the peer is then failed), never a read completed with other bytes."""
    peer = tcp._Peer(None, "p")
    peer.add(1, tcp._request("read", 64, memoryview(bytearray(64))))
    peer.add(2, tcp._request("write", 128))
    with pytest.raises(tcp.ProtocolError, match="32 bytes for a 64-byte request"):
        peer.pop(1, "read", 32)
    with pytest.raises(tcp.ProtocolError, match="64 bytes for a 128-byte request"):
        peer.pop(2, "write", 64)
    with pytest.raises(tcp.ProtocolError, match="unknown request"):
        peer.pop(2, "read", 128)
    assert sorted(peer.pending) == [1, 2]
    assert peer.pop(1, "read", 64).length == 64
    assert peer.pop(2, "write", 128).length == 128
    assert not peer.pending


# ---- simulator network: low-class capacity, max-min fairness, caps (the compiled module and its Python twin) -----


def _network_source():
    """network.py loaded from its source (the Python twin), beside the module the simulator runs."""
    path = os.path.join(os.path.dirname(compiled.load("dualpath_jax.sim.network").__file__), "network.py")
    spec = importlib.util.spec_from_file_location("_network_source_for_mutation_audit", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(params=["loaded", "source"])
def net_mod(request):
    return compiled.load("dualpath_jax.sim.network") if request.param == "loaded" else _network_source()


def _net(mod, caps):
    net = mod.FlowNetwork(bucket_s=1.0)
    net.scheduler = lambda t, f, version: None
    return net, [net.add_link(f"l{i}", c) for i, c in enumerate(caps)]


def test_high_class_takes_at_most_its_share(net_mod):
    """PAPER.md "QoS": collectives take ~99% of a CNIC under contention, so KV flows keep 1% even when the high
    class asks for more than the whole link; when it asks for less, KV gets the rest (work conservation)."""
    net, (link,) = _net(net_mod, [100.0])
    f = net.start_flow([link], 1e6, 0.0, lambda: None)
    assert f.rate == pytest.approx(100.0)
    net.set_high_load(link, 1000.0, 0.0)
    assert net.low_capacity(link) == pytest.approx(1.0)
    assert f.rate == pytest.approx(1.0)
    net.set_high_load(link, 40.0, 0.0)
    assert net.low_capacity(link) == pytest.approx(60.0)
    assert f.rate == pytest.approx(60.0)


def test_progressive_filling_takes_the_tightest_link_after_each_freeze(net_mod):
    """Max-min fairness where a link's fair share grows as flows on it are frozen elsewhere: links of 4, 10 and 11
    B/s, flows a (links 0, 1), b (1, 2), c (2). a is frozen at 4 by link 0; then link 2 (11 / 2 = 5.5) binds
    before link 1 (its share grew from 5 to 6): b = c = 5.5, as the reference `max_min_rates` gives."""
    caps, paths = [4.0, 10.0, 11.0], [(0, 1), (1, 2), (2,)]
    net, _ = _net(net_mod, caps)
    flows = net.start_flows([(p, 1e6, lambda: None, math.inf) for p in paths], 0.0)
    want = net_mod.max_min_rates(caps, paths)
    assert want == pytest.approx([4.0, 5.5, 5.5])
    assert [f.rate for f in flows] == pytest.approx(want)


def test_a_lone_flow_keeps_its_cap(net_mod):
    """A storage read stream has a per-flow cap (read_cap): alone on a faster link it moves at its cap."""
    net, (link,) = _net(net_mod, [10.0])
    f = net.start_flow([link], 1e6, 0.0, lambda: None, 3.0)
    assert f.rate == pytest.approx(3.0)
    g = net.start_flow([link], 1e6, 0.0, lambda: None)
    assert (f.rate, g.rate) == pytest.approx((3.0, 7.0))


# ---- feeder: prefetch depth -----------------------------------------------------------------------------------


def test_the_feeder_loads_at_most_prefetch_layers_ahead():
    """`prefetch` layers load ahead of the one being computed, no more (PE HBM holds one layer's KV of the batch
    plus the prefetched ones; staging is reused round-robin): with prefetch=1, while the consumer holds layer 0
    only layer 1 loads; layer 2 loads once the consumer moves on to layer 1."""
    called: list[int] = []
    third = threading.Event()

    def source(layer, out):
        called.append(layer)
        out[:] = layer
        if layer == 2:
            third.set()
        return out

    with LayerFeeder(4, source, 64, prefetch=1, to_device=np.array) as f:
        assert int(f.wait_for_layer(0)[0]) == 0
        assert not third.wait(1.0)  # (the loader is held back: it never gets there while layer 0 is held)
        assert called == [0, 1]
        assert int(f.wait_for_layer(1)[0]) == 1
        assert third.wait(10.0)
        assert int(f.wait_for_layer(2)[0]) == 2


# ---- schedulers: a DE with exactly the room a request needs -----------------------------------------------------


@pytest.mark.parametrize("policy", ["basic", "dualpath"])
def test_a_de_with_exactly_enough_free_hbm_takes_the_request(policy):
    """A DE is a candidate when its free HBM tokens >= the request's prompt + generation (a DE with exactly
    that much room fits it; one token less does not)."""
    r = PendingRequest(request_id=1, trajectory_id=1, turn_index=0, prompt_tokens=1000, hit_tokens=900, gen_tokens=100)
    for free, placed in ((r.total_tokens, True), (r.total_tokens - 1, False)):
        snap = ClusterSnapshot(
            now=0.0,
            engines={
                0: EngineState(0, "prefill", 0, seq=0, tok=0, free_hbm_tokens=10**9),
                100: EngineState(100, "decode", 10, seq=0, tok=0, free_hbm_tokens=free),
            },
            nodes={0: NodeState(0, "prefill", read_queue_tokens=0), 10: NodeState(10, "decode", read_queue_tokens=0)},
        )
        out = make_policy(policy).schedule(snap, [r])
        assert [(a.request_id, a.prefill_engine, a.decode_engine) for a in out] == ([(1, 0, 100)] if placed else [])


def test_saves_run_in_layer_order_on_a_copy_taken_at_the_call():
    """`save_layer` hands new KV to the saver in the background, in order (one save worker: the DE sees layer
    l+1's KV after layer l's), and a host array is copied at the call, so the caller may reuse it at once (saved
    later, it was whatever the array held by then)."""
    order: list[tuple[int, int]] = []
    release, second_ran = threading.Event(), threading.Event()

    def saver(layer, host):
        if layer == 0:
            release.wait(10.0)
        else:
            second_ran.set()
        order.append((layer, int(host[0])))

    with LayerFeeder(2, lambda layer, out: out, 8, saver=saver) as f:
        kv = np.full(8, 7, np.uint8)
        f.save_layer(0, kv)
        kv[:] = 9  # the caller reuses its buffer for the next layer
        f.save_layer(1, kv)
        assert not second_ran.wait(1.0)  # layer 1 waits for layer 0's save
        release.set()
        f.wait_for_save(timeout=10.0)
    assert order == [(0, 7), (1, 9)]


class _FakeStore:
    """A store whose blocks named in `missing` are misses; reads fill the row with the block's index."""

    def __init__(self, missing=()):
        self.missing = set(missing)

    def read(self, key, out, layers):
        if key in self.missing:
            return False
        out[:] = key
        return True

    def submit_read(self, key, out, layers):
        fut = Future()
        fut.set_result(self.read(key, out, layers))
        return fut


class _CountingPacer:
    def __init__(self):
        self.paced = []

    def pace(self, nbytes, priority="low"):
        self.paced.append((nbytes, priority))


@pytest.mark.parametrize("parallel", [True, False])
def test_a_store_source_paces_every_block_it_read(parallel):
    """The PE-side read of a layer paces each Layer Block it read over the SNIC once (KV: the low class), with the
    store's parallel reads as with sequential ones; a miss moves no bytes."""
    layout = BlockLayout(num_layers=2, block_tokens=4, bytes_per_token_per_layer=8, fingerprint="audit")
    pacer = _CountingPacer()
    src = StoreLayerSource(_FakeStore(), [1, 2, 3], layout, pacer=pacer, parallel=parallel)
    out = np.zeros(3 * layout.layer_block_nbytes, np.uint8)
    src(1, out)
    assert out.reshape(3, -1)[:, 0].tolist() == [1, 2, 3]
    assert pacer.paced == [(layout.layer_block_nbytes, "low")] * 3
    pacer.paced.clear()
    src = StoreLayerSource(_FakeStore(missing={1}), [1, 2, 3], layout, pacer=pacer, parallel=parallel)
    with pytest.raises(KVMissError):
        src(0, out)
    assert sum(n for n, _ in pacer.paced) <= 2 * layout.layer_block_nbytes


class _TokenCost:
    """Attention time = new tokens (s): exact floats, so a chunk can take exactly the quota."""

    def attention_time(self, cached, bsz):
        return float(bsz)


def test_a_chunk_that_takes_exactly_the_quota_fits():
    """compute_quota takes the largest chunk whose predicted attention time is <= the quota (PAPER.md
    "Intra-engine": 300 ms): with 1 s per token and a 5 s quota, the head request of 10 tokens gets 5 of them;
    behind 2 tokens of another request, 3."""
    b = ComputeQuotaBatcher(ComputeQuotaBatcher.Config(quota_s=5.0, cost_model=_TokenCost()))
    assert [(i.request_id, i.bsz) for i in b.form_batch([PrefillWork(1, 0, 10)])] == [(1, 5)]
    assert [(i.request_id, i.bsz) for i in b.form_batch([PrefillWork(1, 0, 2), PrefillWork(2, 7, 10)])] == [
        (1, 2),
        (2, 3),
    ]


# ---- metrics: percentiles beside an infinite value ------------------------------------------------------------------


def test_percentiles_interpolate_between_finite_neighbours_of_an_infinite_value():
    """A TTFT of inf (a turn that never got its first token) counts as one value; percentiles that fall between
    two finite values still interpolate as numpy does (p50 of [1, 2, 3, inf] is 2.5, not 2)."""
    vals = [1.0, 2.0, 3.0, math.inf]
    for q in (10, 50, 60):
        assert percentile(vals, q) == pytest.approx(float(np.percentile([1.0, 2.0, 3.0, 1e300], q)))
    assert percentile(vals, 50) == pytest.approx(2.5)
    assert percentile(vals, 100) == math.inf


@pytest.mark.parametrize("n_requests", [2, 3])
@pytest.mark.parametrize("num", [int, float])
def test_a_de_group_whose_free_hbm_exactly_fits_r_keeps_it_open(num, n_requests):
    """DE phase 1: a request joins its group's R while Σ len_r <= the group's free HBM (a fit to the token is a
    fit), and Z = z_slack (Σ_R len_r + Σ tok_e) / |E| follows. Two requests of 1000 tokens fill a group of 2 x
    1000 free tokens exactly: Z = 1.5 (2000 + 1000) / 2 = 2250, so DE 100 (tok 1000, seq 0) is within Z and,
    with the lower seq, takes the first request (had R closed at 1000, Z = 1500: DE 101 would). Integer loads
    and float loads (the tuple loop) alike; a third request (R closes past it: the loop that closes groups, not
    the one that only assigns) finds no DE with room."""
    snap = ClusterSnapshot(
        now=0.0,
        engines={
            0: EngineState(0, "prefill", 0, seq=0, tok=num(0), free_hbm_tokens=10**9),
            100: EngineState(100, "decode", 10, seq=0, tok=num(1000), free_hbm_tokens=num(1000)),
            101: EngineState(101, "decode", 10, seq=1, tok=num(0), free_hbm_tokens=num(1000)),
        },
        nodes={0: NodeState(0, "prefill", read_queue_tokens=0), 10: NodeState(10, "decode", read_queue_tokens=0)},
    )
    queue = [
        PendingRequest(request_id=i, trajectory_id=i, turn_index=0, prompt_tokens=900, hit_tokens=800, gen_tokens=100)
        for i in range(1, n_requests + 1)
    ]
    out = make_policy("dualpath", z_slack=1.5).schedule(snap, queue)
    assert [(a.request_id, a.decode_engine) for a in out] == [(1, 100), (2, 101)]


# ---- simulator: a turn's read phase starts with its first read ------------------------------------------------------


def test_a_split_turns_read_phase_starts_at_its_first_read():
    """`read_start` is when the first storage read of the turn's hit began (metrics.TurnRecord), so its read phase
    [read_start, read_end] holds each side's read whole: no side's bytes can have moved faster than one read
    stream's cap (read_stream_gbps). Split reads on both sides, one read at a time per node (queues on both), where
    a read_start taken at the turn's last read to start cut the phase short of its first read."""
    from dualpath_jax.sim import load_sim_config, run

    cfg = load_sim_config("configs/sim_tiny.py:dualpath,agents=16,turns=4")
    cfg = dataclasses.replace(cfg, policy="split", cluster=dataclasses.replace(cfg.cluster, max_reads_per_node=1))
    assert cfg.cluster.read_stream_gbps > 0
    cap = cfg.cluster.read_stream_gbps * 1e9
    recs = run(cfg).records
    assert any(r.pe_read_bytes and r.de_read_bytes for r in recs)
    for r in recs:
        if r.pe_read_bytes or r.de_read_bytes:
            assert r.read_end - r.read_start >= max(r.pe_read_bytes, r.de_read_bytes) / cap * (1 - 1e-9), r


def test_layerwise_prefill_pays_one_layer_of_pipeline_fill():
    """Layerwise prefill overlaps the load of layer l+1 with the compute of layer l, so a forward takes its
    compute plus one layer of fill/drain (compute / L); with all I/O free (oracle) it is the compute alone. A first
    turn (nothing to read, its KV out to the DE much faster than the compute): layerwise = oracle x (1 + 1/L)."""
    from dualpath_jax.sim import load_sim_config, run
    from dualpath_jax.workloads.types import Trajectory, Turn
    from schedulers.cost_model import MODEL_SHAPES

    took = {}
    for mode in ("layerwise", "oracle"):
        cfg = load_sim_config(f"configs/sim_tiny.py:{mode}")
        (r,) = run(cfg, [Trajectory(0, [Turn(2000, 5)])]).records
        took[mode] = r.prefill_end - r.prefill_start
    layers = MODEL_SHAPES.get(cfg.cluster.model).layers
    assert took["layerwise"] == pytest.approx(took["oracle"] * (1 + 1 / layers), rel=1e-9)


# ---- runtime scheduler service: the snapshot's PE loads ---------------------------------------------------------------


def test_a_finished_prefill_leaves_its_pe_load_in_the_runtime_snapshot(tmp_path):
    """DESIGN.md "Scheduler": a PE's load in the snapshot is its unfinished requests and tokens. Once the PE
    reports `prefill_end`, the request's prompt no longer counts on the PE (it still counts on its DE until the turn
    is done), as the simulator's `_prefill_done` takes it off."""
    from dualpath_jax.block_keys import block_keys
    from dualpath_jax.kv_store import LocalDirStore
    from dualpath_jax.runtime.control import Event, GroupReport
    from dualpath_jax.runtime.lifecycle import ConversationBook
    from dualpath_jax.runtime.scheduler_service import GlobalScheduler, GroupSpec
    from dualpath_jax.workloads.types import Trajectory, Turn

    groups = [GroupSpec(0, "prefill", [0]), GroupSpec(1, "decode", [1])]
    store = LocalDirStore(tmp_path / "kv", BlockLayout(2, 4, 8, "test-model"))
    try:
        svc = GlobalScheduler(
            groups,
            make_policy("round_robin"),
            ConversationBook([Trajectory(0, [Turn(10, 2)])], vocab_size=50, seed=0),
            lookup_hit_blocks=store.lookup,
            block_keys_of=lambda ids: block_keys(ids, 4),
            block_size=4,
            hbm_tokens_per_decode_engine=4096,
            heartbeat_timeout_s=60.0,
            clock=lambda: 1000.0,
        )

        def fetch(node, events=()):
            g = groups[node]
            report = GroupReport(node, g.role, g.engine_ids, address={e: f"a{e}" for e in g.engine_ids}, events=events)
            return svc.fetch(report)

        fetch(1)
        (task,) = fetch(0).tasks
        snap = svc.snapshot()
        assert (snap.engines[0].seq, snap.engines[0].tok) == (1, 10)
        assert (snap.engines[1].seq, snap.engines[1].tok) == (1, 12)
        fetch(0, [Event("prefill_end", task.request_id, task.attempt, svc.t0 + 0.1, {"hit_tokens": 0})])
        snap = svc.snapshot()
        assert (snap.engines[0].seq, snap.engines[0].tok) == (0, 0)
        assert (snap.engines[1].seq, snap.engines[1].tok) == (1, 12)
    finally:
        svc.stop()
        store.close()
