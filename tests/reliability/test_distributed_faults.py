"""A process of a multi-process job is killed (``kill -9``) or stopped (``SIGSTOP``): every other
process, on every "machine", exits within a bounded time with a non-zero code and a message naming
the lost rank; the last complete checkpoint is intact and ``--resume`` continues.

Real processes throughout: two launchers with ``--machine-rank 0`` and ``1`` on localhost (two
"machines"), or one launcher with two processes (``--num-gpus 2``), on GLOO."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from reliability_helpers import HERE, tiny, train_net_cmd, train_net_env

PEER_TIMEOUT = 4.0
# Detection (PEER_TIMEOUT), the store kept up for the others to read the reason, a launcher's
# grace period for its children, SIGTERM, then SIGKILL; with room for a loaded machine.
EXIT_BOUND = PEER_TIMEOUT + 25.0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """A launcher process whose output is collected as it comes (it names its children's pids)."""

    def __init__(self, cmd, **kwargs):
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self):
        return "".join(self.lines)

    def pid_of_rank(self, rank, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(rf"rank {rank} is pid (\d+)", self.output)
            if match:
                return int(match.group(1))
            assert self.process.poll() is None, self.output[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"no pid for rank {rank}:\n{self.output[-3000:]}")

    def wait(self, timeout):
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def _wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _job(tmp_path, machines, procs):
    url = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return [
        Launcher(
            [
                sys.executable,
                os.path.join(HERE, "distributed_job.py"),
                str(tmp_path),
                str(m),
                str(machines),
                str(procs),
                url,
                str(PEER_TIMEOUT),
            ],  # fmt: skip
            env=env,
        )
        for m in range(machines)
    ]


def _stop_after_losing(launchers, victim, sig, tmp_path, world_size):
    """Send ``sig`` to rank ``victim`` once every rank runs; returns the seconds each launcher took
    to exit, and checks that each exited with an error."""
    procs = world_size // len(launchers)
    pid = launchers[victim // procs].pid_of_rank(victim)
    others = [launchers[r // procs].pid_of_rank(r) for r in range(world_size) if r != victim]
    try:
        _wait_until(
            lambda: all((tmp_path / f"rank{r}.running").exists() for r in range(world_size)), 120, "the ranks to start"
        )
        os.kill(pid, sig)
        start = time.monotonic()
        took = []
        for launcher in launchers:
            code = launcher.wait(timeout=EXIT_BOUND + 30)
            took.append(time.monotonic() - start)
            assert code != 0, launcher.output[-3000:]
        for other in others:
            assert not _alive(other)
        assert not _alive(pid)  # a stopped process is killed by its launcher
        return took
    finally:
        for launcher in launchers:
            launcher.kill()
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_kill9_of_a_machine_s_process_stops_the_other_machine(tmp_path):
    launchers = _job(tmp_path, machines=2, procs=1)
    took = _stop_after_losing(launchers, 1, signal.SIGKILL, tmp_path, world_size=2)
    for r in (0, 1):  # the two launchers had formed one job
        seen = json.loads((tmp_path / f"rank{r}.running").read_text())
        assert seen == {"world": 2, "local_rank": 0, "machine_size": 1, "rank_sum": 1.0}
    assert max(took) < EXIT_BOUND, took
    for launcher in launchers:  # both say which rank was lost and how, the other machine included
        assert re.search(r"The job stopped: rank 1 \(pid \d+, machine 1\) was killed by SIGKILL", launcher.output), (
            launcher.output[-3000:]
        )


def test_sigstop_of_rank_0_which_holds_the_store_stops_every_machine(tmp_path):
    """The stopped process is rank 0: the store stops answering too. (A stopped rank other than
    0 is found by rank 0's watchdog: test_watchdog_finds_a_silent_rank_...)"""
    launchers = _job(tmp_path, machines=2, procs=1)
    took = _stop_after_losing(launchers, 0, signal.SIGSTOP, tmp_path, world_size=2)
    assert max(took) < EXIT_BOUND, took
    for launcher in launchers:
        assert "rank 0, which holds the job's store at 127.0.0.1:" in launcher.output, launcher.output[-3000:]
        assert f"has not answered for {PEER_TIMEOUT:.0f} s" in launcher.output


# --------------------------------------------------------------------------------------------
# train_net.py --num-gpus 2: kill -9 of rank 1 during training, then --resume
# --------------------------------------------------------------------------------------------
MAX_ITER = 8
SETTINGS = [
    f"train.max_iter={MAX_ITER}",
    "train.checkpointer.period=2",
    "train.eval_period=0",
    "train.seed=5",
]


def _train_net(tmp_path, out, *extra):
    cmd = train_net_cmd("--num-gpus", "2", "--peer-timeout", str(PEER_TIMEOUT), *extra, *tiny(out, *SETTINGS))
    return Launcher(cmd, env=train_net_env(tmp_path), cwd=str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("compare", [pytest.param(False), pytest.param(True, marks=pytest.mark.long)])
def test_train_net_kill9_of_a_rank_then_resume(tmp_path, compare):
    out = tmp_path / "interrupted"
    launcher = _train_net(tmp_path, out)
    victim = launcher.pid_of_rank(1)
    _wait_until(lambda: (out / "last_checkpoint").exists() or launcher.process.poll() is not None, 180, "a checkpoint")
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    code = launcher.wait(timeout=EXIT_BOUND + 30)
    assert time.monotonic() - start < EXIT_BOUND
    assert code != 0
    assert re.search(r"rank 1 \(pid \d+, machine 0\) was killed by SIGKILL", launcher.output), launcher.output[-3000:]
    assert "--resume" in launcher.output
    last = (out / "last_checkpoint").read_text()
    killed_at = torch.load(out / last, weights_only=True)["iteration"]  # intact
    assert killed_at < MAX_ITER - 1

    if not compare:  # the resume of a 1-process job after kill -9: tests/reliability/test_kill_resume.py
        return
    resumed = _train_net(tmp_path, out, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.output[-3000:]
    assert f"Starting training from iteration {killed_at + 1}" in resumed.output
    reference = tmp_path / "reference"
    run = _train_net(tmp_path, reference)
    assert run.wait(timeout=300) == 0, run.output[-3000:]
    a = torch.load(reference / "model_final.pth", weights_only=True)["model"]
    b = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# --------------------------------------------------------------------------------------------
# The watchdog's pieces, in this process, on a store of its own
# --------------------------------------------------------------------------------------------
def test_store_address(monkeypatch):
    from smca_d2.engine.watchdog import store_address

    assert store_address("tcp://10.0.0.1:29500") == ("10.0.0.1", 29500)
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "1234")
    assert store_address("env://") == ("node0", 1234)
    assert store_address("file:///shared/rendezvous") is None and store_address(None) is None


def test_watchdog_finds_a_silent_rank_and_the_first_reason_wins():
    import torch.distributed as dist

    from smca_d2.engine.watchdog import JobStore, PeerWatchdog

    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # noqa: F841  (keeps it up)
    found = []
    rank0 = PeerWatchdog(("127.0.0.1", port), 0, 3, timeout=1.0, on_failure=found.append)
    rank1 = PeerWatchdog(("127.0.0.1", port), 1, 3, timeout=1.0)
    deadline = time.monotonic() + 10
    while not found and time.monotonic() < deadline:  # rank 1 beats, rank 2 never does
        rank1.poll()
        rank0.poll()
        time.sleep(0.1)
    assert found == [
        "rank 2 has not answered for 1 s: its process was killed, hung or stopped, or its machine is unreachable"
    ]
    assert rank1.poll() == found[0]  # the others read the same reason
    assert JobStore(("127.0.0.1", port), 1.0).report_failure("a later failure") == found[0]
