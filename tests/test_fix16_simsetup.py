"""Simulator setups of one's own (helper fix16_simsetup): a researcher's own model, hardware, P/D layout and dataset
in a config file outside configs/, run with experiments.simulate / sweep.

Found walking that journey: a run of a model or GPU profile registered by the config file recorded only its name,
so its run.json did not run again without the file (README "What ran": "a simulation runs from its recorded config
alone"); a NIC rate given in Gbps where the field takes GB/s ran 8x too fast without a word, and a GPU profile's own
NICs and GPU count were ignored for the cluster's defaults without one; a sweep could not vary a cluster field (no
variant item for it); a synthetic dataset of one's own had the policy's β profiled on the 64K dataset's turn shape;
`pd_bounds` could not read a config; weights larger than a GPU were told to set the KV room.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest

from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import sim_config_from_dict
from dualpath_jax.sim.configs_io import load_config
from schedulers import cost_model
from schedulers.hardware import HARDWARE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "sim_tiny.py")

# A small dense GQA model and a GPU of one's own (names no built-in registry holds)
MY_SHAPE = cost_model.ModelShape(
    name="fix16-dense", layers=8, hidden=1024, heads=16, kv_heads=4, head_dim=64, intermediate=2816, vocab=32000
)
MY_GPU = dataclasses.replace(HARDWARE.get("h200"), name="fix16-gpu", cnic_bandwidth=25e9, snic_bandwidth=25e9)


@pytest.fixture
def registries(monkeypatch):
    """The model-shape and hardware registries as copies, so that what a test registers is gone after it."""
    monkeypatch.setattr(cost_model.MODEL_SHAPES, "_entries", dict(cost_model.MODEL_SHAPES._entries))
    monkeypatch.setattr(HARDWARE, "_entries", dict(HARDWARE._entries))
    return cost_model.MODEL_SHAPES, HARDWARE


def _my_config_dict(**cluster) -> dict:
    d = load_config(TINY + ":dualpath,agents=2,turns=2").to_dict()
    d["cluster"].update(model="fix16-dense", hardware="fix16-gpu", de_hbm_reserve_gb=0.0, **cluster)
    return d


# ------------------------------------------------------------ a recorded config of one's own model and hardware


def test_a_recorded_config_of_ones_own_model_and_hardware_loads_without_its_config_file(registries):
    """README "What ran": without the config file, `sim_config_from_dict(run.json's config)` runs the same simulation.
    A model or GPU registered by the config file (the only way to simulate one's own) was recorded by its name only,
    so the recorded config did not load anywhere else ("config.cluster.model 'x' unknown"). The resolved config now
    carries the shape and the profile that ran (`model_shape`, `hardware_profile`), and loading it registers them."""
    from experiments.simulate import ran_config

    shapes, hardware = registries
    shapes.add("fix16-dense", MY_SHAPE)
    hardware.add("fix16-gpu", MY_GPU)
    d = _my_config_dict()
    sc = sim_config_from_dict(d)
    recorded = json.loads(json.dumps(ran_config(d, sc, "/tmp/x")))  # as run.json / summary.json hold it
    assert recorded["model_shape"]["layers"] == 8 and recorded["hardware_profile"]["snic_bandwidth"] == 25e9
    del shapes._entries["fix16-dense"], hardware._entries["fix16-gpu"]  # another process, without the file
    again = sim_config_from_dict(recorded)
    assert again.cluster == sc.cluster and shapes.get("fix16-dense") == MY_SHAPE and hardware.get("fix16-gpu") == MY_GPU
    # a built-in model's record loads as before (the registered shape is the recorded one)
    tiny = load_config(TINY).to_dict()
    assert sim_config_from_dict(ran_config(tiny, sim_config_from_dict(tiny), "/tmp/x")).cluster.model == "ds27b"


def test_a_recorded_shape_that_differs_from_the_registered_one_is_refused_by_name(registries):
    """A record of a model whose registered shape has changed since (another commit, an edited file) would run
    another model under the same name: refused, naming the field and the difference."""
    from experiments.simulate import ran_config

    shapes, hardware = registries
    shapes.add("fix16-dense", MY_SHAPE)
    hardware.add("fix16-gpu", MY_GPU)
    d = _my_config_dict()
    recorded = ran_config(d, sim_config_from_dict(d), "/tmp/x")
    recorded["model_shape"] = dict(recorded["model_shape"], layers=12)
    with pytest.raises(ValueError, match=r"config.model_shape .*'fix16-dense'.*layers 12 .*8"):
        sim_config_from_dict(recorded)
    recorded = ran_config(d, sim_config_from_dict(d), "/tmp/x")
    recorded["hardware_profile"] = dict(recorded["hardware_profile"], hbm_bytes=80e9)
    with pytest.raises(ValueError, match=r"config.hardware_profile .*'fix16-gpu'.*hbm_bytes"):
        sim_config_from_dict(recorded)
    recorded = ran_config(d, sim_config_from_dict(d), "/tmp/x")
    recorded["model_shape"] = dict(recorded["model_shape"], name="other")  # not the model the cluster names
    with pytest.raises(ValueError, match=r"config.model_shape is 'other'.*config.cluster.model 'fix16-dense'"):
        sim_config_from_dict(recorded)


# ------------------------------------------------------------------------ a NIC rate given in Gbps, not GB/s


@pytest.mark.parametrize("field, value", [("snic_gbps", 400.0), ("cnic_gbps", 400.0), ("dram_gbps", 4000.0)])
def test_a_rate_given_in_gigabits_is_named_in_a_warning(caplog, field, value):
    """`snic_gbps` / `cnic_gbps` / `dram_gbps` are GB/s (1e9 bytes/s; the paper's 400 Gbps NIC is 50), though the name
    reads as gigabits: `--config.cluster.snic_gbps=400` for a 400 Gbps NIC ran a NIC 8x too fast, silently. A rate
    exactly 8x the hardware profile's figure is that slip: a warning names the field and both units."""
    d = load_config(TINY).to_dict()
    d["cluster"][field] = value
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):
        sim_config_from_dict(d)
    (msg,) = [r.getMessage() for r in caplog.records if field in r.getMessage()]
    assert f"config.cluster.{field} = {value:g} GB/s" in msg and "GB/s (1e9 bytes/s), not Gbps" in msg, msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):
        sim_config_from_dict(load_config(TINY).to_dict())  # the profile's own rates: no word
        sim_config_from_dict(load_config(TINY, {f"cluster.{field}": value / 4}).to_dict())  # another NIC: no word
    assert not [r for r in caplog.records if "Gbps" in r.getMessage()], caplog.text


