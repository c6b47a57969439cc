"""Write a simulation's results: summary JSON, per-turn CSV, per-link CSV, and a plot (matplotlib, lazy)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import operator
import os
import re

from dualpath_jax import metrics
from dualpath_jax.compiled import use
from dualpath_jax.sim.runner import SimResult

if use("dualpath_jax.sim._csvrows"):
    from dualpath_jax.sim._csvrows import write_rows as _write_rows_c
else:  # not built, DUALPATH_PURE_PYTHON, or older than _csvrows.pyx
    _write_rows_c = None

log = logging.getLogger(__name__)


def write_csv(path: str, header: list[str], rows) -> None:
    """Write `header` and `rows` (sequences of fields) as CSV in the excel dialect (UTF-8, "\\r\\n"): with the
    C writer where it is built (`_csvrows.pyx`, about 3x faster on the 3.3 M turns of a paper-scale run), else
    with `csv.writer`; both write the same bytes."""
    if _write_rows_c is not None:
        with open(path, "wb") as f:
            _write_rows_c(f, [header])
            _write_rows_c(f, rows)
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_results(result: SimResult, output_dir: str, config: dict, plot: bool = True) -> dict[str, str]:
    """Write summary.json, turns.csv, links.csv (and plot.png) under `output_dir`; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {}
    stats = {k: v for k, v in result.stats.items() if k != "link_totals"}
    summary = {"summary": result.summary, "stats": stats, "link_totals": result.stats["link_totals"], "config": config}
    # every field of the policy's Config it ran with (`SimResult.policy_config`: alpha / beta filled from the cluster, a
    # policy's defaults; the config holds the kwargs given only), as the runtime's results.json policy_config
    summary["policy_config"] = getattr(result, "policy_config", None)
    p = os.path.join(output_dir, "summary.json")
    with open(p, "w") as f:
        json.dump(metrics.json_safe(summary), f, indent=1, default=str)
    paths["summary"] = p
    p = os.path.join(output_dir, "turns.csv")
    fields = [fl.name for fl in dataclasses.fields(metrics.TurnRecord)]  # the header even when no turn arrived
    # one C-level tuple per turn
    write_csv(p, fields, map(operator.attrgetter(*fields), result.records))
    paths["turns"] = p
    p = os.path.join(output_dir, "links.csv")
    rows = list(map(operator.attrgetter("link", "t0", "t1", "nbytes"), result.links))
    # a link that moved nothing: one zero-byte row at t = 0, as the runtime's idle SNIC (without it, a storage-NIC
    # balance from links.csv alone left that node out of the mean: max/avg 1.0 where the summary has 2.0)
    seen = {r[0] for r in rows}
    rows += [(name, 0.0, 0.0, 0) for name in result.stats["link_totals"] if name not in seen]
    write_csv(p, ["link", "t0", "t1", "nbytes"], rows)
    paths["links"] = p
    p = os.path.join(output_dir, "plot.png")
    if plot and plot_result(result, p, name=config.get("name")):
        paths["plot"] = p
    elif os.path.exists(p):  # an earlier run's plot would pass for this one's
        os.remove(p)
        log.info("removed %s: an earlier run's plot (none was drawn for this one)", p)
    return paths


def plot_result(result: SimResult, path: str, name: str | None = None) -> str | None:
    """Storage-NIC traffic over time per node (PE / DE in its label), and the TTFT CDF, under a title naming the
    config (`name`), policy, agents and JCT (the plot said none of them); None (logged) without matplotlib (the
    `plot` extra)."""
    try:
        import matplotlib
    except ImportError:
        log.info("matplotlib is not installed: skipping %s (pip install -e '.[plot]')", path)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    per_link: dict[str, dict[float, float]] = {}
    for s in result.links:
        if s.link.startswith("snic/"):
            d = per_link.setdefault(s.link, {})
            d[s.t0] = d.get(s.t0, 0.0) + s.nbytes / max(s.t1 - s.t0, 1e-9) / 1e9
    # node order, numbers compared as numbers ("snic/node2" before "snic/node10"); any other name sorts too (a
    # per-class "snic/node2/high" was int("2/high"): ValueError after the run)
    for link in sorted(per_link, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]):
        d = per_link[link]
        ts = sorted(d)
        ax1.plot(ts, [d[t] for t in ts], label=link, lw=0.8)
    ax1.set_xlabel("time (s)")
    ax1.set_ylabel("storage NIC traffic (GB/s)")
    if per_link:  # none when nothing was read from storage (oracle): no legend, no matplotlib warning
        c = getattr(result, "config", None)  # (the legend says PE / DE; each line keeps its link's name)
        ax1.legend(ax1.lines, [_link_label(line.get_label(), c) for line in ax1.lines], fontsize=6, ncol=2)
    ttft = np.sort([r.ttft for r in result.records if not math.isnan(r.first_token)])
    if ttft.size:
        ax2.plot(ttft, np.arange(1, ttft.size + 1) / ttft.size)
    ax2.set_xscale("log")
    ax2.set_xlabel("TTFT (s)")
    ax2.set_ylabel("CDF")
    fig.suptitle(_plot_title(result, name), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_title(result: SimResult, name: str | None) -> str:
    """plot.png's title: `sim_tiny dualpath, 16 agents offline: JCT 43 s` (online: APS and the SLO attainment)."""
    c = getattr(result, "config", None)
    head = " ".join(x for x in (name, c.policy if c is not None else None) if x) or "simulation"
    jct = getattr(result, "summary", {}).get("jct_s", math.nan)
    jct = f"{jct:,.0f}" if jct >= 1000 else f"{jct:.3g}"  # (1,012 s, not 1e+03 s)
    if c is None:
        return f"{head}: JCT {jct} s"
    w = c.workload
    if w.kind == "offline":
        return f"{head}, {w.n_agents} agents offline ({w.dataset}): JCT {jct} s"
    att = result.summary.get("slo_attainment")
    slo = f", SLO attainment {att:.1%}" if att is not None and not math.isnan(att) else ""
    if w.kind == "online":
        return f"{head}, online {w.aps:g} APS for {w.duration_s:g} s ({w.dataset}){slo}"
    return f"{head}, trace {os.path.basename(w.trace_path)}{slo}"


def _link_label(link: str, c) -> str:
    """`snic/node0 (PE)`: the node's role (prefill nodes first, then decode: simulator._build)."""
    m = re.match(r"snic/node(\d+)", link)
    if c is None or m is None:
        return link
    return f"{link} ({'PE' if int(m.group(1)) < c.cluster.prefill_nodes else 'DE'})"
