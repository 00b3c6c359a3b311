"""torchnorm.nn.SyncBatchNorm against single-process BatchNorm on the
concatenated global batch.

Multi-process checks spawn 2 or 3 ranks (gloo on the CPU, a fresh file
rendezvous in a temporary folder per spawn, short timeouts); each rank builds
the whole global batch from a seed, runs torch.nn.BatchNorm on it as the
reference and SyncBatchNorm on its own shard, and compares outputs, input and
residual gradients, weight and bias gradients (summed over ranks, as
DistributedDataParallel would before averaging) and running statistics.
Spawning costs seconds, so each spawn runs a list of cases. The ops
themselves (errors, empty inputs) and the single-process paths run in this
process; their opcheck samples are in tests/op_samples.py.
"""
import copy
import datetime
import os
import re
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torchnorm
from torchnorm.nn import SyncBatchNorm

from conftest import DEVICES, NEGATIVE_SLOPE, StatsUnchanged, apply_layout, expect_error, generator, torch_act
from tolerances import SYNC_BATCH_NORM_F64, tol

OPS = torch.ops.torchnorm
SPAWN_TIMEOUT_S = 240  # a hung spawn fails the test instead of blocking the suite
COLLECTIVE_TIMEOUT_S = 60
OUT_OF_STEP = "out of step"  # what a check returns when it leaves the ranks unable to meet again

# ---------------------------------------------------------------------------
# Spawning ranks
# ---------------------------------------------------------------------------


