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
    metrics.write_atomically(path, lambda tmp: _write_csv_to(tmp, header, rows))


def _write_csv_to(path: str, header: list[str], rows) -> None:
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
    """Write summary.json, turns.csv, links.csv (and plot.png) under `output_dir`; returns their paths. Each file is
    written beside its name and renamed onto it (`metrics.write_atomically`): a run killed while writing leaves the
    earlier file whole, never a torn one."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {}
    stats = {k: v for k, v in result.stats.items() if k != "link_totals"}
    summary = {"summary": result.summary, "stats": stats, "link_totals": result.stats["link_totals"], "config": config}
    # every field of the policy's Config it ran with (`SimResult.policy_config`: alpha / beta filled from the cluster, a
    # policy's defaults; the config holds the kwargs given only), as the runtime's results.json policy_config
    summary["policy_config"] = getattr(result, "policy_config", None)
    p = os.path.join(output_dir, "summary.json")
    summary = metrics.json_safe(summary)

    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, default=str)

    metrics.write_atomically(p, dump)
    paths["summary"] = p
    p = os.path.join(output_dir, "turns.csv")
    fields = [fl.name for fl in dataclasses.fields(metrics.TurnRecord)]  # the header even when no turn arrived
    # one C-level tuple per turn, from the simulator's columns (metrics.TurnTable) without making its records
    recs = result.records
    write_csv(
        p, fields, recs.rows() if isinstance(recs, metrics.TurnTable) else map(operator.attrgetter(*fields), recs)
    )
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
    try:
        drawn = plot and plot_result(result, p, name=config.get("name"))
    except MemoryError:  # (under `ulimit -v`: the results above written, run.json still to come; it was lost)
        log.warning("plot.png not drawn: out of memory while drawing it (%s)", address_space_note() or "no RLIMIT_AS")
        drawn = None
    if drawn:
        paths["plot"] = p
    elif os.path.exists(p):  # an earlier run's plot would pass for this one's
        os.remove(p)
        log.info("removed %s: an earlier run's plot (none was drawn for this one)", p)
    return paths


def address_space_note() -> str:
    """ "the address-space limit (RLIMIT_AS, ulimit -v) is N MB" where this process has one, else "" (a MemoryError
    names no reason: `str(MemoryError())` is empty)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return (
        "" if soft == resource.RLIM_INFINITY else f"the address-space limit (RLIMIT_AS, ulimit -v) is {soft >> 20} MB"
    )


def plot_result(result: SimResult, path: str, name: str | None = None) -> str | None:
    """Storage-NIC traffic over time per node (PE / DE in its label; past `_MAX_LINK_LINES` nodes, each role's mean
    over its nodes and its busiest node's), and the TTFT CDF (online: the SLO's TTFT bound dashed), under a title
    naming the config (`name`), mode, agents and JCT; None (logged) without matplotlib (the `plot` extra)."""
    try:
        import matplotlib
    except ImportError:
        log.info("matplotlib is not installed: skipping %s (pip install -e '.[plot]')", path)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    c = getattr(result, "config", None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    per_link: dict[str, dict[float, list[float]]] = {}  # link -> t0 -> [GB/s, t1]
    for s in result.links:
        if s.link.startswith("snic/"):
            d = per_link.setdefault(s.link, {})
            v = d.setdefault(s.t0, [0.0, s.t1])
            v[0] += s.nbytes / max(s.t1 - s.t0, 1e-9) / 1e9
    # node order, numbers compared as numbers ("snic/node2" before "snic/node10"); any other name sorts too (a
    # per-class "snic/node2/high" was int("2/high"): ValueError after the run)
    links = sorted(per_link, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])
    series = {link: _with_idle_buckets(per_link[link]) for link in links}
    if len(links) > _MAX_LINK_LINES:  # (48P96D: 144 lines and a legend over the whole panel)
        _plot_link_roles(ax1, series, c, np)
    else:
        for link in links:
            ax1.plot(*series[link], label=link, lw=0.8)
    ax1.set_xlabel("time (s)")
    ax1.set_ylabel("storage NIC traffic (GB/s)")
    ax1.set_ylim(bottom=0)
    if per_link:  # none when nothing was read from storage (oracle): no legend, no matplotlib warning
        ax1.set_ylim(top=ax1.get_ylim()[1] * 1.3)  # (room for the legend above the lines)
        # (the legend says PE / DE; each line keeps its link's name)
        ax1.legend(ax1.lines, [_link_label(line.get_label(), c) for line in ax1.lines], fontsize=7, ncol=2,
                   loc="upper right")  # fmt: skip
    else:
        why = " (oracle: I/O free)" if c is not None and c.cluster.io_free else ""
        _no_data(ax1, f"no storage-NIC traffic{why}")
    first = metrics.column(result.records, "first_token")  # (column-wise: no record made per turn)
    has = ~np.isnan(first)
    ttft = np.sort(first[has] - metrics.column(result.records, "arrival")[has])
    if ttft.size:
        ax2.plot(ttft, np.arange(1, ttft.size + 1) / ttft.size)
        log_x = ttft[0] > 0  # (a log axis drops a TTFT of 0)
        if log_x:
            ax2.set_xscale("log")
        if c is not None and c.workload.kind != "offline" and math.isfinite(c.slo_ttft_s):
            slo = f"SLO: TTFT p{c.slo_percentile:g} <= {c.slo_ttft_s:g} s"
            ax2.axvline(c.slo_ttft_s, color="tab:red", ls="--", lw=0.8, label=slo)
            ax2.legend(fontsize=7, loc="lower right")
        if log_x:
            plain_log_ticks(ax2)
    else:
        ax2.set_xscale("log")
        _no_data(ax2, "no turn got its first token")
    ax2.set_xlabel("TTFT (s)")
    ax2.set_ylabel("CDF")
    ax2.set_ylim(0, 1.02)
    fig.suptitle(_plot_title(result, name), fontsize=10)
    fig.tight_layout()
    # (written beside `path`, then renamed: the temporary name has no .png suffix, hence the format)
    metrics.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


