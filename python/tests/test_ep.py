"""The EP buffer (tidewire.ep.Buffer).

On two GPUs of one host (skipped, with the reason, without them; scripts/gpu-test.sh runs them
on the GPU host): DeepEP's low-latency checks (python/tests/ep_rank.py) for every mode and
dtype, six hidden sizes (two whose rows end in part of the kernels' 2 KiB piece), 256 and 288
experts, groups over NCCL and Gloo, a CUDA graph replayed against eager execution (and on new
buffers after an update_ep_member halfway), two dispatchers alternating on one buffer, a rank
that leaves between dispatch and combine, the collective fallback (disable_p2p, and ranks on
different "hosts"), ranks that call with another shape (hidden, experts, tokens per rank or fp8:
each reads nothing of the other, marks it inactive and names it), and a buffer made and
destroyed 100 times (a graph replayed after its
buffer was destroyed reaching nobody).

Everywhere (CI): FP8 quantisation against a numpy reference, the collective fallback's
dispatch and combine on host tensors (repeated experts in a row included), bad arguments
refused naming the rank and the call, and the construction exchange with a rank that never
answers."""

from __future__ import annotations

import os
import time

import pytest

torch = pytest.importorskip("torch", reason="the EP tests need torch")
np = pytest.importorskip("numpy", reason="the FP8 reference needs numpy")

from rank_main import gpus_for_two_ranks  # noqa: E402
from test_distributed import run_group  # noqa: E402

EP_RANK = os.path.join(os.path.dirname(__file__), "ep_rank.py")

needs_two_gpus = pytest.mark.skipif(
    not gpus_for_two_ranks(),
    reason="needs two CUDA GPUs on one host (scripts/gpu-test.sh runs it on the GPU host)",
)

SUITES = {
    "nccl-p2p": "backend=nccl,experts=256,hidden=7168/2048/4096/5120,leave=die,graph=100",
    # 2560 and 1152: rows that end in a part of the kernels' 2 KiB piece (bf16 5,120 and 2,304 B,
    # fp8 2,560 and 1,152 B).
    "gloo-p2p-288": "backend=gloo,experts=288,hidden=7168/2560/1152,leave=stall,graph=10",
    "nccl-disable-p2p": "backend=nccl,experts=256,hidden=7168,p2p=0",
    "gloo-other-hosts": "backend=gloo,experts=256,hidden=2048,host=1",
}


@needs_two_gpus
@pytest.mark.parametrize("name", list(SUITES))
def test_dispatch_and_combine_match_deepeps_checks(name: str) -> None:
    arg = SUITES[name]
    if "backend=nccl" in arg and torch.cuda.device_count() < 2:
        pytest.skip("NCCL refuses two ranks on one GPU (TIDEWIRE_TEST_SHARED_GPU): needs two GPUs")
    leaving = "leave=" in arg
    results = run_group("suite", 2, arg, deadline=400, expect_dead=1 if leaving else -1, script=EP_RANK)
    info = results[0]
    print(f"{name}: {info}")
    # Every rank that lives checked its own results.
    for rank, r in enumerate(results):
        if r is not None:
            assert r["bad"] == [], f"rank {rank}: {r['bad']}"
    if "p2p=0" in arg or "host=1" in arg:
        assert info["fallback"], "NVLink was ruled out: the buffer must say it took the fallback"
        assert info["paths"] == ["local", "collective"], info["paths"]
        assert ("disable_p2p" if "p2p=0" in arg else "rank 0 -> rank 1") in info["fallback"], info["fallback"]
    else:
        assert info["fallback"] is None and info["paths"][1] != "none", info
        assert info["graph_replays"] > 0
        assert info["updated"], "update_ep_member ran and the next call passed the checks"
    if leaving:
        assert info["active_after"] == [1, 0], info["active_after"]
        # The spec's bound: the 2 s timeout plus 1 s.
        assert info["leave_took_s"] < 3.0, info["leave_took_s"]
        # The metrics saw it: rank 1 marked inactive once (the later calls skip it), one of
        # the two ranks still active.
        m = info["ep_metrics"]
        assert 'tidewire_ep_rank_timeouts_total{source_rank="1"} 1' in m, m
        assert 'tidewire_ep_active_ranks{rank="0"} 1' in m, m


@needs_two_gpus
@pytest.mark.parametrize("differ", ["hidden", "experts", "tokens", "fp8"])
def test_ranks_that_call_with_another_shape_read_nothing_of_each_other_and_are_named(differ: str) -> None:
    results = run_group("shapes", 2, f"differ={differ}", deadline=120, script=EP_RANK)
    for rank, r in enumerate(results):
        other = 1 - rank
        assert r["bad"] == [], f"rank {rank}: {r['bad']}"
        assert r["active"][other] == 0 and r["active"][rank] == 1, f"rank {rank}: {r}"
        # Named for its shape (the signal said so), not found silent at the deadline (20 s).
        said = r["next_call"] or ""
        assert f"rank(s) [{other}] called with another shape" in said, f"rank {rank}: {r}"
        assert r["took_s"] < 10, f"rank {rank}: the call waited for its deadline: {r}"


