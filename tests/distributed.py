"""Run a module-level function on N local processes joined in a gloo process group (spawn start method).

Results come back per rank (return plain Python or numpy values: tensors in a queue outlive no process); an
exception on any rank is re-raised in the test. The queue is drained before the processes are joined: a child
that put more than a pipe buffer cannot exit until its data is read. The group's timeout is short (60 s) so
that a rank waiting on a failed peer ends instead of hanging the suite."""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, kwargs, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        queue.put((rank, fn(**kwargs)))
    except BaseException as e:  # noqa: BLE001 — handed to the parent
        queue.put((rank, e))
        raise
    finally:
        dist.destroy_process_group()


def run_dist(fn, world: int, **kwargs) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_worker, args=(world, _free_port(), fn, kwargs, queue), nprocs=world,
                               join=False, start_method="spawn")
    results: dict = {}
    while len(results) < world:
        try:
            rank, value = queue.get(timeout=2)
        except queue_mod.Empty:
            procs.join(timeout=0)  # raises when a rank died without reporting
            continue
        results[rank] = value
    while not procs.join():
        pass
    for value in results.values():
        if isinstance(value, BaseException):
            raise value
    return results


def release_model_parallel() -> None:
    """megatron-core's ``destroy_model_parallel``, then every process group but the default one. Megatron keeps its
    groups registered with torch, and each gloo group holds its I/O threads until destroyed: a launch that builds
    many layouts one after another would otherwise run with thousands of threads per rank."""
    from megatron.core import parallel_state as ps

    groups = [g for g in list(dist.distributed_c10d._world.pg_map) if g is not dist.GroupMember.WORLD]
    ps.destroy_model_parallel()
    for group in groups:
        if group in dist.distributed_c10d._world.pg_map:  # megatron destroys some of its gloo groups itself
            dist.destroy_process_group(group)
