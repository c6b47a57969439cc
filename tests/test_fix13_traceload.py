"""Fast loading of the real traces (fix13 traceload): the loaders' C-level fast paths give the same trajectories, and
the same error for the same request, as the element-wise checks they skip.

The code below the line "FROZEN" is a verbatim copy of traces.py's validation before the fast paths (its `_hash_ids`,
`_BlockPositions`, `_ContextTracker`, `_turn`, `load_mooncake` and `_session_turns`, renamed `_old_*`); `_old_loader`
patches it into the module, so the old loader runs on the same files as the new one."""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from dualpath_jax.checks import is_int
from dualpath_jax.workloads import traces
from dualpath_jax.workloads.traces import (
    _NAMES,
    MOONCAKE_BLOCK,
    TRACES_ENV,
    TraceFormatError,
    _arrival,
    _check_count,
    _int_field,
    _mooncake_rows,
    _num_field,
    load_trace,
    resolve_trace_path,
    traces_dir,
)
from dualpath_jax.workloads.types import Trajectory, Turn

KVCACHE = "kvcache_tester"
needs_traces = pytest.mark.skipif(
    not (traces_dir() / KVCACHE).is_dir(),
    reason=f"real traces not found at {traces_dir()} (set ${TRACES_ENV})",
)


@contextlib.contextmanager
def _old_loader():
    """traces.load_trace & co. with the validation of before the fast paths."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(traces, "load_mooncake", _old_load_mooncake)
        mp.setattr(traces, "_session_turns", _old_session_turns)
        mp.setattr(traces, "_BlockPositions", _OldBlockPositions)
        yield


def _load_both(path, **kw) -> tuple[Any, Any]:
    """(old, new) outcome of load_trace(path): the trajectories, or the error as (type, message)."""

    def outcome():
        try:
            return load_trace(path, **kw)
        except Exception as e:  # noqa: BLE001 - any error must be the same one
            return type(e), str(e)

    with _old_loader():
        old = outcome()
    return old, outcome()


def _assert_same(old: list[Trajectory], new: list[Trajectory]) -> None:
    """Field by field, the hash arrays included."""
    assert len(new) == len(old)
    for a, b in zip(old, new, strict=True):
        assert (b.trajectory_id, b.arrival_time, b.source, b.num_turns) == (
            a.trajectory_id,
            a.arrival_time,
            a.source,
            a.num_turns,
        )
        for s, t in zip(a.turns, b.turns, strict=True):
            for f in ("append_tokens", "gen_tokens", "gap_s", "context_tokens", "arrival_offset_s", "hash_block_size"):
                assert getattr(t, f) == getattr(s, f), (a.source, f)
            assert t.append_token_ids is None and s.append_token_ids is None
            assert t.block_hashes.dtype == s.block_hashes.dtype == np.int64
            assert np.array_equal(t.block_hashes, s.block_hashes), (a.source, t.block_hashes, s.block_hashes)


def _check_same(path, **kw) -> None:
    old, new = _load_both(path, **kw)
    if isinstance(old, tuple):
        assert new == old
    else:
        assert not isinstance(new, tuple), new
        _assert_same(old, new)


# ------------------------------------------------------------------------------------- the real traces
def _kvcache_files() -> list:
    return sorted(f for f in (traces_dir() / KVCACHE).glob("*.json*") if f.name.endswith((".json", ".json.gz")))


@needs_traces
def test_real_kvcache_tester_subset_loads_as_before():
    """Every 16th session file, and trace_0014 (the one with a subagent), as one load."""
    files = _kvcache_files()
    pick = sorted({*files[::16], *(f for f in files if f.name.startswith("trace_0014"))})
    assert len(pick) >= 10
    with _old_loader():
        old = traces.load_kvcache_tester(pick)
    new = traces.load_kvcache_tester(pick)
    assert any("#" in t.source for t in new)  # a subagent is among them
    _assert_same(old, new)


@needs_traces
@pytest.mark.parametrize("name", ["mooncake_conversation_trace.jsonl.gz", "mooncake_synthetic_trace.jsonl.gz"])
def test_real_mooncake_traces_load_as_before(name):
    if not (traces_dir() / name).exists():
        pytest.skip(f"{name} not in {traces_dir()}")
    _check_same(name)


@pytest.mark.slow
@needs_traces
def test_real_kvcache_tester_whole_loads_as_before():
    _check_same(KVCACHE)


# ----------------------------------------------------------------------------------- damaged sessions
def _session(rng: random.Random, n_requests: int = 6, block: int = 4) -> dict:
    """A small kv-cache-tester session whose prompts mostly extend the previous one (as the real ones do), with small
    ids (0 and 1 among them, the values of false / true) and a subagent with ids of its own."""
    nxt = iter(range(rng.choice([0, 1]), 10**6))
    ids: list[int] = []
    reqs: list[dict] = []
    for i in range(n_requests):
        move = rng.random()
        if move < 0.6 or not ids:
            ids = ids + [next(nxt) for _ in range(rng.randint(1, 4))]
        elif move < 0.8:  # the agent dropped text: a shorter prefix, then new blocks
            ids = ids[: rng.randint(0, len(ids))] + [next(nxt) for _ in range(rng.randint(1, 3))]
        # else: the same prompt again
        extra = rng.randint(0, block - 1)
        reqs.append({"t": float(i), "type": rng.choice("ns"), "in": len(ids) * block + extra, "out": 7,
                     "hash_ids": list(ids), "think_time": 0.5})  # fmt: skip
        if i == 2:
            sub = [next(nxt) for _ in range(3)]
            reqs.append({"type": "subagent", "t": 1.5, "agent_id": "a", "requests": [
                {"t": 0.0, "type": "n", "in": 3 * block, "out": 2, "hash_ids": sub[:3]},
                {"t": 1.0, "type": "n", "in": 3 * block + 1, "out": 2, "hash_ids": sub[:3]},
            ]})  # fmt: skip
    return {"id": "s", "block_size": block, "requests": reqs}


def _prompts(doc: dict) -> list[dict]:
    """The 'n' / 's' requests of a session, in file order (subagents' included)."""
    out = []
    for r in doc["requests"]:
        if r["type"] == "subagent":
            out.extend(r["requests"])
        else:
            out.append(r)
    return out


def _damage(rng: random.Random, doc: dict) -> str:
    """One random damage to the hash ids of one random request; its name."""
    r = rng.choice([r for r in _prompts(doc) if isinstance(r.get("hash_ids"), list) and r["hash_ids"]] or [{}])
    if not r:  # (every request damaged past this already)
        return "none left"
    ids = r["hash_ids"]
    k = rng.randrange(len(ids))
    kind = rng.choice(
        [
            "float",
            "bool",
            "big",
            "small",
            "str",
            "none",
            "repeat",
            "moved",
            "count",
            "not list",
            "missing",
            "swap",
            "repeat",
            "moved",
        ]
    )
    if kind == "float" and type(ids[k]) is int:
        ids[k] = float(ids[k])  # equal to the int: a prefix compare alone would pass it
    elif kind == "bool":
        ids[k] = rng.choice([True, False])
    elif kind == "big":
        ids[k] = rng.choice([2**63, 2**64 + 5, 10**30])
    elif kind == "small":
        ids[k] = -(2**63) - 1
    elif kind == "str":
        ids[k] = str(ids[k])
    elif kind == "none":
        ids[k] = None
    elif kind == "repeat" and k:  # an id repeated within the prompt
        ids[k] = ids[rng.randrange(k)]
    elif kind == "moved":  # an id of another request at another block
        other = rng.choice(_prompts(doc)).get("hash_ids")
        if isinstance(other, list) and other:
            ids[k] = rng.choice(other)
    elif kind == "count":
        if rng.random() < 0.5:
            ids.append(10**5 + k)
        else:
            ids.pop()
    elif kind == "not list":
        r["hash_ids"] = rng.choice([{"0": 1}, "1,2", 5, None])
    elif kind == "missing":
        del r["hash_ids"]
    elif kind == "swap" and len(ids) > 1:
        j = rng.randrange(len(ids))
        ids[k], ids[j] = ids[j], ids[k]
    return kind


def _same_outcome(path, where) -> bool:
    """Old and new loads of `path` end alike: the same error (type and message; True) or the same trajectories."""
    old, new = _load_both(path)
    if isinstance(old, tuple):
        assert new == old, where
        return True
    assert not isinstance(new, tuple), (where, new)
    _assert_same(old, new)
    return False


def test_damaged_sessions_give_the_same_error_as_before(tmp_path):
    """300 random sessions with 0 to 3 damaged requests (an earlier and a later one damaged too): the same error
    (type and message), or the same trajectories."""
    rng = random.Random(13)
    errors = 0
    for case in range(300):
        doc = _session(rng, n_requests=rng.randint(1, 8))
        kinds = [_damage(rng, doc) for _ in range(rng.choice([0, 1, 1, 2, 3]))]
        path = tmp_path / f"trace_{case:03d}.json"
        path.write_text(json.dumps(doc))
        errors += _same_outcome(path, (case, kinds))
    assert errors >= 150  # (most damage is an error; the rest must load the same)


def test_damaged_mooncake_lines_give_the_same_error_as_before(tmp_path):
    """The same damage in a Mooncake file (one id scope for the whole file, a partial last block)."""
    rng = random.Random(31)
    errors = 0
    for case in range(150):
        doc = _session(rng, n_requests=rng.randint(1, 8), block=MOONCAKE_BLOCK)
        kinds = [_damage(rng, doc) for _ in range(rng.choice([0, 1, 1, 2]))]
        lines = []
        for i, r in enumerate(_prompts(doc)):
            n = r["in"] // doc["block_size"]  # (the ids before the damage; a partial last block here)
            row = {
                "timestamp": 10 * i,
                "input_length": n * MOONCAKE_BLOCK - r["in"] % MOONCAKE_BLOCK,
                "output_length": 3,
            }
            if "hash_ids" in r:
                row["hash_ids"] = r["hash_ids"]
            lines.append(json.dumps(row))
        path = tmp_path / f"trace_{case:03d}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        errors += _same_outcome(path, (case, kinds))
    assert errors >= 50


def test_ids_of_an_int_subclass_take_the_element_wise_checks():
    """A list built in Python may hold an int subclass (JSON never does): the fast path leaves it to `_hash_ids`,
    which accepts it, as before."""

    class Id(int):
        pass

    positions = traces._BlockPositions()
    obj = {"h": [Id(3), Id(4)]}
    ids, shared = traces._prompt_ids(obj, "h", "w", 8, 4, False, "in", positions, [3, 9])
    assert ids == [3, 4] and shared == 1 and positions.at == {3: 0, 4: 1}
    with pytest.raises(TraceFormatError, match=r"w: hash id 4 at block 0 was at block 1 before"):
        traces._prompt_ids({"h": [Id(4)]}, "h", "w", 4, 4, False, "in", positions, [])


# ----------------------------------------------------------------------------------------------- FROZEN
# traces.py's validation before the fast paths (verbatim, renamed); the old loader of _old_loader().


def _old_hash_ids(
    obj: dict, key: str, where: str, input_len: int, block: int, partial_block: bool, len_key: str = "input_length"
) -> list[int]:
    """The hash ids of a prompt (field `len_key` tokens): one per block, the last partial block included iff
    `partial_block`."""
    if key not in obj:
        raise TraceFormatError(f"{where}: missing field {key!r}")
    ids = obj[key]
    if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
        raise TraceFormatError(f"{where}: field {key!r} must be a list of integers")
    if ids and not (-(2**63) <= min(ids) and max(ids) < 2**63):
        raise TraceFormatError(f"{where}: field {key!r} holds an id outside the int64 range")
    expect = -(-input_len // block) if partial_block else input_len // block
    if len(ids) != expect:
        rule = "ceil" if partial_block else "floor"
        what = "full " if not partial_block else ""
        raise TraceFormatError(
            f"{where}: {len(ids)} hash ids for {input_len} input tokens; expected {rule}({input_len}/{block}) = {expect} "
            f"(field {key!r}: one id per {what}{block}-token block of field {len_key!r})"
        )
    return ids


class _OldBlockPositions:
    """Where each hash id of one id scope (a Mooncake file, a kv-cache-tester session) sits in its prompts.

    A prefix-chained id names one block *and everything before it*, so it has one block index wherever it occurs:
    an id repeated within a prompt, or at another block index than before, is a damaged trace (it was kept, and
    it matched sessions and counted re-read blocks wrongly)."""

    def __init__(self):
        self.at: dict[int, int] = {}

    def check(self, ids: Sequence[int], where: str) -> None:
        at = self.at
        for k, x in enumerate(ids):
            j = at.setdefault(x, k)
            if j != k:
                raise TraceFormatError(
                    f"{where}: hash id {x} at block {k} was at block {j} before (a prefix-chained id names "
                    "one block position)"
                )


class _OldContextTracker:
    """Re-read context of successive turns of one trajectory (see the module docstring)."""

    def __init__(self, block: int):
        self.block = block
        self.seen: set[int] = set()
        self.prev_full: int | None = None  # id of the previous prompt's last full block
        self.prev_context = 0  # previous prompt + generation

    def next(self, ids: Sequence[int], prompt: int, gen: int) -> int:
        lead = 0
        for x in ids:
            if x not in self.seen:
                break
            lead += 1
        lead = min(lead, prompt // self.block)  # only whole blocks are stored
        extends_prev = self.prev_full is None or self.prev_full in ids[:lead]
        if self.prev_context and extends_prev and prompt >= self.prev_context:
            context = self.prev_context
        else:
            context = lead * self.block
        context = max(0, min(context, prompt - 1))
        self.seen.update(ids)
        n_full = prompt // self.block
        self.prev_full = ids[n_full - 1] if n_full else None
        self.prev_context = prompt + gen
        return context


def _old_turn(
    ids: Sequence[int], prompt: int, gen: int, context: int, offset: float, gap: float, block: int, salt: int
) -> Turn:
    hashes = np.asarray(ids, dtype=np.int64)
    if salt:
        hashes = hashes + (np.int64(salt) << np.int64(32))
    return Turn(
        append_tokens=prompt - context,
        gen_tokens=gen,
        gap_s=gap,
        context_tokens=context,
        arrival_offset_s=offset,
        block_hashes=hashes,
        hash_block_size=block,
    )


def _old_load_mooncake(
    path: str | os.PathLike,
    max_requests: int | None = None,
    min_shared_blocks: int = 2,
    block_size: int = MOONCAKE_BLOCK,
) -> list[Trajectory]:
    """Sessions of a Mooncake JSONL trace as trajectories (its first `max_requests` requests if given)."""
    _check_count("max_requests", max_requests)
    # block -1 would be the last one (the search runs backwards); a block of 512.5 tokens blamed every line's
    # hash ids ("expected ceil(600/512.5) = 2.0")
    if not (is_int(min_shared_blocks) and is_int(block_size)) or min_shared_blocks < 1 or block_size < 1:
        raise ValueError(
            f"min_shared_blocks and block_size must be >= 1 (ints), got {min_shared_blocks!r} and {block_size!r}"
        )
    p = resolve_trace_path(path)
    sessions: list[dict[str, Any]] = []  # {t0, turns, tracker}
    tails: dict[int, int] = {}  # last full block id of a session's latest prompt -> session index
    positions = _OldBlockPositions()
    prev_ts = -1.0
    for lineno, row in _mooncake_rows(p, max_requests):
        where = f"{p}:{lineno}"
        if "requests" in row and "timestamp" not in row:  # (it said only "missing field 'timestamp'")
            raise TraceFormatError(f"{where}: a kv-cache-tester session, not a Mooncake request; {_NAMES}")
        ts = _num_field(row, "timestamp", where) / 1000.0
        if ts < prev_ts:
            raise TraceFormatError(
                f"{where}: timestamp {ts * 1000:g} ms goes back in time (previous {prev_ts * 1000:g} ms)"
            )
        prev_ts = ts
        prompt = _int_field(row, "input_length", where, minimum=1)
        gen = _int_field(row, "output_length", where, minimum=0)
        ids = _old_hash_ids(row, "hash_ids", where, prompt, block_size, partial_block=True, len_key="input_length")
        positions.check(ids, where)
        sid = None
        for pos in range(len(ids) - 1, min_shared_blocks - 2, -1):
            s = tails.get(ids[pos])
            if s is not None:
                sid = s
                del tails[ids[pos]]
                break
        if sid is None:
            sid = len(sessions)
            sessions.append({"t0": ts, "turns": [], "tracker": _OldContextTracker(block_size), "line": lineno})
        sess = sessions[sid]
        context = sess["tracker"].next(ids, prompt, gen)
        sess["turns"].append(_old_turn(ids, prompt, gen, context, ts - sess["t0"], 0.0, block_size, 0))
        n_full = prompt // block_size
        if n_full >= min_shared_blocks:
            tails[ids[n_full - 1]] = sid
    if not sessions:
        raise TraceFormatError(f"{p}: no request in the trace")
    return [
        Trajectory(trajectory_id=i, turns=s["turns"], arrival_time=s["t0"], source=f"{p.name}:{s['line']}")
        for i, s in enumerate(sessions)
    ]


def _old_session_turns(
    requests: Any,
    where: str,
    block: int,
    salt: int,
    out: list[tuple[str, float, list[Turn]]],
    name: str,
    t0: float,
    positions: _OldBlockPositions,
) -> None:
    """Turns of one (sub)agent into `out` as (name, arrival, turns); subagents recurse and follow it.

    `t0` is the origin of this (sub)agent's `t` values (its subagents' `t` count from it too); the agent arrives
    with its first request (at t0 + its `t`), and its turns' offsets count from there."""
    if not isinstance(requests, list):
        raise TraceFormatError(f"{where}: 'requests' must be a list")
    slot = len(out)  # the agent itself goes before its subagents
    out.append((name, t0, []))
    rows = []
    for i, r in enumerate(requests):
        w = f"{where}: requests[{i}]"
        if not isinstance(r, dict):
            raise TraceFormatError(f"{w}: expected an object")
        if "type" not in r:  # (it said "unknown request type None")
            raise TraceFormatError(f"{w}: missing field 'type' (expected 'n', 's' or 'subagent')")
        kind = r["type"]
        if kind == "subagent":
            sub_t = _num_field(r, "t", w)
            sub_name = f"{name}#{r.get('agent_id', i)}"
            _old_session_turns(r.get("requests"), w, block, salt, out, sub_name, _arrival(t0, sub_t, w), positions)
            continue
        if kind not in ("n", "s"):
            raise TraceFormatError(f"{w}: unknown request type {kind!r} (expected 'n', 's' or 'subagent')")
        prompt = _int_field(r, "in", w, minimum=1)
        gen = _int_field(r, "out", w, minimum=0)
        ids = _old_hash_ids(r, "hash_ids", w, prompt, block, partial_block=False, len_key="in")
        positions.check(ids, w)
        rows.append((_num_field(r, "t", w), prompt, gen, ids, _num_field(r, "think_time", w, default=0.0), w))
    if not rows:
        del out[slot]
        return
    tracker = _OldContextTracker(block)
    turns = []
    # A first request at t > 0 arrived then, not at t0: TraceArrivals starts turn 0 at the agent's arrival_time
    # (turn 0 ran that much too early, and its offset t disagreed with the offset 0 of a Mooncake first turn).
    first_t = rows[0][0]
    for k, (t, prompt, gen, ids, _, w) in enumerate(rows):
        if k and t < rows[k - 1][0]:
            raise TraceFormatError(f"{w}: t={t} goes back in time (previous {rows[k - 1][0]})")
        _arrival(t0, t, w)  # the turn's trace time, arrival + offset, must be a number too
        gap = rows[k + 1][4] if k + 1 < len(rows) else 0.0  # think time before the next request
        context = tracker.next(ids, prompt, gen)
        turns.append(_old_turn(ids, prompt, gen, context, t - first_t, gap, block, salt))
    out[slot] = (name, _arrival(t0, first_t, rows[0][5]), turns)
