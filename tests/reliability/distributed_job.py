"""A multi-process job for the tests of tests/reliability/test_distributed_faults.py: each rank
all-reduces in a loop, as training does, and says it is running by writing ``rank<R>.running``
(with what it sees of the job: world size, local rank, processes on its machine, sum of the ranks).

    python distributed_job.py OUT MACHINE_RANK NUM_MACHINES PROCS_PER_MACHINE DIST_URL PEER_TIMEOUT
"""

import json
import os
import sys
import time


def all_reduce_loop(out: str, seconds: float) -> None:
    import torch
    import torch.distributed as dist

    from detectron2.utils import comm

    total = torch.tensor([float(comm.get_rank())])
    dist.all_reduce(total)  # every rank is in the job
    report = {
        "world": comm.get_world_size(),
        "local_rank": comm.get_local_rank(),
        "machine_size": comm.get_local_size(),
        "rank_sum": total.item(),
    }
    with open(os.path.join(out, f"rank{comm.get_rank()}.running"), "w") as f:
        json.dump(report, f)
    x = torch.ones(1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        dist.all_reduce(x)
        time.sleep(0.02)


if __name__ == "__main__":
    from smca_d2.engine import DistributedJobError, launch

    out, machine, machines, procs, url, peer_timeout = sys.argv[1:7]
    try:
        launch(
            all_reduce_loop,
            int(procs),
            num_machines=int(machines),
            machine_rank=int(machine),
            dist_url=url,
            args=(out, 120.0),
            peer_timeout=float(peer_timeout),
        )
    except DistributedJobError as e:
        sys.exit(f"distributed_job.py: {e}")