@needs_two_gpus
def test_a_buffer_made_and_destroyed_100_times_leaves_nothing_behind() -> None:
    results = run_group("lifetime", 2, "", deadline=400, script=EP_RANK)
    for rank, r in enumerate(results):
        (free0, threads0, maps0), (free1, threads1, maps1) = r["before"], r["after"]
        assert threads1 <= threads0, f"rank {rank}: threads {threads0} -> {threads1}"
        assert maps1 <= maps0 + 8, f"rank {rank}: mappings {maps0} -> {maps1}"
        assert free1 >= free0 - (64 << 20), f"rank {rank}: free GPU memory {free0} -> {free1}"
        # A graph replayed after its buffer was destroyed reaches nobody and says so.
        stray = r["stray"]
        assert stray["live_diff"] < 1e-5, stray
        assert stray["active"] == [1 if i == rank else 0 for i in range(2)], stray
        assert stray["out_zero"] and stray["received"] == 0, stray


def e4m3_reference(v: "np.ndarray") -> "np.ndarray":
    """Round to e4m3 (4 exponent bits, bias 7, 3 mantissa bits, max 448, subnormals below
    2^-6), nearest even, saturating: numpy, from the format's definition."""
    v = np.clip(v.astype(np.float64), -448.0, 448.0)
    a = np.abs(v)
    exp = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    exp = np.maximum(exp, -6)  # subnormals share the smallest exponent
    step = 2.0 ** (exp - 3)
    q = np.round(a / step) * step  # numpy rounds halves to even
    return np.sign(v) * q


def test_fp8_quantisation_matches_a_numpy_reference() -> None:
    import tidewire.ep

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 1024, generator=g) * torch.logspace(-3, 3, 64).view(-1, 1)).to(torch.bfloat16)
    x[3, :128] = 0  # an all-zero group: the scale's floor
    q, scales = tidewire.ep.quantize_fp8(x)
    xs = x.float().numpy().reshape(64, 8, 128)
    amax = np.abs(xs).max(-1)
    want_scale = np.maximum(amax, 1e-4).astype(np.float32) / np.float32(448.0)
    np.testing.assert_allclose(scales.numpy(), want_scale, rtol=1e-6)
    inv = (np.float32(1.0) / want_scale).astype(np.float32)
    want_q = e4m3_reference((xs.astype(np.float32) * inv[..., None]).astype(np.float32)).reshape(64, 1024)
    np.testing.assert_array_equal(q.float().numpy(), want_q)
    # Dequantised, within e4m3's precision of the input: half a step of 3 mantissa bits, or of
    # the subnormal step (2^-9 of the scale) for values far below their group's largest.
    back = q.float().view(64, 8, 128) * scales.unsqueeze(-1)
    err = (back - x.float().view(64, 8, 128)).abs()
    bound = x.float().view(64, 8, 128).abs() / 16 + scales.unsqueeze(-1) * 2.0**-10
    assert bool((err <= bound * 1.0001).all()), float((err - bound).max())


def test_the_collective_fallback_on_host_tensors_matches_the_checks() -> None:
    for rank, bad in enumerate(run_group("fallback_cpu", 2, "", deadline=120, script=EP_RANK)):
        assert bad == [], f"rank {rank}: {bad}"


def test_bad_arguments_are_refused_naming_the_rank_and_the_call_then_the_call_runs() -> None:
    for rank, r in enumerate(run_group("refusals", 2, "", deadline=120, script=EP_RANK)):
        assert r["bad"] == [], f"rank {rank}: {r['bad']}"
        said = r["said"]
        assert "active_ranks (3,) must be [2]" in said["dispatch, active_ranks one too long"], said
        assert "active_ranks (1, 2) must be [2]" in said["dispatch, active_ranks 2-D"], said
        assert "dispatch: x must be torch.bfloat16" in said["dispatch, x float32"], said
        assert "combine: active_ranks (1,) must be [2]" in said["combine, active_ranks one too short"], said
        assert "on meta" in said["combine, out on another device"], said
        assert "before that dispatch's receive hook ran" in said["combine before the dispatch's hook"], said
        assert "receive hook already ran" in said["a dispatch's hook again"], said
        assert "receive hook already ran" in said["a combine's hook again"], said


def test_a_rank_that_never_takes_part_in_construction_is_named_within_the_deadline() -> None:
    t0 = time.monotonic()
    results = run_group("silent", 2, "", deadline=60, script=EP_RANK)
    r = results[0]
    assert r["error"] is not None, "the exchange must fail without rank 1"
    assert "rank(s) [1]" in r["error"], r["error"]
    assert r["took_s"] < 2 + 5, r
    assert time.monotonic() - t0 < 60