def _rank_main(rank, world_size, init_file, check_name, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                           timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        torch.set_num_threads(1)
        ended_out_of_step = globals()[check_name](rank, world_size, *args) is OUT_OF_STEP
        # No rank tears gloo down while another may still be finishing its
        # last collective: without this barrier about one spawn in ten
        # aborted at interpreter exit ("terminate called without an active
        # exception") after every check had passed. Only when the ranks are
        # still in step: after an exception, or a check that leaves a failed
        # barrier behind, the other ranks may never arrive.
        if not ended_out_of_step:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(world_size, check, *args):
    """Runs check(rank, world_size, *args) on world_size fresh processes joined
    in a gloo group; an exception on any rank fails the test."""
    with tempfile.TemporaryDirectory() as folder:
        context = mp.spawn(_rank_main, args=(world_size, os.path.join(folder, "rendezvous"), check.__name__, args),
                           nprocs=world_size, join=False)
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{check.__name__} on {world_size} ranks did not finish in {SPAWN_TIMEOUT_S} s")


# ---------------------------------------------------------------------------
# The reference: BatchNorm of the whole global batch in one process
# ---------------------------------------------------------------------------

_TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def _shard(full, sizes, rank):
    start = sum(sizes[:rank])
    return full[start:start + sizes[rank]]


def _global_batch(sizes, tail, dtype, seed, scale=2.0, offset=3.0):
    """The global batch (sum(sizes), *tail) in float64 with per-channel offsets, rounded to dtype."""
    shape = (sum(sizes), *tail)
    x = torch.randn(shape, generator=generator(seed), dtype=torch.float64) * scale
    x = x + offset * torch.randn(tail[0], generator=generator(seed + 1), dtype=torch.float64).view(
        (1, tail[0]) + (1,) * (len(tail) - 1))
    return x.to(dtype)


def _make_pair(C, dims, momentum, affine, dtype, activation, seed):
    """SyncBatchNorm and the torch.nn BatchNorm reference (float64) with the same parameters and buffers."""
    ours = SyncBatchNorm(C, momentum=momentum, affine=affine, activation=activation, negative_slope=NEGATIVE_SLOPE,
                         dtype=dtype)
    ref = _TORCH_BN[dims](C, momentum=momentum, affine=affine, dtype=torch.float64)
    values = {"running_mean": torch.randn(C, generator=generator(seed + 2), dtype=torch.float64),
              "running_var": torch.rand(C, generator=generator(seed + 3), dtype=torch.float64) + 0.5}
    if affine:
        values.update(weight=torch.rand(C, generator=generator(seed + 4), dtype=torch.float64) + 0.5,
                      bias=torch.randn(C, generator=generator(seed + 5), dtype=torch.float64))
    with torch.no_grad():
        for name, value in values.items():
            getattr(ours, name).copy_(value)
            getattr(ref, name).copy_(getattr(ours, name))  # the values ours holds, rounded to its dtype
    return ours, ref


def _reference_step(ref, x, residual, grad_out, activation):
    """act(BN(x) + residual) on the whole batch in float64, and its gradients."""
    x = x.detach().double().clone().requires_grad_()
    residual = residual.detach().double().clone().requires_grad_() if residual is not None else None
    z = ref(x)
    if residual is not None:
        z = z + residual
    out = torch_act(z, activation)
    params = [p for p in (ref.weight, ref.bias) if p is not None]
    grads = torch.autograd.grad(out, [x, *params] + ([residual] if residual is not None else []),
                                grad_out.double(), allow_unused=True)
    return out.detach(), grads


def _compare(rank, case, what, actual, expected, dtype, kind):
    """float64: the issue's 1e-12; other dtypes: the suite's tolerance of `kind` for dtype."""
    tolerance = SYNC_BATCH_NORM_F64 if dtype == torch.float64 else tol(dtype, kind)
    torch.testing.assert_close(actual.double(), expected.double(), **tolerance,
                               msg=lambda m: f"rank {rank}, {case}: {what}: {m}")


def check_global_batch(rank, world_size, cases):
    """Each case: SyncBatchNorm on this rank's shard equals BatchNorm on the
    global batch (forward, backward, running statistics), over `steps` steps."""
    for case in cases:
        _check_case(rank, world_size, **case)


def _check_case(rank, world_size, sizes, tail, layout="contiguous", activation=None, residual=False, momentum=0.1,
                affine=True, dtype=torch.float64, param_dtype=None, steps=2, seed=0):
    assert len(sizes) == world_size
    name = f"sizes={sizes} tail={tail} {layout} act={activation} res={residual} {dtype}"
    C, dims = tail[0], len(tail) + 1
    ours, ref = _make_pair(C, dims, momentum, affine, param_dtype or dtype, activation, seed)
    for step in range(steps):
        s = seed + 100 * step
        full_x = _global_batch(sizes, tail, dtype, s)
        full_res = _global_batch(sizes, tail, dtype, s + 10, offset=0.0) if residual else None
        full_grad = _global_batch(sizes, tail, dtype, s + 20, offset=0.0)
        ref_out, ref_grads = _reference_step(ref, full_x, full_res, full_grad, activation)

        x = apply_layout(_shard(full_x, sizes, rank), layout).requires_grad_()
        res = apply_layout(_shard(full_res, sizes, rank), layout).requires_grad_() if residual else None
        out = ours(x, res)
        out.backward(apply_layout(_shard(full_grad, sizes, rank), layout))

        memory_format = {"channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d}.get(
            layout, torch.contiguous_format)
        if x.numel():
            assert out.is_contiguous(memory_format=memory_format), f"{name}: output not in the input's layout"
            assert x.grad.is_contiguous(memory_format=memory_format), f"{name}: grad_input not in the input's layout"
        assert out.dtype == dtype and x.grad.dtype == dtype
        _compare(rank, name, f"step {step} output", out, _shard(ref_out, sizes, rank), dtype, "forward")
        _compare(rank, name, f"step {step} grad_input", x.grad, _shard(ref_grads[0], sizes, rank), dtype, "grad")
        if residual:
            _compare(rank, name, f"step {step} grad_residual", res.grad, _shard(ref_grads[-1], sizes, rank), dtype,
                     "grad")
        if affine:
            for i, param in enumerate((ours.weight, ours.bias)):
                assert param.grad.dtype == param.dtype
                total = param.grad.double()
                dist.all_reduce(total)  # what DistributedDataParallel sums (then averages)
                _compare(rank, name, f"step {step} grad {('weight', 'bias')[i]}", total, ref_grads[1 + i], dtype,
                         "grad")
                param.grad = None
        for buffer in ("running_mean", "running_var"):
            # float32 statistics for every input dtype but float64, stored in
            # the buffer's dtype
            stored = getattr(ours, buffer)
            _compare(rank, name, f"step {step} {buffer}", stored, getattr(ref, buffer),
                     stored.dtype if stored.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32,
                     "stats")
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1


# float64, to 1e-12: uneven and empty shares, every layout, fused activations
# with and without residual, cumulative momentum, no affine.
CASES_3_RANKS = [
    dict(sizes=[3, 0, 5], tail=(3, 4, 5)),
    dict(sizes=[3, 0, 5], tail=(6,), momentum=None, affine=False),
    dict(sizes=[2, 4, 1], tail=(4, 3, 5), layout="channels_last", activation="relu", residual=True),
    dict(sizes=[1, 6, 2], tail=(3, 7), activation="leaky_relu", seed=5),
    dict(sizes=[0, 0, 2], tail=(2, 3), activation="silu", residual=True, seed=7),
]
CASES_2_RANKS = [
    dict(sizes=[4, 3], tail=(3, 2, 3, 4), layout="channels_last_3d", activation="silu", residual=True),
    dict(sizes=[1, 1], tail=(5,), seed=3),  # one value per channel on each rank: two globally
    dict(sizes=[5, 2], tail=(8, 4, 4), layout="channels_last", dtype=torch.float32, activation="relu", seed=9),
    dict(sizes=[3, 2], tail=(4, 6, 5), dtype=torch.float16, param_dtype=torch.float32, seed=11),
    dict(sizes=[2, 3], tail=(4, 6, 5), layout="channels_last", dtype=torch.bfloat16, activation="relu",
         residual=True, seed=13),
]


def test_three_ranks_match_global_batch():
    run_ranks(3, check_global_batch, CASES_3_RANKS)


def check_two_rank_extras(rank, world_size, cases):
    check_global_batch(rank, world_size, cases)
    _check_all_ranks_empty(rank)
    _check_bad_input_fails_before_exchange(rank)
    _check_modes(rank)
    _check_large_mean(rank, world_size)
    _check_half_parameters(rank)
    _check_conv_bn_compositions(rank)
    _check_distributed_data_parallel(rank, world_size)


def _check_all_ranks_empty(rank):
    """Every rank empty: empty output, zero parameter gradients, running
    statistics untouched (as torch.nn.BatchNorm on an empty batch)."""
    bn = SyncBatchNorm(3, activation="relu")
    before = (bn.running_mean.clone(), bn.running_var.clone())
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    out = bn(x)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(bn.weight.grad, torch.zeros(3)) and torch.equal(bn.bias.grad, torch.zeros(3))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == 1


def _check_modes(rank):
    """Evaluation mode is local (only rank 0 calls it here: a collective would
    leave the ranks out of step and fail the next checks); training without
    running statistics normalizes with the global batch's."""
    bn = SyncBatchNorm(3, activation="relu", dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.normal_(generator=generator(61))
        bn.running_var.uniform_(0.5, 1.5, generator=generator(62))
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=generator(63 + rank))
    if rank == 0:
        bn.eval()
        expected = torch.relu(torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))
        torch.testing.assert_close(bn(x), expected, **SYNC_BATCH_NORM_F64)
    sizes = [2, 3]
    full = _global_batch(sizes, (3, 4), torch.float64, 64)
    untracked = SyncBatchNorm(3, track_running_stats=False, dtype=torch.float64)
    expected = torch.nn.functional.batch_norm(full, None, None, training=True)
    torch.testing.assert_close(untracked(_shard(full, sizes, rank)), _shard(expected, sizes, rank),
                               **SYNC_BATCH_NORM_F64)


