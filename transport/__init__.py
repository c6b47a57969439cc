"""Transports between engines (DESIGN.md "Contracts: Transport") and the layer feeder.

`transport.base` defines the interface, `TRANSPORTS` and `make_transport`; the backends register
themselves on import here: "inproc" (engines in one process), "tcp" (processes/hosts), "rdma" (pyverbs,
imported lazily when an endpoint is built). `transport.feeder` (imports jax) is not imported here. A backend of one's
own registers in `TRANSPORTS` the same way (see `Transport`'s docstring and README "A transport backend of one's own").
"""

from transport import inproc, rdma, tcp  # noqa: F401  (register the backends; rdma imports pyverbs lazily)
from transport.base import (  # noqa: F401
    PRIORITIES,
    TRANSPORTS,
    MemoryRegion,
    Notification,
    PeerLostError,
    PostedFuture,
    RegionError,
    TransferFuture,
    Transport,
    TransportClosedError,
    TransportError,
    combine_futures,
    deadline,
    make_transport,
)
