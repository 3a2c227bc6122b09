"""Runs a function on `world` ranks of a fresh torch.distributed group, one spawned process
per rank on this machine (a file rendezvous in a temporary directory: loopback only),
bounded in time: the expert-parallel benchmark and tests use it."""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(target, rank, world, backend, tmp, args):
    path = os.path.join(tmp, f"rank{rank}")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'rdzv')}",
                                rank=rank, world_size=world)
        result = target(rank, world, *args)
        torch.save(result, path + ".pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(path + ".err", "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(target, world: int, args=(), *, backend: str = "gloo", timeout_s: float = 180):
    """[target(rank, world, *args) for each rank], each in its own process inside an
    initialised process group. `target` must be importable (a module-level function). On a
    rank's exception: RuntimeError with every failed rank's traceback; past timeout_s every rank is killed
    and RuntimeError is raised."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank_main, args=(target, r, world, backend, tmp, args))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        errors = [f"{f[:-4]}: {open(os.path.join(tmp, f)).read()}"
                  for f in sorted(os.listdir(tmp)) if f.endswith(".err")]
        if errors:   # every rank's: the first to fail makes its peers fail too
            raise RuntimeError("ranks failed:\n" + "\n".join(errors))
        if alive:
            raise RuntimeError(f"{len(alive)} of {world} ranks still running after "
                               f"{timeout_s} s; killed")
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"ranks exited with {[p.exitcode for p in procs]}")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
