"""The torch.distributed backend "tidewire" on CPU tensors: groups of 1, 2 and 4 spawned
processes (python/tests/pg_rank.py) under a watchdog; every result is checked against a
reference the ranks compute another way."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import pytest

torch = pytest.importorskip("torch", reason="the torch.distributed backend tests need torch (scripts/test.sh installs it)")

RANK = os.path.join(os.path.dirname(__file__), "pg_rank.py")


def free_port_pair() -> int:
    """A port p with p and p + 1 free (a second group in the same test binds p + 1)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def run_group(
    body: str,
    size: int,
    arg: str = "",
    deadline: float = 240.0,
    expect_dead: int = -1,
    script: str = RANK,
    env_extra: Optional[Dict[str, str]] = None,
) -> List[Any]:
    """Runs `body` of `script` on `size` ranks; returns each rank's result (None for rank
    `expect_dead`). Every rank is killed at `deadline` (the test then fails with what the ranks
    printed)."""
    port = free_port_pair()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    procs = [
        subprocess.Popen(
            [sys.executable, script, body, str(r), str(size), str(port), arg],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for r in range(size)
    ]
    end = time.monotonic() + deadline
    results: List[Any] = [None] * size
    failed: List[str] = []
    try:
        for r, p in enumerate(procs):
            if r == expect_dead:
                continue
            try:
                out, err = p.communicate(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{body}: rank {r} still running at the {deadline} s deadline\n{_where(procs)}")
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            assert lines, f"{body}: rank {r} printed no result (exit {p.returncode}):\n{err[-3000:]}"
            res = json.loads(lines[-1])
            if "error" in res:
                # Every rank's outcome is kept: a failure often shows first on another rank.
                failed.append(f"rank {r} failed:\n{res['error']}")
                continue
            results[r] = res["ok"]
        assert not failed, f"{body}: " + "\n".join(failed) + f"\nthe other ranks' results: {results}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait()
    return results


def _where(procs: List[subprocess.Popen]) -> str:
    """Where every rank still running is: its Python stacks (each rank dumps them on SIGUSR1)
    and the end of what it printed, after it is killed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.send_signal(signal.SIGUSR1)
    time.sleep(1.0)
    out = []
    for r, p in enumerate(procs):
        if p.poll() is None:
            p.kill()
            _, err = p.communicate()
            out.append(f"--- rank {r}:\n{err[-2500:]}")
    return "\n".join(out)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_every_collective_dtype_and_op_matches_the_reference(size: int) -> None:
    for rank, bad in enumerate(run_group("collectives", size)):
        assert bad == [], f"rank {rank} of {size}: {bad}"


def test_overlapping_subgroups_and_a_new_init_in_the_same_process() -> None:
    for rank, bad in enumerate(run_group("groups", 4)):
        assert bad == [], f"rank {rank}: {bad}"


def test_the_debug_log_names_the_algorithm_of_every_collective() -> None:
    results = run_group("paths", 2, env_extra={"TIDEWIRE_TRACE": "tidewire_collective=debug"})
    for rank, lines in enumerate(results):
        text = "\n".join(lines)
        wants = [
            r"all_reduce of 64 bytes on 2 ranks: direct \(",
            r"all_reduce of 4194304 bytes on 2 ranks: staged",
            r"all_reduce of 67108864 bytes on 2 ranks: (direct reads|ring)",
            r"all_gather of 64 bytes on 2 ranks: ring",
            r"all_gather of 1048576 bytes on 2 ranks: staged",
            r"all_gather of 4194304 bytes on 2 ranks: (direct reads|ring)",
            r"reduce_scatter of 1048576 bytes on 2 ranks: staged",
            r"reduce_scatter of 64 bytes on 2 ranks: ring",
            r"all_to_all of 128 bytes on 2 ranks: rings",
            rf"rank {rank}: broadcast of 64 bytes on 2 ranks: direct from the root",
            rf"rank {rank}: reduce of 64 bytes on 2 ranks: direct to the root",
            rf"rank {rank}: gather of 64 bytes on 2 ranks: direct to the root",
            rf"rank {rank}: scatter of 64 bytes on 2 ranks: direct from the root",
            rf"rank {rank}: barrier of 1 bytes on 2 ranks",
        ]
        missing = [w for w in wants if not re.search(w, text)]
        assert not missing, f"rank {rank}: no line for {missing} in:\n{text}"


@pytest.mark.parametrize("how", ["kill", "stop"])
@pytest.mark.parametrize(
    "channel,op",
    [("mapped", "all_reduce"), ("engine", "all_reduce"), ("mapped", "all_to_all")],
)
def test_a_killed_or_stopped_rank_fails_the_survivors_within_the_timeout(
    how: str, channel: str, op: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if channel == "engine":
        # What ranks on other hosts use: the engine's transfers, each bounded by the group's
        # timeout.
        monkeypatch.setenv("TIDEWIRE_PG_CHANNEL", "engine")
    size, timeout = 3, 4.0
    results = run_group("failure", size, f"{how}:{op}", expect_dead=size - 1)
    for rank, out in enumerate(results[: size - 1]):
        # The group's timeout bounds every wait; the margin is for slow process start-up only.
        assert out["took"] < timeout + 5, f"rank {rank}: failed after {out['took']:.1f} s"
        # Every survivor blames rank 2: the one that saw it fail first (dead: at once; stopped:
        # at the timeout) tells the others, who may have been waiting for it.
        assert "rank 2" in out["error"], f"rank {rank}: {out['error']}"
        assert out["ranks"] == [2], f"rank {rank}: failed ranks hint {out['ranks']} ({out})"
        if how == "kill":
            assert "PeerFailed" in out["error"], out["error"]
        else:
            assert "Timeout" in out["error"] or "failed an operation waiting for it" in out["error"], out["error"]
        assert op in out["error"], f"rank {rank}: the error names no operation: {out['error']}"
        # The receive pending at the death fails too, naming the rank: at once when it died,
        # within the timeout of its wait when it stopped.
        assert out["pending_took"] < timeout + 5, f"rank {rank}: the pending receive ended after {out['pending_took']:.1f} s"
        assert "rank 2" in out["pending"], f"rank {rank}: pending receive {out['pending']}"
        # So does a receive from any source: at once naming the dead rank where its death is
        # seen (a mapped peer), else at the timeout blaming no rank (any of them might have
        # sent; a survivor that timed out first tells the other so, blaming nobody).
        assert out["anyone_took"] < timeout + 5, f"rank {rank}: the receive from any source ended after {out['anyone_took']:.1f} s"
        if how == "kill" and channel == "mapped":
            assert "rank 2" in out["anyone"], f"rank {rank}: {out['anyone']}"
        else:
            assert "any rank" in out["anyone"] or "without blaming" in out["anyone"], f"rank {rank}: {out['anyone']}"
        assert out["local_success"] is False and out["hint"] == [2], f"rank {rank}: {out['local_success']} {out['hint']}"
        assert out["later"] == "PeerFailed", f"rank {rank}: a later operation {out['later']}"
        assert out["regrouped"] == [2.0, 2.0], f"rank {rank}: {out['regrouped']}"


def test_a_joiner_with_another_number_of_slots_than_the_founders_is_refused_naming_both() -> None:
    results = run_group("joiner_slots", 3, "", deadline=90)
    for proc in (0, 1):
        assert results[proc]["sum"] == [2.0] * 4 and results[proc]["joiner_done"], f"process {proc}: {results[proc]}"
    error = results[2]["error"] or ""
    assert "joins a group of 3 slots" in error and "its options say 4" in error, results[2]


@pytest.mark.parametrize("how", ["replace", "extend"])
def test_a_joining_rank_works_alone_then_is_recovered_into_its_slot(how: str) -> None:
    """A replacement in a dead rank's slot (4 ranks, rank 2 killed) or a rank beyond the
    founders (2 ranks with room for 3) starts alone, calls join_group; the others see it ready,
    recover it, and every collective includes it again, on every rank with the same mask and
    epoch written into the caller's tensor; a joiner busy in Python for 2.5 times the eviction
    timeout (holding the GIL) is not evicted."""
    size = 5 if how == "replace" else 3
    results = run_group("joiners", size, how, deadline=120, expect_dead=2 if how == "replace" else -1)
    slots = 4 if how == "replace" else 3
    want_sum = [float(sum(r + 1 for r in range(slots)))] * 4
    epoch = 2 if how == "replace" else 1
    for proc, out in enumerate(results):
        if out is None:
            continue
        assert isinstance(out, dict), f"process {proc}: {out}"
        assert out["sum"] == want_sum and out["sum_after_busy"] == want_sum, f"process {proc}: {out}"
        assert out["gathered"] == [float(r + 1) for r in range(slots) for _ in range(2)], f"process {proc}: {out}"
        assert out["mask"] == [1] * slots and out["same_tensor"], f"process {proc}: {out}"
        assert out["epoch"] == epoch and out["peer_state"] == [True] * slots, f"process {proc}: {out}"
        if proc == size - 1:
            assert out["alone"] == [3.0] * 4, f"the joiner alone: {out}"
            assert out["mask_alone"] == [0, 0, 1] + [0] * (slots - 3), f"the joiner alone: {out}"
        else:
            assert out["recover"][0] == 1 and out["recover"][1] == epoch, f"process {proc}: {out}"
            assert out["synced"] == 1, f"process {proc}: {out}"
            before = [1, 1, 0, 1] if how == "replace" else [1, 1, 0]
            assert out["mask_before"] == before, f"process {proc}: {out}"


def test_a_group_extended_from_two_to_four_ranks_with_subgroups() -> None:
    """pg_rank.body_extension: two founders, two joiners added at once to the world and to a
    subgroup made with room for them; TP groups of two on each side."""
    results = run_group("extension", 4, "", deadline=120)
    for rank, out in enumerate(results):
        assert isinstance(out, dict), f"rank {rank}: {out}"
        tp_sum = [3.0, 7.0][rank // 2]
        assert out["after"] == [10.0, 10.0, tp_sum], f"rank {rank}: {out}"
        assert out["gathered"] == [float(r + 1) for r in range(4) for _ in range(2)], f"rank {rank}: {out}"
        assert out["sizes"] == [4, 4, 2], f"rank {rank}: {out}"
        assert out["masks"] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1]] and out["same_tensors"] == [True, True], f"rank {rank}: {out}"
        assert out["epochs"] == [1, 1, 0], f"rank {rank}: {out}"
        if rank < 2:
            assert out["before"] == [3.0, 3.0, 3.0] and out["sizes_before"] == [2, 2], f"rank {rank}: {out}"
            assert out["activated"] == [1, 1], f"rank {rank}: {out}"


@pytest.mark.parametrize("mode", ["sync_later", "manual"])
def test_the_failure_modes_deactivate_and_sync_when_they_are_told(mode: str) -> None:
    results = run_group("failure_modes", 4, mode, deadline=90, expect_dead=3)
    for rank, out in enumerate(results[:3]):
        assert "rank 3" in out["first_error"] and out["hint"] == [3], f"rank {rank}: {out}"
        assert out["peer_state"] == [True, True, True, False], f"rank {rank}: {out}"
        if mode == "manual":
            # Only reported: the view keeps the rank until the framework removes it.
            assert out["epoch_after_failure"] == 0 and out["deactivate"] == [1, 1], f"rank {rank}: {out}"
        else:
            # Removed by the group, but this rank re-forms only when told.
            assert out["epoch_after_failure"] == 1, f"rank {rank}: {out}"
            assert "sync_after_failure" in out["second_error"], f"rank {rank}: {out}"
        assert out["second_error"] is not None, f"rank {rank}: {out}"
        assert out["sync"] == 0 and out["sync_again"] == 1, f"rank {rank}: {out}"
        assert out["sum"] == [6.0] * 4 and out["mask"] == [1, 1, 1, 0] and out["epoch"] == 1, f"rank {rank}: {out}"


def test_sglangs_elastic_flow_world_and_tp_groups_lose_and_regain_a_rank() -> None:
    results = run_group("sglang_elastic", 5, "", deadline=120, expect_dead=3)
    for proc, out in enumerate(results):
        if out is None:
            continue
        assert isinstance(out, dict), f"process {proc}: {out}"
        me = 3 if proc == 4 else proc
        tp_all = [3.0, 7.0][me // 2]
        if proc != 4:
            assert out["before"] == [10.0, tp_all], f"process {proc}: {out}"
            tp_mask = [1, 1] if me < 2 else [1, 0]
            assert out["masks_after_death"] == [[1, 1, 1, 0], tp_mask], f"process {proc}: {out}"
            # Serving goes on over the survivors: the world without rank 3, TP {2} alone.
            assert out["serving"] == [6.0, [3.0, 3.0][me // 2]], f"process {proc}: {out}"
            assert out["recover_world"] == 1 and out.get("recover_tp", 1) == 1, f"process {proc}: {out}"
        assert out["after"] == [10.0, tp_all], f"process {proc}: {out}"
        assert out["masks"] == [[1, 1, 1, 1], [1, 1]], f"process {proc}: {out}"
        # The EP calls (the collective fallback on host tensors) over the world's mask: every
        # one checked before the death, after it over the survivors, and with the replacement.
        assert out["ep_bad"] == [], f"process {proc}: {out['ep_bad']}"
        if proc != 4:
            assert out["ep_fallback"], f"process {proc}: {out}"
            # The dispatch the death interrupted named the rank (it is never silent).
            assert out.get("ep_error", "").startswith("dispatch: ") and "rank 3" in out["ep_error"], f"process {proc}: {out}"
            # The EP metrics: the rank counted once as timed out, every rank active again.
            assert 'tidewire_ep_rank_timeouts_total{source_rank="3"} 1' in out["ep_metrics"], out["ep_metrics"]
        assert f'tidewire_ep_active_ranks{{rank="{me}"}} 4' in out["ep_metrics"], out["ep_metrics"]


# Fifty joiner processes each import torch (1-2 s on a 2-CPU machine): the group's own deadline
# (400 s) bounds it, not the suite's default per-test timeout (120 s), which it came within 2 s of.
@pytest.mark.timeout(420)
def test_fifty_kill_and_rejoin_cycles_leave_nothing_behind() -> None:
    results = run_group("join_cycles", 2, "50", deadline=400)
    for rank, out in enumerate(results):
        assert out["bad"] == [], f"rank {rank}: {out}"


def test_the_mooncake_pg_names_sglang_calls() -> None:
    for rank, bad in enumerate(run_group("mooncake", 2)):
        assert bad == [], f"rank {rank}: {bad}"


@pytest.mark.parametrize("arg", ["kill-0", "kill-3", "kill-3@4B", "kill-3@1M", "kill-3@64M", "stop-3", "shrink-3", "kill-3-secret"])
def test_elastic_membership_every_survivor_agrees_on_the_mask_and_epoch(arg: str) -> None:
    """Rank 0 or 3 killed during all_reduce, rank 3 stopped (evicted by heartbeat, fenced when
    continued), or removed by deactivate_ranks with every timeout an hour long: every rank ends
    with the same mask and epoch, written into the caller's tensor ("@4B" / "@1M" / "@64M": the size of
    the all_reduce the victim dies in, 4 MiB otherwise). With "-secret" every rank
    has a cluster secret (the engines' handshakes and the membership's frames are sealed)."""
    size = 4
    secret = arg.endswith("-secret")
    arg = arg.removesuffix("-secret")
    how, victim_s = arg.partition("@")[0].split("-")
    victim = int(victim_s)
    env = {"TIDEWIRE_CLUSTER_SECRET": "elastic-test-secret"} if secret else None
    results = run_group("elastic", size, arg, deadline=90, expect_dead=victim if how == "kill" else -1, env_extra=env)
    want = [0 if r == victim else 1 for r in range(size)]
    for rank, out in enumerate(results):
        if rank == victim and how == "kill":
            continue
        assert out["mask"] == want and out["same_tensor"], f"rank {rank}: {out}"
        if rank == victim:
            assert out["fenced"], f"the removed rank {rank} did not learn it: {out}"
        else:
            assert out["epoch"] == 1 and not out["fenced"], f"rank {rank}: {out}"
        if how == "kill" and rank != victim:
            assert f"rank {victim}" in out["error"], f"rank {rank}: {out}"
        if how == "shrink":
            status, reason = out["remove_everyone"]
            assert status == 0 and "leaves no member" in reason, f"rank {rank}: {out}"  # Rejected
        if how == "stop" and rank != victim:
            # The old rings are released on a thread of their own: a stopped process that still
            # maps them does not hold up the first call after re-forming.
            assert out["victim_still_stopped"], f"rank {rank}: the first call waited for the victim: {out}"
        if how in ("kill", "stop") and rank != victim:
            # The host mask was current before any call into the group.
            assert out["mask_before_calls"] == want, f"rank {rank}: {out}"
            # The survivors' collectives go on over the active ranks.
            assert out["after"] == [], f"rank {rank}: {out['after']}"


def _two_gpus() -> None:
    from rank_main import gpus_for_two_ranks

    if not gpus_for_two_ranks():
        pytest.skip("needs two GPUs (scripts/gpu-test.sh runs it on the GPU host)")


@pytest.mark.parametrize("all_reduce", ["", "two_shot"])
def test_cuda_collectives_over_nvlink_match_the_references_and_replay_in_a_graph(all_reduce: str) -> None:
    """With "two_shot" the all_reduces are forced through reduce_scatter + all_gather (the
    path of large all_reduces on more than two ranks), uneven parts included."""
    _two_gpus()
    for rank, bad in enumerate(run_group("cuda", 2, all_reduce)):
        assert bad == [], f"rank {rank}: {bad}"


def test_a_cuda_work_makes_another_stream_wait_for_the_default_stream() -> None:
    """The Work of a call launched on the default stream (whose raw handle is 0): `wait()` on
    a side stream orders that stream after the launch, and `is_completed()` follows the
    default stream (a stream object rebuilt from the raw handle 0 would be another stream)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU (scripts/gpu-test.sh runs it on the GPU host)")
    from tidewire.distributed import _CudaWork

    torch.cuda.set_device(0)
    side = torch.cuda.Stream()
    # First uses (the stream pool, events, lazily loaded kernels) may wait for the device:
    # made before the timed part, which they would otherwise end early.
    with torch.cuda.stream(side):
        torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
        torch.cuda.Event().record(side)
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.cuda._sleep(2_000_000_000)  # ≈ 1 s of GPU time queued on the default stream
    work = _CudaWork(0, None)  # as a collective launched now would return it
    assert not work.is_completed(), "the Work reports done while its stream still runs"
    with torch.cuda.stream(side):
        work.wait()
        after = torch.cuda.Event()
        after.record(side)
    assert not after.query(), "the side stream did not wait for the default stream"
    torch.cuda.synchronize()
    assert work.is_completed() and after.query()


def test_cuda_tensors_staged_through_host_memory_are_correct_and_refuse_capture() -> None:
    _two_gpus()
    for rank, bad in enumerate(run_group("cuda", 2, "staged")):
        assert bad == [], f"rank {rank}: {bad}"


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_killed_or_stopped_rank_ends_the_cuda_collectives_of_the_others(how: str) -> None:
    _two_gpus()
    timeout = 6.0
    (out, _) = run_group("cuda_failure", 2, how, expect_dead=1)
    assert out["took"] < timeout + 5, f"failed after {out['took']:.1f} s"
    assert "rank 1" in out["error"] and out["ranks"] == [1], out
    assert out["later"] != "succeeded", out


def test_sglangs_elastic_flow_on_cuda_an_ep_dispatch_a_rank_dies_in_and_its_replacement() -> None:
    """The CUDA form of the elastic scenario (pg_rank.body_cuda_elastic): the EP kernels mark
    a rank killed during a dispatch, the world learns it from the EP buffer (the groups'
    eviction timeout is a minute), every group goes on without it, a replacement takes its
    slot everywhere and the EP buffer maps it again."""
    _two_gpus()
    results = run_group("cuda_elastic", 3, "", deadline=180, expect_dead=1)
    print(f"cuda_elastic: {results}")
    for proc, out in enumerate(results):
        if out is None:
            continue
        assert isinstance(out, dict) and out["bad"] == [], f"process {proc}: {out}"
        assert out["after"] == [3.0] * 4, f"process {proc}: {out}"
        assert out["masks"] == [[1, 1]] * 4 and out["epochs"] == [2] * 4, f"process {proc}: {out}"
        if proc == 0:
            assert out["paths"] == out["paths_after"] and out["paths"][0] == "local", out
            assert out["paths"][1] not in ("none", "absent", "collective"), out
            assert out["active_after_death"] == [1, 0], out
            # Well inside the 20 s kernel deadline (the dead process's liveness word) and the
            # 60 s eviction timeout (the EP buffer told the world).
            assert out["death_call_s"] < 10 and out["world_agreed_s"] < 15, out
            assert out["masks_after_death"] == [[1, 0]] * 4 and out["serving"] == [1.0] * 4, out
            assert out["recovered"] == [1] * 4, out


def test_a_stopped_ep_rank_resumed_after_its_replacement_writes_nowhere_the_calls_read() -> None:
    """pg_rank.body_cuda_ep_stale: a rank stopped (not killed), replaced, then resumed makes
    the dispatch it was about to make, numbered as the others' next call; the calls of the
    survivor and the replacement give exactly what they send (every buffer is new after
    update_ep_member)."""
    _two_gpus()
    results = run_group("cuda_ep_stale", 3, "", deadline=180)
    print(f"cuda_ep_stale: {results}")
    stale = results[1]
    assert stale["stale"] == "dispatched", stale
    for proc in (0, 2):
        out = results[proc]
        assert out["bad"] == [] and out["mask"] == [1, 1], f"process {proc}: {out}"
    assert results[0]["recovered"] == 1 and results[0]["epoch_after_stop"] >= 1, results[0]


def test_cuda_collectives_go_on_over_the_survivors_on_a_new_nvlink_path() -> None:
    """pg_rank.body_cuda_survivors: rank 0 of three killed; ranks 1 and 2 (on the two GPUs)
    form an NVLink path through the membership and every collective gives what it must with
    slot 0 inactive."""
    _two_gpus()
    results = run_group("cuda_survivors", 3, "", deadline=120, expect_dead=0)
    for rank in (1, 2):
        out = results[rank]
        assert out["bad"] == [], f"rank {rank}: {out['bad']}"
        assert out["path"] == [1, 2], f"rank {rank}: no NVLink path over the survivors: {out}"
        assert out["mask"] == [0, 1, 1] and out["epoch"] == 1, f"rank {rank}: {out}"
        assert out["one_shot_calls"] >= 2, f"rank {rank}: {out}"


def test_a_cuda_graph_captured_before_the_group_re_formed_moves_nothing_and_is_reported() -> None:
    """pg_rank.body_cuda_stale_graph: three ranks, rank 2 removed; the survivors replay an
    all_reduce graph of the old path (its buffers freed) and go on."""
    _two_gpus()
    results = run_group("cuda_stale_graph", 3, "", deadline=120)
    assert results[2] == {"bad": [], "removed": True}, results[2]
    for rank in (0, 1):
        out = results[rank]
        assert out["bad"] == [], f"rank {rank}: {out['bad']}"
        assert out["stale"] >= 1, f"rank {rank}: the stale replay was not counted: {out}"
        assert any("replayed from a CUDA graph" in e for e in out["errors"]), f"rank {rank}: not logged: {out}"


def test_cuda_send_and_recv_over_nvlink_in_both_directions_at_once() -> None:
    """pg_rank.body_cuda_p2p."""
    _two_gpus()
    results = run_group("cuda_p2p", 2, "", deadline=180)
    for rank, out in enumerate(results):
        assert out["bad"] == [], f"rank {rank}: {out['bad']}"
        assert out["counted"] >= 10, f"rank {rank}: {out}"
    err = results[1]["error"]
    assert err is not None and "rank 0" in err and "tag" in err, results[1]
    assert results[1]["took"] < 10 + 5, results[1]


def test_the_metrics_endpoint_counts_collectives_by_operation() -> None:
    """Each rank serves its metrics and scrapes them after known calls: calls and input bytes
    per operation, the algorithm label, the membership size, and the engine's gauges."""
    for rank, got in enumerate(run_group("metrics", 2)):
        calls = {k: v for k, v in got.items() if k.startswith("tidewire_coll_calls_total")}
        ar = [v for k, v in calls.items() if 'op="all_reduce"' in k]
        ag = [v for k, v in calls.items() if 'op="all_gather"' in k]
        assert sum(ar) == 7 and sum(ag) == 3, f"rank {rank}: {got}"
        # Each call by the algorithm it took: 4 KiB all_reduces go to every rank at once, 1 MiB
        # ones through the shared stages, small all_gathers round the ring.
        by = lambda op, algo: calls.get(f'tidewire_coll_calls_total{{op="{op}",algorithm="{algo}"}}')  # noqa: E731
        assert (by("all_reduce", "direct"), by("all_reduce", "staged"), by("all_gather", "ring")) == (5, 2, 3), calls
        assert got.get('tidewire_coll_bytes_total{op="all_reduce"}') == 5 * 4096 + 2 * (1 << 20), got
        assert got.get('tidewire_coll_bytes_total{op="all_gather"}') == 3 * 1024, got
        assert got.get("tidewire_coll_size") == 2, got
        assert got.get("engine_lines") == 1, "the engine's gauges are in the same scrape"


def test_groups_created_and_destroyed_twenty_times_leave_nothing_behind() -> None:
    for rank, bad in enumerate(run_group("lifetime", 2)):
        assert bad == [], f"rank {rank}: {bad}"


@pytest.mark.parametrize("how", ["engine", "hosts"])
def test_ranks_reached_through_engine_transfers(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ranks on other hosts get (rings written with one-sided transfers): forced on one
    host ("engine": the engine still moves them through shared memory), or with every rank on
    a host of its own as the engine sees it ("hosts": over tcp, checked in the metrics)."""
    if how == "engine":
        monkeypatch.setenv("TIDEWIRE_PG_CHANNEL", "engine")
    for rank, bad in enumerate(run_group("collectives", 2, "hosts" if how == "hosts" else "")):
        assert bad == [], f"rank {rank}: {bad}"


def test_p2p_launches_meet_whatever_order_the_ranks_queue_in() -> None:
    """`_p2p_waves` on random queues of 2-4 ranks (each pair's messages in one order per
    direction, interleaved at random on each rank, receives often first): run launch after
    launch on every rank, where a message completes only while both its ends' launches run
    (no eager room at all): every launch finishes, and the k-th send from a to b meets b's
    k-th receive from a."""
    import random

    from tidewire.distributed import _p2p_waves

    rng = random.Random(7)
    for trial in range(300):
        n = rng.choice([2, 3, 4])
        queues: List[List[Any]] = [[] for _ in range(n)]
        for a in range(n):
            for b in range(n):
                if a != b:
                    for k in range(rng.randint(0, 3)):
                        queues[a].append((True, b, (a, b, k)))
                        queues[b].append((False, a, (a, b, k)))
        for q in queues:
            rng.shuffle(q)
            # Shuffling keeps no order: put each direction's messages back in order.
            for key in {(o[0], o[1]) for o in q}:
                idx = [i for i, o in enumerate(q) if (o[0], o[1]) == key]
                for i, o in zip(idx, sorted((q[i] for i in idx), key=lambda o: o[2][2])):
                    q[i] = o
        waves = [_p2p_waves(q) for q in queues]
        at = [0] * n
        done = [set() for _ in range(n)]  # message ids completed at each rank
        while any(at[r] < len(waves[r]) for r in range(n)):
            moved = False
            for r in range(n):
                if at[r] >= len(waves[r]):
                    continue
                for o in waves[r][at[r]]:
                    peer, mid = o[1], o[2]
                    if mid in done[r] or at[peer] >= len(waves[peer]):
                        continue
                    if any(p[2] == mid and p[0] != o[0] for p in waves[peer][at[peer]]):
                        done[r].add(mid)
                        done[peer].add(mid)
                        moved = True
                if all(o[2] in done[r] for o in waves[r][at[r]]):
                    at[r] += 1
                    moved = True
            assert moved, f"trial {trial}: launches stuck at {at} of {[len(w) for w in waves]}"


def test_two_shot_parts_cover_the_tensor_in_whole_aligned_elements() -> None:
    from tidewire.distributed import _parts

    for nbytes, ranks, esz in [(4, 2, 4), (6, 2, 2), (100, 3, 4), (1 << 20, 4, 2), (136, 3, 8), (3, 4, 1), (9 * 1024 * 1024 + 20, 8, 4)]:
        parts = _parts(nbytes, ranks, esz)
        assert len(parts) == ranks
        at = 0
        for i, (off, length) in enumerate(parts):
            assert off == at and length % esz == 0, (nbytes, ranks, parts)
            assert i == ranks - 1 or length % 16 == 0 or length == 0 or at + length == nbytes, parts
            at += length
        assert at == nbytes, parts


def test_a_cuda_path_whose_gate_cannot_close_keeps_its_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the GPU fails before the path's gate is zeroed, a graph captured on the path could
    still replay into its buffers: they must stay (abandoned for the process), not be freed,
    and the failure must reach the caller. (No GPU needed: the communicator and the GPU's
    failure are stand-ins.)"""
    from tidewire import distributed

    calls: List[str] = []

    class Comm:
        def abandon(self) -> None:
            calls.append("abandon")

        def close(self, background: bool = False) -> None:
            calls.append("close")

    def sticky(device: Any = None) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", sticky)
    path = object.__new__(distributed._CudaPath)
    path.device, path.comm, path.gate = 0, Comm(), torch.ones(1)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        path.close(background=True)
    assert calls == ["abandon"] and path.comm is None
    assert path.close() is None  # closed once: a second close does nothing

    calls.clear()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    path.comm = Comm()
    path.close()
    assert calls == ["close"] and path.gate.item() == 0


def test_a_receive_posted_before_the_group_re_formed_fails_instead_of_waiting_on_the_new_view() -> None:
    """A point-to-point operation's id is the communicator's of the view it was posted in;
    after a re-form the new communicator numbers its own from 0 again, so the old operation
    must fail naming the change (not wait for an unrelated operation of the new view, or
    finish "successfully" with a buffer nobody filled). Stand-ins for the group and its
    communicators (no ranks needed)."""
    from tidewire import distributed

    waited: List[str] = []

    class Comm:
        def __init__(self, name: str) -> None:
            self.name = name

        def wait(self, op_id: int, what: str) -> None:
            waited.append(self.name)

        def test(self, op_id: int) -> bool:
            waited.append(self.name)
            return True

        def failure(self) -> Optional[str]:
            return None

    class Group:
        _comm, _comm_epoch, _p2p_works = Comm("old"), 0, set()

        def _call(self, fn: Any, *args: Any) -> Any:
            return fn(*args)

    pg = Group()
    t = torch.full((4,), 7.0)
    work = distributed._P2PWork(pg, 5, distributed._Flat(t, "recv"), "recv from rank 1")  # type: ignore[arg-type]
    pg._comm, pg._comm_epoch = Comm("new"), 1
    # It has ended (with the failure its wait raises), so a caller that polls stops polling.
    assert work.is_completed() and not work.is_success()
    with pytest.raises(RuntimeError, match="membership changed .*epoch 1"):
        work.wait()
    assert waited == []
    with pytest.raises(RuntimeError, match="membership changed"):
        work.wait()  # the same failure again
    # An operation of the view in force is waited for on its communicator.
    fresh = distributed._P2PWork(pg, 0, distributed._Flat(t, "recv"), "recv from rank 1")  # type: ignore[arg-type]
    assert fresh.wait() and waited == ["new"]
    # One that ended on the old communicator before it closed (an eager send) ends well: the
    # re-form settles it.
    waited.clear()
    sent = distributed._P2PWork(pg, 1, distributed._Flat(t, "send"), "send to rank 1")  # type: ignore[arg-type]
    closing, pg._comm, pg._comm_epoch = pg._comm, Comm("newer"), 2
    sent._settle(closing)
    assert waited == ["new"] and sent.is_completed() and sent.is_success() and sent.wait()


def test_ranks_whose_rings_differ_in_size_are_refused_naming_the_rank() -> None:
    from tidewire import distributed

    infos = [{"cap": 4096}, {"cap": 4096}, {"cap": 8192}]
    distributed._same_rings(infos[:2], 4096, [0, 2])
    with pytest.raises(ValueError, match="rank 3 uses 8192-byte rings and this rank 4096"):
        distributed._same_rings(infos, 4096, [0, 1, 3])


def test_a_receive_of_a_failed_group_has_ended_with_the_failure_for_a_caller_that_polls() -> None:
    """A caller that polls `is_completed()` must see the operation end once the group failed
    (its communicator moves nothing more), not poll past the timeout. Stand-ins."""
    from tidewire import distributed

    class Comm:
        def failure(self) -> Optional[str]:
            return "all_reduce: rank 1 failed"

        def test(self, op_id: int) -> bool:
            return False

        def wait(self, op_id: int, what: str) -> None:
            raise RuntimeError("recv from rank 1: the group failed earlier (all_reduce: rank 1 failed)")

    class Group:
        _comm, _comm_epoch, _p2p_works = Comm(), 0, set()

        def _call(self, fn: Any, *args: Any) -> Any:
            return fn(*args)

    work = distributed._P2PWork(Group(), 3, distributed._Flat(torch.zeros(2), "recv"), "recv from rank 1")  # type: ignore[arg-type]
    assert work.is_completed() and not work.is_success()
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        work.wait()
