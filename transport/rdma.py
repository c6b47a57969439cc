"""RDMA transport via pyverbs: RC queue pairs, one-sided RDMA WRITE/READ between registered memory regions.

Status: written against the pyverbs API (rdma-core's Documentation/pyverbs.md and pyverbs/*.pyx: Context,
PD, CQ, MR(address=...), QP/QPInitAttr/QPAttr/to_rts, SGE, SendWR.set_wr_rdma, CQ.poll) but NOT run: the
development machine has no RDMA device and no pyverbs. Its conformance tests skip with the reason from
`rdma_unavailable_reason()`; run `pytest tests/test_transport_conformance.py -k rdma` on a host with an
RDMA NIC (and `pip install 'dualpath-jax[rdma]'`) before relying on it.

Design:
- a `TcpTransport` endpoint is the control channel (same address, loopback/secret rules and HMAC auth):
  it carries QP connection info, region lookups (address, rkey, size; cached until the peer deregisters the
  region, which tells its peers), notifications and user messages (its questions go on the channel's low
  connection, whose sender thread runs no application callback);
- per peer, one RC QP per priority class ("high", "low"), created on `connect` and moved to RTS with the
  peer's QP number, PSN, LID, GID, active MTU and read depth exchanged over the control channel (both ends use
  the smaller MTU; reads in flight never exceed what the responder serves). When both sides connect at once
  (engines connect lazily on their first transfer) each gets its own connected set: a side posts on the first
  set it connected and keeps the other open for the peer's posts;
- every registered region is an MR over the caller's buffer (`MR(pd, len, access, address=ptr)`, remote
  read/write allowed), so transfers are zero-copy DMA;
- `write`/`read` post RDMA WRITE/READ work requests (chunks of `chunk_bytes`, each signaled) and a poller
  thread completes futures from the CQ; a write posted while a read is in flight on its QP is fenced
  (IBV_SEND_FENCE: an RC responder may run a later WRITE before an earlier READ read its bytes, against the
  posting order); a failed completion (peer gone: RC retries exhausted, or QP flushed) fails the transfer and the
  peer; a lost control connection fails the peer's pending transfers too; a lost peer's QPs go to the error state
  (a peer only stalled cannot land the writes its NIC still holds), and `disconnect(peer)` drops it that way;
- settings: `device`, `ib_port`, `gid_index` (RoCE v2 usually needs an IP-based GID, not index 0) and a service
  level per priority class (`sl_high`, `sl_low`, set in each QP's address vector); `check_rdma_args` checks their
  types and ranges on any host, `check_rdma_device` the device, port (ACTIVE) and GID where a device exists,
  both before anything is opened (`RdmaConfigError` names the argument); the control channel's handshake and
  connection-set caps (`CONTROL_ARGS`: max_sets, handshake_step_s, ...) are passed to its `TcpTransport`, checked
  first as well (`check_control_args`);
- a notifying write sends `(tag, region, offset, length)` over the control channel once the RDMA WRITE
  completed (for RC, a successful completion means the responder acknowledged the data), so the receiver
  gets the same `Notification` as with the other backends. (WRITE_WITH_IMM would save that message but
  carries only 32 bits and needs posted receives; left as an optimisation.)
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import logging
import numbers
import operator
import queue
import random
import threading
import time
from concurrent.futures import Future
from typing import Any

from transport.base import (
    PRIORITIES,
    TRANSPORTS,
    MemoryRegion,
    Notification,
    Pacer,
    PeerLostError,
    PostedFuture,
    RegionError,
    Transport,
    TransportClosedError,
    TransportError,
    _complete,
    _fail,
    check_message,
    check_notify,
    check_priority,
    combine_futures,
    deadline,
)

log = logging.getLogger(__name__)

_INTERNAL = b"\x00"  # control-channel prefix of this backend's own messages


class _NoMR:
    """The memory region of a 0-byte region: nothing registered with the device (0-byte transfers post nothing)."""

    lkey = rkey = 0

    def close(self) -> None:
        pass


_NO_MR = _NoMR()
_USER = b"\x01"  # prefix of user messages (send/recv)
# The largest user message (`send`) by default, as tcp's; the control channel takes it with its prefix byte (a 16 MiB
# message was refused: 16 MiB + 1 over the channel's own 16 MiB limit).
MAX_MESSAGE_BYTES = 16 << 20
# The least `max_message_bytes`: this backend's own control messages (JSON: a region lookup names a region of up to
# REGION_NAME_MAX bytes, escaped; queue pair info; an error reply's text) go on the same channel, under the peer's limit.
MIN_MESSAGE_BYTES = 64 << 10
# ibv_send_flags (verbs.h): a fenced work request starts only once the RDMA READs posted before it on its QP completed
# (an RC responder may otherwise execute a later RDMA WRITE before an earlier READ has read its bytes); every work
# request is signaled (pyverbs' default, and `sq_sig_all`)
IBV_SEND_FENCE, IBV_SEND_SIGNALED = 1, 2

# ibv_qp_state IBV_QPS_ERR and ibv_qp_attr_mask IBV_QP_STATE (verbs.h): `disconnect` moves a peer's QPs to the error
# state (the NIC then runs none of its work requests on them, the peer's RDMA WRITE/READs into our MRs included)
IBV_QPS_ERR, IBV_QP_STATE = 6, 1


class _PostingEnded(Exception):  # noqa: N818 - control flow inside `_post_wrs`, never seen by a caller
    """A paced transfer's peer died (or the endpoint closed) while its chunk waited for the pacer."""


def rdma_unavailable_reason() -> str | None:
    """None if pyverbs imports and lists at least one RDMA device; else why the backend cannot run here."""
    try:
        import pyverbs.device as d
    except ImportError as e:
        return f"pyverbs is not installed ({e}); install the 'rdma' extra on a host with an RDMA NIC"
    try:
        devices = d.get_device_list()
    except Exception as e:  # noqa: BLE001 - any verbs error means: not usable here
        return f"cannot list RDMA devices: {e}"
    if not devices:
        return "no RDMA device found (ibv_get_device_list returned none)"
    return None


SERVICE_LEVELS = range(16)  # InfiniBand service levels (4 bits); on RoCE the SL sets the 802.1p priority
_PORT_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}


