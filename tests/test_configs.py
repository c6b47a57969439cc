"""configs/*.py: the variant strings and the commands their docstrings, README.md and HISTORY.md document."""

import importlib
import os
import re

import pytest

from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import check_sim_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/sim_tiny.py"
_SIMULATE = re.compile(r"python -m experiments\.simulate --config=(configs/\S+?\.py(?::\S+)?)((?: --config\.\S+=\S+)*)")


def _documented_simulate_commands() -> list[tuple[str, dict]]:
    # HISTORY.md (README's moved change log and fix histories) holds commands people copy too
    texts = [open(os.path.join(REPO, name)).read() for name in ("README.md", "HISTORY.md")]
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if name.endswith(".py") and name != "__init__.py":
            texts.append(importlib.import_module(f"configs.{name[:-3]}").__doc__ or "")
    found = {}
    for text in texts:
        for m in _SIMULATE.finditer(text.replace("`", " ")):
            overrides = dict(o.split("=", 1) for o in m.group(2).replace("--config.", "").split())
            found[m.group(1) + m.group(2)] = (m.group(1), overrides)
    return sorted(found.values(), key=repr)


def test_the_docs_name_simulator_commands():
    specs = {spec.split(":")[0] for spec, _ in _documented_simulate_commands()}
    assert {"configs/paper_ds660b.py", "configs/paper_scale.py", "configs/sim_tiny.py"} <= specs


@pytest.mark.parametrize("spec, overrides", _documented_simulate_commands(), ids=repr)
def test_every_documented_simulator_config_loads_and_passes_the_checks(spec, overrides):
    check_sim_config(load_sim_config(spec, overrides))


def test_a_variant_with_two_modes_is_an_error():
    # `:basic,dualpath` ran dualpath (the last mode won, silently)
    with pytest.raises(ValueError, match=r"config variant 'basic,dualpath': two modes, 'basic' and 'dualpath'"):
        load_sim_config(f"{TINY}:basic,dualpath")
    assert load_sim_config(f"{TINY}:dualpath,agents=4,dualpath").policy == "dualpath"  # the same one twice is fine


def test_aps_and_an_offline_kind_in_one_variant_is_an_error():
    # `kind=offline,aps=0.4` ran online and `aps=0.4,kind=offline` offline: the order of the items decided
    for variant in ("kind=offline,aps=0.4", "aps=0.4,kind=offline", "aps=0.4,kind=trace"):
        with pytest.raises(ValueError, match=r"aps= makes the workload online; it cannot go with kind="):
            load_sim_config(f"{TINY}:dualpath,{variant}")
    for variant in ("kind=online,aps=0.4", "aps=0.4,kind=online", "aps=0.4"):
        cfg = load_sim_config(f"{TINY}:dualpath,{variant}")
        assert cfg.workload.kind == "online" and cfg.workload.aps == 0.4


def test_tiny_runtime_variants():
    from configs import tiny_runtime

    assert tiny_runtime.get_config("test").runtime.launcher == "inprocess"
    assert tiny_runtime.get_config(None).runtime.launcher == "local"
    with pytest.raises(ValueError, match=r"configs/tiny_runtime.py: unknown variant 'tset'; known: test"):
        tiny_runtime.get_config("tset")


def test_runs_started_in_the_same_second_get_directories_of_their_own(tmp_path):
    """`experiments.run` / `bench_runtime` name their results (and kept-store) directories by the second they
    start: two launches in one second wrote into one directory (and shared a kept store's subdirectory, so
    the second run hit the first one's blocks)."""
    import concurrent.futures

    from experiments import fresh_dir_or_exit

    first = fresh_dir_or_exit(str(tmp_path / "results"), "20261203-031500", "--config.results_dir")
    second = fresh_dir_or_exit(str(tmp_path / "results"), "20261203-031500", "--config.results_dir")
    assert os.path.basename(first) == "20261203-031500" and os.path.basename(second) == "20261203-031500-2"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: fresh_dir_or_exit(str(tmp_path / "r"), "same", "--x"), range(16)))
    assert len(set(made)) == 16 and all(os.path.isdir(p) for p in made)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"bad --config.results_dir .*a-file.*cannot write there"):
        fresh_dir_or_exit(str(blocker), "20261203-031500", "--config.results_dir")
