"""Control-plane messages between engine groups and the global scheduler service, and the channel carrying them.

An engine group's leader calls `fetch(GroupReport) -> GroupReply` every `fetch_interval_s`: the report
carries the group's events (reads done, prefill done, tokens, link bytes) and doubles as its heartbeat; the
reply carries new tasks for its engines, cancellations and the engine directory. In one process the call
goes straight to the service (`LocalControlClient`); across processes and hosts it is a request/reply over
`multiprocessing.connection` with an auth key (`SocketControlClient` / `ControlServer`). The service never
calls an engine: groups pull, as in the paper's fetch model.

Each exchange also times the two clocks (`clock.Offset`): a reply carries when the driver got the report and when it
replied (`clock`), the node reads its own clock as it sends and as the reply comes, so a node on another host knows how
far its clock is from the driver's and says so in its next report (`clock_offset_s`); the scheduler adds that to the
node's stamps.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from typing import Any

import numpy as np

from dualpath_jax import clock
from dualpath_jax.checks import FailureSpell, fd_shortage_text
from dualpath_jax.code_id import code_id, code_id_now

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TurnTask:
    """One placed request, sent to both its PE and its DE."""

    request_id: int
    attempt: int  # bumped when the request is re-run after an engine died; stale work is dropped
    trajectory_id: int
    turn_index: int
    prompt_ids: np.ndarray  # [prompt_tokens] int32
    gen_tokens: int
    block_keys: list  # keys of the prompt's whole blocks, in order (lookups, reads and write-back)
    hit_blocks: int  # blocks [0, hit_blocks) are loaded from storage
    pe_read_blocks: int  # blocks [0, pe_read_blocks) are read on the PE side, [pe_read_blocks, hit_blocks) on the DE
    prefill_engine: int
    decode_engine: int
    read_side: str

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_ids.shape[0])


@dataclasses.dataclass
class Cancel:
    request_id: int
    attempt: int


@dataclasses.dataclass
class Event:
    """Something an engine did. kind: read_done | prefill_start | prefill_end | first_token | second_token |
    turn_done | peer_lost (data: engine, peer, error) | error."""

    kind: str
    request_id: int
    attempt: int
    t: float
    data: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class GroupReport:
    node_id: int
    role: str
    engine_ids: list
    address: Any = None  # this group's transport endpoint (engines of one group share it)
    events: list = dataclasses.field(default_factory=list)
    link_bytes: list = dataclasses.field(default_factory=list)  # LinkBytes since the last report
    stats: dict = dataclasses.field(default_factory=dict)  # free buffer bytes, decode slots in use, ...
    # the code the reporting process runs (`code_id.code_id()`, made where the report is: in the node's process).
    # `ControlServer` checks a connection's first report and refuses a node of other code (absent: an older version)
    code_id: str | None = dataclasses.field(default_factory=code_id)
    # The node's clock against the driver's (`clock.Offset`, the client's): add `clock_offset_s` to this report's stamps
    # (events, link bins) to get the driver's time (None: not known yet, taken as 0); `clock_rtt_s`, the round trip it
    # comes from (None: exact, the driver's own process or boot). (Timing, not content: left out of ==.)
    clock_offset_s: float | None = dataclasses.field(default=None, compare=False)
    clock_rtt_s: float | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass
class GroupReply:
    tasks: list = dataclasses.field(default_factory=list)  # TurnTask
    cancels: list = dataclasses.field(default_factory=list)  # Cancel
    directory: dict | None = None  # engine_id -> (node_id, address), once every group registered
    shutdown: bool = False
    refused: str | None = None  # why the driver refuses this node (with shutdown; `SocketControlClient` raises it)
    # (received, replied, boot id, EPOCH): the driver's `clock.now()` as it got the report and as it replied, its
    # `clock.BOOT` and `clock.EPOCH` (`ControlServer`); the node's `clock.Offset` takes them. (Left out of ==.)
    clock: tuple | None = dataclasses.field(default=None, compare=False)


class LocalControlClient:
    """In-process: the group calls the service directly."""

    def __init__(self, service):
        self._service = service

    def fetch(self, report: GroupReport) -> GroupReply:
        report.clock_offset_s = 0.0  # (the driver's own process: its clock)
        return self._service.fetch(report)

    def close(self) -> None:
        pass


class DriverLost(EOFError, ConnectionError):
    """The driver's end of a node's control channel is gone: its control server closed (the run was stopped or given
    up on) or its process ended. A node process stops on it with one line (`launcher._node_process`); it printed an
    EOFError / ConnectionRefusedError / ConnectionResetError traceback from every node. (Still an EOFError, as the
    connection's own error was where the server drops a connection.)"""


def _said(e: BaseException) -> str:
    """An error as one short phrase: its type, and its message when it has one (an EOFError has none)."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _io_timeout(sock: socket.socket, seconds: float) -> None:
    """The kernel's receive and send timeouts of a blocking socket (0: none): `Connection` reads and writes the raw
    descriptor, so a Python-level `settimeout` (non-blocking mode) would break it. A read past it raises
    BlockingIOError (EAGAIN)."""
    tv = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _connect(address, authkey: bytes, timeout_s: float) -> Connection:
    """`multiprocessing.connection.Client(address, authkey=authkey)` within `timeout_s`: connecting and the auth-key
    challenges both ways. `Client` has no timeout: a server whose accept thread was gone left the node waiting for
    its challenge forever (the kernel still takes the connection into the listen backlog)."""
    if isinstance(address, str):  # (a Unix socket: config.netns)
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.settimeout(timeout_s)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection(address, timeout=timeout_s)
    try:
        sock.settimeout(None)  # (blocking again, for `Connection`)
        _io_timeout(sock, timeout_s)
    except BaseException:
        sock.close()
        raise
    conn = Connection(sock.detach())
    try:
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
        with socket.socket(fileno=os.dup(conn.fileno())) as s:  # (the same socket)
            _io_timeout(s, 0)  # (`fetch` waits with `poll`)
    except BaseException:
        conn.close()
        raise
    return conn


class SocketControlClient:
    """Across processes/hosts: one connection per group, request/reply with an auth key. Connecting (with the auth
    challenges) gives up after `connect_timeout_s` with `DriverLost`; a fetch with no reply in `timeout_s` raises
    TimeoutError."""

    def __init__(self, address, authkey: bytes, timeout_s: float = 30.0, connect_timeout_s: float = 30.0):
        code_id()  # (this node's code id, made now and kept: its reports carry it, `GroupReport.code_id`)
        try:
            self._conn: Connection = _connect(address, authkey, connect_timeout_s)
        except BlockingIOError:  # (SO_RCVTIMEO: no challenge, or no answer to ours, in time)
            raise DriverLost(
                f"the driver's control server at {address} did not answer within {connect_timeout_s:g} s (its accept "
                "thread gone, or the driver stopped)"
            ) from None
        except (EOFError, OSError) as e:  # (refused: no server listens there any more; a connect that timed out)
            raise DriverLost(f"cannot reach the driver's control server at {address} ({_said(e)})") from None
        self._lock = threading.Lock()
        self._timeout_s = timeout_s
        self._broken: str | None = None  # why the connection was given up (a fetch that timed out)
        self.offset = clock.Offset()  # the driver's clock against this process's, from the fetches

    def _time(self, reply: GroupReply, t1: float, t2: float) -> None:
        """Take the driver's stamps of one exchange (`GroupReply.clock`) into `offset`."""
        stamps = getattr(reply, "clock", None)
        if stamps is None:
            return
        received, replied, boot, epoch = stamps
        if boot is not None and boot == clock.BOOT:
            self.offset.same_boot(epoch - clock.EPOCH)
        else:
            self.offset.add(t1, received, replied, t2)

    def fetch(self, report: GroupReport) -> GroupReply:
        with self._lock:
            if self._broken is not None:
                raise ConnectionError(f"control connection closed: {self._broken}")
            off = self.offset
            report.clock_offset_s = off.seconds if off.exact or off.exchanges else None
            report.clock_rtt_s = off.rtt_s
            try:
                t1 = clock.now()
                self._conn.send(report)
                if not self._conn.poll(self._timeout_s):
                    # The late reply would stay on the connection and answer the next fetch (a stale reply, for
                    # another report): give the connection up instead.
                    self._broken = f"a fetch got no answer within {self._timeout_s} s"
                    self.close()
                    raise TimeoutError(f"global scheduler did not answer within {self._timeout_s} s")
                reply = self._conn.recv()
                t2 = clock.now()
            except (EOFError, ConnectionError) as e:  # (closed by the driver's side: EOF, reset, broken pipe)
                raise DriverLost(f"the driver closed the control connection ({_said(e)})") from None
            if getattr(reply, "refused", None):  # (getattr: a reply of an older driver has no such field)
                self._broken = reply.refused
                self.close()
                raise DriverLost(f"the driver refused this node: {reply.refused}")
            self._time(reply, t1, t2)
            return reply

    def close(self) -> None:
        try:
            self._conn.close()
        except OSError:
            pass


#: Seconds a new connection has to pass the auth-key challenge (`ControlServer`).
AUTH_TIMEOUT_S = 30.0
#: The shortest auth key `ControlServer` takes (the launchers make 16 random bytes per run).
MIN_AUTHKEY_BYTES = 16
#: Connections the listening socket queues before accept takes them (multiprocessing's default, 1, made N nodes
#: starting together wait out SYN retransmits, 1 s steps).
LISTEN_BACKLOG = 128


def _fd_shortage(e: OSError) -> str:
    """`e` in words, naming the file descriptor limit where it is the cause (EMFILE, ENFILE)."""
    return fd_shortage_text(e, "the driver") or str(e)


class ControlServer:
    """Serves `fetch` for groups in other processes: one thread per connected group.

    The auth-key challenge runs in the connection's own thread, within AUTH_TIMEOUT_S: `Listener.accept` ran it in
    the accept thread with no timeout, so one connection that never answered it (a port scanner, a health check, a
    process stopped mid-connect) kept every node from connecting, and the run waited out `config.run_timeout_s`.
    A connection that breaks the protocol (an unreadable message, not a report, another node's report, a second
    connection of a node) is dropped and `on_error(why)` is called with a line naming its node: the driver fails the
    run with it (`GlobalScheduler.fail`); the node itself only sees its connection closed (`DriverLost`)."""

    def __init__(
        self,
        handler: Callable[[GroupReport], GroupReply],
        authkey: bytes,
        host: str = "127.0.0.1",
        unix_path: str | None = None,
        on_error: Callable[[str], None] | None = None,
    ):
        """Listens on TCP `host` (an ephemeral port), or on the Unix socket `unix_path` where given: a filesystem path
        reaches node processes in other network namespaces (`config.netns`), where 127.0.0.1 is another host's."""
        if not isinstance(authkey, bytes) or len(authkey) < MIN_AUTHKEY_BYTES:
            # (b"" or a short key: any local process could pass the challenge and have its pickles unpickled here)
            what = f"{len(authkey)} bytes" if isinstance(authkey, bytes) else type(authkey).__name__
            raise ValueError(f"ControlServer: authkey must be at least {MIN_AUTHKEY_BYTES} bytes, got {what}")
        self._handler = handler
        self._authkey = authkey
        # A node's first report must carry this process's code id or the one of its sources now (`_other_code`): a
        # driver process that lives long (a test session, a notebook) may have computed its own before a source was
        # edited, and the nodes it starts now read the sources as they are.
        self._code_ids = (code_id(), code_id_now())
        self._on_error = on_error
        # (no authkey here: `_serve` runs the challenge, see the class docstring)
        if unix_path is not None:
            self._listener = Listener(unix_path, family="AF_UNIX", backlog=LISTEN_BACKLOG)
        else:
            self._listener = Listener((host, 0), backlog=LISTEN_BACKLOG)
        self.address = self._listener.address
        self._threads: list[threading.Thread] = []  # the connections' threads still alive (pruned at each accept)
        self._stopping = threading.Event()  # (`close`: ends an accept back-off at once)
        self._nodes: dict[int, Connection] = {}  # node -> its open connection (the one its reports came on)
        self._nodes_lock = threading.Lock()
        self._closed = False
        self._accept = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        spell = FailureSpell(1.0)
        while not self._closed:
            try:
                conn = self._listener.accept()
            except Exception as e:  # noqa: BLE001 -- closed listener; EMFILE, ENOBUFS, ECONNABORTED...: passing
                if self._closed:
                    return
                # (retried at once, out of descriptors it spun: ~370 lines/s. 10 ms doubling to 1 s, as TcpTransport;
                # said once a spell of one cause, as TcpTransport: it was a line a second while out of descriptors)
                if spell.failed((type(e), getattr(e, "errno", None))):
                    why = _fd_shortage(e) if isinstance(e, OSError) else e  # (EMFILE: names RLIMIT_NOFILE)
                    log.warning(
                        "control server: accept failed (%s); still accepting: the connected nodes are served on, new "
                        "connections wait in the listen backlog, accept is tried again every %.0f s at most (said once "
                        "a spell)",
                        why,
                        spell.most_s,
                    )
                else:
                    log.debug("control server: accept failed again (%s)", e)
                self._stopping.wait(spell.pause())
                continue
            ended = spell.ended()
            if ended is not None:
                log.warning("control server: accepting connections again (%d accepts failed over %.1f s)", *ended)
            if self._closed:  # (`close`'s own wake-up connection)
                conn.close()
                return
            self._threads = [t for t in self._threads if t.is_alive()]
            t = threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True)
            try:
                t.start()
            except RuntimeError as e:  # can't start new thread: drop this connection, keep accepting
                # (it ended the accept thread: every node connecting later waited for its challenge for good)
                log.error("control server: dropping a connection: %s", e)
                conn.close()
                continue
            self._threads.append(t)

    def _authenticate(self, conn: Connection) -> bool:
        """The auth-key challenge both ways (as `Listener.accept` does), within AUTH_TIMEOUT_S."""
        try:
            fd = os.dup(conn.fileno())
        except OSError as e:  # (EMFILE: it ended the thread raw, and the run's failure blamed the node: DriverLost)
            self._tell(f"control server: dropping a node's connection: {_fd_shortage(e)}")
            return False
        with socket.socket(fileno=fd) as sock:  # (the same socket: its options are the conn's)
            timeout = struct.pack("ll", int(AUTH_TIMEOUT_S), int(AUTH_TIMEOUT_S % 1 * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
            try:
                deliver_challenge(conn, self._authkey)
                answer_challenge(conn, self._authkey)
            except Exception as e:  # noqa: BLE001 -- a wrong key, a peer gone, no answer in time (EAGAIN)
                if isinstance(e, BlockingIOError):
                    e = TimeoutError(f"no answer to the auth challenge within {AUTH_TIMEOUT_S:g} s")
                if not self._closed:
                    log.warning("control server: rejected a connection: %s", e)
                return False
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
        return True

    def _protocol_error(self, node: int | None, what: str) -> None:
        """A connection sent `what`, breaking the protocol: log it and tell `on_error`, naming the node when known."""
        who = f"the connection of node {node}" if node is not None else "its first message"
        self._tell(f"control server: dropping a connection that sent {what} ({who})")

    def _tell(self, line: str) -> None:
        """Log `line` and pass it to `on_error` (the driver fails the run with it)."""
        log.error("%s", line)
        if self._on_error is not None and not self._closed:
            try:
                self._on_error(line)
            except Exception:  # noqa: BLE001 -- reporting must not break the server
                log.exception("control server: on_error failed")

    def _other_code(self, report: GroupReport) -> str | None:
        """Why a node's first report is refused for running other code than the driver (None: the same code): a host
        with another install of the package (Ray on several hosts) would compute other KV, or speak another protocol,
        under the same names."""
        theirs = getattr(report, "code_id", None)  # (a report of an older version has no such field)
        if theirs in self._code_ids:
            return None
        said = (
            f"dualpath-jax {theirs}" if theirs is not None else "an older dualpath-jax (its reports carry no code id)"
        )
        ours = self._code_ids[0] + (f" (its sources now: {self._code_ids[1]})" if len(set(self._code_ids)) > 1 else "")
        return (
            f"node {report.node_id} runs {said}, the driver {ours}: install the same version on every "
            "host (its code id: the package version + a digest of its .py sources, `dualpath_jax.code_id`)"
        )

    def _serve(self, conn: Connection) -> None:
        node: int | None = None  # the node this connection serves (its first report says)
        try:
            if not self._authenticate(conn):
                return
            while not self._closed:
                try:
                    report = conn.recv()
                    received = clock.now()
                except (EOFError, ConnectionError):
                    return  # the group went away; its heartbeat stops and the service notices
                except OSError as e:  # ("got end of file during message": its process died while sending, e.g. killed)
                    log.warning("control server: the connection of node %s ended inside a message (%s)", node, e)
                    return  # (gone, as above: not a protocol error, the run goes on without it)
                except Exception as e:  # noqa: BLE001 -- a truncated or unreadable message
                    self._protocol_error(node, f"an unreadable message: {_said(e)}")
                    return
                if not isinstance(report, GroupReport):
                    self._protocol_error(node, f"{type(report).__name__}, not a GroupReport")
                    return
                try:
                    hash(report.node_id)
                except TypeError:
                    self._protocol_error(node, f"a report of node {report.node_id!r} (not a node id)")
                    return
                if node is None:
                    with self._nodes_lock:
                        other = self._nodes.get(report.node_id)
                        if other is None:
                            self._nodes[report.node_id] = conn
                    if other is not None:
                        # Two processes serving one node: both would report its engines' events (turns done twice).
                        why = f"a report of node {report.node_id}, which is connected already (two processes serve it)"
                        self._protocol_error(None, why)
                        return
                    node = report.node_id
                    if (refused := self._other_code(report)) is not None:
                        self._tell(f"control server: {refused}")
                        try:  # (the node says why it stops, not only that its connection closed)
                            conn.send(GroupReply(shutdown=True, refused=refused))
                        except (OSError, ValueError):
                            pass
                        return
                elif report.node_id != node:
                    self._protocol_error(node, f"a report of node {report.node_id}")
                    return
                try:
                    reply = self._handler(report)
                except Exception as e:  # noqa: BLE001 -- the handler records why (the scheduler fails the run)
                    log.error(
                        "control server: fetch from node %s failed, dropping its connection: %r", report.node_id, e
                    )
                    return
                # (stamped last: the node's round trip leaves out the time the handler took, `clock.Offset`)
                if isinstance(reply, GroupReply):
                    reply.clock = (received, clock.now(), clock.BOOT, clock.EPOCH)
                conn.send(reply)
        finally:
            if node is not None:
                with self._nodes_lock:
                    if self._nodes.get(node) is conn:
                        del self._nodes[node]
            conn.close()

    def close(self) -> None:
        """Stop accepting and end the accept thread. Closing the listener alone does not wake a thread blocked in
        accept() (Linux): the thread, and its listening socket, outlived every run of the local and Ray launchers.
        A connection of our own wakes it; the thread sees the server closed and ends."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._accept.is_alive():
            try:
                if isinstance(self.address, str):  # (a Unix socket)
                    with socket.socket(socket.AF_UNIX) as s:
                        s.settimeout(1.0)
                        s.connect(self.address)
                else:
                    socket.create_connection(self.address, timeout=1.0).close()
            except OSError:
                pass
        self._accept.join(5.0)
        try:
            self._listener.close()
        except OSError:
            pass