class RdmaConfigError(TransportError, ValueError):
    """A bad RDMA endpoint setting; `arg` names the constructor argument ("device", "ib_port", "gid_index",
    "sl_high", "sl_low", ...), so the runtime's config check can name its own field."""

    def __init__(self, arg: str, message: str):
        super().__init__(message)
        self.arg = arg


def _int_arg(arg: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; `RdmaConfigError` naming `arg` otherwise (bools and floats too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RdmaConfigError(arg, f"rdma: {arg} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        where = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RdmaConfigError(arg, f"rdma: {arg} must be {where}, got {value}")
    return value


def check_rdma_args(
    device: str | None = None,
    ib_port: int = 1,
    gid_index: int = 0,
    sl_high: int = 0,
    sl_low: int = 0,
    chunk_bytes: int = 16 << 20,
    max_send_wr: int = 256,
) -> dict[str, Any]:
    """Type and range checks of the endpoint's settings that need no device (they run everywhere, also where
    pyverbs is missing); returns them normalised. `RdmaConfigError` names the argument."""
    if device is not None and (not isinstance(device, str) or not device):
        raise RdmaConfigError(
            "device", f"rdma: device must be a non-empty device name or None (the first), got {device!r}"
        )
    return {
        "device": device,
        "ib_port": _int_arg("ib_port", ib_port, 1, 255),  # (u8 in the verbs API; ports count from 1)
        "gid_index": _int_arg("gid_index", gid_index, 0, 255),  # (u8 sgid_index in ibv_global_route)
        "sl_high": _int_arg("sl_high", sl_high, SERVICE_LEVELS.start, SERVICE_LEVELS.stop - 1),
        "sl_low": _int_arg("sl_low", sl_low, SERVICE_LEVELS.start, SERVICE_LEVELS.stop - 1),
        "chunk_bytes": _int_arg("chunk_bytes", chunk_bytes, 1, (1 << 31) - 1),  # (an SGE length is 32 bits)
        "max_send_wr": _int_arg("max_send_wr", max_send_wr, 1),
    }


# The control channel's (`TcpTransport`'s) settings an rdma endpoint takes and passes on: its handshakes and connection
# sets serve the peers' control connections as a tcp endpoint's do. (Not reply_copy_max_bytes: the control channel
# serves no TCP READ, it has no region; RDMA READs are served by the NIC, which copies nothing.)
CONTROL_ARGS = (
    "handshake_timeout_s",
    "max_sets",
    "max_sets_per_peer",
    "max_pending_handshakes",
    "handshake_step_s",
    "max_message_bytes",
)


def check_control_args(
    name: str = "x",
    handshake_timeout_s: float = 5.0,
    max_sets: int | None = None,
    max_sets_per_peer: int | None = None,
    max_pending_handshakes: int | None = None,
    handshake_step_s: float | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> dict[str, Any]:
    """The control channel's settings (`CONTROL_ARGS`) checked as `TcpTransport` checks them, with no device and
    nothing opened; returns them as its keyword arguments (None: tcp's default; max_message_bytes: the user
    messages' limit, which the channel takes with their prefix byte). `RdmaConfigError` names the argument."""
    from transport.tcp import _check_caps

    most = _int_arg("max_message_bytes", max_message_bytes, 1)
    if most < MIN_MESSAGE_BYTES:
        raise RdmaConfigError(
            "max_message_bytes",
            f"rdma: max_message_bytes must be >= {MIN_MESSAGE_BYTES} (this backend's own control messages go on the "
            f"same channel, under the peers' limits), got {most}",
        )

    t = handshake_timeout_s  # (a socket timeout of inf is an OverflowError; NaN never times out)
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 < t < float("inf"):
        raise RdmaConfigError(
            "handshake_timeout_s", f"rdma: handshake_timeout_s must be > 0 seconds and finite, got {t!r}"
        )
    caps = {
        "max_sets": max_sets,
        "max_sets_per_peer": max_sets_per_peer,
        "max_pending_handshakes": max_pending_handshakes,
        "handshake_step_s": handshake_step_s,
    }
    for arg, value in caps.items():  # (one at a time: the error names its argument)
        try:
            _check_caps(name, None, *(value if a == arg else None for a in caps))
        except ValueError as e:
            raise RdmaConfigError(arg, "rdma: " + str(e).removeprefix(f"tcp transport {name!r}: ")) from None
    return {"handshake_timeout_s": float(t), **caps, "max_message_bytes": most + len(_USER)}


def _gid_is_zero(gid: str) -> bool:
    try:
        return int(str(gid).replace(":", ""), 16) == 0
    except ValueError:
        return False


def check_rdma_device(
    device: str | None = None, ib_port: int = 1, gid_index: int = 0, chunk_bytes: int | None = None
) -> str:
    """Check that `device`, its port `ib_port` and the GID at `gid_index` exist and can be used (needs pyverbs and
    a device: call `rdma_unavailable_reason()` first). Returns the device name (the first device's for None).

    `RdmaConfigError` names the argument: a device that does not exist (listing those that do), a port the device
    does not have or that is not ACTIVE (with its state), a GID index past the port's table or with an empty GID
    (listing the indices that hold one: RoCE v2 usually needs one of the IP-based GIDs, not index 0), a
    `chunk_bytes` (the largest work request) past the port's max message size (every such work request would fail).
    """
    import pyverbs.device as d
    import pyverbs.enums as e

    names = [dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name) for dev in d.get_device_list()]
    if not names:
        raise RdmaConfigError("device", "rdma: no RDMA device found (ibv_get_device_list returned none)")
    if device is None:
        device = names[0]
    elif device not in names:
        raise RdmaConfigError("device", f"rdma: no RDMA device {device!r}; this host has: {', '.join(names)}")
    ctx = d.Context(name=device)
    try:
        nports = int(ctx.query_device().phys_port_cnt)
        if not 1 <= ib_port <= nports:
            raise RdmaConfigError(
                "ib_port", f"rdma: device {device!r} has no port {ib_port} (it has ports 1..{nports})"
            )
        attr = ctx.query_port(ib_port)
        if int(attr.state) != int(e.IBV_PORT_ACTIVE):
            state = _PORT_STATES.get(int(attr.state), str(attr.state))
            raise RdmaConfigError(
                "ib_port",
                f"rdma: port {ib_port} of device {device!r} is not ACTIVE (state {state}): link down or not configured",
            )
        table = int(attr.gid_tbl_len)
        usable = []
        for i in range(min(table, 256)):
            try:
                if not _gid_is_zero(ctx.query_gid(ib_port, i).gid):
                    usable.append(i)
            except Exception:  # noqa: BLE001 - an entry the driver cannot report is not usable
                pass
        hint = f"indices with a GID: {', '.join(map(str, usable)) or 'none'}"
        if gid_index >= table:
            raise RdmaConfigError(
                "gid_index",
                f"rdma: gid_index {gid_index} is past the GID table of {device!r} port {ib_port} ({table} entries; {hint})",
            )
        if gid_index not in usable:
            raise RdmaConfigError("gid_index", f"rdma: GID {gid_index} of {device!r} port {ib_port} is empty ({hint})")
        max_msg = getattr(attr, "max_msg_sz", None)
        if chunk_bytes is not None and max_msg is not None and chunk_bytes > int(max_msg):
            raise RdmaConfigError(
                "chunk_bytes",
                f"rdma: chunk_bytes {chunk_bytes} is larger than the max message size of {device!r} port {ib_port} "
                f"({int(max_msg)} bytes)",
            )
    finally:
        ctx.close()
    return device


def _buffer_address(view: memoryview) -> int:
    """Virtual address of a writable buffer's first byte (for MR registration)."""
    if view.nbytes == 0:
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class _Transfer:
    """One write/read split into work requests; resolves when all completed."""

    def __init__(self, fut: Future, peer: str, length: int, nwr: int, on_done=None):
        self.fut, self.peer, self.length, self.remaining, self.on_done = fut, peer, length, nwr, on_done
        self.lock = threading.Lock()
        self.read = False  # its work requests are RDMA READs (a write posted behind them on the QP is fenced)
        # 0-byte transfers posted behind this one in its class: finished right after it (its notification first);
        # None once finished (guarded by the peer's lock)
        self.followers: list[_Transfer] | None = []

    def finish(self) -> None:
        """All work requests completed: run `on_done` (a notifying write) or complete the future."""
        if self.on_done is not None:
            self.on_done()
        else:
            _complete(self.fut, self.length)

    def complete_one(self) -> bool:
        with self.lock:
            self.remaining -= 1
            return self.remaining == 0


class _RdmaPeer:
    def __init__(self, name: str):
        self.name = name
        self.qps: dict[str, Any] = {}  # class -> the QP this side posts on (the first set connected)
        self.slots: dict[str, threading.Semaphore] = {}  # send-queue credits per QP
        # QP sets connected later (both sides connected at once): kept alive, as the peer may post on them
        self.spare_qps: list[Any] = []
        self.ready = threading.Event()
        self.remote_regions: dict[str, tuple[int, int, int]] = {}  # name -> (addr, rkey, size)
        self.region_epoch = 0  # bumped by `forget_region`: a reply asked for before it is not cached
        self.transfers: set[_Transfer] = set()
        self.tail: dict[str, _Transfer] = {}  # class -> the last transfer with work requests posted in it
        self.reads: dict[str, int] = dict.fromkeys(PRIORITIES, 0)  # class -> RDMA READ work requests in flight
        self.dead: BaseException | None = None
        self.lock = threading.Lock()

    def forget_region(self, name: str) -> None:
        """The peer deregistered `name`: its (addr, rkey, size) is stale (a write with the old rkey is a remote access
        error that breaks the QP); the next transfer asks again (a name registered again gets its new MR)."""
        with self.lock:
            self.remote_regions.pop(name, None)
            self.region_epoch += 1


@TRANSPORTS.register("rdma")
class RdmaTransport(Transport):
    """RDMA endpoint (see the module docstring). `address` is the control channel's `(host, port)`.

    Args:
      name: endpoint name. device: RDMA device name (default: the first one). ib_port, gid_index: port and GID
      table index to use (RoCE v2 usually needs a gid_index with an IP-based GID). sl_high, sl_low: the service
      level (0-15) of each priority class's queue pairs (on RoCE it sets the 802.1p priority; default 0 for both).
      host, port, secret: the TCP control channel (loopback by default; non-loopback needs a secret); `port` is
      that channel's TCP port, not the RDMA port. pacer: optional sender pacing. timeout_s: the control channel's
      liveness timeout, and how long a post waits for a send-queue slot or a completion-queue entry before the peer
      is declared lost (`PeerLostError`). chunk_bytes: largest single work request. max_send_wr: outstanding work
      requests per QP. handshake_timeout_s, max_sets, max_sets_per_peer, max_pending_handshakes, handshake_step_s:
      the control channel's, as `TcpTransport`'s (`CONTROL_ARGS`; `config.transport_options` sets them for a run).
      Its reply_copy_max_bytes does not apply (the control channel serves no TCP read) and is not taken.
      max_message_bytes: the largest user message (`send`/`recv`) this endpoint takes [MAX_MESSAGE_BYTES, 16 MiB; at
        least MIN_MESSAGE_BYTES, 64 KiB]; as tcp's, its control channel's handshake tells the peers, whose `send` of a
        larger message raises `TransportError` at once (a larger one arriving closes the control connection set).

    Bad settings are `RdmaConfigError`s naming the argument: types and ranges are checked first (on any host),
    then the device, port (must be ACTIVE) and GID (`check_rdma_device`).
    """

    backend = "rdma"

    def __init__(
        self,
        name: str,
        device: str | None = None,
        ib_port: int = 1,
        gid_index: int = 0,
        sl_high: int = 0,
        sl_low: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: str | bytes | None = None,
        pacer: Pacer | None = None,
        timeout_s: float = 30.0,
        chunk_bytes: int = 16 << 20,
        max_send_wr: int = 256,
        handshake_timeout_s: float = 5.0,
        max_sets: int | None = None,
        max_sets_per_peer: int | None = None,
        max_pending_handshakes: int | None = None,
        handshake_step_s: float | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ):
        args = check_rdma_args(device, ib_port, gid_index, sl_high, sl_low, chunk_bytes, max_send_wr)
        # (NaN too; inf was an OverflowError at the first post: the send-queue waits take it as their timeout)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not 0 < timeout_s < float("inf"):
            raise RdmaConfigError("timeout_s", f"rdma: timeout_s must be > 0 seconds and finite, got {timeout_s}")
        control_args = check_control_args(
            name,
            handshake_timeout_s,
            max_sets,
            max_sets_per_peer,
            max_pending_handshakes,
            handshake_step_s,
            max_message_bytes,
        )
        from transport.tcp import TcpTransport, is_loopback

        if not is_loopback(host) and not secret:  # (the control channel's rule, checked before the device is open)
            raise ValueError(
                f"rdma transport {name!r}: binding non-loopback address {host!r} requires a shared secret "
                "(pass secret=...); peers must prove it at connect"
            )
        reason = rdma_unavailable_reason()
        if reason is not None:
            raise TransportError(f"rdma transport {name!r} unavailable: {reason}")
        device = check_rdma_device(args["device"], args["ib_port"], args["gid_index"], args["chunk_bytes"])
        super().__init__(name, pacer)
        import pyverbs.device as d
        import pyverbs.enums as e

        self._e = e
        self.device, self.ib_port, self.gid_index = device, args["ib_port"], args["gid_index"]
        self.service_levels = {"high": args["sl_high"], "low": args["sl_low"]}  # per priority class
        self.chunk_bytes, self.max_send_wr, self.timeout_s = args["chunk_bytes"], args["max_send_wr"], timeout_s
        self.max_message_bytes = control_args["max_message_bytes"] - len(_USER)
        self.ctx = d.Context(name=device)
        try:
            self._open(name, host, port, secret, pacer, TcpTransport, control_args)
        except BaseException:
            # (a failure part way, e.g. the control channel's port in use, left the context, PD and CQ open)
            self._closed = True  # (stops a poller that started)
            if getattr(self, "control", None) is not None:
                self.control.close()
            poller = getattr(self, "_poller", None)
            if poller is not None and poller.ident is not None:
                poller.join(2)
            for obj in (getattr(self, "cq", None), getattr(self, "pd", None), self.ctx):
                if obj is not None:
                    with contextlib.suppress(Exception):
                        obj.close()
            raise

    def _open(self, name, host, port, secret, pacer, TcpTransport, control_args) -> None:  # noqa: N803 - the class
        """The rest of the constructor: PD, CQ, the control channel (with `control_args`, `check_control_args`) and the
        threads (closed again on failure)."""
        from pyverbs.cq import CQ
        from pyverbs.pd import PD

        ib_port, gid_index = self.ib_port, self.gid_index
        self.pd = PD(self.ctx)
        self.port_attr = self.ctx.query_port(ib_port)
        self.gid = self.ctx.query_gid(ib_port, gid_index).gid  # string form, sent to peers
        dev_attr = self.ctx.query_device()
        self._rd_atomic = max(1, min(16, dev_attr.max_qp_rd_atom, dev_attr.max_qp_init_rd_atom))
        # Every WR is signaled: at most `cqe` may be in flight on this endpoint (all peers), or the CQ overruns.
        cqe = max(1, min(int(dev_attr.max_cqe), 1 << 16))
        self.cq = CQ(self.ctx, cqe, None, None, 0)
        self._cq_credits = threading.Semaphore(cqe)
        self._mrs: dict[str, Any] = {}
        self._peers: dict[str, _RdmaPeer] = {}
        self._wr_ids = itertools.count(1)
        self._wrs: dict[int, tuple[_Transfer, _RdmaPeer, str]] = {}  # wr_id -> (transfer, peer, class)
        self._req_ids = itertools.count(1)
        self._replies: dict[int, tuple[str, Future]] = {}  # req -> (peer, its reply) of the questions in flight
        self.control = TcpTransport(
            name,
            host=host,
            port=port,
            secret=secret,
            timeout_s=self.timeout_s,
            **control_args,
        )
        self.control.on_message = self._on_control
        self.control.on_peer_lost = self._on_control_lost
        self._poller = threading.Thread(target=self._poll_loop, name=f"rdma-{name}-cq", daemon=True)
        self._poller.start()
        # With a pacer, one sender thread per class posts the transfers (`_post`); without, the caller does.
        self._senders: dict[str, queue.SimpleQueue] = {cls: queue.SimpleQueue() for cls in PRIORITIES} if pacer else {}
        self._sender_threads = [
            threading.Thread(target=self._send_loop, args=(cls,), name=f"rdma-{name}-{cls}", daemon=True)
            for cls in self._senders
        ]
        for t in self._sender_threads:
            t.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.control.address

    # ---- memory regions -----------------------------------------------------------------------------------
    def _on_register(self, region: MemoryRegion) -> None:
        from pyverbs.mr import MR

        e = self._e
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
        if region.size == 0:  # a 0-byte region (the contract's): no MR (verbs may refuse 0 bytes), none is used
            self._mrs[region.name] = _NO_MR  # (only 0-byte transfers fit it, and those post no work request)
            return
        self._mrs[region.name] = MR(self.pd, region.size, access, address=_buffer_address(region.view))

    def _on_deregister(self, region: MemoryRegion) -> None:
        mr = self._mrs.pop(region.name, None)
        if mr is not None:
            mr.close()
        # Peers cache (addr, rkey, size): tell them it is gone (their cached rkey would break the QP on a region
        # registered again under the name; messages before it on the control channel are handled first).
        for name, p in list(self._peers.items()):
            if p.dead is None:
                with contextlib.suppress(TransportError):  # (a peer lost meanwhile has nothing left to forget)
                    self._ctl(name, {"op": "region_gone", "name": region.name})

    # ---- control channel ----------------------------------------------------------------------------------
    def _ctl(self, peer: str, msg: dict) -> Future:
        return self.control.send(peer, _INTERNAL + json.dumps(msg).encode())

    def _ask(self, peer: str, msg: dict, timeout: float = 10.0) -> dict:
        """Send `msg` and wait for the peer's reply. The question goes on the control channel's low connection: the
        high one's sender thread runs the done callbacks of notifying writes and messages, and a transfer posted
        there to a region not asked about yet waited for its own question, queued behind the frames only that thread
        sends (10 s, then a PeerLostError for a healthy peer)."""
        end = deadline(timeout)  # (one deadline for both waits; inf or 1e10: forever, a plain Future's OverflowError)
        req = next(self._req_ids)
        fut: Future = Future()
        self._replies[req] = (peer, fut)
        try:
            question = _INTERNAL + json.dumps({**msg, "req": req}).encode()
            self.control.send(peer, question, priority="low").result(None if end is None else end - time.monotonic())
            return fut.result(None if end is None else max(0.0, end - time.monotonic()))
        except TimeoutError:
            raise PeerLostError(f"{self.name}: {peer!r} did not answer {msg['op']!r} within {timeout} s") from None
        finally:
            self._replies.pop(req, None)

    def _reply(self, peer: str, req: int, **fields: Any) -> None:
        """Answer the peer's question `req`; nothing to do if its control set is gone meanwhile (its question fails
        with the lost channel there): that was logged as a "bad rdma control message" with a traceback."""
        try:
            self._ctl(peer, {"op": "reply", "req": req, **fields})
        except (PeerLostError, TransportClosedError) as e:
            log.info("%s: no reply to %r's question %s: %s", self.name, peer, req, e)

    def _on_control(self, peer: str, payload: bytes) -> bool:
        if payload[:1] == _USER:
            self.messages.put(peer, payload[1:])
            return True
        if payload[:1] != _INTERNAL:
            log.error("%s: control message from %r without a known prefix dropped", self.name, peer)
            return True
        try:
            msg = json.loads(payload[1:])
            op = msg["op"]
            if op == "reply":
                fut = self._replies.get(int(msg["req"]), (None, None))[1]
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif op == "qp_connect":
                # Runs on the control reader thread: QP creation is quick and the reply is only queued.
                try:
                    p, qps, info = self._create_qps(peer)
                    self._connect_qps(p, qps, msg["info"])
                except Exception as e:  # noqa: BLE001 - the peer's connect fails with it instead of timing out
                    log.exception("%s: cannot connect queue pairs to %r", self.name, peer)
                    self._reply(peer, msg["req"], error=f"{self.name}: cannot connect queue pairs: {e}")
                else:
                    self._reply(peer, msg["req"], info=info)
            elif op == "region":
                mr = self._mrs.get(msg["name"])
                with self._lock:
                    region = self._regions.get(msg["name"])
                if mr is None or region is None:
                    self._reply(peer, msg["req"], error=f"no region {msg['name']!r}")
                else:
                    self._reply(peer, msg["req"], addr=_buffer_address(region.view), rkey=mr.rkey, size=region.size)
            elif op == "region_gone":
                p = self._peers.get(peer)
                if p is not None:
                    p.forget_region(str(msg["name"]))
            elif op == "notify":
                self.completions.put(
                    Notification(peer, int(msg["tag"]), str(msg["region"]), int(msg["offset"]), int(msg["length"]))
                )
            else:
                log.error("%s: unknown rdma control op %r from %r", self.name, op, peer)
        except Exception:
            log.exception("%s: bad rdma control message from %r", self.name, peer)
        return True

    def _on_control_lost(self, peer: str, err: BaseException) -> None:
        lost = PeerLostError(f"control channel to {peer!r} lost: {err}")
        p = self._peers.get(peer)
        if p is not None:
            self._fail_peer(p, lost)
        # questions to it in flight fail now (they waited out `_ask`'s timeout, 10 s for a transfer's region lookup)
        for asked, fut in list(self._replies.values()):
            if asked == peer:
                _fail(fut, TransportClosedError(f"endpoint {self.name!r} is closed") if self._closed else lost)

    # ---- queue pairs ----------------------------------------------------------------------------------------
    def _create_qps(self, peer: str) -> tuple[_RdmaPeer, dict[str, tuple[Any, int]], dict]:
        """A new set of QPs to `peer` (one per class, in INIT) and the info the peer needs to connect to them.

        Each `connect` (ours, or the peer's handled in `_on_control`) makes its own set, so two sides connecting
        at the same time get two connected sets; `_connect_qps` posts on the first one (see `_RdmaPeer`).
        """
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr

        e = self._e
        with self._lock:
            p = self._peers.get(peer)
            if p is None or p.dead is not None:
                p = self._peers[peer] = _RdmaPeer(peer)
        info: dict[str, Any] = {
            "lid": self.port_attr.lid,
            "gid": self.gid,
            "mtu": int(self.port_attr.active_mtu),
            "rd_atomic": self._rd_atomic,
            "qps": {},
        }
        qps: dict[str, tuple[Any, int]] = {}
        try:
            for cls in PRIORITIES:
                cap = QPCap(max_send_wr=self.max_send_wr, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
                init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap, sq_sig_all=1)
                attr = QPAttr(port_num=self.ib_port)
                attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
                qp = QP(self.pd, init, attr)  # -> INIT
                psn = random.getrandbits(24)
                qps[cls] = (qp, psn)
                info["qps"][cls] = {"qpn": qp.qp_num, "psn": psn}
        except BaseException:
            for qp, _ in qps.values():
                qp.close()
            raise
        return p, qps, info

    def _connect_qps(self, p: _RdmaPeer, qps: dict[str, tuple[Any, int]], remote: dict) -> None:
        """Move a set from `_create_qps` to RTS against the peer's set `remote`; the first set of a peer is the
        one this side posts on, later ones stay open for the peer's posts."""
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr

        e = self._e
        try:
            for cls in PRIORITIES:
                qp, psn = qps[cls]
                r = remote["qps"][cls]
                attr = QPAttr(port_num=self.ib_port)
                attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
                # both ends must use the same path MTU: the smaller active MTU of the two ports
                attr.path_mtu = min(int(self.port_attr.active_mtu), int(remote["mtu"]), e.IBV_MTU_4096)
                attr.dest_qp_num = r["qpn"]
                attr.rq_psn = psn  # what we expect to receive = the peer's sq_psn (it sets sq_psn to our psn)
                attr.sq_psn = r["psn"]
                attr.max_dest_rd_atomic = self._rd_atomic  # reads we serve at once (what we told the peer)
                attr.max_rd_atomic = min(self._rd_atomic, int(remote["rd_atomic"]))  # never more than it serves
                attr.min_rnr_timer = 12
                attr.timeout = 14  # 4.096 us * 2**14 = 67 ms per try
                attr.retry_cnt = 7  # a dead peer fails a work request after ~0.5 s
                attr.rnr_retry = 7
                # hop_limit is RoCE v2's IP TTL: the default 1 drops every packet routed across a subnet
                gr = GlobalRoute(dgid=GID(remote["gid"]), sgid_index=self.gid_index, hop_limit=255)
                attr.ah_attr = AHAttr(
                    port_num=self.ib_port, is_global=1, gr=gr, dlid=remote["lid"], sl=self.service_levels[cls]
                )
                qp.to_rts(attr)
        except BaseException:
            for qp, _ in qps.values():
                qp.close()
            raise
        with p.lock:
            dead = p.dead is not None  # (disconnected meanwhile: this set must not take the peer's writes either)
            if p.qps or dead:
                p.spare_qps.extend(qp for qp, _ in qps.values())
            else:
                p.slots = {cls: threading.Semaphore(self.max_send_wr) for cls in PRIORITIES}
                p.qps = {cls: qp for cls, (qp, _) in qps.items()}
        if dead:
            self._to_error([qp for qp, _ in qps.values()])
        p.ready.set()

    def connect(
        self, peer: str, address: Any, timeout: float = 10.0, *, wait_for_listener_s: float | None = None
    ) -> None:
        """`Transport.connect`; `wait_for_listener_s` applies to the tcp control endpoint's connection."""
        self._check_open()
        p = self._peers.get(peer)
        # (with a peer connected, the control endpoint asks who is at `address` now: a peer started again there is a
        # new instance, whose set drops the old control set and so this peer; it returned here, posting to the dead one)
        self.control.connect(peer, address, timeout, wait_for_listener_s=wait_for_listener_s)
        if p is not None and p.dead is None and p.ready.is_set():
            return
        p, qps, info = self._create_qps(peer)
        try:
            reply = self._ask(peer, {"op": "qp_connect", "info": info}, timeout)
            if "error" in reply:
                raise TransportError(f"{self.name}: {peer!r} refused the RDMA connection: {reply['error']}")
        except BaseException:
            for qp, _ in qps.values():
                qp.close()
            raise
        self._connect_qps(p, qps, reply["info"])

    def peers(self) -> list[str]:
        with self._lock:
            return sorted(n for n, p in self._peers.items() if p.dead is None and p.ready.is_set())

    def disconnect(self, peer: str) -> None:
        """`Transport.disconnect`: the peer's queue pairs (those this side posts on and the spare sets the peer posts
        on) move to the error state, so the NIC runs no work request on them any more: neither the peer's RDMA
        WRITE/READs into this side's MRs nor ours (in flight: flushed, completing with an error); its pending
        transfers fail with `PeerLostError`; the control set is dropped (the peer's transfers fail, no notification
        or message of it arrives any more). A later `connect` makes new QPs."""
        if self._closed:
            return
        p = self._peers.get(peer)
        if p is not None:  # (its QPs go to the error state: `_fail_peer`, now or when it was lost)
            self._fail_peer(p, PeerLostError(f"{self.name}: disconnected from {peer!r}"))
        self.control.disconnect(peer)

    def _to_error(self, qps: list[Any]) -> None:
        """Move `qps` to the error state (ibv_modify_qp): their outstanding work requests are flushed (the poller
        completes them with an error status) and no new one, posted here or arriving from the peer, is executed."""
        if not qps:
            return
        from pyverbs.qp import QPAttr

        attr = QPAttr()
        attr.qp_state = getattr(self._e, "IBV_QPS_ERR", IBV_QPS_ERR)
        for qp in qps:
            if not hasattr(qp, "modify"):  # (a pyverbs stand-in without it: nothing to move)
                continue
            try:
                qp.modify(attr, getattr(self._e, "IBV_QP_STATE", IBV_QP_STATE))
            except Exception:  # noqa: BLE001 - the others still go; the control set is dropped all the same
                log.exception("%s: cannot move a queue pair to the error state", self.name)

    def _peer(self, peer: str) -> _RdmaPeer:
        self._check_open()
        p = self._peers.get(peer)
        if p is None or not p.ready.is_set():
            raise PeerLostError(f"{self.name}: not connected to {peer!r}")
        if p.dead is not None:
            raise self._gone(p)
        return p

    def _gone(self, p: _RdmaPeer) -> TransportError:
        """The error of a post to the dead peer `p`: `TransportClosedError` if this endpoint closed (a post racing
        `close` raised PeerLostError, which names a lost peer and sends callers to fail over)."""
        if self._closed:
            return TransportClosedError(f"endpoint {self.name!r} is closed")
        return PeerLostError(f"{self.name}: peer {p.name!r} is gone: {p.dead}")

    def remote_region(self, peer: str, name: str, timeout: float = 10.0, refresh: bool = False) -> tuple[int, int, int]:
        """(address, rkey, size) of the peer's region `name` (asked once, then cached until the peer deregisters it;
        `refresh`: ask again, e.g. for a range past the cached size: the name may have been registered again)."""
        p = self._peer(peer)
        if not isinstance(name, str):  # (region names are strings; a peer is never asked for another name)
            raise RegionError(f"peer {peer!r} has no region {name!r}")
        info = None if refresh else p.remote_regions.get(name)
        if info is None:
            epoch = p.region_epoch
            r = self._ask(peer, {"op": "region", "name": name}, timeout)
            if "error" in r:
                raise RegionError(f"peer {peer!r}: {r['error']}")
            info = (int(r["addr"]), int(r["rkey"]), int(r["size"]))
            with p.lock:
                if p.region_epoch == epoch:  # (not if the peer deregistered a region meanwhile: maybe this one)
                    p.remote_regions[name] = info
        return info

    def _remote_range(self, peer: str, name: str, offset: int, length: int, what: str) -> tuple[int, int, int]:
        """(address, rkey, offset as an int) of [offset, offset+length) in the peer's region `name`, else
        `RegionError`. Numpy integer offsets are fine (as on tcp and inproc); a bool is not (True was offset 1)."""
        try:
            if type(offset) is bool:
                raise TypeError
            offset = operator.index(offset)
        except TypeError:
            raise RegionError(f"{what} {peer}:{name}: the remote offset must be an int, got {offset!r}") from None
        raddr, rkey, size = self.remote_region(peer, name)
        if offset >= 0 and offset + length > size:  # the name may have been registered again, larger: ask again
            raddr, rkey, size = self.remote_region(peer, name, refresh=True)
        if offset < 0 or offset + length > size:
            raise RegionError(
                f"{what} {peer}:{name}: [{offset}, {offset + length}) is outside the region of {size} bytes"
            )
        return raddr, rkey, offset

    def _check_remote_range(self, peer: str, region: str, offset: int, length: int) -> None:
        """`write_many` checks every entry's remote range before posting any (region info is cached per peer)."""
        self._remote_range(peer, region, offset, length, "write to")

    # ---- transfers ------------------------------------------------------------------------------------------
    def _post(
        self,
        p: _RdmaPeer,
        cls: str,
        opcode: int,
        local: MemoryRegion,
        local_offset: int,
        raddr: int,
        rkey: int,
        length: int,
        on_done=None,
    ) -> Future:
        """A transfer's future; its work requests are posted here, or with a pacer by the class's sender thread
        (so a paced transfer never blocks the caller, as on the other backends)."""
        fut: Future = PostedFuture()  # (its work requests are posted, cancelled or not)
        nwr = -(-length // self.chunk_bytes)
        t = _Transfer(fut, p.name, length, nwr, on_done)
        with p.lock:
            if p.dead is not None:
                raise self._gone(p)
            if not nwr:  # a 0-byte transfer has nothing to post: it finishes after the class's transfers before it
                tail = p.tail.get(cls)
                if tail is None or tail.followers is None or tail not in p.transfers:
                    tail = None
                else:  # (its notification must not overtake theirs: the ordering contract)
                    tail.followers.append(t)
                    p.transfers.add(t)
            else:
                p.transfers.add(t)
                p.tail[cls] = t
        if not nwr:
            if tail is None:
                t.finish()
            return fut
        job = (t, p, cls, opcode, local, local_offset, raddr, rkey)
        if self._senders:
            self._senders[cls].put(job)
        else:
            self._post_wrs(*job)
        return fut

    def _send_loop(self, cls: str) -> None:
        """Paced endpoints: post the class's transfers in order, each chunk once the pacer lets its bytes go."""
        jobs = self._senders[cls]
        while (job := jobs.get()) is not None:
            t, p = job[0], job[1]
            if p.dead is not None or self.closed:
                continue  # (failed by `_fail_peer` / `close`)
            try:
                self._post_wrs(*job)
            except Exception as e:  # noqa: BLE001 - a pacer or verbs error fails this transfer and the peer
                log.exception("%s: posting to %r failed", self.name, p.name)
                _fail(t.fut, e)
                self._fail_peer(p, PeerLostError(f"posting to {p.name!r} failed: {e}"))

    def _check_posting(self, p: _RdmaPeer) -> None:
        """Called by the pacer while a chunk of a paced transfer waits for its slot: once the peer is dead (our `close`,
        `disconnect`, the peer lost; its transfers are failed there) the wait ends at once (tcp's `_check_set`)."""
        if p.dead is not None or self.closed:
            raise _PostingEnded

    def _post_wrs(self, t: _Transfer, p: _RdmaPeer, cls: str, opcode: int, local, local_offset, raddr, rkey) -> None:
        paced = None
        if self.pacer is not None:
            paced = iter(self._paced_chunks(t.length, cls, self.chunk_bytes, lambda: self._check_posting(p)))
        try:
            self._post_paced_wrs(t, p, cls, opcode, local, local_offset, raddr, rkey, paced)
        except _PostingEnded:
            pass  # (the transfer was failed with the peer; the pacer took its chunks back)
        finally:
            if paced is not None:  # a transfer ended early: its chunks queued ahead on the links never cross
                paced.close()

    def _post_paced_wrs(
        self, t: _Transfer, p: _RdmaPeer, cls: str, opcode: int, local, local_offset, raddr, rkey, paced
    ):
        length = t.length
        read = t.read = opcode == self._e.IBV_WR_RDMA_READ
        mr = self._mrs[local.name]
        qp = p.qps[cls]
        credit = 0  # bytes the pacer has let go and no WR has used yet
        for o in range(0, length, self.chunk_bytes):
            n = min(self.chunk_bytes, length - o)
            if paced is not None:  # pacer chunks need not align with WRs: post once all of this WR's bytes may go
                while credit < n:
                    credit += next(paced)
                credit -= n
            from pyverbs.wr import SGE, SendWR  # (cached after the first; here so a wait ends without pyverbs)

            if not p.slots[cls].acquire(timeout=self.timeout_s):
                self._fail_peer(p, PeerLostError(f"send queue to {p.name!r} stuck for {self.timeout_s} s"))
                return
            if not self._cq_credits.acquire(timeout=self.timeout_s):
                p.slots[cls].release()
                self._fail_peer(p, PeerLostError(f"{self.name}: completion queue full for {self.timeout_s} s"))
                return
            if p.dead is not None or self.closed:
                self._release_wr(p, cls)
                return
            wr_id = next(self._wr_ids)
            self._wrs[wr_id] = (t, p, cls)
            sge = SGE(_buffer_address(local.view) + local_offset + o, n, mr.lkey)
            wr = SendWR(wr_id=wr_id, opcode=opcode, num_sge=1, sg=[sge])
            wr.set_wr_rdma(rkey, raddr + o)
            with p.lock:  # a write behind a read in flight on this QP is fenced: the read sees the bytes before it
                if read:
                    p.reads[cls] += 1
                elif p.reads[cls]:
                    wr.send_flags = IBV_SEND_SIGNALED | IBV_SEND_FENCE
            try:
                qp.post_send(wr)
            except Exception as e:  # noqa: BLE001
                self._wrs.pop(wr_id, None)
                if read:
                    with p.lock:
                        p.reads[cls] -= 1
                self._release_wr(p, cls)
                self._fail_peer(p, PeerLostError(f"post_send to {p.name!r} failed: {e}"))
                return

    def _release_wr(self, p: _RdmaPeer, cls: str) -> None:
        """A work request completed (or was never posted): its send-queue slot and CQ entry are free again."""
        p.slots[cls].release()
        self._cq_credits.release()

    def _poll_loop(self) -> None:
        while not self.closed:
            try:
                npolled, wcs = self.cq.poll(num_entries=32)
            except Exception:
                if self.closed:
                    return
                log.exception("%s: CQ poll failed", self.name)
                time.sleep(0.01)
                continue
            if npolled <= 0:
                time.sleep(20e-6)
                continue
            for wc in wcs[:npolled]:
                try:
                    self._complete_wc(wc)
                except Exception:  # noqa: BLE001 - the poller must outlive one bad completion
                    log.exception("%s: completing work request %d failed", self.name, wc.wr_id)

    def _complete_wc(self, wc) -> None:
        entry = self._wrs.pop(wc.wr_id, None)
        if entry is None:
            return
        t, p, cls = entry
        self._release_wr(p, cls)
        if t.read:
            with p.lock:
                p.reads[cls] -= 1
        if wc.status != self._e.IBV_WC_SUCCESS:
            err = PeerLostError(f"RDMA work request to {p.name!r} failed with status {wc.status}")
            _fail(t.fut, err)
            self._fail_peer(p, err)
            return
        if t.complete_one():
            with p.lock:
                p.transfers.discard(t)
                followers, t.followers = t.followers, None
                p.transfers.difference_update(followers)
            for u in (t, *followers):
                u.finish()

    def _fail_peer(self, p: _RdmaPeer, err: BaseException, fence: bool = True) -> None:
        """Declare `p` lost: its pending transfers fail with `err` and (`fence`) its QPs go to the error state, so a
        peer only thought lost (its control channel timed out: stalled, not dead) that goes on cannot land the writes
        its NIC still holds in our MRs once it left `peers()` (they did, the QPs stayed connected)."""
        with p.lock:
            if p.dead is not None:
                return
            p.dead = err
            transfers, p.transfers = list(p.transfers), set()
            qps = [*p.qps.values(), *p.spare_qps] if fence else []
        self._to_error(qps)
        for t in transfers:
            _fail(t.fut, err)

    def write(
        self,
        peer: str,
        local_region: str,
        local_offset: int,
        remote_region: str,
        remote_offset: int,
        length: int,
        priority: str = "low",
        notify: int | None = None,
    ) -> Future:
        check_priority(priority)
        notify = check_notify(notify)  # before anything is posted
        src = self.region(local_region)
        local_offset, length = src.check(local_offset, length, f"write from {self.name}:{local_region}")
        p = self._peer(peer)
        raddr, rkey, remote_offset = self._remote_range(peer, remote_region, remote_offset, length, "write to")
        on_done = None
        result: Future = PostedFuture()
        if notify is not None:

            def on_done() -> None:  # data placed at the responder: tell it, then complete (runs on the poller)
                msg = {
                    "op": "notify",
                    "tag": int(notify),
                    "region": remote_region,
                    "offset": remote_offset,
                    "length": length,
                }
                try:
                    sent = self._ctl(peer, msg)
                except Exception as e:  # noqa: BLE001 - control channel gone (peer lost, endpoint closed)
                    _fail(result, e)
                    return
                sent.add_done_callback(
                    lambda f: _fail(result, f.exception()) if f.exception() else _complete(result, length)
                )

        inner = self._post(
            p, priority, self._e.IBV_WR_RDMA_WRITE, src, local_offset, raddr + remote_offset, rkey, length, on_done
        )
        if notify is None:
            return inner
        inner.add_done_callback(lambda f: _fail(result, f.exception()) if f.exception() else None)
        return result

    def read(
        self,
        peer: str,
        local_region: str,
        local_offset: int,
        remote_region: str,
        remote_offset: int,
        length: int,
        priority: str = "low",
    ) -> Future:
        check_priority(priority)
        dst = self.region(local_region)
        local_offset, length = dst.check(local_offset, length, f"read into {self.name}:{local_region}")
        p = self._peer(peer)
        raddr, rkey, remote_offset = self._remote_range(peer, remote_region, remote_offset, length, "read from")
        return self._post(p, priority, self._e.IBV_WR_RDMA_READ, dst, local_offset, raddr + remote_offset, rkey, length)

    def send(self, peer: str, payload: bytes) -> Future:
        data = check_message(payload, self.max_message_bytes)
        self._peer(peer)
        told = self._peer_max_message(peer)
        if told is not None and len(data) > told:  # (the channel's own error counted the prefix byte in both figures)
            raise TransportError(
                f"{self.name}: message of {len(data)} bytes exceeds the max_message_bytes={told} of peer {peer!r} (it "
                f"would close the control connection set); this endpoint's is {self.max_message_bytes}"
            )
        # resolves to the payload's size, as on tcp and inproc (the channel's future counts the prefix byte too)
        return combine_futures([self.control.send(peer, _USER + data)], len(data))

    def _peer_max_message(self, peer: str) -> int | None:
        """The peer's max_message_bytes, as its control channel's handshake told it (None: not told, or no live
        control connection: the channel's `send` says so)."""
        p = self.control._live_peer(peer)
        limit = None if p is None else p.max_message
        return None if limit is None else limit - len(_USER)

    def _shutdown(self) -> None:
        # (the `close` contract, as tcp and inproc: this side's pending transfers fail with TransportClosedError; it
        # was a PeerLostError, which names a lost peer)
        err = TransportClosedError(f"endpoint {self.name!r} closed with the transfer pending")
        for p in list(self._peers.values()):
            self._fail_peer(p, err, fence=False)  # (its QPs are closed below)
        for jobs in self._senders.values():
            jobs.put(None)
        self.control.close()
        # (`close` from a transfer's done callback runs on the poller or a sender thread: it must not join itself, which
        # raised RuntimeError half way, leaving the queues open and `recv` / `wait_notification` waiting for ever; the
        # thread stops once the callback returned, as it sees the endpoint closed)
        me = threading.current_thread()
        for t in (self._poller, *self._sender_threads):  # (before the QPs close under them)
            if t is not me:
                t.join(timeout=2)
        for p in self._peers.values():
            for qp in [*p.qps.values(), *p.spare_qps]:
                qp.close()
        for mr in self._mrs.values():
            mr.close()
        self._mrs.clear()
        self.cq.close()
        self.pd.close()
        self.ctx.close()
