"""Summary statistics of a workload (any list of trajectories): turns, context, append, gen, hit rate.

Definitions (the ones PAPER.md Table 2 appears to use):
  - turns: turns per trajectory (mean over trajectories);
  - append / gen: mean over all turns (pooled);
  - total tokens: final context (last prompt + its generation) per trajectory, mean over trajectories;
  - context: prompt tokens of a turn (what it attends to), mean over all turns (pooled);
  - hit rate: sum of hit tokens (`Trajectory.turn_shapes`: whole blocks of the earlier context's stored KV, which
    lacks the previous turn's last generated token, leaving at least one prompt token to prefill, as the runtime
    and the simulator count them) / sum of prompt tokens;
  - hit rate across trajectories (turns with block hashes, a trace's): the same with one store shared by every
    trajectory, of unbounded capacity, holding the whole hash blocks of every prompt that arrived strictly earlier
    (at arrival_time + arrival_offset_s): the most a turn can hit, as the simulator counts it
    (`workload.shared_prefix_hits`: its leading blocks found there, in whole blocks, leaving one token to prefill;
    its own context where that is more); None without hashes;
  - gap: mean of the gaps between consecutive turns (a trajectory's last turn has no next turn: its gap is
    never used by the arrival models, so it is left out; 0 when no trajectory has two turns).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from dualpath_jax.workloads.types import Trajectory, check_block_size


@dataclasses.dataclass(frozen=True)
class WorkloadStats:
    n_trajectories: int
    n_turns: int
    mean_turns: float
    mean_append: float
    mean_gen: float
    mean_total: float
    mean_context: float
    hit_rate: float
    block_size: int
    p50_context: float
    p90_context: float
    max_context: int
    p50_append: float
    p90_append: float
    mean_gap_s: float
    shared_hit_rate: float | None = None

    def rows(self) -> list[tuple[str, str]]:
        """(name, formatted value) pairs for printing."""
        return [
            ("trajectories", f"{self.n_trajectories:,}"),
            ("turns (total)", f"{self.n_turns:,}"),
            ("turns / trajectory", f"{self.mean_turns:,.1f}"),
            ("append (mean)", f"{self.mean_append:,.1f}"),
            ("append (p50 / p90)", f"{self.p50_append:,.0f} / {self.p90_append:,.0f}"),
            ("gen (mean)", f"{self.mean_gen:,.1f}"),
            ("total tokens (mean)", f"{self.mean_total:,.0f}"),
            ("context (mean)", f"{self.mean_context:,.0f}"),
            (
                "context (p50 / p90 / max)",
                f"{self.p50_context:,.0f} / {self.p90_context:,.0f} / {self.max_context:,}",
            ),
            (f"hit rate (block {self.block_size})", f"{100 * self.hit_rate:.2f}%"),
            *(
                []
                if self.shared_hit_rate is None
                else [(f"hit rate across trajectories (block {self.block_size})", f"{100 * self.shared_hit_rate:.2f}%")]
            ),
            ("gap between turns (mean s)", f"{self.mean_gap_s:.2f}"),
        ]


def summarize(trajectories: Sequence[Trajectory], block_size: int = 64) -> WorkloadStats:
    """Statistics of `trajectories` (see the module docstring); hits counted in whole `block_size` blocks."""
    check_block_size(block_size)  # (64.5 counted half tokens as hits, True 1-token blocks: a wrong hit rate)
    trajs = [t for t in trajectories if len(t.turns)]
    if not trajs:
        raise ValueError("no trajectory with at least one turn to summarize")
    prompts, hits, appends, gens, gaps, totals, nturns = [], [], [], [], [], [], []
    for t in trajs:
        shapes = t.turn_shapes(block_size)
        for (prompt, hit, gen), turn in zip(shapes, t.turns, strict=True):
            prompts.append(prompt)
            hits.append(hit)
            appends.append(turn.append_tokens)
            gens.append(gen)
        gaps.extend(turn.gap_s for turn in t.turns[:-1])  # (the last turn's gap precedes no turn)
        totals.append(shapes[-1][0] + shapes[-1][2])
        nturns.append(len(shapes))
    p = np.asarray(prompts, dtype=np.float64)
    a = np.asarray(appends, dtype=np.float64)
    return WorkloadStats(
        n_trajectories=len(trajs),
        n_turns=len(p),
        mean_turns=float(np.mean(nturns)),
        mean_append=float(a.mean()),
        mean_gen=float(np.mean(gens)),
        mean_total=float(np.mean(totals)),
        mean_context=float(p.mean()),
        hit_rate=float(np.sum(hits) / p.sum()) if p.sum() > 0 else 0.0,
        block_size=block_size,
        p50_context=float(np.percentile(p, 50)),
        p90_context=float(np.percentile(p, 90)),
        max_context=int(p.max()),
        p50_append=float(np.percentile(a, 50)),
        p90_append=float(np.percentile(a, 90)),
        mean_gap_s=float(np.mean(gaps)) if gaps else 0.0,
        shared_hit_rate=shared_hit_rate(trajs, block_size),
    )


def shared_hit_rate(trajectories: Sequence[Trajectory], block_size: int = 64) -> float | None:
    """The hit rate across trajectories (module docstring); None where no turn has block hashes."""
    check_block_size(block_size)
    turns = []  # (arrival, prompt, own hit, turn)
    for t in trajectories:
        for (prompt, hit, _), turn in zip(t.turn_shapes(block_size), t.turns, strict=True):
            turns.append((t.arrival_time + (turn.arrival_offset_s or 0.0), prompt, hit, turn))
    if not any(turn.block_hashes is not None for *_, turn in turns):
        return None
    turns.sort(key=lambda x: x[0])
    stored: set = set()
    hits = prompts = 0
    i = 0
    while i < len(turns):
        j = i
        while j < len(turns) and turns[j][0] == turns[i][0]:  # (turns arriving together do not see each other's)
            j += 1
        for _, prompt, hit, turn in turns[i:j]:  # (the simulator's count: `Turn.stored_prefix_tokens`)
            hits += max(hit, turn.stored_prefix_tokens(stored, prompt, block_size))
            prompts += prompt
        for _, prompt, _, turn in turns[i:j]:
            stored.update(turn.prompt_block_hashes(prompt))
        i = j
    return hits / prompts if prompts else 0.0
