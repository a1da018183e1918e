"""Multi-process jobs: detectron2's ``launch``, stopping the whole job when a process is lost.

:func:`launch` starts the processes of this machine with detectron2's worker (process group,
local group, device) as ``detectron2.engine.launch`` does, and then supervises them and the
job: a child that dies, or a rank lost anywhere in the job (:mod:`~smca_d2.engine.watchdog`),
stops every process of every machine within about ``peer_timeout`` seconds, and the launcher
raises :class:`DistributedJobError` naming the rank and what happened to it. The last complete
checkpoint is left as it was (checkpoints are written atomically) for ``--resume``.
"""

import contextlib
import dataclasses
import functools
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from ..compat import DEFAULT_TIMEOUT, distributed_worker
from .watchdog import DEFAULT_PEER_TIMEOUT, PeerWatchdog, exit_now, store_address

__all__ = ["DEFAULT_PEER_TIMEOUT", "DistributedJobError", "launch"]

logger = logging.getLogger(__name__)

#: Seconds a launcher gives its other children to exit by themselves after one failed, and
#: again after SIGTERM, before it kills them.
GRACE_PERIOD = 2.0


class DistributedJobError(RuntimeError):
    """The job stopped because one of its processes died, hung or raised; the message names the
    rank and what happened."""


