"""fix29 compat audit, the store's side (notes/fix29_compat_report.md F1, F2, F4a-c): versions meeting on one store.

- F2: a block a newer dualpath-jax wrote (a newer per-block format version, an unknown checksum algo id) is a miss
  that leaves the file, counted (`newer_format_blocks`), not removed as corrupt; a write of its key replaces it.
- F4a/F4b: STORE.json of a newer block format, or with a layout field this version does not know, is refused as
  written by a newer dualpath-jax (not "use one directory per model").
- F4c: STORE.json records its writer's code; a refusal names it beside this code's when they differ, and a
  STORE.json without it still opens.
- F1: the fingerprint's `n<KV_NUMERICS>` part, named by the refusal of a store of other KV numerics.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib

import numpy as np
import pytest
from test_mutation_audit3_store import FB, LAY, RM, _block, _key, _rewrite_header_field

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import block_file
from dualpath_jax.store.local_dir import LocalDirStore, writer_code
from models.config import KV_NUMERICS
from models.registry import tiny_config

_ALGO_OFFSET, _VERSION_OFFSET = 16, 8  # header fields (block_file._FIXED: magic 8s | format_version | hdr_n | algo)


def _newer_pair(s: LocalDirStore) -> tuple[bytes, bytes]:
    """Two stored blocks re-sealed (valid header crc) as a newer dualpath-jax would write them: an unknown checksum
    algo id, and the next format version."""
    ka, kv = _key(1), _key(2)
    assert s.write(ka, _block(1)) and s.write(kv, _block(2))
    _rewrite_header_field(s.path_of(ka), _ALGO_OFFSET, "<I", 99)
    _rewrite_header_field(s.path_of(kv), _VERSION_OFFSET, "<I", block_file.FORMAT_VERSION + 1)
    return ka, kv


def test_parse_header_tells_a_newer_block_from_damage():
    """BlockOfNewerFormat (a BlockFormatError, so older callers still reject it) for a newer version or algo id;
    a plain BlockFormatError for an older version or a damaged header."""
    k = _key(1)
    fp = block_file.fingerprint_digest(LAY.fingerprint)
    good = block_file.pack_header(LAY, k, block_file.layer_checksums(_block(1).reshape(4, -1), "xxh3"), "xxh3")
    for offset, value in ((_VERSION_OFFSET, block_file.FORMAT_VERSION + 1), (_ALGO_OFFSET, 99)):
        hdr = bytearray(good)
        struct.pack_into("<I", hdr, offset, value)
        table_end = block_file.header_used_nbytes(LAY) - 4
        struct.pack_into("<I", hdr, table_end, zlib.crc32(bytes(hdr[:table_end])))
        with pytest.raises(block_file.BlockOfNewerFormat):
            block_file.parse_header(hdr, LAY, k, fp)
    for version in (0, block_file.FORMAT_VERSION + 254):  # older, or too far off to be a newer one: damage
        other = bytearray(good)
        struct.pack_into("<I", other, _VERSION_OFFSET, version)
        with pytest.raises(block_file.BlockFormatError) as e:
            block_file.parse_header(other, LAY, k, fp)
        assert not isinstance(e.value, block_file.BlockOfNewerFormat)
    damaged = bytearray(good)
    damaged[_ALGO_OFFSET] = 99  # (no new crc: a damaged id is damage)
    with pytest.raises(block_file.BlockFormatError, match="header checksum") as e:
        block_file.parse_header(damaged, LAY, k, fp)
    assert not isinstance(e.value, block_file.BlockOfNewerFormat)


@pytest.mark.parametrize("rm", sorted(RM))
def test_a_block_of_a_newer_format_is_a_miss_that_leaves_the_file(tmp_path, rm, caplog):
    """F2: read, Layer-Block read and verify of a newer block miss and leave it (once logged, counted), never as
    "corrupt"; a write of its key (the dedup check finds it unreadable) replaces it, and it reads again."""
    s = LocalDirStore(tmp_path / "kv", LAY, **RM[rm])
    keys = _newer_pair(s)
    out = np.zeros(FB, np.uint8)
    with caplog.at_level(logging.DEBUG, logger="dualpath_jax.store.local_dir"):
        for k in keys:
            assert not s.read(k, out)
            assert not s.read(k, out[: LAY.layer_block_nbytes], layers=[1])
            assert not s.verify(k)
            assert os.path.exists(s.path_of(k))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "written by a newer dualpath-jax" in warned[0].getMessage()
    assert "corrupt" not in caplog.text
    st = s.stats()
    assert (st.read_newer_format, st.newer_format_blocks, st.read_corrupt, st.corrupt_blocks) == (4, 6, 0, 0)
    assert st.misses == 4
    for i, k in enumerate(keys, 1):
        assert s.write(k, _block(i))
        assert s.read(k, out)
        np.testing.assert_array_equal(out, _block(i))
    assert s.stats().write_dedup == 0 and s.stats().corrupt_blocks == 0
    s.close()


def test_a_newer_block_of_another_size_is_left_unindexed(tmp_path):
    """F2 at open and lookup: a file of another size is damage (removed), unless its header names a newer format
    version (a newer format may have another header size): then it is left on disk and not indexed."""
    root = tmp_path / "kv"
    s = LocalDirStore(root, LAY)
    keys = [_key(i) for i in (1, 2, 3)]
    for i, k in enumerate(keys, 1):
        assert s.write(k, _block(i))
    s.close()
    _rewrite_header_field(s.path_of(keys[0]), _VERSION_OFFSET, "<I", block_file.FORMAT_VERSION + 1)
    for k in keys[:2]:  # the newer one and a damaged one, both one page longer
        with open(s.path_of(k), "ab") as f:
            f.write(b"\0" * 4096)
    again = LocalDirStore(root, LAY)
    assert again.keys() == [keys[2]]
    assert os.path.exists(again.path_of(keys[0])) and not os.path.exists(again.path_of(keys[1]))
    st = again.stats()
    assert (st.newer_format_blocks, st.corrupt_blocks) == (1, 1)
    assert again.lookup(keys[:1]) == 0 and os.path.exists(again.path_of(keys[0]))
    assert again.stats().newer_format_blocks == 2 and again.stats().corrupt_blocks == 1
    again.close()


def _meta(root) -> dict:
    return json.loads((root / "STORE.json").read_text())


def _set_meta(root, meta: dict) -> None:
    (root / "STORE.json").write_text(json.dumps(meta))


def test_store_json_of_a_newer_block_format_is_named_as_such(tmp_path):
    """F4a: not "use one directory per model and KV layout"."""
    root = tmp_path / "kv"
    LocalDirStore(root, LAY).close()
    m = _meta(root)
    m["block_format_version"] = block_file.FORMAT_VERSION + 1
    _set_meta(root, m)
    with pytest.raises(ValueError) as e:
        LocalDirStore(root, LAY)
    msg = str(e.value)
    assert f"written by a newer dualpath-jax (block format {block_file.FORMAT_VERSION + 1}; this one reads " in msg
    assert "one directory per model" not in msg and "open it with that version" in msg


def test_store_json_with_an_unknown_layout_field_names_it(tmp_path):
    """F4b: the extra field is named (it said "differs in the layout's other fields")."""
    root = tmp_path / "kv"
    LocalDirStore(root, LAY).close()
    m = _meta(root)
    m["layout"]["kv_dtype"] = "bfloat16"
    _set_meta(root, m)
    with pytest.raises(ValueError, match=r"newer dualpath-jax \(layout field\(s\) 'kv_dtype' this one does not know"):
        LocalDirStore(root, LAY)


def test_store_json_records_its_writer_and_a_refusal_names_both(tmp_path):
    """F4c: `written_by` is this code; another writer is named in a refusal; a STORE.json without it opens."""
    root = tmp_path / "kv"
    LocalDirStore(root, LAY).close()
    m = _meta(root)
    assert m["written_by"] == writer_code() and m["written_by"]["dualpath_jax"]
    other = BlockLayout(LAY.num_layers, LAY.block_tokens, LAY.bytes_per_token_per_layer, "audit3-model/other")
    with pytest.raises(ValueError) as e:
        LocalDirStore(root, other)
    assert "written by" not in str(e.value)  # (the same code: nothing to add)
    m["written_by"] = {"dualpath_jax": "0.0.9", "commit": "0123456789abcdef0123"}
    _set_meta(root, m)
    with pytest.raises(
        ValueError, match=r"written by dualpath-jax 0\.0\.9 \(commit 0123456789ab\), this is dualpath-jax"
    ):
        LocalDirStore(root, other)
    del m["written_by"]
    _set_meta(root, m)
    LocalDirStore(root, LAY).close()  # an older STORE.json opens (and is left as it was)
    assert "written_by" not in _meta(root)
    with pytest.raises(ValueError, match="written by a dualpath-jax that did not record its version"):
        LocalDirStore(root, other)


def test_fingerprint_carries_kv_numerics_and_a_refusal_names_it(tmp_path):
    """F1: the config fingerprint's `n<KV_NUMERICS>` part; a store of other numerics (or from before the part) is
    refused naming it. `fingerprint(kv_numerics=False)` is the form before that part (pinned: what a weights
    checkpoint saved before it recorded)."""
    cfg = tiny_config("tiny_qwen2")
    fp = cfg.fingerprint()
    assert fp == f"Qwen2ForCausalLM/L4/gqa[2x2x16]/float32/n{KV_NUMERICS}/baac26ba2f62d272"
    assert cfg.fingerprint(kv_numerics=False) == "Qwen2ForCausalLM/L4/gqa[2x2x16]/float32/baac26ba2f62d272"
    runner_fp = f"{fp}/w7f7d2c181c12c6f2"  # (ModelRunner.fingerprint: + the weights' digest)

    def lay(f: str) -> BlockLayout:
        return BlockLayout(4, 16, 64, f)

    older = runner_fp.replace(f"/n{KV_NUMERICS}/", f"/n{KV_NUMERICS - 1}/")
    LocalDirStore(tmp_path / "a", lay(older)).close()
    with pytest.raises(ValueError) as e:
        LocalDirStore(tmp_path / "a", lay(runner_fp))
    assert (
        f"KV numerics n{KV_NUMERICS - 1} here, n{KV_NUMERICS} asked: written by another dualpath-jax version; its KV "
        "would not be this version's bits" in str(e.value)
    )
    assert str(e.value).endswith("its KV must be computed again: use another directory, or remove this one")
    before = runner_fp.replace(f"/n{KV_NUMERICS}/", "/").replace("/w7f7d", "/w0b6c")  # (and another weights digest)
    LocalDirStore(tmp_path / "b", lay(before)).close()
    with pytest.raises(ValueError) as e:
        LocalDirStore(tmp_path / "b", lay(runner_fp))
    assert f"KV numerics not recorded (a fingerprint from before KV_NUMERICS) here, n{KV_NUMERICS} asked" in str(
        e.value
    )
    assert "fingerprint part 'w0b6c2c181c12c6f2' here, 'w7f7d2c181c12c6f2' asked (the weights' digest" in str(e.value)
    assert str(e.value).endswith("use one directory per model and KV layout")  # (other weights too: another model)