# ---------------------------------------------------------------- a cluster field as a variant item (a sweep's load)


def test_a_cluster_field_is_a_variant_item_so_a_sweep_can_vary_the_hardware():
    """README "Run": a sweep's "load" is any variant item ("a parameter sweep"), but no variant item set a cluster
    field, so comparing NIC bandwidths, GPUs per node or HBM took one config file per value (`--loads=` and `--extra=`
    take variant items only; a sweep has no `--config.*` flags). `cluster.NAME=value` sets one, as `policy.NAME=value`
    sets a policy field; halving the storage NIC on a storage-bound run makes it slower, doubling it not slower."""
    from experiments.sweep import cell_spec, run_cell

    spec = cell_spec(TINY, "basic", "cluster.snic_gbps=0.5", "agents=4,turns=3")
    sc = load_sim_config(spec, as_run=True)
    assert sc.cluster.snic_gbps == 0.5 and isinstance(sc.cluster.snic_gbps, float)
    assert load_sim_config(TINY + ":cluster.gpus_per_node=4,cluster.hardware=h200").cluster.gpus_per_node == 4
    assert load_sim_config(TINY + ":cluster.de_host_buffer_gb=40").cluster.de_host_buffer_gb == 40.0
    jct = {s: run_cell((TINY, "basic", f"cluster.snic_gbps={s}", "agents=4,turns=3", ""))["jct_s"] for s in (0.5, 1, 2)}
    assert jct[0.5] > jct[1] >= jct[2], jct


