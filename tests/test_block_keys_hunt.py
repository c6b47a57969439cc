"""Block keys hunt: the incremental chain, the decode write-back's keys, key identity of odd inputs.

The keys are stored on disk (block file names): every test here also checks that the keys of valid inputs are
byte-identical to the plain definition (`block_keys`, and the hash spelled out in tests/test_block_keys.py).
"""

from __future__ import annotations

import hashlib
import types

import numpy as np
import pytest

import dualpath_jax.block_keys as bk
from dualpath_jax.block_keys import KEY_NBYTES, ROOT, BlockKeyChain, block_keys, extend_block_keys, root_key
from dualpath_jax.host_buffers import HostBufferPool
from dualpath_jax.runtime import engines
from dualpath_jax.runtime.control import TurnTask
from transport import make_transport
from transport.inproc import InProcFabric


def _definition(ids, bs: int, parent: bytes = ROOT) -> list[bytes]:
    """The key definition written out (independent of the module's code)."""
    ids = np.asarray(ids, dtype=np.int64)
    keys, key = [], parent
    for b in range(ids.size // bs):
        key = hashlib.blake2b(key + b"T" + ids[b * bs : (b + 1) * bs].astype("<u4").tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys


def _chunks(rng, ids):
    """Split `ids` at random points (empty pieces and single tokens included), each piece a random input type."""
    cuts = np.sort(rng.integers(0, ids.size + 1, size=rng.integers(0, 2 * ids.size + 2)))
    kinds = (list, lambda a: a.astype(np.int32), lambda a: a.astype(np.uint32), lambda a: a.astype(np.int64), tuple)
    return [kinds[rng.integers(len(kinds))](p) for p in np.split(ids, cuts)]


def test_chain_keys_equal_block_keys_for_random_sequences_in_random_chunkings():
    rng = np.random.default_rng(20240611)
    for trial in range(60):
        bs = int(rng.choice([1, 2, 3, 4, 16, 64]))
        n = int(rng.integers(0, 8 * bs + 5))
        hi = int(rng.choice([2, 150_000, 2**31]))  # hi=2: mostly zeros (trailing zero tokens in blocks)
        ids = rng.integers(0, hi, size=n, dtype=np.int64)
        parent = root_key(f"ns{trial % 3}") if trial % 2 else ROOT
        want = block_keys(ids, bs, parent)
        assert want == _definition(ids, bs, parent)
        chain = BlockKeyChain(bs, parent)
        got = []
        for piece in _chunks(rng, ids):
            new = chain.extend(piece)
            got += new
            assert chain.keys == want[: len(chain.keys)] and chain.num_tokens <= n
        assert got == chain.keys == want, (trial, bs, n)
        assert chain.num_tokens == n
        # Resumed from an earlier turn's keys: the same keys, and it keeps extending like a fresh chain.
        k = int(rng.integers(0, len(want) + 1))
        cut = int(rng.integers(k * bs, n + 1))
        resumed = BlockKeyChain.resume(want[:k], ids[:cut], bs, parent)
        assert resumed.keys == extend_block_keys(want[:k], ids[:cut], bs, parent) == want[: cut // bs]
        assert resumed.num_tokens == cut
        assert resumed.keys[:k] == want[:k]
        resumed.extend(list(ids[cut:]))
        assert resumed.keys == want


def test_a_chain_that_refuses_tokens_keeps_its_state():
    chain = BlockKeyChain(4)
    chain.extend([1, 2, 3])
    for bad in ([5, -1], [1.5], np.zeros((2, 2), int)):
        with pytest.raises((ValueError, TypeError)):
            chain.extend(bad)
    assert chain.num_tokens == 3
    assert chain.extend([4, 5]) == block_keys([1, 2, 3, 4], 4)
    with pytest.raises(ValueError, match="prev_keys cover 2 blocks"):
        BlockKeyChain.resume(block_keys(np.arange(8), 4), np.arange(7), 4)


class _Counter:
    """Counts what the key code touches: tokens canonicalised, tokens concatenated, bytes hashed."""

    def __init__(self, monkeypatch):
        self.converted = self.concatenated = self.hashed = self.hashes = 0
        token_bytes, blake = bk._token_bytes, bk._blake

        def counting_token_bytes(token_ids):
            out = token_bytes(token_ids)
            self.converted += out.size
            return out

        def counting_blake(data):
            self.hashed += len(data)
            self.hashes += 1
            return blake(data)

        def counting_concatenate(arrays, *a, **kw):
            out = np.concatenate(arrays, *a, **kw)
            self.concatenated += out.size
            return out

        fake_np = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
        fake_np.concatenate = counting_concatenate
        monkeypatch.setattr(bk, "np", fake_np)
        monkeypatch.setattr(bk, "_token_bytes", counting_token_bytes)
        monkeypatch.setattr(bk, "_blake", counting_blake)


@pytest.mark.parametrize("as_input", [lambda t: [int(t)], lambda t: np.array([t], np.int32)], ids=["int", "array"])
def test_a_chain_fed_token_by_token_does_constant_work_a_token(monkeypatch, as_input):
    """`extend` concatenated the open block with the new tokens and re-canonicalised (and copied) the whole open
    block on every call: fed one token at a time (decode), O(block_size) a token, O(n * block_size) in all. It
    now fills a fixed buffer in place: O(1) a token, each block hashed once."""
    bs, n = 256, 256 * 8 + 17
    ids = np.random.default_rng(1).integers(0, 150_000, size=n)
    want = block_keys(ids, bs)
    count = _Counter(monkeypatch)
    chain = BlockKeyChain(bs)
    got = []
    for tok in ids:
        got += chain.extend(as_input(tok))
    assert got == want
    touched = count.converted + count.concatenated
    # HEAD: ~n * bs / 2 tokens re-read (about 270,000 here); now each token once.
    assert touched <= 2 * n, f"{touched} tokens canonicalised/concatenated for {n} fed one at a time"
    assert count.hashes == n // bs and count.hashed == (n // bs) * (KEY_NBYTES + 1 + 4 * bs)


# ---------------------------------------------------------------------------------------------- decode write-back
class _FakeBatch:
    """Decode batch stand-in: deterministic next tokens (zeros among them), blocks read back as zeros."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def step(self, tokens, lengths, mask):
        nxt = self.rng.integers(0, 5, size=tokens.shape[0]).astype(np.int32)  # [N] small ids: many zeros
        return np.where(mask, nxt, 0).astype(np.int32)

    def read_block(self, slot, start, n):
        return np.zeros((2, n, 8), np.uint8)

    def free(self, slot):
        pass


def _decode_engine(bs: int, slots: int):
    """A real DecodeEngine over an inproc endpoint; model, store and SNIC are stand-ins (as test_runtime_hunt7)."""
    cfg = types.SimpleNamespace(block_size=bs, cluster=types.SimpleNamespace(decode_slots=slots, max_seq_len=4096))
    model = types.SimpleNamespace(
        kv_layout=types.SimpleNamespace(bytes_per_token_per_layer=8, num_layers=2), new_decode_batch=lambda *a: None
    )
    ctx = types.SimpleNamespace(cfg=cfg, model=model, emit=lambda ev: None)
    ep = make_transport({"backend": "inproc", "name": "engine1", "fabric": InProcFabric()})
    pool = HostBufferPool(slot_nbytes=64, budget_bytes=64 * 16, prefault=False)
    return engines.DecodeEngine(1, 0, ctx, ep, pool, None), ep


def _run_decode(monkeypatch, bs: int, prompts: list, gen_tokens: int):
    """Decode `prompts` (one slot each) for `gen_tokens` tokens; returns (requests, write-backs, hashes)."""
    de, ep = _decode_engine(bs, len(prompts))
    try:
        de.batch = _FakeBatch(7)
        writes = []
        monkeypatch.setattr(de, "_write_back", lambda r, keys, blocks, d2h=False: writes.append((r, keys, d2h)))
        reqs = []
        for slot, ids in enumerate(prompts):
            ids = np.asarray(ids, np.int32)
            t = TurnTask(slot, 0, slot, 0, ids, gen_tokens, block_keys(ids, bs), 0, 0, 0, 1, "pe")
            r = engines._DecodeReq(task=t, stage="decoding", slot=slot, length=ids.size, tokens=[slot % 2])
            de.slot_req[slot] = r
            reqs.append(r)
        count = _Counter(monkeypatch)  # after the prompts' keys: counts only the write-back's hashing
        while any(len(r.tokens) < gen_tokens for r in reqs):
            de._step()
        return reqs, writes, count
    finally:
        de.stop()
        ep.close()


def test_decode_write_back_keys_are_the_sequences_block_keys(monkeypatch):
    """Same keys as HEAD's recomputation (`extend_block_keys(prompt keys, prompt + tokens[:-1])[j]`), for a
    prompt shorter than a block (chained from ROOT), one ending mid-block, and one ending on a block edge."""
    bs, gen = 4, 23
    prompts = [[3], np.arange(1, 11) % 3, np.arange(8) * 0]
    reqs, writes, _ = _run_decode(monkeypatch, bs, prompts, gen)
    assert writes
    for r in reqs:
        seq = np.concatenate([r.task.prompt_ids, np.asarray(r.tokens[:-1], np.int32)])  # the slot's KV tokens
        want = block_keys(seq, bs)
        assert want == _definition(seq, bs)
        mine = [(keys, d2h) for q, keys, d2h in writes if q is r]
        first = r.task.prompt_tokens // bs
        assert mine == [([want[j]], True) for j in range(first, len(want))], r.task.request_id


def test_decode_write_back_hashes_each_block_once(monkeypatch):
    """Each block filled during decode recomputed the keys of every block after the prompt (and concatenated the
    whole sequence): G decode blocks hashed G*(G+1)/2 blocks, quadratic in the generated length. A chain per
    request now hashes each new block once."""
    bs, gen = 4, 4 * 30 + 2
    reqs, writes, count = _run_decode(monkeypatch, bs, [np.arange(6), np.arange(9)], gen)
    assert len(writes) == 2 * 30
    # HEAD: 2 * (30 * 31 / 2) = 930 hashes and ~1860 blocks of tokens concatenated.
    assert count.hashes == len(writes), f"{count.hashes} hashes for {len(writes)} written blocks"
    n_tokens = sum(r.length for r in reqs)
    assert count.converted + count.concatenated <= 2 * n_tokens


# ---------------------------------------------------------------------------------------------- trailing zeros
def test_trailing_zero_tokens_and_key_bytes_are_never_dropped():
    """Reported: token ids given as a numpy array with trailing zero tokens hash like the shorter sequence, or a
    numpy-array key loses its trailing zero bytes. Not so (this pins it): ids are canonicalised with
    `astype('<u4')` (no bytes conversion that strips anything), every whole block's 4*block_size bytes are
    hashed, and a parent key must be exactly 16 bytes (a numpy `S16` scalar that lost a trailing NUL is refused,
    not used as a shorter key). Only the partial last block gets no key, by design."""
    bs = 2
    seqs = [[5], [5, 0], [5, 0, 0], [5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 0, 0], [0, 0], [5, 0, 0, 0, 0, 0]]
    makers = (list, lambda s: np.array(s, np.int32), lambda s: np.array(s, np.uint8), lambda s: np.array(s, ">i8"))
    seen = {}
    for s in seqs:
        whole = tuple(s[: len(s) // bs * bs])  # what the keys name
        for make in makers:
            keys = tuple(block_keys(make(s), bs))
            assert list(keys) == _definition(s, bs)
            chain = BlockKeyChain(bs)
            for tok in s:
                chain.extend(make([tok]))
            assert tuple(chain.keys) == keys
            assert seen.setdefault(keys, whole) == whole, f"{s} and {seen[keys]} share keys"
    assert len(seen) == len({tuple(s[: len(s) // bs * bs]) for s in seqs})
    # A key ending in a zero byte, through a numpy bytes array (which strips trailing NULs).
    key = next(k for i in range(10_000) if (k := block_keys([i], 1)[0]).endswith(b"\0"))
    stripped = np.array([key])[0]
    assert len(stripped) < KEY_NBYTES
    with pytest.raises(ValueError, match="parent must be a 16-byte key"):
        block_keys([1], 1, parent=stripped)
    with pytest.raises(ValueError, match="parent must be a 16-byte key"):
        BlockKeyChain(1, stripped)
    assert block_keys([1], 1, parent=np.array([key], dtype=object)[0]) == _definition([1], 1, key)


@pytest.mark.parametrize("hit_blocks", [1, 2])
def test_admit_writes_back_the_prompts_whole_blocks_past_its_hit_and_no_others(monkeypatch, hit_blocks):
    """Mutation audit of session 44 (rt07, rt05): nothing checked that a DE's write-back skips the blocks the turn hit
    (already stored): each was read back and checksummed again by the SNIC's write loop, the turn's end waited for it
    and the writes were over-counted, with the tokens right."""
    de, ep = _decode_engine(4, 1)
    try:
        writes = []
        monkeypatch.setattr(de, "_write_back", lambda r, keys, blocks, d2h=False: writes.append((keys, blocks, d2h)))
        monkeypatch.setattr(de, "_loaded", lambda r: None)
        ids = np.arange(14, dtype=np.int32)  # 3 whole blocks + 2 tokens
        keys = block_keys(ids, 4)
        t = TurnTask(0, 0, 0, 0, ids, 2, keys, 1, 0, 0, 1, "pe")
        area = np.arange(2 * 14 * 8, dtype=np.uint8).reshape(2, 14, 8)
        r = engines._DecodeReq(task=t, stage="buffered", prefill_done=True, final_hit=4 * hit_blocks, area=area)
        de.reqs[r.key] = r
        de.order.append(r.key)
        de._admit()
        ((wkeys, blocks, d2h),) = writes
        assert wkeys == keys[hit_blocks:3] and not d2h  # the hit blocks are stored already; the last is not whole
        for j, b in zip(range(hit_blocks, 3), blocks, strict=True):
            np.testing.assert_array_equal(b, area[:, 4 * j : 4 * j + 4])
    finally:
        de.stop()
        ep.close()
