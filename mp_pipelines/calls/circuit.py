"""A circuit per endpoint and model: calls pause while an endpoint fails everything, then one call probes.

Closed, it counts consecutive failures that say the endpoint is down (HTTP 5xx, timeouts, lost or refused
connections; a 429 is throttling, which the limiter's pause handles). At `CIRCUIT_FAILURES` in a row it
opens: no call is sent for its cool-down (`CIRCUIT_COOLDOWN_SECONDS`, doubled after each failed probe up to
`CIRCUIT_MAX_COOLDOWN_SECONDS`). Then it is half-open: one call goes through as a probe while the others
wait; its success closes the circuit, its failure opens it again. A call with a fallback model does not
wait for an open circuit: it fails at once with `CircuitOpen` and the fallback answers (`fallback.py`).

Random faults do not open it: at 20 % random 5xx, ten failures in a row happen once in ~10⁷ answers.
Used only from the shared loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from mp_pipelines.calls.settings import number_setting
from mp_pipelines.llm.types import LLMError

log = logging.getLogger(__name__)

CIRCUIT_FAILURES = 10
CIRCUIT_COOLDOWN_SECONDS = 5.0
CIRCUIT_MAX_COOLDOWN_SECONDS = 60.0
COOLDOWN_ENV = "MP_CIRCUIT_COOLDOWN"  # seconds; tests shorten it
# Failures that say the endpoint itself is down.
DOWN_KINDS = frozenset({"server_error", "connection", "timeout"})


class CircuitOpen(LLMError):
    """A call not sent because its endpoint's circuit is open (and a fallback may answer it instead)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="circuit_open")


@dataclass(eq=False)
class Circuit:
    """The state of one endpoint and model's circuit."""

    name: str
    threshold: int = CIRCUIT_FAILURES
    base_cooldown: float = CIRCUIT_COOLDOWN_SECONDS
    state: str = "closed"  # closed | open | half_open
    failures: int = 0  # consecutive
    opened: int = 0  # times opened
    open_until: float = 0.0
    cooldown: float = 0.0
    probing: bool = False
    down_since: float = 0.0  # time.monotonic() when the circuit last opened from closed
    unsettled: set[Circuit] | None = None  # its registry's circuits with failures or not closed (kept up to date)

    def __post_init__(self) -> None:
        self.cooldown = self.base_cooldown
        self._changed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    async def admit(self, give_up_at: float, fail_fast: bool, outage_limit: float = math.inf) -> bool:
        """Wait until a call may go; True when it is the half-open probe. CircuitOpen when `fail_fast` and the
        circuit is not closed, when it stays open past `give_up_at` (time.monotonic()), or once the endpoint has
        been down for `outage_limit` seconds (so a run's items stop waiting for an endpoint that stays down)."""
        while self.state != "closed":
            now = time.monotonic()
            give_up_at = min(give_up_at, self.down_since + outage_limit)
            if fail_fast or now >= give_up_at:
                raise CircuitOpen(f"calls to {self.name} are paused: its circuit is open after {self.threshold} "
                                  f"failures in a row (next probe in {max(self.open_until - now, 0):.1f} s)")
            if self.state == "open" and now >= self.open_until:
                self.state, self.probing = "half_open", True
                log.info("Circuit of %s half-open: one call probes the endpoint.", self.name)
                return True
            if self.state == "half_open" and not self.probing:
                self.probing = True
                return True
            wake = self.open_until if self.state == "open" else give_up_at
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(min(wake, give_up_at) - now, 0.001))
            except asyncio.TimeoutError:
                pass
        return False

    def record(self, kind: str | None, probe: bool) -> str | None:
        """Note a call's outcome (`kind` of its error, None for an answer); returns "opened" or "closed" when
        the circuit changed."""
        change = self._record(kind, probe)
        if self.unsettled is not None:
            if self.failures or self.state != "closed":
                self.unsettled.add(self)
            else:
                self.unsettled.discard(self)
        return change

    def _record(self, kind: str | None, probe: bool) -> str | None:
        down = kind in DOWN_KINDS
        if not down:
            self.failures = 0
            if self.state != "closed" and (probe or self.state == "half_open"):
                self.state, self.probing, self.cooldown, self.down_since = "closed", False, self.base_cooldown, 0.0
                self._changed.set()
                return "closed"
            return None
        self.failures += 1
        if probe or (self.state == "closed" and self.failures >= self.threshold):
            if probe:
                self.cooldown = min(self.cooldown * 2, CIRCUIT_MAX_COOLDOWN_SECONDS)
            if self.state == "closed":
                self.down_since = time.monotonic()
            self.state, self.probing = "open", False
            self.open_until = time.monotonic() + self.cooldown
            self.opened += 1
            self._changed.set()
            return "opened"
        return None

    def abandon_probe(self) -> None:
        """The probe ended without an outcome (cancelled): let another call probe."""
        if self.state == "half_open":
            self.probing = False
            self._changed.set()


class CircuitRegistry:
    """Circuits by (endpoint, model), created on first use; the process's, like its connection pools."""

    def __init__(self) -> None:
        self._circuits: dict[tuple[str, str], Circuit] = {}
        # Circuits with failures in a row or not closed: while there are none, an answer changes nothing, so the
        # fair-weather path looks no circuit up.
        self.unsettled: set[Circuit] = set()

    def circuit(self, endpoint: str, model: str) -> Circuit:
        found = self._circuits.get((endpoint, model))
        if found is None:
            found = self._circuits[(endpoint, model)] = Circuit(f"{model} at {endpoint}",
                                                                base_cooldown=cooldown_setting(),
                                                                unsettled=self.unsettled)
        return found

    def clear(self) -> None:
        self._circuits.clear()
        self.unsettled.clear()


def cooldown_setting() -> float:
    """MP_CIRCUIT_COOLDOWN: seconds an open circuit pauses calls at first; SettingError when it is unusable."""
    return number_setting(COOLDOWN_ENV, CIRCUIT_COOLDOWN_SECONDS, read=float, valid=lambda value: value > 0,
                          rule="a number of seconds greater than 0")


CIRCUITS = CircuitRegistry()
