"""`mooncake.engine` on tidewire: `TransferEngine`, `TransferOpcode`, `TransferNotify`.

Same method names, positional argument order, defaults and integer return codes as the
Mooncake transfer engine's Python binding, so SGLang and vLLM run unchanged. Transport and
peer failures return the failure code of the call (see "Return codes" below) and log the
reason (logger `tidewire.mooncake`); they never raise. `tidewire.mooncake.install()` makes
`import mooncake.engine` load this module.

Differences, each logged when it applies: `protocol="rdma"` and `"efa"` use the engine's fabric
transport (libfabric: verbs, efa) across hosts when this host has an RDMA provider, and its own
transports (shm on one host, else tcp) when it has none; the NICs are chosen per buffer by
PCIe / NUMA affinity, not by `device_name`;
`protocol="nvlink"` / `"nvlink_intra"` let the engine choose its NVLink transport per pair of
GPUs (GPU memory in `tidewire.mem_pool()` is reachable by every one of them). Metadata:
"P2PHANDSHAKE", `http://`, `etcd://host:port[,...]`, `redis://...`, or a bare `host:port`
(etcd, as in Mooncake).
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import threading
from typing import Any, Dict, List, Optional, Sequence

from .. import Batch, TidewireError, Timeout, _native

log = logging.getLogger("tidewire.mooncake")

# Return codes, as Mooncake's binding returns them (checked against kvcache-ai/Mooncake:
# mooncake-integration/transfer_engine/transfer_engine_py.cpp and the Python API reference,
# docs/source/python-api-reference/transfer-engine.md):
#
# - A batch id, or 0 on failure: batch_transfer_async_write, batch_transfer_async_read,
#   batch_transfer_async, transfer_submit_write. 0 is the sentinel Mooncake documents for the
#   batch_transfer_async* calls and the one its own tests check (`assertNotEqual(batch_id, 0)`,
#   for transfer_submit_write too). Mooncake's C++ returns these as `batch_id_t`, a uint64:
#   its submit failures return 0, and its `return -1` (segment not opened; and every
#   transfer_submit_write failure in the classic backend, documented as "negative") reaches
#   Python as 2**64 - 1, never as a negative number, so a caller's `< 0` test never saw a
#   failure there. Our ids start at 1; 0 passed to get_batch_transfer_status or
#   transfer_check_status is an unknown id and reports -1 (failed).
# - 0, or -1 on failure: initialize, initialize_ext, register_memory, unregister_memory,
#   batch_register_memory, batch_unregister_memory, free_managed_buffer,
#   write_bytes_to_buffer, transfer_sync_write, transfer_sync_read, transfer_sync,
#   batch_transfer_sync_write, batch_transfer_sync_read, batch_transfer_sync,
#   get_batch_transfer_status (-1 when any batch failed or timed out), send_probe.
# - transfer_check_status: 1 done, 0 still running, -1 failed, -2 timed out.
# - An address, or 0 on failure: allocate_managed_buffer, get_first_buffer_address.

#: What the calls returning a batch id return on failure.
NO_BATCH = 0

SUPPORT_CUDA = False
SUPPORT_EFA = False
SUPPORT_HIP = False
SUPPORT_MNNVL = False
SUPPORT_INTRA_NVLINK = False


class TransferOpcode(enum.IntEnum):
    """The operation of a transfer."""

    READ = 0
    WRITE = 1
    # Mooncake's binding also exposes these spellings.
    Read = 0
    Write = 1


class TransferNotify:
    """A notification: delivered to the peer after the transfer's data is visible."""

    def __init__(self, name: str = "", msg: str = "") -> None:
        self.name = name
        self.msg = msg

    def __repr__(self) -> str:
        return f"TransferNotify(name={self.name!r}, msg={self.msg!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransferNotify) and (self.name, self.msg) == (other.name, other.msg)


def _split_host(local_hostname: str) -> str:
    """The host part of `host`, `host:port` or `[v6]:port` (Mooncake ignores the port in
    peer-to-peer mode: the bound port is `get_rpc_port()`)."""
    h = local_hostname.strip()
    if h.startswith("["):
        return h[1 : h.index("]")] if "]" in h else h[1:]
    if h.count(":") == 1:
        return h.split(":", 1)[0]
    return h


