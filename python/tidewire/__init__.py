"""tidewire: a one-sided (READ / WRITE) transfer engine for LLM serving.

`Engine` is the Pythonic API; `tidewire.mooncake.TransferEngine` reproduces the
`mooncake.engine.TransferEngine` API that SGLang and vLLM call.

    with tidewire.Engine() as target, tidewire.Engine() as initiator:
        remote = target.allocate_shared(1 << 20)
        buf = numpy.ones(1 << 20, dtype=numpy.uint8)
        addr, length = initiator.register(buf)
        initiator.write(target.name, addr, remote, length)

Descriptor arrays (local addresses, remote addresses, lengths) may be lists of ints, numpy
arrays or DLPack tensors of 64-bit integers: 100,000 descriptors never become 100,000 Python
objects. Every blocking call releases the GIL; an engine may be used from many threads.
"""

from __future__ import annotations

import json
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

from . import _native
from .allocator import allocation, cuda_allocator, mem_pool
from ._native import (
    Batch,
    BindError,
    Cancelled,
    ConfigError,
    GpuError,
    InternalError,
    InvalidArgument,
    MetadataError,
    MetadataServer,
    NoTransport,
    NotRegistered,
    OsError,
    PeerFailed,
    PeerUnreachable,
    Plan,
    ProtocolError,
    RegistrationError,
    RemoteAccessDenied,
    SegmentNotFound,
    ShuttingDown,
    StalePlan,
    TidewireError,
    Timeout,
)

__version__: str = _native.__version__

__all__ = [
    "Batch",
    "BindError",
    "Cancelled",
    "ConfigError",
    "Engine",
    "GpuError",
    "InternalError",
    "InvalidArgument",
    "MetadataError",
    "MetadataServer",
    "NoTransport",
    "NotRegistered",
    "Notification",
    "OsError",
    "PeerStatus",
    "Plan",
    "PeerFailed",
    "PeerUnreachable",
    "ProtocolError",
    "RegistrationError",
    "RemoteAccessDenied",
    "SegmentNotFound",
    "ShuttingDown",
    "StalePlan",
    "TidewireError",
    "Timeout",
    "allocation",
    "cuda_allocator",
    "gpu_status",
    "mem_pool",
    "metrics_text",
    "serve_metrics",
]

#: A list of ints, a numpy array, or a DLPack tensor of 64-bit integers; or one int for all.
Descriptors = Union[int, Sequence[int], Any]


class PeerStatus(NamedTuple):
    """One peer of `Engine.peers()`."""

    name: str
    instance: str
    state: str
    reason: Optional[str]
    mappings: int


class Notification(NamedTuple):
    """A notification received from a peer, after the data of its batch was visible."""

    sender: str
    name: str
    message: str


def gpu_status() -> Tuple[bool, str]:
    """Whether this build can use GPUs, and why not."""
    return _native.gpu_status()


def serve_metrics(addr: str = "127.0.0.1:0") -> str:
    """Serves this process's Prometheus metrics (engines, EP buffers, collectives) at
    `http://ADDR/metrics` and turns recording on; returns the bound `host:port`. Once per
    process, as `TIDEWIRE_METRICS_ADDR` does; a taken port raises `BindError` naming it."""
    return _native.serve_metrics(addr)


def metrics_text() -> str:
    """This process's metrics now, in the OpenMetrics text format (the first call turns
    recording on)."""
    return _native.metrics_text()


