"""Watching a server: structured (JSON) logs and a live console view of the round."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

_FIELDS = ("event", "participant", "round", "reason")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the event fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        for k in _FIELDS:
            v = getattr(record, k, None)
            if v is not None:
                out[k] = v
        return json.dumps(out, default=str)


class ProgressView:
    """A rich live table of the server's round: participants, bytes, throughput, refusals."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.live.start()
        self._last = (time.monotonic(), 0)

    def update(self, server: Any) -> None:
        from rich.table import Table

        now = time.monotonic()
        t0, b0 = self._last
        rate = (server.bytes_in - b0) / max(now - t0, 1e-9) if server.bytes_in >= b0 else 0.0
        self._last = (now, server.bytes_in)
        t = Table(title=f"fedagg serve {server.endpoint}: round {server.round}", expand=False)
        for col in ("accepted", "quorum", "connected", "uploading", "received", "MB/s", "elapsed", "refused"):
            t.add_column(col, justify="right")
        t.add_row(str(len(server.accepted)), str(server.cfg.quorum), str(len(server.peers)),
                  str(len(server.uploads)), f"{server.bytes_in / 1e6:,.1f} MB", f"{rate / 1e6:,.0f}",
                  f"{now - server.round_started:,.1f} s", str(len(server.rejected)))
        if server.rejected:
            last = server.rejected[-3:]
            from rich.markup import escape  # ids are the participants' words, never markup

            t.caption = "last refusals: " + "; ".join(f"{escape(str(r['id']))}: {escape(r['reason'])}" for r in last)
        self.live.update(t)

    def close(self) -> None:
        self.live.stop()


class LogThrottle:
    """At most `burst` log lines per key in each `interval`; the rest are counted and the count
    is reported with the key's next line, so a flood of one kind of event costs a few lines.
    """

    def __init__(self, interval: float = 5.0, burst: int = 5):
        self.interval, self.burst = interval, burst
        self._window: dict = {}  # key -> [window start, lines in it, suppressed since the last line]

    def allow(self, key: Any, now: float):
        """None: stay quiet; else the number of lines suppressed before this one (0 usually)."""
        w = self._window.get(key)
        if w is None or now - w[0] >= self.interval:
            if len(self._window) > 10_000:  # keys are bounded too (e.g. one per participant)
                self._window.clear()
            w = self._window[key] = [now, 0, 0 if w is None else w[2]]
        if w[1] >= self.burst:
            w[2] += 1
            return None
        w[1] += 1
        suppressed, w[2] = w[2], 0
        return suppressed
