"""schedulers: the policy registry, inter-engine policies, intra-engine batching and the cost model.

Plain Python/NumPy on the host: nothing here imports jax (the simulator runs these objects at 1,152-GPU
scale and the runtime runs them unchanged).

    from schedulers import make_policy, make_batcher, POLICIES, BATCHERS
    policy = make_policy("dualpath", alpha_tokens=3_000_000, beta_tokens=1_500_000)
    assignments = policy.schedule(snapshot, queue, fetching_node=3)
"""

# Implementations register themselves on import (explicit, no directory scanning).
from schedulers import batching, policies  # noqa: F401
from schedulers.api import (  # noqa: F401
    Assignment,
    BatchItem,
    ClusterSnapshot,
    EngineState,
    InterEnginePolicy,
    IntraEnginePolicy,
    NodeState,
    PendingRequest,
    PrefillWork,
)
from schedulers.cost_model import MODEL_SHAPES, CostModel, ModelShape  # noqa: F401
from schedulers.hardware import HARDWARE, HardwareProfile  # noqa: F401
from schedulers.policies import DualPathConfig  # noqa: F401
from schedulers.registry import BATCHERS, POLICIES, make_batcher, make_policy  # noqa: F401
