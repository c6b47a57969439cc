"""Loaders for the real traces in ../shared/traces (see its README.md), into Trajectories (no jax).

Where the traces live: `$DUALPATH_TRACES` if set, else `<repo root>/../shared/traces`. A relative path
that does not exist as given is looked up there (`load_trace("mooncake_conversation_trace.jsonl.gz")`).

Mooncake JSONL (one request a line: timestamp ms, input_length, output_length, hash_ids of 512-token
prefix-chained blocks). There is no session id: a request continues a session when its hash ids contain
the last full block of that session's latest prompt (so it extends that whole prompt) and at least
`min_shared_blocks` blocks are shared (every request shares block 0, a common system prompt, which alone
says nothing). Timestamps become arrival offsets; the think time between turns is unknown (gap 0).

kv-cache-tester sessions (one JSON object a file, 64-token blocks, one hash id per *full* block, hash ids
scoped to the session (salted here with the session id so sessions never share blocks)): every
`n`/`s` request is a turn, `think_time` of request i+1 is turn i's gap, `t` its arrival offset (from the session
start; a trajectory arrives with its first request); each `subagent` entry is its own trajectory, whose requests'
`t` count from its parent's origin + the entry's `t`.

Re-read context of a trace turn (`Turn.context_tokens`): the paper's model (prompt i+1 = prompt i +
gen i + append) holds when the new prompt extends the previous one's blocks and is at least as long as
prompt + generation; then the whole previous context is re-read (the DE persisted its generated blocks).
Otherwise (the agent dropped or rewrote text, e.g. thinking) only the leading blocks the trajectory has
already seen are re-read. The context is capped at prompt − 1 so that every turn prefills >= 1 token.

Token ids for a runtime (`hashed_token_ids`): each block's ids are a hash of its block hash, so prompts that share
hash blocks share exactly those ids (and the runtime's KV store hits them).

A malformed line or file raises `TraceFormatError` naming the file and the line (or request index); so do a
hash id at two block positions of one id scope (prefix-chained ids name one position), a token count past
2**31 - 1, and one kv-cache-tester session loaded twice (its scoped ids would be shared across agents).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from itertools import compress, count
from operator import ne
from pathlib import Path
from typing import Any

import numpy as np

from dualpath_jax.checks import is_int
from dualpath_jax.workloads.types import Trajectory, Turn

log = logging.getLogger(__name__)

TRACES_ENV = "DUALPATH_TRACES"
MOONCAKE_BLOCK = 512
# A token count of a trace line past this is no real request: positions are int32 on the device (and an
# output_length of 10**30 was kept, a turn the simulator would decode for ever).
MAX_TOKENS = 2**31 - 1


# How load_trace tells the formats apart, for errors that come from reading a file as the other one
_NAMES = "the file name picks the format: *.jsonl[.gz] Mooncake (one request a line), *.json[.gz] one session"


class TraceFormatError(ValueError):
    """A trace file (or one line / request of it) does not have the expected format."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def traces_dir() -> Path:
    """$DUALPATH_TRACES, else <repo root>/../shared/traces."""
    env = os.environ.get(TRACES_ENV)
    return Path(env) if env else repo_root().parent / "shared" / "traces"