@dataclasses.dataclass(frozen=True)
class _Job:
    """What each process needs to take part in watching the job."""

    address: Optional[Tuple[str, int]]
    peer_timeout: float
    report_dir: str
    machine_rank: int


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
    peer_timeout: float = DEFAULT_PEER_TIMEOUT,
):
    """:func:`detectron2.engine.launch`, also without GPUs, with the job supervised.

    Args:
        main_func, num_machines, machine_rank, dist_url, args, timeout: as in detectron2.
        num_gpus_per_machine: processes on this machine (one per GPU; CPU processes without GPUs).
        peer_timeout: seconds after which a process that stopped answering counts as lost and
            the job stops; 0 turns the watching off (then a lost process leaves the others
            waiting for ``timeout``). Needs a ``tcp://`` (or ``env://``) ``dist_url``.

    Raises:
        DistributedJobError: a process of the job died, hung or raised.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url=auto is not supported for multi-machine jobs.")
        from detectron2.engine.launch import _find_free_port

        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    address = store_address(dist_url) if peer_timeout else None
    if peer_timeout and address is None:
        logger.warning(
            f"dist_url {dist_url} has no TCP store to watch the job through: a lost process will leave "
            f"the others waiting for the collectives' timeout ({timeout})."
        )
    report_dir = tempfile.mkdtemp(prefix="smca_d2_launch_")
    job = _Job(address, float(peer_timeout), report_dir, machine_rank)
    try:
        context = torch.multiprocessing.start_processes(
            distributed_worker(),
            nprocs=num_gpus_per_machine,
            args=(
                functools.partial(_watched_main, main_func, job),
                world_size,
                num_gpus_per_machine,
                machine_rank,
                dist_url,
                args,
                timeout,
            ),
            daemon=False,
            join=False,
        )
        first = machine_rank * num_gpus_per_machine
        print(
            f"[smca_d2 launch] machine {machine_rank}: "
            + ", ".join(f"rank {first + i} is pid {p.pid}" for i, p in enumerate(context.processes)),
            file=sys.stderr,
            flush=True,
        )
        _supervise(context, job, world_size, num_gpus_per_machine)
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)


def _supervise(context, job: _Job, world_size: int, num_per_machine: int) -> None:
    """Wait for this machine's processes; stop them all when one fails here or the job fails
    elsewhere."""
    watchdog = PeerWatchdog(job.address, None, world_size, job.peer_timeout).start() if job.address else None
    try:
        _wait_for(context, job, watchdog, world_size, num_per_machine)
    finally:
        if watchdog is not None:
            watchdog.stop()


def _wait_for(context, job: _Job, watchdog, world_size: int, num_per_machine: int) -> None:
    interval = watchdog.interval if watchdog is not None else None
    while True:
        try:
            if context.join(timeout=interval, grace_period=GRACE_PERIOD):
                return
        except (ProcessExitedException, ProcessRaisedException) as e:
            if isinstance(e, ProcessRaisedException):
                sys.stderr.write(f"{e}\n")  # the child's traceback
            reason = _read_report(job, e.error_index)  # the child's own account, also in the store
            if reason is None:
                reason = _describe(e, job, num_per_machine)
                if watchdog is not None and world_size > num_per_machine:  # other machines to tell
                    try:
                        reason = watchdog.new_client().report_failure(reason)
                    except Exception as store_error:  # e.g. the store went with the failed process (rank 0)
                        logger.warning(f"Could not tell the other processes of the job why it stops: {store_error!r}")
            raise DistributedJobError(f"The job stopped: {reason}.") from None
        reason = watchdog.failure if watchdog is not None else None
        if reason is not None:
            _stop(context.processes)
            raise DistributedJobError(f"The job stopped: {reason}.")


def _describe(error, job: _Job, num_per_machine: int) -> str:
    rank = job.machine_rank * num_per_machine + error.error_index
    who = f"rank {rank} (pid {error.error_pid}, machine {job.machine_rank})"
    if isinstance(error, ProcessRaisedException):
        return f"{who} raised an error (its traceback is above)"
    if error.signal_name:
        return f"{who} was killed by {error.signal_name}"
    return f"{who} exited with code {error.exit_code}"


def _stop(processes) -> None:
    """Let the processes exit by themselves for a grace period, then kill them (SIGKILL also ends a
    stopped process, which SIGTERM does not)."""
    deadline = time.monotonic() + GRACE_PERIOD
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
        p.join()


def _report_path(report_dir: str, local_rank: int) -> str:
    return os.path.join(report_dir, f"local_rank_{local_rank}.txt")


def _read_report(job: _Job, local_rank: int) -> Optional[str]:
    try:
        with open(_report_path(job.report_dir, local_rank)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _write_report(job: _Job, local_rank: int, reason: str) -> None:
    try:
        with open(_report_path(job.report_dir, local_rank), "w") as f:
            f.write(reason)
    except OSError:
        pass


def _is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` is a collective or store failure (GLOO raises plain RuntimeErrors)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and re.search(r"gloo|nccl|connection|socket", str(error), re.I) is not None


def _watched_main(main_func, job: _Job, *args):
    """Run ``main_func(*args)`` in a process of the job with a :class:`PeerWatchdog` beside it."""
    from detectron2.utils import comm

    if job.address is None:
        return main_func(*args)
    rank, local_rank = comm.get_rank(), comm.get_local_rank()

    def stop_process(reason: str) -> None:
        _write_report(job, local_rank, reason)
        if rank == 0:  # this process holds the store: keep it up until the others have read the reason
            time.sleep(3 * watchdog.interval)
        exit_now(f"rank {rank} stops: {reason}")

    watchdog = PeerWatchdog(job.address, rank, comm.get_world_size(), job.peer_timeout, on_failure=stop_process)
    watchdog.start()
    try:
        result = main_func(*args)
    except BaseException as e:
        # An error here may follow from a failure elsewhere (a collective fails when a peer is
        # lost): give the watchdog the time to hear of it or to find it, and it ends this process
        # with that reason instead.
        if _is_communication_error(e):
            watchdog.wait_for_failure(job.peer_timeout + 2 * watchdog.interval)
        else:
            watchdog.wait_for_failure(2 * watchdog.interval)
        watchdog.stop()
        reason = f"rank {rank} (pid {os.getpid()}, machine {job.machine_rank}) raised {type(e).__name__}: {e}"
        with contextlib.suppress(Exception):
            reason = watchdog.new_client().report_failure(reason)
        _write_report(job, local_rank, reason)
        raise
    watchdog.mark_done()  # rank 0 stops the process from there if a rank is lost while it waits
    return result
