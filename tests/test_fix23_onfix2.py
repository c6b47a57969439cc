"""fix23 "onfix2": two leftovers of the online audit (/work/notes/fix23_online_report.md, findings 4 and 5).

1. `experiments.bench_runtime` printed an online run's SLO attainment and verdict, runtime / simulator copy, but not
   the TTFT / TPOT at `slo.percentile` over the window that the verdict rests on (`slo_lines`).
2. `experiments.run` / `bench_runtime` printed a runtime ConfigError with RuntimeConfig's own paths
   (`bad config: config.workload.aps ...`) where the flag is `--config.runtime.workload.aps`
   (`experiments.runtime_config_line`).
"""

from __future__ import annotations

import math
import re

import pytest

from dualpath_jax.metrics import TurnRecord, slo_summary


def _launcher_config(**runtime):
    from configs.tiny_runtime import get_config

    c = get_config("test")
    for key, value in runtime.items():
        node = c.runtime
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c


def _runtime_config(**runtime):
    from dualpath_jax.runtime.config import RuntimeConfig

    return RuntimeConfig.from_config_dict(_launcher_config(**runtime).runtime)


# ---- 1. bench_runtime: the judged percentiles beside the attainment ----------------------------------------------
def _turns(ttfts, tpot):
    # 11-token turns: TPOT = (finished - first_token) / 10
    return [
        TurnRecord(i, 0, 64, 0, 11, arrival=float(i), first_token=i + t, finished=i + t + 10 * tpot)
        for i, t in enumerate(ttfts)
    ]


@pytest.mark.parametrize("percentile", [90.0, 99.0])
def test_bench_runtime_prints_the_judged_percentiles_of_runtime_and_copy(percentile):
    from dualpath_jax.runtime.config import SloConfig
    from experiments.bench_runtime import slo_lines

    slo = SloConfig(ttft_s=1.0, tpot_s=0.05, percentile=percentile)
    judge = lambda recs: slo_summary(recs, slo.ttft_s, slo.tpot_s, slo.percentile, 0.0, 100.0)  # noqa: E731
    measured = {"basic": judge(_turns([0.1] * 8 + [2.0, 3.0], 0.04)), "dualpath": judge(_turns([0.2] * 10, 0.02))}
    copy = {"basic": judge(_turns([0.3] * 10, 0.07)), "dualpath": judge([])}  # (the copy judged no turn)
    lines = slo_lines(slo, (0.0, 9.0), measured, copy)
    q = f"{percentile:g}"
    assert lines[0].endswith("turns arriving in [0, 9] s), runtime / sim:") and f"(p{q} TTFT <= 1 s" in lines[0]
    assert lines[1].split() == ["attainment", "TTFT", f"p{q}", "s", "TPOT", f"p{q}", "ms", "verdict"]
    basic, dualpath = (re.split(r"\s{2,}", line.strip()) for line in lines[2:])
    m, c = measured["basic"], copy["basic"]
    ttft = f"{m[f'ttft_p{q}_s']:.3f} / {c[f'ttft_p{q}_s']:.3f}"
    assert basic == ["basic", "80.0% / 0.0%", ttft, "40.0 / 70.0", "missed / missed"]
    assert ttft == ("2.100 / 0.300" if q == "90" else "2.910 / 0.300")  # (numpy's linear percentile of the TTFTs)
    assert dualpath == ["dualpath", "100.0% / n/a", "0.200 / n/a", "20.0 / n/a", "met / n/a"]


def test_bench_runtime_without_its_copy_still_prints_the_runtimes_verdict():
    from dualpath_jax.runtime.config import SloConfig
    from experiments.bench_runtime import slo_lines

    slo = SloConfig(ttft_s=1.0, tpot_s=0.05, percentile=90.0)
    measured = {"basic": slo_summary(_turns([0.5] * 4, 0.01), 1.0, 0.05, 90.0, 0.0, math.inf)}
    lines = slo_lines(slo, (0.0, math.inf), measured)
    assert lines[0].endswith("turns arriving in [0, inf] s), runtime:")
    assert re.split(r"\s{2,}", lines[2].strip()) == ["basic", "100.0%", "0.500", "10.0", "met"]


# ---- 2. a runtime ConfigError names the flag's path -------------------------------------------------------------
def _flag_paths(line: str) -> list[str]:
    return re.findall(r"(?<![\w./-])config(?:\.\w+)+", line)


def _resolves(config, path: str) -> bool:
    node = config
    for part in path.split(".")[1:]:
        if part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize(
    "runtime, says",
    [
        (
            {"workload.arrival": "online", "workload.aps": 0.0},
            "bad config: config.runtime.workload.aps must be > 0 and finite for arrival='online', got 0.0",
        ),
        ({"workload.arrival": "online", "slo.percentile": 0.0}, "bad config: config.runtime.slo.percentile must be"),
        (
            {"workload.arrival": "online", "workload.aps": 1e-300, "run_timeout_s": 20.0},
            "bad config: config.runtime.run_timeout_s=20 s ends before",
        ),
    ],
)
def test_a_runtime_config_error_names_the_flags_path(runtime, says):
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError
    from experiments import runtime_config_line

    with pytest.raises(ConfigError) as e:
        driver.prepare(_runtime_config(**runtime))
    line = runtime_config_line(e.value)
    assert line.startswith(says), line
    launcher = _launcher_config(**runtime)
    paths = _flag_paths(line)
    assert paths and all(p.startswith("config.runtime.") and _resolves(launcher, p) for p in paths), paths


def test_an_unknown_runtime_field_names_the_runtime_section():
    from dualpath_jax.runtime.config import ConfigError, RuntimeConfig
    from experiments import runtime_config_line

    c = _launcher_config()
    c.runtime.unlikely_field = 1
    with pytest.raises(ConfigError) as e:
        RuntimeConfig.from_config_dict(c.runtime)
    assert runtime_config_line(e.value).startswith("bad config: config.runtime: unknown field(s) ['unlikely_field']")


def test_paths_that_already_name_the_flag_or_the_launchers_fields_stay():
    from dualpath_jax.runtime.config import ConfigError
    from experiments import runtime_config_line

    text = (
        "--config.runtime.workload.aps=4.0 is not used by this run: config.runtime.workload.arrival='offline'; "
        "config.policies, config.results_dir, config.warmup, sim_config.cluster, ops.config.batch_invariant, "
        "configs/tiny_runtime.py, of_config(config)"
    )
    assert runtime_config_line(ConfigError(text)) == f"bad config: {text}"
    mixed = "config.store 'x' opens root=config.store_dir; config.model_seed, config.model"
    assert runtime_config_line(ConfigError(mixed)) == (
        "bad config: config.runtime.store 'x' opens root=config.runtime.store_dir; config.runtime.model_seed, "
        "config.runtime.model"
    )


def test_bench_runtime_prints_a_runtime_config_error_with_the_flags_path(tmp_path):
    import os
    import subprocess
    import sys

    flags = ["--config.runtime.workload.arrival=online", "--config.runtime.slo.percentile=0"]
    out = subprocess.run(
        [sys.executable, "-m", "experiments.bench_runtime", "--config=configs/tiny_runtime.py:test", *flags,
         f"--config.results_dir={tmp_path / 'r'}"],
        cwd=os.path.join(os.path.dirname(__file__), ".."), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-1500:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == "bad config: config.runtime.slo.percentile must be > 0 and <= 100, got 0.0", last
    assert not (tmp_path / "r").exists()
