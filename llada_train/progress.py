"""Progress of a long loop: tqdm's bar on a terminal, plain lines in a log file.

A bar redrawn with carriage returns is unreadable once stderr goes to a file (`make demo > demo.log`
would hold one line of several hundred kilobytes). When the stream is not a terminal, progress is a
whole line every `interval_s` seconds and at every `every_frac` of the total, with the rate, the
elapsed time, the ETA and the loop's own figures (loss), as HF Trainer and Lightning write theirs.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _clock_text(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class LineProgress:
    """The part of tqdm's interface the loops use (`update`, `set_postfix`, `close`, `with`), written
    as whole lines."""

    def __init__(self, total: int | None, *, initial: int = 0, desc: str = "", unit: str = "step",
                 interval_s: float = 30.0, every_frac: float = 0.05, file=None, clock=time.monotonic):
        self.total, self.n, self.first = total, initial, initial
        self.desc, self.unit, self.file = desc, unit, file if file is not None else sys.stderr
        self.interval_s, self.clock = interval_s, clock
        self.frac_step = max(1, int(total * every_frac)) if total else None
        self.start = self.last = clock()
        self.last_n = initial
        self.postfix = ""

    def set_postfix(self, **figures) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in figures.items())

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        now = self.clock()
        crossed = self.frac_step is not None and self.n // self.frac_step > before // self.frac_step
        if crossed or now - self.last >= self.interval_s:
            self._write(now)

    def _write(self, now: float) -> None:
        done, elapsed = self.n - self.first, now - self.start
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n} {self.unit}s"
        parts = [count]
        if done > 0:
            per = elapsed / done
            parts.append(f"{per:.2f} s/{self.unit}" if per >= 1 else f"{1 / per:.1f} {self.unit}/s")
            parts.append(f"elapsed {_clock_text(elapsed)}")
            if self.total:
                parts.append(f"ETA {_clock_text(per * max(self.total - self.n, 0))}")
        if self.postfix:
            parts.append(self.postfix)
        print(f"[{self.desc}] " + ", ".join(parts), file=self.file, flush=True)
        self.last, self.last_n = now, self.n

    def close(self) -> None:
        if self.n != self.last_n:
            self._write(self.clock())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(total: int | None = None, *, desc: str, unit: str = "step", initial: int = 0, disable: bool = False,
             file=None, leave: bool = True):
    """tqdm on a terminal, `LineProgress` otherwise (nothing when `disable`)."""
    stream = file if file is not None else sys.stderr
    if disable or stream.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=stream,
                    dynamic_ncols=True, leave=leave)
    return LineProgress(total, initial=initial, desc=desc, unit=unit, file=stream)


def quiet_library_bars() -> None:
    """Library progress bars (transformers' shard writing) off when stderr is not a terminal."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
