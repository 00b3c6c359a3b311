"""DistributedDataParallel training with torchnorm's SyncBatchNorm.

Spawns --ranks processes on this machine (gloo on the CPU by default; NCCL,
one GPU per rank, with --cuda when there are enough GPUs), each with its own
shard of a synthetic image task and a different batch size (uneven shares,
which SyncBatchNorm merges exactly), trains a small conv net whose BatchNorms
were converted with ``SyncBatchNorm.convert_sync_batchnorm``, prints the loss
falling, and checks that every rank ends with identical running statistics.

    python -m examples.ddp_syncbn                # 2 CPU ranks
    python -m examples.ddp_syncbn --ranks 3 --steps 60
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import torchnorm


def make_model() -> torch.nn.Module:
    """A small conv net with torch.nn BatchNorms (converted below) and a fused one."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, stride=2),
        torchnorm.nn.BatchNormAct2d(32, activation="relu"),  # stays fused as a SyncBatchNorm
        torch.nn.Conv2d(32, 32, 3, padding=1, stride=2), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 4))


def batch(rank: int, step: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic 4-class task: a bright bar in one of four places (row or
    column, top/left or bottom/right half) on noise with a per-image offset."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    labels = torch.randint(0, 4, (size,), generator=g)
    x = torch.randn(size, 1, 16, 16, generator=g) * 0.5 + torch.randn(size, 1, 1, 1, generator=g)
    for i, label in enumerate(labels.tolist()):
        where = slice(2, 6) if label % 2 == 0 else slice(10, 14)
        if label < 2:
            x[i, 0, where, :] += 1.5
        else:
            x[i, 0, :, where] += 1.5
    return x.to(device), labels.to(device)


def train(rank: int, world_size: int, init_file: str, steps: int, use_cuda: bool) -> None:
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torchnorm.nn.SyncBatchNorm.convert_sync_batchnorm(make_model()).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if use_cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    size = 8 + 4 * rank  # uneven shares of the global batch
    for step in range(steps):
        x, labels = batch(rank, step, size, device)
        loss = F.cross_entropy(ddp(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total = loss.detach() * size
        dist.all_reduce(total)
        if rank == 0 and (step % 10 == 0 or step == steps - 1):
            print(f"step {step:3d}  global mean loss {total.item() / sum(8 + 4 * r for r in range(world_size)):.4f}",
                  flush=True)

    # Every rank merged the same per-rank statistics in the same order: the
    # running statistics are bit-identical across ranks.
    mine = torch.cat([b.flatten().double() for name, b in model.named_buffers() if "running" in name])
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    if rank == 0:
        differs = max((other - mine).abs().max().item() for other in everyone)
        print(f"running statistics of {world_size} ranks ({mine.numel()} values): max difference {differs}")
        assert differs == 0, "running statistics differ across ranks"
    dist.barrier()  # every rank past its last collective before gloo is torn down (else a rare abort at exit)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank")
    args = parser.parse_args()
    use_cuda = args.cuda and torch.cuda.is_available() and torch.cuda.device_count() >= args.ranks
    if args.cuda and not use_cuda:
        print(f"--cuda: fewer than {args.ranks} GPUs, running on the CPU with gloo")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(train, args=(args.ranks, os.path.join(folder, "rendezvous"), args.steps, use_cuda),
                 nprocs=args.ranks)


if __name__ == "__main__":
    main()
