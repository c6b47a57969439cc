"""Node processes inside the kernel-shaped network namespaces of `experiments/netns_cluster.sh` (Linux, root).

    experiments/netns_cluster.sh up 3 1 32 256        # 3 nodes x 1 engine; CNIC 256 Mbit/s = 32e6 B/s per engine
    python -m experiments.run --config.runtime.netns=true --config.runtime.nics.cnic_bytes_per_s=32e6
    experiments/netns_cluster.sh down

With `config.netns` (local launcher, TCP transport) node `n`'s process joins namespace `dpj-n<n>` as it starts
(`enter`, setns(2) before any of its threads exist), and engine `g` of the node binds its TCP endpoint to
`10.77.<n>.<g+1>`, that namespace's compute veth `cnic<g>`: KV between engines crosses real veths that the kernel
shapes (HTB: the transport's high stream, DSCP EF, 99%; its low stream, CS1, 1%; both may borrow the link). The
transports are then not paced in Python (their bytes are still recorded on the CNIC links, for the metrics); the
engines' own H2D / D2H copies, which cross no socket, stay paced by the traffic manager at `config.nics`' CNIC rate,
and so do storage reads (the local-directory store reads the local disk; the SNIC veths shape only a store reached
over the network). The driver's control channel is a Unix socket (a filesystem path reaches every namespace), and
the endpoints prove the run's secret at connect (non-loopback binds need one).

`unavailable_reason(cfg)` says what is missing (root, a namespace, an engine's address, a CNIC rate other than the
config's) before anything starts; `config.validate` raises it as a ConfigError.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys

NETNS_DIR = "/run/netns"  # where `ip netns add` puts the namespaces' handles
# Held (flock) by each netns run, shared, and by `netns_cluster.sh up` / `down`, exclusive: `down` refuses while a
# run uses the cluster (it deleted the veths under it), and a second run at once is warned that it shares the NICs
LOCK_PATH = os.environ.get("DUALPATH_NETNS_LOCK", "/run/dpj-netns.lock")
CLONE_NEWNET = 0x40000000
# The script as the README runs it from a checkout; installed as a wheel (another working directory), its installed
# path (setup.cfg's package_data): the errors named a file the user did not have there.
SCRIPT = "experiments/netns_cluster.sh"
if not os.path.isfile(SCRIPT):
    SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), SCRIPT)


def namespace(node_id: int) -> str:
    """The network namespace of node `node_id` (netns_cluster.sh's naming)."""
    return f"dpj-n{node_id}"


def cnic_host(node_id: int, g: int) -> str:
    """The compute-network address of engine `g` (0-based, within its node) of node `node_id`."""
    return f"10.77.{node_id}.{g + 1}"


def up_command(cfg) -> str:
    """The netns_cluster.sh line that makes the namespaces `cfg` needs (its CNIC rate in whole Mbit/s)."""
    c = cfg.cluster
    mbit = max(1, round(cfg.nics.cnic_bytes_per_s * 8 / 1e6))
    snic = max(1, round(cfg.nics.snic_bytes_per_s * 8 / 1e6))
    return f"{SCRIPT} up {c.prefill_nodes + c.decode_nodes} {c.engines_per_node} {snic} {mbit}"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _cnic_mbit(ns: str, dev: str) -> float | None:
    """The rate of the HTB root class on `dev` in namespace `ns`, in Mbit/s (None if it has none)."""
    out = subprocess.run(
        ["tc", "-n", ns, "class", "show", "dev", dev], capture_output=True, text=True, timeout=30
    ).stdout
    m = re.search(r"class htb 1:1 root rate (\d+(?:\.\d+)?)([KMG]?)bit", out)
    if not m:
        return None
    return float(m.group(1)) * {"": 1e-6, "K": 1e-3, "M": 1.0, "G": 1e3}[m.group(2)]


def unavailable_reason(cfg) -> str | None:
    """Why `cfg`'s nodes cannot run in the namespaces here (None: they can). Checks the platform and root, then for
    every node its namespace, for every engine its CNIC's address, and that the CNICs are shaped at
    `config.nics.cnic_bytes_per_s` (the rate the engines' own copies are paced at; within 1%)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "joining a network namespace needs root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip) and tc"
    c = cfg.cluster
    nodes = c.prefill_nodes + c.decode_nodes
    fix = f"make them with `{up_command(cfg)}` (after `{SCRIPT} down` if another cluster is up)"
    missing = [namespace(n) for n in range(nodes) if not os.path.exists(os.path.join(NETNS_DIR, namespace(n)))]
    if missing:
        return f"no network namespace {', '.join(missing)} for the config's {nodes} nodes: {fix}"
    want = cfg.nics.cnic_bytes_per_s * 8 / 1e6
    for n in range(nodes):
        ns = namespace(n)
        addrs = _ip("-n", ns, "-o", "-4", "addr", "show").stdout
        for g in range(c.engines_per_node):
            dev, host = f"cnic{g}", cnic_host(n, g)
            if not re.search(rf"\b{dev}\s+inet {re.escape(host)}/", addrs):
                return (
                    f"namespace {ns} has no {dev} with address {host} (engine {g} of node {n}; the cluster has "
                    f"fewer engines per node than config.cluster.engines_per_node={c.engines_per_node}): {fix}"
                )
            mbit = _cnic_mbit(ns, dev)
            if mbit is None:
                return f"{dev} of namespace {ns} has no HTB root class (not shaped by {SCRIPT}): {fix}"
            if abs(mbit - want) > 0.01 * want:
                return (
                    f"{dev} of namespace {ns} is shaped to {mbit:g} Mbit/s, but config.nics.cnic_bytes_per_s="
                    f"{cfg.nics.cnic_bytes_per_s:g} is {want:g} Mbit/s (the engines' own copies are paced at the "
                    f"config's rate): set --config.runtime.nics.cnic_bytes_per_s={mbit * 1e6 / 8:g}, or {fix}"
                )
    return None


class ClusterBusy(RuntimeError):
    """`netns_cluster.sh up` or `down` changes the cluster now (it holds the lock exclusively)."""


def hold_cluster(path: str | None = None) -> tuple[int | None, bool]:
    """Take the cluster's lock (`LOCK_PATH`) shared for this run's life: (its descriptor, to close at the run's end,
    or None where the file cannot be made or locked; whether another live run holds it too). Another run at once
    shares each engine's shaped CNIC with this one (each measures about half the rate its table states): warned here.
    `netns_cluster.sh up` / `down` in progress (the lock held exclusive): ClusterBusy."""
    import logging

    from dualpath_jax import flocks

    path = path or LOCK_PATH
    try:
        fd = flocks.open_lock_file(path)
    except OSError:  # (no /run, not root: the run checks the namespaces anyway, `unavailable_reason`)
        return None, False
    try:
        shared = flocks.hold_shared(fd, wait_for_exclusive=False)
    except BlockingIOError:
        os.close(fd)
        raise ClusterBusy(
            f"{SCRIPT} up or down is changing the network namespaces now (it holds {path}): wait for it, then run again"
        ) from None
    if shared is None:  # (a file system without flock)
        os.close(fd)
        return None, False
    if shared:
        logging.getLogger(__name__).warning(
            "another netns run uses the network namespaces now (it holds %s): the two share every engine's shaped "
            "CNIC, so each measures about half the bandwidth its config states; run one at a time to measure it",
            path,
        )
    return fd, shared


def enter(node_id: int) -> None:
    """Move the calling thread (the node process's main thread, before it starts any other) into node `node_id`'s
    network namespace: every socket it or its later threads open is then in that namespace (sockets already open,
    e.g. the pipe to the driver, stay where they were). setns(2) through libc: `os.setns` is Python 3.12+."""
    ns = namespace(node_id)
    path = os.path.join(NETNS_DIR, ns)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RuntimeError(f"node {node_id}: no network namespace {ns} ({path}); see {SCRIPT}") from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"node {node_id}: setns into {ns} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def endpoint_hosts(node_id: int, engine_ids) -> dict[int, str]:
    """engine id -> the address its endpoint binds to (engine_ids in the node's order)."""
    return {e: cnic_host(node_id, g) for g, e in enumerate(engine_ids)}
