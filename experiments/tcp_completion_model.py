"""How much of the TCP transport's gap on single small writes is the completion structure itself?

    python -m experiments.tcp_completion_model                       # 64 KiB writes, 16 in flight, 3 repeats
    python -m experiments.tcp_completion_model --size=41984 --window=64
    python -m experiments.tcp_completion_model --variants --ack_cost_us=8   # + the variants below

A model in plain sockets, no transport code: a sender process posts `--count` frames (a 48-byte header and
`--size` bytes of payload, one `sendmsg` each) with at most `--window` unacknowledged, to a receiver process that
lands each payload in one reused region and acknowledges what landed whenever its socket drains (one ack frame for
every write since the last, as `transport.tcp` does). Two senders, interleaved in each repeat, beside the raw
socket baseline of `bench_io` (the same bytes streamed, one ack a round) and the real `TcpTransport`:
  ack thread     a second thread reads the ack frames and releases each write's lock, and the posting thread
                 waits on the oldest write's lock (a hand-over per write);
  waiter polls   the posting thread reads the ack frames itself when its window is full (no second thread,
                 no hand-over): the best a one-thread Python writer could do with this receiver.
`--variants` adds (2026-12-06):
  ack thread, batched   completions handed over as `TcpTransport` does (one batch per ack frame, `complete_quietly`):
                        the ack thread counts what each ack frame acknowledged and wakes the posting thread only when
                        it waits, on one lock of its own;
  ..., every k-th asks  the acknowledgement rate set by the writer: every k-th write (k = window/2), and the last,
                        carries an "ask" flag, and the receiver holds what landed until an asked-for frame landed and
                        its socket drained (as `transport.tcp` does for FLAG_MORE);
  ..., the window's last asks  only the write that fills the window (its sender blocks next) asks.
`--ack_cost_us` makes each side spend that much CPU per ack frame (a busy loop), like the transport's Python per
acknowledgement (the plain model pays only its system calls); the table gives the ack frames per write of each model
case. The ratio of each to the raw socket (best of the repeats) bounds what changing the transport's completion
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

from experiments import (
    SigtermAsInterrupt,
    define_rerun_of,
    interrupted_by,
    parse_flags_checking_rerun,
    writable_file_or_exit,
    write_rows_json,
)

FLAGS = flags.FLAGS
# (10**11 was numpy's "Unable to allocate 93.1 GiB" traceback from the sender's source buffer)
flags.DEFINE_integer("size", 64 * 1024, "payload bytes per write (at most 1 GiB)", lower_bound=1, upper_bound=1 << 30)
flags.DEFINE_integer("count", 8192, "writes per measurement", lower_bound=1)
flags.DEFINE_integer("window", 16, "writes in flight at most", lower_bound=1)
flags.DEFINE_integer(
    "repeats", 3, "interleaved repeats; the best of each is reported", lower_bound=1, allow_override=True
)
flags.DEFINE_bool("transport", True, "also measure the real TcpTransport (a peer process of its own)")
flags.DEFINE_bool(
    "variants", False, "also measure batched completions and acknowledgements the writer asks for (the docstring)"
)
flags.DEFINE_float(
    "ack_cost_us",
    0.0,
    "CPU each side spends per acknowledgement frame (a busy loop: the transport's Python)",
    lower_bound=0,
)
# --out: other benchmarks define it too (allow_override: see experiments.bench_io)
flags.DEFINE_string("out", "", "write the rows as JSON here (default: print only)", allow_override=True)
define_rerun_of()

HEADER = 48  # bytes, as transport.tcp's frame header
# size, count, on_ask (1: acknowledge only frames that ask), ack cost (ns) of a round; count 0 ends the receiver
_ROUND = struct.Struct("!QQQQ")
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


def _spin(ns: int) -> None:
    """Burn `ns` of CPU (the per-acknowledgement work a Python transport does beside the model's system calls)."""
    if ns:
        end = time.perf_counter_ns() + ns
        while time.perf_counter_ns() < end:
            pass


def _receive(conn) -> None:
    lst = socket.create_server(("127.0.0.1", 0))
    conn.send(lst.getsockname()[1])
    s, _ = lst.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        size, count, on_ask, cost = _ROUND.unpack(_recv_exact(s, _ROUND.size))
        if count == 0:
            return
        ask = False  # `on_ask`: a frame with its first header byte set asks for the acknowledgements held
        frame = HEADER + size
        buf = bytearray(max(4 * frame, 1 << 18))
        view, region = memoryview(buf), memoryview(bytearray(size))
        landed = held = have = 0
        while landed < count:
            asked = len(buf) - have
            try:
                n = s.recv_into(view[have:], asked, socket.MSG_DONTWAIT)
            except BlockingIOError:  # drained: acknowledge what landed (`on_ask`: once a frame asked), then wait
                if held and (ask or not on_ask):
                    _spin(cost)
                    s.sendall(_ACK.pack(held))
                    held = ask = 0
                n = s.recv_into(view[have:], asked)
            if n == 0:
                return
            have += n
            start = 0
            while have - start >= frame:
                ask = ask or view[start] != 0
                region[:] = view[start + HEADER : start + frame]
                start += frame
                landed += 1
                held += 1
            if start:
                view[: have - start] = view[start:have]
                have -= start
        if held:
            _spin(cost)
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
        self.sock.sendall(_ROUND.pack(0, 0, 0, 0))
        self.sock.close()
        self.proc.join(5)

    cost_ns = 0  # CPU each side spends per acknowledgement frame (--ack_cost_us)
    acks = 0  # acknowledgement frames the sender read in its last round

    @staticmethod
    def _asks(ask: int, i: int, count: int, window_full: bool) -> bool:
        """Does write `i` ask for the acknowledgements? `ask` 0: never (the receiver acknowledges whenever its socket
        drains); k > 0: every k-th write; -1: the write that fills the window (its sender blocks next). The last write
        of a round always asks."""
        if ask == 0:
            return False
        return i == count - 1 or (ask > 0 and (i + 1) % ask == 0) or (ask < 0 and window_full)

    def ack_thread(self, payload: memoryview, count: int, window: int, ask: int = 0) -> float:
        s, plain, asking, cost = self.sock, bytes(HEADER), b"\x01" + bytes(HEADER - 1), self.cost_ns
        s.sendall(_ROUND.pack(payload.nbytes, count, ask != 0, cost))
        posted: collections.deque = collections.deque()  # locks of the writes not acknowledged, oldest first
        guard = threading.Lock()
        lost: list[OSError] = []
        frames = [0]

        def read_acks() -> None:
            done = 0
            try:
                while done < count:
                    for (k,) in _ACK.iter_unpack(_recv_exact(s, _ACK.size)):
                        frames[0] += 1
                        _spin(cost)
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
        for i in range(count):
            if len(inflight) >= window:
                inflight.popleft().acquire()
            lock = threading.Lock()
            lock.acquire()
            with guard:
                posted.append(lock)
            inflight.append(lock)
            s.sendmsg([asking if self._asks(ask, i, count, len(inflight) >= window) else plain, payload])
        for lock in inflight:
            lock.acquire()
        wall = time.perf_counter() - t0
        acker.join()
        self.acks = frames[0]
        if lost:
            raise ConnectionError(f"ack thread: {lost[0]}")
        return wall

    def ack_batch(self, payload: memoryview, count: int, window: int, ask: int = 0) -> float:
        """As `ack_thread`, but completions handed over as `TcpTransport` does: the ack thread counts what an ack frame
        acknowledged and wakes the posting thread only if it waits (one lock of its own), not a lock per write."""
        s, plain, asking, cost = self.sock, bytes(HEADER), b"\x01" + bytes(HEADER - 1), self.cost_ns
        s.sendall(_ROUND.pack(payload.nbytes, count, ask != 0, cost))
        guard = threading.Lock()
        state = {"acked": 0, "waiter": None, "frames": 0}
        lost: list[OSError] = []

        def read_acks() -> None:
            try:
                while state["acked"] < count:
                    (k,) = _ACK.unpack(_recv_exact(s, _ACK.size))
                    state["frames"] += 1
                    _spin(cost)
                    with guard:
                        state["acked"] += k
                        waiter, state["waiter"] = state["waiter"], None
                    if waiter is not None:
                        waiter.release()
            except OSError as e:  # the receiver is gone (or the run was stopped): wake the posting thread
                lost.append(e)
                with guard:
                    state["acked"] = count
                    waiter, state["waiter"] = state["waiter"], None
                if waiter is not None:
                    waiter.release()

        def wait_until(n: int) -> None:  # until `n` writes are acknowledged
            while state["acked"] < n:
                with guard:
                    if state["acked"] >= n:
                        return
                    lock = state["waiter"] = threading.Lock()
                    lock.acquire()
                lock.acquire()  # released by the ack thread after its next ack frame

        t0 = time.perf_counter()
        acker = threading.Thread(target=read_acks, daemon=True)
        acker.start()
        for i in range(count):
            wait_until(i + 1 - window)  # at most `window` in flight
            s.sendmsg([asking if self._asks(ask, i, count, i + 1 - state["acked"] >= window) else plain, payload])
        wait_until(count)
        wall = time.perf_counter() - t0
        acker.join()
        self.acks = state["frames"]
        if lost:
            raise ConnectionError(f"ack thread: {lost[0]}")
        return wall

    def waiter_polls(self, payload: memoryview, count: int, window: int, ask: int = 0) -> float:
        s, plain, asking, cost = self.sock, bytes(HEADER), b"\x01" + bytes(HEADER - 1), self.cost_ns
        s.sendall(_ROUND.pack(payload.nbytes, count, ask != 0, cost))
        t0 = time.perf_counter()
        sent = acked = frames = 0
        while acked < count:
            if sent < count and sent - acked < window:
                full = sent + 1 - acked >= window
                s.sendmsg([asking if self._asks(ask, sent, count, full) else plain, payload])
                sent += 1
                continue
            (k,) = _ACK.unpack(_recv_exact(s, _ACK.size))
            frames += 1
            _spin(cost)
            acked += k
        self.acks = frames
        return time.perf_counter() - t0


def _rows(best: dict[str, float], size: int, count: int, acks: dict[str, int]) -> list[dict]:
    """`acks`: the acknowledgement frames of each model case's best repeat (per write in the rows; None elsewhere)."""
    raw = count * size / best["raw socket"]
    return [
        {
            "case": n,
            "GBps": count * size / t / 1e9,
            "ratio": count * size / t / raw,
            "acks_per_write": acks[n] / count if n in acks else None,
        }
        for n, t in best.items()
    ]


def run(
    size: int,
    count: int,
    window: int,
    repeats: int,
    transport: bool = True,
    variants: bool = False,
    ack_cost_us: float = 0.0,
) -> list[dict]:
    """Rows {case, GBps, ratio, acks_per_write} (best of `repeats` interleaved repeats; ratio to the raw socket).
    `variants`: also the batched ack thread and the senders whose writes ask for their acknowledgements (every
    window/2-th write, or the one that fills the window) from a receiver that holds them otherwise (module docstring);
    `ack_cost_us`: CPU each side of the model spends per acknowledgement frame. Ctrl-C after a whole repeat raises
    `Interrupted` with the rows of the finished repeats (they were lost)."""
    # (imported here: a launcher imports no other launcher at its top, tests/test_fix10_flags.py)
    from experiments.bench_io import RawSocketPeer, _transport_pair, _transport_round

    src = np.ones(size, np.uint8)
    payload = memoryview(src)
    model, raw = Model(), RawSocketPeer()  # (the raw baseline: bench_io's, the same bytes streamed, one ack a round)
    model.cost_ns = round(ack_cost_us * 1000)
    me = peer = None
    cases = {
        "raw socket": lambda p, n, w: raw.round(src, size, n),
        "ack thread": model.ack_thread,
        "waiter polls": model.waiter_polls,
    }
    if variants:
        half = max(1, window // 2)
        cases[f"ack thread, every {half}th asks"] = lambda p, n, w: model.ack_thread(p, n, w, half)
        cases["ack thread, batched"] = model.ack_batch
        cases[f"ack thread, batched, every {half}th asks"] = lambda p, n, w: model.ack_batch(p, n, w, half)
        cases[f"waiter polls, every {half}th asks"] = lambda p, n, w: model.waiter_polls(p, n, w, half)
        cases["waiter polls, the window's last asks"] = lambda p, n, w: model.waiter_polls(p, n, w, -1)
    acks: dict[str, int] = {}
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
                for name, fn in cases.items():
                    t = fn(payload, count, window)
                    if t < best[name]:
                        best[name] = t
                        if name not in ("raw socket", "TcpTransport"):
                            acks[name] = model.acks
        except KeyboardInterrupt as e:
            if done == 0:
                raise
            raise Interrupted(_rows(best, size, count, acks), done, interrupted_by(e)) from None
    except BaseException:
        _close(model, raw, me, peer, quiet=True)
        raise
    _close(model, raw, me, peer, quiet=False)
    return _rows(best, size, count, acks)


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
    variants, cost = FLAGS.variants, FLAGS.ack_cost_us
    if out:
        writable_file_or_exit(out, "--out")  # before the benchmark, not after
    logging.info(
        "size %d B, count %d, window %d, repeats %d, transport %s, variants %s, ack cost %g us",
        *(size, count, window, repeats, FLAGS.transport, variants, cost),
    )
    stopped = None
    try:
        with SigtermAsInterrupt():
            rows = run(size, count, window, repeats, FLAGS.transport, variants, cost)
    except Interrupted as e:  # the best of the repeats that finished (it was two tracebacks, nothing kept)
        rows, repeats = e.rows, e.done
        stopped = f"tcp_completion_model: interrupted ({e.by}); the table is the best of the {e.done} finished repeats"
    except KeyboardInterrupt as e:  # (Terminated too)
        raise SystemExit(f"tcp_completion_model: interrupted ({interrupted_by(e)}) before a repeat finished") from None
    print(f"\n## Completion structure, {size} B writes, {window} in flight, best of {repeats}, {cost:g} us an ack\n")
    print("| case | GB/s | ratio to raw | ack frames a write |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        a = "-" if r["acks_per_write"] is None else f"{r['acks_per_write']:.3f}"
        print(f"| {r['case']} | {r['GBps']:.2f} | {r['ratio']:.2f} | {a} |")
    if out:
        meta = {"size": size, "count": count, "window": window, "repeats": repeats, "ack_cost_us": cost}
        write_rows_json(
            out, [{**r, **meta} for r in rows], "the rows" + (" of the finished repeats" if stopped else "")
        )
    if stopped:
        raise SystemExit(stopped + (f" (also in {out})" if out else ""))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_checking_rerun)
