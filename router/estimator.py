"""RTT and health per destination: peak-EWMA latency and outlier ejection with gradual re-admission.

Fed by `probe()` on an interval (`ProbeLoop`) and by delivery acknowledgements (the gateway wraps each
adapter so every `publish` reports its latency or failure). RTT samples come from probes only: every
destination is measured the same way, in the same round; a slow delivery is a hint that asks for an
early probe round (`delivered`), and a failed one counts towards ejection. The decision reads three
flat arrays, indexed by a destination's *slot* (assigned once per name, never reused, so tables
compiled at different times can share one estimator):

    rtt_ms[slot]   peak-EWMA round-trip time in milliseconds
    up[slot]       1 healthy / 0 ejected
    admit[slot]    admission in (0, 1]: 1 fully admitted; lower while a returning destination ramps up

Peak-EWMA (Finagle, tower): a sample above the estimate replaces it at once (fast rise); a sample
below it pulls the estimate down with weight `1 - exp(-dt / decay_seconds)`, dt being the time since
the previous sample (slow decay). So one slow answer makes a destination look slow immediately, and
it has to be fast for a while to look fast again.

Ejection (Envoy outlier detection): `eject_after_failures` consecutive failures eject a destination
for `ejection_seconds`, doubled for each consecutive re-ejection up to `max_ejection_seconds`. When
the time is up it comes back *on probation*: `admit` starts at `readmit_floor` and ramps linearly to
1 over `readmit_seconds` (the decision scores it as `rtt / admit` and gives it `weight * admit` of a
split), and a single failure on probation ejects it again. A full ramp clears the ejection count.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from array import array
from collections.abc import Awaitable, Callable, Mapping

from umcef.router.model import EstimatorSettings

log = logging.getLogger("umcef.router.estimator")
Clock = Callable[[], float]
DEFAULT_SETTINGS = EstimatorSettings()


class Estimator:
    def __init__(self, settings: EstimatorSettings = DEFAULT_SETTINGS, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.rtt_ms: array[float] = array("d")
        self.up: array[int] = array("b")
        self.admit: array[float] = array("d")
        self.names: list[str] = []
        self._slots: dict[str, int] = {}
        self._sampled: list[bool] = []
        self._warm: list[bool] = []  # a destination's first delivery (connection set-up) has happened
        self._pinned: list[bool] = []
        self._last: list[float] = []
        self._failures: list[int] = []
        self._ejections: list[int] = []
        self._eject_until: list[float] = []
        self._readmit_from: list[float] = []
        self._last_error: list[str] = []
        # Set by a running ProbeLoop: asks it for an early probe round (a delivery looked slow).
        self.probe_soon: Callable[[], None] | None = None
        self.suspicions = 0  # slow deliveries that asked for an early round (introspection, tests)

    # -- slots -----------------------------------------------------------------------------------

    def slot(self, name: str) -> int:
        """The slot of a destination, registered on first use with the prior RTT, healthy."""
        index = self._slots.get(name)
        if index is None:
            index = self._slots[name] = len(self.names)
            self.names.append(name)
            self.rtt_ms.append(self.settings.initial_rtt_ms)
            self.up.append(1)
            self.admit.append(1.0)
            self._sampled.append(False)
            self._warm.append(False)
            self._pinned.append(False)
            self._last.append(0.0)
            self._failures.append(0)
            self._ejections.append(0)
            self._eject_until.append(0.0)
            self._readmit_from.append(0.0)
            self._last_error.append("")
        return index

    def pin(self, name: str, rtt_ms: float = 0.0) -> None:
        """A destination whose RTT is known and fixed (`local://`: the write is the delivery)."""
        s = self.slot(name)
        self._pinned[s] = True
        self.rtt_ms[s] = rtt_ms
        self.up[s] = 1
        self.admit[s] = 1.0

    # -- samples ---------------------------------------------------------------------------------

    def observe(self, name: str, seconds: float, now: float | None = None) -> None:
        """A successful round trip (probe or delivery acknowledgement) that took `seconds`."""
        s = self.slot(name)
        if self._pinned[s]:
            return
        now = self.clock() if now is None else now
        sample = max(seconds, 0.0) * 1000.0
        estimate = self.rtt_ms[s]
        if not self._sampled[s] or sample >= estimate:
            self.rtt_ms[s] = sample  # first sample, or fast rise
        else:
            keep = math.exp(-max(now - self._last[s], 0.0) / self.settings.decay_seconds)
            self.rtt_ms[s] = estimate * keep + sample * (1.0 - keep)
        self._sampled[s] = True
        self._last[s] = now
        self._failures[s] = 0
        self._advance(s, now)

    def delivered(self, name: str, seconds: float, now: float | None = None) -> None:
        """A delivery the broker acknowledged, taking `seconds` for the whole publish call.

        A delivery proves the destination alive (it clears the failure count) but is never an RTT
        sample: a publish call is not comparable with a probe. It grows with the page, the first one
        includes connecting, and it includes the gateway's own scheduling delay — on a loaded machine
        tens of milliseconds that land on whichever destination is carrying the traffic, so sampling
        deliveries makes a busy destination look slower than an idle one (which only gets probes) and
        `best` routes flap between equally fast destinations. A publish slower than twice the estimate
        is a *suspicion* instead: it asks the probe loop for an early round (`probe_soon`), which measures
        every destination the same way, so a real slowdown still shows before the next interval.
        The first delivery (connection and producer set-up) raises no suspicion.
        """
        s = self.slot(name)
        if self._pinned[s]:
            return
        now = self.clock() if now is None else now
        if self._warm[s] and self._sampled[s] and seconds * 1000.0 > 2.0 * self.rtt_ms[s]:
            self.suspicions += 1
            if self.probe_soon is not None:
                self.probe_soon()
        self._warm[s] = True
        self._failures[s] = 0
        self._advance(s, now)

    def failure(self, name: str, reason: str = "", now: float | None = None) -> None:
        """A failed probe or delivery attempt; consecutive failures eject the destination."""
        s = self.slot(name)
        if self._pinned[s]:
            return
        now = self.clock() if now is None else now
        self._advance(s, now)
        self._failures[s] += 1
        self._last_error[s] = reason
        if self.up[s] and (self._failures[s] >= self.settings.eject_after_failures or self.admit[s] < 1.0):
            self._eject(s, now)

    def _eject(self, s: int, now: float) -> None:
        cfg = self.settings
        self._ejections[s] += 1
        seconds = min(cfg.max_ejection_seconds, cfg.ejection_seconds * 2 ** (self._ejections[s] - 1))
        self._eject_until[s] = now + seconds
        self._failures[s] = 0
        self.up[s] = 0
        self.admit[s] = 0.0
        log.warning("destination %s ejected for %.1f s after failures (%s)", self.names[s], seconds,
                    self._last_error[s] or "no detail")

    def tick(self, now: float | None = None) -> None:
        """Advance ejections and re-admission ramps to `now` (the probe loop calls this every interval)."""
        now = self.clock() if now is None else now
        for s in range(len(self.names)):
            self._advance(s, now)

    def _advance(self, s: int, now: float) -> None:
        cfg = self.settings
        if not self.up[s]:
            if now < self._eject_until[s]:
                return
            self.up[s] = 1
            self.admit[s] = cfg.readmit_floor
            self._readmit_from[s] = now
            log.info("destination %s back on probation", self.names[s])
        if self.admit[s] < 1.0:
            ramp = (now - self._readmit_from[s]) / cfg.readmit_seconds if cfg.readmit_seconds > 0 else 1.0
            admit = cfg.readmit_floor + (1.0 - cfg.readmit_floor) * max(ramp, 0.0)
            if admit >= 1.0:
                self.admit[s] = 1.0
                self._ejections[s] = 0
            else:
                self.admit[s] = admit

    # -- what-if (route explain) and introspection -------------------------------------------------

    def assume_rtt(self, name: str, rtt_ms: float) -> None:
        s = self.slot(name)
        self.rtt_ms[s] = rtt_ms
        self._sampled[s] = True

    def assume_down(self, name: str) -> None:
        s = self.slot(name)
        self.up[s] = 0
        self.admit[s] = 0.0
        self._eject_until[s] = math.inf
        self._last_error[s] = "assumed down"

    def assume_up(self, name: str) -> None:
        s = self.slot(name)
        self.up[s] = 1
        self.admit[s] = 1.0
        self._eject_until[s] = 0.0
        self._failures[s] = 0

    # -- across processes (delivery in its own process measures; the ingress process's router reads) -------

    def snapshot(self) -> list[tuple[str, float, int, float, str]]:
        """What the decision reads, per destination: (name, rtt_ms, up, admit, last error)."""
        return [(name, self.rtt_ms[s], self.up[s], self.admit[s], self._last_error[s])
                for s, name in enumerate(self.names)]

    def mirror(self, snapshot: list[tuple[str, float, int, float, str]]) -> None:
        """Take over another estimator's state (`snapshot`); pinned destinations keep their own."""
        for name, rtt_ms, up, admit, error in snapshot:
            s = self.slot(name)
            if self._pinned[s]:
                continue
            self.rtt_ms[s] = rtt_ms
            self.up[s] = up
            self.admit[s] = admit
            self._last_error[s] = error
            self._sampled[s] = True

    def describe_down(self, s: int) -> str:
        """Why slot `s` is ejected, for decisions and explain records."""
        detail = self._last_error[s]
        return f"down (ejected: {detail})" if detail else "down (ejected)"


