"""SyncBatchNorm's debug check: every rank at the same layer, or a clear error.

A rank that skips a SyncBatchNorm layer (data-dependent control flow, an
early exit) leaves the others waiting in that layer's all_gather forever
(torch.nn.SyncBatchNorm hangs the same way, pytorch issue 44957). With the
check on, each synchronizing call first runs

1. ``torch.distributed.monitored_barrier`` (on a gloo group) with a timeout:
   when a rank never arrives, rank 0 raises an error naming the ranks that
   did not, and the others raise a timeout;
2. an all_gather of (layer id, call number) of every rank: all ranks are in
   *some* SyncBatchNorm now, and if not all in the same one (a rank skipped
   a layer and reached the next), every rank raises an error naming which
   rank is where.

Eager mode only: it costs two small collectives, and is not traceable.
"""
import datetime

import torch
import torch.distributed as dist

# Gloo groups for process groups of other backends (NCCL), by group.
_gloo_groups = {}


def _gloo_group_for(group):
    if dist.get_backend(group) == "gloo":
        return group
    if group not in _gloo_groups:
        # Creating a group is itself collective: the first debug check must
        # be reached by every rank (later ones are what this module checks).
        _gloo_groups[group] = dist.new_group(dist.get_process_group_ranks(group), backend="gloo")
    return _gloo_groups[group]


def check_ranks_in_step(group, layer_id: int, call: int, timeout_s: float) -> None:
    """Raises RuntimeError, on every rank of ``group``, unless every rank
    reaches this check for the same (layer_id, call) within ``timeout_s``."""
    gloo = _gloo_group_for(group)
    rank = dist.get_rank(group)
    where = f"torchnorm SyncBatchNorm #{layer_id} (call {call}) on rank {rank}"
    try:
        dist.monitored_barrier(gloo, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as error:
        hint = ("" if rank == 0 else " (rank 0's error names the ranks that did not arrive)")
        raise RuntimeError(
            f"{where}: not every rank of the process group reached a SyncBatchNorm within {timeout_s:g} s: a rank "
            f"skipped the layer or is stuck elsewhere{hint}. {error}") from error
    mine = torch.tensor([layer_id, call], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(gloo))]
    dist.all_gather(everyone, mine, group=gloo)
    if any(not torch.equal(other, mine) for other in everyone):
        places = ", ".join(f"rank {r} at SyncBatchNorm #{int(t[0])} (call {int(t[1])})" for r, t in enumerate(everyone))
        raise RuntimeError(f"{where}: the ranks are in different SyncBatchNorm layers ({places}): a rank skipped "
                           f"a layer; every rank must call every SyncBatchNorm in the same order")
