"""Watching share lists: one poller per watched image, shared by all its watchers, and diffs."""

from imageshare_server.watch.hub import (
    WATCH_CALLER,
    Poller,
    Watcher,
    WatchEvent,
    WatchHub,
    WatchSource,
    ends_watch,
    next_poll,
    phase,
)

__all__ = [
    "WATCH_CALLER",
    "Poller",
    "WatchEvent",
    "WatchHub",
    "WatchSource",
    "Watcher",
    "ends_watch",
    "next_poll",
    "phase",
]
