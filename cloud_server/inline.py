"""The inline worker: a TailWorker run by the broker's own thread through its public step API.

It speaks the same conversation as any worker (_wire: ready, hb, req, reply, bye), only through
two deques instead of a socket, so dispatch, exactly-once replies, deadlines and metrics are
the same broker code as for the others. A request is decoded, computed and answered in the
wake-up that received it; the broker reads nothing else while a batch computes.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

__all__ = ["InlineWorker"]


class InlineWorker:
    """Drives one TailWorker (not started) from the broker's loop.

    Args:
        worker: the TailWorker.
        deliver: the broker's handler for worker messages, called with ([ident, *frames], link).
        heartbeat_s: how often it reports when it has nothing else to say.
    """

    def __init__(self, worker, deliver: Callable[[list, object], None], heartbeat_s: float):
        self.worker = worker
        self.ident = f"inline:{worker.name}".encode()[:255]
        self._deliver = deliver
        self._heartbeat_s = heartbeat_s
        self._inbox: deque[list] = deque()  # what the broker sent it: [ctl, *frames]
        self._outbox: deque[list] = deque()  # what it answered: [ctl, *frames]
        self._gone = False

    # The broker reaches it as it reaches any worker (see registry.SocketLink).
    def send(self, ident: bytes, frames: list, small: int = 1) -> None:
        self._inbox.append(list(frames))

    def start(self) -> None:
        """Announce the worker and load its preloads before the broker serves anyone."""
        w = self.worker
        w.attach(self._outbox.append)
        while w.step():
            pass
        self._flush()
        self._beat()

    def run(self) -> None:
        """Hand the worker what the broker sent it, run its queue, deliver its replies."""
        w, inbox, out = self.worker, self._inbox, self._outbox
        while inbox or w.pending or out:
            while inbox:
                w.accept(inbox.popleft())
            w.step()
            self._flush()
        self._beat()

    def close(self) -> None:
        self.worker.close()

    def _flush(self) -> None:
        out = self._outbox
        while out:
            self._deliver([self.ident, *out.popleft()], self)

    def _beat(self) -> None:
        if self._gone:
            return
        if not self.worker.heartbeat(time.monotonic(), self._heartbeat_s):
            self._gone = True  # it said goodbye
        self._flush()