def resolve_trace_path(path: str | os.PathLike) -> Path:
    """`path` as given if it exists (a leading `~` expanded: `--workload=~/x.jsonl` reaches no shell's tilde
    expansion), else relative to traces_dir(); FileNotFoundError names both."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    q = traces_dir() / p
    if q.exists():
        return q
    looked = f"{p}" if q == p else f"{p} and {q}"  # (an absolute path: the same one twice)
    raise FileNotFoundError(
        f"trace {str(path)!r} not found (looked at {looked}; set ${TRACES_ENV} to move the traces dir)"
    )


def _check_count(name: str, n: int | None) -> None:
    """A line / file count of the loaders: None (all) or an int >= 1. A negative one dropped the last files
    (files[:-1]); 0 gave [] for kv-cache-tester sessions but "no request in the trace" for Mooncake; a fraction
    cut Mooncake at its floor and was a TypeError for session files."""
    if n is None:
        return
    if not is_int(n):
        raise ValueError(f"{name} must be an int >= 1 (or None for all), got {n!r} ({type(n).__name__})")
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    if n == 0:
        raise ValueError(f"{name}=0 loads nothing: give an int >= 1, or None for the whole trace")


def _unreadable(path: Path, e: Exception) -> TraceFormatError:
    kind = "gzipped text" if path.name.endswith(".gz") else "text"
    if isinstance(e, UnicodeDecodeError):  # its position is inside the reader's buffer: name the line instead
        at = _not_utf8_at(path)
        if at is not None:
            lineno, col, byte = at
            return TraceFormatError(
                f"{path}:{lineno}: cannot read as {kind}: byte 0x{byte:02x} at column {col} is not UTF-8"
                f"{_gzip_hint(path)}"
            )
    return TraceFormatError(f"{path}: cannot read as {kind}: {e}{_gzip_hint(path)}")


def _gzip_hint(path: Path) -> str:
    """A hint for a gzipped file whose name lacks .gz (read as text: "byte 0x8b at column 2 is not UTF-8"): the
    loaders pick gzip by the name, as the format (Mooncake / session) by .jsonl / .json."""
    if path.name.endswith(".gz"):
        return ""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                return ""
    except OSError:
        return ""
    return f" (it starts with gzip's magic bytes 1f 8b: a gzipped trace is named *.gz, {path.name}.gz)"


def _not_utf8_at(path: Path) -> tuple[int, int, int] | None:
    """(line, column, byte) of the first byte of `path` that is not UTF-8; None if none is found (or it cannot be
    read again)."""
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return lineno, e.start + 1, raw[e.start]
    except (OSError, EOFError, zlib.error):
        pass
    return None


def _open_text(path: Path):
    # utf-8-sig: a leading byte order mark is skipped (RFC 8259 lets a reader ignore it; it was "Unexpected UTF-8
    # BOM" on line 1); one later in the file stays an error naming its line
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _int_field(obj: dict, key: str, where: str, minimum: int = 0) -> int:
    if key not in obj:
        raise TraceFormatError(f"{where}: missing field {key!r}")
    v = obj[key]
    # is_integer() is False for inf / nan (int() would raise on them)
    whole = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
    if isinstance(v, bool) or not whole or v < minimum:
        raise TraceFormatError(f"{where}: field {key!r} must be an integer >= {minimum}, got {v!r}")
    if v > MAX_TOKENS:
        raise TraceFormatError(f"{where}: field {key!r} = {v:g} is past the largest token count, 2**31 - 1")
    return int(v)


def _num_field(obj: dict, key: str, where: str, default: float | None = None) -> float:
    if key not in obj:
        if default is not None:
            return default
        raise TraceFormatError(f"{where}: missing field {key!r}")
    v = obj[key]
    # NaN and inf too; an int past the float range (10**400) was a bare OverflowError naming no line
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= sys.float_info.max:
        raise TraceFormatError(f"{where}: field {key!r} must be a finite number >= 0, got {v!r}")
    return float(v)


def _hash_ids(
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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share, found in C (a trace's next prompt mostly repeats the last one)."""
    m = min(len(a), len(b))
    if (a[:m] == b) if m == len(b) else (a == b[:m]):  # (one copy)
        return m
    return next(compress(count(), map(ne, a, b)), m)


class _BlockPositions:
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


