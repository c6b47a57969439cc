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
Actors are spread over the cluster's hosts (`SPREAD`), one per node of the config; give hosts a custom
resource (`ray start --resources='{"dualpath_node": 1}'`) and set `RAY_NODE_RESOURCE=dualpath_node` to place
exactly one actor per such host. With real NICs set the NIC caps to unpaced values (as above): pacing only
emulates NIC ratios on one machine.

RDMA (`--config.runtime.transport=rdma`, `pip install -e ".[rdma]"` on every host): the driver's host is
checked for pyverbs and an RDMA device (and `config.rdma`'s device, port and GID index) before anything starts;
an actor whose host lacks them, or whose NIC has another name, a port that is not ACTIVE or no GID at that index,
raises at start with the reason (in the Ray log) and the run fails naming that node. Every host uses the same
`config.rdma` settings.

Failures: a node actor whose `run` raised (a defect in a node's code, a bad checkpoint, no RDMA) is in
`RayLauncher.errors` (its cause named) and the driver fails the run naming it; an actor that died (`kill(node)`, its
process or host lost) is only dead (`alive()` False): the scheduler re-runs its requests on the other nodes.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Sequence

from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.control import ControlServer, SocketControlClient
from dualpath_jax.runtime.launcher import node_modules
from dualpath_jax.runtime.scheduler_service import GroupSpec

log = logging.getLogger(__name__)


def _import_ray():
    try:
        import ray
    except ImportError as e:  # the optional extra
        raise ImportError("the Ray launcher needs ray: pip install -e '.[ray]'") from e
    return ray


class _RayNode:
    """The body of one node actor (wrapped by ray.remote at launch)."""

    def run(
        self, spec: GroupSpec, cfg: RuntimeConfig, control_address, authkey: bytes, secret: str, modules=((), (), ())
    ) -> str:
        import ray

        from dualpath_jax.runtime.launcher import (
            build_batcher_factory,
            enable_compilation_cache,
            endpoint_spec,
            import_node_modules,
            open_store,
        )
        from dualpath_jax.runtime.node import EngineGroup, block_layout, node_model_ops
        from dualpath_jax.traffic import TrafficManager
        from transport import make_transport

        import_node_modules(cfg, modules)  # (a researcher's own batcher or transport: its module, on the actor's path)
        enable_compilation_cache()
        host = ray.util.get_node_ip_address()
        ops = node_model_ops(cfg, spec.engine_ids)
        store = open_store(cfg, block_layout(cfg, ops))  # (no capacity: the driver's object keeps it)
        control = SocketControlClient(control_address, authkey)

        def transport(name, pacer):  # "tcp", "rdma" (its control channel is a TCP endpoint) or one's own: host, secret
            return make_transport(endpoint_spec(cfg, name, host=host, secret=secret), pacer=pacer)

        try:
            EngineGroup(
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
            ).run()
        finally:
            control.close()
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

    def start(self, groups: Sequence[GroupSpec], service) -> None:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=True)
        multi_host = len({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}) > 1
        host = ray.util.get_node_ip_address() if multi_host else "127.0.0.1"
        authkey = secrets.token_bytes(16)
        self.server = ControlServer(service.fetch, authkey, host=host, on_error=getattr(service, "fail", None))
        secret = secrets.token_hex(16)
        resource = os.environ.get("RAY_NODE_RESOURCE")
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

    @property
    def errors(self) -> dict[int, BaseException]:
        """This run's nodes whose actor task ended by raising (a RayTaskError: its cause named, the remote traceback
        logged): the driver fails the run naming them, as for a local node that raised. An actor that died (killed,
        its worker or host lost: RayActorError or another RayError) is only dead: the scheduler re-runs its requests
        on the others. (A node whose run raised was taken for dead too: a defect in a node's code showed only as
        re-runs.) Cheap (the driver asks every poll): one `ray.wait(timeout=0)` over the running nodes, and one
        `ray.get` of each task that has just ended."""
        running = {ref: n for n, ref in self.refs.items() if n not in self._ended}
        if running:
            ready, _ = self.ray.wait(list(running), num_returns=len(running), timeout=0)
            for ref in ready:
                self._ended[running[ref]] = self._error_of(running[ref], ref)
        return {n: e for n, e in sorted(self._ended.items()) if e is not None}

    def _error_of(self, node_id: int, ref) -> BaseException | None:
        """The error of a node's ended actor task: None if `run` returned or the actor died."""
        exc = self.ray.exceptions
        try:
            self.ray.get(ref)
        except exc.RayTaskError as e:  # `run` raised in the actor
            log.error("node %d: its actor's run raised:\n%s", node_id, e)
            err = RuntimeError(f"the node{node_id} actor's run raised {type(e.cause).__name__}: {e.cause}")
            err.__cause__ = e
            return err
        except exc.RayError:  # the actor died (ActorDiedError: killed, its process or host lost): only dead
            return None
        return None

    def alive(self, node_id: int) -> bool:
        ready, _ = self.ray.wait([self.refs[node_id]], timeout=0)
        return not ready

    def kill(self, node_id: int) -> None:
        self.ray.kill(self.actors[node_id], no_restart=True)

    def join(self, timeout: float = 10.0) -> None:
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