@pytest.mark.parametrize(
    "item, message",
    [
        ("cluster.snic_gbs=25", r"config variant item 'cluster.snic_gbs=25': config.cluster has no field 'snic_gbs'.*"
         r"snic_gbps"),
        ("cluster.layerwise=maybe", r"config variant item 'cluster.layerwise=maybe': config.cluster.layerwise must be "
         r"true or false, got 'maybe'"),
        ("cluster.snic_gbps=fast", r"config variant item 'cluster.snic_gbps=fast': config.cluster.snic_gbps must be a "
         r"number, got 'fast'"),
        ("cluster.=1", r"unknown key 'cluster.'"),
        ("pd=1P2D,cluster.decode_nodes=3", r"pd=1P2D and cluster.decode_nodes=3 both set the P/D layout; give one"),
        ("cluster.prefill_nodes=3,pd=1P2D", r"pd=1P2D and cluster.prefill_nodes=3 both set the P/D layout; give one"),
    ],
)  # fmt: skip
def test_a_bad_cluster_variant_item_is_refused_naming_it(item, message):
    with pytest.raises(ValueError, match=message):
        load_config(f"{TINY}:{item}")


def test_a_mode_replacing_a_cluster_variant_item_says_so(caplog):
    """A mode sets its cluster switches whatever the config says; it logs each one the user gave that it replaces
    (`--config.cluster.layerwise=true` with `:basic`), and so for a variant item."""
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):
        sc = load_sim_config(f"{TINY}:basic,cluster.layerwise=true", as_run=True)
    assert sc.cluster.layerwise is False
    assert "config.mode 'basic' sets config.cluster.layerwise=False: the given True is not used" in caplog.text


# ------------------------------------------------------------------ β of a synthetic dataset of one's own


@pytest.fixture
def datasets(monkeypatch):
    from dualpath_jax.workloads.synthetic import DATASETS

    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))
    return DATASETS


def _beta(sim) -> int:
    return sim.policy.config.beta_tokens


def _beta_at(sim, context: float, append: float) -> int:
    cfg = sim.cfg
    pre = sim.cost.prefill
    return max(1, int(5.0 * (context + append) / (pre.prefill_time(context, append) * cfg.cluster.pe_time_scale)))


def test_beta_is_profiled_on_a_dataset_of_ones_own_not_on_the_64k_one(datasets):
    """β (prompt tokens one PE processes in 5 s, PAPER.md: profiled) is derived at a dataset's turn shape; the runner
    knew the shapes of the paper's 32K / 48K / 64K only and took the 64K one for any other dataset, silently. A
    dataset of one's own now gives its Table-2-like targets (`target_context`, `target_append`) or, without them, its
    run's mean turn (context and append); the paper's datasets keep Table 2's shapes."""
    from dualpath_jax.sim.runner import DATASET_SHAPE, build_simulator

    spec = dataclasses.replace(datasets.get("32K"), name="fix16-set", target_context=4_000, target_append=900)
    datasets.add("fix16-set", spec)
    sim = build_simulator(load_sim_config(TINY + ":dualpath,dataset=fix16-set,agents=3,turns=4"))
    assert _beta(sim) == _beta_at(sim, 4_000, 900) != _beta_at(sim, *DATASET_SHAPE["64K"])
    datasets.add("fix16-bare", dataclasses.replace(spec, name="fix16-bare", target_context=0.0, target_append=0.0))
    sim = build_simulator(load_sim_config(TINY + ":dualpath,dataset=fix16-bare,agents=3,turns=4"))
    turns = [s for t in sim.trajectories for s in t.turn_shapes(1)]  # (prompt, context, gen)
    context, append = sum(c for _, c, _ in turns) / len(turns), sum(p - c for p, c, _ in turns) / len(turns)
    assert _beta(sim) == _beta_at(sim, context, append)
    sim = build_simulator(load_sim_config(TINY + ":dualpath,agents=3,turns=4"))  # 32K: Table 2's shape, as before
    assert _beta(sim) == _beta_at(sim, *DATASET_SHAPE["32K"])


