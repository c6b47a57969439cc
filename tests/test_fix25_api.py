"""The Python API's entry points given a wrong argument: an error that names it and what to pass instead (fix25's
API audit, /work/notes/fix25_api_report.md). In-process calls only, nothing runs."""

import dataclasses
import json
import math

import ml_collections
import pytest

from dualpath_jax import sim
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import ConfigError, RuntimeConfig, validate_workload
from dualpath_jax.sim.config import SimConfig, sim_config_from_dict
from dualpath_jax.store import LocalDirStore
from dualpath_jax.traffic import ClusterLinks, TrafficManager
from schedulers.api import PendingRequest
from schedulers.cost_model import CostModel
from transport.feeder import LayerFeeder, StoreLayerSource

LAYOUT = BlockLayout(num_layers=4, block_tokens=16, bytes_per_token_per_layer=40, fingerprint="test-model/bf16")


def test_prepare_refuses_a_config_dict_naming_the_conversion():
    """A config file's ConfigDict was a dataclasses TypeError six calls deep; a dict an AttributeError."""
    c = ml_collections.ConfigDict({"model": "tiny_qwen2", "workload": {"agents": 2}})
    for given in (c, c.to_dict()):
        with pytest.raises(ConfigError, match=r"RuntimeConfig\.from_config_dict\(c\.runtime\)"):
            driver.prepare(given)
        with pytest.raises(ConfigError, match="expected a RuntimeConfig"):
            driver.run(given)


def test_replace_with_an_unknown_dotted_field_names_its_path():
    cfg = RuntimeConfig()
    with pytest.raises(ConfigError, match=r"config\.workload: unknown field\(s\) \['agentz'\]; known: \[.*'agents'"):
        cfg.replace(**{"workload.agentz": 3})
    with pytest.raises(ConfigError, match=r"^config: unknown field\(s\) \['modle'\]"):
        cfg.replace(modle="x")
    with pytest.raises(ConfigError, match=r"config\.model has no fields"):
        cfg.replace(**{"model.name": "x"})
    # the same message as from_config_dict's
    with pytest.raises(ConfigError, match=r"config\.workload: unknown field\(s\) \['agentz'\]; known:"):
        RuntimeConfig.from_config_dict({"workload": {"agentz": 3}})
    assert cfg.replace(**{"workload.agents": 3}).workload.agents == 3


def test_negative_max_seq_len_is_a_range_error():
    """It said "shorter than the workload's last turn" (the tiny workload's fit check ran first)."""
    cfg = RuntimeConfig().replace(**{"cluster.max_seq_len": -5})
    with pytest.raises(ConfigError, match=r"config\.cluster\.max_seq_len must be >= 1, got -5"):
        validate_workload(cfg)


def test_sim_config_from_dict_refuses_a_sim_configs_own_fields():
    """`dataclasses.asdict(SimConfig)` was "dictionary update sequence element #0 has length 1"."""
    fields = dataclasses.asdict(SimConfig())
    for given in (fields, json.loads(json.dumps(fields)), {"policy": "dualpath"}):
        with pytest.raises(
            ValueError, match=r"SimConfig's fields .* ConfigDict\.to_dict\(\) or a run\.json's 'config'"
        ):
            sim_config_from_dict(given)
    sc = sim_config_from_dict({"scheduler": {"name": "dualpath"}, "batcher": {"name": "fifo"}})
    assert (sc.policy, sc.batcher) == ("dualpath", "fifo")


def test_sim_run_checks_max_time_and_its_config():
    cfg = SimConfig()
    for bad in (-1, 0, "5", math.nan, True):
        with pytest.raises(ValueError, match=r"max_time must be a number of simulated seconds > 0"):
            sim.run(cfg, max_time=bad)
    with pytest.raises(TypeError, match=r"expected a SimConfig, got dict: .*load_sim_config"):
        sim.run({"policy": "dualpath"})


def test_cost_model_degree_error_shows_the_value_given():
    with pytest.raises(ValueError, match=r"ep='16'"):
        CostModel("ds660b", "h800", ep="16")


def test_pending_request_with_a_str_count_is_named():
    with pytest.raises(ValueError, match=r"request 0: token counts must be numbers, got prompt='4096'"):
        PendingRequest(0, 0, 0, "4096", 0, 1)
    with pytest.raises(ValueError, match="not bools"):  # (still its own message)
        PendingRequest(0, 0, 0, True, 0, 1)


def test_for_cluster_wants_a_mapping():
    with pytest.raises(TypeError, match="engines_per_node must be a mapping node -> engine ids"):
        TrafficManager.for_cluster([0, 1], ClusterLinks(1e6, 1e6))


def test_layer_feeder_compares_layer_nbytes_with_its_sources():
    source = StoreLayerSource(None, [bytes(16)] * 3, LAYOUT)  # 3 blocks x 16 tokens x 40 bytes a layer
    with pytest.raises(ValueError, match=r"layer_nbytes=100 but its source gives layers of 1920 bytes"):
        LayerFeeder(4, source, 100)
    LayerFeeder(4, source, 1920).close()


def test_lookup_of_a_str_names_the_keys_argument(tmp_path):
    store = LocalDirStore(tmp_path / "kv", LAYOUT)
    try:
        with pytest.raises(TypeError, match=r"keys must be a sequence of block keys .* got a str 'abc'"):
            store.lookup("abc")
    finally:
        store.close()
