"""Stop a multi-process job soon after one of its processes is lost.

Left alone, a job whose process was killed, stopped or cut off (an OOM kill, a GPU that fell off,
a lost machine) keeps its other processes waiting in their next collective until the process
group's ``timeout`` (detectron2's default is half an hour; NCCL may wait forever), and a launcher
whose child hangs waits with it. Here every process of the job watches the others through the job's rendezvous store
(a ``TCPStore`` hosted by rank 0 at ``dist_url``), over a client of its own whose operations time
out in seconds:

* each rank adds to its heartbeat counter a few times per ``timeout``; rank 0 watches every
  rank's counter, the other ranks watch rank 0's;
* the first process that sees a failure records one message under an abort key (a counter: the
  first to raise it writes the message), and every process, launchers included, stops with that
  message when it reads the key;
* a rank whose counter has not moved for ``timeout`` seconds is lost (killed, hung, stopped, or
  its machine unreachable); so is rank 0 when the store itself stops answering for that long;
* a launcher whose child dies reports it under the same key at once (the signal or exit code),
  so the other machines stop without waiting for the timeout.

The heartbeat is a Python thread: a process that holds the GIL in one C call for longer than
``timeout`` (parsing a huge json, say) would look lost, hence a default well above such calls.
"""

import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Dict, Optional, Tuple
from urllib.parse import urlparse

import torch.distributed as dist

__all__ = ["DEFAULT_PEER_TIMEOUT", "JobStore", "PeerWatchdog", "store_address"]

logger = logging.getLogger(__name__)

#: Seconds without a heartbeat after which a process counts as lost.
DEFAULT_PEER_TIMEOUT = 30.0

_PREFIX = "smca_d2/watchdog"
_ABORT = f"{_PREFIX}/abort"
_MESSAGE = f"{_PREFIX}/message"


def _beat(rank: int) -> str:
    return f"{_PREFIX}/beat/{rank}"


def _done(rank: int) -> str:
    return f"{_PREFIX}/done/{rank}"


def store_address(dist_url: Optional[str]) -> Optional[Tuple[str, int]]:
    """(host, port) of the rendezvous store of ``dist_url`` (``tcp://host:port``, or ``env://``
    with ``MASTER_ADDR``/``MASTER_PORT``); None for other URLs (``file://``), which have no
    TCP store to watch through."""
    if not dist_url:
        return None
    url = urlparse(dist_url)
    if url.scheme == "tcp" and url.hostname and url.port:
        return url.hostname, url.port
    if url.scheme == "env" and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return None


class JobStore:
    """A client of the job's store whose operations give up after ``op_timeout`` seconds
    (the process group's own client waits as long as the collectives do). It reconnects after a
    failed operation; every operation may raise (the store is gone or not answering)."""

    def __init__(self, address: Tuple[str, int], op_timeout: float):
        self.address = address
        self.op_timeout = op_timeout
        self._store = None

    def _client(self):
        if self._store is None:
            host, port = self.address
            # A plain connection first: where nothing listens (yet, or any more) it fails quietly,
            # where TCPStore's own attempts would log C++ errors on every round.
            socket.create_connection((host, port), timeout=self.op_timeout).close()
            self._store = dist.TCPStore(
                host, port, is_master=False, timeout=timedelta(seconds=self.op_timeout), wait_for_workers=False
            )
        return self._store

    def _call(self, name, *args):
        try:
            return getattr(self._client(), name)(*args)
        except Exception:
            self._store = None
            raise

    def add(self, key: str, amount: int) -> int:
        return int(self._call("add", key, amount))

    def read(self, key: str) -> int:
        """The counter ``key`` (0 if it was never added to), without waiting for it."""
        return self.add(key, 0)

    def get(self, key: str) -> str:
        return self._call("get", key).decode(errors="replace")

    def set(self, key: str, value: str) -> None:
        self._call("set", key, value)

    def report_failure(self, message: str) -> str:
        """Record ``message`` as the reason the job stops, unless a failure was reported before;
        returns the reason that was recorded first."""
        if self.add(_ABORT, 1) == 1:
            self.set(_MESSAGE, message)
            return message
        return self.get(_MESSAGE)  # waits (up to op_timeout) for the first reporter's message

    def failure(self) -> Optional[str]:
        """The reason the job stops, if one was reported."""
        return self.get(_MESSAGE) if self.read(_ABORT) else None


@dataclasses.dataclass
class _Peer:
    count: int = -1
    changed_at: float = 0.0


