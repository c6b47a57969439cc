"""Models hunt 3 (2026-12-03): orbax checkpoints (saves racing on one path, damaged checkpoints) and the HF
importer's choice of files."""

from __future__ import annotations

import gc
import json
import sys
import time

import jax
import numpy as np
import pytest

from models import checkpoint
from models.checkpoint import abstract_params, restore_params, save_params
from models.registry import tiny_config
from models.runner import random_params


def test_a_failed_save_never_removes_the_checkpoint_another_save_put_at_its_path(tmp_path, monkeypatch):
    """Two saves to one path (two jobs, or a retry while the first still ran): the second found the first's
    finished checkpoint in its way and failed, and its cleanup removed `path`, the checkpoint the first had just
    reported saved (3 of 4 runs of two racing threads). Here the other save finishes while this one is writing."""
    cfg = tiny_config("tiny_qwen2")
    mine, theirs = (jax.tree.map(np.asarray, random_params(abstract_params(cfg), s)) for s in (1, 2))
    target = tmp_path / "ckpt"
    real_checksums = checkpoint._checksums

    def other_save_finishes_meanwhile(tree):
        monkeypatch.setattr(checkpoint, "_checksums", real_checksums)
        save_params(target, theirs)  # the other save, complete and reported saved
        return real_checksums(tree)

    monkeypatch.setattr(checkpoint, "_checksums", other_save_finishes_meanwhile)
    try:
        save_params(target, mine)
        raised = None
    except ValueError as e:
        raised = str(e)
    assert raised is not None and "ckpt: saving failed, nothing was kept" in raised, raised
    assert target.is_dir(), "the other save's finished checkpoint was removed by this save's cleanup"
    jax.tree.map(np.testing.assert_array_equal, restore_params(target, cfg), jax.tree.map(np.asarray, theirs))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # nothing of the failed save left beside it


@pytest.mark.parametrize("damage", ["b-tree file emptied", "data file gone"])
def test_a_damaged_checkpoint_is_named_as_such_with_no_stray_reads(tmp_path, monkeypatch, damage):
    """orbax gathers its tensorstore reads; when one failed it closed its event loop with the others in flight,
    and each then printed "RuntimeError: Event loop is closed" from tensorstore's threads (pytest: unraisable
    exceptions, reported in whichever test ran next). An emptied b-tree file was reported as "not an orbax
    checkpoint". The stored values are now read synchronously before orbax reads anything."""
    cfg = tiny_config("tiny_qwen2")
    ckpt = tmp_path / "ckpt"
    save_params(ckpt, random_params(abstract_params(cfg), 0))
    if damage == "b-tree file emptied":
        (root_node,) = (ckpt / "d").iterdir()  # the root database's b-tree
        root_node.write_bytes(b"")
    else:
        data = max((ckpt / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
        data.unlink()
    stray = []
    monkeypatch.setattr(sys, "unraisablehook", stray.append)
    with pytest.raises(ValueError, match=r"ckpt: cannot read the checkpoint \(damaged or incomplete\?\)"):
        restore_params(ckpt, cfg)
    time.sleep(0.5)  # reads left in flight complete within milliseconds
    gc.collect()
    assert not stray, [repr(u.exc_value) for u in stray[:3]]


def test_hf_checkpoint_with_model_safetensors_reads_it_alone_as_hf_does(tmp_path):
    """transformers loads model.safetensors when it is there and only otherwise the index. save_pretrained removes
    a previous save's shards but not its index, nor a previous unsharded model.safetensors. The importer read the
    index's shards: other weights than HF's for the same directory, or "shard(s) ... not found" for a directory HF
    loads."""
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file, save_file
    from test_models_checkpoint import QWEN2_HF, hf_tensors, write_hf_checkpoint

    from models.checkpoint import load_hf_checkpoint
    from models.registry import config_from_hf
    from models.runner import ModelRunner

    cfg = config_from_hf(QWEN2_HF)
    sharded, single = (hf_tensors(QWEN2_HF, ModelRunner(cfg, seed=s).pure_params()) for s in (0, 1))
    write_hf_checkpoint(tmp_path, QWEN2_HF, sharded)
    weight_map = {name: f.name for f in sorted(tmp_path.glob("*.safetensors")) for name in load_file(str(f))}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file(single, str(tmp_path / "model.safetensors"))
    _, params = load_hf_checkpoint(tmp_path)
    np.testing.assert_array_equal(params["final"]["norm"]["weight"], single["model.norm.weight"])
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], single["model.embed_tokens.weight"])
    for f in tmp_path.glob("model-0000*.safetensors"):  # a later unsharded save removed the shards, not the index
        f.unlink()
    _, params = load_hf_checkpoint(tmp_path)
    np.testing.assert_array_equal(
        params["layers"][1]["mlp"]["up_proj"]["kernel"], single["model.layers.1.mlp.up_proj.weight"].T
    )
