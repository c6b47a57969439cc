"""A transport endpoint in its own process, driven by control messages (cross-process tests and benchmarks).

`spawn_peer(config, regions)` starts a process (multiprocessing "spawn") that builds the transport from
`config`, registers zero-filled regions `{name: nbytes}`, reports its address, connects back when told,
and serves JSON control messages until "quit":

    {"op": "fill", "region": r, "seed": s}                   fill with `pattern(nbytes, seed)`
    {"op": "digest", "region": r, "offset": o, "length": n}  reply {"sha256": ...}
    {"op": "write", "peer": p, "local": r, "offset": o, "remote": r2, "remote_offset": o2, "length": n,
     "priority": "low", "notify": tag, "count": k}           k one-sided writes back; reply when all landed
    {"op": "quit"}

Every reply is a JSON message `{"ok": true, ...}` or `{"ok": false, "error": ...}`, carrying the request's
`"call_id"` when it had one (`PeerProcess.call` numbers its requests and skips the late reply to an earlier call
that timed out, which the next call used to take as its own).
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import multiprocessing as mp
import time
from typing import Any

import numpy as np


def pattern(nbytes: int, seed: int) -> np.ndarray:
    """Deterministic bytes for checking transfers end to end."""
    return np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)


def _serve(config: dict, regions: dict[str, int], conn: Any, modules: tuple[str, ...] = ()) -> None:
    from transport.base import connect_published, make_transport

    try:
        for module in modules:  # (the module that registered a backend of one's own, as the runtime's nodes do)
            importlib.import_module(module)
        ep = make_transport(config)
    except BaseException as e:  # the parent raises it at once (it waited out its whole timeout)
        conn.send({"error": f"{type(e).__name__}: {e}"})
        raise
    try:
        bufs = {name: np.zeros(n, np.uint8) for name, n in regions.items()}
        for name, buf in bufs.items():
            ep.register(name, buf)
        conn.send(ep.address)
        # the parent tells us whom to connect to (or nothing: it connects to us)
        target = conn.recv()
        if target is not None:  # (an address reported once its endpoint listened: a refusal fails at once)
            connect_published(ep, target[0], tuple(target[1]) if isinstance(target[1], list) else target[1])
    except BaseException as e:
        ep.close()
        conn.send({"error": f"{type(e).__name__}: {e}"})
        raise
    conn.send("ready")
    try:
        while True:
            peer, payload = ep.recv()
            msg: Any = None
            try:
                # (a message that is not a JSON object is answered with an error: it used to end this process, and the
                # driver's `call` waited out its timeout for a reply)
                msg = json.loads(payload)
                if not isinstance(msg, dict):
                    raise ValueError(f"a control message must be a JSON object, got {type(msg).__name__}")
                op = msg.get("op")
                if op == "quit":
                    reply = {"ok": True} if "call_id" not in msg else {"ok": True, "call_id": msg["call_id"]}
                    ep.send(peer, json.dumps(reply).encode()).result(10)
                    break
                if op == "fill":
                    buf = bufs[msg["region"]]
                    buf[:] = pattern(buf.nbytes, msg["seed"])
                    reply = {"ok": True}
                elif op == "digest":
                    buf = bufs[msg["region"]]
                    o, n = msg["offset"], msg["length"]
                    # (a slice past the end, or a negative offset, was the digest of fewer bytes, or of the end
                    # of the region: a comparison of two such digests passed)
                    if type(o) is not int or type(n) is not int or not 0 <= o <= o + n <= buf.nbytes:
                        raise ValueError(
                            f"digest range offset={o!r} length={n!r} is outside region of {buf.nbytes} bytes"
                        )
                    reply = {"ok": True, "sha256": hashlib.sha256(buf[o : o + n].tobytes()).hexdigest()}
                elif op == "write":
                    futs = [
                        ep.write(
                            msg["peer"],
                            msg["local"],
                            msg["offset"],
                            msg["remote"],
                            msg["remote_offset"],
                            msg["length"],
                            priority=msg.get("priority", "low"),
                            notify=msg.get("notify"),
                        )
                        for _ in range(msg.get("count", 1))
                    ]
                    for f in futs:
                        f.result(60)
                    reply = {"ok": True}
                else:
                    reply = {"ok": False, "error": f"unknown op {op!r}"}
            except Exception as e:  # noqa: BLE001 - reported to the driver
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            if isinstance(msg, dict) and "call_id" in msg:  # (`call` matches the reply to its request by it)
                reply["call_id"] = msg["call_id"]
            ep.send(peer, json.dumps(reply).encode()).result(10)
    finally:
        ep.close()


class PeerProcess:
    """Handle of a spawned peer: its address, `call` (send a control message, wait for the reply), `kill`."""

    def __init__(self, proc: mp.Process, conn: Any, address: Any, name: str):
        self.proc, self.conn, self.address, self.name = proc, conn, address, name

    def start(self, connect_to: tuple[str, Any] | None = None, timeout: float = 30.0) -> None:
        """Tell the peer to connect to `(name, address)` (or wait for us to connect) and wait until ready. The address
        must be listening already (`connect_published`: a refused connection fails at once, naming the peer). A peer
        process that exited meanwhile is a RuntimeError naming its exit code (it was a bare BrokenPipeError)."""
        try:
            self.conn.send(connect_to)
        except OSError as e:  # (BrokenPipeError, ConnectionResetError: its end of the pipe is gone)
            self.proc.join(5)
            raise RuntimeError(
                f"peer {self.name} not ready: the peer process exited (code {self.proc.exitcode}) ({e})"
            ) from None
        if _answer(self.proc, self.conn, timeout, f"peer {self.name} not ready") != "ready":
            raise RuntimeError(f"peer {self.name}: unexpected answer to start")

    @staticmethod
    def call(ep: Any, peer: str, msg: dict, timeout: float = 60.0) -> dict:
        """Send `msg` to the served `peer` and return its reply (RuntimeError if it failed). The request carries a
        fresh `call_id`, and replies with another one are skipped: the late reply to an earlier call that timed out
        (the peer was slow, not gone) used to be taken as this call's, and every later call's reply as the next's.
        One call at a time per peer and driver endpoint (the peer serves them in order; a concurrent call's reply would
        be skipped as a stale one)."""
        call_id = next(_call_ids)
        end = None if timeout is None else time.monotonic() + timeout
        ep.send(peer, json.dumps({**msg, "call_id": call_id}).encode()).result(timeout)
        while True:
            left = None if end is None else max(0.0, end - time.monotonic())
            _, payload = ep.recv(peer=peer, timeout=left)
            reply = json.loads(payload)
            if not isinstance(reply, dict):
                raise RuntimeError(f"peer {peer} answered {msg.get('op')} with {reply!r}, not a JSON object")
            if reply.get("call_id", call_id) == call_id:
                break
        if not reply.get("ok"):
            raise RuntimeError(f"peer {peer} failed {msg.get('op')}: {reply.get('error')}")
        return reply

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)

    def join(self, timeout: float = 10.0) -> None:
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.kill()


_call_ids = itertools.count(1)  # `PeerProcess.call` request numbers (one sequence per driver process)


def _answer(proc: mp.Process, conn: Any, timeout: float, what: str) -> Any:
    """The peer's next answer on the pipe: RuntimeError with its error if it failed (it used to be a TimeoutError
    after the whole timeout, the cause only on the child's stderr), TimeoutError if none came in time."""
    try:
        if not conn.poll(timeout):
            proc.kill()
            raise TimeoutError(f"{what} within {timeout} s")
        answer = conn.recv()
    except EOFError:  # it exited without a word (killed, or failed before it could answer)
        proc.join(5)
        raise RuntimeError(f"{what}: the peer process exited (code {proc.exitcode})") from None
    if isinstance(answer, dict) and "error" in answer:
        proc.join(5)
        raise RuntimeError(f"{what}: {answer['error']}")
    return answer