class TransferEngine:
    """Mooncake's `TransferEngine`, on tidewire."""

    def __init__(self) -> None:
        self._engine: Optional[_native.Engine] = None
        self._batches: Dict[int, Batch] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # ---- initialization -------------------------------------------------------------

    def initialize(self, local_hostname: str, metadata_server: str, protocol: str, device_name: str) -> int:
        """Starts the engine. Returns 0, or -1 (with the reason logged)."""
        return self.initialize_ext(local_hostname, metadata_server, protocol, device_name, "")

    def initialize_ext(self, local_hostname: str, metadata_server: str, protocol: str,
                       device_name: str, metadata_type: str) -> int:
        if self._engine is not None:
            log.error("initialize: this TransferEngine is already initialized")
            return -1
        meta = (metadata_server or "").strip()
        kind = (metadata_type or "").strip().lower()
        if meta.upper() == "P2PHANDSHAKE" or kind == "p2p":
            uri = "p2p"
        elif meta.startswith(("http://", "etcd://", "redis://")):
            uri = meta
        elif kind in ("etcd", "redis", "http") and meta:
            uri = f"{kind}://{meta}" if kind != "http" else f"http://{meta}/metadata"
        elif meta and "://" not in meta:
            uri = f"etcd://{meta}"  # Mooncake reads a bare host:port as etcd
        else:
            log.error("initialize: metadata %r (type %r) is not supported: use P2PHANDSHAKE, "
                      "http://, etcd:// or redis://", metadata_server, metadata_type)
            return -1
        proto = (protocol or "tcp").strip().lower()
        transports = None
        if proto == "tcp":
            pass
        elif proto in ("rdma", "efa"):
            ok, how = _native.fabric_status()
            if ok:
                log.info("initialize: protocol %r: the fabric transport (libfabric %s) carries "
                         "transfers across hosts", protocol, how)
                if proto == "efa" and how != "efa":
                    log.warning("initialize: protocol 'efa' requested; this host's fabric "
                                "provider is %s", how)
            else:
                log.warning("initialize: protocol %r requested; no fabric transport here (%s), "
                            "so requests are served by shm on this host and tcp across hosts",
                            protocol, how)
        elif proto in ("nvlink", "nvlink_intra"):
            # Mooncake's names for its NVLink transports (multi-node fabric, intra-node IPC).
            # The engine chooses per pair of GPUs, with the reason: nvlink between GPUs of one
            # host (CUDA IPC or VMM handles), mnnvl across hosts once the fabric is proven.
            ok, why = _native.gpu_status()
            if not ok:
                log.warning("initialize: protocol %r requested but GPUs are unavailable (%s); "
                            "host memory is served by shm and tcp", protocol, why)
        elif proto in ("cxl", "hip", "barex", "ascend"):
            log.error("initialize: protocol %r needs transports this build does not have", protocol)
            return -1
        else:
            log.error("initialize: unknown protocol %r", protocol)
            return -1
        if device_name:
            log.info("initialize: device_name %r ignored (NICs are chosen per buffer by "
                     "PCIe / NUMA affinity)", device_name)
        host = _split_host(local_hostname) or "127.0.0.1"
        name = None if uri == "p2p" else local_hostname
        try:
            self._engine = _native.Engine(host, None, uri, name, transports, False, 4)
        except TidewireError as e:
            log.error("initialize(%r, %r): %s", local_hostname, metadata_server, e)
            return -1
        return 0

    def _e(self) -> _native.Engine:
        if self._engine is None:
            raise TidewireError("TransferEngine is not initialized")
        return self._engine

    def get_rpc_port(self) -> int:
        return self._e().rpc_port

    def get_engine(self) -> None:
        """Mooncake returns its inner engine for Mooncake Store; there is none here."""
        return None

    def get_engine_ptr(self) -> int:
        return 0

    def get_local_topology(self, device_name: Optional[str] = None) -> str:
        """The topology JSON in Mooncake's shape: no RDMA devices on any location."""
        topo: Dict[str, Any] = {"cpu:0": {"preferred_hca": [], "avail_hca": []}}
        return json.dumps(topo)

    # ---- memory -----------------------------------------------------------------------

    def _call(self, what: str, fn: Any, *args: Any) -> int:
        try:
            fn(*args)
            return 0
        except TidewireError as e:
            log.error("%s: %s", what, e)
            return -1

    def register_memory(self, buffer_addr: int, capacity: int, location: str = "*") -> int:
        return self._call("register_memory", self._e().register, buffer_addr, capacity, location)

    def unregister_memory(self, buffer_addr: int) -> int:
        return self._call("unregister_memory", self._e().unregister, buffer_addr)

    def batch_register_memory(self, buffer_addresses: Sequence[int], capacities: Sequence[int],
                              location: str = "*") -> int:
        return self._call("batch_register_memory", self._e().register_batch,
                          list(buffer_addresses), list(capacities), location)

    def batch_unregister_memory(self, buffer_addresses: Sequence[int]) -> int:
        return self._call("batch_unregister_memory", self._e().unregister_batch, list(buffer_addresses))

    def allocate_managed_buffer(self, length: int) -> int:
        """Allocates registered, shareable host memory; returns its address or 0."""
        try:
            return self._e().allocate_shared(length)
        except TidewireError as e:
            log.error("allocate_managed_buffer(%d): %s", length, e)
            return 0

    def free_managed_buffer(self, buffer_addr: int, length: int) -> int:
        return self._call("free_managed_buffer", self._e().free_shared, buffer_addr)

    def write_bytes_to_buffer(self, dest_address: int, src_ptr: bytes, length: int) -> int:
        """Copies bytes into registered memory of this engine."""
        data = bytes(src_ptr)[:length]
        return self._call("write_bytes_to_buffer", self._e().write_local, dest_address, data)

    def read_bytes_from_buffer(self, source_address: int, length: int) -> bytes:
        """Reads registered memory of this engine (empty bytes on failure, logged)."""
        try:
            return self._e().read_local(source_address, length)
        except TidewireError as e:
            log.error("read_bytes_from_buffer: %s", e)
            return b""

    def get_first_buffer_address(self, segment_name: str) -> int:
        """The first registered region of a segment (this engine's own name included), or 0."""
        try:
            e = self._e()
            if segment_name == e.name:
                first = e.first_region()
                return first[0] if first else 0
            regions = json.loads(e.peer_descriptor(segment_name)).get("regions", [])
            return int(regions[0]["addr"]) if regions else 0
        except TidewireError as err:
            log.error("get_first_buffer_address(%r): %s", segment_name, err)
            return 0

    # ---- transfers --------------------------------------------------------------------

    def _submit(self, what: str, target: str, op: str, buffers: Any, peers: Any, lengths: Any,
                notify: Optional[TransferNotify]) -> Optional[Batch]:
        note = (notify.name, notify.msg) if notify is not None else None
        try:
            return self._e().submit(target, op, buffers, peers, lengths, note, None)
        except TidewireError as e:
            log.error("%s to %s: %s", what, target, e)
            return None

    def _sync(self, what: str, target: str, op: str, buffers: Any, peers: Any, lengths: Any,
              notify: Optional[TransferNotify] = None) -> int:
        batch = self._submit(what, target, op, buffers, peers, lengths, notify)
        if batch is None:
            return -1
        try:
            batch.wait()
            return 0
        except TidewireError as e:
            log.error("%s to %s: %s", what, target, e)
            return -1

    @staticmethod
    def _op(opcode: Any) -> str:
        return "read" if int(opcode) == int(TransferOpcode.READ) else "write"

    def transfer_sync_write(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                            length: int, transport_hint: str = "") -> int:
        return self._sync("transfer_sync_write", target_hostname, "write", [buffer], [peer_buffer_address], [length])

    def transfer_sync_read(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                           length: int, transport_hint: str = "") -> int:
        return self._sync("transfer_sync_read", target_hostname, "read", [buffer], [peer_buffer_address], [length])

    def transfer_sync(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int,
                      opcode: Any, notify: Optional[TransferNotify] = None, transport_hint: str = "") -> int:
        return self._sync("transfer_sync", target_hostname, self._op(opcode), [buffer],
                          [peer_buffer_address], [length], notify)

    def batch_transfer_sync_write(self, target_hostname: str, buffers: Any, peer_buffer_addresses: Any,
                                  lengths: Any, transport_hint: str = "") -> int:
        return self._sync("batch_transfer_sync_write", target_hostname, "write", buffers, peer_buffer_addresses, lengths)

    def batch_transfer_sync_read(self, target_hostname: str, buffers: Any, peer_buffer_addresses: Any,
                                 lengths: Any, transport_hint: str = "") -> int:
        return self._sync("batch_transfer_sync_read", target_hostname, "read", buffers, peer_buffer_addresses, lengths)

    def batch_transfer_sync(self, target_hostname: str, buffers: Any, peer_buffer_addresses: Any, lengths: Any,
                            opcode: Any, notify: Optional[TransferNotify] = None, transport_hint: str = "") -> int:
        return self._sync("batch_transfer_sync", target_hostname, self._op(opcode), buffers,
                          peer_buffer_addresses, lengths, notify)

    def _async(self, what: str, target: str, op: str, buffers: Any, peers: Any, lengths: Any) -> int:
        """Submits without waiting: a batch id (1 or more), or NO_BATCH (0) on failure."""
        batch = self._submit(what, target, op, buffers, peers, lengths, None)
        if batch is None:
            return NO_BATCH
        with self._lock:
            batch_id = next(self._ids)
            self._batches[batch_id] = batch
        return batch_id

    def batch_transfer_async_write(self, target_hostname: str, buffers: Any, peer_buffer_addresses: Any,
                                   lengths: Any, transport_hint: str = "") -> int:
        """Returns a batch id for `get_batch_transfer_status`, or 0 on failure."""
        return self._async("batch_transfer_async_write", target_hostname, "write", buffers, peer_buffer_addresses, lengths)

    def batch_transfer_async_read(self, target_hostname: str, buffers: Any, peer_buffer_addresses: Any,
                                  lengths: Any, transport_hint: str = "") -> int:
        """Returns a batch id for `get_batch_transfer_status`, or 0 on failure."""
        return self._async("batch_transfer_async_read", target_hostname, "read", buffers, peer_buffer_addresses, lengths)

    def batch_transfer_async(self, target_hostname: str, buffers: Any, peer_buffer_addresses: Any,
                             lengths: Any, opcode: Any, transport_hint: str = "") -> int:
        """Returns a batch id for `get_batch_transfer_status`, or 0 on failure."""
        return self._async("batch_transfer_async", target_hostname, self._op(opcode), buffers,
                           peer_buffer_addresses, lengths)

    def transfer_submit_write(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                              length: int, transport_hint: str = "") -> int:
        """Returns a batch id for `transfer_check_status`, or 0 on failure."""
        return self._async("transfer_submit_write", target_hostname, "write", [buffer],
                           [peer_buffer_address], [length])

    def _take(self, batch_id: int) -> Optional[Batch]:
        with self._lock:
            return self._batches.get(batch_id)

    def _forget(self, batch_id: int) -> None:
        with self._lock:
            self._batches.pop(batch_id, None)

    def get_batch_transfer_status(self, batch_ids: List[int]) -> int:
        """Waits for the batches; 0 when all succeeded, -1 when any failed or timed out."""
        result = 0
        for batch_id in batch_ids:
            batch = self._take(batch_id)
            if batch is None:
                log.error("get_batch_transfer_status: unknown batch id %d", batch_id)
                result = -1
                continue
            try:
                batch.wait()
            except TidewireError as e:
                log.error("batch %d: %s", batch_id, e)
                result = -1
            finally:
                self._forget(batch_id)
        return result

    def transfer_check_status(self, batch_id: int) -> int:
        """1 done, 0 still running, -1 failed, -2 timed out (final states are reported once)."""
        batch = self._take(batch_id)
        if batch is None:
            log.error("transfer_check_status: unknown batch id %d", batch_id)
            return -1
        state = batch.state()
        if state == "pending":
            return 0
        self._forget(batch_id)
        if state == "done":
            return 1
        try:
            batch.poll()
        except Timeout as e:
            log.error("batch %d: %s", batch_id, e)
            return -2
        except TidewireError as e:
            log.error("batch %d: %s", batch_id, e)
        return -1

    # ---- notifications and probes -----------------------------------------------------

    def get_notifies(self) -> List[TransferNotify]:
        return [TransferNotify(name, msg) for _sender, name, msg in self._e().take_notifications()]

    def send_probe(self, peer_server_name: str) -> int:
        """0 when the peer answers, -1 otherwise."""
        try:
            self._e().probe(peer_server_name)
            return 0
        except TidewireError as e:
            log.warning("send_probe(%r): %s", peer_server_name, e)
            return -1