def _check_bad_input_fails_before_exchange(rank):
    """A wrong channel count fails in batch_norm_stats, before any collective
    (so no rank waits for it) and before any state changes."""
    bn = SyncBatchNorm(3, activation="relu")
    unchanged = StatsUnchanged(bn.running_mean, bn.running_var, bn.num_batches_tracked)
    expect_error(lambda: bn(torch.randn(2, 4, 5)), re.escape("torchnorm.batch_norm_stats: expected weight"),
                 stats=unchanged)
    expect_error(lambda: bn(torch.randn(2, 3, 5), torch.randn(2, 3, 4)),
                 re.escape("torchnorm.batch_norm_stats: expected residual"), stats=unchanged)
    bn(torch.randn(2, 3, 5))  # the ranks are still in step


def _check_large_mean(rank, world_size):
    """float32 data of mean 1e4 and std 1: the global variance within 1e-5
    relative of float64's (a plain sum / sum of squares exchange is off by
    about 7x here)."""
    sizes, tail = [6, 10], (3, 8, 8)
    full = (torch.randn((sum(sizes), *tail), generator=generator(21), dtype=torch.float64) + 1e4).float()
    for layout in ("contiguous", "channels_last"):
        bn = SyncBatchNorm(3, momentum=1.0)  # running_var becomes the global unbiased variance
        bn(apply_layout(_shard(full, sizes, rank), layout))
        expected = full.double().transpose(0, 1).reshape(3, -1).var(dim=1)
        relative = ((bn.running_var.double() - expected) / expected).abs().max().item()
        assert relative < 1e-5, f"rank {rank} {layout}: relative variance error {relative}"