# ------------------------------------------------- a GPU profile's network figures beside the cluster's defaults


def test_a_hardware_profiles_network_figures_left_out_of_the_cluster_are_named(registries, caplog):
    """The simulator takes a GPU's compute and HBM from `config.cluster.hardware`, its links (NICs, GPUs per node, host
    memory and buffer) from `config.cluster.*`. A profile of one's own with 200 Gbps NICs and 4 GPUs a node, with the
    cluster fields left at their defaults, ran 8 GPUs a node on 400 Gbps NICs without a word: each such field is named
    in a warning. Set in the cluster (the profile's figure or another), nothing is said."""
    shapes, hardware = registries
    hardware.add("fix16-gpu", dataclasses.replace(MY_GPU, gpus_per_node=4))
    d = load_config(TINY).to_dict()
    d["cluster"].update(hardware="fix16-gpu", gpus_per_node=8)  # (sim_tiny's 2 GPUs: the default 8 again)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):
        sim_config_from_dict(d)
    text = caplog.text
    for field, mine in (("snic_gbps", "25 GB/s"), ("cnic_gbps", "25 GB/s"), ("gpus_per_node", "4")):
        assert f"config.cluster.{field} is its default" in text and f"hardware profile 'fix16-gpu' gives {mine}" in text
    assert "dram_gbps" not in text and "host_buffer_gb" not in text  # (the profile's are the defaults)
    caplog.clear()
    d["cluster"].update(snic_gbps=25.0, cnic_gbps=30.0, gpus_per_node=4)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):
        sim_config_from_dict(d)
        sim_config_from_dict(load_config(TINY).to_dict())  # a built-in profile, sim_tiny's own cluster
    assert not caplog.records, caplog.text


# ------------------------------------------------------------------------------------ pd_bounds of a config file


