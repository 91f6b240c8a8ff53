"""The EP buffer (tidewire.ep.Buffer) on two GPUs of one host: dispatch and combine against
references computed by the ranks (python/tests/ep_rank.py), hook on and off, bf16 and FP8,
captured in a CUDA graph and replayed, and a rank that leaves marked inactive within the
timeout. Skipped, with the reason, without two GPUs;
scripts/gpu-test.sh runs it on the GPU host."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch", reason="the EP tests need torch")

from test_distributed import run_group  # noqa: E402

EP_RANK = os.path.join(os.path.dirname(__file__), "ep_rank.py")

needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs two CUDA GPUs on one host (scripts/gpu-test.sh runs it on the GPU host)",
)


@needs_two_gpus
@pytest.mark.parametrize("hidden,leave", [(2048, "stall"), (7168, "die")])
def test_dispatch_and_combine_match_the_reference_and_a_leaving_rank_is_marked_inactive(
    hidden: int, leave: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TW_EP_LEAVE", leave)
    results = run_group("roundtrip", 2, str(hidden), deadline=300, expect_dead=1, script=EP_RANK)
    info = results[0]
    print(f"hidden {hidden}, rank 1 {leave}s: {info}")
    assert info["bad"] == [], info["bad"]
    assert info["graph_replays_checked"] == 3
    assert info["active_after"] == [1, 0], info["active_after"]
    # Bounded by the 2 s timeout (a stalled rank); a dead one is seen through its liveness word.
    assert info["dead_took_s"] < 2 + 5, info["dead_took_s"]