def _check_half_parameters(rank):
    """A module converted with .half(): float16 parameters and buffers, float32
    statistics and gradient sums inside (the all-reduced sums are float32)."""
    sizes, tail = [4, 4], (3, 5, 5)
    full = _global_batch(sizes, tail, torch.float16, 31)
    ref = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    bn = SyncBatchNorm(3).half()
    x = _shard(full, sizes, rank).requires_grad_()
    bn(x).float().square().sum().backward()
    xr = full.double().requires_grad_()
    ref(xr).square().sum().backward()
    assert bn.weight.grad.dtype == torch.float16 and bn.running_var.dtype == torch.float16
    torch.testing.assert_close(x.grad.double(), _shard(xr.grad, sizes, rank), **tol(torch.float16, "grad"))
    torch.testing.assert_close(bn.running_var.double(), ref.running_var, **tol(torch.float16, "stats"))


def _check_conv_bn_compositions(rank):
    """torchnorm's fused Conv+BN paths with a SyncBatchNorm: a model converted
    then fused (fx.fuse_conv_bn), and a ConvBN2d block converted, both equal
    Conv + BatchNorm + ReLU on the global batch (float64)."""
    sizes = [2, 3]
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
                                    torch.nn.ReLU()).double()
    converted = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    fused = torchnorm.fx.fuse_conv_bn(converted)
    assert any(isinstance(m, torchnorm.fx.FusedChain) for m in fused.modules()), "nothing fused"
    block = torchnorm.nn.ConvBN2d(3, 4, 3, padding=1, activation="relu").double()
    block.conv.load_state_dict(reference[0].state_dict())
    block = SyncBatchNorm.convert_sync_batchnorm(block)
    assert type(block.bn) is SyncBatchNorm
    full = _global_batch(sizes, (3, 5, 5), torch.float64, 41)
    xr = full.clone().requires_grad_()
    ref_out = reference(xr)
    ref_out.square().sum().backward()
    for name, model, conv, bn in (("fused", fused, converted[0], converted[1]), ("block", block, block.conv, block.bn)):
        x = _shard(full, sizes, rank).clone().requires_grad_()
        out = model(x)
        out.square().sum().backward()
        _compare(rank, name, "output", out, _shard(ref_out, sizes, rank), torch.float64, "forward")
        _compare(rank, name, "grad_input", x.grad, _shard(xr.grad, sizes, rank), torch.float64, "grad")
        conv_grad = conv.weight.grad.clone()
        dist.all_reduce(conv_grad)
        _compare(rank, name, "conv weight grad", conv_grad, reference[0].weight.grad, torch.float64, "grad")
        _compare(rank, name, "running_var", bn.running_var, reference[1].running_var, torch.float64, "stats")


def _check_distributed_data_parallel(rank, world_size):
    """DistributedDataParallel accepts a CPU model with SyncBatchNorm (it
    refuses torch.nn.SyncBatchNorm there), and its averaged gradients are the
    global batch's divided by the number of ranks."""
    sizes = [3, 4]
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torchnorm.nn.BatchNormAct2d(4),
                                    torch.nn.Conv2d(4, 2, 1)).double()
    model = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    full = _global_batch(sizes, (3, 6, 6), torch.float64, 51)
    reference(full).square().sum().backward()
    ddp(_shard(full, sizes, rank)).square().sum().backward()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        _compare(rank, "ddp", f"{name} grad", ours.grad * world_size, theirs.grad, torch.float64, "grad")
    _compare(rank, "ddp", "running_var", model[1].running_var, reference[1].running_var, torch.float64, "stats")


