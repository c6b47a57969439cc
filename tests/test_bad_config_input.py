"""Bad input to the launchers and config checks: one `bad config: ...` line naming the field (or file) and the
value, before anything starts, instead of a traceback, a misleading message, a verdict from no data or a run that
waits out its timeout.

- a --config / --setups file that does not load (not Python, a syntax error, a failing import, no get_config, an
  error raised by get_config): was a traceback, or "bad override" although no override was given;
- simulator, online workload: warmup_s >= duration_s was an SLO verdict (slo_met=False) judged on zero turns;
- runtime, arrivals beyond run_timeout_s (aps=1e-300): the run waited out the timeout, then a RunFailed traceback;
- runtime, workload.scale / time_scale = inf: an OverflowError / "turn gap nan" traceback;
- runtime, negative seeds: a numpy traceback (workload.seed), the wrong field named (model_seed);
- runtime, a decode batch cache larger than this host's memory: RESOURCE_EXHAUSTED in the node processes.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import ConfigError, host_memory_bytes, validate, validate_workload
from dualpath_jax.sim import load_config, load_sim_config
from dualpath_jax.sim.configs_io import ConfigFileError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(module: str, *args: str, timeout: float = 180):
    """`python -m module args...` from the repository root (a child process: the launchers define absl flags)."""
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _last_line(out) -> str:
    lines = [x for x in (out.stdout + out.stderr).splitlines() if x.strip() and not x.startswith(("I1", "W1"))]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------ config files that do not load
@pytest.fixture
def bad_files(tmp_path):
    files = {
        "syntax": "x = (\n",
        "import": "def get_config(arg=None):\n    import no_such_module_xyz\n",
        "no_get_config": "X = 1\n",
        "key_error": "def get_config(arg=None):\n    return {}['missing_key']\n",
        "attribute_error": "import os\nos.no_such_attribute\n",
        "returns_none": "def get_config(arg=None):\n    cfg = {}\n",  # (its `return cfg` forgotten)
    }
    out = {}
    for name, text in files.items():
        out[name] = tmp_path / f"{name}.py"
        out[name].write_text(text)
    return {k: str(v) for k, v in out.items()}


LOAD_CASES = {
    # case -> (file key or a repository path, what the one line says)
    "not_python": ("README.md", "bad config: SyntaxError: "),
    "syntax": ("syntax", "bad config: SyntaxError: '(' was never closed (config file "),
    "import": ("import", "bad config: ModuleNotFoundError: No module named 'no_such_module_xyz' (from config file "),
    "no_get_config": ("no_get_config", "has no get_config(arg)"),
    "key_error": ("key_error", "bad config: KeyError: 'missing_key' (from config file "),
    "attribute_error": ("attribute_error", "bad config: AttributeError: module 'os' has no attribute"),
    # simulate said "--config is required" although one was given; run / bench_runtime: absl's traceback
    "returns_none": ("returns_none", "get_config returned None (its get_config has no `return`?)"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_simulate_reports_a_config_file_that_does_not_load_in_one_line(bad_files, tmp_path, case):
    key, says = LOAD_CASES[case]
    path = bad_files.get(key, key)
    out = _launch("experiments.simulate", f"--config={path}", "--noplot", f"--output_dir={tmp_path}/out")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-1500:]
    last = _last_line(out)
    assert last.startswith("bad config: ") and says in last and "bad override" not in out.stderr, last
    if case == "not_python":
        assert "'README.md'" in last and "not a .py file" in last


@pytest.mark.parametrize("case", ["no_get_config", "key_error", "attribute_error", "returns_none"])
def test_run_reports_an_error_of_the_config_file_not_as_a_bad_override(bad_files, case):
    # was: `bad override: the config has no field "module 'config_config' has no attribute 'get_config"`
    key, says = LOAD_CASES[case]
    out = _launch("experiments.run", f"--config={bad_files[key]}")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-1500:]
    last = _last_line(out)
    assert last.startswith("bad config: ") and says in last and "bad override" not in out.stderr, last


@pytest.mark.parametrize("case", ["no_get_config", "not_python"])
def test_sweep_reports_a_setup_file_that_does_not_load_in_one_line(bad_files, tmp_path, case):
    key, says = LOAD_CASES[case]
    path = bad_files.get(key, key)
    out = _launch("experiments.sweep", f"--setups={path}", "--noplot", f"--output_dir={tmp_path}/sweep")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-1500:]
    last = _last_line(out)
    assert last.startswith("bad config: ") and says in last, last


def test_an_override_of_a_missing_field_is_still_a_bad_override():
    out = _launch("experiments.simulate", "--config=configs/sim_tiny.py", "--config.cluster.snic_gbs=1", "--noplot")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert _last_line(out).startswith("bad override --config.cluster.snic_gbs=1: the config has no field 'snic_gbs'")


@pytest.mark.parametrize(
    "case, match",
    [
        ("not_python", r"SyntaxError: .*config file '.*README.md'.*not a \.py file"),
        ("syntax", r"SyntaxError: '\(' was never closed \(config file '.*syntax\.py', line 1\)"),
        ("import", r"ModuleNotFoundError: No module named 'no_such_module_xyz' \(from config file"),
        ("no_get_config", r"config file '.*no_get_config\.py' has no get_config\(arg\)"),
        ("key_error", r"KeyError: 'missing_key' \(from config file"),
    ],
)
def test_load_config_raises_one_config_file_error_naming_the_file(bad_files, case, match):
    key = LOAD_CASES[case][0]
    with pytest.raises(ConfigFileError, match=match):
        load_config(bad_files.get(key, os.path.join(REPO, key)))


def test_load_config_keeps_a_get_config_value_error_and_loads_good_files():
    with pytest.raises(ValueError, match="agents must be an integer") as e:
        load_config(os.path.join(REPO, "configs/sim_tiny.py:agents=abc"))
    assert not isinstance(e.value, ConfigFileError)
    assert load_config(os.path.join(REPO, "configs/sim_tiny.py")).workload.kind


# ------------------------------------------------------------------------------------------ simulator: warm-up
def test_sim_online_warmup_at_or_past_the_arrival_window_is_refused():
    # was: slo_turns=0, slo_met=False although every TTFT/TPOT was far within the SLO
    for warmup in (60, 1000):
        with pytest.raises(ValueError, match=rf"config.warmup_s \({warmup}\) must be below config.workload.duration_s"):
            load_sim_config(os.path.join(REPO, f"configs/sim_tiny.py:aps=0.5,warmup={warmup}"))
    sc = load_sim_config(os.path.join(REPO, "configs/sim_tiny.py:aps=0.5,warmup=30"))
    assert sc.warmup_s == 30 and sc.workload.duration_s == 60


def test_simulate_launcher_refuses_the_warmup_in_one_line(tmp_path):
    out = _launch(
        "experiments.simulate", "--config=configs/sim_tiny.py:aps=0.5,warmup=1000", f"--output_dir={tmp_path}"
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert _last_line(out).startswith(
        "bad config: config.warmup_s (1000) must be below config.workload.duration_s (60)"
    )


# ----------------------------------------------------------------------------- runtime: arrivals past the timeout
def test_online_arrivals_beyond_the_run_timeout_are_refused_before_start(base):
    cfg = base.replace(**{"workload.arrival": "online", "workload.aps": 1e-300, "run_timeout_s": 20.0})
    with pytest.raises(ConfigError, match=r"config.run_timeout_s=20 s ends before the workload's last agent arrives"):
        driver.prepare(cfg)


def test_online_arrivals_within_the_run_timeout_pass(base, ops):
    cfg = base.replace(**{"workload.arrival": "online", "workload.aps": 10.0, "run_timeout_s": 20.0})
    driver.prepare(cfg, model_ops=ops)


def test_run_launcher_refuses_arrivals_past_the_timeout_in_one_line(tmp_path):
    args = [
        "--config=configs/tiny_runtime.py:test",
        f"--config.results_dir={tmp_path}",
        "--config.policies=basic",
        "--config.runtime.workload.arrival=online",
        "--config.runtime.workload.aps=1e-300",
        "--config.runtime.run_timeout_s=20",
    ]
    out = _launch("experiments.run", *args)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-1500:]
    last = _last_line(out)
    assert (
        last.startswith("bad config: config.runtime.run_timeout_s=20 s")
        and "config.runtime.workload.aps=1e-300" in last
    ), last


# --------------------------------------------------------------------------------- runtime: non-finite scales
@pytest.mark.parametrize("field", ["scale", "time_scale"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 0.0])
def test_workload_scales_must_be_positive_and_finite(base, field, value):
    cfg = base.replace(**{"workload.kind": "synthetic", f"workload.{field}": value})
    with pytest.raises(ConfigError, match=rf"config.workload.{field} must be > 0 and finite, got {value}"):
        validate_workload(cfg)


def test_an_infinite_scale_is_refused_before_the_trajectories_are_made(base):
    # was: OverflowError: cannot convert float infinity to integer (driver._scaled)
    with pytest.raises(ConfigError, match=r"config.workload.scale must be > 0 and finite, got inf"):
        driver.prepare(base.replace(**{"workload.kind": "synthetic", "workload.scale": math.inf}))


# --------------------------------------------------------------------------------------- runtime: negative seeds
@pytest.mark.parametrize("field", ["workload.seed", "model_seed"])
def test_a_negative_seed_is_one_error_naming_its_field(base, field):
    with pytest.raises(ConfigError, match=rf"^config.{re.escape(field)} must be >= 0, got -1$"):
        driver.prepare(base.replace(**{field: -1}))


def test_run_launcher_names_a_negative_model_seed(tmp_path):
    # was: `bad config: config.model: expected non-negative integer`
    args = ["--config=configs/tiny_runtime.py:test", f"--config.results_dir={tmp_path}", "--config.policies=basic"]
    out = _launch("experiments.run", *args, "--config.runtime.model_seed=-1")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-1500:]
    assert _last_line(out) == "bad config: config.runtime.model_seed must be >= 0, got -1"


# ------------------------------------------------------------------------------------ runtime: decode cache size
@pytest.mark.parametrize("launcher", ["local", "inprocess"])
def test_a_decode_cache_larger_than_this_host_is_refused_naming_the_fields(base, launcher):
    limit, what = host_memory_bytes()
    kv = 1024  # B/token, all layers
    slots = limit // (base.cluster.max_seq_len * kv) + 1
    # (one decode engine: the limit of one engine's cache; every engine's together: test_mutation_audit2)
    cfg = base.replace(
        **{"launcher": launcher, "transport": "tcp", "cluster.decode_slots": slots, "cluster.decode_nodes": 1}
    )
    need = slots * base.cluster.max_seq_len * kv
    with pytest.raises(ConfigError) as e:
        validate(cfg, kv)
    msg = str(e.value)
    assert msg.startswith(
        f"config.cluster.decode_slots={slots} x config.cluster.max_seq_len={base.cluster.max_seq_len}"
    )
    assert f"= {need} B" in msg and f"is more than {what}: {limit} B" in msg
    buffers = cfg.buffers.pe_buffer_bytes + cfg.buffers.de_buffer_bytes  # (1 PE + 1 DE node, on this host too)
    fits = (limit - buffers) // (base.cluster.max_seq_len * kv)
    validate(cfg.replace(**{"cluster.decode_slots": fits}), kv)  # fits beside the buffers: no error


def test_prepare_refuses_an_impossible_decode_cache_before_any_model_is_built(base):
    # was (decode_slots=1e6): RESOURCE_EXHAUSTED from models/runner.py init_decode in the node processes
    from dualpath_jax.runtime.model_ops import model_config

    kv = model_config(base.model).kv_bytes_per_token
    slots = host_memory_bytes()[0] // (base.cluster.max_seq_len * kv) + 1
    with pytest.raises(ConfigError, match=rf"^config.cluster.decode_slots={slots} x config.cluster.max_seq_len="):
        driver.prepare(base.replace(**{"cluster.decode_slots": slots}))


# ------------------------------------------------------------------------------- runtime: a block no slot can fill
def test_a_block_larger_than_a_decode_slot_is_refused_naming_both_fields(base):
    """block_size=128 with max_seq_len=100 ran with no error and read 0.00 MB on both paths: a slot holds at most
    max_seq_len + 1 tokens and only whole blocks are stored, so no block ever filled (helper fix18 "models")."""
    cfg = base.replace(**{"cluster.max_seq_len": 100, "block_size": 128})
    with pytest.raises(ConfigError, match=r"config.block_size=128 is more than the 101 tokens a decode slot holds"):
        validate(cfg)
    validate(base.replace(**{"cluster.max_seq_len": 127, "block_size": 128}))  # (a slot of 128 fills one block)


# ------------------------------------------------------------------- runtime: a fixed TCP port on a shared host
@pytest.mark.parametrize("launcher, engines", [("local", 3), ("inprocess", 3)])
def test_a_fixed_tcp_port_shared_by_a_hosts_endpoints_is_refused(base, launcher, engines):
    """transport_options port=N made every endpoint of the host bind N: each node process died with "Address already
    in use" tracebacks whether N was free or not, and the run failed ~20 s later (helper fix18 "fault")."""
    cfg = base.replace(**{"transport": "tcp", "launcher": launcher, "transport_options": {"port": 45124}})
    with pytest.raises(ConfigError, match=rf"port=45124: the {engines} TCP endpoints of the '{launcher}' launcher"):
        validate(cfg)
    validate(cfg.replace(transport_options={"port": 0}))  # (0: each its own, the default)
    one = {"cluster.prefill_nodes": 1, "cluster.decode_nodes": 1, "cluster.engines_per_node": 1}
    with pytest.raises(ConfigError, match=r"the 2 TCP endpoints"):
        validate(cfg.replace(**one))
