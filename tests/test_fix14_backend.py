"""Fix pass 14, "a transport backend of one's own": a researcher's new interconnect plugged in as a transport backend,
walked as README "Transports" promises: the conformance suite run on it, built by `make_transport`, selected by
`config.transport` for a runtime run, under the layer feeder.

`RingTransport` ("ring") is that researcher's backend, written here from the `Transport` contract only (no code of
the built-in backends): endpoints of one process find each other on a ring (a name -> endpoint map); every posted
transfer or message goes into its class's queue, drained in posting order by one thread per class, which copies the
bytes chunk by chunk (each chunk paced by the endpoint's pacer) into the peer's region as registered when it lands.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future, InvalidStateError
from pathlib import Path

import pytest

from transport.base import (
    PRIORITIES,
    TRANSPORTS,
    Notification,
    PeerLostError,
    PostedFuture,
    RegionError,
    Transport,
    TransportClosedError,
    check_notify,
    check_priority,
)

TESTS = Path(__file__).resolve().parent
CHUNK = 64 << 10  # bytes a copy moves (and asks its pacer for) at a time
_RING: dict[str, RingTransport] = {}  # endpoint name -> endpoint
_RING_LOCK = threading.Lock()  # held while a chunk, notification or message lands, and while links change


class _Link:
    """Two connected endpoints; `dead` once either disconnected or closed (nothing lands on it any more)."""

    def __init__(self) -> None:
        self.dead: BaseException | None = None


class RingTransport(Transport):
    """An in-process ring endpoint; `address` is ("ring", name)."""

    backend = "ring"
    crosses_processes = False  # (its endpoints meet in this process: the runtime refuses it with other launchers)

    def __init__(self, name: str, pacer=None, chunk_bytes: int = CHUNK):
        super().__init__(name, pacer)
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"ring endpoint {name!r}: chunk_bytes must be an int >= 1, got {chunk_bytes!r}")
        self.chunk_bytes = chunk_bytes
        self._links: dict[str, tuple[RingTransport, _Link]] = {}
        self._pending: set[Future] = set()
        self._queues = {p: queue.SimpleQueue() for p in PRIORITIES}
        with _RING_LOCK:
            old = _RING.get(name)
            if old is not None and not old.closed:
                raise ValueError(f"ring endpoint name {name!r} is already in use")
            _RING[name] = self
        self._workers = [
            threading.Thread(target=self._drain, args=(q,), name=f"ring-{name}-{p}", daemon=True)
            for p, q in self._queues.items()
        ]
        for t in self._workers:
            t.start()

    @property
    def address(self) -> tuple[str, str]:
        return ("ring", self.name)

    def connect(self, peer: str, address, timeout: float = 10.0) -> None:
        self._check_open()
        if not (isinstance(address, tuple) and len(address) == 2 and address[0] == "ring"):
            raise PeerLostError(f"{self.name}: {address!r} is not a ring address")
        with _RING_LOCK:
            ep = _RING.get(address[1])
            if ep is None or ep.closed:
                raise PeerLostError(f"{self.name}: no ring endpoint at {address!r}")
            if ep.name != peer:
                raise PeerLostError(f"{self.name}: the endpoint at {address!r} is {ep.name!r}, expected {peer!r}")
            if peer not in self._links:
                link = _Link()
                self._links[peer] = (ep, link)
                ep._links[self.name] = (self, link)

    def peers(self) -> list[str]:
        with _RING_LOCK:
            return sorted(self._links)

    def disconnect(self, peer: str) -> None:
        with _RING_LOCK:  # (a chunk lands with it held: none lands once this returned)
            self._drop(peer, PeerLostError(f"{self.name!r} disconnected from {peer!r}"))

    def _drop(self, peer: str, err: BaseException) -> None:
        """Forget the link to `peer` on both ends (`_RING_LOCK` held); its queued transfers fail when reached."""
        got = self._links.pop(peer, None)
        if got is not None:
            ep, link = got
            link.dead = err
            if ep._links.get(self.name, (None, None))[1] is link:
                del ep._links[self.name]

    def _link(self, peer: str) -> tuple[RingTransport, _Link]:
        self._check_open()
        got = self._links.get(peer)
        if got is None:
            raise PeerLostError(f"{self.name}: not connected to {peer!r}")
        return got

    # ---- posting -------------------------------------------------------------------------------------------
    def _post(self, priority: str, link: _Link, fn) -> Future:
        fut = PostedFuture()
        with self._lock:
            self._check_open()
            self._pending.add(fut)
        self._queues[priority].put((fut, link, fn))
        return fut

    def _drain(self, q: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            fut, link, fn = item
            if fut.done():  # (failed by close)
                continue
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - surfaced through the future
                with contextlib.suppress(InvalidStateError):
                    fut.set_exception(e)
            else:
                with contextlib.suppress(InvalidStateError):
                    fut.set_result(result)
            with self._lock:
                self._pending.discard(fut)

    def _check_link(self, ep: RingTransport, link: _Link) -> None:
        if self._closed:
            raise TransportClosedError(f"endpoint {self.name!r} closed during the transfer")
        if link.dead is not None or ep.closed:
            raise PeerLostError(f"link to {ep.name!r} dropped: {link.dead}")

    def _move(self, ep, link, src_of, dst_of, n: int, priority: str) -> None:
        """Copy n bytes chunk by chunk; `src_of()` / `dst_of()` give (region, offset) as registered now."""
        pos = 0
        for step in self._paced_chunks(n, priority, self.chunk_bytes, lambda: self._check_link(ep, link)):
            with _RING_LOCK:
                self._check_link(ep, link)
                (s, so), (d, do) = src_of(), dst_of()
                d.view[do + pos : do + pos + step] = s.view[so + pos : so + pos + step]
            pos += step
        if not n:
            with _RING_LOCK:
                self._check_link(ep, link)
                src_of(), dst_of()

    @staticmethod
    def _peer_region(ep: RingTransport, name: str, offset: int, n: int):
        region = ep._regions.get(name)
        if region is None:
            raise RegionError(f"peer {ep.name!r} has no region {name!r} (deregistered after the transfer was posted)")
        return region, region.check(offset, n, f"landing in {ep.name}:{name}")[0]

    def write(
        self, peer, local_region, local_offset, remote_region, remote_offset, length, priority="low", notify=None
    ):
        check_priority(priority)
        tag = check_notify(notify)
        ep, link = self._link(peer)
        src = self.region(local_region)
        local_offset, length = src.check(local_offset, length, f"write from {self.name}:{local_region}")
        remote_offset, _ = ep.region(remote_region).check(remote_offset, length, f"write to {peer}:{remote_region}")

        def run() -> int:
            self._move(
                ep,
                link,
                lambda: (src, local_offset),
                lambda: self._peer_region(ep, remote_region, remote_offset, length),
                length,
                priority,
            )
            if tag is not None:
                with _RING_LOCK:
                    self._check_link(ep, link)
                    ep.completions.put(Notification(self.name, tag, remote_region, remote_offset, length))
            return length

        return self._post(priority, link, run)

    def _check_remote_range(self, peer, region, offset, length) -> None:
        ep, _ = self._link(peer)
        ep.region(region).check(offset, length, f"write to {peer}:{region}")

    def read(self, peer, local_region, local_offset, remote_region, remote_offset, length, priority="low"):
        check_priority(priority)
        ep, link = self._link(peer)
        dst = self.region(local_region)
        local_offset, length = dst.check(local_offset, length, f"read into {self.name}:{local_region}")
        remote_offset, _ = ep.region(remote_region).check(remote_offset, length, f"read from {peer}:{remote_region}")

        def run() -> int:
            self._move(
                ep,
                link,
                lambda: self._peer_region(ep, remote_region, remote_offset, length),
                lambda: (dst, local_offset),
                length,
                priority,
            )
            return length

        return self._post(priority, link, run)

    def send(self, peer: str, payload: bytes) -> Future:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"message payload must be bytes, got {type(payload).__name__}")
        ep, link = self._link(peer)
        data = bytes(payload)

        def run() -> int:
            with _RING_LOCK:
                self._check_link(ep, link)
                ep.messages.put(self.name, data)
            return len(data)

        return self._post("high", link, run)

    def _shutdown(self) -> None:
        with _RING_LOCK:  # (after this, no chunk lands in or leaves our regions)
            for peer in list(self._links):
                self._drop(peer, PeerLostError(f"peer {self.name!r} closed"))
            if _RING.get(self.name) is self:
                del _RING[self.name]
        for q in self._queues.values():
            q.put(None)
        with self._lock:
            pending, self._pending = list(self._pending), set()
        for fut in pending:
            with contextlib.suppress(InvalidStateError):
                fut.set_exception(TransportClosedError(f"endpoint {self.name!r} closed with the transfer pending"))


if "ring" not in TRANSPORTS:  # (a module imported once per process; the guard is for `python -c` experiments)
    TRANSPORTS.register("ring")(RingTransport)


# ---- 1. the conformance suite, run on the backend ------------------------------------------------------------------


def _pytest(*args: str) -> subprocess.CompletedProcess:
    """`pytest args` in a child process from the repo root, with `ring` named to the conformance suite."""
    env = {**os.environ, "DUALPATH_TRANSPORT_BACKENDS": "test_fix14_backend:ring"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_conformance_suite_runs_every_backend_test_on_a_backend_named_in_the_environment():
    """`DUALPATH_TRANSPORT_BACKENDS=module:backend pytest tests/test_transport_conformance.py`: every test that runs on
    "inproc" runs on the user's backend too (its BACKENDS list was fixed: nothing ran on a backend of one's own
    without editing the suite)."""
    r = _pytest("--collect-only", "tests/test_transport_conformance.py")
    assert r.returncode == 0, r.stdout + r.stderr
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    on_inproc = [i for i in ids if "inproc" in _params(i)]
    assert len(on_inproc) > 20
    as_ring = [
        f"{i.partition('[')[0]}[{'-'.join('ring' if p == 'inproc' else p for p in _params(i))}]" for i in on_inproc
    ]
    assert sorted(i for i in ids if "ring" in _params(i)) == sorted(as_ring)


def _params(test_id: str) -> list[str]:
    """The parameter ids of a test id: "t[receiver-inproc]" -> ["receiver", "inproc"]."""
    return test_id.partition("[")[2].rstrip("]").split("-")


@pytest.mark.parametrize(
    "case",
    [
        "test_write_and_read_sizes",
        "test_notifications",
        "test_control_messages",
        "test_write_many_lands_every_entry",
        "test_write_many_notifies_once_after_every_entry_landed",
        "test_write_many_bad_entries_name_the_entry",
    ],
)
def test_conformance_cases_in_process_on_the_base_write_many(case):
    """A few of the suite's cases on `RingTransport` in this process (cheap): its `write_many` is `Transport`'s default
    (one `write` per entry), which no built-in backend that runs here uses."""
    import test_transport_conformance as conformance

    assert RingTransport.write_many is Transport.write_many
    a, b = conformance.make_pair("ring")
    try:
        fn = getattr(conformance, case)
        fn((a, b), 7, 3, 5) if case == "test_write_and_read_sizes" else fn((a, b))
    finally:
        a.close()
        b.close()


@pytest.mark.slow  # (~5 s; the tests above check that every backend test collects on it, and run a few here)
def test_the_conformance_suite_passes_on_a_backend_of_ones_own():
    """The whole suite on `RingTransport`, as a user runs it: README "A transport backend of one's own"."""
    r = _pytest("-vv", "tests/test_transport_conformance.py", "-k", "ring")  # (and test_region_names_must_be_strings)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    on_ring = [line for line in r.stdout.splitlines() if "::" in line and "ring" in _params(line.split()[0])]
    assert len(on_ring) > 20 and all("PASSED" in line for line in on_ring), on_ring


def test_a_bad_backend_in_the_environment_is_named():
    import test_transport_conformance as conformance

    with pytest.raises(ValueError, match=r"DUALPATH_TRANSPORT_BACKENDS: 'ring' is not 'module:backend'"):
        conformance.named_backends("ring")
    with pytest.raises(ImportError, match=r"DUALPATH_TRANSPORT_BACKENDS: cannot import module 'no_such_module_x'"):
        conformance.named_backends("no_such_module_x:shm")
    with pytest.raises(KeyError, match=r"DUALPATH_TRANSPORT_BACKENDS: module 'test_fix14_backend' registers no "):
        conformance.named_backends("test_fix14_backend:shm")
    assert conformance.named_backends(" test_fix14_backend:ring , ") == ["ring"]
    assert conformance.named_backends("") == []


def test_the_registration_test_holds_with_a_backend_of_ones_own_registered():
    """The suite's `test_backends_registered` matched the registry's error word for word ("known: inproc, rdma,
    tcp"): with the user's backend registered (as the environment has the suite do) it failed."""
    import test_transport_conformance as conformance

    assert "ring" in TRANSPORTS
    conformance.test_backends_registered()


# ---- 2. built by make_transport -----------------------------------------------------------------------------------


def test_make_transport_builds_the_backend_and_names_it_in_a_bad_config():
    """A typo'd or missing field was `RingTransport.__init__() got an unexpected keyword argument 'chunk'`: it now
    names the config's backend and the fields it takes; a config that is no mapping was a ValueError from dict()."""
    from transport import make_transport

    ep = make_transport({"backend": "ring", "name": "built", "chunk_bytes": 4096}, pacer=None)
    try:
        assert isinstance(ep, RingTransport) and ep.chunk_bytes == 4096 and ep.address == ("ring", "built")
    finally:
        ep.close()
    fields = r"\(RingTransport takes: name, pacer, chunk_bytes\)"
    with pytest.raises(TypeError, match=rf"transport config of backend 'ring': unexpected field 'chunk' {fields}"):
        make_transport({"backend": "ring", "name": "x", "chunk": 4096})
    with pytest.raises(TypeError, match=rf"transport config of backend 'ring': missing field 'name' {fields}"):
        make_transport({"backend": "ring"})
    with pytest.raises(TypeError, match=r"transport config must be a mapping .*, got list"):
        make_transport(["backend", "ring"])
    with pytest.raises(ValueError, match="ring endpoint 'x': chunk_bytes must be an int >= 1, got 0"):
        make_transport({"backend": "ring", "name": "x", "chunk_bytes": 0})  # (the backend's own check)


# ---- 3. selected by config.transport for a runtime run --------------------------------------------------------------


class RingWithDevice(RingTransport):
    """A backend the launchers cannot build: its `device` has no field in the runtime's config."""

    def __init__(self, name: str, device: str, pacer=None):
        super().__init__(name, pacer)
        self.device = device


class RingWithoutPacer(RingTransport):
    """Nor this one: it takes no pacer (its CNIC could not be paced)."""

    def __init__(self, endpoint: str):
        super().__init__(endpoint)


def test_config_takes_a_registered_backend_with_the_inprocess_launcher(base):
    """`config.transport` was checked against the fixed ("inproc", "tcp", "rdma"): "unknown" for a backend of one's
    own registered by a module the config file imports."""
    from dualpath_jax.runtime.config import ConfigError, validate

    validate(base.replace(transport="ring"))
    with pytest.raises(ConfigError, match=r"config.transport 'rnig' unknown \(did you mean 'ring'\?\); known: .*ring"):
        validate(base.replace(transport="rnig"))
    with pytest.raises(ConfigError, match="config.transport 'inproc' needs config.launcher='inprocess'"):
        validate(base.replace(transport="inproc", launcher="local"))


def test_config_refuses_a_backend_whose_endpoints_stay_in_one_process(base):
    """A backend whose endpoints meet in one process (`crosses_processes = False`, as the ring here) cannot serve the
    `local` and `ray` launchers' node processes: refused before anything starts (its nodes failed at connect)."""
    from dualpath_jax.runtime.config import ConfigError, validate

    for launcher in ("local", "ray"):
        with pytest.raises(
            ConfigError,
            match=r"config.transport 'ring' \(RingTransport, crosses_processes=False\) needs "
            r"config.launcher='inprocess': as 'inproc', its endpoints reach only the endpoints of their own process",
        ):
            validate(base.replace(transport="ring", launcher=launcher))


def test_config_refuses_a_backend_the_launchers_cannot_build(base, monkeypatch):
    """The launchers build every endpoint as `make_transport({"backend": ..., "name": ...}, pacer=...)`: a backend
    that needs more (a device) failed each engine group at its start."""
    from dualpath_jax.runtime.config import ConfigError, validate

    monkeypatch.setattr(TRANSPORTS, "_entries", dict(TRANSPORTS._entries))  # (registered for this test only)
    TRANSPORTS.add("ring-device", RingWithDevice)
    TRANSPORTS.add("ring-nopacer", RingWithoutPacer)
    launchers_build = (
        r"the launchers build each endpoint from its name and pacer \(and config.transport_options\) only, and"
    )
    gives = r" \(config.transport_options gives other fields\)$"
    with pytest.raises(
        ConfigError,
        match=rf"config.transport 'ring-device': {launchers_build} RingWithDevice also needs: device{gives}",
    ):
        validate(base.replace(transport="ring-device"))
    with pytest.raises(
        ConfigError,
        match=rf"'ring-nopacer': {launchers_build} RingWithoutPacer also needs: endpoint; takes no name= argument; "
        rf"takes no pacer= argument{gives}",
    ):
        validate(base.replace(transport="ring-nopacer"))
    # (since 2026-12-05 a required field may come from config.transport_options)
    validate(base.replace(transport="ring-device", transport_options={"device": "d0"}))


@pytest.mark.slow  # (~5-8 s, the model's compiles; the launchers build its endpoints as tcp's, `test_runtime`)
def test_a_runtime_run_over_a_backend_of_ones_own_gives_the_reference_tokens(base, ops, reference_for):
    """Engines of the `inprocess` launcher over `RingTransport` (2 agents x 2 turns): every turn once, the tokens of
    the single-process reference (KV moved by the user's backend, hits read on both sides)."""
    from test_runtime import assert_matches_reference

    from dualpath_jax.runtime import driver

    cfg = base.replace(**{"transport": "ring", "workload.agents": 2, "workload.turns": 2})
    trajs = driver.make_trajectories(cfg)
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, reference_for(cfg, ops, trajs), trajs)
    assert res.summary["pe_read_bytes"] + res.summary["de_read_bytes"] > 0
    assert not _RING, f"endpoints left open after the run: {sorted(_RING)}"


# ---- 4. the layer feeder over it -----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    """test_feeder's `store` fixture (imported here when used: test_feeder imports jax, this module is imported by the
    conformance suite)."""
    import numpy as np
    from test_feeder import L

    from dualpath_jax.block_keys import block_keys
    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.kv_store import LocalDirStore

    layout = BlockLayout(num_layers=L, block_tokens=64, bytes_per_token_per_layer=32, fingerprint="test-feeder")
    s = LocalDirStore(tmp_path / "kv", layout)
    keys = block_keys(np.arange(4 * 64), 64)
    blocks = np.random.default_rng(0).integers(0, 256, (4, *layout.full_block_shape), dtype=np.uint8)
    for k, b in zip(keys, blocks, strict=True):
        assert s.write(k, b)
    yield s, layout, keys, blocks
    s.close()


def test_the_layer_feeder_runs_the_de_path_over_a_backend_of_ones_own(store):
    """store -> DE buffer -> `RingTransport` -> PE (a notification per layer) -> device, miss KV back: test_feeder's
    DE-path test, on the user's backend."""
    from test_feeder import test_de_path_through_transport as de_path

    de_path(store, "ring")
    assert not _RING
