"""Bad input, fix25 (each test failed before its fix): a dict override that replaces a whole config section, a
get_config that returns a plain dict, HF weights of more layers than config.json (or an unread lm_head bias), an
orbax checkpoint as the runtime model, trace and config-file hints, and the log lines of skipped session files and
of a trace replay's span."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def _last_line(out: subprocess.CompletedProcess) -> str:
    return [line for line in out.stderr.splitlines() if line.strip()][-1]


@pytest.mark.parametrize(
    "module, args, drops",
    [
        # the workload fell back to SimConfig's defaults (64K, 3600 s), rc=0
        ("experiments.simulate", ["--config=configs/sim_tiny.py", "--config.workload={'n_agents': 4}"], "dataset"),
        # the runtime: AttributeError "'kind'" out of refuse_unused_workload_overrides (the default config file)
        ("experiments.run", ["--config.runtime.workload={'agents': 2}"], "arrival"),
        ("experiments.bench_runtime", ["--config.runtime.cluster={'decode_slots': 2}"], "max_seq_len"),
    ],
)
def test_a_dict_that_replaces_a_config_section_is_refused(tmp_path, module, args, drops):
    where = "output_dir" if module == "experiments.simulate" else "results_dir"  # (if it ran: not in the repo)
    out = _launch(module, *args[:-1], f"--config.{where}={tmp_path}/out", args[-1])
    last = _last_line(out)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-1500:]
    assert last.startswith(f"bad override {args[-1]}: it replaces the whole section"), last
    assert f" {drops}," in last and "set fields one by one (--config." in last, last


def test_a_workload_section_without_arrival_is_judged_by_the_default(monkeypatch):
    # a config file whose runtime.workload has no `arrival` (the run takes WorkloadConfig's offline): an AttributeError
    # traceback out of refuse_unused_workload_overrides
    from types import SimpleNamespace

    from absl import flags

    from configs.tiny_runtime import get_config
    from experiments import refuse_unused_workload_overrides

    config = get_config("test")
    del config.runtime.workload["arrival"]
    given = {"runtime.workload.aps": 2.0}
    monkeypatch.setattr(flags, "FLAGS", {"config": SimpleNamespace(override_values=given, config_filename="x.py")})
    with pytest.raises(SystemExit, match=r"aps=2.0 is not used by this run: config.runtime.workload.arrival='offline'"):
        refuse_unused_workload_overrides(SimpleNamespace(name="config", value=config))


def test_an_open_option_dict_still_takes_a_dict(tmp_path):
    # scheduler.kwargs is {} in the file: the dict goes through (the policy's own check names the unknown field)
    out = _launch(
        "experiments.simulate",
        "--config=configs/sim_tiny.py",
        "--config.scheduler.kwargs={'zz': 1}",
        f"--config.output_dir={tmp_path}/out",
    )
    assert out.returncode != 0 and "whole section" not in out.stderr and "Traceback" not in out.stderr
    assert "'dualpath' does not take ['zz']" in _last_line(out), out.stderr[-1500:]


@pytest.mark.parametrize("module", ["experiments.simulate", "experiments.run"])
def test_a_get_config_that_returns_a_dict_is_named(tmp_path, module):
    # was "AttributeError: 'dict' object has no attribute 'to_dict'", or with an override "bad override ... the
    # config has no field 'output_dir'"
    path = tmp_path / "as_dict.py"
    path.write_text("def get_config(arg=None):\n    return {'cluster': {'model': 'ds27b'}}\n")
    for extra in ([], ["--config.output_dir=/nonexistent/x"]):
        out = _launch(module, f"--config={path}", *extra)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-1500:]
        assert _last_line(out).startswith(f"bad config: config file '{path}': get_config returned {{'cluster'"), out
        assert "(dict), not an ml_collections ConfigDict" in _last_line(out)


def test_a_json_config_file_gets_the_not_py_hint(tmp_path):
    from dualpath_jax.sim.configs_io import ConfigFileError, load_config

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"cluster": {"model": "ds27b"}}))  # (valid Python: it loads, without get_config)
    with pytest.raises(ConfigFileError, match=r"has no get_config\(arg\) \(it is not a \.py file"):
        load_config(str(path))


def _zero_tensors(cfg) -> dict:
    from models.checkpoint import abstract_params
    from models.registry import family

    expected = abstract_params(cfg)
    tensors = {}
    for path, (names, transform) in family(cfg).hf_tensor_map(cfg).items():
        want = expected
        for k in path:
            want = want[k]
        shape = {"T": want.shape[::-1], "stackT": want.shape[1:][::-1]}.get(transform, want.shape)
        for name in names if isinstance(names, list) else [names]:
            tensors[name] = np.zeros(shape, np.float32)
    return tensors


def test_hf_weights_of_a_deeper_model_or_an_lm_head_bias_are_refused(tmp_path, caplog):
    # config.json with fewer layers than the weights ran the truncated model (a warning); DeepSeek-V3's MTP layers
    # (num_hidden_layers .. + num_nextn_predict_layers) still load with a warning
    from test_models_checkpoint import QWEN2_HF
    from test_models_hunt2 import DEEPSEEK_V3_HF

    from models.checkpoint import hf_tensors_to_params, load_hf_checkpoint
    from models.registry import config_from_hf

    qwen = config_from_hf(QWEN2_HF)
    tensors = _zero_tensors(qwen)
    deeper = {**tensors, "model.layers.2.mlp.up_proj.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match=r"'model.layers.2.mlp.up_proj.weight' is a weight .* \(num_hidden_layers=2"):
        hf_tensors_to_params(qwen, deeper)
    with pytest.raises(ValueError, match=r"tensor 'lm_head.bias' is a weight of the model"):
        hf_tensors_to_params(qwen, {**tensors, "lm_head.bias": np.zeros(96, np.float32)})
    v3 = config_from_hf(DEEPSEEK_V3_HF)
    v3_tensors = _zero_tensors(v3)
    n = v3.num_layers
    mtp = {**v3_tensors, f"model.layers.{n}.eh_proj.weight": np.zeros((2, 2), np.float32)}
    with caplog.at_level(logging.WARNING, logger="models.checkpoint"):
        assert hf_tensors_to_params(v3, mtp)  # (1 MTP layer by default)
    # (the warning says what the unused layer is: it read as a mistake)
    assert f"layers [{n}] are multi-token-prediction modules (num_nextn_predict_layers)" in caplog.text, caplog.text
    with pytest.raises(ValueError, match=rf"'model.layers.{n + 1}.eh_proj.weight' is a weight"):
        hf_tensors_to_params(v3, {**mtp, f"model.layers.{n + 1}.eh_proj.weight": np.zeros((2, 2), np.float32)})
    assert hf_tensors_to_params(
        v3, {**mtp, f"model.layers.{n + 1}.eh_proj.weight": mtp[f"model.layers.{n}.eh_proj.weight"]}, mtp_layers=2
    )
    # load_hf_checkpoint reads num_nextn_predict_layers from config.json
    pytest.importorskip("safetensors")
    from test_models_checkpoint import write_hf_checkpoint

    write_hf_checkpoint(tmp_path / "no_mtp", {**DEEPSEEK_V3_HF, "num_nextn_predict_layers": 0}, mtp)
    with pytest.raises(ValueError, match=rf"'model.layers.{n}.eh_proj.weight' is a weight"):
        load_hf_checkpoint(tmp_path / "no_mtp")


def test_an_orbax_checkpoint_as_the_runtime_model_names_restore_params(tmp_path):
    from models.checkpoint import load_hf_config

    (tmp_path / "_CHECKPOINT_METADATA").write_text("{}")
    with pytest.raises(ValueError, match=r"no config.json \(an orbax checkpoint: restore it with .*restore_params"):
        load_hf_config(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no config.json$"):  # (any other directory: as before)
        load_hf_config(tmp_path / "empty")


def test_workload_stats_lists_the_datasets_only_for_a_missing_path(tmp_path):
    bad = tmp_path / "neg.jsonl"
    bad.write_text(json.dumps({"timestamp": 0, "input_length": -5, "output_length": 3, "hash_ids": [1]}) + "\n")
    plain_gz = tmp_path / "zipped.jsonl"  # (gzip without .gz: "byte 0x8b at column 2 is not UTF-8", no hint)
    plain_gz.write_bytes(gzip.compress(b'{"timestamp": 0}\n'))
    out = _launch("experiments.workload_stats", f"--workload={bad}")
    assert "input_length" in _last_line(out) and "synthetic datasets" not in out.stderr, out.stderr[-1500:]
    out = _launch("experiments.workload_stats", f"--workload={plain_gz}")
    assert "starts with gzip's magic bytes 1f 8b" in _last_line(out) and "zipped.jsonl.gz" in _last_line(out)
    out = _launch("experiments.workload_stats", f"--workload={tmp_path}/missing.jsonl")
    assert "synthetic datasets: 32K, 48K, 64K" in _last_line(out), out.stderr[-1500:]


def test_a_session_directory_logs_the_files_it_does_not_read(tmp_path, caplog):
    from dualpath_jax.workloads.traces import load_kvcache_tester

    session = {"id": "s", "block_size": 64, "requests": [{"t": 0, "type": "n", "in": 64, "out": 2, "hash_ids": [1]}]}
    (tmp_path / "trace_0001.json").write_text(json.dumps(session))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "x.jsonl").write_text("")
    with caplog.at_level(logging.INFO, logger="dualpath_jax.workloads.traces"):
        assert len(load_kvcache_tester(tmp_path)) == 1
    assert "not read, 2 other file(s): notes.txt, x.jsonl" in caplog.text, caplog.text


def test_prepare_logs_the_span_of_a_trace_replay(tmp_path, caplog):
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError, RuntimeConfig

    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": 1000 * i, "input_length": 40, "output_length": 4, "hash_ids": [i]} for i in range(3)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = get_config("test").runtime
    c.workload.kind, c.workload.trace, c.workload.arrival, c.workload.agents = "trace", str(trace), "trace", 0
    c.workload.time_scale = 2.0
    c.cluster.max_seq_len = 8  # (refused after the line: nothing is built)
    cfg = RuntimeConfig.from_config_dict(c).replace(store_dir=str(tmp_path / "store"))
    with caplog.at_level(logging.INFO, logger="dualpath_jax.runtime.driver"), pytest.raises(ConfigError):
        driver.prepare(cfg)
    assert "arrival=trace: 3 agents arrive over 4 s (the first at 0 s" in caplog.text, caplog.text


def test_prepare_logs_how_far_a_trace_replays_later_turns_reach(tmp_path, caplog):
    # (session 42: "8 agents arrive over 0 s", then the bar stood at 9/11 for 100 s: later turns waited for their times)
    import dataclasses

    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError, RuntimeConfig

    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": 0, "input_length": 40, "output_length": 4, "hash_ids": [i]} for i in range(2)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = get_config("test").runtime
    c.workload.kind, c.workload.trace, c.workload.arrival, c.workload.agents = "trace", str(trace), "trace", 0
    c.cluster.max_seq_len = 8  # (refused after the line: nothing is built)
    cfg = RuntimeConfig.from_config_dict(c)
    trajs = driver.make_trajectories(cfg)
    late = dataclasses.replace(trajs[1].turns[-1], arrival_offset_s=107.0)
    trajs[1] = dataclasses.replace(trajs[1], turns=[*trajs[1].turns[:-1], late])
    with caplog.at_level(logging.INFO, logger="dualpath_jax.runtime.driver"), pytest.raises(ConfigError):
        driver.prepare(cfg, trajs)
    assert "arrive over 0 s (the first at 0 s), their turns' recorded times reach 107 s" in caplog.text, caplog.text


def test_a_section_given_whole_may_leave_out_an_option_dict_empty_in_the_file():
    # (--config.scheduler="{'name': 'basic'}" was refused for "dropping" scheduler.kwargs, {} in the file)
    from experiments import _dropped_keys

    assert _dropped_keys({"name": None, "kwargs": {}}, {"name": "basic"}) == []
    assert _dropped_keys({"name": None, "kwargs": {"x": None}}, {"name": "basic"}) == ["kwargs"]
