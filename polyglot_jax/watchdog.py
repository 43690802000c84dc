"""A dead or hung peer ends a multi-process run within a bounded time, with one line naming it.

Without this, the survivors of a lost process wait in their next collective until JAX's runtime
notices the missing heartbeat and aborts them with a native stack trace, or forever when the peer
is alive but stuck. Here every process runs two daemon threads:
- a poller publishes `<beats> <step> <state>` under `polyglot_jax/watch/<process>` in the runtime's
  key-value store every `interval` seconds and reads every peer's entry;
- a judge exits the process (code 3, one line on stderr) when
  - a peer's entry has not changed for `heartbeat_timeout_s` (killed, crashed, its host gone),
  - a peer marked itself failed (it raised; its own log has the error),
  - the store itself has not answered for `heartbeat_timeout_s` (the coordinator, process 0, is
    gone), or
  - with `step_timeout_s` > 0, no step finished on this process for that long after its first:
    the peers at the lowest step are named (a peer stuck in I/O or a deadlock keeps beating).
A process that finished marks itself done, so its peers do not take its silence for a loss; one
that failed marks itself failed. When the failure is a runtime error (a collective whose peer is
gone raises one at once), it first waits up to `heartbeat_timeout_s` for the judge to name a lost
peer, so that every survivor names the process that died rather than each other.

So the bound is `heartbeat_timeout_s` plus up to two `interval`s for a dead peer (a peer's silence
counts up to the store's last answer, so a store gone quiet is reported as the coordinator, not
as every peer). JAX's own heartbeat is set to twice that (distributed.py) and stays the backstop.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from polyglot_jax.distributed import DistributedSettings

PREFIX = "polyglot_jax/watch/"
EXIT_CODE = 3  # lost a peer (1: this process failed, 2: bad usage)


def _client() -> Any:
    from jax._src import distributed  # the runtime's client: no public handle exists

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("the distributed runtime is not initialized")
    return client


class PeerWatchdog:
    """`with PeerWatchdog(settings) as watch: ... watch.step_done(s)`; a no-op on one process.

    `exit` and `client` are for tests (the default exits the process at once: the main thread
    may be blocked in a collective that will never return)."""

    def __init__(
        self,
        settings: DistributedSettings,
        *,
        client: Any = None,
        process_index: int | None = None,
        process_count: int | None = None,
        exit: Callable[[int], None] = os._exit,
        interval: float | None = None,
    ):
        self.settings = settings
        self.index = jax.process_index() if process_index is None else process_index
        self.count = jax.process_count() if process_count is None else process_count
        self._client = client
        self._exit = exit
        self.interval = interval or max(0.2, min(5.0, settings.heartbeat_timeout_s / 6))
        self._lock = threading.Lock()
        # Serialises writes of our entry: the final "done" must not be overtaken by a heartbeat
        # that was in flight when __exit__ began (peers would then see a silent "running").
        self._publish_lock = threading.Lock()
        self._beats = 0
        self._step: int | None = None
        self._step_time: float | None = None
        self._seen: dict[int, tuple[str, float]] = {}  # peer -> (entry, when it last changed)
        self._peer_steps: dict[int, int] = {}
        self._answered = time.monotonic()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.reason: str | None = None

    def __enter__(self) -> PeerWatchdog:
        if self.count > 1:
            self._client = self._client or _client()
            self._publish("running")
            start = time.monotonic()
            self._seen = {p: ("", start) for p in range(self.count) if p != self.index}
            for target in (self._poll, self._judge):
                thread = threading.Thread(target=target, name=f"watchdog-{target.__name__}")
                thread.daemon = True
                thread.start()
                self._threads.append(thread)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.count > 1 and isinstance(exc, jax.errors.JaxRuntimeError):
            deadline = time.monotonic() + self.settings.heartbeat_timeout_s + 3 * self.interval
            while self.reason is None and time.monotonic() < deadline:
                time.sleep(self.interval / 4)  # the judge exits the process if a peer is lost
        self._stop.set()
        if self.count > 1 and self.reason is None:
            try:  # best effort: the store may be gone with process 0
                self._publish("done" if exc_type is None else "failed")
            except Exception:  # noqa: BLE001 - leaving anyway; nothing is changed on disk
                pass

    def step_done(self, step: int) -> None:
        """Called by the train loop after each step."""
        with self._lock:
            self._step, self._step_time = step, time.monotonic()

    def _publish(self, state: str) -> None:
        with self._publish_lock:
            if state == "running" and self._stop.is_set():
                return  # __exit__ writes the last entry
            with self._lock:
                self._beats += 1
                entry = f"{self._beats} {self._step if self._step is not None else -1} {state}"
            self._client.key_value_set(f"{PREFIX}{self.index}", entry, allow_overwrite=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._publish("running")
                entries = self._client.key_value_dir_get(PREFIX)
            except Exception:  # noqa: BLE001 - any RPC failure: the judge times the silence
                continue
            now = time.monotonic()
            with self._lock:
                self._answered = now
                for key, entry in entries:
                    peer = int(key.rsplit("/", 1)[1])
                    if peer == self.index or peer not in self._seen:
                        continue
                    if entry != self._seen[peer][0]:
                        self._seen[peer] = (entry, now)
                    self._peer_steps[peer] = int(entry.split()[1])

    def _judge(self) -> None:
        while not self._stop.wait(self.interval):
            reason = self._verdict(time.monotonic())
            if reason is not None and not self._stop.is_set():
                self.reason = reason
                print(f"polyglot-jax: error: {reason}", file=sys.stderr, flush=True)
                self._exit(EXIT_CODE)
                return

    def _verdict(self, now: float) -> str | None:
        """Why this process must stop, or None."""
        limit = self.settings.heartbeat_timeout_s
        of = f"of {self.count}"
        with self._lock:
            if now - self._answered > limit and self.index != 0:
                return (
                    f"lost process 0 {of} (the coordinator): no answer for "
                    f"{now - self._answered:.0f} s; it died or its host is unreachable"
                )
            failed = [p for p, (e, _) in self._seen.items() if e.endswith(" failed")]
            if failed:
                return f"process {_names(failed)} {of} failed (its log has the error); stopping"
            # A peer is silent only while the store answers us: when the store goes quiet every
            # peer's entry freezes with it, and the silence is the coordinator's (judged above
            # once it lasts), not theirs. Process 0 hosts the store and judges by the clock.
            heard = now if self.index == 0 else self._answered
            lost = [
                p
                for p, (entry, when) in self._seen.items()
                if heard - when > limit and not entry.endswith(" done")
            ]
            if lost:
                return (
                    f"lost process {_names(lost)} {of}: no heartbeat for {limit} s "
                    "(config.distributed.heartbeat_timeout_s); it died or hangs, see its log"
                )
            stall = self.settings.step_timeout_s
            if stall and self._step_time is not None and now - self._step_time > stall:
                steps = {**self._peer_steps, self.index: self._step}
                low = min(steps.values())
                behind = sorted(p for p, s in steps.items() if s == low)
                return (
                    f"no step finished for {stall} s (config.distributed.step_timeout_s); "
                    f"process {_names(behind)} {of} at step {low}, the slowest"
                )
        return None


def _names(processes: list[int]) -> str:
    return ", ".join(map(str, sorted(processes)))
