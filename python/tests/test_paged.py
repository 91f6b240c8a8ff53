"""The paged KV API and prepared plans from Python: layouts on both sides, pages moved by
numpy index arrays (never one object per page), byte for byte the same as raw descriptors."""

from __future__ import annotations

import numpy as np
import pytest

import tidewire
from conftest import rand

PAGE = 4096


@pytest.fixture(params=[False, True], ids=["shm", "tcp"])
def pair(request):
    with tidewire.Engine() as target, tidewire.Engine(force_tcp=request.param) as initiator:
        yield target, initiator


def test_pages_by_index_arrays_match_raw_descriptors(pair):
    target, initiator = pair
    layers, pages = 4, 64
    span = layers * pages * PAGE
    remote = target.allocate_shared(2 * span)  # the layout, then a mirror for raw descriptors
    target.register_layout("kv", [remote + l * pages * PAGE for l in range(layers)], pages, PAGE)
    src = np.frombuffer(rand(span, 21), dtype=np.uint8).copy()
    addr, _ = initiator.register(src)
    initiator.register_layout("kv", [addr + l * pages * PAGE for l in range(layers)], pages, PAGE)
    rng = np.random.default_rng(3)
    # A consecutive stretch (it coalesces), then scattered pages; no page twice on either side.
    local_pages = np.concatenate([np.arange(8), 8 + rng.permutation(pages - 8)[:32]]).astype(np.int64)
    others = np.setdiff1d(np.arange(pages), np.arange(20, 28))
    remote_pages = np.concatenate([np.arange(20, 28), rng.permutation(others)[:32]]).astype(np.int64)
    initiator.transfer_pages(target.name, "write", "kv", "kv", local_pages, remote_pages).wait(30)
    # The same pages as one raw descriptor each, into the mirror.
    lp = np.repeat(np.arange(layers, dtype=np.uint64) * pages, len(local_pages)) + np.tile(local_pages.astype(np.uint64), layers)
    rp = np.repeat(np.arange(layers, dtype=np.uint64) * pages, len(remote_pages)) + np.tile(remote_pages.astype(np.uint64), layers)
    initiator.write(target.name, addr + lp * PAGE, remote + span + rp * PAGE, PAGE)
    got = np.frombuffer(target._native.read_local(remote, 2 * span), dtype=np.uint8)
    assert np.array_equal(got[:span], got[span:]), "paged == raw, byte for byte"
    # Read back through a prepared page plan into poisoned memory, several times.
    back = np.full(span, 0xA5, dtype=np.uint8)
    baddr, _ = initiator.register(back)
    initiator.register_layout("back", [baddr + l * pages * PAGE for l in range(layers)], pages, PAGE)
    plan = initiator.prepare_pages(target.name, "read", "back", "kv", local_pages, remote_pages)
    assert len(plan) < layers * len(local_pages), "consecutive pages coalesced"
    for _ in range(3):
        back[:] = 0xA5
        initiator.execute(plan).wait(30)
        for l in range(layers):
            for lpg in local_pages:
                off = (l * pages + int(lpg)) * PAGE
                assert np.array_equal(back[off:off + PAGE], src[off:off + PAGE])


def test_bad_page_arrays_and_stale_plans_raise_typed_errors(pair):
    target, initiator = pair
    remote = target.allocate_shared(8 * PAGE)
    target.register_layout("kv", [remote], 8, PAGE)
    local = np.zeros(8 * PAGE, dtype=np.uint8)
    addr, _ = initiator.register(local)
    initiator.register_layout("kv", [addr], 8, PAGE)
    with pytest.raises(tidewire.InvalidArgument, match="page 8"):
        initiator.transfer_pages(target.name, "write", "kv", "kv", [8], [0])
    with pytest.raises(tidewire.InvalidArgument, match="no layout"):
        initiator.transfer_pages(target.name, "write", "kv", "none", [0], [0])
    plan = initiator.prepare(target.name, "write", [addr], [remote], [PAGE])
    initiator.execute(plan).wait(30)
    initiator.unregister_layout("kv")
    initiator.unregister(addr)
    with pytest.raises(tidewire.StalePlan, match="prepare the plan again"):
        initiator.execute(plan)
