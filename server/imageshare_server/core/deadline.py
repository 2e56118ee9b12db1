"""How long a read may go on, as the upstream client asks it, and what it tells its callers.

A read can serve several callers at once (single-flight) or none (a cache
fill after its callers left), so "the deadline" is not one caller's: it is
the read's own (``at``), re-read at every step, so a caller who joins with
more time extends a read under way. A read that only fills the cache after
its callers gave up runs to its own limit; callers who cannot wait that long
learn why from the read as it waits: ``queued`` (for a rate-limit slot, with
the expected wait) and ``waiting_for_slot`` (for one of the upstream
connection slots). ``upstream_answer`` hands it the RequestId of every
answered attempt, failed ones included, for the callers' log lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class ReadDeadline(Protocol):
    def at(self) -> float | None:
        """When waiting and upstream attempts must be over (``Clock.monotonic()``); None: never."""
        ...

    @property
    def background(self) -> bool:
        """True while no caller waits for the read: it queues behind callers' reads."""
        ...

    @property
    def caller(self) -> str:
        """Who the read is for (a connection), so callers can take turns for the quota."""
        ...

    def queued(self, until: float) -> None:
        """The read waits for a rate-limit slot until about ``until``."""
        ...

    def admitted(self) -> None:
        """The rate limit let the read send a call (after ``queued``, if it had to wait)."""
        ...

    def waiting_for_slot(self, waiting: bool) -> None:
        """The read starts (True) or stops (False) waiting for an upstream connection slot."""
        ...

    def upstream_answer(self, request_id: str) -> None:
        """An upstream attempt of the read was answered with ``request_id`` (errors too)."""
        ...


@dataclass(frozen=True, slots=True)
class FixedDeadline:
    """One caller's read: the limiter and the slots refuse what ``at`` cannot wait for."""

    deadline: float | None = None
    background: bool = False
    caller: str = ""

    def at(self) -> float | None:
        return self.deadline

    def queued(self, until: float) -> None:
        """Nothing to tell: the caller is the read."""

    def admitted(self) -> None:
        """Nothing to tell: the caller is the read."""

    def waiting_for_slot(self, waiting: bool) -> None:
        """Nothing to tell: the caller is the read."""

    def upstream_answer(self, request_id: str) -> None:
        """Nothing to keep: the caller sees the page's or the error's own RequestId."""


NO_DEADLINE = FixedDeadline()
