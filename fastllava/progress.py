"""Progress for long loops that reads well on a terminal and in a log file.

On a terminal `progress()` draws a tqdm bar. Anywhere else (CI, nohup, a cluster job's log) a bar is
thousands of carriage-return frames in one "line"; there it prints a plain line instead, at most every
few seconds, plus one final line at close():

    train:  24% 1200/5000 [10:00<31:40, 2.00step/s, loss 0.41 lr 2.0e-03]

The numbers are tqdm's own (`tqdm.format_meter` with no bar), so both modes read alike.

    with progress(len(rows), desc="lengths", unit="sample", enabled=rank == 0) as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))
            bar.set_postfix(f"rejected {n_bad}")
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO

INTERVAL_ENV = "FASTLLAVA_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 5.0  # seconds between log lines: ~700 lines for a 1-hour loop, readable in a job log

# The log-mode clock; module-level so tests can substitute a controlled one.
_clock = time.monotonic


def _is_terminal(file: IO[str]) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty(), or a closed file
        return False


def _resolve_interval(interval: float | None) -> float:
    """The explicit argument, else $FASTLLAVA_PROGRESS_INTERVAL, else DEFAULT_INTERVAL."""
    source = "interval"
    if interval is None:
        raw = os.environ.get(INTERVAL_ENV, "").strip()
        if not raw:
            return DEFAULT_INTERVAL
        source = INTERVAL_ENV
        try:
            interval = float(raw)
        except ValueError:
            raise ValueError(f"{INTERVAL_ENV}={raw!r} is not a number; set it to the seconds between "
                             f"progress lines in a log (e.g. 30), or unset it for {DEFAULT_INTERVAL:g}") from None
    if not interval >= 0:  # also rejects NaN
        raise ValueError(f"{source} must be a number of seconds >= 0 (0 prints a line on every update), "
                         f"got {interval!r}")
    return float(interval)


class Progress:
    """A progress display; build it with `progress()`. Three modes, chosen once at construction:

    bar       `file` is a terminal and enabled: a tqdm bar (rate, ETA, dynamic width).
    log       `file` is not a terminal and enabled: a plain line every `interval` seconds at most,
              and one at close().
    disabled  enabled=False: nothing drawn; write() still prints.
    """

    def __init__(self, total: int | None, *, desc: str, unit: str, initial: int, enabled: bool,
                 file: IO[str] | None, interval: float | None):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.initial = initial
        self.file = sys.stdout if file is None else file
        self.interval = _resolve_interval(interval)
        self.n = initial
        self._postfix = ""
        self._closed = False
        self._bar = None
        self._log = False
        if enabled and _is_terminal(self.file):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                             file=self.file)
        elif enabled:
            self._log = True
            self._t0 = _clock()
            self._last_line = self._t0
            # A first line says the loop has started (and where a resumed run starts from), before the
            # first step, which may be slow (compilation, cache warm-up).
            self._emit(self._t0)

    @property
    def mode(self) -> str:
        """Which display this is: "bar", "log" or "disabled"."""
        return "bar" if self._bar is not None else "log" if self._log else "disabled"

    def update(self, n: int = 1) -> None:
        """Count `n` more units done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._log and not self._closed:
            now = _clock()
            if now - self._last_line >= self.interval:
                self._emit(now)

    def set_postfix(self, text: str) -> None:
        """Show a short status after the numbers, e.g. "loss 0.41 lr 2.0e-03"; shown from the next line/frame."""
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def write(self, text: str) -> None:
        """Print `text` as its own line without breaking the bar; prints in every mode, also after close()."""
        if self._bar is not None:
            self._bar.write(text, file=self.file)
        else:
            print(text, file=self.file, flush=True)

    def close(self) -> None:
        """Finish the display: the bar's last frame, or the final log line. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._log:
            self._emit(_clock())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        # Also on an exception: the last line shows how far the loop got.
        self.close()

    def _emit(self, now: float) -> None:
        from tqdm import tqdm

        # ncols=0 is tqdm's "stats only" layout: its percentage, n/total, elapsed<ETA and rate, no bar.
        # The rate is the average since construction, counted from `initial` (a resumed run's ETA is right).
        line = tqdm.format_meter(self.n, self.total, now - self._t0, ncols=0, prefix=self.desc, unit=self.unit,
                                 postfix=self._postfix, initial=self.initial)
        self._last_line = now
        self.file.write(line + "\n")
        self.file.flush()  # a log file is block-buffered; a line nobody sees until exit is no progress


def progress(total: int | None, *, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
             file: IO[str] | None = None, interval: float | None = None) -> Progress:
    """Progress of a loop of `total` units: a tqdm bar on a terminal, plain periodic lines elsewhere.

    Args:
        total: units the loop will do (None if unknown: no percentage or ETA).
        desc: what the loop does, printed first ("train", "lengths of data.json").
        unit: name of one unit, shown in the rate ("step" gives "2.00step/s").
        initial: units already done before this loop (a resumed run); the rate counts from here.
        enabled: False draws nothing (pass `rank == 0` so other ranks stay quiet); write() still prints.
        file: where to draw; default sys.stdout. A terminal gets the bar, anything else the lines.
        interval: seconds between lines when `file` is not a terminal, >= 0. Default: the environment
            variable FASTLLAVA_PROGRESS_INTERVAL, else 5.

    Returns a Progress with update(n=1), set_postfix(text), write(text), close(); it is also a context
    manager that closes on exit.
    """
    return Progress(total, desc=desc, unit=unit, initial=initial, enabled=enabled, file=file, interval=interval)
