"""Prefill engine (PE) and decode engine (DE): real model steps over real KV bytes, both read paths.

Per request (DESIGN.md "Data paths"), with H hit tokens split at `pe_read_blocks` (PE side reads blocks
[0, p), the DE side [p, hit)) and a layer-major host-buffer area `[L, prompt_tokens, bpt]` on each engine:

1. Both engines get the same `TurnTask`. Each takes an area from its node's host buffer pool and tells the
   peer its offset (control message), so the peer can write into it one-sidedly.
2. PE side: the PE node's SNIC reads blocks [0, p) from the store into the PE area. DE side: the DE node's
   SNIC reads [p, hit) into the DE area, the DE tells the PE how far it got (`de_read_done`) and then, layer
   by layer, writes those tokens' Layer Blocks into the PE area with a notification per layer.
3. The PE forms batches with the intra-engine policy and runs layerwise prefill: layer l waits only for
   layer l's DE-side KV (the loads of later layers overlap the compute of earlier ones); after each layer
   it writes to the DE what the DE does not hold: the PE-read hit and the new miss KV (PE path: hit+miss;
   DE path: miss only). After the last layer the first token goes to the DE (`prefill_done`).
   Basic prefill (`cluster.layerwise` False, the paper's Basic; the simulator's non-layerwise PE): once its reads are
   done (and every layer of a DE-side read landed) a request's whole hit KV, every layer, crosses the PE's CNIC into
   HBM on the PE's H2D copy thread (beside the batch the PE runs); only then may it join a batch, whose layers wait
   for nothing, and the prompt KV the DE lacks goes out after the request's last layer, not layer by layer.
4. The DE now holds the whole prompt KV in its area: it persists the prompt's new whole blocks, loads the
   area into a slot of its device batch cache (continuous batching), frees the area and decodes; every
   block filled while decoding is read back and persisted (write-back through the DE node's SNIC).
A block that fails to read (missing/corrupt) cuts the hit there: those tokens are recomputed.

All GPU traffic crosses the engine's own CNIC (DESIGN.md "Data paths", PAPER.md: even local H2D goes through
it), at low priority (KV), in both directions of the full-duplex NIC as in the simulator: on the egress link
(`cnic`, the link the transport's pacer uses: one link, one cap) the transport's writes and the D2H of each block
filled while decoding, before it goes to the SNIC; on the ingress link (`cnic_in`) the PE's per-layer H2D of the
cached KV it feeds (inside the layer's load, one layer ahead of the compute) and the DE's H2D of the prompt KV into
its slot. (KV another engine writes into this one's host buffer is paced by the sender's egress only.) The DE's
copies run on copy threads of their own (`_CopyQueue`, one per direction, like a GPU's copy engines), so its
decode steps go on meanwhile.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import CancelledError

import numpy as np

from dualpath_jax import clock
from dualpath_jax.block_keys import BlockKeyChain
from dualpath_jax.checks import is_int, is_real
from dualpath_jax.host_buffers import BufferBudgetExceeded, HostBufferPool
from dualpath_jax.runtime.control import Cancel, Event, TurnTask, fd_shortage_text
from dualpath_jax.runtime.storage_nic import ReadJob, StorageNIC, WriteJob
from schedulers.api import PrefillWork
from transport.base import TransportError, connect_published, failed_future

log = logging.getLogger(__name__)

REGION = "buf"  # every engine registers its host-buffer arena under this name
WAIT_POLL_S = 0.05  # how often a waiting engine re-checks for cancellation / shutdown
PEER_TIMEOUT_S = 30.0  # how long a DE waits for its writes out of an area (to a PE that finished) before reusing it
STEP_LOG_MAX = 20_000  # measured steps kept per engine (calibration of the simulator's cost model)
GONE_KEEP = 4096  # dropped/finished request attempts an engine remembers, so their late messages are not held
# Items (peer messages, layer notifications) an engine holds for attempts whose task has not come yet, and their bytes
# (a message's JSON size; a notification counts EARLY_ITEM_BYTES): beyond either, the oldest attempt's are dropped.
EARLY_MAX_ITEMS = 1 << 16
EARLY_MAX_BYTES = 64 << 20
EARLY_ITEM_BYTES = 64
EARLY_WARNINGS = 10  # drops an engine warns about (one line each, naming the attempt); later ones are logged at debug


# Where a thread is while JAX compiles a function (traces, lowers, compiles with XLA or reads the compilation cache: a
# first call of a new shape), by file (its path's end) -> function names (None: any function of that file).
COMPILE_FRAMES = {
    "jax/_src/compiler.py": None,
    "jax/_src/interpreters/pxla.py": {"_cached_compilation", "lower_sharding_computation", "_cached_lowering_to_hlo"},
    "jax/_src/interpreters/partial_eval.py": {"trace_to_jaxpr", "trace_to_jaxpr_dynamic"},
    "jax/_src/interpreters/mlir.py": {"lower_jaxpr_to_module"},
}


def jax_compiling(thread: threading.Thread | None) -> bool:
    """Whether `thread` is inside a JAX compile now (`COMPILE_FRAMES` on its stack)."""
    frame = sys._current_frames().get(thread.ident) if thread is not None and thread.ident is not None else None
    while frame is not None:
        path = frame.f_code.co_filename
        if "_src" in path:
            path = path.replace("\\", "/")
            for end, names in COMPILE_FRAMES.items():
                if path.endswith(end) and (names is None or frame.f_code.co_name in names):
                    return True
        frame = frame.f_back
    return False


class UnknownPeerError(LookupError):
    """A peer engine that is not in the directory any more: its node was declared dead."""


# What a lost peer looks like (a peer that died, a link that failed, `_peer`'s peer declared dead): what the transports
# raise and fail their futures with then (`TransportError`s, socket errors and timeouts, a cancelled future). The
# scheduler takes the peer's node for dead. Anything else a transport raises is its own bug (`_transport_failed`).
LOST_PEER_ERRORS = (TransportError, OSError, EOFError, CancelledError, UnknownPeerError)


def fd_shortage(e: BaseException) -> str | None:
    """Where `e` (or an error it was raised from) is this process being out of file descriptors (EMFILE, ENFILE):
    that in words, naming the limit and what to do; else None. Not a lost peer: the peer is alive, this process
    cannot open a socket to it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        hint = "; each engine holds 2 sockets per peer engine, the store up to fd_cache files"
        if (text := fd_shortage_text(e, "this node's process", hint)) is not None:
            return text
        e = e.__cause__ or e.__context__
    return None


def raised_at(e: BaseException) -> str:
    """Where `e` was raised, "file:line (function)" of the deepest frame of its traceback; "" without one."""
    frames = traceback.extract_tb(e.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""


def engine_endpoint(engine_id: int) -> str:
    """The transport endpoint name of an engine (its CNIC)."""
    return f"engine{engine_id}"


TAG_FIELD_MAX = 0xFFFF  # largest attempt / layer a layer tag holds (16 bits each; the request id above them)


def layer_tag(request_id: int, attempt: int, layer: int) -> int:
    """Notification tag of "layer `layer` of request `request_id` (attempt) has landed".

    The attempt had 8 bits, masked: attempt 256's tags were attempt 0's, so the PE took its DE's layers for attempt
    0's, never as those of the attempt it runs (which waited for them). An attempt is bumped at most once per node
    declared dead (dead nodes never come back), so it is at most the node count; a field that overflows is an
    error here, never a wrapped tag."""
    for name, value in (("attempt", attempt), ("layer", layer)):
        if not 0 <= value <= TAG_FIELD_MAX:
            raise ValueError(f"layer tag: {name}={value} of request {request_id} is outside [0, {TAG_FIELD_MAX}]")
    if not 0 <= request_id < 1 << 31:  # (the transports' tags are signed 64-bit)
        raise ValueError(f"layer tag: request id {request_id} is outside [0, 2**31)")
    return (request_id << 32) | (attempt << 16) | layer


def split_tag(tag: int) -> tuple[int, int, int]:
    """(request id, attempt, layer) of a `layer_tag`."""
    return tag >> 32, (tag >> 16) & TAG_FIELD_MAX, tag & TAG_FIELD_MAX


# The messages engines send each other (`send_msg`): kind -> its int fields besides request_id and attempt (a
# prefill_done also carries the PE's own stamps of the attempt, "pe_stamps"). They travel as JSON: a peer's bytes are
# data, never code (they were pickled, so any process that could connect to an endpoint ran code in the engine). A
# kind missing here is dropped by its receiver (`decode_msg`): a new message kind goes here too.
MESSAGE_FIELDS = {
    "pe_area": ("offset",),
    "de_area": ("offset",),
    "de_read_done": ("end_blocks",),
    "prefill_done": ("hit_tokens", "first_token"),
}


class BadMessage(ValueError):
    """A peer's payload that is not an engine message (`decode_msg`)."""


def _plain(o):
    """JSON for numpy scalars (an area offset, a block count may be one); anything else is a bug of the sender."""
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"an engine message holds a {type(o).__name__}, which JSON cannot carry")


