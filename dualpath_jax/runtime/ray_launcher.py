"""Ray launcher: one Ray actor per node (engine group), for clusters of several hosts. Optional extra.

    pip install -e ".[ray]"
    # on the head host:   ray start --head --port=6379
    # on every other host: ray start --address=<head-ip>:6379
    # the KV store directory must be the same shared mount on every host (3FS, Lustre, NFS):
    python -m experiments.run --config.runtime.launcher=ray --config.runtime.store_dir=/mnt/shared/kv \
        --config.runtime.nics.snic_bytes_per_s=1e12 --config.runtime.nics.cnic_bytes_per_s=1e12

The driver (global scheduler service) runs where the command runs and listens on that host's address with
an auth key; each actor builds the model, opens the shared store, starts one transport endpoint per engine
(`config.transport`: "tcp", "rdma" whose control channel is a TCP endpoint, or a backend of one's own that takes
`host=` and `secret=`, its registering module imported first) bound to its host's address with a shared secret (peers
prove it at connect), and runs the same `EngineGroup` as the local launcher.
Actors are spread over the cluster's hosts (`SPREAD`), one per node of the config, each asking for one Ray CPU
(`ray start --num-cpus=N`: a 2-core host has 2, too few for the :test config's 3 nodes); give hosts a custom
resource (`ray start --resources='{"dualpath_node": 1}'`) and set `RAY_NODE_RESOURCE=dualpath_node` to place
exactly one actor per such host. `start` refuses at once a cluster that cannot place every node's actor
(`placement_shortfall`: Ray kept the rest pending, and the run waited out config.run_timeout_s in silence), and
warns when the run spans several hosts with no `config.store_dir` (a temporary directory on the driver's host).
With real NICs set the NIC caps to unpaced values (as above): pacing only emulates NIC ratios on one machine.

RDMA (`--config.runtime.transport=rdma`, `pip install -e ".[rdma]"` on every host): the driver's host is
checked for pyverbs and an RDMA device (and `config.rdma`'s device, port and GID index) before anything starts;
an actor whose host lacks them, or whose NIC has another name, a port that is not ACTIVE or no GID at that index,
raises at start with the reason (in the Ray log) and the run fails naming that node. Every host uses the same
`config.rdma` settings.

Failures: a node actor whose `run` raised (a defect in a node's code, a bad checkpoint, no RDMA) is in
`RayLauncher.errors` (its cause named) and the driver fails the run naming it; an actor that died (`kill(node)`, its
process or host lost) is only dead (`alive()` False): the scheduler re-runs its requests on the other nodes, its death
reason naming what Ray says of the actor (`exit_reason`: "its actor node2 (pid 7 on 10.0.0.2) died (ray.kill sent by
launcher.kill): The actor is dead because it was killed by `ray.kill`.").
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence

from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.control import ControlServer
from dualpath_jax.runtime.launcher import node_modules, watch_exits
from dualpath_jax.runtime.scheduler_service import GroupSpec, RunFailed

log = logging.getLogger(__name__)


def _import_ray():
    try:
        import ray
    except ImportError as e:  # the optional extra
        raise ImportError("the Ray launcher needs ray: pip install -e '.[ray]'") from e
    return ray


def placement_shortfall(
    hosts: Sequence[Mapping[str, float]], nodes: int, num_cpus: float, resource: str | None = None
) -> str | None:
    """Why `nodes` node actors of `num_cpus` CPUs each (and one unit of `resource` each where set: RAY_NODE_RESOURCE)
    cannot all be placed on Ray hosts of these total resources (`ray.nodes()`' "Resources" of the live hosts), the
    fix named; None if they fit. (Ray keeps an actor that fits nowhere pending: the run waited for it in silence.)"""
    eps = 1e-9  # (float resources: 0.1 * 30 CPUs is 3.0000000000000004)

    def room(have: float, each: float) -> int:
        return nodes if each <= 0 else int(have / each + eps)

    cpu_room = res_room = both_room = 0
    for h in hosts:
        c = room(h.get("CPU", 0.0), num_cpus)
        r = room(h.get(resource, 0.0), 1.0) if resource else nodes
        cpu_room, res_room, both_room = cpu_room + c, res_room + r, both_room + min(c, r)
    if both_room >= nodes:
        return None
    n = len(hosts)
    on = f"its {n} host has" if n == 1 else f"its {n} hosts have"
    why = []
    if cpu_room < nodes:
        need = math.ceil(nodes * num_cpus - eps)
        more = f"`ray start --head --num-cpus={need}`" if n <= 1 else f"`ray start --num-cpus=N` on each, {need} in all"
        why.append(
            f"each needs {num_cpus:g} Ray CPU and {on} {sum(h.get('CPU', 0.0) for h in hosts):g}: give Ray more "
            f"CPUs ({more}) or more hosts (`ray start --address=<head-ip>:6379` on each)"
        )
    if resource and res_room < nodes:
        why.append(
            f"each needs one {resource!r} (RAY_NODE_RESOURCE) and {on} "
            f"{sum(h.get(resource, 0.0) for h in hosts):g}: start {nodes} hosts with "
            f"`ray start --resources='{{\"{resource}\": 1}}'`, or unset RAY_NODE_RESOURCE"
        )
    if not why:  # (enough of each, not on the same hosts)
        why.append(
            f"the hosts with {resource!r} have CPUs for {both_room} of them: give those hosts more "
            f"(`ray start --num-cpus=N --resources=...`)"
        )
    return (
        f"the Ray cluster can place only {both_room} of the config's {nodes} node actors (the run would wait for the "
        f"rest until config.run_timeout_s): {'; '.join(why)}"
    )


def is_driver_temp_store(store_dir: str) -> bool:
    """`store_dir` is the KV store `driver.run` made for a run without `config.store_dir` (`dualpath_store_<pid>_*`
    in this process's temporary directory: on the driver's host only), or empty."""
    if not store_dir:
        return True
    parent, base = os.path.split(os.path.abspath(store_dir))
    return parent == os.path.abspath(tempfile.gettempdir()) and base.startswith(f"dualpath_store_{os.getpid()}_")


class _RayNode:
    """The body of one node actor (wrapped by ray.remote at launch)."""

    def run(
        self, spec: GroupSpec, cfg: RuntimeConfig, control_address, authkey: bytes, secret: str, modules=((), (), ())
    ) -> str:
        import ray

        from dualpath_jax.runtime.launcher import (
            enable_compilation_cache,
            endpoint_spec,
            import_node_modules,
            open_store,
            run_engine_group,
        )
        from dualpath_jax.runtime.node import block_layout, node_model_ops
        from transport import make_transport

        import_node_modules(cfg, modules)  # (a researcher's own batcher or transport: its module, on the actor's path)
        enable_compilation_cache()
        host = ray.util.get_node_ip_address()
        ops = node_model_ops(cfg, spec.engine_ids)
        store = open_store(cfg, block_layout(cfg, ops))  # (no capacity: the driver's object keeps it)

        def transport(name, pacer):  # "tcp", "rdma" (its control channel is a TCP endpoint) or one's own: host, secret
            return make_transport(endpoint_spec(cfg, name, host=host, secret=secret), pacer=pacer)

        try:
            run_engine_group(spec, cfg, ops, store, control_address, authkey, transport)
        finally:
            store.close()
        return f"node{spec.node_id} done on {host}"


class RayLauncher:
    """Engine groups as Ray actors spread over the cluster's hosts."""

    name = "ray"

    def __init__(self, cfg: RuntimeConfig, address: str | None = None, num_cpus_per_node: float = 1.0):
        self.cfg = cfg
        self.ray = _import_ray()
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.num_cpus = num_cpus_per_node
        self.actors: dict[int, object] = {}
        self.refs: dict[int, object] = {}
        self.server: ControlServer | None = None
        self._ended: dict[int, BaseException | None] = {}  # node -> its run's error (None: returned or died)
        self._exits: dict[int, str] = {}  # node -> how its actor task ended, in words (`exit_reason`)
        self._killed: set[int] = set()  # nodes `kill` stopped
        self._ended_lock = threading.Lock()  # (`errors`: the driver's thread; `exit_reason`: the service's too)

    def start(self, groups: Sequence[GroupSpec], service) -> None:
        watch_exits(service, self.exit_reason)
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=True)
        resource = os.environ.get("RAY_NODE_RESOURCE")
        multi_host = self._check_cluster(len(groups), resource)
        host = ray.util.get_node_ip_address() if multi_host else "127.0.0.1"
        authkey = secrets.token_bytes(16)
        self.server = ControlServer(service.fetch, authkey, host=host, on_error=getattr(service, "fail", None))
        secret = secrets.token_hex(16)
        options = {"num_cpus": self.num_cpus, "scheduling_strategy": "SPREAD"}
        if resource:
            options["resources"] = {resource: 1}
        actor_cls = ray.remote(_RayNode)
        for g in groups:
            actor = actor_cls.options(**options).remote()
            self.actors[g.node_id] = actor
            self.refs[g.node_id] = actor.run.remote(
                g, self.cfg, self.server.address, authkey, secret, node_modules(self.cfg)
            )

    def _check_cluster(self, nodes: int, resource: str | None) -> bool:
        """Refuse (RunFailed) a cluster that cannot place `nodes` actors; warn of a multi-host run without
        `config.store_dir`. Returns whether the live hosts are more than one."""
        live = [n for n in self.ray.nodes() if n.get("Alive")]
        if all("Resources" in n for n in live):  # (a listing without them cannot tell: Ray's own has them)
            short = placement_shortfall([n["Resources"] for n in live], nodes, self.num_cpus, resource)
            if short is not None:
                raise RunFailed(short)
        hosts = len({n["NodeManagerAddress"] for n in live})
        if hosts > 1 and is_driver_temp_store(self.cfg.store_dir):
            log.warning(
                "the run spans %d Ray hosts but config.store_dir is empty: the KV store is a temporary directory "
                "(%s) on the driver's host only, and the actors on the other hosts open that path on their own disks "
                "(no shared KV): set --config.runtime.store_dir to a mount shared by every host",
                hosts,
                self.cfg.store_dir or "none yet",
            )
        return hosts > 1

    @property
    def errors(self) -> dict[int, BaseException]:
        """This run's nodes whose actor task ended by raising (a RayTaskError: its cause named, the remote traceback
        logged): the driver fails the run naming them, as for a local node that raised. An actor that died (killed,
        its worker or host lost: RayActorError or another RayError) is only dead: the scheduler re-runs its requests
        on the others. (A node whose run raised was taken for dead too: a defect in a node's code showed only as
        re-runs.) Cheap (the driver asks every poll): one `ray.wait(timeout=0)` over the running nodes, and one
        `ray.get` of each task that has just ended."""
        with self._ended_lock:
            running = {ref: n for n, ref in self.refs.items() if n not in self._ended}
            if running:
                ready, _ = self.ray.wait(list(running), num_returns=len(running), timeout=0)
                for ref in ready:
                    self._ended[running[ref]] = self._error_of(running[ref], ref)
            return {n: e for n, e in sorted(self._ended.items()) if e is not None}

    def exit_reason(self, node_id: int) -> str | None:
        """How the node's actor task ended, as Ray tells it (for its death reason, `watch_exits`), None while it runs:
        "its actor node2 (pid 7 on 10.0.0.2) died (ray.kill sent by launcher.kill): The actor is dead because it was
        killed by `ray.kill`.", "... died: The actor is dead because its worker process has died. ...", "its actor
        node2's run raised ValueError: ...". Quick (called with the service's lock held): one `ray.wait(timeout=0)`,
        and one `ray.get` of the task once it has ended."""
        with self._ended_lock:
            ref = self.refs.get(node_id)
            if node_id not in self._ended:
                if ref is None or not self.ray.wait([ref], timeout=0)[0]:
                    return None
                self._ended[node_id] = self._error_of(node_id, ref)
            return self._exits.get(node_id)

    def _error_of(self, node_id: int, ref) -> BaseException | None:
        """The error of a node's ended actor task: None if `run` returned or the actor died. (How it ended, in words,
        goes to `_exits`.)"""
        exc = self.ray.exceptions
        try:
            done = self.ray.get(ref)
        except exc.RayTaskError as e:  # `run` raised in the actor
            log.error("node %d: its actor's run raised:\n%s", node_id, e)
            why = f"{type(e.cause).__name__}: {e.cause}"
            self._exits[node_id] = f"its actor node{node_id}'s run raised {why}"
            err = RuntimeError(f"the node{node_id} actor's run raised {why}")
            err.__cause__ = e
            return err
        except exc.RayError as e:  # the actor died (ActorDiedError: killed, its process or host lost): only dead
            self._exits[node_id] = self._death_text(node_id, e)
            return None
        self._exits[node_id] = f"its actor node{node_id}'s run returned ({done})"
        return None

    def _death_text(self, node_id: int, e: BaseException) -> str:
        """What Ray says of a dead node actor, in one line: its pid and host, and why (Ray's own words, without its
        list of common causes)."""
        lines = str(e).splitlines()
        fields = dict(ln.strip().split(": ", 1) for ln in lines[1:] if ln.startswith("\t") and ": " in ln)
        at = " on ".join(v for v in (fields.get("pid") and f"pid {fields['pid']}", fields.get("ip")) if v)
        if isinstance(e, self.ray.exceptions.ActorDiedError):  # (its base line, its fields, then the cause)
            why = " ".join(ln.strip() for ln in lines[1:] if ln.strip() and not ln.startswith("\t"))
            why = why.split(" Some common causes include", 1)[0] or (lines[0].strip() if lines else "")
        else:  # (the owner or the object lost, the actor unavailable: their first line)
            why = f"{type(e).__name__}: {lines[0].strip() if lines else ''}"
        if len(why) > 400:
            why = why[:400] + " ..."
        killed = " (ray.kill sent by launcher.kill)" if node_id in self._killed else ""
        return f"its actor node{node_id}{f' ({at})' if at else ''} died{killed}: {why}"

    def alive(self, node_id: int) -> bool:
        ready, _ = self.ray.wait([self.refs[node_id]], timeout=0)
        return not ready

    def kill(self, node_id: int) -> None:
        self._killed.add(node_id)
        self.ray.kill(self.actors[node_id], no_restart=True)

    def join(self, timeout: float = 10.0) -> None:
        if not self.refs:  # (`start` refused before any actor)
            return
        self.ray.wait(list(self.refs.values()), num_returns=len(self.refs), timeout=timeout)

    def shutdown(self) -> None:
        self.join(10.0)
        for actor in self.actors.values():
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 -- already gone
                pass
        if self.server is not None:
            self.server.close()
        time.sleep(0.1)
