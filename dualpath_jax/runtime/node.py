"""One node (engine group): its engines, its SNIC, its host buffer pool, and the leader's fetch loop.

A node is all-prefill or all-decode (DESIGN.md). Its engines share the node's storage NIC and host buffer
budget; each engine has its own CNIC (its transport endpoint of `config.transport`, built by the launcher and
used only through the common `transport.Transport` interface; paced as the engine's compute NIC, KV at low
priority), which also paces the engine's own copies between host buffers and device memory (D2H on its egress
link with the transport's writes, H2D on its ingress link "cnic/engine<E>/in"). The
group leader fetches from the global scheduler every `fetch_interval_s`, sending the group's events and getting
tasks, cancellations and the engine directory back. The same class runs in a
thread (in-process launcher), in its own process (local launcher) or in a Ray actor.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from dualpath_jax import clock
from dualpath_jax.host_buffers import HostBufferPool
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.runtime.config import ConfigError, RuntimeConfig, stall_timeout_s
from dualpath_jax.runtime.control import Event, GroupReply, GroupReport
from dualpath_jax.runtime.engines import DecodeEngine, PrefillEngine, engine_endpoint
from dualpath_jax.runtime.storage_nic import StorageNIC

log = logging.getLogger(__name__)

# How often a group's report carries its links' new bytes; the final report (a graceful stop, sent once the engines and
# the SNIC stopped) carries the rest. A node killed without a goodbye (SIGKILL, `kill`) loses at most this much.
LINK_REPORT_S = 0.5


def store_stats(store) -> dict | None:
    """A store object's counters (`KVStore.stats()`: hits, evictions, write_rejected...) for a node's final report, with
    `object`, which names the object: the in-process nodes share one, so the driver counts it once
    (`driver.store_totals`). None where the store's `stats()` fails or is not a dataclass (logged)."""
    try:
        snap = store.stats()
        out = {k: v for k, v in dataclasses.asdict(snap).items() if isinstance(v, (int, float))}
    except Exception:  # noqa: BLE001 -- the counters are a report, not the run
        log.exception("kv store %r: stats() failed (its counters are left out of the run's results)", store)
        return None
    out["object"] = f"{socket.gethostname()}/{os.getpid()}/{id(store)}"
    return out


class NodeContext:
    """What engines of one node share: config, model ops, store and the node's event sink."""

    def __init__(self, cfg: RuntimeConfig, model, store):
        self.cfg = cfg
        self.model = model
        self.store = store
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self.wake = threading.Event()  # set by every event: the leader reports it without waiting a full interval

    def emit(self, ev: Event) -> None:
        with self._lock:
            self._events.append(ev)
        self.wake.set()

    def take_events(self) -> list[Event]:
        with self._lock:
            out, self._events = self._events, []
            return out


def engine_device(engine_id: int):
    """The local device engine `engine_id` runs on: device e % their count on a host with several accelerators (one
    engine per GPU where there are enough, as the paper's g engines per node, and the node processes of one host,
    whose engine ids differ, on different GPUs); None (JAX's default device) with one device."""
    import jax

    devices = jax.local_devices()
    return devices[engine_id % len(devices)] if len(devices) > 1 else None


def engine_models(model, engine_ids) -> dict:
    """Each engine's model ops, on its `engine_device` (`ModelOps.on_device`: `model` itself where its weights are
    already there). All of them ran on the default device."""
    return {e: model if (d := engine_device(e)) is None else model.on_device(d) for e in engine_ids}


def check_model_ops(cfg: RuntimeConfig, model) -> None:
    """A node's model ops must be config.model's (its name, and its seed where a tiny model's weights come from it):
    a `model_ops` of another model given to `driver.run` (the inprocess launcher's engines use it) was served under
    config.model's name, silently, with its host buffers, decode slots and token ids checked for config.model (a
    prompt the buffers then could never hold waited until config.run_timeout_s). A ConfigError naming both."""
    name = getattr(model, "name", None)
    if name is None:  # (a stand-in model without one)
        return
    from dualpath_jax.runtime.model_ops import is_checkpoint

    if is_checkpoint(cfg.model):  # (a checkpoint's weights are its files: no seed)
        same = os.path.realpath(str(name)) == os.path.realpath(cfg.model)
    else:
        same = (name, getattr(model, "seed", cfg.model_seed)) == (cfg.model, cfg.model_seed)
    if not same:
        raise ConfigError(
            f"config.model={cfg.model!r} (model_seed={cfg.model_seed}) but the engines' model ops are {name!r} (seed "
            f"{getattr(model, 'seed', '?')}): the run would serve another model than its config says; pass "
            "model_ops=ModelOps.of_config(config), or none"
        )