def encode_msg(msg: dict) -> bytes:
    """An engine message's payload (JSON, `decode_msg`)."""
    return json.dumps(msg, default=_plain, separators=(",", ":")).encode()


def decode_msg(payload) -> dict:
    """The message of a peer's `encode_msg` payload, checked against `MESSAGE_FIELDS` (the PE's stamps: numbers, its
    read a (start, end, bytes) tuple again). Raises `BadMessage` saying what is wrong."""
    try:
        msg = json.loads(payload if isinstance(payload, (bytes, bytearray, str)) else bytes(payload))
    except (ValueError, RecursionError) as e:  # (not UTF-8, not JSON, nested too deep)
        raise BadMessage(f"not JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(msg, dict):
        raise BadMessage(f"a JSON {type(msg).__name__}, not an object")
    kind = msg.get("kind")
    fields = MESSAGE_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise BadMessage(f"unknown kind {str(kind)[:40]!r}")
    for f in ("request_id", "attempt", *fields):
        if not is_int(msg.get(f)):
            raise BadMessage(f"a {kind} message whose {f} is {str(msg.get(f))[:40]!r}, not an int")
    if "pe_stamps" in msg:
        msg["pe_stamps"] = _pe_stamps(msg["pe_stamps"])
    return msg


def _pe_stamps(stamps):
    """A prefill_done's "pe_stamps" (`PrefillEngine._hand_over`), checked: None, or {prefill_start, prefill_end:
    seconds; read: None or [start, end, bytes]} (its read a tuple again, as the PE made it)."""
    if stamps is None:
        return None
    if not isinstance(stamps, dict):
        raise BadMessage(f"pe_stamps {str(stamps)[:80]!r} are not the PE's stamps")
    if not all(is_real(stamps[k]) for k in ("prefill_start", "prefill_end") if k in stamps):
        raise BadMessage(f"pe_stamps {str(stamps)[:80]!r} hold a time that is not a number")
    read = stamps.get("read")
    if read is not None:
        if not (isinstance(read, list) and len(read) == 3 and all(map(is_real, read))):
            raise BadMessage(f"pe_stamps' read {str(read)[:80]!r} is not [start, end, bytes]")
        stamps["read"] = tuple(read)
    return stamps


class _Inbox:
    """Everything an engine thread reacts to, in arrival order: tasks, cancels, peer messages, notifications."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def put(self, kind: str, item) -> None:
        self.q.put((kind, item))

    def get(self, timeout: float):
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return None


def pace_on(
    pacer, nbytes: int, stop: threading.Event | None = None, cancelled: Callable[[], bool] | None = None
) -> bool:
    """Move `nbytes` of KV (low priority) through `pacer` (a `traffic.Pacer` or any `transport.base.Pacer`),
    chunk by chunk when it can; False when `stop` was set or `cancelled()` became true meanwhile (the rest is not
    paced)."""
    if nbytes <= 0:
        return True
    if not hasattr(pacer, "paced"):
        pacer.pace(nbytes, "low")
        return True
    for _ in pacer.paced(nbytes, "low"):
        if (stop is not None and stop.is_set()) or (cancelled is not None and cancelled()):
            return False
    return True


class _CopyQueue:
    """One direction of an engine's device <-> host copies through its CNIC: jobs run FIFO on a thread of their
    own (a GPU's copy engine), each first paced for its bytes on the engine's CNIC (low priority, KV), then its
    completion is called on this thread."""

    def __init__(self, name: str, pacer, stop: threading.Event):
        self.pacer = pacer
        self._stop = stop
        self._q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def submit(self, nbytes: int, done: Callable[[], None], cancelled: Callable[[], bool] | None = None) -> None:
        """Queue a copy of `nbytes`; `done()` once they crossed. `cancelled()` true (its request was dropped): the
        copy is skipped, or cut short, and `done` not called -- it no longer holds up the copies behind it, nor adds
        bytes to the CNIC's records (it used to be paced whole, for an area already freed)."""
        self._q.put((nbytes, done, cancelled))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                nbytes, done, cancelled = self._q.get(timeout=WAIT_POLL_S)
            except queue.Empty:
                continue
            try:
                if cancelled is not None and cancelled():
                    continue
                if not pace_on(self.pacer, nbytes, self._stop, cancelled):
                    if self._stop.is_set():
                        return
                    continue  # dropped while crossing
                done()
            except Exception:  # noqa: BLE001 -- a bad completion must not stop the copies behind it
                log.exception("%s: a copy job failed", self.thread.name)


class EngineBase:
    """What PE and DE share: a transport endpoint (the engine's CNIC), a host buffer area pool, an inbox."""

    role = "?"

    def __init__(
        self,
        engine_id: int,
        node_id: int,
        ctx,  # runtime.node.NodeContext: cfg, model ops, store, block layout, events sink
        transport,
        buffer_pool: HostBufferPool,
        snic: StorageNIC,
        cnic=None,  # a pacer over the engine's CNIC egress link (the transport's link): its D2H copies
        cnic_in=None,  # a pacer over the CNIC's ingress link: its H2D copies (None: `cnic`, one half-duplex link)
        model=None,  # its model ops (None: the node's, ctx.model; `node.engine_models`: one per device)
    ):
        self.engine_id = engine_id
        # The engine's own copies between host buffers and device memory cross its CNIC (None: not paced): H2D
        # into HBM on the ingress direction, D2H out of HBM on the egress one, where the transport's writes go.
        self.cnic = cnic
        self.cnic_in = cnic if cnic_in is None else cnic_in
        self.node_id = node_id
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.model = ctx.model if model is None else model
        self.transport = transport
        self.pool = buffer_pool
        self.snic = snic
        self.bpt = ctx.model.kv_layout.bytes_per_token_per_layer
        self.num_layers = ctx.model.kv_layout.num_layers
        self.bs = ctx.cfg.block_size
        self.inbox = _Inbox()
        self.directory: dict[int, tuple] = {}
        self._connected: set[int] = set()
        # Endpoint names of peers that sent us a message (so were connected, by either side): never connected to again.
        # A peer knows our areas only from such messages; one declared dead and dropped (`_release_area`) that then
        # connected afresh from its stale directory would write into an area reused meanwhile.
        self._heard: set[str] = set()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._transport_bug = False  # a transport bug was reported (`_transport_failed`): once
        # Areas of dropped requests whose SNIC read was still queued or running: freed when it reports done.
        self._draining: dict[tuple, object] = {}
        self.early: dict[tuple, list] = {}  # messages/layers that arrived before the task (oldest attempt first)
        self.early_items = self.early_bytes = 0  # what `early` holds (bounded: `_hold_early`)
        self.early_dropped = 0  # attempts whose held items were dropped to keep the bound
        self._early_cut: OrderedDict = OrderedDict()  # (bounded as `_gone`) those attempts: their task fails clearly
        # (request, attempt) of the latest attempts dropped or finished here: a message of one arriving later (a peer
        # declared dead but alive until its next fetch) used to be held in `early` for the rest of the run.
        self._gone: OrderedDict = OrderedDict()
        self.busy_s = 0.0  # time spent in model compute (runtime overhead figure)
        # Monotonic time of the main thread's last sign of progress (each loop turn, each wait's poll, each layer of a
        # batch): the node reports the engine stalled when it is older than scheduler.stall_timeout_s.
        self.tick = time.monotonic()
        self.compiles_seen = 0  # times `progress_age` found the main thread compiling (a compile is progress)
        self.wait_s = 0.0  # time a PE waited inside a batch: for DE-side layers, and for its CNIC (h2d_wait_s)
        self.h2d_wait_s = 0.0  # of which: a PE's per-layer H2D paced on its CNIC
        # Measured steps for the cost-model fit: PE ([(cached, bsz)], s), DE (batch, context tokens, s).
        self.step_log: list = []
        transport.register(REGION, buffer_pool.arena)
        self._threads = [
            threading.Thread(target=self._main, name=f"{self.role}{engine_id}", daemon=True),
            threading.Thread(target=self._pump_messages, name=f"{self.role}{engine_id}-msg", daemon=True),
            threading.Thread(target=self._pump_notifications, name=f"{self.role}{engine_id}-cq", daemon=True),
        ]

    # ------------------------------------------------------------------ plumbing
    def start(self) -> None:
        self.tick = time.monotonic()  # (not the build's: a node's precompile may have taken minutes since)
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 5.0) -> None:
        for t in self._threads:
            if t.ident is not None:  # (an engine of a group that never ran was never started)
                t.join(timeout)

    def progress_age(self, now: float, compile_check_after: float) -> float:
        """Seconds since the main thread's last sign of progress (`tick`), for the node's stall check. A JAX compile
        is progress (the first call of a new shape, minutes for a large model with `cluster.precompile` off: it was
        taken for a stall): once the age passes `compile_check_after`, a compile running on the thread stamps `tick`."""
        age = now - self.tick
        if age > compile_check_after and jax_compiling(self._threads[0]):
            self.tick = now  # (races only the thread's own stamps: either is a recent time)
            self.compiles_seen += 1
            return 0.0
        return age

    def set_directory(self, directory: dict) -> None:
        self.inbox.put("directory", dict(directory))

    def submit(self, task: TurnTask) -> None:
        self.inbox.put("task", task)

    def cancel(self, c: Cancel) -> None:
        self.inbox.put("cancel", c)

    def emit(self, kind: str, request_id: int, attempt: int, at: float | None = None, **data) -> None:
        """Report an event stamped `at` (wall-clock seconds; default now)."""
        self.ctx.emit(Event(kind, request_id, attempt, clock.now() if at is None else at, data))

    def _pump_messages(self) -> None:
        while not self._stop.is_set():
            try:
                peer, payload = self.transport.recv(timeout=WAIT_POLL_S)
            except TimeoutError:
                continue
            except Exception as e:  # noqa: BLE001 -- endpoint closed (or the backend's bug: the run fails)
                self._transport_failed(e, "recv")
                return
            self._heard.add(peer)
            try:
                msg = decode_msg(payload)  # (never pickle: a peer's bytes must not be code)
            except BadMessage as e:
                log.error(
                    "%s%d: dropped a message from %r that is no engine message: %s", self.role, self.engine_id, peer, e
                )
                continue
            self.inbox.put("msg", msg)

    def _pump_notifications(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.transport.wait_notification(timeout=WAIT_POLL_S)
            except TimeoutError:
                continue
            except Exception as e:  # noqa: BLE001 -- endpoint closed (or the backend's bug: the run fails)
                self._transport_failed(e, "wait_notification")
                return
            self.inbox.put("layer", split_tag(n.tag))

    def _peer(self, engine_id: int) -> str:
        name = engine_endpoint(engine_id)
        if engine_id not in self._connected and name not in self._heard and name not in self.transport.peers():
            if engine_id not in self.directory:  # (was a bare KeyError: "did not reach DE 1: 1" in the logs)
                raise UnknownPeerError(f"engine {engine_id} is not in the directory: its node was declared dead")
            _node, address = self.directory[engine_id]
            try:  # (published once the peer listened: a refusal means it is gone, failed at once, not retried)
                connect_published(self.transport, name, address)
            except Exception:  # noqa: BLE001 -- the peer may have connected to us meanwhile
                if name not in self.transport.peers():
                    raise
        self._connected.add(engine_id)
        return name

    def write_to(self, engine_id: int, local_offset: int, remote_offset: int, nbytes: int, notify: int | None = None):
        """One-sided KV write into a peer engine's buffer (low priority). Never raises: a dead or unreachable
        peer gives a failed future (the scheduler re-runs the request elsewhere); so does a bug of the transport
        backend, which fails the run (`_transport_failed`)."""
        op = "connect"
        try:
            peer = self._peer(engine_id)
            op = "write"
            return self.transport.write(
                peer, REGION, local_offset, REGION, remote_offset, nbytes, priority="low", notify=notify
            )
        except Exception as e:  # noqa: BLE001 -- PeerLostError, connect failures, closed endpoint; or a backend's bug
            self._transport_failed(e, op)
            return failed_future(e)

    def send_msg(self, engine_id: int, msg: dict) -> None:
        """A request's message (its `request_id` and `attempt` in it) to a peer engine. Never raises: a peer that
        cannot be reached is reported (`peer_lost`); a bug of the transport backend fails the run."""
        payload = encode_msg(msg)  # (out of the try: an error here is not the transport's)
        op = "connect"
        try:
            peer = self._peer(engine_id)
            op = "send"
            self.transport.send(peer, payload)
        except Exception as e:  # noqa: BLE001 -- a dead or unreachable peer: the scheduler re-runs the request
            if self._transport_failed(e, op):
                log.warning("%s%d: message to engine %d failed: %s", self.role, self.engine_id, engine_id, e)
                self.peer_lost(engine_id, msg["request_id"], msg["attempt"], e)

    def _transport_failed(self, e: BaseException, op: str) -> bool:
        """Whether `e`, which the transport's `op` raised or failed a future of, is a lost peer (`LOST_PEER_ERRORS`):
        the caller reports it (`peer_lost`) and the scheduler declares the peer's node dead. Anything else (a
        RuntimeError, TypeError, ... of the backend's own code) is the backend's bug: the run fails, once per engine,
        naming the backend (`config.transport`), the exception and where it was raised, with its traceback logged, as
        the scheduler does for a policy that raises. (It was reported as dead nodes: "node 1: engine 0 (node 0) could
        not reach it: RuntimeError('...')", with no traceback and no word of the backend.)"""
        short = fd_shortage(e)  # (this process's limit, not a dead peer: it declared a live node dead)
        if short is None and isinstance(e, LOST_PEER_ERRORS):
            return True
        if self._stop.is_set() or self._transport_bug:  # (the run is over, or failing already)
            return False
        self._transport_bug = True
        backend = getattr(self.cfg, "transport", None) or getattr(self.transport, "backend", None)
        at = raised_at(e)
        msg = f"transport {backend!r} raised {e!r} in {op}(){f' at {at}' if at else ''}: a bug of the backend"
        if short is not None:
            msg = f"{op}() failed: {short}"
        log.error("%s%d: %s", self.role, self.engine_id, msg, exc_info=e)
        self.ctx.emit(Event("error", -1, 0, clock.now(), {"message": f"{self.role} {self.engine_id}: {msg}"}))
        return False

    def peer_lost(self, engine_id: int, request_id: int, attempt: int, error: BaseException) -> None:
        """Tell the scheduler that a request's peer engine could not be reached (a failed message or KV write: the
        transport gave up on it). It declares the peer's node dead and re-runs its requests: a failure on a live
        peer's link used to drop the request here with a warning, and the run waited out `run_timeout_s`."""
        if self._stop.is_set():  # (the run is over, or this engine stopped: its endpoint is closing)
            return
        self.emit("peer_lost", request_id, attempt, engine=self.engine_id, peer=engine_id, error=repr(error))

    def _alloc_area(self, prompt_tokens: int):
        """A layer-major area [L, prompt_tokens, bpt] in the host buffer, or None when the budget is full now.
        Raises BufferBudgetExceeded, naming the buffer field, for a prompt the whole budget can never hold (its model
        ops not those the config check sized the buffers for): it was taken for "full now" and the request waited,
        with every one behind it, until config.run_timeout_s."""
        nbytes = self.num_layers * prompt_tokens * self.bpt
        if self.pool.slots_for(nbytes) > self.pool.num_slots:
            field = "pe_buffer_bytes" if self.role == "pe" else "de_buffer_bytes"
            model = getattr(self.model, "name", "?")
            raise BufferBudgetExceeded(
                f"{self.role}{self.engine_id}: a prompt of {prompt_tokens} tokens needs {nbytes} B of host buffer "
                f"({self.num_layers} layers x {self.bpt} B/token/layer of model {model!r}, in whole "
                f"{self.pool.slot_nbytes} B Layer Blocks) but this engine's share of config.buffers.{field} is "
                f"{self.pool.budget_bytes} B: it can never fit; raise config.buffers.{field} (`driver.prepare` "
                "checks it against config.model and the workload's longest prompt)"
            )
        try:
            h = self.pool.acquire(nbytes, timeout=0, contiguous=True)
        except BufferBudgetExceeded:
            return None
        view = h.contiguous_view()[:nbytes].reshape(self.num_layers, prompt_tokens, self.bpt)
        return h, view, h.offsets[0]

    def _submit_read(self, r, keys: list, first_block: int) -> None:
        """Queue the SNIC read of `keys` into r's area; its "read_done" comes back through the inbox."""
        t = r.task
        r.read_job = ReadJob(
            t.request_id,
            t.attempt,
            keys,
            first_block,
            r.area,
            lambda job, ok, nb, t0, t1: self.inbox.put("read_done", (job, ok, nb, t0, t1)),
        )
        self.snic.submit_read(r.read_job)

    def _read_finished(self, job: ReadJob):
        """A read reported done: its request (returned; None when dropped meanwhile) may now free its area."""
        r = self.reqs.get((job.request_id, job.attempt))
        if r is not None:
            r.read_job = None
        handle = self._draining.pop((job.request_id, job.attempt), None)
        if handle is not None and not handle.released:
            handle.release()
        return r

    def _release_area(self, r) -> None:
        """Free a dropped or finished request's area -- never under a running read: a read still queued or in
        progress is cancelled and the area freed when it reports done (the SNIC would otherwise write stale
        blocks into a later request's KV); nor, for a cancelled request, before its peer is dropped."""
        if r.handle is None or r.handle.released:
            return
        if r.cancelled and self._peer_writing(r) and not self._drop_peer(r):
            return  # (kept for good: never reused under the peer's writes)
        if r.read_job is not None:
            r.read_job.cancelled = True
            self._draining[(r.task.request_id, r.task.attempt)] = r.handle
        else:
            r.handle.release()

    def _peer_writing(self, r) -> bool:
        """Whether r's peer may have one-sided writes into r's area not yet landed."""
        raise NotImplementedError

    def _drop_peer(self, r) -> bool:
        """A cancel means r's peer was declared dead, maybe only late (a node stopped past the heartbeat timeout,
        then continued, wrote its queued KV into the area's next request: /tmp/hunt_runtime6/stop_cont.py, wrong
        tokens). Drop it from our endpoint: once `disconnect` returns none of its writes lands here, so the area
        may be reused at once (it used to be held until the peer's connection went). False if that failed."""
        name = engine_endpoint(r.task.decode_engine if self.role == "pe" else r.task.prefill_engine)
        try:  # (also when it is no longer in peers(): a reader of its dropped set may still be landing a frame)
            self.transport.disconnect(name)
        except Exception:  # noqa: BLE001 -- its writes may still land: the area is never freed (a leak, not wrong KV)
            log.exception("%s%d: could not drop %s: request %s keeps its area", self.role, self.engine_id, name, r.key)
            return False
        return True

    def _hold_early(self, key: tuple, kind: str, item) -> None:
        """Keep an item of a request whose task has not arrived yet -- not one of an attempt already gone. At most
        EARLY_MAX_ITEMS items and EARLY_MAX_BYTES bytes in all: beyond, the oldest attempt's items are dropped, with a
        warning naming it (a peer's bug sending messages of attempts that never come here grew `early` for ever)."""
        if key in self._gone:
            return
        nbytes = len(encode_msg(item)) if kind == "msg" else EARLY_ITEM_BYTES
        self.early.setdefault(key, []).append((kind, item, nbytes))
        self.early_items += 1
        self.early_bytes += nbytes
        while self.early_items > EARLY_MAX_ITEMS or self.early_bytes > EARLY_MAX_BYTES:
            old = next(iter(self.early))
            held = self._take_early(old)
            self.early_dropped += 1
            self._early_cut[old] = None
            if len(self._early_cut) > GONE_KEEP:
                self._early_cut.popitem(last=False)
            log.log(
                logging.WARNING if self.early_dropped <= EARLY_WARNINGS else logging.DEBUG,
                "%s%d: dropped %d message(s)/notification(s) held for request %d attempt %d, whose task has not come: "
                "held items of unknown attempts are kept to %d items / %d bytes (EARLY_MAX_ITEMS / EARLY_MAX_BYTES; a "
                "peer sending for attempts that never come here?)%s",
                self.role, self.engine_id, len(held), old[0], old[1], EARLY_MAX_ITEMS, EARLY_MAX_BYTES,
                "; further drops are logged at debug level" if self.early_dropped == EARLY_WARNINGS else "",
            )  # fmt: skip

    def _take_early(self, key: tuple) -> list:
        """Remove and return the (kind, item) pairs held for `key`."""
        held = self.early.pop(key, [])
        self.early_items -= len(held)
        self.early_bytes -= sum(n for _k, _v, n in held)
        return [(k, v) for k, v, _n in held]

    def _early_items_of(self, task) -> list:
        """The items held for a task that just came. Its attempt's were dropped to keep the bound (`_hold_early`):
        the run fails, naming it (it would wait for them until config.run_timeout_s)."""
        key = (task.request_id, task.attempt)
        if key in self._early_cut:
            msg = (
                f"{self.role} {self.engine_id}: request {key[0]} attempt {key[1]} came after the messages held for it "
                f"were dropped (over EARLY_MAX_ITEMS={EARLY_MAX_ITEMS} / EARLY_MAX_BYTES={EARLY_MAX_BYTES} held for "
                "attempts not here yet): it cannot run"
            )
            log.error("%s", msg)
            self.ctx.emit(Event("error", -1, 0, clock.now(), {"message": msg}))
        return self._take_early(key)

    def _add_request(self, r) -> None:
        """Keep the request of a task that just came, then handle the items held for it (`_hold_early`)."""
        self.reqs[r.key] = r
        self.order.append(r.key)
        for k, v in self._early_items_of(r.task):
            self._handle(k, v)

    def _cancelled_request(self, c: Cancel):
        """A cancel came: its attempt is gone here (`_gone_attempt`); its request, if here, is marked cancelled and
        returned (None if not)."""
        key = (c.request_id, c.attempt)
        self._gone_attempt(key)
        r = self.reqs.get(key)
        if r is not None:
            r.cancelled = True
        return r

    def _request_of_msg(self, msg: dict):
        """The request a message is for; None when its task has not come yet (the message is held: `_hold_early`)."""
        key = (msg["request_id"], msg["attempt"])
        r = self.reqs.get(key)
        if r is None:
            self._hold_early(key, "msg", msg)
        return r

    def _gone_attempt(self, key: tuple) -> None:
        """An attempt was dropped (cancelled) or finished here: free its held items, ignore its later ones."""
        self._take_early(key)
        self._gone[key] = None
        if len(self._gone) > GONE_KEEP:
            self._gone.popitem(last=False)

    def area_offset(self, base: int, prompt_tokens: int, layer: int, token: int) -> int:
        return base + (layer * prompt_tokens + token) * self.bpt

    def _main(self) -> None:
        try:
            self.run()
        except BaseException as e:  # noqa: BLE001 -- reported to the scheduler, which fails the run clearly
            self.error = e
            if self._stop.is_set():  # stopped (the run ended, Ctrl-C, a kill) in the middle of work: not a crash
                log.info("%s engine %d stopped mid-work: %s", self.role, self.engine_id, e)
                return
            log.exception("%s engine %d crashed", self.role, self.engine_id)
            self.ctx.emit(Event("error", -1, 0, clock.now(), {"message": f"{self.role} {self.engine_id}: {e!r}"}))

    def run(self) -> None:
        raise NotImplementedError


# ====================================================================================================== PE
@dataclasses.dataclass(eq=False)
class _PrefillReq:
    task: TurnTask
    handle: object = None
    area: np.ndarray | None = None  # uint8 [L, P, bpt]
    area_off: int = 0
    read_job: ReadJob | None = None  # the PE-side SNIC read, until it reports done
    pe_read_done: bool = False
    pe_ok_blocks: int = 0
    de_read_done: bool = False
    de_end_blocks: int = 0  # DE side read blocks [pe_read_blocks, de_end_blocks)
    de_area_off: int | None = None
    final_hit: int = -1  # tokens
    cached: int = 0  # tokens whose KV is in the area (hit + prefilled chunks)
    layers_from_de: set = dataclasses.field(default_factory=set)
    first_token: int = -1
    futures: list = dataclasses.field(default_factory=list)
    started: bool = False
    cancelled: bool = False
    # Basic prefill (not layerwise): its whole hit KV is crossing the PE's CNIC into HBM (loading) / is in HBM (in)
    hbm: str = "none"  # none | loading | in
    hbm_bytes: int = 0  # of the PE's `cluster.pe_hbm_kv_bytes` it holds (basic prefill)
    t_arrived: float = 0.0
    # Its PE-side stamps, also handed to the DE with the first token (`pe_stamps`): a PE node killed after the hand-over
    # took its own events with it, and the finished turn's record kept prefill_start / its read as NaN.
    t_prefill_start: float = math.nan
    pe_read: tuple | None = None  # (t_start, t_end, nbytes) of its SNIC read

    @property
    def key(self):
        return (self.task.request_id, self.task.attempt)

    @property
    def prompt_tokens(self) -> int:
        return self.task.prompt_tokens

    @property
    def pe_hit_end(self) -> int:
        """End of the hit read on the PE side (after the final cut): the DE lacks tokens [0, pe_hit_end)."""
        return min(self.bs * self.pe_ok_blocks, self.final_hit)

    bs: int = 0


class PrefillEngine(EngineBase):
    role = "pe"

    def __init__(self, *a, batcher, **kw):
        super().__init__(*a, **kw)
        self.batcher = batcher
        self.reqs: dict[tuple, _PrefillReq] = {}
        self.order: list[tuple] = []  # FIFO of request keys
        self._in_batch: set[tuple] = set()  # keys of the requests of the batch now running
        self._sent: deque = deque()  # requests whose KV writes to the DE have all ended (`_after_writes`)
        # Basic prefill (`cluster.layerwise` False; a stand-in config without the field: layerwise): each request's
        # whole hit KV crosses the CNIC ingress before it may join a batch, on a copy thread of its own (`_load_whole`)
        self.layerwise = getattr(self.cfg.cluster, "layerwise", True)
        # (basic prefill) the PE's HBM for whole-prompt KV, 0: no bound; the bytes its requests hold (`_prepare`)
        self.hbm_bytes = 0 if self.layerwise else getattr(self.cfg.cluster, "pe_hbm_kv_bytes", 0)
        self.hbm_used = 0
        self._h2d = None
        if not self.layerwise and self.cnic_in is not None:
            self._h2d = _CopyQueue(f"pe{self.engine_id}-h2d", self.cnic_in, self._stop)
            self._threads.append(self._h2d.thread)

    # ---------------------------------------------------------------- inbox
    def _drain(self, timeout: float) -> None:
        item = self.inbox.get(timeout)
        while item is not None:
            self._handle(*item)
            item = self.inbox.get(0)

    def _handle(self, kind: str, item) -> None:
        if kind == "directory":
            self.directory = item
        elif kind == "task":
            if (item.request_id, item.attempt) in self._gone:  # cancelled before it came: its messages are ignored
                return
            r = _PrefillReq(task=item, t_arrived=clock.now(), bs=self.bs)
            r.de_read_done = item.pe_read_blocks >= item.hit_blocks
            self._add_request(r)
        elif kind == "cancel":
            r = self._cancelled_request(item)
            if r is not None:
                # Only a batch now running still uses the area (it finishes r when done). A request cancelled
                # between two chunks of its chunked prefill used to wait for a batch it never got again (cancelled
                # is never ready), holding its area for the rest of the run: with a small buffer, a hang.
                if r.key not in self._in_batch:
                    self._finish(r)
        elif kind == "msg":
            r = self._request_of_msg(item)
            if r is None:
                return
            if item["kind"] == "de_area":
                r.de_area_off = item["offset"]
            elif item["kind"] == "de_read_done":
                r.de_read_done = True
                r.de_end_blocks = item["end_blocks"]
        elif kind == "layer":
            rid, attempt, layer = item
            r = self.reqs.get((rid, attempt))
            if r is None:
                self._hold_early((rid, attempt), kind, item)
                return
            r.layers_from_de.add(layer)
        elif kind == "read_done":
            job, ok, nbytes, t0, t1 = item
            r = self._read_finished(job)
            if r is not None:
                r.pe_read_done = True
                r.pe_ok_blocks = ok
                r.pe_read = (t0, t1, nbytes)
                # Stamped with the SNIC's end of the read (t1): a PE handles the report only after the batch it was
                # running, and the turn's read_end used to include that batch (1.6-1.9 s for reads of microseconds).
                self.emit("read_done", job.request_id, job.attempt, at=t1, side="pe", nbytes=nbytes, t_start=t0)
        elif kind == "h2d_done":  # basic prefill: its whole hit KV is in HBM
            if self.reqs.get(item.key) is item and not item.cancelled:
                item.hbm = "in"
        elif kind == "sent":  # a request's KV writes to the DE are over (or one failed), `_after_writes`
            self._hand_over_sent()
        else:
            raise RuntimeError(f"unknown inbox item {kind!r}")

    # ---------------------------------------------------------------- lifecycle
    def _prepare(self) -> None:
        """Give areas to new requests (FIFO while the buffer lasts) and start their PE-side reads. Basic prefill with
        `cluster.pe_hbm_kv_bytes`: each also takes room for its whole prompt KV in the PE's HBM first (the simulator's
        `_admit_basic`), held until its KV left for the DE; a prompt larger than all of it runs alone."""
        for key in self.order:
            r = self.reqs[key]
            if r.area is not None or r.cancelled:
                continue
            need = self.num_layers * r.prompt_tokens * self.bpt if self.hbm_bytes else 0
            if need and self.hbm_used > 0 and self.hbm_used + need > self.hbm_bytes:
                return  # FIFO behind the PE's HBM
            got = self._alloc_area(r.prompt_tokens)
            if got is None:
                return  # FIFO: later requests wait behind this one
            r.handle, r.area, r.area_off = got
            r.hbm_bytes = need
            self.hbm_used += need
            t = r.task
            if t.pe_read_blocks < t.hit_blocks:
                self.send_msg(
                    t.decode_engine,
                    {"kind": "pe_area", "request_id": t.request_id, "attempt": t.attempt, "offset": r.area_off},
                )
            if t.pe_read_blocks > 0:
                self._submit_read(r, t.block_keys[: t.pe_read_blocks], 0)
            else:
                r.pe_read_done = True
                if t.hit_blocks == 0:
                    # No read on either side: a zero-length one where its reads would start (the simulator's record:
                    # read_start = read_end at allocation). Left NaN, the TTFT breakdown of every no-hit turn was NaN.
                    now = clock.now()
                    r.pe_read = (now, now, 0)
                    self.emit("read_done", t.request_id, t.attempt, at=now, side="pe", nbytes=0, t_start=now)

    def _ready(self, r: _PrefillReq) -> bool:
        """Whether r may join a batch: its reads are done (`_reads_in`), its last layer is not computed yet (once it is,
        its KV is on its way to the DE) and, basic prefill, its hit KV is in HBM."""
        return self._reads_in(r) and r.first_token < 0 and (self.layerwise or r.hbm == "in")

    def _reads_in(self, r: _PrefillReq) -> bool:
        """Whether r's reads are done, both sides (its final hit set from them)."""
        if r.cancelled or r.area is None or not r.pe_read_done or not r.de_read_done or r.de_area_off is None:
            return False
        if r.final_hit < 0:
            t = r.task
            pe_ok = r.pe_ok_blocks
            if pe_ok < t.pe_read_blocks:  # a PE-side block failed: the hit ends there
                hit_blocks = pe_ok
            else:
                hit_blocks = max(t.pe_read_blocks, min(r.de_end_blocks, t.hit_blocks))
            r.final_hit = hit_blocks * self.bs
            r.cached = r.final_hit
        return True

    def run(self) -> None:
        while not self._stop.is_set():
            self.tick = time.monotonic()
            self._drain(WAIT_POLL_S if not self._has_ready() else 0)
            self._prepare()
            if not self.layerwise:
                self._load_whole()
            ready = [self.reqs[k] for k in self.order if self._ready(self.reqs[k])]
            if not ready:
                continue
            work = [PrefillWork(r.task.request_id, r.cached, r.prompt_tokens - r.cached) for r in ready]
            try:
                batch = self.batcher.form_batch(work)
            except Exception as e:
                raise RuntimeError(
                    f"batcher {self.batcher.name!r} raised {e!r} forming a batch from {len(work)} requests"
                ) from e
            if not batch:
                raise RuntimeError(f"batcher {self.batcher.name!r} formed an empty batch from {len(work)} requests")
            self._run_batch(self._batch_items(batch, {r.task.request_id: r for r in ready}))

    def _batch_items(self, batch, by_rid: dict) -> list:
        """The batcher's items as (request, cached, bsz), each checked before anything runs: an unknown request id
        was a bare KeyError; a `cached` other than the request's computed its tokens at the wrong positions (wrong
        KV: silently, or the run stalled until run_timeout_s); bsz 0, past the request's remaining tokens, or a request listed
        twice failed as the model's misleading "no miss tokens"."""
        items, seen = [], set()
        for b in batch:
            rid, c0, n = (getattr(b, f, None) for f in ("request_id", "cached", "bsz"))
            r = by_rid.get(rid) if isinstance(rid, Hashable) else None
            if r is None:
                why = f"request id {rid!r} is none of the {len(by_rid)} ready requests given to it"
            elif rid in seen:
                why = f"request {rid} is listed twice"
            elif not is_int(c0) or c0 != r.cached:
                why = (
                    f"cached={c0!r}, but request {rid} has {r.cached} cached tokens (the KV it would compute is wrong)"
                )
            elif not is_int(n) or not 1 <= n <= r.prompt_tokens - r.cached:
                why = f"bsz={n!r} is not in [1, {r.prompt_tokens - r.cached}] (the request's remaining tokens)"
            else:
                seen.add(rid)
                items.append((r, int(c0), int(n)))
                continue
            raise RuntimeError(f"batcher {self.batcher.name!r} returned a bad item {b!r}: {why}")
        return items

    def _peer_writing(self, r: _PrefillReq) -> bool:
        # The DE forwards its DE-path read, one notifying write per layer (none when it read no block).
        t = r.task
        if r.de_read_done and r.de_end_blocks <= t.pe_read_blocks:
            return False
        return t.pe_read_blocks < t.hit_blocks and len(r.layers_from_de) < self.num_layers

    def _has_ready(self) -> bool:
        return any(self._ready(self.reqs[k]) for k in self.order)

    def _load_whole(self) -> None:
        """Basic prefill: a request whose reads are done (and, on the DE path, every layer the DE forwards landed)
        loads its whole hit KV, every layer, into HBM: the bytes cross the PE's CNIC ingress on its H2D copy thread,
        FIFO, while the PE runs other batches (the simulator's `_h2d_basic`); it may join a batch once they crossed."""
        for key in self.order:
            r = self.reqs[key]
            if r.hbm != "none" or not self._reads_in(r):
                continue
            if r.de_end_blocks > r.task.pe_read_blocks and len(r.layers_from_de) < self.num_layers:
                continue  # (also when a PE-side block cut the hit: the DE's rows must land before they are recomputed)
            nbytes = self.num_layers * r.final_hit * self.bpt
            if self._h2d is None or nbytes == 0:
                r.hbm = "in"
                continue
            r.hbm = "loading"
            self._h2d.submit(nbytes, lambda r=r: self.inbox.put("h2d_done", r), cancelled=lambda r=r: r.cancelled)

    def _run_batch(self, items: list) -> None:
        """Layerwise prefill of one batch: items (request, cached, bsz) compute tokens [cached, cached+bsz). Basic
        prefill (not `self.layerwise`): the same steps, but the requests' KV is in HBM before the first layer (no waits,
        no H2D here) and goes to the DE after the last (`_send_whole`)."""
        t_start = clock.now()
        for r, _, _ in items:
            if not r.started:
                r.started = True
                r.t_prefill_start = t_start
                self.emit("prefill_start", r.task.request_id, r.task.attempt, at=t_start)
        token_ids = [r.task.prompt_ids[c0 : c0 + n] for r, c0, n in items]
        cached = [c0 for _, c0, _ in items]
        waits: list[tuple[float, float]] = []  # perf_counter spans of this batch's waits inside the layer loop

        def cached_layer(layer: int) -> list:
            # Wait only for this layer's DE-side KV: later layers keep streaming while we compute. Also when a
            # PE-side block cut the hit before the DE's blocks: their rows are recomputed, but the DE's write
            # must land first (not over the recomputed KV, nor into the area once freed for another request).
            # (Basic prefill: every layer landed before the request was ready, `_load_whole`.)
            self.tick = time.monotonic()
            for r, c0, _ in items:
                if self.layerwise and r.de_end_blocks > r.task.pe_read_blocks and c0 == r.final_hit:
                    t = time.perf_counter()
                    self._wait(lambda r=r: layer in r.layers_from_de or r.cancelled, f"layer {layer} of {r.key}")
                    waits.append((t, time.perf_counter()))
            return [r.area[layer, :c0] for r, c0, _ in items]  # uint8 [c0, bpt] each

        def on_layer(layer: int, new_kv: list) -> None:
            self.tick = time.monotonic()
            for (r, c0, n), kv in zip(items, new_kv, strict=True):
                r.area[layer, c0 : c0 + n] = kv  # uint8 [n, bpt]
                if r.cancelled or not self.layerwise:  # (basic: the DE gets it after the last layer, `_send_whole`)
                    continue
                self._send_layer(r, layer, c0, n)
            self._hand_over_sent()  # (earlier requests' writes that ended meanwhile: not one batch late)

        def h2d(nbytes: int) -> None:
            # Inside the layer's load (a layer ahead of the compute): the cached KV this layer feeds crosses the
            # PE's CNIC into HBM (ingress) -- the PE-read hit from its buffer, and the DE-read hit and earlier chunks,
            # which a GPU cluster writes into HBM through this CNIC too (the simulator's PE cnic_in).
            t = time.perf_counter()
            try:
                # A stopped (killed) engine stops pacing, as `_wait` does: the rest of a layer's H2D on a slow CNIC
                # used to hold the thread past `join` (and `kill` for its 2 s) while its transport was closed.
                if not pace_on(self.cnic_in, nbytes, self._stop):
                    raise RuntimeError(f"pe{self.engine_id} stopped while its H2D crossed the CNIC")
            finally:
                self.tick = time.monotonic()
                dt = time.perf_counter() - t
                self.h2d_wait_s += dt
                self.wait_s += dt
                waits.append((t, t + dt))

        t0 = time.perf_counter()
        wait0 = self.wait_s
        self._in_batch = {r.key for r, _, _ in items}
        try:
            if self.cnic_in is None or not self.layerwise:  # (basic: the hit KV is in HBM, the chunks stay there)
                first_tokens = self.model.prefill(token_ids, cached, cached_layer, on_layer)
            else:
                first_tokens = self.model.prefill(token_ids, cached, cached_layer, on_layer, h2d=h2d)
        finally:
            self._in_batch = set()
        # Compute only: time spent waiting for DE-side layers (or the CNIC) inside the layer loop is not model time,
        # except while the device was still computing a layer dispatched before the wait (JAX dispatches
        # asynchronously: `device_busy`). Until 2026-12-07 that was subtracted too: a "dense" model with 100 ms waits
        # per layer was measured at 19% of its compute. (A stand-in model without device_busy: the waits, whole.)
        busy = getattr(first_tokens, "device_busy", ())
        overlap = sum(max(0.0, min(b, end) - max(a, start)) for a, b in waits for start, end in busy)
        wall = time.perf_counter() - t0
        compute = min(wall, wall - (self.wait_s - wait0) + overlap)
        self.busy_s += compute
        if len(self.step_log) < STEP_LOG_MAX:
            self.step_log.append(([(c0, n) for _, c0, n in items], compute))
        for (r, c0, n), tok in zip(items, first_tokens, strict=True):
            r.cached = c0 + n
            if r.cancelled:  # its DE died mid-batch: the scheduler re-runs it elsewhere
                self._finish(r)
            elif r.cached == r.prompt_tokens:
                r.first_token = int(tok)
                if not self.layerwise:
                    self._send_whole(r)  # (layerwise: every layer's KV is on its way already, `_send_layer`)
                self._after_writes(r)

    def _send_layer(self, r: _PrefillReq, layer: int, c0: int, n: int) -> None:
        """Write what the DE lacks of this layer: the PE-read hit (first chunk only) and the new tokens."""
        ranges = [(c0, c0 + n)]
        if c0 == r.final_hit and r.pe_hit_end > 0:
            ranges = [(0, r.pe_hit_end)] + ranges if r.pe_hit_end < c0 else [(0, c0 + n)]
        for a, b in ranges:
            self._write_rows(r, layer, a, b)

    def _write_rows(self, r: _PrefillReq, layer: int, a: int, b: int) -> None:
        """Write tokens [a, b) of `layer` from r's area to the same rows of its area on the DE (a future in r.futures)."""
        r.futures.append(
            self.write_to(
                r.task.decode_engine,
                self.area_offset(r.area_off, r.prompt_tokens, layer, a),
                self.area_offset(r.de_area_off, r.prompt_tokens, layer, a),
                (b - a) * self.bpt,
            )
        )

    def _send_whole(self, r: _PrefillReq) -> None:
        """Basic prefill, the request's last layer computed: what the DE lacks of its prompt KV (the PE-read hit and
        the new KV), every layer, goes out now; the PE goes on with its next batch meanwhile (the simulator's basic
        `_prefill_done`), and hands the first token over once the writes are over (`_after_writes`)."""
        if r.pe_hit_end < r.final_hit:  # (the DE holds the DE-read hit [pe_hit_end, final_hit))
            ranges = [(0, r.pe_hit_end), (r.final_hit, r.prompt_tokens)]
        else:
            ranges = [(0, r.prompt_tokens)]
        for layer in range(self.num_layers):
            for a, b in ranges:
                if b > a:
                    self._write_rows(r, layer, a, b)

    def _after_writes(self, r: _PrefillReq) -> None:
        """r's last layer is computed: once every KV write to its DE has ended, "sent" in the inbox hands the first
        token over (`_hand_over_sent`). The PE goes on with its next batch meanwhile, so the next batch's H2D (CNIC ingress)
        overlaps these writes (egress), as the simulator's full-duplex CNIC does. (It used to wait here: on a CNIC-tight
        setup ingress and egress then added up, layerwise 45.2 s against Basic's 27.8 s.) No deadline: the writes are
        paced by this engine's CNIC, so a slow cap makes them long, not lost; a dead DE fails them (the transport) or
        cancels the request (the scheduler). All of them, not the first failure (`combine_futures`): the area they
        read from is r's until then."""
        left = [len(r.futures)]
        lock = threading.Lock()

        def sent() -> None:
            self._sent.append(r)
            self.inbox.put("sent", None)  # (wakes the engine's loop; a running batch looks between layers)

        def one_done(_f) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                sent()

        if not r.futures:
            sent()
        for f in list(r.futures):
            f.add_done_callback(one_done)

    def _hand_over_sent(self) -> None:
        """Hand over the first token of every request whose writes have ended (`_after_writes`), on the engine's
        thread: from its loop ("sent" in the inbox) and between the layers of a running batch (none of them is in
        it), so a hand-over never waits for a whole batch."""
        while self._sent:
            r = self._sent.popleft()
            if self.reqs.get(r.key) is r and not r.cancelled:
                self._hand_over(r)

    def _hand_over(self, r: _PrefillReq) -> None:
        """r's KV writes to the DE are over: the first token goes to the DE (one failed: r is dropped here)."""
        t = r.task
        try:
            for f in r.futures:
                f.result()
        except Exception as e:  # noqa: BLE001 -- DE gone or unreachable: the scheduler re-runs the request elsewhere
            if self._transport_failed(e, "write"):
                log.warning("pe%d: KV of request %s did not reach DE %d: %r", self.engine_id, r.key, t.decode_engine, e)
                self.peer_lost(t.decode_engine, t.request_id, t.attempt, e)
            self._finish(r)
            return
        # Reported before the DE hears of it: the DE may run the request (its first-token stamp) and finish it before
        # this thread got to emit (prefill_end came after first_token, or after the run's last report).
        t_end = clock.now()
        self.emit("prefill_end", t.request_id, t.attempt, at=t_end, hit_tokens=r.final_hit)
        self.send_msg(
            t.decode_engine,
            {
                "kind": "prefill_done",
                "request_id": t.request_id,
                "attempt": t.attempt,
                "hit_tokens": r.final_hit,
                "first_token": r.first_token,
                "pe_stamps": {"prefill_start": r.t_prefill_start, "prefill_end": t_end, "read": r.pe_read},
            },
        )
        self._finish(r)

    def _finish(self, r: _PrefillReq) -> None:
        self.hbm_used -= r.hbm_bytes  # (basic prefill: its KV left for the DE, or it was dropped)
        r.hbm_bytes = 0
        self._gone_attempt(r.key)
        self.reqs.pop(r.key, None)
        if r.key in self.order:
            self.order.remove(r.key)
        self._release_area(r)

    def _wait(self, pred: Callable[[], bool], what: str) -> None:
        t0 = time.perf_counter()
        try:
            self._wait_loop(pred, what)
        finally:
            self.wait_s += time.perf_counter() - t0

    def _wait_loop(self, pred: Callable[[], bool], what: str) -> None:
        """Handle the inbox until `pred()`. No deadline: what it waits for is paced by the CNICs, so a slow cap makes it
        long, not lost (a DE's layers taking over 30 s failed the run with a TimeoutError); a dead peer's requests
        are cancelled by the scheduler (pred checks `cancelled`)."""
        while not pred():
            self.tick = time.monotonic()
            if self._stop.is_set():
                raise RuntimeError(f"pe{self.engine_id} stopped while waiting for {what}")
            item = self.inbox.get(WAIT_POLL_S)
            if item is not None:
                self._handle(*item)


# ====================================================================================================== DE
@dataclasses.dataclass(eq=False)
class _DecodeReq:
    task: TurnTask
    handle: object = None
    area: np.ndarray | None = None
    area_off: int = 0
    pe_area_off: int | None = None
    read_job: ReadJob | None = None  # the DE-side SNIC read, until it reports done
    de_read_state: str = "none"  # none | reading | done
    de_end_blocks: int = 0
    de_read_sent: bool = False
    forward_futures: list = dataclasses.field(default_factory=list)
    forward_lost: bool = False  # a forwarded layer's write failed (reported once: `_forward_failed`)
    prefill_done: bool = False
    final_hit: int = 0
    pe_stamps: dict | None = None  # the PE's own stamps of this attempt (prefill_done), reported with turn_done
    tokens: list = dataclasses.field(default_factory=list)  # generated token ids
    # new -> buffered (area taken) -> loading (slot taken, H2D on the CNIC) -> decoding (in the slot) -> finishing
    stage: str = "new"
    slot: int = -1
    length: int = 0  # tokens whose KV is in the slot
    writes_pending: int = 0
    done_at: float = 0.0
    cancelled: bool = False
    # Keys of the sequence (prompt, then generated tokens) up to its last full block, kept for the decode
    # write-back: each newly full block is hashed once (was: all the decode blocks again, per block).
    key_chain: BlockKeyChain | None = None

    @property
    def key(self):
        return (self.task.request_id, self.task.attempt)


class DecodeEngine(EngineBase):
    role = "de"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        c = self.cfg.cluster
        self.slots = c.decode_slots
        self.batch = self.model.new_decode_batch(c.decode_slots, c.max_seq_len)
        self.slot_req: list[_DecodeReq | None] = [None] * c.decode_slots
        self.reqs: dict[tuple, _DecodeReq] = {}
        self.order: list[tuple] = []
        self.finishing: list[_DecodeReq] = []  # tokens done, write-backs in flight
        self.decode_steps = 0
        # The DE's copies through its CNIC, off the decode loop: prompt KV into a slot (ingress), filled blocks out
        # of it (egress, beside the DE-read hit it forwards to PEs; the simulator's de.cnic_in / de.cnic).
        self._h2d = self._d2h = None
        if self.cnic is not None:
            self._h2d = _CopyQueue(f"de{self.engine_id}-h2d", self.cnic_in, self._stop)
            self._d2h = _CopyQueue(f"de{self.engine_id}-d2h", self.cnic, self._stop)
            self._threads += [self._h2d.thread, self._d2h.thread]

    def _handle(self, kind: str, item) -> None:
        if kind == "directory":
            self.directory = item
        elif kind == "task":
            if (item.request_id, item.attempt) in self._gone:  # cancelled before it came: its messages are ignored
                return
            self._add_request(_DecodeReq(task=item))
        elif kind == "cancel":
            r = self._cancelled_request(item)
            if r is not None:
                self._drop(r)
        elif kind == "msg":
            r = self._request_of_msg(item)
            if r is None:
                return
            if item["kind"] == "pe_area":
                r.pe_area_off = item["offset"]
            elif item["kind"] == "prefill_done":
                r.prefill_done = True
                r.final_hit = item["hit_tokens"]
                r.pe_stamps = item.get("pe_stamps")
                r.tokens = [item["first_token"]]  # out once the request runs in a decode slot (`_admit`)
        elif kind == "read_done":
            job, ok, nbytes, t0, t1 = item
            r = self._read_finished(job)
            if r is not None:
                r.de_read_state = "done"
                r.de_end_blocks = r.task.pe_read_blocks + ok
                # Stamped with the SNIC's end of the read (t1), as t_start with its start: not when this thread got to it.
                self.emit("read_done", job.request_id, job.attempt, at=t1, side="de", nbytes=nbytes, t_start=t0)
        elif kind == "write_done":
            r = item
            r.writes_pending -= 1
        elif kind == "h2d_done":
            r = item
            if self.reqs.get(r.key) is r and r.stage == "loading" and not r.cancelled:
                self._loaded(r)
        elif kind == "layer":
            pass  # DEs receive no notifying writes
        else:
            raise RuntimeError(f"unknown inbox item {kind!r}")

    def _prepare(self) -> None:
        for key in self.order:
            r = self.reqs[key]
            if r.cancelled:
                continue
            t = r.task
            if r.stage == "new":
                got = self._alloc_area(t.prompt_tokens)
                if got is None:
                    break  # FIFO behind the buffer budget
                r.handle, r.area, r.area_off = got
                r.stage = "buffered"
                self.send_msg(
                    t.prefill_engine,
                    {"kind": "de_area", "request_id": t.request_id, "attempt": t.attempt, "offset": r.area_off},
                )
                if t.pe_read_blocks < t.hit_blocks:
                    r.de_read_state = "reading"
                    self._submit_read(r, t.block_keys[t.pe_read_blocks : t.hit_blocks], t.pe_read_blocks)
            if r.de_read_state == "done" and not r.de_read_sent and r.pe_area_off is not None:
                self._forward_to_pe(r)

    def _peer_writing(self, r: _DecodeReq) -> bool:
        # The PE's writes of the prompt KV have all landed once it sent prefill_done (it waits for them first).
        return not r.prefill_done

    def _forward_to_pe(self, r: _DecodeReq) -> None:
        """DE path: tell the PE how much was read, then stream it layer by layer (one notifying write each)."""
        t = r.task
        r.de_read_sent = True
        self.send_msg(
            t.prefill_engine,
            {"kind": "de_read_done", "request_id": t.request_id, "attempt": t.attempt, "end_blocks": r.de_end_blocks},
        )
        a, b = t.pe_read_blocks * self.bs, r.de_end_blocks * self.bs
        if b <= a:
            return
        for layer in range(self.num_layers):
            f = self.write_to(
                t.prefill_engine,
                self.area_offset(r.area_off, t.prompt_tokens, layer, a),
                self.area_offset(r.pe_area_off, t.prompt_tokens, layer, a),
                (b - a) * self.bpt,
                notify=layer_tag(t.request_id, t.attempt, layer),
            )
            r.forward_futures.append(f)
            f.add_done_callback(lambda f, r=r: self._forward_failed(f, r))

    def _forward_failed(self, f, r: _DecodeReq) -> None:
        """A forwarded layer's write ended. One that failed, unless r was dropped meanwhile (a cancel drops its PE,
        which fails the writes): the PE, which waits for these layers, cannot be reached (`peer_lost`, once)."""
        e = f.exception()
        if e is None or r.cancelled or r.forward_lost:
            return
        r.forward_lost = True
        t = r.task
        if self._transport_failed(e, "write"):
            log.warning(
                "de%d: hit KV of request %s did not reach PE %d: %r", self.engine_id, r.key, t.prefill_engine, e
            )
            self.peer_lost(t.prefill_engine, t.request_id, t.attempt, e)

    def _admit(self) -> None:
        """Move prompts whose KV is complete into free decode slots (continuous batching)."""
        for key in list(self.order):
            r = self.reqs.get(key)
            if r is None or not r.prefill_done or r.stage != "buffered" or r.cancelled:
                continue
            free = [i for i, s in enumerate(self.slot_req) if s is None]
            if not free:
                return
            t = r.task
            for f in r.forward_futures:  # our writes out of the area must be over before it is reused
                try:
                    f.result(timeout=PEER_TIMEOUT_S)
                except Exception:  # noqa: BLE001 -- the PE finished without them (it had them or cut the hit)
                    pass
            # Write-back of the prompt's new whole blocks (the hit blocks are already stored).
            n_whole = t.prompt_tokens // self.bs
            first_new = r.final_hit // self.bs
            if n_whole > first_new:
                # Owned copies (`.copy()`: with one layer the rows are contiguous and ascontiguousarray would
                # keep a view of an area freed below, persisting a later request's bytes under these keys).
                blocks = [r.area[:, j * self.bs : (j + 1) * self.bs].copy() for j in range(first_new, n_whole)]
                self._write_back(r, t.block_keys[first_new:n_whole], blocks)
            slot = free[0]
            # The slot is the request's from now on; its prompt KV crosses the DE's CNIC into HBM (paced, on the
            # H2D copy thread: the other slots keep decoding meanwhile), then it runs (`_loaded`).
            r.slot = slot
            r.stage = "loading"
            self.slot_req[slot] = r
            nbytes = self.num_layers * t.prompt_tokens * self.bpt
            if self._h2d is None:
                self._loaded(r)
            else:
                self._h2d.submit(nbytes, lambda r=r: self.inbox.put("h2d_done", r), cancelled=lambda r=r: r.cancelled)

    def _loaded(self, r: _DecodeReq) -> None:
        """The prompt KV crossed the CNIC: copy the area into the request's slot, free the area, start decoding."""
        t = r.task
        t0 = time.perf_counter()
        self.batch.load(r.slot, r.area, t.prompt_tokens)
        self.busy_s += time.perf_counter() - t0
        r.handle.release()
        r.area = None
        r.stage = "decoding"
        r.length = t.prompt_tokens
        # The PE computed the first token; it is out when the request runs on the DE, its prompt KV loaded
        # (the simulator's definition: TTFT includes the wait for a slot and the H2D, TPOT does not).
        self.emit("first_token", t.request_id, t.attempt)
        if len(r.tokens) >= t.gen_tokens:
            self._finish_tokens(r)

    def _write_back(self, r: _DecodeReq, keys: list, blocks: list, d2h: bool = False) -> None:
        """Persist `blocks` through the node's SNIC. `d2h`: they were read back from device memory, so they cross
        the DE's CNIC first (paced on its D2H copy thread, then handed to the SNIC)."""
        r.writes_pending += 1
        job = WriteJob(keys, blocks, lambda _n, r=r: self.inbox.put("write_done", r))
        if d2h and self._d2h is not None:
            # (A request dropped before its block crossed: neither paced nor written; its re-run writes the block.)
            self._d2h.submit(
                sum(int(b.nbytes) for b in blocks),
                lambda job=job: self.snic.submit_write(job),
                cancelled=lambda r=r: r.cancelled,
            )
        else:
            self.snic.submit_write(job)

    def _step(self) -> None:
        active = [
            r for r in self.slot_req if r is not None and r.stage == "decoding" and len(r.tokens) < r.task.gen_tokens
        ]
        if not active:
            return
        n = self.slots
        tokens = np.zeros((n,), np.int32)
        lengths = np.zeros((n,), np.int32)
        mask = np.zeros((n,), bool)
        for r in active:
            tokens[r.slot] = r.tokens[-1]
            lengths[r.slot] = r.length
            mask[r.slot] = True
        t0 = time.perf_counter()
        nxt = self.batch.step(tokens, lengths, mask)  # [N] int32 greedy next tokens
        dt = time.perf_counter() - t0
        self.busy_s += dt
        if len(self.step_log) < STEP_LOG_MAX:
            self.step_log.append((len(active), int(sum(r.length for r in active)), dt))
        self.decode_steps += 1
        for r in active:
            r.length += 1
            r.tokens.append(int(nxt[r.slot]))
            if len(r.tokens) == 2:
                self.emit("second_token", r.task.request_id, r.task.attempt)
            if r.length % self.bs == 0:  # a block just filled: persist it while decoding
                j = r.length // self.bs - 1
                key = self._decode_block_key(r, j)
                self._write_back(r, [key], [self.batch.read_block(r.slot, j * self.bs, self.bs)], d2h=True)
            if len(r.tokens) >= r.task.gen_tokens:
                self._finish_tokens(r)

    def _decode_block_key(self, r: _DecodeReq, j: int) -> bytes:
        """Key of block `j` of the request's slot sequence: the prompt, then the generated tokens whose KV is in
        the slot (all but the last). Its chain starts from the prompt's keys and is fed only the tokens new since
        its last block, so the write-back costs O(1) a token (was: O(sequence) a block)."""
        t = r.task
        if r.key_chain is None:
            r.key_chain = BlockKeyChain.resume(t.block_keys, t.prompt_ids, self.bs)
        chain = r.key_chain
        n_prompt = len(t.prompt_ids)
        # The sequence's tokens [chain.num_tokens, r.length) are generated ones: r.tokens[i] sits at n_prompt + i.
        chain.extend(np.asarray(r.tokens[chain.num_tokens - n_prompt : r.length - n_prompt], np.int32))
        return chain.keys[j]

    def _finish_tokens(self, r: _DecodeReq) -> None:
        """Tokens complete: free the slot; report the turn once its write-backs are stored."""
        self.slot_req[r.slot] = None
        self.batch.free(r.slot)
        r.slot = -1
        r.stage = "finishing"
        r.done_at = clock.now()
        self.finishing.append(r)

    def _report_finished(self) -> None:
        for r in list(self.finishing):
            if r.writes_pending > 0 and not r.cancelled:
                continue
            self.finishing.remove(r)
            if not r.cancelled:
                # The turn ends at its last token; the next turn's lookup sees every block written back.
                self.ctx.emit(
                    Event(
                        "turn_done",
                        r.task.request_id,
                        r.task.attempt,
                        r.done_at,
                        {"tokens": np.asarray(r.tokens, np.int32), "hit_tokens": r.final_hit, "pe": r.pe_stamps},
                    )
                )
            self._forget(r)

    def _drop(self, r: _DecodeReq) -> None:
        if r.slot >= 0:
            self.slot_req[r.slot] = None
            self.batch.free(r.slot)
        if r in self.finishing:
            self.finishing.remove(r)
        self._forget(r)

    def _forget(self, r: _DecodeReq) -> None:
        self._gone_attempt(r.key)
        self.reqs.pop(r.key, None)
        if r.key in self.order:
            self.order.remove(r.key)
        self._release_area(r)

    def run(self) -> None:
        while not self._stop.is_set():
            self.tick = time.monotonic()  # (also while idle: waiting for work is no stall)
            busy = any(s is not None and s.stage == "decoding" for s in self.slot_req)
            item = self.inbox.get(0 if busy else WAIT_POLL_S)
            while item is not None:
                self._handle(*item)
                item = self.inbox.get(0)
            self._prepare()
            self._admit()
            self._step()
            self._report_finished()
