"""dualpath-jax: DualPath (storage -> PE and storage -> DE -> PE KV loading) in JAX.

Keep this file free of heavy imports: `schedulers/` and the simulator import leaf modules of this
package (registry, workloads, metrics) and must not pull in jax.
"""

__version__ = "0.1.0"
