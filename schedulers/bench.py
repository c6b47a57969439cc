"""Benchmark: the cost of one scheduling fetch at paper scale, and the read-queue balance it leaves.

    python -m schedulers.bench                 # 48P96D nodes x 8 GPUs = 1,152 engines, 5,000 waiting
    python -m schedulers.bench --pe_nodes=2 --de_nodes=4 --queue=2000

Per policy: ms per fetch (one PE group fetching, as the paper's engines do, and a global fetch with
fetching_node=None), µs per placed request, and after draining the queue group by group (each fetch
taking at most g requests) the storage-NIC balance: max/avg over all nodes of the hit tokens queued for
reads, the starting queues included (1.0 = even; PE-only reads leave the DE nodes' SNICs idle). This is a
static proxy (no reads complete meanwhile); the simulator measures the real per-link traffic. `basic` (PE-side reads only) is the
baseline measured in the same run. Requests are near the 64K dataset's shape (mean context 32,721, append 429):
lognormal context (mean ~30.5K; hit: its whole 64-token blocks) and append (mean ~446), gen 176.
Plain Python, one core; numbers vary with machine load.
"""

from __future__ import annotations

import random
import statistics
import time

from absl import app, flags

from schedulers import ClusterSnapshot, EngineState, NodeState, PendingRequest, make_policy
from schedulers.cost_model import CostModel
from schedulers.policies import DualPathConfig


def build(pe_nodes: int, de_nodes: int, g: int, queue: int, seed: int):
    rng = random.Random(seed)
    engines, nodes = {}, {}
    eid = 0
    for n in range(pe_nodes + de_nodes):
        role = "prefill" if n < pe_nodes else "decode"
        nodes[n] = NodeState(n, role, read_queue_tokens=rng.randrange(0, 2_000_000))
        for _ in range(g):
            engines[eid] = EngineState(
                eid,
                role,
                n,
                seq=rng.randrange(0, 30),
                tok=rng.randrange(0, 1_000_000),
                free_hbm_tokens=rng.randrange(2_000_000, 6_000_000) if role == "decode" else 0,
            )
            eid += 1
    reqs = []
    for i in range(queue):
        context = int(rng.lognormvariate(10.2, 0.5))
        append = max(1, int(rng.lognormvariate(5.6, 1.0)))
        reqs.append(PendingRequest(i, i, 1, context + append, (context // 64) * 64, 176))
    return ClusterSnapshot(0.0, engines, nodes), reqs


def apply(snap: ClusterSnapshot, queue, assignments):
    """What a runner would report at the next fetch: loads of the placed requests added."""
    by_id = {r.request_id: r for r in queue}
    for a in assignments:
        r = by_id[a.request_id]
        pe, de = snap.engines[a.prefill_engine], snap.engines[a.decode_engine]
        pe.tok += r.prompt_tokens
        pe.seq += 1
        de.tok += r.total_tokens
        de.seq += 1
        de.free_hbm_tokens -= r.total_tokens
        de_hit = round(r.hit_tokens * a.de_read_fraction)
        snap.nodes[pe.node_id].read_queue_tokens += r.hit_tokens - de_hit
        snap.nodes[de.node_id].read_queue_tokens += de_hit
    placed = {a.request_id for a in assignments}
    return [r for r in queue if r.request_id not in placed]


# bounded: 0 repeats was a StatisticsError after the setup, 0 nodes or engines a table of zeros
flags.DEFINE_integer("pe_nodes", 48, "prefill nodes", lower_bound=1)
flags.DEFINE_integer("de_nodes", 96, "decode nodes", lower_bound=1)
flags.DEFINE_integer("g", 8, "engines (GPUs) per node", lower_bound=1)
flags.DEFINE_integer("queue", 5000, "waiting requests", lower_bound=0)
flags.DEFINE_integer("repeats", 5, "timed fetches per policy (median reported)", lower_bound=1)
flags.DEFINE_integer("seed", 0, "seed of the synthetic cluster state and requests")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    args = flags.FLAGS

    cfg = DualPathConfig.from_cost_model(CostModel("ds660b", "h800"))
    print(
        f"{args.pe_nodes}P{args.de_nodes}D x {args.g} = {(args.pe_nodes + args.de_nodes) * args.g} engines, "
        f"{args.queue} waiting; alpha={cfg.alpha_tokens:,} beta={cfg.beta_tokens:,} tokens (DS 660B, H800)"
    )
    header = f"{'policy':<12}{'group fetch ms':>16}{'placed':>8}{'us/req':>8}{'global fetch ms':>17}{'placed':>8}"
    print(header + f"{'SNIC max/avg':>14}")
    for name in ["basic", "round_robin", "random", "dualpath", "de_only", "split"]:
        kw = {"config": cfg} if name in ("dualpath", "de_only", "split") else {}
        policy = make_policy(name, **kw)
        snap, queue = build(args.pe_nodes, args.de_nodes, args.g, args.queue, args.seed)
        times_g, times_all = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out_g = policy.schedule(snap, queue, fetching_node=0)
            times_g.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out_all = policy.schedule(snap, queue, fetching_node=None)
            times_all.append(time.perf_counter() - t0)
        tg, ta = statistics.median(times_g), statistics.median(times_all)
        # drain: PE groups fetch in turn, each taking at most one request per engine (what a group with
        # free engines asks for), their placements applied, until nothing more is placed
        pe_nodes = [n for n in snap.nodes if snap.nodes[n].role == "prefill"]
        stalled = 0
        k = 0
        while queue and stalled < len(pe_nodes):
            out = policy.schedule(snap, queue[: args.g], fetching_node=pe_nodes[k % len(pe_nodes)])
            queue = apply(snap, queue, out)
            stalled = 0 if out else stalled + 1
            k += 1
        final = [n.read_queue_tokens for n in snap.nodes.values()]
        mean = sum(final) / len(final)
        balance = max(final) / mean if mean else float("nan")
        us = 1e6 * tg / max(1, len(out_g))
        print(f"{name:<12}{1e3 * tg:>16.2f}{len(out_g):>8}{us:>8.1f}{1e3 * ta:>17.2f}{len(out_all):>8}{balance:>14.2f}")


if __name__ == "__main__":
    app.run(main)