class PeerWatchdog:
    """Watches the other processes of a job; see the module's docstring.

    Args:
        address: (host, port) of the job's store.
        rank: this process's global rank, or None for a launcher (which sends no heartbeat and
            only reads the abort key and whether the store answers).
        world_size: number of ranks.
        timeout: seconds without a heartbeat after which a rank is lost.
        on_failure: called once, with the reason, when the job must stop (from the watchdog's
            thread when started with :meth:`start`).
    """

    def __init__(self, address, rank: Optional[int], world_size: int, timeout: float, on_failure=None):
        self.timeout = float(timeout)
        self.interval = max(0.1, min(2.0, self.timeout / 10))
        self.store = JobStore(address, op_timeout=max(1.0, min(5.0, self.timeout / 3)))
        self.rank = rank
        self.world_size = world_size
        self.on_failure = on_failure
        self._peers: Dict[int, _Peer] = {}
        self._last_contact: Optional[float] = None
        self._failure: Optional[str] = None
        self._poll_started: Optional[float] = None
        self._found = threading.Event()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    # -- checks ------------------------------------------------------------------------------
    def _watched(self):
        if self.rank is None:
            return []
        return [r for r in range(self.world_size) if r != self.rank] if self.rank == 0 else [0]

    def poll(self) -> Optional[str]:
        """One round: send this rank's heartbeat, read the abort key and the watched ranks'
        heartbeats. Returns the reason the job must stop, or None."""
        if self._failure is not None:
            return self._failure
        now = self._poll_started = time.monotonic()
        try:
            if self.rank is not None:
                self.store.add(_beat(self.rank), 1)
            reason = self.store.failure()
            if reason is None:
                reason = self._silent_peer(now)
            self._last_contact = now
        except Exception as e:  # the store is gone or does not answer
            reason = self._store_lost(now, e)
        finally:
            self._poll_started = None
        if reason is not None:
            self._fail(reason)
        return self._failure

    def _silent_peer(self, now: float) -> Optional[str]:
        for r in self._watched():
            peer = self._peers.setdefault(r, _Peer(changed_at=now))
            if self.store.read(_done(r)):
                continue
            count = self.store.read(_beat(r))
            if count != peer.count:
                peer.count, peer.changed_at = count, now
            elif now - peer.changed_at > self.timeout:
                return self.store.report_failure(
                    f"rank {r} has not answered for {self.timeout:.0f} s: its process was killed, hung or "
                    "stopped, or its machine is unreachable"
                )
        return None

    def _store_lost(self, now: float, error: Exception) -> Optional[str]:
        if self._last_contact is None:  # not reached yet: the process group's start has its own timeout
            return None
        if now - self._last_contact <= self.timeout:
            return None
        return self._store_silent(f" ({type(error).__name__})")

    def _store_silent(self, detail: str = "") -> str:
        host, port = self.store.address
        return (
            f"rank 0, which holds the job's store at {host}:{port}, has not answered for {self.timeout:.0f} s"
            f"{detail}: its process was killed, hung or stopped, or its machine is unreachable"
        )

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._failure is not None:
                return
            self._failure = reason
        self._found.set()
        if self.on_failure is not None:
            self.on_failure(reason)

    @property
    def failure(self) -> Optional[str]:
        """The reason the job must stop, once found."""
        return self._failure

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "PeerWatchdog":
        """Poll every ``interval`` seconds in a daemon thread until :meth:`stop`. A second thread
        watches the first: a store operation can block without end on a store whose process is
        stopped (the socket stays open), and a poll that has not returned for ``timeout``
        seconds means just that."""
        threading.Thread(target=self._run, name="smca_d2-peer-watchdog", daemon=True).start()
        threading.Thread(target=self._watch_poll, name="smca_d2-peer-watchdog-timer", daemon=True).start()
        return self

    def _run(self) -> None:
        while self.poll() is None and not self._stopped.wait(self.interval):
            pass

    def _watch_poll(self) -> None:
        while not self._stopped.wait(self.interval) and self._failure is None:
            started = self._poll_started
            if started is not None and time.monotonic() - started > self.timeout:
                self._fail(self._store_silent())

    def stop(self) -> None:
        """Stop polling (the thread ends after its current round; a store operation that never
        returns leaves it blocked, which a daemon thread may be)."""
        self._stopped.set()

    def wait_for_failure(self, timeout: float) -> Optional[str]:
        """The reason the job must stop, waiting up to ``timeout`` seconds for one to be found."""
        self._found.wait(timeout)
        return self._failure

    def mark_done(self) -> None:
        """This rank finished its work: the others stop watching it. Rank 0 (whose process holds
        the store) then waits until every rank is done, or one is lost."""
        if self.rank is None:
            self.stop()
            return
        store = self.new_client()  # the watchdog's own client may be in use by its thread
        store.add(_done(self.rank), 1)
        if self.rank == 0:
            while self._failure is None and not all(store.read(_done(r)) for r in range(1, self.world_size)):
                time.sleep(self.interval)
        self.stop()

    def new_client(self) -> JobStore:
        """Another client of the job's store, for use outside the watchdog's thread."""
        return JobStore(self.store.address, self.store.op_timeout)


def exit_now(reason: str, code: int = 1) -> None:
    """Log ``reason`` and end this process at once: its main thread may be blocked in a
    collective that will never return, which no exception can interrupt. (logging's stream and
    file handlers flush each record as it is written.)"""
    logger.error(reason)
    sys.stderr.flush()
    os._exit(code)