class Engine:
    """A transfer engine: registered memory, an RPC endpoint, transports.

    Args:
        host: address to bind and advertise (IPv4 or IPv6).
        port: RPC port; None picks a free one in MC_MIN_RPC_PORT..MC_MAX_RPC_PORT.
        metadata: "p2p" (default, no server) or "http://host:port/metadata".
        name: segment name (with a metadata server); p2p names are "host:port".
        transports: restrict to these transports ("local", "shm", "tcp").
        force_tcp: send everything over TCP (also MC_FORCE_TCP=1).
        tcp_lanes: TCP connections per peer.
        cluster_secret: a secret (bytes or str) every connection to and from this engine must
            prove at its handshake (also TIDEWIRE_CLUSTER_SECRET); engines without it, or with
            another, are refused on both sides.
        cluster_secret_file: the same, read from a file (also TIDEWIRE_CLUSTER_SECRET_FILE).

    Use as a context manager, or call `shutdown()`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        metadata: str = "p2p",
        name: Optional[str] = None,
        transports: Optional[Sequence[str]] = None,
        force_tcp: bool = False,
        tcp_lanes: int = 4,
        cluster_secret: Optional[Union[bytes, str]] = None,
        cluster_secret_file: Optional[str] = None,
    ) -> None:
        secret = cluster_secret.encode() if isinstance(cluster_secret, str) else cluster_secret
        self._native = _native.Engine(
            host,
            port,
            metadata,
            name,
            list(transports) if transports else None,
            force_tcp,
            tcp_lanes,
            secret,
            cluster_secret_file,
        )

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"tidewire.Engine(name={self.name!r})"

    @property
    def name(self) -> str:
        """The segment name peers open this engine by."""
        return self._native.name

    @property
    def rpc_port(self) -> int:
        return self._native.rpc_port

    @property
    def cluster_secret_fingerprint(self) -> Optional[str]:
        """A short public name of the cluster secret in force (None: no secret)."""
        return self._native.cluster_secret_fingerprint

    @property
    def refused_connections(self) -> int:
        """Connections refused so far (no or another cluster secret, another uid)."""
        return self._native.refused_connections

    @property
    def rpc_addr(self) -> str:
        return self._native.rpc_addr

    def descriptor(self) -> dict:
        """This engine's segment descriptor."""
        return json.loads(self._native.descriptor())

    def peer_descriptor(self, peer: str) -> dict:
        """A peer's segment descriptor (opening the peer if needed)."""
        return json.loads(self._native.peer_descriptor(peer))

    def register(self, obj: Any, length: Optional[int] = None, location: str = "*") -> Tuple[int, int]:
        """Registers memory peers may read and write; returns (address, length).

        `obj` is an address (with `length`; you keep the memory alive until `unregister`),
        or an array: anything with `__array_interface__` (numpy), `__cuda_array_interface__`
        or `__dlpack__` (torch, CPU or GPU), which the engine keeps alive while registered.
        The pointer itself decides the memory kind; a contradicting `location` is an error.
        GPU memory registers, but no transport reaches it yet (requests on it fail at submit,
        naming each transport's reason).
        """
        if isinstance(obj, int):
            if length is None:
                raise InvalidArgument("register(address) needs a length")
            self._native.register(obj, length, location)
            return obj, length
        return self._native.register_object(obj, location)

    def unregister(self, addr: Union[int, Tuple[int, int]]) -> None:
        """Unregisters the region starting at `addr`; returns once no transfer touches it."""
        self._native.unregister(addr[0] if isinstance(addr, tuple) else addr)

    def allocate_shared(self, length: int) -> int:
        """Allocates and registers shareable host memory (reached by shm on this host)."""
        return self._native.allocate_shared(length)

    def free_shared(self, addr: int) -> None:
        self._native.free_shared(addr)

    def submit(
        self,
        peer: str,
        op: str,
        local: Descriptors,
        remote: Descriptors,
        lengths: Descriptors,
        notify: Optional[Tuple[str, str]] = None,
        timeout: Optional[float] = None,
        stream: Optional[int] = None,
        complete_on: Optional[int] = None,
    ) -> Batch:
        """Submits a batch without waiting; `op` is "read" or "write".

        `stream` (a CUstream as an int, e.g. `torch.cuda.current_stream().cuda_stream`): GPU
        copies start after the work already queued on it (an event, not a host sync).
        `complete_on` (a CUstream): that stream waits for the batch's GPU copies, so kernels
        queued on it after this call see every byte, with no host round trip (the `Batch`
        still reports the outcome on the host). A batch with a request over tcp is refused."""
        return self._native.submit(peer, op, local, remote, lengths, notify, timeout, stream,
                                   complete_on)

    def write(self, peer: str, local: Descriptors, remote: Descriptors, lengths: Descriptors,
              notify: Optional[Tuple[str, str]] = None, timeout: Optional[float] = None,
              stream: Optional[int] = None) -> None:
        """Writes local ranges to the peer and waits; raises on failure."""
        self.submit(peer, "write", local, remote, lengths, notify, timeout, stream).wait()

    def read(self, peer: str, local: Descriptors, remote: Descriptors, lengths: Descriptors,
             timeout: Optional[float] = None, stream: Optional[int] = None) -> None:
        """Reads the peer's ranges into local memory and waits; raises on failure."""
        self.submit(peer, "read", local, remote, lengths, None, timeout, stream).wait()

    def register_layout(self, name: str, layers: Any, pages: int, page_size: int) -> None:
        """Registers the paged layout `name` (a KV cache): one page array per layer, each
        `pages` pages of `page_size` bytes, at `layers` (base addresses, or objects with a
        `data_ptr()` such as torch tensors), all inside memory registered with this engine.
        Peers find it by name in this engine's descriptor."""
        addrs = [x.data_ptr() if hasattr(x, "data_ptr") else int(x) for x in layers]
        self._native.register_layout(name, addrs, pages, page_size)

    def unregister_layout(self, name: str) -> None:
        self._native.unregister_layout(name)

    def transfer_pages(
        self,
        peer: str,
        op: str,
        local_layout: str,
        remote_layout: str,
        local_pages: Descriptors,
        remote_pages: Descriptors,
        timeout: Optional[float] = None,
        stream: Optional[int] = None,
        complete_on: Optional[int] = None,
    ) -> Batch:
        """Moves `local_pages[i]` of this engine's layout to or from `remote_pages[i]` of the
        peer's layout, in every layer, without waiting. Page indices are arrays (numpy, DLPack
        or lists of ints, never one object per page); consecutive pages move as one request."""
        return self._native.transfer_pages(peer, op, local_layout, remote_layout, local_pages,
                                           remote_pages, timeout, stream, complete_on)

    def prepare(self, peer: str, op: str, local: Descriptors, remote: Descriptors,
                lengths: Descriptors) -> Plan:
        """Checks and plans a batch once; run it with `execute` as often as needed."""
        return self._native.prepare(peer, op, local, remote, lengths)

    def prepare_pages(self, peer: str, op: str, local_layout: str, remote_layout: str,
                      local_pages: Descriptors, remote_pages: Descriptors) -> Plan:
        """`transfer_pages`, planned once for `execute`."""
        return self._native.prepare_pages(peer, op, local_layout, remote_layout, local_pages,
                                          remote_pages)

    def execute(self, plan: Plan, notify: Optional[Tuple[str, str]] = None,
                timeout: Optional[float] = None, stream: Optional[int] = None,
                complete_on: Optional[int] = None) -> Batch:
        """Runs a prepared plan as one batch; raises `StalePlan` (nothing moved) when a peer
        of it restarted or died or a local region of it was unregistered."""
        return self._native.execute(plan, notify, timeout, stream, complete_on)

    def notifications(self) -> list:
        """Notifications received so far (oldest first), as `Notification` tuples."""
        return [Notification(*n) for n in self._native.take_notifications()]

    def probe(self, peer: str) -> float:
        """Round trip to the peer's RPC port in seconds; raises if unreachable."""
        return self._native.probe(peer)

    def peers(self) -> List[PeerStatus]:
        """Every peer opened by name: whether it is usable ("open", or "retired" with the
        reason: its process exited, it restarted, it cannot be reached) and how many mappings
        of its memory (shm mappings, GPU imports, revocation pages) this process still holds."""
        return [PeerStatus(*p) for p in self._native.peers()]

    def shm_status(self) -> Tuple[bool, str]:
        return self._native.shm_status()

    def shutdown(self) -> None:
        """Unpublishes, fails in-flight requests with ShuttingDown, joins threads."""
        self._native.shutdown()
