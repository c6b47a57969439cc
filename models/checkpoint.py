"""Weights in and out: HF checkpoint import (config.json + *.safetensors) and orbax save/restore.

``load_hf_checkpoint(dir, dtype="float32") -> (config, params)`` maps HF tensor names and layouts (Linear
weights [out, in] -> NNX kernels [in, out]; per-expert weights stacked into [E, in, out]) onto the NNX
param tree of the family registered for ``config.json``'s architecture. A missing tensor, a wrong shape or
dtype, NaN / inf values, an unreadable file or an unknown architecture raises ValueError naming the tensor /
field / file (tensor names are compared before the model's param tree is built). A tensor of the model's own layers
(or embedding / final norm) that the model does not read is an error too: config.json then describes another model
than the weights (a Llama config without attention_bias over q/k/v biases); RoPE buffers and layers past
DeepSeek-V3's MTP layers (``num_hidden_layers`` .. + ``num_nextn_predict_layers``, default 1) are logged and
skipped; any other layer past num_hidden_layers, or an unread ``lm_head.*``, is an error.
As HF reads them: ``model.safetensors`` alone when present, else the shards a ``model.safetensors.index.json``
names, else every ``*.safetensors`` of the directory. ``safetensors`` is the optional ``hf`` extra, imported lazily.

``save_params(dir, params)`` / ``restore_params(dir, config) -> params`` use orbax-checkpoint; params are
an ``nnx.State`` or its pure dict (what ModelRunner accepts and exposes). ``save_params`` refuses an existing
``dir`` and a leaf that is not a numeric array (naming it) before writing anything; a save that fails midway
(disk full, a file-size limit, an interrupt) removes what it wrote (its staging directory ``.<name>.saving-*``
beside ``dir``, renamed to ``dir`` once complete; parent directories it created) and raises ValueError naming
``dir``; it never removes ``dir`` (another save to the same path may have finished first). It stores an xxh3
checksum of each array's bytes in the checkpoint's metadata (orbax ``custom_metadata``); ``restore_params``
verifies them and refuses a saved dtype other than the config's. Before orbax reads anything, ``restore_params``
reads every stored value's last byte with tensorstore and checks that every array _METADATA names is stored, with
a value type orbax knows: a damaged or incomplete database is named as such. The arrays of an OCDBT checkpoint are
then decoded by ``restore_params`` itself with tensorstore, once each, every read waited for (orbax's gathered
restore left reads in flight when a chunk did not decompress); the checksums are verified on those arrays, and
NaN / inf values are refused (naming the param), as the HF import refuses them.
``save_params(dir, params, config)`` (config optional) checks the params against the config and records its fields;
``restore_params`` then refuses a config of another fingerprint, naming the fields that differ; a checkpoint saved
without one restores into any config of its shapes, with a logged warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
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
    index = ckpt / "model.safetensors.index.json"
    single = ckpt / "model.safetensors"
    if single.is_file():
        # HF reads model.safetensors alone when it is there, before any index: save_pretrained leaves a previous
        # save's index (and a previous unsharded model.safetensors) behind, so the shards read here were other weights
        if index.is_file():
            _LOG.warning("%s: reading model.safetensors alone, as HF does; %s is not used", ckpt, index.name)
        files = [single]
    elif index.is_file():
        # The shards the index names, as HF reads them: a shard missing (an interrupted download) came out as "missing
        # tensor", and a stale shard of another revision left in the directory as "appears in more than one shard"
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a weight_map): {e!r}") from None
        if not shards:  # (it was "no *.safetensors files", beside the shards)
            raise ValueError(f"{index}: its weight_map is empty (names no tensor, no shard)")
        absent = [f for f in shards if not isinstance(f, str) or not (ckpt / f).is_file()]
        if absent:
            raise ValueError(f"{ckpt}: shard(s) {absent} named in {index.name} not found")
        # one file named two ways ("a.safetensors", "./a.safetensors") is read once: its tensors were "in more
        # than one shard"
        files = list({os.path.realpath(ckpt / f): ckpt / f for f in shards}.values())
    if not files:
        raise ValueError(f"{ckpt}: no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, Path] = {}
    for f in files:
        try:
            loaded = load_file(str(f))
        except Exception as e:  # SafetensorError (truncated, not safetensors), OSError, a dtype numpy lacks (float8)
            # a dtype numpy lacks was "module 'numpy' has no attribute 'float8_e4m3fn'": name the tensor and dtype
            odd = _first_non_float_tensor(f)
            if odd is not None:
                raise ValueError(
                    f"{f}: tensor {odd[0]!r} has dtype {odd[1]} (a quantized checkpoint?); expected one of "
                    f"{', '.join(_FLOAT_DTYPES)}"
                ) from None
            truncated = _truncation(f)
            if truncated is not None:  # (safetensors says "incomplete metadata, file not fully covered")
                raise ValueError(
                    f"{f}: cannot read as safetensors: truncated: {truncated} (an interrupted download?)"
                ) from None
            raise ValueError(f"{f}: cannot read as safetensors: {e}") from None
        for name, arr in loaded.items():
            if name in tensors:  # both files named (only the second one was, without its directory)
                raise ValueError(
                    f"{ckpt}: tensor {name!r} appears in more than one shard: {where[name].name}, {f.name}"
                )
            tensors[name], where[name] = arr, f
    return tensors


def _truncation(f: Path) -> str | None:
    """How a safetensors file is shorter than its own header says (8-byte little-endian header length, the JSON
    header, then the tensors' data up to the largest ``data_offsets`` end), or None when it is not (or the start is
    not a safetensors header at all)."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            start = fh.read(9)
            if len(start) < 9 or start[8:9] != b"{":
                return None
            header_end = 8 + int.from_bytes(start[:8], "little")
            if header_end > 8 + 100_000_000:  # safetensors' own limit: not a header length
                return None
            if size < header_end:
                return f"its header alone is {header_end} bytes, the file has {size}"
            fh.seek(8)
            header = json.loads(fh.read(header_end - 8))
        ends = [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"]
        expected = header_end + max(ends, default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    if not isinstance(expected, int) or size >= expected:
        return None
    return f"the header describes {expected} bytes, the file has {size}"


# HF weights are floats; anything else (int, bool, a quantized tensor) would be cast to the config dtype silently
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _first_non_float_tensor(f: Path) -> tuple[str, str] | None:
    """(name, safetensors dtype) of the first tensor of `f` that is not F16 / BF16 / F32 / F64, from its header
    alone; None when there is none or the header cannot be read."""
    try:
        from safetensors import safe_open

        with safe_open(str(f), framework="np") as st:
            for name in st.keys():
                dtype = st.get_slice(name).get_dtype()
                if dtype not in ("F16", "BF16", "F32", "F64"):
                    return name, dtype
    except Exception:  # noqa: BLE001 -- the caller reports the read error itself
        return None
    return None


def hf_tensors_to_params(
    config, tensors: dict[str, np.ndarray], where: str = "HF checkpoint", mtp_layers: int | None = None
) -> dict:
    """HF-named tensors -> pure NNX param dict for `config` (errors name the tensor, after `where`). `mtp_layers`:
    the layers past num_layers that are DeepSeek-V3's multi-token-prediction modules, not read (None: 1 for
    DeepseekV3ForCausalLM, else 0; load_hf_checkpoint passes config.json's num_nextn_predict_layers)."""
    tmap = family(config).hf_tensor_map(config)
    # The names first (a dict walk): building the abstract model costs superlinear time in the layer count, so a
    # config.json with an absurd num_hidden_layers kept the loader busy for hours before "missing tensor".
    missing = [
        (name, path)
        for path, (names, _) in tmap.items()
        for name in (names if isinstance(names, list) else [names])
        if name not in tensors
    ]
    if missing:
        name, path = missing[0]
        more = (
            f"; {len(missing) - 1} more of the {config.num_layers}-layer model's tensors missing" if missing[1:] else ""
        )
        raise ValueError(f"{where}: missing tensor {name!r} (for {'/'.join(map(str, path))}){more}")
    expected = abstract_params(config)
    expected_paths = {tuple(p) for p, _ in _flat_paths(expected)}
    if expected_paths != set(tmap):
        missing = sorted(map(str, expected_paths - set(tmap)))
        raise AssertionError(f"internal: HF tensor map does not cover params {missing}")
    out: dict = {}
    used = set()
    for path, (names, transform) in tmap.items():
        names_list = names if isinstance(names, list) else [names]  # (all present: checked above)
        shown = names_list[0] if len(names_list) == 1 else f"{names_list[0]} .. {names_list[-1]}"
        arrays = []
        for name in names_list:
            arr = np.asarray(tensors[name])
            if arr.dtype.name not in _FLOAT_DTYPES:
                raise ValueError(
                    f"{where}: tensor {name!r} has dtype {arr.dtype}; expected one of {', '.join(_FLOAT_DTYPES)}"
                )
            arrays.append(arr)
            used.add(name)
        want = _get(expected, path)
        if transform == "T":
            value = arrays[0].T
        elif transform == "stackT":
            # each expert's [out, in] on its own: np.stack's "all input arrays must have the same shape" named none
            per_expert = tuple(want.shape[1:][::-1])
            for name, a in zip(names_list, arrays, strict=True):
                if tuple(a.shape) != per_expert:
                    raise ValueError(
                        f"{where}: tensor {name!r} has shape {tuple(a.shape)}; expected {per_expert} "
                        f"(for {'/'.join(map(str, path))}, the experts' weights stacked)"
                    )
            value = np.stack([a.T for a in arrays])
        else:
            value = arrays[0]
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(
                f"{where}: tensor {shown!r} has shape {tuple(arrays[0].shape)}, which gives "
                f"{tuple(value.shape)} for {'/'.join(map(str, path))}; expected {tuple(want.shape)}"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, naming the tensor
            value = np.ascontiguousarray(value).astype(want.dtype)
        # NaN / inf weights (or float64 values beyond the config dtype's range, inf after the cast) loaded
        # silently and every logit was NaN
        if not np.isfinite(value).all():
            src = arrays[0].dtype
            what = (
                f"values beyond {value.dtype}'s range (inf once cast from {src})"
                if all(np.isfinite(a).all() for a in arrays)
                else "non-finite values (NaN or inf)"
            )
            raise ValueError(f"{where}: tensor {shown!r} has {what} (for {'/'.join(map(str, path))})")
        _set(out, path, value)
    unused = sorted(set(tensors) - used)
    # A weight of one of the model's own layers (or of its embedding / final norm) that the model does not read
    # means config.json describes another model than the weights: a Llama config without attention_bias over
    # weights with q/k/v biases (a "llamafied" Qwen2), a gate's e_score_correction_bias beside a topk_method that
    # never reads it. It was a log line and the model ran without those weights, its logits silently off.
    # A layer past num_hidden_layers (a config.json of fewer layers than the weights ran a truncated model) and an
    # unread lm_head.* (a bias) are errors too. Buffers (rotary_emb.inv_freq) and DeepSeek-V3's MTP layers (just past
    # num_hidden_layers) stay a warning.
    if mtp_layers is None:
        mtp_layers = 1 if config.architecture == "DeepseekV3ForCausalLM" else 0
    own = [name for name in unused if _is_unread_weight_of_model(name, config.num_layers, mtp_layers)]
    if "lm_head.weight" in own and config.tie_word_embeddings:  # (a tied head saved as a copy of the embedding)
        embed = tensors.get("model.embed_tokens.weight")
        if embed is not None and np.array_equal(np.asarray(tensors["lm_head.weight"]), np.asarray(embed)):
            own.remove("lm_head.weight")
    if own:
        deeper = own[0].startswith("model.layers.") and int(own[0].split(".")[2]) >= config.num_layers
        hint = f"num_hidden_layers={config.num_layers}?" if deeper else "attention_bias, architectures, topk_method?"
        raise ValueError(
            f"{where}: tensor {own[0]!r} is a weight of the model that config.json's "
            f"{config.architecture} does not read{f' ({len(own) - 1} more)' if own[1:] else ''}: config.json and "
            f"the weights describe different models ({hint})"
        )
    if unused:
        # (named: the MTP layer's tensors read as a mistake; the warning named no directory either)
        layers = {int(n.split(".")[2]) for n in unused if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
        mtp = sorted(i for i in layers if i >= config.num_layers)  # (below: RoPE buffers of served layers)
        what = (
            f"; layers {mtp} are multi-token-prediction modules (num_nextn_predict_layers), not served" if mtp else ""
        )
        _LOG.warning("%s: %d tensors not used by the model (e.g. %s)%s", where, len(unused), unused[:3], what)
    return out


def _is_unread_weight_of_model(name: str, num_layers: int, mtp_layers: int = 0) -> bool:
    """Whether an HF tensor the model does not read belongs to the model itself (or to a deeper model): a tensor of
    a layer other than a RoPE buffer or one of the `mtp_layers` just past the `num_layers` (DeepSeek-V3's MTP
    modules), or of the embedding / final norm / LM head."""
    if name.startswith("model.layers."):
        index = name.split(".")[2]
        if not index.isdigit() or name.endswith("rotary_emb.inv_freq"):
            return False
        return not num_layers <= int(index) < num_layers + mtp_layers
    return name.startswith(("model.embed_tokens.", "model.norm.", "lm_head."))


def _flat_paths(tree: dict, prefix: tuple = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat_paths(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def load_hf_config(checkpoint_dir: str | os.PathLike, dtype: str = "float32"):
    """The typed config of a local HF checkpoint directory's config.json (ValueError naming what is wrong)."""
    if not Path(checkpoint_dir).is_dir():  # (both were "no config.json")
        if os.path.exists(checkpoint_dir):
            raise ValueError(
                f"{checkpoint_dir} is not a directory (an HF checkpoint is a directory: config.json + *.safetensors)"
            )
        raise ValueError(f"{checkpoint_dir} does not exist (no config.json)")
    return config_from_hf(_config_json(checkpoint_dir), dtype=dtype)


def _config_json(checkpoint_dir: str | os.PathLike) -> dict:
    """config.json of the directory `checkpoint_dir` as JSON (ValueError naming what is wrong)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        orbax = any((Path(checkpoint_dir) / n).exists() for n in ("_CHECKPOINT_METADATA", "manifest.ocdbt"))
        raise ValueError(
            f"{checkpoint_dir}: no config.json"
            + (
                " (an orbax checkpoint: restore it with models.checkpoint.restore_params(dir, config); the runtime's "
                "model is a tiny config's name or an HF checkpoint directory)"
                if orbax
                else ""
            )
        )
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    except RecursionError:  # thousands of nested [ or {: the json module recurses per level
        raise ValueError(f"{path}: invalid JSON (nested too deeply)") from None
    except OSError as e:  # unreadable (permissions, I/O): a traceback, past the runtime's bad-config line
        raise ValueError(f"{path}: cannot read: {e}") from None
    return d


def load_hf_checkpoint(checkpoint_dir: str | os.PathLike, dtype: str = "float32"):
    """(config, params) from a local HF checkpoint directory (config.json + *.safetensors). Nothing downloads."""
    config = load_hf_config(checkpoint_dir, dtype)
    where = f"HF checkpoint {str(checkpoint_dir)!r}"  # (a missing tensor named no directory)
    mtp = _config_json(checkpoint_dir).get("num_nextn_predict_layers")  # (DeepSeek-V3's MTP layers, not read)
    mtp_layers = mtp if isinstance(mtp, int) and not isinstance(mtp, bool) and mtp >= 0 else None
    return config, hf_tensors_to_params(config, _read_safetensors(Path(checkpoint_dir)), where, mtp_layers)


def _saveable(params, path: tuple = ()) -> dict:
    """params (nnx.State or nested dict of arrays) -> nested dict of numpy arrays with str keys, or an error
    naming the first leaf orbax cannot store (it failed deep in tensorstore, "Unsupported data type", after
    creating its temporary directory; a None leaf was dropped from the checkpoint silently)."""
    if not path:
        if isinstance(params, nnx.State):
            params = nnx.to_pure_dict(params)
        if not isinstance(params, dict):
            raise ValueError(f"params must be an nnx.State or a dict of arrays, got {type(params).__name__}")
        if not params:
            raise ValueError("params: empty, nothing to save")
    out = {}
    for k, v in params.items():
        name = "/".join(map(str, path + (k,)))
        if isinstance(v, dict):
            out[str(k)] = _saveable(v, path + (k,))
            continue
        if v is None or isinstance(v, (str, bytes)):
            raise ValueError(f"params: {name} is {v!r}, not an array")
        arr = np.asarray(v)
        if not (arr.dtype.kind in "biufc" or (arr.dtype.kind == "V" and arr.dtype.type.__module__ == "ml_dtypes")):
            raise ValueError(f"params: {name} has dtype {arr.dtype}; only numeric arrays can be saved")
        out[str(k)] = arr
    return out


def _remove_partial_save(staging: Path | None, parent: Path, created: Path | None) -> None:
    """What a failed save left: its private staging directory (orbax's files, its temporary directory included)
    and the parent directories the save created, when empty. Never the target: another save may have put its
    checkpoint there meanwhile."""
    if staging is not None:
        for _ in range(50):  # (a file a late background write created while rmtree ran: removed on the next pass)
            shutil.rmtree(staging, ignore_errors=True)
            if not staging.exists():
                break
            time.sleep(0.02)
    if created is not None:
        d = parent
        while True:  # only directories this save created, and only when empty
            try:
                d.rmdir()
            except OSError:
                break
            if d == created:
                break
            d = d.parent


def _str_keys(tree):
    # orbax stores dict keys as strings; the layer list uses int keys in NNX.
    return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _int_keys(tree):
    if not isinstance(tree, dict):
        return tree
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}


# Per-array checksums, kept in orbax's checkpoint metadata (custom_metadata, written with the checkpoint and
# atomic with it): tensorstore writes the array chunks without a checksum of their own, so flipped bytes in
# ocdbt.process_0/d/* restored without an error, as wrong weights.
_CHECKSUMS = "dualpath_checksums"
_CHECKSUM_ALGO = "xxh3_64"


# The config the params were saved for (save_params(..., config=)): its fingerprint and fields, compared on restore.
_CONFIG = "dualpath_config"


def _config_fields(config) -> dict:
    """The config's fields that make its fingerprint, as JSON values (nested: the RoPE config's)."""
    import dataclasses

    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in config._NOT_IN_FINGERPRINT}
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def _config_differences(saved: dict, given: dict, prefix: str = "") -> list[str]:
    """`name: saved X, given Y` for each field that differs (nested dicts by dotted name)."""
    out = []
    for k in sorted(set(saved) | set(given)):
        a, b = saved.get(k, "<absent>"), given.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: saved {a!r}, given {b!r}")
    return out


def _digest(arr: np.ndarray) -> str:
    import xxhash

    arr = np.ascontiguousarray(arr)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return xxhash.xxh3_64_hexdigest(arr.reshape(-1).view(np.uint8))


def _checksums(tree: dict) -> dict:
    params = {
        "/".join(p): {"dtype": str(a.dtype), "shape": list(a.shape), _CHECKSUM_ALGO: _digest(a)}
        for p, a in _flat_paths(tree)
    }
    return {"version": 1, "algorithm": _CHECKSUM_ALGO, "params": params}


def save_params(checkpoint_dir: str | os.PathLike, params, config=None) -> None:
    """Save params (nnx.State or pure dict) with orbax to `checkpoint_dir` (must not exist yet).

    All or nothing: a save that fails removes what it wrote and raises ValueError naming the directory; an
    existing checkpoint is never touched. A checksum of every array's bytes goes into the checkpoint's metadata;
    restore_params verifies them. With `config` (the params' model config), the params must be that config's
    (names, shapes; ValueError naming the first that is not) and the config's fields are recorded too:
    restore_params then refuses another config, naming the fields that differ (weights restored into a config
    with the same param tree but another rope_theta, rms_norm_eps, RoPE scaling or MoE routing ran with other
    logits and no error)."""
    import orbax.checkpoint as ocp

    path = Path(checkpoint_dir).absolute()
    if path.exists() or path.is_symlink():
        raise ValueError(f"{checkpoint_dir}: already exists (save_params never overwrites a checkpoint)")
    tree = _saveable(params)
    custom = {_CHECKSUMS: _checksums(tree)}
    if config is not None:
        from models.runner import _check_param_shapes

        expected = abstract_params(config)
        _check_param_shapes(expected, tree)  # (names the first param missing, extra or misshapen)
        for p, want in _flat_paths(_str_keys(expected)):  # restore_params does not convert dtypes: it would refuse
            got = _get(tree, p).dtype
            if got != np.dtype(want.dtype):
                raise ValueError(f"params: {'/'.join(p)} has dtype {got}; the {config.dtype} config's is {want.dtype}")
        custom[_CONFIG] = {"fingerprint": config.fingerprint(kv_numerics=False), "fields": _config_fields(config)}
    created = next((p for p in reversed(path.parents) if not p.exists()), None)  # first missing ancestor
    # orbax writes into this save's own staging directory, renamed to `path` at the end: two saves to one path
    # shared orbax's fixed `<dir>.orbax-checkpoint-tmp`, and the cleanup of the one that failed removed `path`,
    # the checkpoint the other had just reported saved.
    staging = None
    ckptr = ocp.StandardCheckpointer()
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
            ckptr.save(staging / path.name, tree, custom_metadata=custom)
            ckptr.wait_until_finished()
            if path.exists() or path.is_symlink():  # rename would replace an empty directory
                raise FileExistsError(f"{checkpoint_dir} appeared while saving (another save?)")
            os.rename(staging / path.name, path)  # a non-empty `path` that appeared meanwhile: an error, kept
            staging.rmdir()
        except BaseException as e:
            for finish in (ckptr.wait_until_finished, ckptr.close):  # no background write may still run into what
                try:  # is removed next (close joins orbax's threads: a CI run found the parent left, 2026-12-06)
                    finish()
                except BaseException:  # noqa: BLE001 -- the same failure, already being handled
                    pass
            _remove_partial_save(staging, path.parent, created)
            if isinstance(e, Exception):
                raise ValueError(f"{checkpoint_dir}: saving failed, nothing was kept: {e}") from e
            raise
    finally:
        ckptr.close()


def _metadata_array_names(path: Path) -> list[str]:
    """The arrays orbax's _METADATA names (their keys joined by "."), or [] when it is missing or not JSON (orbax
    then reports what it finds). A JSON layout this does not recognise (another orbax version's) is a logged
    warning, not a silent [] (orbax 0.12.8 has no public API that reads the names without the arrays' metadata).
    A value type orbax has no handler for (a damaged one) is a ValueError naming the value."""
    try:
        meta = json.loads((path / "_METADATA").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return []
    try:
        entries = [
            (".".join(str(k["key"]) for k in entry["key_metadata"]), entry["value_metadata"])
            for entry in meta["tree_metadata"].values()
        ]
        names = [name for name, value in entries if value["value_type"] in ("np.ndarray", "jax.Array")]
    except (KeyError, TypeError, AttributeError):
        entries, names = [], []
    import orbax.checkpoint as ocp

    for name, value in entries:
        # A value type damaged in _METADATA ("np.ndarrax"): orbax created the metadata read of the arrays before it,
        # failed on this one's type, never awaited that read ("coroutine 'NumpyHandler.metadata' was never
        # awaited") and gave no metadata at all ("not an orbax checkpoint")
        if value.get("skip_deserialize") is not True and not ocp.type_handlers.has_type_handler(value["value_type"]):
            raise ValueError(
                f"_METADATA gives {name!r} the value type {value['value_type']!r}, which orbax has no handler for"
            )
    if not names:
        _LOG.warning(
            "%s: _METADATA's layout is not recognised (another orbax version?): the array names it lists are not "
            "checked against the stored arrays",
            path,
        )
    return names


def _metadata_says_ocdbt(path: Path) -> bool:
    try:
        return json.loads((path / "_METADATA").read_text(encoding="utf-8")).get("use_ocdbt") is True
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def _check_stored_values(path: Path, checkpoint_dir) -> set[bytes] | None:
    """Read every stored value's b-tree entry and last byte and check that every array _METADATA names is stored,
    with tensorstore, synchronously, before orbax reads anything. orbax gathers its reads, and when one failed (a
    damaged b-tree node, a data file gone or cut short, an array name damaged in _METADATA) it closed its event
    loop with the others still in flight: each of those then printed "RuntimeError: Event loop is closed" from
    tensorstore's threads (pytest: an unraisable exception in a later test), and a damaged b-tree came out as "not
    an orbax checkpoint". The stored keys, or None for a checkpoint that is not an OCDBT database."""
    if not (path / "manifest.ocdbt").is_file():
        # An OCDBT checkpoint without its root manifest: orbax's gathered metadata reads failed on every array, as
        # "not an orbax checkpoint", with dozens of "Event loop is closed" from tensorstore's threads
        if any(path.glob("ocdbt.process_*")) or _metadata_says_ocdbt(path):
            raise ValueError(
                f"{checkpoint_dir}: cannot read the checkpoint (damaged or incomplete?): no manifest.ocdbt"
            )
        return None  # not an OCDBT checkpoint: orbax reports what it finds
    import tensorstore as ts

    try:
        kv = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": f"{path}/"}}).result()
        keys = kv.list().result()
        for key in keys:
            # The value's last byte: its data file holds all of it. A data file gone reads as an empty value, not
            # as an error; orbax writes no empty value (zarr chunks and .zarray files are never empty).
            got = kv.read(key, byte_range=slice(-1, None)).result()
            if got.state != "value" or len(got.value) != 1:
                raise ValueError(f"the value of {key.decode(errors='replace')!r} is missing (a data file gone?)")
        # Every array _METADATA names is stored: a name damaged there (one flipped byte) failed the same way, inside
        # orbax's gathered metadata reads
        stored = set(keys)
        for name in _metadata_array_names(path):
            if not {f"{name}/.zarray".encode(), f"{name}/zarr.json".encode()} & stored:
                raise ValueError(f"_METADATA names the array {name!r}, which is not stored")
    except Exception as e:  # tensorstore's DATA_LOSS / NOT_FOUND / OUT_OF_RANGE ... as ValueError or RuntimeError
        raise ValueError(f"{checkpoint_dir}: cannot read the checkpoint (damaged or incomplete?): {e}") from None
    return stored


def _read_arrays(path: Path, target: dict, stored: set[bytes], checkpoint_dir) -> dict:
    """Every param of `target` decoded from the OCDBT database with tensorstore (the spec orbax reads with), in
    place of orbax's restore: all reads are issued at once, then each is waited for, so none is left in flight
    when one fails. orbax's gathered restore closed its event loop over the others when a chunk did not decompress
    ("Event loop is closed" from tensorstore's threads, an unraisable exception in a later test). One read of
    each array: the checksums are verified on these arrays."""
    import tensorstore as ts

    ctx = ts.Context()
    names = [".".join(p) for p, _ in _flat_paths(target)]

    def settle(futures: list) -> list:  # every future done before the first error is raised
        done, first = [], None
        for name, f in zip(names, futures, strict=True):
            try:
                done.append(f.result())
            except Exception as e:  # noqa: BLE001 -- raised below, once every read is over
                first = first or f"{name}: {e}"
                done.append(None)
        if first is not None:
            raise ValueError(f"{checkpoint_dir}: cannot read the checkpoint (damaged or incomplete?): {first}")
        return done

    specs = [
        {
            "driver": "zarr3" if f"{name}/zarr.json".encode() in stored else "zarr",
            "kvstore": {"driver": "ocdbt", "base": {"driver": "file", "path": f"{path}/"}, "path": f"{name}/"},
            "recheck_cached_data": False,
            "recheck_cached_metadata": False,
            "fill_missing_data_reads": False,  # a chunk gone is an error, not zeros
        }
        for name in names
    ]
    stores = settle([ts.open(spec, open=True, read=True, context=ctx) for spec in specs])
    arrays = settle([t.read() for t in stores])
    out: dict = {}
    for (p, _), arr in zip(_flat_paths(target), arrays, strict=True):
        _set(out, p, np.asarray(arr))
    return out


def restore_params(checkpoint_dir: str | os.PathLike, config) -> dict:
    """Restore params saved by save_params for `config` (shapes/dtypes checked against the config).

    ValueError naming the directory: no such path; not an orbax checkpoint; a param tree that does not match
    the config's model (names the first missing / extra param, or one of another shape or dtype: a float32
    checkpoint is not cast to a bfloat16 config, an int one not to a float config); a checkpoint whose files
    cannot be read, or whose array bytes differ from the checksums save_params stored (damaged or incomplete;
    names the param); a param with NaN / inf values (names it). A checkpoint saved without checksums (before
    they were stored) restores unverified, with a logged warning."""
    import orbax.checkpoint as ocp

    path = Path(checkpoint_dir).absolute()
    if not path.exists():
        raise ValueError(f"{checkpoint_dir}: no such checkpoint")
    if not path.is_dir():  # orbax: "Found incomplete checkpoint", reported as a config mismatch
        raise ValueError(f"{checkpoint_dir}: not an orbax checkpoint (not a directory)")
    stored = _check_stored_values(path, checkpoint_dir)
    target = _str_keys(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract_params(config)))
    ckptr = ocp.StandardCheckpointer()
    mismatch = f"{checkpoint_dir}: checkpoint does not match {config.architecture} config"
    try:
        saved = ckptr.metadata(path).item_metadata  # None: no _METADATA, or it could not be read
    except FileNotFoundError:
        saved = None
    except Exception as e:  # noqa: BLE001 -- a key damaged in _METADATA: orbax's parser raised a bare KeyError
        raise ValueError(
            f"{checkpoint_dir}: cannot read the checkpoint (damaged?): unreadable _METADATA: {e!r}"
        ) from None
    if saved is None:
        if (path / "_METADATA").is_file():  # there, but orbax could not parse it (one flipped byte: not JSON)
            raise ValueError(f"{checkpoint_dir}: cannot read the checkpoint (damaged?): unreadable _METADATA")
        raise ValueError(f"{checkpoint_dir}: not an orbax checkpoint, or an incomplete one (no readable metadata)")
    _check_saved_config(ckptr, path, checkpoint_dir, config)
    # The saved tree against the config's, before reading any array: orbax named neither side of a mismatch
    # ("tree structures do not match") and a read error of a damaged checkpoint came out as a mismatch too.
    saved_leaves = {
        tuple(str(getattr(k, "key", k)) for k in p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]
    }
    wanted = {tuple(p): want for p, want in _flat_paths(target)}
    for p, want in wanted.items():
        if p not in saved_leaves:
            raise ValueError(f"{mismatch}: {'/'.join(p)} is not in the checkpoint")
        shape = tuple(getattr(saved_leaves[p], "shape", ()))
        if shape != tuple(want.shape):
            raise ValueError(f"{mismatch}: {'/'.join(p)} has shape {shape}; expected {tuple(want.shape)}")
        # orbax casts to the target's dtype: int32 weights came back as float32 silently
        dtype = getattr(saved_leaves[p], "dtype", None)
        if dtype is None or np.dtype(dtype) != np.dtype(want.dtype):
            raise ValueError(
                f"{mismatch}: {'/'.join(p)} has dtype {dtype}; expected {np.dtype(want.dtype)} "
                f"(restore_params does not convert dtypes)"
            )
    extra = sorted(set(saved_leaves) - set(wanted))
    if extra:  # e.g. a deeper model's layers, or an lm_head for a tied config
        raise ValueError(f"{mismatch}: the checkpoint has {'/'.join(extra[0])}, not a param of this config's model")
    checksums = _stored_checksums(ckptr, path, checkpoint_dir)
    if stored is not None:  # an OCDBT database (what save_params writes): each array read once, by us
        restored = _read_arrays(path, target, stored, checkpoint_dir)
    else:
        try:
            restored = ckptr.restore(path, target)
        except Exception as e:  # tensorstore NOT_FOUND / FAILED_PRECONDITION / DATA_LOSS: files missing or damaged
            raise ValueError(f"{checkpoint_dir}: cannot read the checkpoint (damaged or incomplete?): {e}") from e
        restored = jax.tree.map(np.asarray, restored)
    # orbax restores the saved shapes, not the target's (checked above from the metadata; kept as a guard)
    for p, want in _flat_paths(target):
        got = _get(restored, p)
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"{mismatch}: {'/'.join(p)} has shape {tuple(got.shape)}; expected {tuple(want.shape)}")
        name = "/".join(p)
        if checksums is not None:
            rec = checksums.get(name)
            if not isinstance(rec, dict) or not isinstance(rec.get(_CHECKSUM_ALGO), str):
                raise ValueError(f"{checkpoint_dir}: the checkpoint's checksum record has no valid entry for {name}")
            if rec.get("dtype") != str(got.dtype) or _digest(got) != rec[_CHECKSUM_ALGO]:
                raise ValueError(
                    f"{checkpoint_dir}: cannot read the checkpoint (damaged or incomplete?): {name} does not match "
                    f"the checksum stored when it was saved"
                )
        # After the checksum (damaged bytes are named as such): NaN / inf weights saved as they were came back
        # without an error (only ModelRunner refused them later); the HF import refuses them too, naming the tensor
        if not np.isfinite(got).all():
            raise ValueError(f"{checkpoint_dir}: {name} has non-finite values (NaN or inf) in the checkpoint")
    return _int_keys(restored)


def _check_saved_config(ckptr, path: Path, checkpoint_dir, config) -> None:
    """A checkpoint saved with its config (save_params(..., config=)) restores only into an equal one (equal
    fingerprint); one saved without a config is not checked (a logged warning says so)."""
    try:
        custom = ckptr.metadata(path).custom_metadata
    except Exception:  # noqa: BLE001 -- no _CHECKPOINT_METADATA: _stored_checksums reports it
        return
    record = custom.get(_CONFIG) if isinstance(custom, dict) else None
    if record is None:  # (a restore into another config, rope theta say, was silent)
        _LOG.warning(
            "%s: the checkpoint recorded no config, so the one given is not checked against it; save with "
            "save_params(dir, params, config) to record it",
            checkpoint_dir,
        )
        return
    if not (isinstance(record, dict) and isinstance(record.get("fingerprint"), str)):
        raise ValueError(f"{checkpoint_dir}: the checkpoint's config record is damaged")
    if record["fingerprint"] == config.fingerprint(kv_numerics=False):  # (weights: KV numerics do not change them)
        return
    saved = record.get("fields")
    diffs = _config_differences(saved, _config_fields(config)) if isinstance(saved, dict) else []
    raise ValueError(
        f"{checkpoint_dir}: saved for another config: "
        f"{'; '.join(diffs[:4]) or 'fingerprint ' + record['fingerprint']}{' ...' if diffs[4:] else ''} "
        f"(restore_params needs the config the params were saved with)"
    )


def _stored_checksums(ckptr, path: Path, checkpoint_dir) -> dict | None:
    """The per-param checksums save_params stored, or None (with a warning) for a checkpoint saved without them."""
    meta_file = path / "_CHECKPOINT_METADATA"  # orbax's; it logs an unreadable one and carries on without it
    if meta_file.exists():
        try:
            ok = isinstance(json.loads(meta_file.read_text(encoding="utf-8")), dict)
        except (OSError, ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            ok = False
        if not ok:
            raise ValueError(f"{checkpoint_dir}: cannot read the checkpoint (damaged?): unreadable {meta_file.name}")
    try:
        custom = ckptr.metadata(path).custom_metadata
    except Exception:  # noqa: BLE001 -- no _CHECKPOINT_METADATA: as a checkpoint without checksums
        custom = None
    record = custom.get(_CHECKSUMS) if isinstance(custom, dict) else None
    if record is None:
        _LOG.warning(
            "%s: the checkpoint has no checksums (saved before they were stored, or its _CHECKPOINT_METADATA is "
            "gone): the array bytes are restored unverified",
            checkpoint_dir,
        )
        return None
    params = record.get("params") if isinstance(record, dict) else None
    if not isinstance(params, dict) or record.get("algorithm") != _CHECKSUM_ALGO:
        raise ValueError(f"{checkpoint_dir}: the checkpoint's checksum record is damaged or of an unknown kind")
    return params