def check_two_ranks(rank, world_size, cases):
    check_two_rank_extras(rank, world_size, cases)
    check_skipped_layer(rank, world_size)  # last: it leaves rank 0 past a failed barrier
    return OUT_OF_STEP


def test_two_ranks_match_global_batch_and_name_a_rank_that_skips_a_layer():
    # One spawn for all the two-rank checks: spawning costs seconds.
    run_ranks(2, check_two_ranks, CASES_2_RANKS)


# ---------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break, same results as eager
# ---------------------------------------------------------------------------


def check_compiled(rank, world_size):
    # float64: in float32 this two-BatchNorm net's gradients differ from a
    # float64 run by up to 1e-2 (relative) in eager mode already, and the
    # compiled graph may hand the ops other layouts (they take any), so
    # other summation orders; float32 eager and compiled then differ by as
    # much, each about as far from float64 as the other.
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), SyncBatchNorm(4, activation="relu"),
                                torch.nn.Conv2d(4, 4, 1), torchnorm.nn.BatchNorm2d(4))
    eager = SyncBatchNorm.convert_sync_batchnorm(eager).double()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    sizes = [3, 5]
    for step in range(2):
        full = torch.randn(sum(sizes), 3, 6, 6, generator=generator(step), dtype=torch.float64)
        x = _shard(full, sizes, rank)
        outs = []
        for model in (eager, compiled):
            out = model(x)
            out.square().sum().backward()
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], **tol(torch.float64, "forward"))
        for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, **tol(torch.float64, "grad"), msg=name)
            a.grad = b.grad = None
        for (name, a), b in zip(eager.named_buffers(), compiled_model.buffers()):
            torch.testing.assert_close(b, a, **tol(torch.float64, "stats"), msg=name)
    # DistributedDataParallel around the compiled model (DDP's own forward
    # does not compile with fullgraph=True: its logger graph-breaks).
    ddp_eager = torch.nn.parallel.DistributedDataParallel(eager)
    ddp_compiled = torch.nn.parallel.DistributedDataParallel(torch.compile(compiled_model, fullgraph=True))
    x = torch.randn(4 + rank, 3, 6, 6, generator=generator(10 + rank), dtype=torch.float64)
    for model in (ddp_eager, ddp_compiled):
        model(x).square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **tol(torch.float64, "grad"), msg=name)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


@pytest.mark.slow
def test_compile_fullgraph_two_ranks():
    run_ranks(2, check_compiled)


# ---------------------------------------------------------------------------
# A rank that skips the layer: a clear error naming it, not a hang
# ---------------------------------------------------------------------------

DEBUG_TIMEOUT_S = 2


def check_skipped_layer(rank, world_size):
    """Run by test_two_ranks_match_global_batch_and_name_a_rank_that_skips_a_layer."""
    os.environ["TORCHNORM_SYNCBN_DEBUG_TIMEOUT"] = str(DEBUG_TIMEOUT_S)
    first, second = SyncBatchNorm(3, debug=True), SyncBatchNorm(3, debug=True)
    x = torch.randn(2, 3, 4)
    second(first(x))  # every rank in step: no error
    # Rank 1 skips `first` and reaches `second`: both ranks name the mismatch.
    try:
        second(x) if rank == 1 else second(first(x))
    except RuntimeError as error:
        assert "different SyncBatchNorm layers" in str(error), str(error)
        assert f"rank 1 at SyncBatchNorm #{second._layer_id}" in str(error), str(error)
    else:
        raise AssertionError(f"rank {rank}: no error for a skipped layer")
    # Rank 1 skips the layers altogether (stuck elsewhere): rank 0 names it.
    if rank == 1:
        time.sleep(DEBUG_TIMEOUT_S + 2)
        return
    start = time.monotonic()
    try:
        first(x)
    except RuntimeError as error:
        assert "not every rank of the process group reached a SyncBatchNorm" in str(error), str(error)
        assert re.search(r"Ranks? 1\b", str(error)), str(error)  # gloo's monitored_barrier names the missing rank
    else:
        raise AssertionError("rank 0: no error when rank 1 never arrives")
    assert time.monotonic() - start < DEBUG_TIMEOUT_S + 10


