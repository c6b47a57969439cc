"""Agent workloads: types, synthetic generator (paper Table 2), real-trace loaders, arrival models."""