def _prompt_ids(
    obj: dict,
    key: str,
    where: str,
    input_len: int,
    block: int,
    partial_block: bool,
    len_key: str,
    positions: _BlockPositions,
    known: Sequence[int],
) -> tuple[list[int], int]:
    """`_hash_ids` and `positions.check` of one prompt, and how many of its leading ids repeat `known` (an earlier
    prompt of the same id scope, checked).

    Fast path: a real trace holds ~10 M ids, mostly repeats of the previous prompt's, and the checks' loops in Python
    took seconds. Here every id's type is tested in C; the ids repeating `known` equal ids already checked, at the same
    blocks, so only the rest are range-checked and recorded (setdefault, in C). On any doubt the checks themselves run
    and name the problem: the first bad id is the same one (setdefault kept every earlier block's position)."""
    ids = obj.get(key)
    if isinstance(ids, list) and list(map(type, ids)).count(int) == len(ids):
        shared = _common_prefix(ids, known) if known else 0
        rest = ids[shared:] if shared else ids
        blocks = range(shared, len(ids))
        expect = -(-input_len // block) if partial_block else input_len // block
        if (
            len(ids) == expect
            and (not rest or (-(2**63) <= min(rest) and max(rest) < 2**63))
            and list(map(positions.at.setdefault, rest, blocks)) == list(blocks)
        ):
            return ids, shared
    ids = _hash_ids(obj, key, where, input_len, block, partial_block, len_key)
    positions.check(ids, where)
    return ids, _common_prefix(ids, known)  # (ids of an int subclass, in a list built in Python, pass here)


class _ContextTracker:
    """Re-read context of successive turns of one trajectory (see the module docstring)."""

    def __init__(self, block: int):
        self.block = block
        self.seen: set[int] = set()
        self.prev_full: int | None = None  # id of the previous prompt's last full block
        self.prev_full_at = -1  # and its block there
        self.prev_context = 0  # previous prompt + generation

    def next(self, ids: Sequence[int], prompt: int, gen: int, shared: int = 0) -> int:
        """The turn's re-read context; `shared`: how many leading ids are known to repeat the previous prompt's."""
        # Fast path (a real trace holds ~10 M ids): the ids repeating the previous prompt's were seen, so the loop
        # starts after them; the previous prompt's last full block is looked for where it was first
        lead = shared
        for x in ids[shared:] if shared else ids:
            if x not in self.seen:
                break
            lead += 1
        lead = min(lead, prompt // self.block)  # only whole blocks are stored
        at = self.prev_full_at
        extends_prev = (
            self.prev_full is None or (at < lead and ids[at] == self.prev_full) or self.prev_full in ids[:lead]
        )
        if self.prev_context and extends_prev and prompt >= self.prev_context:
            context = self.prev_context
        else:
            context = lead * self.block
        context = max(0, min(context, prompt - 1))
        self.seen.update(ids[shared:] if shared else ids)  # (the repeated ones are in)
        n_full = prompt // self.block
        self.prev_full = ids[n_full - 1] if n_full else None
        self.prev_full_at = n_full - 1
        self.prev_context = prompt + gen
        return context


def _turn(
    ids: Sequence[int],
    prompt: int,
    gen: int,
    context: int,
    offset: float,
    gap: float,
    block: int,
    salt: int,
    prev: np.ndarray | None = None,
    shared: int = 0,
) -> Turn:
    """A turn; its first `shared` ids repeat those of the previous turn, whose (salted) hashes are `prev`."""
    # (fast path, a real trace holds ~10 M ids: only the ids that do not repeat the previous turn's are converted)
    hashes = np.asarray(ids[shared:] if shared else ids, dtype=np.int64)
    if salt:
        hashes = hashes + (np.int64(salt) << np.int64(32))
    if shared:
        hashes = np.concatenate([prev[:shared], hashes])
    return Turn(
        append_tokens=prompt - context,
        gen_tokens=gen,
        gap_s=gap,
        context_tokens=context,
        arrival_offset_s=offset,
        block_hashes=hashes,
        hash_block_size=block,
    )


# ------------------------------------------------------------------------------------ token ids from hashes
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on a uint64 array (array arithmetic wraps mod 2**64, silently)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_token_ids(
    block_hashes: np.ndarray,
    block: int,
    scale: float,
    start: int,
    n: int,
    vocab_size: int,
    seed: int,
    tail_key: tuple[int, int],
) -> np.ndarray:
    """Token ids (int32, in [0, vocab_size)) of positions [start, start + n) of a prompt scaled by `scale`, from its
    blocks' prefix-chained hashes (`Turn.block_hashes` of `block` tokens), for a runtime that needs real ids.

    Trace block k covers the scaled positions [rint(k * block * scale), rint((k + 1) * block * scale)); a position's
    id is a hash of (seed, block hash, offset in the block). So prompts sharing their first n hash blocks share
    exactly their first rint(n * block * scale) ids, and differ after (the next hash differs). Positions past the last
    hashed block (a kv-cache-tester prompt's partial block, or rounding) get ids of `tail_key` (trajectory, turn):
    shared with no other turn."""
    h = np.asarray(block_hashes, dtype=np.int64).astype(np.uint64)
    edges = np.rint(np.arange(len(h) + 1) * (block * scale)).astype(np.int64)
    q = np.arange(start, start + n, dtype=np.int64)
    k = np.searchsorted(edges, q, side="right") - 1  # the block holding each position (len(h): past the last)
    hashed = k < len(h)
    s = _mix64(np.asarray([seed], dtype=np.uint64))
    out = np.empty(n, dtype=np.uint64)
    kh = k[hashed]
    out[hashed] = _mix64(_mix64(h[kh] ^ s) + (q[hashed] - edges[kh]).astype(np.uint64))
    if len(kh) < n:
        tail = _mix64(_mix64(np.asarray([tail_key[0]], np.uint64) ^ s ^ np.uint64(0x7A11)) + np.uint64(tail_key[1]))
        out[~hashed] = _mix64(tail + q[~hashed].astype(np.uint64))
    return (out % np.uint64(vocab_size)).astype(np.int32)


# --------------------------------------------------------------------------------------------- Mooncake
def _mooncake_rows(path: Path, max_requests: int | None) -> Iterator[tuple[int, dict]]:
    try:
        with _open_text(path) as f:
            n = 0
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if max_requests is not None and n >= max_requests:  # requests, not lines (a blank line is none)
                    return
                n += 1
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    # the column in the line: a line cut short failed past its newline ("line 2 column 1" of `line`)
                    col = min(e.pos, len(line.rstrip("\r\n"))) + 1
                    # (a pretty-printed document said only "Expecting property name ... at column 2" on line 1)
                    spread = line.strip() in ("{", "[")
                    hint = f"; the line holds only {line.strip()!r}: one JSON document over many lines? {_NAMES}"
                    raise TraceFormatError(
                        f"{where}: not valid JSON ({_json_msg(e)} at column {col}){hint if spread else ''}"
                    ) from None
                except RecursionError:  # the json module parses nested arrays/objects recursively
                    raise TraceFormatError(f"{where}: not valid JSON (nested too deeply to parse)") from None
                except ValueError as e:  # an int of more than 4,300 digits (Python's limit): a bare ValueError
                    raise TraceFormatError(f"{where}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    array = " (a JSON array: a Mooncake trace holds one request object a line)"
                    raise TraceFormatError(
                        f"{where}: expected a JSON object, got {type(row).__name__}{array if isinstance(row, list) else ''}"
                    )
                yield lineno, row
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _unreadable(path, e) from None


def load_mooncake(
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
    positions = _BlockPositions()
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
        ids, _ = _prompt_ids(row, "hash_ids", where, prompt, block_size, True, "input_length", positions, [])
        sid = None
        for pos in range(len(ids) - 1, min_shared_blocks - 2, -1):
            s = tails.get(ids[pos])
            if s is not None:
                sid = s
                del tails[ids[pos]]
                break
        if sid is None:
            sid = len(sessions)
            sessions.append({"t0": ts, "turns": [], "tracker": _ContextTracker(block_size), "line": lineno})
        sess = sessions[sid]
        context = sess["tracker"].next(ids, prompt, gen)
        # (a Mooncake prompt has tens of ids: copying the previous turn's hashes would cost more than it saves)
        sess["turns"].append(_turn(ids, prompt, gen, context, ts - sess["t0"], 0.0, block_size, 0))
        n_full = prompt // block_size
        if n_full >= min_shared_blocks:
            tails[ids[n_full - 1]] = sid
    if not sessions:
        raise TraceFormatError(f"{p}: no request in the trace")
    return [
        Trajectory(trajectory_id=i, turns=s["turns"], arrival_time=s["t0"], source=f"{p.name}:{s['line']}")
        for i, s in enumerate(sessions)
    ]


# ------------------------------------------------------------------------------------- kv-cache-tester
def _json_msg(e: json.JSONDecodeError) -> str:
    """The decoder's message without a trailing " at" ("Invalid control character at": "... at at column 36")."""
    return e.msg[:-3] if e.msg.endswith(" at") else e.msg


def _read_json(path: Path) -> Any:
    try:
        with _open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        # (a Mooncake trace named *.json said only "Extra data": the format is chosen by the file name)
        hint = f"; {_NAMES}" if e.msg == "Extra data" else ""
        raise TraceFormatError(
            f"{path}:{e.lineno}: not valid JSON ({_json_msg(e)} at column {e.colno}){hint}"
        ) from None
    except RecursionError:  # the json module parses nested arrays/objects recursively (no position is known)
        raise TraceFormatError(f"{path}: not valid JSON (nested too deeply to parse)") from None
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _unreadable(path, e) from None
    except ValueError as e:  # an int of more than 4,300 digits (Python's limit): a bare ValueError
        raise TraceFormatError(f"{path}: not valid JSON ({e})") from None


def _session_turns(
    requests: Any,
    where: str,
    block: int,
    salt: int,
    out: list[tuple[str, float, list[Turn]]],
    name: str,
    t0: float,
    positions: _BlockPositions,
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
            _session_turns(r.get("requests"), w, block, salt, out, sub_name, _arrival(t0, sub_t, w), positions)
            continue
        if kind not in ("n", "s"):
            raise TraceFormatError(f"{w}: unknown request type {kind!r} (expected 'n', 's' or 'subagent')")
        prompt = _int_field(r, "in", w, minimum=1)
        gen = _int_field(r, "out", w, minimum=0)
        known = rows[-1][3] if rows else []  # (the agent's previous prompt, checked in this scope)
        ids, shared = _prompt_ids(r, "hash_ids", w, prompt, block, False, "in", positions, known)
        t, think = _num_field(r, "t", w), _num_field(r, "think_time", w, default=0.0)
        rows.append((t, prompt, gen, ids, think, w, shared))
    if not rows:
        del out[slot]
        return
    tracker = _ContextTracker(block)
    turns = []
    # A first request at t > 0 arrived then, not at t0: TraceArrivals starts turn 0 at the agent's arrival_time
    # (turn 0 ran that much too early, and its offset t disagreed with the offset 0 of a Mooncake first turn).
    first_t = rows[0][0]
    for k, (t, prompt, gen, ids, _, w, shared) in enumerate(rows):
        if k and t < rows[k - 1][0]:
            raise TraceFormatError(f"{w}: t={t} goes back in time (previous {rows[k - 1][0]})")
        _arrival(t0, t, w)  # the turn's trace time, arrival + offset, must be a number too
        gap = rows[k + 1][4] if k + 1 < len(rows) else 0.0  # think time before the next request
        context = tracker.next(ids, prompt, gen, shared)
        prev = turns[-1].block_hashes if turns else None
        turns.append(_turn(ids, prompt, gen, context, t - first_t, gap, block, salt, prev, shared))
    out[slot] = (name, _arrival(t0, first_t, rows[0][5]), turns)


def _arrival(t0: float, t: float, where: str) -> float:
    """A request's (or subagent's) time, its agent's origin `t0` + its `t`: two finite times can sum past the float
    range (a bare "arrival_time must be a finite number" ValueError of a Trajectory naming no file, or a turn the
    simulator made ready at t = inf: an OverflowError from inside its run)."""
    if t0 + t == float("inf"):
        raise TraceFormatError(f"{where}: field 't' = {t!r} puts it at {t0!r} + {t!r} s, past the float range")
    return t0 + t


def load_kvcache_session(path: str | os.PathLike) -> list[Trajectory]:
    """One kv-cache-tester session file: the main agent and each subagent as trajectories (ids from 0)."""
    return _load_session(resolve_trace_path(path))[2]


def _load_session(p: Path) -> tuple[str, int, list[Trajectory]]:
    """(session id, hash-id salt, trajectories) of one session file."""
    doc = _read_json(p)
    if not isinstance(doc, dict):
        raise TraceFormatError(f"{p}: expected one JSON object (a session), got {type(doc).__name__}")
    if "requests" not in doc and "input_length" in doc:  # (it said only "missing field 'block_size'")
        raise TraceFormatError(f"{p}: a Mooncake request, not a kv-cache-tester session; {_NAMES}")
    block = _int_field(doc, "block_size", str(p), minimum=1)
    # ids are salted per session below: ids of another scope (shared across sessions) were salted apart, silently
    scope = doc.get("hash_id_scope")
    if scope not in (None, "local"):
        raise TraceFormatError(f"{p}: field 'hash_id_scope' = {scope!r} is not supported (session-scoped ids: 'local')")
    if "requests" not in doc:
        raise TraceFormatError(f"{p}: missing field 'requests'")
    # hash ids are scoped to the session: salt them with the session so sessions never share blocks
    # (an "id" of null is no id: every such session was "None", and a second one was refused as loaded already)
    sid = str(doc.get("id") if doc.get("id") is not None else p.name)
    # (JSON may hold a lone surrogate, "\ud800": a bare UnicodeEncodeError naming no file; any string is an id)
    salt = zlib.crc32(sid.encode("utf-8", "surrogatepass")) & 0x7FFFFFFF
    found: list[tuple[str, float, list[Turn]]] = []
    _session_turns(doc["requests"], str(p), block, salt, found, p.name, 0.0, _BlockPositions())
    trajs = [
        Trajectory(trajectory_id=i, turns=turns, arrival_time=t0, source=name)
        for i, (name, t0, turns) in enumerate(found)
    ]
    return sid, salt, trajs


def load_kvcache_tester(
    paths: str | os.PathLike | Sequence[str | os.PathLike] = "kvcache_tester", limit: int | None = None
) -> list[Trajectory]:
    """Sessions from a directory of trace_*.json.gz (sorted, first `limit`) or a list of files."""
    _check_count("limit", limit)
    return _load_kvcache_files(_session_files(paths, limit))


def _session_files(paths: str | os.PathLike | Sequence[str | os.PathLike], limit: int | None) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        p = resolve_trace_path(paths)
        # *.json and *.json.gz only: not *.jsonl (Mooncake) nor leftovers such as *.json.gz.part
        files = sorted(f for f in p.glob("*.json*") if f.name.endswith((".json", ".json.gz"))) if p.is_dir() else [p]
        if p.is_dir() and not files:
            raise TraceFormatError(f"{p}: no *.json / *.json.gz session file{_traces_within(p)}")
        if p.is_dir():
            _log_skipped(p, files)
    else:
        files = [resolve_trace_path(x) for x in paths]
    return files if limit is None else files[:limit]


def _log_skipped(p: Path, files: list[Path]) -> None:
    """One INFO line naming the files of session directory `p` that are not read (only *.json / *.json.gz are)."""
    read = set(files)
    skipped = sorted(f.name for f in p.iterdir() if f.is_file() and f not in read)
    if skipped:
        more = f", ... ({len(skipped)} in all)" if len(skipped) > 4 else ""
        log.info(
            "%s: %d session file(s) (*.json / *.json.gz); not read, %d other file(s): %s%s",
            p,
            len(files),
            len(skipped),
            ", ".join(skipped[:4]),
            more,
        )


def _traces_within(p: Path) -> str:
    """A hint naming the traces a directory without session files holds (the traces directory itself, given as the
    trace: its error named none of the Mooncake files or session directories in it)."""
    mooncake = sorted(f.name for f in p.glob("*.jsonl*") if f.name.endswith((".jsonl", ".jsonl.gz")))
    sessions = sorted(d.name for d in p.iterdir() if d.is_dir() and any(d.glob("*.json*")))
    found = [*mooncake, *(f"{d}/" for d in sessions)]
    if not found:
        return ""
    more = f", ... ({len(found)} in all)" if len(found) > 4 else ""
    return f"; give one of the traces in it: {', '.join(found[:4])}{more}"


def _load_kvcache_files(files: Sequence[Path], max_agents: int | None = None) -> list[Trajectory]:
    """Sessions of `files` in order, numbered from 0; stops after the file that brings `max_agents` sessions."""
    out: list[Trajectory] = []
    # Sessions are told apart by their salt: one session twice (a file given twice, a copy under another name)
    # or two ids of one crc32 gave agents that share every block, silently (hits the paper's agents never have).
    salts: dict[int, tuple[str, Path]] = {}
    for f in files:
        if max_agents is not None and len(out) >= max_agents:
            break
        sid, salt, trajs = _load_session(f)
        if salt in salts:
            other_id, other = salts[salt]
            what = f"session id {sid!r}" if other_id == sid else f"session id {sid!r} (the salt of {other_id!r})"
            raise TraceFormatError(
                f"{f}: {what} was loaded already, from {other}: their session-scoped hash ids would share blocks"
            )
        salts[salt] = (sid, f)
        for t in trajs:
            out.append(Trajectory(trajectory_id=len(out), turns=t.turns, arrival_time=t.arrival_time, source=t.source))
    if not out:  # as an empty Mooncake trace: the simulator ran the empty workload, NaN figures written as results
        what = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} session files)"
        raise TraceFormatError(f"{what} holds no turn: no 'n' / 's' request in its session(s)")
    return out


def load_trace(
    path: str | os.PathLike, limit: int | None = None, max_agents: int | None = None, warn_fewer: bool = True
) -> list[Trajectory]:
    """Any trace by its name: *.jsonl[.gz] -> Mooncake (`limit` requests), a *.json[.gz] file or a directory
    of them -> kv-cache-tester sessions (`limit` files).

    `max_agents`: the first that many trajectories (agents), each whole; a trace holding fewer gives them all, with a
    warning naming both counts unless `warn_fewer` is False (a caller that refuses it: the simulator's
    `workload.max_agents`, `workload_stats --max_agents`). (`limit` counts requests or files: the first N requests of
    a Mooncake trace cut its sessions' later turns, and a file may hold several sessions.)
    """
    if max_agents is not None and (not is_int(max_agents) or max_agents < 1):  # numpy ints too (is_int)
        raise ValueError(f"max_agents must be an int >= 1 (or None for all), got {max_agents!r}")
    _check_count("limit", limit)
    p = resolve_trace_path(path)
    name = p.name.removesuffix(".gz")
    if p.is_dir() or name.endswith(".json"):
        trajs = _load_kvcache_files(_session_files(p, limit if p.is_dir() else None), max_agents)
    elif name.endswith(".jsonl"):
        trajs = load_mooncake(p, max_requests=limit)
    else:
        raise TraceFormatError(f"{p}: unknown trace format (expected *.jsonl[.gz] Mooncake or *.json[.gz] sessions)")
    if max_agents is None:
        return trajs
    if warn_fewer and len(trajs) < max_agents:  # (the runtime's workload.agents=N replayed fewer, without a word)
        counted = "files" if p.is_dir() else "requests" if name.endswith(".jsonl") else None
        within = f" in its first {limit} {counted}" if limit is not None and counted else ""
        log.warning(
            "%s holds %d trajectories (sessions)%s, fewer than max_agents=%d (the runtime's workload.agents): "
            "replaying all %d",
            p, len(trajs), within, max_agents, len(trajs),
        )  # fmt: skip
    return trajs[:max_agents]


load = load_trace  # a short alias of load_trace (nothing in the package calls it; kept for scripts)