def node_model_ops(cfg: RuntimeConfig, engine_ids):
    """A node process's model ops (`ModelOps.of_config`), made on its first engine's device: every node process of
    a multi-GPU host made its weights on the default device first, so GPU 0 held one copy per node process (and
    its own engine's a second one) beside the copies of the engines' devices."""
    from dualpath_jax.runtime.model_ops import ModelOps

    return ModelOps.of_config(cfg, device=engine_device(min(engine_ids)))


def block_layout(cfg: RuntimeConfig, model) -> BlockLayout:
    kv = model.kv_layout
    return BlockLayout(kv.num_layers, cfg.block_size, kv.bytes_per_token_per_layer, model.fingerprint)


class EngineGroup:
    """A node's engines plus its leader loop. `run()` blocks until the scheduler says shutdown."""

    stall_timeout_s: float | None = None  # (config.scheduler's in force, set in __init__; None: no stall detection)

    def __init__(
        self,
        node_id: int,
        role: str,
        engine_ids: list,
        cfg: RuntimeConfig,
        model,
        store,
        control,  # LocalControlClient | SocketControlClient
        make_transport: Callable[[str, object], object],  # (endpoint name, pacer) -> Transport (inproc/tcp/rdma)
        traffic,  # dualpath_jax.traffic.TrafficManager of this process
        batcher_factory: Callable[[], object] | None = None,
    ):
        check_model_ops(cfg, model)
        self.node_id = node_id
        self.role = role
        self.engine_ids = list(engine_ids)
        self.cfg = cfg
        self.control = control
        self.traffic = traffic
        self.ctx = NodeContext(cfg, model, store)
        self.wall_origin = clock.EPOCH + traffic.clock_origin  # (bins on the event clock, `clock.now`)
        traffic.add_snic(node_id, cfg.nics.snic_bytes_per_s)
        snic_pacer = traffic.pacer(f"snic/node{node_id}")
        self.snic = StorageNIC(node_id, store, cfg.block_size, lambda n: snic_pacer.pace(n, "low"))
        layout = block_layout(cfg, model)
        self.models = engine_models(model, self.engine_ids)
        budget = cfg.buffers.pe_buffer_bytes if role == "prefill" else cfg.buffers.de_buffer_bytes
        per_engine = budget // len(self.engine_ids)
        self.engines = {}
        self._stop = threading.Event()
        self._killed = False
        self.fetches = 0
        self._links_sent: dict[tuple, int] = {}  # (link, t0, t1) -> bytes reported so far
        self._links_due = 0.0  # monotonic time of the next link report
        self.stall_timeout_s = stall_timeout_s(cfg)
        try:
            self._build_engines(cfg, layout, per_engine, make_transport, batcher_factory)
            self.address = {e: eng.transport.address for e, eng in self.engines.items()}
            if cfg.cluster.precompile:
                self._precompile(cfg, self.models.values())
        except BaseException:
            # Close what was built (the SNIC's threads, endpoints): nobody else holds this half-built group.
            self.close()
            raise

    def _build_engines(self, cfg, layout, per_engine, make_transport, batcher_factory) -> None:
        role, traffic = self.role, self.traffic
        for e in self.engine_ids:
            traffic.add_cnic(
                e,
                cfg.nics.cnic_bytes_per_s,
                {"high": cfg.nics.high_priority_share, "low": 1.0 - cfg.nics.high_priority_share},
            )
            transport = make_transport(engine_endpoint(e), traffic.pacer(f"cnic/engine{e}"))
            # The engine's own D2H copies cross the same (egress) link as its transport's writes: pacers over one
            # `Link` share its slots (one cap, one record), whoever holds them. Its H2D copies cross the ingress
            # direction of the full-duplex NIC, a link of the same rate.
            cnic = traffic.pacer(f"cnic/engine{e}")
            traffic.add_cnic_in(
                e,
                cfg.nics.cnic_bytes_per_s,
                {"high": cfg.nics.high_priority_share, "low": 1.0 - cfg.nics.high_priority_share},
            )
            cnic_in = traffic.pacer(f"cnic/engine{e}/in")
            try:
                pool = HostBufferPool(
                    slot_nbytes=layout.layer_block_nbytes, budget_bytes=per_engine, name=f"{role}{e}", prefault=False
                )
                kind, extra = (
                    (PrefillEngine, {"batcher": batcher_factory()}) if role == "prefill" else (DecodeEngine, {})
                )
                eng = kind(
                    e, self.node_id, self.ctx, transport, pool, self.snic, cnic=cnic, cnic_in=cnic_in,
                    model=self.models[e], **extra,
                )  # fmt: skip
            except BaseException:
                transport.close()
                raise
            self.engines[e] = eng

    def _precompile(self, cfg, models) -> None:
        """Compile the steps of `models` (the engines' model ops, one per device) before serving."""
        t0 = time.monotonic()
        if self.role == "prefill":
            c = cfg.cluster
            # Only buckets a PE can meet: a request computes at most max_seq_len tokens, and each of a batch at least
            # one (prefill_token_budget=4096 over max_seq_len=256 ran every bucket up to 8 x 4096 new tokens, minutes
            # of startup on a CPU for shapes no batch has).
            n = 0
            for ops in {id(m): m for m in models}.values():  # (each device's steps compile there)
                n += ops.precompile(
                    min(c.prefill_max_batch, c.prefill_token_budget),
                    min(c.prefill_token_budget, c.max_seq_len),
                    c.max_seq_len,
                )
            log.info("node %d: compiled %d prefill buckets in %.1f s", self.node_id, n, time.monotonic() - t0)
        else:
            for eng in self.engines.values():
                eng.batch.precompile(cfg.block_size)
            log.info("node %d: compiled decode buckets in %.1f s", self.node_id, time.monotonic() - t0)

    def stop(self) -> None:
        self._stop.set()
        self.ctx.wake.set()

    def kill(self) -> None:
        """Die without a goodbye (failure tests, as SIGKILL): no final report, engines and transports closed; its links'
        bytes since the last periodic report (at most LINK_REPORT_S) are not in the run's records."""
        self._killed = True
        self._stop.set()
        self.close()

    def _report(self, final: bool = False) -> GroupReport:
        links = []
        now = time.monotonic()
        if final or now >= self._links_due:
            # Link bytes go out every LINK_REPORT_S, not only in the final report: a node that dies (or is declared
            # dead) sends none, and its SNIC and CNICs used to vanish from the run's records and storage-NIC balance.
            self._links_due = now + LINK_REPORT_S
            links = self._link_deltas()
        stats = {
            "read_queue_tokens": self.snic.read_queue_tokens,
            "pending_writes": self.snic.pending_writes,
            "snic_bytes_read": self.snic.bytes_read,
            "snic_bytes_written": self.snic.bytes_written,
            "failed_reads": self.snic.failed_reads,
            "unstored_blocks": self.snic.unstored_blocks,
            "busy_s": {e: eng.busy_s for e, eng in self.engines.items()},
            "free_buffer_bytes": {e: eng.pool.free_slots * eng.pool.slot_nbytes for e, eng in self.engines.items()},
        }
        if self.role == "decode":
            stats["decode_steps"] = {e: eng.decode_steps for e, eng in self.engines.items()}
        if not final and self.stall_timeout_s is not None:
            stalled = self._stalled(now)
            if stalled:  # (the scheduler declares the node dead: its requests re-run elsewhere)
                stats["stalled"] = stalled
                stats["stall_timeout_s"] = self.stall_timeout_s
        if final:
            stats["step_log"] = {e: list(eng.step_log) for e, eng in self.engines.items()}
            stats["wait_s"] = {e: eng.wait_s for e, eng in self.engines.items()}
            stats["h2d_wait_s"] = {e: eng.h2d_wait_s for e, eng in self.engines.items()}
            store = store_stats(self.ctx.store)
            if store is not None:
                stats["store"] = store
        return GroupReport(
            node_id=self.node_id,
            role=self.role,
            engine_ids=self.engine_ids,
            address=self.address,
            events=self.ctx.take_events(),
            link_bytes=links,
            stats=stats,
        )

    def _stalled(self, now: float) -> dict:
        """{what: seconds} of the parts that made no progress for over stall_timeout_s: an engine's main thread
        (stuck in a step, a store or a transport call; a wait or an idle loop stamps its progress, and so does a JAX
        compile, looked for once a quarter of the timeout passed: `EngineBase.progress_age`) or one of the SNIC's
        store calls."""
        out = {}
        for e, eng in self.engines.items():
            age = eng.progress_age(now, self.stall_timeout_s / 4)
            if age > self.stall_timeout_s:
                out[f"{self.role} engine {e}"] = age
        out.update(self.snic.stalled(now, self.stall_timeout_s))
        return out

    def _link_deltas(self) -> list:
        """This node's link bytes per bin since the last report (a bin still filling, or one a dropped transfer took
        chunks back from, is sent again as its change); the service adds them up per bin."""
        from dualpath_jax.metrics import LinkBytes

        o = self.wall_origin
        # An idle SNIC still counts in the storage-NIC balance: give it a zero-byte sample.
        out = [LinkBytes(f"snic/node{self.node_id}", o, o, 0)]
        now = {}
        names = [f"snic/node{self.node_id}"] + [f"cnic/engine{e}{d}" for e in self.engine_ids for d in ("", "/in")]
        for name in names:  # (this node's links only: in one process, the others' are another group's)
            try:
                link = self.traffic.link(name)
            except KeyError:
                continue
            for s in link.samples():
                now[(s.link, s.t0, s.t1)] = s.nbytes
        for key in set(now) | set(self._links_sent):
            d = now.get(key, 0) - self._links_sent.get(key, 0)
            if d:
                out.append(LinkBytes(key[0], key[1] + o, key[2] + o, d))
        self._links_sent = now
        return out

    def _apply(self, reply: GroupReply) -> None:
        if reply.directory is not None:
            for eng in self.engines.values():
                if eng.directory != reply.directory:
                    eng.set_directory(reply.directory)
                    eng.directory = reply.directory
        for task in reply.tasks:
            e = task.prefill_engine if self.role == "prefill" else task.decode_engine
            self.engines[e].submit(task)
        for c in reply.cancels:
            for eng in self.engines.values():
                eng.cancel(c)

    def run(self) -> None:
        """Start the engines and fetch until shutdown; then send the final report (link bytes)."""
        for eng in self.engines.values():
            eng.start()
        interval = self.cfg.scheduler.fetch_interval_s
        try:
            while not self._stop.is_set():
                # Cleared before the report takes the events: one emitted from here on is in it or sets the wake again.
                self.ctx.wake.clear()
                reply = self.control.fetch(self._report())
                self.fetches += 1
                self._apply(reply)
                if reply.shutdown:
                    break
                # Fetch again after the interval (the heartbeat), or at once when an engine has news.
                self.ctx.wake.wait(interval)
        finally:
            self.close()
        # Once nothing moves any more: the bytes the links moved while the engines and the SNIC stopped are in it (a
        # group told to shut down while busy, e.g. declared dead though alive, lost them when it reported first).
        try:
            if not self._killed:
                self.control.fetch(self._report(final=True))
        except Exception:  # noqa: BLE001 -- the driver may already be gone
            pass

    def live_threads(self) -> list[str]:
        """Names of its engines' and storage NIC's threads still running (after `close`: stuck ones)."""
        threads = [t for eng in self.engines.values() for t in eng._threads] + self.snic._threads
        return [t.name for t in threads if t.is_alive()]

    def close(self) -> None:
        for eng in self.engines.values():
            eng.stop()
        self.snic.close()  # (its job in progress ends after the current block)
        for eng in self.engines.values():
            eng.join(2.0)
            try:
                eng.transport.close()
            except Exception:  # noqa: BLE001
                pass
