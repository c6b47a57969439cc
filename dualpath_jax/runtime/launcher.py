"""Launchers: where the engine groups run. All three run the same `EngineGroup` code.

- `InProcessLauncher`: every group in a thread of the driver process (tests; "inproc", "tcp" or "rdma"
  transport); one `ModelOps` (weights + jitted steps) shared by all engines, so a test compiles once.
- `LocalProcessLauncher`: one OS process per node (the default main job): each builds its own model,
  opens the shared store directory, paces its own NICs, moves KV to the other nodes over `config.transport`
  ("tcp", "rdma", or a backend of one's own: its module imported first, `transport_modules`) and talks to the
  global scheduler (multiprocessing.connection with an auth key). A node can be killed (`kill(node_id)`) to
  exercise failure handling.
- `RayLauncher` (runtime/ray_launcher.py): one Ray actor per node, placed on cluster nodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence

from dualpath_jax.interrupts import catch_lost_ctrl_c
from dualpath_jax.runtime.config import RuntimeConfig, fetch_timeout_s
from dualpath_jax.runtime.control import ControlServer, DriverLost, LocalControlClient, SocketControlClient
from dualpath_jax.runtime.scheduler_service import GroupSpec, RunFailed

log = logging.getLogger(__name__)


def batcher_kwargs(cfg: RuntimeConfig, cost_shape=None) -> dict:
    """The PE batcher's kwargs: `fifo` capped by the cluster's prefill budget/batch, `compute_quota` with that budget
    and (given the runtime model's `schedulers.cost_model.ModelShape`) a cost model of it on this CPU. The runtime's
    PEs and bench_runtime's simulator copy of the runtime both use it."""
    kw = dict(cfg.scheduler.batcher_kwargs)
    if cfg.scheduler.batcher == "fifo":
        kw.setdefault("token_budget", cfg.cluster.prefill_token_budget)
        kw.setdefault("max_requests", cfg.cluster.prefill_max_batch)
    elif cfg.scheduler.batcher == "compute_quota":
        kw.setdefault("token_budget", cfg.cluster.prefill_token_budget)
        if cost_shape is not None and "cost_model" not in kw:
            from schedulers.cost_model import CostModel

            kw["cost_model"] = CostModel(cost_shape, "cpu")
    return kw


def build_batcher_factory(cfg: RuntimeConfig, model_ops=None):
    """The PE's intra-engine policy (`batcher_kwargs`; the same buckets cap compute_quota's new tokens)."""
    import schedulers

    shape = None
    if model_ops is not None and cfg.scheduler.batcher == "compute_quota":
        from dualpath_jax.runtime.model_ops import cost_model_shape

        shape = cost_model_shape(model_ops)
    kw = batcher_kwargs(cfg, shape)
    return lambda: schedulers.make_batcher(cfg.scheduler.batcher, **kw)


def _registering_module(registry, name: str) -> tuple[str, ...]:
    """The module that registered `name` in `registry` (none for a class of `__main__`, which cannot be imported by
    name: `config.unreachable_main`), for the node processes to import before they build it."""
    mod = registry.importable_module(name)
    return (mod,) if mod else ()


def _import_registering_modules(what: str, registry, name: str, modules: Sequence[str]) -> None:
    """In a node process: import `modules` (`_registering_module` in the driver), then check that `name` is known in
    `registry` here; `what` names the config field in the errors."""
    import importlib

    for mod in modules:
        try:
            importlib.import_module(mod)
        except Exception as e:
            raise RuntimeError(
                f"{what} {name!r} was registered by module {mod!r} in the driver, which this node process cannot "
                f"import: {e!r}"
            ) from e
    if name not in registry:
        raise RuntimeError(
            f"{what} {name!r} is not registered in this node process ({mp.current_process().name}): "
            "register it at the top level of an importable module (not under `if __name__ == '__main__':`)"
        )


def batcher_modules(cfg: RuntimeConfig) -> tuple[str, ...]:
    """The module that registered the configured batcher, for the node processes to import before they build it: they
    are spawned (or Ray actors) and knew only the package's batchers, so a researcher's own one failed each node with
    a KeyError on its stderr, after the driver's checks had passed. A class of `__main__` cannot be imported by name
    (`check_batcher_reaches_nodes`)."""
    import schedulers

    return _registering_module(schedulers.BATCHERS, cfg.scheduler.batcher)


def check_batcher_reaches_nodes(cfg: RuntimeConfig) -> None:
    """Before anything starts: the configured batcher must be known in the node processes of `config.launcher`. Those
    import the module that registered it (`batcher_modules`); one registered in the driver's `__main__` reaches them
    only where `config.unreachable_main` says so."""
    import schedulers
    from dualpath_jax.runtime.config import ConfigError, unreachable_main

    name = cfg.scheduler.batcher
    cls = schedulers.BATCHERS.get(name)
    if unreachable_main(cfg, cls):
        raise ConfigError(
            f"config.scheduler.batcher {name!r} is registered in __main__ ({cls!r}), which the {cfg.launcher!r} "
            "launcher's node processes cannot import: register it in an importable module (e.g. my_batchers.py on the "
            "path, imported by your script)"
        )


def import_batcher_modules(cfg: RuntimeConfig, modules: Sequence[str]) -> None:
    """In a node process: import the modules that registered the batcher in the driver (`batcher_modules`), then
    check it is known here, naming it."""
    import schedulers

    _import_registering_modules("config.scheduler.batcher", schedulers.BATCHERS, cfg.scheduler.batcher, modules)


def transport_modules(cfg: RuntimeConfig) -> tuple[str, ...]:
    """The module that registered `config.transport`, for the node processes to import before they build its
    endpoints (as `batcher_modules` does for the batcher): they are spawned (or Ray actors) and knew only the built-in
    transports, so a backend of one's own failed each node with "unknown transport". A class of `__main__` cannot be
    imported by name (`config.validate` refuses it where the nodes do not re-run `__main__`)."""
    from transport import TRANSPORTS

    return _registering_module(TRANSPORTS, cfg.transport)


def import_transport_modules(cfg: RuntimeConfig, modules: Sequence[str]) -> None:
    """In a node process: import the modules that registered `config.transport` in the driver (`transport_modules`),
    then check it is known here, naming it."""
    from transport import TRANSPORTS

    _import_registering_modules("config.transport", TRANSPORTS, cfg.transport, modules)


def store_modules(cfg: RuntimeConfig) -> tuple[str, ...]:
    """The module that registered `config.store`, for the node processes to import before they open it (as
    `transport_modules` does for the transport): they are spawned (or Ray actors) and knew only "local_dir". A class
    of `__main__` cannot be imported by name (`config.validate` refuses it where the nodes do not re-run `__main__`)."""
    from dualpath_jax.store import STORES

    return _registering_module(STORES, cfg.store)


def import_store_modules(cfg: RuntimeConfig, modules: Sequence[str]) -> None:
    """In a node process: import the modules that registered `config.store` in the driver (`store_modules`), then
    check it is known here, naming it."""
    from dualpath_jax.store import STORES

    _import_registering_modules("config.store", STORES, cfg.store, modules)


def node_modules(cfg: RuntimeConfig) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """What a node process imports before it builds anything: (`batcher_modules`, `transport_modules`,
    `store_modules`)."""
    return batcher_modules(cfg), transport_modules(cfg), store_modules(cfg)


def import_node_modules(cfg: RuntimeConfig, modules) -> None:
    """In a node process: `import_batcher_modules`, `import_transport_modules` and `import_store_modules` of
    `node_modules`' triple, what every launcher passes (a pair was taken too; only tests passed one)."""
    batchers, transports, stores = modules
    import_batcher_modules(cfg, batchers)
    import_transport_modules(cfg, transports)
    import_store_modules(cfg, stores)


def store_config(cfg: RuntimeConfig) -> dict:
    """The `make_store` config of the run's KV store: `config.store` with `config.store_options`, on the run's store
    directory (`root`: config.store_dir, a fresh temporary one when '')."""
    return {"name": cfg.store, **cfg.store_options, "root": cfg.store_dir}


def store_is_kept(cfg: RuntimeConfig) -> bool:
    """Whether the run's store has one keeper of its capacity (`open_store`): a bounded `local_dir` store."""
    return cfg.store == "local_dir" and cfg.store_options.get("capacity_bytes") is not None


_READ_METHOD_LOGGED: set = set()  # the store directories whose read_method choice this process logged


def default_read_method(cfg: RuntimeConfig) -> str | None:
    """The `read_method` the run's `local_dir` store gets when `config.store_options` does not set one: "preadv" for
    launcher='ray' (hosts sharing one store directory, NFS say: a block another host's keeper unlinks is a miss with
    preadv, ESTALE, but SIGBUS for a page of a mapped file not in this host's cache), else None (the store's
    default, mmap). The README's multi-host command gave no store_options, so it ran with mmap."""
    if cfg.launcher == "ray" and cfg.store == "local_dir" and cfg.store_dir and "read_method" not in cfg.store_options:
        return "preadv"
    return None


def open_store(cfg: RuntimeConfig, layout, keeper: bool = False):
    """The run's KV store (`store_config`): one object in the driver (the scheduler's lookups) and one per node
    process (or one for every in-process node), all on the run's root.

    A bounded `local_dir` store (`capacity_bytes`, `store_is_kept`) has one keeper of its capacity: the driver's
    object (`keeper=True`), which answers every lookup and sees every turn finish (`scheduler_service.StoreKeeper`:
    it pins the hits of the turns in flight and indexes the blocks each turn wrote back, evicting LRU to fit). It is
    opened with the capacity and `stat_on_hit`; the nodes' objects (`keeper=False`) without a capacity: they write
    and read, and evict nothing. Each process evicting from its own view held about the capacity per decode node
    process in the shared directory, and deleted blocks others were about to read. A kept `config.store_dir` over
    the capacity is trimmed when a keeper opens it. Any other store is opened as configured, whatever the role.
    With launcher='ray', a `local_dir` store reads with preadv unless store_options say otherwise (`default_read_method`)."""
    from dualpath_jax.store import make_store

    read_method = default_read_method(cfg)
    if read_method is not None and cfg.store_dir not in _READ_METHOD_LOGGED:
        _READ_METHOD_LOGGED.add(cfg.store_dir)  # (once per directory and process: the driver and each node)
        log.info(
            "kv store %s: read_method=%r (launcher='ray': hosts may share the directory; set "
            "config.store_options' read_method to choose)", cfg.store_dir, read_method,
        )  # fmt: skip
    options = store_config(cfg)
    if read_method is not None:
        options["read_method"] = read_method
    if store_is_kept(cfg):
        if keeper:
            options.setdefault("stat_on_hit", True)
        else:
            options["capacity_bytes"] = None
        return make_store(options, layout)

    # The storage NIC reads each Full Block straight into its rows of the request's layer-major area
    # (runtime/storage_nic.py), which a transfer reads later: local_dir's default non-temporal copies (no read of
    # the destination's lines first) fit that. `python -m experiments.bench_store`, "storage NIC into a
    # layer-major area": in place with them 1.6x (DeepSeek-V3 blocks) / 2.1x (Qwen2.5-32B) the old staging
    # buffer + copy, in place with memcpy 1.07x / 1.29x (README "Verified reads in C").
    return make_store(options, layout)


class InProcessLauncher:
    """Engine groups as threads of this process."""

    name = "inprocess"

    def __init__(self, cfg: RuntimeConfig, model_ops=None):
        self.cfg = cfg
        self.model_ops = model_ops
        self.groups: dict[int, object] = {}
        self.threads: dict[int, threading.Thread] = {}
        self.errors: dict[int, BaseException] = {}
        self._killed: set[int] = set()  # nodes `kill` stopped

    def start(self, groups: Sequence[GroupSpec], service) -> None:
        watch_exits(service, self.exit_reason)
        from dualpath_jax.runtime.model_ops import ModelOps
        from dualpath_jax.runtime.node import EngineGroup, block_layout
        from dualpath_jax.traffic import TrafficManager

        cfg = self.cfg
        ops = self.model_ops or ModelOps.of_config(cfg)
        self.model_ops = ops
        store = open_store(cfg, block_layout(cfg, ops))
        self.store = store
        traffic = TrafficManager()
        self.traffic = traffic
        make_transport = _transport_factory(cfg, secret=secrets.token_hex(16))  # (tcp, rdma: on loopback too)
        batchers = build_batcher_factory(cfg, ops)
        for g in groups:
            group = EngineGroup(
                g.node_id,
                g.role,
                g.engine_ids,
                cfg,
                ops,
                store,
                LocalControlClient(service),
                make_transport,
                traffic,
                batchers,
            )
            self.groups[g.node_id] = group
        for node_id, group in self.groups.items():
            t = threading.Thread(target=self._run, args=(node_id, group), name=f"node{node_id}", daemon=True)
            self.threads[node_id] = t
            t.start()

    def _run(self, node_id, group) -> None:
        try:
            group.run()
        except BaseException as e:  # noqa: BLE001 -- surfaced by the driver
            if isinstance(e, RunFailed):  # the scheduler failed the run (a bad policy): it says why, not a crash here
                log.error("node %d stopped: %s", node_id, e)
            else:
                log.exception("node %d failed", node_id)
            self.errors[node_id] = e

    def alive(self, node_id: int) -> bool:
        return self.threads[node_id].is_alive()

    def kill(self, node_id: int) -> None:
        """Stop a node abruptly: its leader stops fetching (heartbeat lost) and its engines stop."""
        self._killed.add(node_id)
        self.groups[node_id].kill()

    def exit_reason(self, node_id: int) -> str | None:
        """How the node's thread ended (for its death reason), None while it runs."""
        if node_id in self._killed:
            return f"its thread node{node_id} was killed (InProcessLauncher.kill: no goodbye, as SIGKILL)"
        t = self.threads.get(node_id)
        if t is None or t.is_alive():
            return None
        e = self.errors.get(node_id)
        return f"its thread node{node_id} ended" + (f": its run raised {e!r}" if e is not None else "")

    def join(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads.values():
            t.join(max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        """Stop every group and close what they hold, also after a `start` that failed part way (groups built
        but never run close here: `run` closes the others when it returns)."""
        for g in self.groups.values():
            g.stop()
        self.join(5.0)
        for node_id, g in self.groups.items():
            if node_id not in self.threads:
                g.close()
        # Threads cannot be killed in-process: one stuck in a step or a store call lives on, unseen (a warning).
        stuck = [t.name for t in self.threads.values() if t.is_alive()]
        for g in self.groups.values():
            stuck += g.live_threads()
        if stuck:
            log.warning(
                "thread(s) %s did not end within the shutdown's 5 s (stuck in a step or a store call?): left running "
                "as daemon threads, with the run's store closed under them",
                stuck,
            )
        store = getattr(self, "store", None)
        if store is not None:
            store.close()


# A Unix socket's path holds at most 107 bytes (sun_path: 108 with its NUL).
UNIX_PATH_MAX = 107


def control_dir_parent(prefix: str, tmp_dir: str | None = None) -> str | None:
    """Where a netns run's control-socket directory (`prefix` + mkdtemp's 8 characters, holding "control") goes:
    the temp directory (None), or /tmp where that path would pass UNIX_PATH_MAX bytes (a long $TMPDIR failed the run
    with "AF_UNIX path too long", naming neither)."""
    import tempfile

    path = os.path.join(tmp_dir or tempfile.gettempdir(), prefix + "x" * 8, "control")
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        return None
    logging.getLogger(__name__).info(
        "the control socket goes under /tmp: under the temp directory its path (%d bytes) passes a Unix socket's %d",
        len(os.fsencode(path)),
        UNIX_PATH_MAX,
    )
    return "/tmp"


def watch_exits(service, exit_reason) -> None:
    """Let the run's scheduler name how a node ended in its death reason (`GlobalScheduler.watch_exits`; a stand-in
    service without it: nothing)."""
    watch = getattr(service, "watch_exits", None)
    if watch is not None:
        watch(exit_reason)


def _few_processes_note() -> str:
    """For a node process that ended by SIGABRT: a low per-user process limit (not root) is a likely cause, XLA's
    client aborting when it cannot start its threads (about one per core in every node process); "" otherwise."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft == resource.RLIM_INFINITY or os.getuid() == 0 or soft > 4096:
        return ""
    return f" (out of threads? the per-user process limit RLIMIT_NPROC, `ulimit -u`, is {soft})"


def exit_code_text(code: int, note: str = "") -> str:
    """A process's exit code in words: "was killed by SIGKILL (exit code -9)", "exited with code 1"; `note` goes in
    the parentheses."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code}{f', {note}' if note else ''})"
    note = ", ".join(n for n in ("interrupted: Ctrl-C" if code == 130 else "", note) if n)
    return f"exited with code {code}" + (f" ({note})" if note else "")


def endpoint_spec(cfg: RuntimeConfig, name: str, **extra) -> dict:
    """The `transport.make_transport` config of engine endpoint `name` for `config.transport` "tcp", "rdma" (with
    `config.rdma`'s device, port, GID index and service levels), "inproc" or one's own, with
    `config.transport_options`; `extra`: what the launcher sets besides (host: Ray, netns; secret: the run's, with Ray
    and netns and for tcp / rdma with every launcher, `config.endpoints_get_run_secret`; fabric: inproc)."""
    spec = {"backend": cfg.transport, "name": name, **cfg.transport_options, **extra}
    if cfg.transport == "rdma":
        from dualpath_jax.runtime.config import rdma_endpoint_kwargs

        spec.update(rdma_endpoint_kwargs(cfg))
    return spec


def _transport_factory(cfg: RuntimeConfig, spec: GroupSpec | None = None, secret: str | None = None):
    """(endpoint name, pacer) -> the engine's endpoint. `secret`: the run's, the same in every node (None: none).
    tcp and rdma endpoints prove it at connect on loopback too, unless `config.transport_options` gives a secret of
    its own (`config.endpoints_get_run_secret`): an endpoint without one let any local process write into the
    engine's buffer. With `config.netns` (`spec`: the node's group) each binds to its engine's compute veth in the
    node's namespace, and the kernel paces it: its pacer only records (`traffic.RecordingPacer`)."""
    from dualpath_jax.runtime.config import endpoints_get_run_secret
    from transport import make_transport

    if cfg.netns:
        from dualpath_jax.runtime import netns
        from dualpath_jax.runtime.engines import engine_endpoint
        from dualpath_jax.traffic import RecordingPacer

        hosts = {engine_endpoint(e): h for e, h in netns.endpoint_hosts(spec.node_id, spec.engine_ids).items()}

        def kernel_paced(name, pacer):
            spec_ = endpoint_spec(cfg, name, host=hosts[name], secret=secret)
            return make_transport(spec_, pacer=None if pacer is None else RecordingPacer(pacer))

        return kernel_paced

    if cfg.transport == "inproc":
        from transport.inproc import InProcFabric

        fabric = InProcFabric()  # one fabric per run: endpoint names never clash across runs

        return lambda name, pacer: make_transport(endpoint_spec(cfg, name, fabric=fabric), pacer=pacer)
    # "tcp", "rdma" (same address rules: its control channel is a TCP endpoint, loopback here), or one's own
    extra = {"secret": secret} if secret is not None and endpoints_get_run_secret(cfg) else {}
    return lambda name, pacer: make_transport(endpoint_spec(cfg, name, **extra), pacer=pacer)


# ------------------------------------------------------------------------------------------------- local
def _node_process(target, *args, report=None, parent: tuple[int, bool] | None = None) -> None:
    """Run `target(*args)` as a node process's whole life, then end the process without interpreter finalization.

    By the time `target` returns, the node has stopped and closed what it owns (engines, transports, store, control
    client). Finalizing would still tear JAX/XLA down while their threads may be running: a daemon thread that comes
    back from XLA then tries to take the GIL, is ended by pthread_exit inside C++ frames, and the process aborts
    ("terminate called after throwing an instance of ''", "FATAL: exception not rethrown", exit code -6; seen on a
    DE node about one run in ten). `os._exit` after flushing the logs avoids that. Exit code 0 when `target`
    returned, 130 (an info line) when Ctrl-C interrupted it, 1 (with the traceback on stderr, as multiprocessing
    prints it) when it raised; then `report` (a connection to the driver), if given, gets ("error", repr of it).
    A node that lost its driver (`DriverLost`: the run was stopped or the driver's process ended) exits 1 with one
    warning line instead of the traceback. `parent`: (the driver's pid, whether its main thread started this
    process), `_end_with_parent`.
    """
    code = 1
    catch_lost_ctrl_c()  # (a Ctrl-C in JAX's gc callback was lost: the node went on with its run)
    if parent is not None:
        _end_with_parent(*parent)
    try:
        target(*args)
        code = 0
    except KeyboardInterrupt:
        # Ctrl-C reaches every process of the terminal's group: the driver reports it ("interrupted"), each node
        # printed a KeyboardInterrupt traceback besides.
        code = 130
        log.info("node process %s interrupted", mp.current_process().name)
    except DriverLost as e:
        # The driver stopped the run, or its process ended, before this node was done (Ctrl-C, its error, another
        # node's failure): one line, not an EOFError / ConnectionRefusedError traceback from every node.
        log.warning("node process %s stopped: %s", mp.current_process().name, e)
        _report_error(report, e)
    except BaseException as e:  # noqa: BLE001 -- reported here, the exit code says it
        print(f"Process {mp.current_process().name}:", file=sys.stderr)
        traceback.print_exc()
        # and to the driver, which named no cause ("exited with code 1"), e.g. for a batcher unknown in the node
        _report_error(report, e)
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _started_by() -> tuple[int, bool]:
    """A node process's `parent` (`_node_process`): this process's pid, and whether this thread is its main thread."""
    return os.getpid(), threading.current_thread() is threading.main_thread()


def _end_with_parent(pid: int, from_main_thread: bool) -> None:
    """End this node process (SIGKILL) when its driver's process `pid` ends, however it ends: a SIGKILLed driver's
    nodes went on compiling (holding their memory, a GPU's too) until they next talked to it (~30 s). Linux: the
    kernel's parent-death signal, which fires when the *thread* that started the process ends, so only when the
    driver's main thread started it (its end is the process's); else, and elsewhere, a thread that polls the parent
    pid. A driver already gone before the signal was set (the race): exit at once."""
    if from_main_thread and sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != pid:
                    _exit_without_driver(pid)
                return
        except (OSError, AttributeError):  # (no prctl: the polling thread below)
            pass

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(0.5)
        _exit_without_driver(pid)

    threading.Thread(target=watch, name="exit-with-driver", daemon=True).start()


def _exit_without_driver(pid: int) -> None:
    """Exit 1 with one line on stderr: the node's driver (`pid`) is gone (a silent exit left nothing to tell it from
    a node that never started)."""
    try:
        os.write(2, f"node process {os.getpid()}: its driver (pid {pid}) is gone; exiting\n".encode())
    finally:
        os._exit(1)


def _report_error(report, e: BaseException) -> None:
    """Send ("error", repr of `e`) to the driver on `report` (a connection), if given and the driver still listens."""
    if report is not None:
        try:
            report.send(("error", repr(e)))
        except Exception:  # noqa: BLE001 -- the driver may be gone
            pass


def run_engine_group(spec: GroupSpec, cfg: RuntimeConfig, ops, store, control_address, authkey: bytes, transport):
    """One run of node `spec`'s engine group in this process (the local launcher's node processes, one run or a
    session's, and the Ray actors): its control connection to the driver's server, the group's engines until the
    run ends, the connection closed however it ends. `transport(name, pacer)` makes an engine's endpoint."""
    from dualpath_jax.runtime.node import EngineGroup
    from dualpath_jax.traffic import TrafficManager

    # A PE's fetch runs the policy (under the scheduler's lock, which the other fetches wait on): a node waits for
    # the reply as long as the run's own no-progress bound, not a fixed 30 s (a policy call over 30 s failed every
    # node of a local / Ray run, blaming node 0, where the in-process launcher waited: session 49, slowpeer F4).
    control = SocketControlClient(control_address, authkey, timeout_s=fetch_timeout_s(cfg))
    try:
        group = EngineGroup(
            spec.node_id,
            spec.role,
            spec.engine_ids,
            cfg,
            ops,
            store,
            control,
            transport,
            TrafficManager(),
            build_batcher_factory(cfg, ops),
        )
        group.run()
    finally:
        control.close()


def _node_main(*args, report=None, parent: tuple[int, bool] | None = None) -> None:
    """Entry point of one node process (one run)."""
    _node_process(_serve_one_run, *args, report=report, parent=parent)


def _serve_one_run(
    spec: GroupSpec, cfg: RuntimeConfig, control_address, authkey: bytes, log_level: int, modules=((), (), ())
) -> None:
    """One run of a node process; `modules`: what it imports first (`node_modules`: the batcher's, the transport's,
    the store's)."""
    if cfg.netns:  # (first: before this process has threads other than this one)
        from dualpath_jax.runtime import netns

        netns.enter(spec.node_id)
    logging.basicConfig(level=log_level, format=f"%(asctime)s node{spec.node_id} %(levelname)s %(message)s")
    from dualpath_jax.runtime.node import block_layout, node_model_ops

    import_node_modules(cfg, modules)
    enable_compilation_cache()
    ops = node_model_ops(cfg, spec.engine_ids)
    store = open_store(cfg, block_layout(cfg, ops))  # (no capacity: the driver's object keeps it)
    try:
        run_engine_group(spec, cfg, ops, store, control_address, authkey, _transport_factory(cfg, spec, authkey.hex()))
    finally:
        store.close()


# XLA's allocator settings a user may choose (any of them set: `accelerator_sharing_env` leaves them all alone)
XLA_ALLOCATOR_VARS = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR")


def accelerator_sharing_env(environ=None) -> dict:
    """The environment variables that let the processes of one host share its accelerators: JAX preallocates 75% of
    a GPU's memory in every process that uses it, so of the main job's node processes (and its driver, which
    calibrates on the same GPU) only the first could start; with `XLA_PYTHON_CLIENT_PREALLOCATE=false` each
    allocates what it uses. Empty where the user set any of `XLA_ALLOCATOR_VARS` (their choice stands). No effect on
    XLA:CPU."""
    environ = os.environ if environ is None else environ
    if any(v in environ for v in XLA_ALLOCATOR_VARS):
        return {}
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


@contextlib.contextmanager
def _node_process_env():
    """`accelerator_sharing_env` in this process's environment while node processes are spawned (a spawned process
    starts with its parent's environment), then as it was."""
    extra = accelerator_sharing_env()
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def enable_compilation_cache(path: str | None = None) -> None:
    """JAX's persistent compilation cache, so node processes and reruns skip recompiling the same steps (the one
    the model launchers use: `models.jax_cache`, default $XDG_CACHE_HOME or ~/.cache, /dualpath_jax/xla, or $DUALPATH_JAX_CACHE)."""
    from models.jax_cache import enable_persistent_compilation_cache

    enable_persistent_compilation_cache(path)


def _node_session_main(
    spec: GroupSpec, conn, log_level: int, netns: bool = False, parent: tuple[int, bool] | None = None
) -> None:
    """Entry point of a session's node process (`_node_process`)."""
    _node_process(_serve_session, spec, conn, log_level, netns, report=conn, parent=parent)


def _serve_session(spec: GroupSpec, conn, log_level: int, in_netns: bool = False) -> None:
    """Entry point of a node process that serves several runs (a `LocalCluster` session): the model and its
    compiled steps stay in memory between runs; everything else (store, transports, NIC pacing) is per run.
    `in_netns`: the process joins its node's network namespace first (`config.netns`, for every run)."""
    if in_netns:
        from dualpath_jax.runtime import netns

        netns.enter(spec.node_id)
    logging.basicConfig(level=log_level, format=f"%(asctime)s node{spec.node_id} %(levelname)s %(message)s")
    from dualpath_jax.runtime.node import block_layout, node_model_ops

    enable_compilation_cache()
    ops = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError) as e:  # (its session ended without a goodbye: the driver's process is gone)
            raise DriverLost(f"the driver's session ended without a word ({type(e).__name__})") from None
        if msg is None:
            return
        cfg, control_address, authkey, modules = msg
        import_node_modules(cfg, modules)
        if ops is None or not ops.serves(cfg):
            ops = None  # (the last run's weights freed before the new ones are made)
            ops = node_model_ops(cfg, spec.engine_ids)
        store = open_store(cfg, block_layout(cfg, ops))
        try:
            run_engine_group(
                spec, cfg, ops, store, control_address, authkey, _transport_factory(cfg, spec, authkey.hex())
            )
        except DriverLost as e:
            # This run's control connection is gone (the driver failed the run: a policy that raised, a node's error),
            # not the session's pipe: the run ends here and the process waits for the next (it exited, and every later
            # run of the session failed at once: "no live prefill or decode engine left"). A driver whose process is
            # gone is found by the send below, or by the next recv.
            log.warning("node process %s: run ended: %s", mp.current_process().name, e)
        finally:
            store.close()
        try:
            conn.send("done")
        except OSError as e:
            raise DriverLost(f"the driver's session ended during the run ({type(e).__name__})") from None


@dataclasses.dataclass(frozen=True)
class _EndedProcess:
    """A node process that ended, its `mp.Process` closed (its pipes released): what the launcher still asks of it."""

    name: str
    pid: int
    exitcode: int

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        pass

    def kill(self) -> None:
        pass


class LocalProcessLauncher:
    """One OS process per node on this machine (spawned, so each has its own JAX runtime).

    Alone it spawns fresh processes for one run. Made by a `LocalCluster`, it reuses that session's node
    processes (their models stay compiled between runs, so runs compare policies, not compile times).
    """

    name = "local"

    def __init__(self, cfg: RuntimeConfig, session: LocalCluster | None = None):
        self.cfg = cfg
        self.session = session
        self.procs: dict[int, mp.Process] = {}
        self.server: ControlServer | None = None
        self._running: set[int] = set()  # nodes whose process serves this run
        self._reports: dict[int, object] = {}  # node -> the connection its process reports its run's error on
        self._whys: dict[int, str] = {}  # node -> its run's error, as reported
        self._control_dir: str | None = None  # (config.netns: the control server's Unix socket's directory)
        self._control_dir_lock: int | None = None  # (its flock's descriptor: `driver.held_temp_dir`)
        self._netns_lock: int | None = None  # (config.netns without a session: `netns.hold_cluster`'s descriptor)
        self._killed: set[int] = set()  # nodes `kill` SIGKILLed
        self._recv_lock = threading.Lock()  # (`_why`: the driver's thread and the scheduler's)
        if session is not None and session.netns != cfg.netns:
            raise ValueError(
                f"config.netns={cfg.netns} but the LocalCluster session's processes were started with "
                f"netns={session.netns}: start the session with LocalCluster(groups, netns={cfg.netns})"
            )

    def start(self, groups: Sequence[GroupSpec], service) -> None:
        watch_exits(service, self.exit_reason)
        authkey = secrets.token_bytes(16)
        if self.cfg.netns and self.session is None:  # (a session holds it for its life)
            from dualpath_jax.runtime import netns

            self._netns_lock, _ = netns.hold_cluster()
        if self.cfg.netns:  # (nodes in other network namespaces reach a Unix socket, not this one's loopback)
            # (its pid in the name: a SIGKILLed driver's is removed by the next run, `remove_stores_of_killed_runs`)
            from dualpath_jax.runtime.driver import held_temp_dir

            # (held, flock: a run in another PID namespace sharing /tmp does not remove it while this one runs)
            prefix = f"dpj-control-{os.getpid()}-"
            self._control_dir, self._control_dir_lock = held_temp_dir(prefix, control_dir_parent(prefix))
            control = os.path.join(self._control_dir, "control")
            self.server = ControlServer(
                service.fetch, authkey, unix_path=control, on_error=getattr(service, "fail", None)
            )
        else:  # (a node breaking the control protocol fails the run naming it: `ControlServer`, `GlobalScheduler.fail`)
            self.server = ControlServer(service.fetch, authkey, on_error=getattr(service, "fail", None))
        if self.session is not None:
            self.procs = self.session.procs
            self.session.begin(groups, (self.cfg, self.server.address, authkey, node_modules(self.cfg)))
            # (a session process that died in an earlier run gets no run: only dead here, not this run's error)
            self._running = {g.node_id for g in groups if self.procs[g.node_id].is_alive()}
            return
        ctx = mp.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        for g in groups:
            why, report = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_node_main,
                args=(g, self.cfg, self.server.address, authkey, level, node_modules(self.cfg)),
                kwargs={"report": report, "parent": _started_by()},
                name=f"node{g.node_id}",
                daemon=True,
            )
            with _node_process_env():
                p.start()
            report.close()  # (the node's end)
            self._reports[g.node_id] = why
            self.procs[g.node_id] = p
            self._running.add(g.node_id)

    @property
    def errors(self) -> dict[int, BaseException]:
        """This run's nodes whose process ended because the run raised in it (`_node_process`: exit code 1, the
        traceback on the process's stderr): the driver fails the run naming them, as it does for an in-process node
        that raised. A process killed by a signal (a fault, the OOM killer: exit code < 0) or interrupted (130) is
        only dead: the scheduler re-runs its requests on the others. (A node whose run raised was taken for dead
        too: a defect in a node's code showed only as re-runs on the other nodes.)"""
        return {
            n: RuntimeError(
                f"process {self.procs[n].name} exited with code 1: its run raised{self._why(n)} (traceback on its "
                "stderr)"
            )
            for n in sorted(self._running)
            if self.procs[n].exitcode == 1
        }

    def _why(self, node_id: int) -> str:
        """The error the node's process reported before it exited (`_node_process`), as " <error>"; or "" if none."""
        if self.session is not None:
            why = self.session.failure_of(node_id)
        else:
            conn = self._reports.get(node_id)
            with self._recv_lock:  # (the driver's thread and the scheduler's, `exit_reason`)
                if node_id not in self._whys and conn is not None:
                    try:
                        if conn.poll():
                            self._whys[node_id] = conn.recv()[1]
                    except (EOFError, OSError):
                        pass
            why = self._whys.get(node_id)
        return f" {why}" if why else ""

    def alive(self, node_id: int) -> bool:
        if self.session is not None:
            return self.procs[node_id].is_alive() and not self.session.finished(node_id)
        return self.procs[node_id].is_alive()

    def kill(self, node_id: int) -> None:
        """SIGKILL the node's process (no goodbye: the scheduler finds out by the lost heartbeat / exit)."""
        self._killed.add(node_id)
        self.procs[node_id].kill()

    def exit_reason(self, node_id: int) -> str | None:
        """How the node's process ended, by its exit code or signal (for its death reason), None while it runs."""
        p = self.procs.get(node_id)
        code = None if p is None else p.exitcode
        if code is None:
            return None
        how = exit_code_text(code, "sent by launcher.kill" if node_id in self._killed and code < 0 else "")
        if code == 1:
            how += f": its run raised{self._why(node_id)}"
        if code == -signal.SIGABRT:
            how += _few_processes_note()
        before = " before this run" if self.session is not None and node_id not in self._running else ""
        return f"its process {p.name} (pid {p.pid}) {how}{before}"

    def join(self, timeout: float = 10.0) -> None:
        if self.session is not None:
            self.session.wait_done(timeout)
            return
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        if self.session is not None:
            try:
                self.session.end()
            finally:  # (a node that did not finish its run: the server is closed all the same)
                self._close_server()
            return
        self.join(10.0)
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
                p.join(2.0)
        for conn in self._reports.values():
            conn.close()
        # (each Process holds its sentinel pipe until closed: the launcher, in a cycle with the scheduler through
        # `exit_reason`, kept 2 fds a node open until a full garbage collection; a closed one answers nothing, so
        # what `exit_reason` / `errors` still ask is kept)
        for n, p in list(self.procs.items()):
            if isinstance(p, mp.process.BaseProcess) and not p.is_alive():
                self.procs[n] = _EndedProcess(p.name, p.pid, p.exitcode)
                p.close()
        self._close_server()

    def _close_server(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._control_dir is not None:
            shutil.rmtree(self._control_dir, ignore_errors=True)
        for fd in (self._control_dir_lock, self._netns_lock):
            if fd is not None:
                os.close(fd)
        self._control_dir_lock = self._netns_lock = None


class LocalCluster:
    """Node processes that serve several runs, one after the other (the main job and the benchmarks).

        with LocalCluster(layout_groups(cfg)) as cluster:
            for policy in ("basic", "dualpath"):
                driver.run(cfg_for(policy), launcher=cluster.launcher(cfg_for(policy)))

    Every run has its own global scheduler, store directory, transports and NIC pacing; only the processes
    and their compiled model steps are shared. The node layout must stay the same across runs.
    """

    END_TIMEOUT_S = 15.0  # how long a node process may take to end its run once the run is over (`end`)
    _closed = False  # (`close`)

    def __init__(self, groups: Sequence[GroupSpec], netns: bool = False):
        """`netns`: each process joins its node's network namespace (runs of it need `config.netns`)."""
        self.groups = list(groups)
        self.netns = netns
        self.procs: dict[int, mp.Process] = {}
        self.conns: dict[int, object] = {}
        self._busy: set[int] = set()
        self.failures: dict[int, str] = {}  # node -> the error its process reported before it exited
        self._recv_lock = threading.Lock()  # (`_poll`: the driver's thread and the scheduler's, `exit_reason`)
        self._netns_lock: int | None = None  # (`netns.hold_cluster`: for the session's life)
        if netns:
            from dualpath_jax.runtime import netns as netns_

            self._netns_lock, _ = netns_.hold_cluster()
        ctx = mp.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        for g in self.groups:
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_node_session_main,
                args=(g, child, level, netns, _started_by()),
                name=f"node{g.node_id}",
                daemon=True,
            )
            with _node_process_env():
                p.start()
            self.procs[g.node_id] = p
            self.conns[g.node_id] = parent

    def launcher(self, cfg: RuntimeConfig) -> LocalProcessLauncher:
        self._check_open()
        return LocalProcessLauncher(cfg, session=self)

    def _check_open(self) -> None:
        if self._closed:  # (its processes were closed: "process object is closed" from inside the driver)
            raise RuntimeError("this LocalCluster was closed: start a new one (LocalCluster(groups)) for another run")

    def begin(self, groups: Sequence[GroupSpec], msg) -> None:
        self._check_open()
        if [(g.node_id, g.role, list(g.engine_ids)) for g in groups] != [
            (g.node_id, g.role, list(g.engine_ids)) for g in self.groups
        ]:
            raise ValueError("a LocalCluster session runs one node layout; start a new session for another")
        for n, conn in self.conns.items():
            # A node process that died since (killed, a crash in an earlier run) gets no run: the driver sees it is
            # not alive and declares it dead, as one dying mid-run (the send was a bare BrokenPipeError).
            if not self.procs[n].is_alive():
                continue
            try:
                conn.send(msg)
            except OSError:  # (died just now)
                continue
            self._busy.add(n)

    def finished(self, node_id: int) -> bool:
        self._poll(node_id)
        return node_id not in self._busy

    def _poll(self, node_id: int) -> None:
        """Take a node's message: "done" with its run, or ("error", why) as its process exits (`_node_process`); that
        one leaves it busy until the process has exited (its exit code makes it the run's error, not a dead node)."""
        conn = self.conns[node_id]
        # (the driver's thread and, naming a dead node's exit, the scheduler's: a Connection is not thread-safe)
        with self._recv_lock:
            try:
                if node_id not in self._busy or not conn.poll():
                    return
                msg = conn.recv()
            except (EOFError, OSError):  # (its process exited without a word)
                return
        if isinstance(msg, tuple) and msg[:1] == ("error",):
            self.failures[node_id] = msg[1]
        else:
            self._busy.discard(node_id)

    def failure_of(self, node_id: int) -> str | None:
        """The error a node's process reported before it exited (its run raised), if any."""
        self._poll(node_id)
        return self.failures.get(node_id)

    def wait_done(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._busy and time.monotonic() < deadline:
            for n in list(self._busy):
                if not self.procs[n].is_alive():
                    self._busy.discard(n)
                else:
                    self.finished(n)
            time.sleep(0.01)

    def end(self) -> None:
        """Wait for every node process to end its run. One that has not within `END_TIMEOUT_S` is hung (stopped by
        SIGSTOP or a debugger, deadlocked; a node declared dead by its heartbeat mid-run is killed before, by the driver:
        `driver._kill_silent_dead`): it is killed, with a warning,
        and later runs go on without it (a dead process gets no run: `begin`). This raised RuntimeError("node(s) [1]
        did not finish their run"), so a run that had finished every turn ended the job with a traceback, nothing
        written."""
        self.wait_done(self.END_TIMEOUT_S)
        for n in sorted(self._busy):
            p = self.procs[n]
            log.warning(
                "node %d's process did not end its run within %g s of the run's end (hung, or still starting): "
                "killed (pid %s); later runs go on without it",
                n,
                self.END_TIMEOUT_S,
                p.pid,
            )
            p.kill()
            p.join(2.0)
            self._busy.discard(n)

    def close(self) -> None:
        if self._closed:  # (a second close: `with` after an explicit one)
            return
        self._closed = True
        for conn in self.conns.values():
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs.values():
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
        # (their pipe ends and each Process's sentinel pipe were held until this object was collected: 3 descriptors
        # per node for every closed session a caller keeps)
        for conn in self.conns.values():
            conn.close()
        for p in self.procs.values():
            if not p.is_alive():
                p.close()
        if self._netns_lock is not None:
            os.close(self._netns_lock)
            self._netns_lock = None

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