# ---------------------------------------------------------------------------
# Single process: no process group, a group of one, errors, the ops
# ---------------------------------------------------------------------------


def _local_pair(activation="relu"):
    ours = SyncBatchNorm(4, activation=activation, negative_slope=NEGATIVE_SLOPE, dtype=torch.float64)
    ref = torchnorm.nn.BatchNormAct2d(4, activation=activation, negative_slope=NEGATIVE_SLOPE, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _assert_same_as_local_batch_norm():
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=generator(1))
    res = torch.randn_like(x)
    ours, ref = _local_pair()
    for train in (True, False):
        ours.train(train)
        ref.train(train)
        torch.testing.assert_close(ours(x, res), ref(x, res), **SYNC_BATCH_NORM_F64)
        for a, b in zip(ours.buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, **SYNC_BATCH_NORM_F64)


def test_without_process_group_is_local_batch_norm():
    assert not dist.is_initialized()
    _assert_same_as_local_batch_norm()


def test_group_of_one_is_local_batch_norm(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        _assert_same_as_local_batch_norm()
    finally:
        dist.destroy_process_group()


def test_drop_in_for_torch_sync_batch_norm():
    ours, theirs = SyncBatchNorm(6, momentum=None, affine=False), torch.nn.SyncBatchNorm(6, momentum=None,
                                                                                           affine=False)
    # torch.nn's BatchNorm base, not torch.nn.SyncBatchNorm (which DistributedDataParallel refuses on the CPU)
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(ours, torch.nn.SyncBatchNorm)
    assert ours.process_group is None
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert repr(ours) == repr(theirs)
    assert "activation='leaky_relu', negative_slope=0.2" in repr(SyncBatchNorm(2, activation="leaky_relu",
                                                                               negative_slope=0.2))
    expect_error(lambda: SyncBatchNorm(3)(torch.randn(3)), "expected at least 2D input", types=ValueError)
    expect_error(lambda: SyncBatchNorm(3)(torch.randn(2, 4, 5)), re.escape("torchnorm.batch_norm_train"))
    expect_error(lambda: SyncBatchNorm(3, activation="tanh"), "activation must be", types=ValueError)


def test_convert_sync_batchnorm_shares_parameters_and_keeps_activation():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torchnorm.nn.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.3),
                                torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.SyncBatchNorm(4)))
    model[3].eval()
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    group = object()  # stands for a process group: stored, not used here
    converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert converted is model
    for index in ("1", "3", "4.0", "4.1"):
        bn = model.get_submodule(index)
        assert type(bn) is SyncBatchNorm and bn.process_group is group, index
    assert model[3].activation == "leaky_relu" and model[3].negative_slope == 0.3 and not model[3].training
    assert model[1].activation is None
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t is tensors[name], name
    single = SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm3d(2))
    assert type(single) is SyncBatchNorm