Probe = Callable[[], Awaitable[float]]


class ProbeLoop:
    """Calls every destination's `probe()` each `probe_interval_seconds` and feeds the estimator.

    A slow delivery (`Estimator.delivered`) asks for an early round; early rounds start no sooner than
    `probe_interval_seconds / EARLY_FRACTION` after the previous round started, so a burst of slow
    deliveries costs a bounded number of probes."""

    EARLY_FRACTION = 4.0

    def __init__(self, estimator: Estimator, probes: Mapping[str, Probe]) -> None:
        self.estimator = estimator
        self.probes = dict(probes)
        self._stopping = asyncio.Event()
        self._early = asyncio.Event()

    def _soon(self) -> None:
        self._early.set()

    async def probe_once(self) -> None:
        timeout = self.estimator.settings.probe_timeout_seconds

        async def one(name: str, probe: Probe) -> None:
            try:
                seconds = await asyncio.wait_for(probe(), timeout)
            except TimeoutError:
                self.estimator.failure(name, f"probe timed out after {timeout:g} s")
            except Exception as exc:  # an adapter's classified error, or anything else: a failed probe
                self.estimator.failure(name, f"probe failed: {type(exc).__name__}: {exc}")
            else:
                self.estimator.observe(name, seconds)

        await asyncio.gather(*(one(name, probe) for name, probe in self.probes.items()))
        self.estimator.tick()

    async def _wait(self, event: asyncio.Event, seconds: float) -> None:
        """Until `event` or stop, at most `seconds`."""
        if seconds <= 0:
            return
        waits = [asyncio.ensure_future(self._stopping.wait()), asyncio.ensure_future(event.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def run(self) -> None:
        interval = self.estimator.settings.probe_interval_seconds
        loop = asyncio.get_running_loop()
        self.estimator.probe_soon = self._soon
        try:
            while not self._stopping.is_set():
                began = loop.time()
                self._early.clear()  # a suspicion raised during the round asks for the next one
                await self.probe_once()
                # the interval, or an early request, but not before interval / EARLY_FRACTION after this round began
                await self._wait(self._early, began + interval - loop.time())
                if self._early.is_set():
                    await self._wait(self._stopping, began + interval / self.EARLY_FRACTION - loop.time())
        finally:
            if self.estimator.probe_soon == self._soon:
                self.estimator.probe_soon = None

    async def stop(self) -> None:
        self._stopping.set()
