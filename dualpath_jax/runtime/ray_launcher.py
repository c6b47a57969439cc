"""Ray launcher: one Ray actor per node (engine group), for clusters of several hosts. Optional extra.

    pip install -e ".[ray]"
    # on the head host:   ray start --head --port=6379
    # on every other host: ray start --address=<head-ip>:6379
    # the KV store directory must be the same shared mount on every host (3FS, Lustre, NFS):
    python -m experiments.run --config.runtime.launcher=ray --config.runtime.store_dir=/mnt/shared/kv \
        --config.runtime.nics.snic_bytes_per_s=1e12 --config.runtime.nics.cnic_bytes_per_s=1e12

The driver (global scheduler service) runs where the command runs and listens on that host's address with
an auth key; each actor builds the model, opens the shared store, starts one transport endpoint per engine
(`config.transport`: "tcp", or "rdma" whose control channel is a TCP endpoint) bound to its host's address
with a shared secret (peers prove it at connect), and runs the same `EngineGroup` as the local launcher.
Actors are spread over the cluster's hosts (`SPREAD`), one per node of the config; give hosts a custom
resource (`ray start --resources='{"dualpath_node": 1}'`) and set `RAY_NODE_RESOURCE=dualpath_node` to place
exactly one actor per such host. With real NICs set the NIC caps to unpaced values (as above): pacing only
emulates NIC ratios on one machine.

RDMA (`--config.runtime.transport=rdma`, `pip install -e ".[rdma]"` on every host): the driver's host is
checked for pyverbs and an RDMA device (and `config.rdma`'s device, port and GID index) before anything starts;
an actor whose host lacks them, or whose NIC has another name, a port that is not ACTIVE or no GID at that index,
raises at start with the reason (in the Ray log) and the run fails naming that node. Every host uses the same
`config.rdma` settings.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Sequence

from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.control import ControlServer, SocketControlClient
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

    def run(self, spec: GroupSpec, cfg: RuntimeConfig, control_address, authkey: bytes, secret: str) -> str:
        import ray

        from dualpath_jax.runtime.launcher import (
            build_batcher_factory,
            enable_compilation_cache,
            endpoint_spec,
            open_store,
        )
        from dualpath_jax.runtime.model_ops import ModelOps
        from dualpath_jax.runtime.node import EngineGroup, block_layout
        from dualpath_jax.traffic import TrafficManager
        from transport import make_transport

        enable_compilation_cache()
        host = ray.util.get_node_ip_address()
        ops = ModelOps.of_config(cfg)
        store = open_store(cfg, block_layout(cfg, ops))
        control = SocketControlClient(control_address, authkey)

        def transport(name, pacer):  # "tcp" or "rdma" (whose control channel is a TCP endpoint: same host, secret)
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

    def start(self, groups: Sequence[GroupSpec], service) -> None:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=True)
        multi_host = len({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}) > 1
        host = ray.util.get_node_ip_address() if multi_host else "127.0.0.1"
        authkey = secrets.token_bytes(16)
        self.server = ControlServer(service.fetch, authkey, host=host)
        secret = secrets.token_hex(16)
        resource = os.environ.get("RAY_NODE_RESOURCE")
        options = {"num_cpus": self.num_cpus, "scheduling_strategy": "SPREAD"}
        if resource:
            options["resources"] = {resource: 1}
        actor_cls = ray.remote(_RayNode)
        for g in groups:
            actor = actor_cls.options(**options).remote()
            self.actors[g.node_id] = actor
            self.refs[g.node_id] = actor.run.remote(g, self.cfg, self.server.address, authkey, secret)

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
