"""On a host with several accelerators each engine runs on its own device (`node.engine_models`: engine e on local
device e % count, `ModelOps.on_device`); all of them ran on the default device, so a node's g GPUs (or the node
processes of one host) shared GPU 0. Checked on XLA:CPU with two host devices (XLA's
`--xla_force_host_platform_device_count`), in a fresh process: each engine's weights, steps and decode cache are on
its device, and greedy tokens stay the single-device reference's. The default device's engine uses the ops'
own weights, and a node process (`node.node_model_ops`) makes its weights on its first engine's device: nothing of
them on the default device, where every node process of the host and its engine's copy put them before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json
import jax, jax.numpy as jnp
import numpy as np
from conftest import reference_of
from configs.tiny_runtime import get_config
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.model_ops import ModelOps
from dualpath_jax.runtime.node import engine_models

def on(tree):
    return sorted({str(d) for leaf in jax.tree.leaves(tree) for d in leaf.devices()})

base = RuntimeConfig.from_config_dict(get_config("test").runtime)
ops = ModelOps.of_config(base)
models = engine_models(ops, [0, 1, 2])
out = {"local_devices": len(jax.local_devices()), "weights": {e: on(m.runner.layer_states) for e, m in models.items()}}
out["one_copy_per_device"] = models[0] is models[2] and models[0] is not models[1]
out["default_device_engine_is_the_ops"] = models[0] is ops  # (a copy beside the ops' own weights: twice on device 0)

# a node process of engines 1 and 2 (`node_model_ops`): its weights made on device 1, nothing of them on device 0
import gc
from dualpath_jax.runtime.node import node_model_ops

def on_device0():
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays() if jax.local_devices()[0] in a.devices())

weights = sum(leaf.nbytes for leaf in jax.tree.leaves(ops.runner.layer_states))
before = on_device0()
node_ops = node_model_ops(base, [1, 2])
out["node_weights_on_device0"] = (on_device0() - before) / weights
out["node_weights"] = on(node_ops.runner.layer_states)
out["node_committed"] = all(leaf.committed for leaf in jax.tree.leaves(node_ops.runner.layer_states))
node_models = engine_models(node_ops, [1, 2])
out["node_engine1_is_the_ops"] = node_models[1] is node_ops
out["node_engine2"] = on(node_models[2].runner.layer_states)
n1 = node_models[1]
out["node_embed_on"] = on(n1.runner.embed_step(n1.runner.embed_state, jnp.arange(8, dtype=jnp.int32)[None]))
d1 = models[1]
out["embed_on"] = on(d1.runner.embed_step(d1.runner.embed_state, jnp.arange(8, dtype=jnp.int32)[None]))
out["decode_cache_on"] = on(d1.new_decode_batch(2, 64).runner.decode_caches)
cfg = base.replace(**{"scheduler.name": "dualpath", "cluster.engines_per_node": 2, "workload.agents": 2})
trajs = driver.make_trajectories(cfg)
res = driver.run(cfg, trajs, model_ops=ops)
ref = reference_of(cfg, ops, trajs)
out["turns"] = len(res.records)
out["differing"] = [list(k) for k in ref if not np.array_equal(ref[k], res.tokens[k])]
print("RESULT " + json.dumps(out))
"""


def test_engines_of_a_multi_device_host_run_each_on_its_own_device():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {
        **os.environ,
        "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip(),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests, os.environ.get("PYTHONPATH", "")]),
    }
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=os.path.dirname(tests), env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (line,) = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    out = json.loads(line[len("RESULT ") :])
    assert out["local_devices"] == 2
    w = out["weights"]
    assert all(len(d) == 1 for d in w.values()) and w["0"] == w["2"] != w["1"], w  # engine e on device e % 2
    assert out["one_copy_per_device"] and out["default_device_engine_is_the_ops"]
    # a node process's weights on its first engine's device only (they were made on device 0 first)
    assert out["node_weights"] == w["1"] and out["node_committed"] and out["node_embed_on"] == w["1"], out
    assert out["node_weights_on_device0"] < 0.01, out
    assert out["node_engine1_is_the_ops"] and out["node_engine2"] == w["0"], out
    assert out["embed_on"] == out["weights"]["1"] and out["decode_cache_on"] == out["weights"]["1"]
    assert out["turns"] == 2 * 3 and out["differing"] == []
