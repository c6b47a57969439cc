"""Weights in and out: HF checkpoint import (config.json + *.safetensors) and orbax save/restore.

``load_hf_checkpoint(dir, dtype="float32") -> (config, params)`` maps HF tensor names and layouts (Linear
weights [out, in] -> NNX kernels [in, out]; per-expert weights stacked into [E, in, out]) onto the NNX
param tree of the family registered for ``config.json``'s architecture. A missing tensor, a wrong shape or
dtype, an unreadable file or an unknown architecture raises ValueError naming the tensor / field / file.
``safetensors`` is the optional ``hf`` extra, imported lazily.

``save_params(dir, params)`` / ``restore_params(dir, config) -> params`` use orbax-checkpoint; params are
an ``nnx.State`` or its pure dict (what ModelRunner accepts and exposes).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from models.registry import config_from_hf, family

_LOG = logging.getLogger(__name__)


def abstract_params(config) -> dict:
    """Pure dict of jax.ShapeDtypeStruct with the model's param tree (no allocation)."""
    model = nnx.eval_shape(lambda: family(config).model_cls(config, nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model))


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _read_safetensors(ckpt: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # optional extra
        raise ImportError("loading HF checkpoints needs safetensors: pip install 'dualpath-jax[hf]'") from e
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{ckpt}: no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            loaded = load_file(str(f))
        except Exception as e:  # SafetensorError (truncated, not safetensors), OSError, a dtype numpy lacks (float8)
            raise ValueError(f"{f}: cannot read as safetensors: {e}") from None
        for name, arr in loaded.items():
            if name in tensors:
                raise ValueError(f"{f.name}: tensor {name!r} appears in more than one shard")
            tensors[name] = arr
    return tensors


# HF weights are floats; anything else (int, bool, a quantized tensor) would be cast to the config dtype silently
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def hf_tensors_to_params(config, tensors: dict[str, np.ndarray]) -> dict:
    """HF-named tensors -> pure NNX param dict for `config` (errors name the tensor)."""
    expected = abstract_params(config)
    tmap = family(config).hf_tensor_map(config)
    expected_paths = {tuple(p) for p, _ in _flat_paths(expected)}
    if expected_paths != set(tmap):
        missing = sorted(map(str, expected_paths - set(tmap)))
        raise AssertionError(f"internal: HF tensor map does not cover params {missing}")
    out: dict = {}
    used = set()
    for path, (names, transform) in tmap.items():
        names_list = names if isinstance(names, list) else [names]
        arrays = []
        for name in names_list:
            if name not in tensors:
                raise ValueError(f"HF checkpoint: missing tensor {name!r} (for {'/'.join(map(str, path))})")
            arr = np.asarray(tensors[name])
            if arr.dtype.name not in _FLOAT_DTYPES:
                raise ValueError(
                    f"HF checkpoint: tensor {name!r} has dtype {arr.dtype}; expected one of {', '.join(_FLOAT_DTYPES)}"
                )
            arrays.append(arr)
            used.add(name)
        if transform == "T":
            value = arrays[0].T
        elif transform == "stackT":
            value = np.stack([a.T for a in arrays])
        else:
            value = arrays[0]
        want = _get(expected, path)
        if tuple(value.shape) != tuple(want.shape):
            shown = names_list[0] if len(names_list) == 1 else f"{names_list[0]} .. {names_list[-1]}"
            raise ValueError(
                f"HF checkpoint: tensor {shown!r} has shape {tuple(arrays[0].shape)}, which gives "
                f"{tuple(value.shape)} for {'/'.join(map(str, path))}; expected {tuple(want.shape)}"
            )
        _set(out, path, np.ascontiguousarray(value).astype(want.dtype))
    unused = sorted(set(tensors) - used)
    if unused:
        _LOG.warning(
            "HF checkpoint: %d tensors not used by the model (e.g. %s)",
            len(unused),
            unused[:3],
        )
    return out


def _flat_paths(tree: dict, prefix: tuple = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat_paths(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def load_hf_config(checkpoint_dir: str | os.PathLike, dtype: str = "float32"):
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{checkpoint_dir}: no config.json")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return config_from_hf(d, dtype=dtype)


def load_hf_checkpoint(checkpoint_dir: str | os.PathLike, dtype: str = "float32"):
    """(config, params) from a local HF checkpoint directory (config.json + *.safetensors). Nothing downloads."""
    config = load_hf_config(checkpoint_dir, dtype)
    return config, hf_tensors_to_params(config, _read_safetensors(Path(checkpoint_dir)))


def _to_pure(params) -> dict:
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    return jax.tree.map(np.asarray, pure)


def _str_keys(tree):
    # orbax stores dict keys as strings; the layer list uses int keys in NNX.
    return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _int_keys(tree):
    if not isinstance(tree, dict):
        return tree
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}


def save_params(checkpoint_dir: str | os.PathLike, params) -> None:
    """Save params (nnx.State or pure dict) with orbax to `checkpoint_dir` (must not exist yet)."""
    import orbax.checkpoint as ocp

    path = Path(checkpoint_dir).absolute()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, _str_keys(_to_pure(params)))
    ckptr.wait_until_finished()


def restore_params(checkpoint_dir: str | os.PathLike, config) -> dict:
    """Restore params saved by save_params for `config` (shapes/dtypes checked against the config)."""
    import orbax.checkpoint as ocp

    path = Path(checkpoint_dir).absolute()
    if not path.exists():
        raise ValueError(f"{checkpoint_dir}: no such checkpoint")
    target = _str_keys(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract_params(config)))
    ckptr = ocp.StandardCheckpointer()
    mismatch = f"{checkpoint_dir}: checkpoint does not match {config.architecture} config"
    try:
        restored = ckptr.restore(path, target)
    except FileNotFoundError as e:  # a directory without orbax's _METADATA
        raise ValueError(f"{checkpoint_dir}: not an orbax checkpoint ({e})") from e
    except (ValueError, KeyError) as e:
        raise ValueError(f"{mismatch}: {e}") from e
    # orbax restores the saved shapes, not the target's: a checkpoint of another vocab or width loaded as is
    for p, want in _flat_paths(target):
        got = _get(restored, p)
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"{mismatch}: {'/'.join(p)} has shape {tuple(got.shape)}; expected {tuple(want.shape)}")
    return _int_keys(jax.tree.map(np.asarray, restored))