def _pd_bounds(*args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "experiments.pd_bounds", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_pd_bounds_reads_g_s_b_and_m_from_a_simulator_config_and_places_its_pd():
    """README "P/D range" for a setup of one's own: `pd_bounds` took --g, --s, --B_GBps, --M_GBps only, to be copied
    from the config by hand (s = snic_gbps / cnic_gbps). `--config=FILE[:variant]` takes them from the config's
    cluster and says where its own P/D falls."""
    out = _pd_bounds(f"--config={REPO}/configs/paper_ds27b.py:pd=1P2D,cluster.cnic_gbps=25")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "g=8  s=2  B=25 GB/s  M=500 GB/s  M/(B*s)=10" in out.stdout, out.stdout
    assert "P/D range: 1/3 (0.3333) ... 3/2 (1.5000)  [feasible]" in out.stdout, out.stdout
    assert "config P/D: 1P2D = 1/2 (0.5000): inside the range" in out.stdout, out.stdout
    out = _pd_bounds(f"--config={REPO}/configs/paper_ds27b.py:pd=1P8D")
    assert "config P/D: 1P8D = 1/8 (0.1250): below the range (pe_cnic_in binds)" in out.stdout, out.stdout + out.stderr
    out = _pd_bounds(f"--config={REPO}/configs/paper_ds27b.py:pd=4P1D")
    assert "config P/D: 4P1D = 4 (4.0000): above the range (de_cnic_in, de_host_mem bind)" in out.stdout, out.stdout
    out = _pd_bounds(f"--config={REPO}/configs/sim_tiny.py", "--g=4")  # two sources of g: which one?
    assert out.returncode != 0 and "--config takes g, s, B and M from the config: leave out --g" in out.stderr


# ------------------------------------------------------------- a model whose weights do not fit one GPU at all


def test_weights_larger_than_a_gpu_are_not_told_to_set_the_kv_room(registries):
    """A dense 70B model (139 GB of bf16 weights) on 80 GB GPUs: the error said "set config.cluster.de_hbm_kv_gb", and
    doing so ran a DE holding 139 GB of weights on an 80 GB GPU. The simulator runs one engine per GPU (dense: DP
    only, no tensor parallelism), so no KV room makes it fit: the error says that instead."""
    from dualpath_jax.sim.config import SimConfigError
    from dualpath_jax.sim.runner import build_simulator

    shapes, _ = registries
    big = dataclasses.replace(MY_SHAPE, name="fix16-70b", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128,
                              intermediate=28672, vocab=128256)  # fmt: skip
    shapes.add("fix16-70b", big)
    d = load_config(TINY).to_dict()
    d["cluster"].update(model="fix16-70b", hardware="h100", de_hbm_reserve_gb=0.0)
    with pytest.raises(SimConfigError, match=r"fix16-70b weights \(139\.\d GB per DE\) do not fit one h100 GPU \(80\.0 GB "
                       r"of HBM\): .*one engine per GPU") as e:  # fmt: skip
        build_simulator(sim_config_from_dict(d))
    assert "de_hbm_kv_gb" not in str(e.value), e.value
    d["cluster"].update(model="qwen2.5-32b", hbm_usable_fraction=0.5)  # fits the GPU, not its usable share: as before
    with pytest.raises(SimConfigError, match=r"leave no HBM for KV on h100; set config.cluster.de_hbm_kv_gb"):
        build_simulator(sim_config_from_dict(d))


def test_beta_of_a_trace_run_is_profiled_on_the_traces_own_turns():
    """A trace run's β was profiled at the config's `dataset` shape (a synthetic dataset the trace does not use;
    sim_tiny's 32K): it is the trace's mean turn (context, append) now."""
    from dualpath_jax.sim.runner import DATASET_SHAPE, build_simulator
    from dualpath_jax.workloads.traces import traces_dir

    name = "mooncake_conversation_trace.jsonl.gz"
    if not (traces_dir() / name).exists():
        pytest.skip(f"real traces not found at {traces_dir()}")
    cfg = load_sim_config(
        TINY,
        {"workload.kind": "trace", "workload.trace_path": name, "workload.max_turns": 4, "scheduler.name": "dualpath"},
    )
    sim = build_simulator(cfg)
    turns = [s for t in sim.trajectories for s in t.turn_shapes(1)]  # (prompt, context, gen)
    context, append = sum(c for _, c, _ in turns) / len(turns), sum(p - c for p, c, _ in turns) / len(turns)
    assert _beta(sim) == _beta_at(sim, context, append) != _beta_at(sim, *DATASET_SHAPE[cfg.workload.dataset])


def test_a_given_de_kv_room_no_gpu_of_the_profile_has_is_named(caplog):
    """`config.cluster.de_hbm_kv_gb` given (not derived) was taken whatever the GPU: 500 GB of KV room on an 80 GB
    H800 beside DS 660B's 37.5 GB of weights ran without a word. It still runs (a what-if), with a warning naming
    both figures; the paper configs (derived or fitting rooms) say nothing."""
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):
        for spec in ("configs/paper_ds660b.py", "configs/paper_ds27b.py", "configs/paper_qwen32b.py"):
            load_sim_config(spec)
        assert "de_hbm_kv_gb" not in caplog.text
        sc = load_sim_config("configs/paper_ds660b.py", {"cluster.de_hbm_kv_gb": 500.0})
    assert sc.cluster.de_hbm_kv_gb == 500.0
    assert "config.cluster.de_hbm_kv_gb = 500 GB is more than the 42.5 GB a h800 GPU (80.0 GB of HBM)" in caplog.text