def registering_modules(config: dict) -> tuple[str, ...]:
    """The module that registered `config`'s backend in this process, if a spawned process must import it to know
    the backend (a backend of one's own; the built-ins register with `transport`; one in `__main__` cannot be
    imported there, and its process then names the backend unknown)."""
    from transport import TRANSPORTS

    try:
        module = TRANSPORTS.importable_module(config.get("backend"))
    except KeyError:  # (unknown here too: the peer's make_transport names it)
        return ()
    if module is None or module == "transport" or module.startswith("transport."):
        return ()
    return (module,)


def spawn_peer(
    config: dict, regions: dict[str, int], timeout: float = 60.0, modules: tuple[str, ...] | None = None
) -> PeerProcess:
    """Start a peer process; returns once it listens (its `address` is known). A peer that fails to start (a bad
    config, a region it cannot allocate) raises RuntimeError with its error at once. `modules`: imported in the
    peer first (default: the one that registered the backend here, `registering_modules`; before, a backend of
    one's own was unknown in the peer)."""
    modules = registering_modules(config) if modules is None else tuple(modules)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(dict(config), dict(regions), child, modules), daemon=True)
    proc.start()
    child.close()  # (the child has its own: its exit is then an EOF here)
    address = _answer(proc, parent, timeout, f"peer process {config.get('name')} did not start")
    return PeerProcess(proc, parent, address, config["name"])