def test_convert_torchvision_resnet():
    """Every BatchNorm of a torchvision ResNet-18 becomes a SyncBatchNorm on
    the same tensors; without a process group the model computes as with
    torchnorm's BatchNorm2d (float32 differences from torch.nn's kernels grow
    through 20 BatchNorms of a few values per channel at this input size)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10)
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in original.modules())
    converted = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original))
    original = torchnorm.convert(original)
    assert sum(type(m) is SyncBatchNorm for m in converted.modules()) == batch_norms == 20
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in converted.modules())
    x = torch.randn(2, 3, 32, 32, generator=generator(5))
    for train in (True, False):
        original.train(train)
        converted.train(train)
        torch.testing.assert_close(converted(x), original(x), **tol(torch.float32, "forward"))
    for a, b in zip(converted.buffers(), original.buffers()):
        torch.testing.assert_close(a, b, **tol(torch.float32, "stats"))


@pytest.mark.parametrize("act_layer", ["silu", "relu"])
def test_convert_timm_batch_norm_act(act_layer):
    """timm's BatchNormAct2d: converted with its activation fused, on the same
    tensors; without a process group it computes as before."""
    timm_layers = pytest.importorskip("timm.layers")
    act = {"silu": torch.nn.SiLU, "relu": torch.nn.ReLU}[act_layer]
    original = timm_layers.BatchNormAct2d(6, act_layer=act)
    with torch.no_grad():
        original.weight.uniform_(0.5, 1.5)
        original.bias.normal_()
    reference = copy.deepcopy(original)
    converted = SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(original))[0]
    assert type(converted) is SyncBatchNorm and converted.activation == act_layer
    assert converted.weight is original.weight and converted.running_var is original.running_var
    assert not list(converted.children()) and converted.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(4, 6, 5, 5, generator=generator(6))
    torch.testing.assert_close(converted(x), reference(x), **tol(torch.float32, "forward"))
    torch.testing.assert_close(converted.running_var, reference.running_var, **tol(torch.float32, "stats"))
    dropped = timm_layers.BatchNormAct2d(6, act_layer=torch.nn.ReLU, drop_layer=torch.nn.Dropout)
    dropped.drop.p = 0.5  # a dropout that acts in training: left alone
    assert SyncBatchNorm.convert_sync_batchnorm(dropped) is dropped


def test_torchnorm_convert_reaches_sync_batch_norm():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.SyncBatchNorm(4), torch.nn.LayerNorm(4))
    torchnorm.convert(model)
    assert [type(m) for m in model] == [torchnorm.nn.BatchNorm2d, SyncBatchNorm, torchnorm.nn.LayerNorm]
    torchnorm.convert(model, back=True)
    assert [type(m) for m in model] == [torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm, torch.nn.LayerNorm]
    assert not hasattr(model[1], "activation")
    torchnorm.convert(model, sync=True)
    assert [type(m) for m in model] == [SyncBatchNorm, SyncBatchNorm, torchnorm.nn.LayerNorm]
    expect_error(lambda: torchnorm.convert(model, back=True, sync=True), "cannot be combined", types=ValueError)


def test_ops_reject_bad_input_clearly():
    x = torch.randn(4, 3, 5)

    def error(fn, message, stats=None):
        expect_error(fn, re.escape(message), stats=stats)

    error(lambda: OPS.batch_norm_stats(torch.randn(4)), "torchnorm.batch_norm_stats: expected an input of shape")
    error(lambda: OPS.batch_norm_stats(x.int()), "torchnorm.batch_norm_stats")
    table = OPS.batch_norm_stats(x).unsqueeze(0)
    rm, rv = torch.zeros(3), torch.ones(3)
    unchanged = StatsUnchanged(rm, rv)
    error(lambda: OPS.batch_norm_gather_stats(table[:, :2], rm, rv, 0.1, 1e-5), "expected stats of shape (W, 3, C)",
          unchanged)
    error(lambda: OPS.batch_norm_gather_stats(table.half(), rm, rv, 0.1, 1e-5), "float32 or float64 stats",
          unchanged)
    error(lambda: OPS.batch_norm_gather_stats(table, rm, torch.ones(4), 0.1, 1e-5),
          "expected running_var of shape (3,)", unchanged)
    error(lambda: OPS.batch_norm_gather_stats(table, rm, None, 0.1, 1e-5), "given together", unchanged)
    _, mean, rstd = OPS.batch_norm_train(x, None, None, None, None, 0.1, 1e-5, "none", 0.0, None)
    args = [x, x, None, None, None, mean, rstd, mean, mean.double(), "none", 0.0, [True, False]]
    error(lambda: OPS.batch_norm_backward_elemt(*args), "torchnorm.batch_norm_backward_elemt: expected mean_dz_xhat")
    args[8], args[6] = mean, rstd[:2]
    error(lambda: OPS.batch_norm_backward_elemt(*args),
          "torchnorm.batch_norm_backward_elemt: expected saved statistics")


@pytest.mark.parametrize("device", DEVICES)
def test_stats_and_merge_are_exact_and_order_independent_of_layout(device):
    """batch_norm_stats of every layout, and batch_norm_gather_stats of
    shards (an empty one included), against float64 statistics of the whole."""
    full = (torch.randn(7, 3, 4, 5, dtype=torch.float64, generator=generator(3)) * 3 + 100).to(device)
    for layout in ("contiguous", "channels_last"):
        stats = OPS.batch_norm_stats(apply_layout(full, layout))
        flat = full.transpose(0, 1).reshape(3, -1)
        torch.testing.assert_close(stats[0], full.new_full((3,), 140.0), rtol=0, atol=0)
        torch.testing.assert_close(stats[1], flat.mean(1), **SYNC_BATCH_NORM_F64)
        torch.testing.assert_close(stats[2], (flat - flat.mean(1, keepdim=True)).square().sum(1), **SYNC_BATCH_NORM_F64)
    empty = OPS.batch_norm_stats(full[:0])
    assert torch.equal(empty, full.new_zeros(3, 3))
    shards = [full[:2], full[2:2], full[2:]]
    table = torch.stack([OPS.batch_norm_stats(s) for s in shards])
    rm, rv = full.new_zeros(3), full.new_ones(3)
    mean, rstd, count = OPS.batch_norm_gather_stats(table, rm, rv, 0.5, 1e-5)
    flat = full.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(mean, flat.mean(1), **SYNC_BATCH_NORM_F64)
    torch.testing.assert_close(rstd, (flat.var(1, unbiased=False) + 1e-5).rsqrt(), **SYNC_BATCH_NORM_F64)
    torch.testing.assert_close(rv, 0.5 + 0.5 * flat.var(1), **SYNC_BATCH_NORM_F64)
    assert torch.equal(count, full.new_full((3,), 140.0))
    # All partials empty: running statistics untouched, finite statistics.
    rm2, rv2 = rm.clone(), rv.clone()
    mean, rstd, count = OPS.batch_norm_gather_stats(full.new_zeros(2, 3, 3), rm2, rv2, 0.5, 1e-5)
    assert torch.equal(rm2, rm) and torch.equal(rv2, rv) and torch.equal(count, full.new_zeros(3))
    assert torch.equal(mean, full.new_zeros(3)) and torch.isfinite(rstd).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_per_rank_ops_match_cpu(layout, dtype):
    """The three per-rank ops on CUDA against the same ops on the CPU (whose
    numerics the multi-process tests check against the global batch): stats,
    merge with running statistics, and the element-wise backward with a
    residual and an activation."""
    gen = generator(11)
    x = apply_layout((torch.randn(6, 5, 7, 9, generator=gen) * 2 + 30).to(dtype), layout)
    gy, res = (apply_layout(torch.randn(6, 5, 7, 9, generator=gen).to(dtype), layout) for _ in range(2))
    w, b = torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen)
    mean_dz, mean_dz_xhat = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    outputs = {}
    for device in ("cpu", "cuda"):
        on = lambda t: t.to(device)  # noqa: E731
        table = torch.stack([OPS.batch_norm_stats(on(x[:2])), OPS.batch_norm_stats(on(x[2:2])),
                             OPS.batch_norm_stats(on(x[2:]))])
        rm, rv = on(torch.zeros(5)), on(torch.ones(5))
        mean, rstd, count = OPS.batch_norm_gather_stats(table, rm, rv, 0.1, 1e-5)
        # The merge is float64 (the table's dtype); the kernels take the
        # statistics in the accumulation dtype, as the module passes them.
        grads = OPS.batch_norm_backward_elemt(on(gy), on(x), on(w), on(b), on(res), mean.float(), rstd.float(),
                                              on(mean_dz), on(mean_dz_xhat), "silu", 0.0, [True, True])
        outputs[device] = [t.cpu() for t in (table, mean, rstd, count, rm, rv, *grads)]
    # Statistics accumulate in float32 for both input dtypes (float64 only
    # holds the per-rank results); the gradients are in the input dtype.
    kinds = ["stats"] * 6 + ["grad"] * 2
    for got, want, kind in zip(outputs["cuda"], outputs["cpu"], kinds):
        torch.testing.assert_close(got, want, **tol(dtype if kind == "grad" else torch.float32, kind))
