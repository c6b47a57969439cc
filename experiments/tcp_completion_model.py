"""How much of the TCP transport's gap on single small writes is the completion structure itself?

    python -m experiments.tcp_completion_model                       # 64 KiB writes, 16 in flight, 3 repeats
    python -m experiments.tcp_completion_model --size=41984 --window=64

A model in plain sockets, no transport code: a sender process posts `--count` frames (a 48-byte header and
`--size` bytes of payload, one `sendmsg` each) with at most `--window` unacknowledged, to a receiver process that
lands each payload in one reused region and acknowledges what landed whenever its socket drains (one ack frame for
every write since the last, as `transport.tcp` does). Two senders, interleaved in each repeat, beside the raw
socket baseline of `bench_io` (the same bytes streamed, one ack a round) and the real `TcpTransport`:
  ack thread     completions handed over as the transport does: a second thread reads the ack frames and
                 releases each write's lock, and the posting thread waits on the oldest write's lock;
  waiter polls   the posting thread reads the ack frames itself when its window is full (no second thread,
                 no hand-over): the best a one-thread Python writer could do with this receiver.
The ratio of each to the raw socket (best of the repeats) bounds what changing the transport's completion
structure could give (README, Transports "Known limits"). `--out=FILE` writes the rows as JSON; Ctrl-C or SIGTERM
after a repeat has finished prints (and writes) the best of the finished repeats.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import socket
import struct
import threading
import time

import numpy as np
from absl import app, flags, logging

from experiments import SigtermAsInterrupt, interrupted_by, writable_file_or_exit, write_rows_json

FLAGS = flags.FLAGS
# (10**11 was numpy's "Unable to allocate 93.1 GiB" traceback from the sender's source buffer)
flags.DEFINE_integer("size", 64 * 1024, "payload bytes per write (at most 1 GiB)", lower_bound=1, upper_bound=1 << 30)
flags.DEFINE_integer("count", 8192, "writes per measurement", lower_bound=1)
flags.DEFINE_integer("window", 16, "writes in flight at most", lower_bound=1)
flags.DEFINE_integer(
    "repeats", 3, "interleaved repeats; the best of each is reported", lower_bound=1, allow_override=True
)
flags.DEFINE_bool("transport", True, "also measure the real TcpTransport (a peer process of its own)")
# --out: other benchmarks define it too (allow_override: see experiments.bench_io)
flags.DEFINE_string("out", "", "write the rows as JSON here (default: print only)", allow_override=True)

HEADER = 48  # bytes, as transport.tcp's frame header
_ROUND = struct.Struct("!QQ")  # size, count of a round; (0, 0) ends the receiver
_ACK = struct.Struct("!Q")  # writes acknowledged by one ack frame


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        got = s.recv(n - len(data))
        if not got:
            raise ConnectionError("peer closed")
        data += got
    return data


def receiver(conn) -> None:
    """The receiving process: rounds of `count` frames landed in one region, an ack frame with the number landed
    whenever the socket is drained. (The raw baseline is bench_io's `RawSocketPeer`.)"""
    try:
        _receive(conn)
    except ConnectionError:  # the sender stopped mid-round (Ctrl-C): it was this process's traceback
        pass


def _receive(conn) -> None:
    lst = socket.create_server(("127.0.0.1", 0))
    conn.send(lst.getsockname()[1])
    s, _ = lst.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        size, count = _ROUND.unpack(_recv_exact(s, _ROUND.size))
        if count == 0:
            return
        frame = HEADER + size
        buf = bytearray(max(4 * frame, 1 << 18))
        view, region = memoryview(buf), memoryview(bytearray(size))
        landed = held = have = 0
        while landed < count:
            asked = len(buf) - have
            try:
                n = s.recv_into(view[have:], asked, socket.MSG_DONTWAIT)
            except BlockingIOError:  # drained: acknowledge what landed, then wait for more
                if held:
                    s.sendall(_ACK.pack(held))
                    held = 0
                n = s.recv_into(view[have:], asked)
            if n == 0:
                return
            have += n
            start = 0
            while have - start >= frame:
                region[:] = view[start + HEADER : start + frame]
                start += frame
                landed += 1
                held += 1
            if start:
                view[: have - start] = view[start:have]
                have -= start
        if held:
            s.sendall(_ACK.pack(held))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, `SigtermAsInterrupt`) after `done` whole repeats: `rows` are the best of those."""

    def __init__(self, rows: list[dict], done: int, by: str) -> None:
        super().__init__(by)
        self.rows, self.done, self.by = rows, done, by


class Model:
    """The sender side: one connection to a `receiver` process."""

    def __init__(self) -> None:
        from experiments.bench_io import _ChildrenIgnoreSigint

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=receiver, args=(child,), daemon=True)
        # (Ctrl-C at the terminal reached the receiver too: its traceback, beside this process's)
        with _ChildrenIgnoreSigint():
            self.proc.start()
        self.sock = socket.create_connection(("127.0.0.1", parent.recv()))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.sendall(_ROUND.pack(0, 0))
        self.sock.close()
        self.proc.join(5)

    def ack_thread(self, payload: memoryview, count: int, window: int) -> float:
        s, header = self.sock, bytes(HEADER)
        s.sendall(_ROUND.pack(payload.nbytes, count))
        posted: collections.deque = collections.deque()  # locks of the writes not acknowledged, oldest first
        guard = threading.Lock()
        lost: list[OSError] = []

        def read_acks() -> None:
            done = 0
            try:
                while done < count:
                    for (k,) in _ACK.iter_unpack(_recv_exact(s, _ACK.size)):
                        for _ in range(k):
                            with guard:
                                lock = posted.popleft()
                            lock.release()
                        done += k
            except OSError as e:  # the receiver is gone (or the run was stopped): wake the posting thread
                lost.append(e)
                with guard:
                    while posted:
                        posted.popleft().release()

        t0 = time.perf_counter()
        # (daemon: an acker still waiting on an interrupted round kept the process from exiting)
        acker = threading.Thread(target=read_acks, daemon=True)
        acker.start()
        inflight: collections.deque = collections.deque()
        for _ in range(count):
            if len(inflight) >= window:
                inflight.popleft().acquire()
            lock = threading.Lock()
            lock.acquire()
            with guard:
                posted.append(lock)
            inflight.append(lock)
            s.sendmsg([header, payload])
        for lock in inflight:
            lock.acquire()
        wall = time.perf_counter() - t0
        acker.join()
        if lost:
            raise ConnectionError(f"ack thread: {lost[0]}")
        return wall

    def waiter_polls(self, payload: memoryview, count: int, window: int) -> float:
        s, header = self.sock, bytes(HEADER)
        s.sendall(_ROUND.pack(payload.nbytes, count))
        t0 = time.perf_counter()
        sent = acked = 0
        while acked < count:
            if sent < count and sent - acked < window:
                s.sendmsg([header, payload])
                sent += 1
                continue
            (k,) = _ACK.unpack(_recv_exact(s, _ACK.size))
            acked += k
        return time.perf_counter() - t0


def _rows(best: dict[str, float], size: int, count: int) -> list[dict]:
    raw = count * size / best["raw socket"]
    return [{"case": n, "GBps": count * size / t / 1e9, "ratio": count * size / t / raw} for n, t in best.items()]


def run(size: int, count: int, window: int, repeats: int, transport: bool = True) -> list[dict]:
    """Rows {case, GBps, ratio} (best of `repeats` interleaved repeats; ratio to the raw socket). Ctrl-C after a
    whole repeat raises `Interrupted` with the rows of the finished repeats (they were lost)."""
    # (imported here: a launcher imports no other launcher at its top, tests/test_fix10_flags.py)
    from experiments.bench_io import RawSocketPeer, _transport_pair, _transport_round

    src = np.ones(size, np.uint8)
    payload = memoryview(src)
    model, raw = Model(), RawSocketPeer()  # (the raw baseline: bench_io's, the same bytes streamed, one ack a round)
    me = peer = None
    cases = {
        "raw socket": lambda p, n, w: raw.round(src, size, n),
        "ack thread": model.ack_thread,
        "waiter polls": model.waiter_polls,
    }
    try:
        if transport:
            me, peer = _transport_pair(size)
            me.register("src", src)
            cases["TcpTransport"] = lambda p, n, w: _transport_round(me, size, n, w)
        for fn in cases.values():  # warm-up: connections, first allocations
            fn(payload, min(count, 256), window)
        best = dict.fromkeys(cases, float("inf"))
        done = 0
        try:
            for done in range(repeats):  # noqa: B007 - `done`: the whole repeats when Ctrl-C comes
                logging.info("repeat %d of %d", done + 1, repeats)
                got = {name: fn(payload, count, window) for name, fn in cases.items()}
                best = {name: min(best[name], t) for name, t in got.items()}
        except KeyboardInterrupt as e:
            if done == 0:
                raise
            raise Interrupted(_rows(best, size, count), done, interrupted_by(e)) from None
    except BaseException:
        _close(model, raw, me, peer, quiet=True)
        raise
    _close(model, raw, me, peer, quiet=False)
    return _rows(best, size, count)


def _close(model: Model, raw, me, peer, quiet: bool) -> None:
    """End the helper processes and connections (`bench_io.close_peers`). `quiet`: while an error or an interrupt goes
    on, a helper already gone is no new error (SIGTERM to the process group ends them too: the quit call's
    PeerLostError traceback hid the finished repeats)."""
    from experiments.bench_io import close_peers

    try:
        model.close()
    except Exception:
        if not quiet:
            raise
    if peer is not None:
        close_peers(raw, me, peer, quiet)
        return
    try:
        raw.close()
    except Exception:
        if not quiet:
            raise


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    # (read before `run` imports bench_io, whose --repeats and --out then replace this one's definitions)
    size, count, window, repeats, out = FLAGS.size, FLAGS.count, FLAGS.window, FLAGS.repeats, FLAGS.out
    if out:
        writable_file_or_exit(out, "--out")  # before the benchmark, not after
    logging.info(
        "size %d B, count %d, window %d, repeats %d, transport %s", size, count, window, repeats, FLAGS.transport
    )
    stopped = None
    try:
        with SigtermAsInterrupt():
            rows = run(size, count, window, repeats, FLAGS.transport)
    except Interrupted as e:  # the best of the repeats that finished (it was two tracebacks, nothing kept)
        rows, repeats = e.rows, e.done
        stopped = f"tcp_completion_model: interrupted ({e.by}); the table is the best of the {e.done} finished repeats"
    except KeyboardInterrupt as e:  # (Terminated too)
        raise SystemExit(f"tcp_completion_model: interrupted ({interrupted_by(e)}) before a repeat finished") from None
    print(f"\n## Completion structure, {size} B writes, {window} in flight, best of {repeats}\n")
    print("| case | GB/s | ratio to raw |\n| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['case']} | {r['GBps']:.2f} | {r['ratio']:.2f} |")
    if out:
        meta = {"size": size, "count": count, "window": window, "repeats": repeats}
        write_rows_json(
            out, [{**r, **meta} for r in rows], "the rows" + (" of the finished repeats" if stopped else "")
        )
    if stopped:
        raise SystemExit(stopped + (f" (also in {out})" if out else ""))


if __name__ == "__main__":
    app.run(main)