# More storage-NIC links than this: plot.png draws each role's mean and busiest node, not a line per node
_MAX_LINK_LINES = 8


def _with_idle_buckets(d: dict[float, list[float]]) -> tuple[list[float], list[float]]:
    """One link's (times, GB/s) with a 0 where it moved nothing (links.csv has no row for an idle bucket: the line
    ran straight from the last busy bucket to the next, drawing traffic where there was none)."""
    xs: list[float] = []
    ys: list[float] = []
    prev_end = 0.0
    for t in sorted(d):
        rate, t1 = d[t]
        if xs and t > prev_end + 1e-9:  # idle from the bucket after the last busy one to the one before t
            xs += sorted({prev_end, max(prev_end, t - (t1 - t))})
            ys += [0.0] * (len(xs) - len(ys))
        xs.append(t)
        ys.append(rate)
        prev_end = t1
    return xs, ys


def _plot_link_roles(ax, series: dict, c, np) -> None:
    """Each role's storage-NIC traffic: the mean over its nodes (solid) and its busiest node's (dashed), at every
    time any of its nodes has a bucket."""
    roles: dict[str, list[str]] = {}
    for link in series:
        label = _link_label(link, c)  # (a per-class link, snic/node2/high, is not a node of its own)
        whole = re.fullmatch(r"snic/node\d+", link) and label.endswith(("(PE)", "(DE)"))
        roles.setdefault(f"{label[-3:-1]} nodes" if whole else "other links", []).append(link)
    for role, links in roles.items():
        ts = np.unique(np.concatenate([series[k][0] for k in links]))
        ys = np.array([np.interp(ts, *series[k], left=0.0, right=0.0) for k in links])  # [links, times]
        line = ax.plot(ts, ys.mean(axis=0), lw=0.9, label=f"{role} ({len(links)}): mean")[0]
        ax.plot(ts, ys.max(axis=0), lw=0.6, ls="--", color=line.get_color(), label=f"{role}: busiest")


def plain_log_ticks(ax, axis: str = "x") -> None:
    """Plain numbers (0.2, 0.5, 1, 2) at 1-2-5 steps on a log axis spanning few decades: matplotlib labelled its minor
    ticks there as 2x10^0, 3x10^0, 4x10^0, 6x10^0, overlapping one another. Call after the data are drawn."""
    from matplotlib import ticker

    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    decades = math.log10(hi / lo) if 0 < lo < hi else math.inf
    subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
    if decades < 0.5:
        subs = tuple(range(1, 10))
    a = ax.xaxis if axis == "x" else ax.yaxis
    a.set_major_locator(ticker.LogLocator(base=10.0, subs=subs))
    a.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(ticker.NullFormatter())


def _no_data(ax, text: str) -> None:
    """A panel with nothing to draw says so (it was a blank frame)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="gray")


def _plot_title(result: SimResult, name: str | None) -> str:
    """plot.png's title: `sim_tiny dualpath, 16 agents offline: JCT 43 s` (online: APS and the SLO attainment); the
    oracle and layerwise modes say so (their titles read as dualpath's and basic's)."""
    c = getattr(result, "config", None)
    mode = None
    if c is not None:  # (the modes oracle and layerwise run dualpath and basic: say which)
        mode = c.policy + (" oracle (I/O free)" if c.cluster.io_free else "")
        mode += " + layerwise prefill" if c.policy == "basic" and c.cluster.layerwise else ""
    head = " ".join(x for x in (name, mode) if x) or "simulation"
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
