"""A sweep's console: one status line (in place on a terminal, periodic in logs); trial events in a file.

The bridge (``driver/bridge.py``) hands every trial event here: started, a result, ended with its
outcome. The console gets one status line (done/total, running, pruned, failed, the best config so
far, elapsed and ETA): redrawn in place by tqdm on a terminal; elsewhere (CI, ``ray job submit``
logs) a plain line when both ``EVERY_SECONDS`` and a ``EVERY_SHARE`` of the trials have gone by
since the last, and a final line naming the events log. Each trial event is one line of that log
(``<storage_path>/<sweep>/events.log``); ``--verbose`` prints them on the console too. Errors
(a trial's failure, a tracking error) reach the console at once.

A sweep opens its display with ``display``; the bridge finds it through the module (the bridge is
pickled with the sweep, a console is not). With no display open, an event is one console line.
A study running several sweeps labels each ``sweep k/n`` through ``study_sweep``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections import Counter

# a non-terminal console gets a status line when both have passed since the last one
EVERY_SECONDS = 30.0
EVERY_SHARE = 0.1
# outcomes that count as done well; every other outcome is counted by name on the status line
GOOD_OUTCOMES = ("finished", "stopped_early")
# sampled params shown beside the best value
SHOWN_PARAMS = 3

_active: Progress | None = None
_label = ""


class Progress:
    """One sweep's status line on ``stream`` and its trial events in ``log_path``."""

    def __init__(
        self,
        name: str,
        total: int | None,
        log_path: str,
        metric: str = "best_val_acc",
        stream=None,
        verbose: bool = False,
        label: str = "",
        every_seconds: float = EVERY_SECONDS,
        every_share: float = EVERY_SHARE,
        clock=time.monotonic,
    ):
        self.name = f"{label} {name}".strip()
        self.total = total
        self.log_path = log_path
        self.metric = metric
        self.stream = stream if stream is not None else sys.stdout
        self.verbose = verbose
        self.every_seconds = every_seconds
        self.every_trials = max(1, math.ceil(every_share * total)) if total else 0
        self.clock = clock
        self.started_at = clock()
        self.running: set[str] = set()
        self.outcomes: dict[str, str] = {}
        # the best completed run, else the best of any, ties to the lower validation loss: as the
        # summary selects (summary.best_row); completed or not -> ((value, -loss), key, params)
        self.best: dict[bool, tuple[tuple[float, float], str, dict]] = {}
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        self.log = open(log_path, "a", buffering=1)  # line-buffered: readable while the sweep runs
        self.bar = None
        if _is_terminal(self.stream) and not verbose:
            # verbose consoles carry Tune's own tables and the event lines: plain status lines there
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                file=self.stream,
                desc=f"sweep {self.name}",
                bar_format="{desc}: {bar:12} {n_fmt}/{total_fmt} done{postfix}",  # tqdm adds ", "
                dynamic_ncols=True,
                leave=False,  # the final line takes its place
            )
        self._console(f"sweep {self.name}: {total or '?'} configs; trial events in {log_path}")
        self.last_line_at, self.last_line_done = self.started_at, 0
        self._refresh()

    def started(self, key: str, params: dict, line: str = "") -> None:
        """A run (a trial, or a fused trial's member) started training."""
        self.running.add(key)
        self._event(line)

    def result(self, key: str, params: dict, metrics: dict, line: str = "") -> None:
        """A run reported ``metrics`` (the sweep's metric among them once it validated)."""
        value, completed = metrics.get(self.metric), bool(metrics.get("completed"))
        if isinstance(value, int | float) and not math.isnan(value):
            rank = (float(value), -float(metrics.get("best_val_loss", 0.0)))
            if completed not in self.best or rank > self.best[completed][0]:
                self.best[completed] = (rank, key, dict(params))
        self._event(line)

    def ended(self, key: str, outcome: str, line: str = "") -> None:
        """A run ended: finished, stopped_early, pruned, failed, or another outcome; failures are
        printed at once."""
        self.running.discard(key)
        self.outcomes[key] = outcome
        self._event(line, urgent=outcome not in GOOD_OUTCOMES + ("pruned",))

    def message(self, line: str) -> None:
        """An error or warning: in the log, and on the console at once."""
        self._event(line, urgent=True)

    def status(self) -> str:
        """The status line: done/total, running, each outcome but the good ones, best so far, time."""
        return f"sweep {self.name}: {len(self.outcomes)}/{self.total or '?'} done, {self._rest()}"

    def close(self) -> None:
        """The final line (counts, best, time, where the events are) and the log closed."""
        if self.bar is not None:
            self._refresh()
            self.bar.close()
            self.bar = None
        self._console(f"{self.status()}; trial events in {self.log_path}")
        self.log.close()

    def _event(self, line: str, urgent: bool = False) -> None:
        if line:
            self.log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
            if urgent or self.verbose:
                self._console(f"[uml-ray] {line}")
        self._refresh()

    def _refresh(self) -> None:
        if self.bar is not None:
            self.bar.n = len(self.outcomes)
            self.bar.set_postfix_str(self._rest(), refresh=True)
            return
        now, done = self.clock(), len(self.outcomes)
        if (
            now - self.last_line_at >= self.every_seconds
            and done - self.last_line_done >= self.every_trials
            and done > self.last_line_done
        ):
            self._console(self.status())
            self.last_line_at, self.last_line_done = now, done

    def _console(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _rest(self) -> str:
        """The status after done/total (the bar draws those itself)."""
        counts = Counter(self.outcomes.values())
        shown = ("pruned", "failed")
        parts = [f"{len(self.running)} running"] + [f"{counts.get(o, 0)} {o}" for o in shown]
        parts += [f"{n} {o}" for o, n in sorted(counts.items()) if o not in GOOD_OUTCOMES + shown]
        return ", ".join(parts) + f" | {self._best_text()} | {self._times()}"

    def _best_text(self) -> str:
        if not self.best:
            return f"best: {self.metric} -"
        (value, _), key, params = self.best.get(True) or self.best[False]
        shown = " ".join(f"{_short_key(k)}={_number(v)}" for k, v in list(params.items())[:SHOWN_PARAMS])
        return f"best: {self.metric}={value:.4g} ({key}{': ' + shown if shown else ''})"

    def _times(self) -> str:
        elapsed = self.clock() - self.started_at
        done = len(self.outcomes)
        if self.total and done and done < self.total:
            eta = _duration(elapsed / done * (self.total - done))
        else:
            eta = "0s" if self.total and done >= self.total else "?"
        return f"{_duration(elapsed)} elapsed, ETA {eta}"


@contextlib.contextmanager
def display(name: str, total: int | None, log_path: str, metric: str = "best_val_acc", verbose=False):
    """Open a sweep's display for the bridge's events; its final line is printed on the way out."""
    global _active
    progress = Progress(name, total, log_path, metric=metric, verbose=verbose, label=_label)
    _active = progress
    try:
        yield progress
    finally:
        _active = None
        progress.close()


@contextlib.contextmanager
def study_sweep(k: int, n: int):
    """Label the sweeps run inside as sweep ``k`` of a study's ``n``."""
    global _label
    _label = f"{k}/{n}"
    try:
        yield
    finally:
        _label = ""


def trial_started(key: str, params: dict, line: str = "") -> None:
    """The bridge: a run started."""
    _to_display("started", key, params, line=line)


def trial_result(key: str, params: dict, metrics: dict, line: str = "") -> None:
    """The bridge: a run reported ``metrics``."""
    _to_display("result", key, params, metrics, line=line)


def trial_ended(key: str, outcome: str, line: str = "") -> None:
    """The bridge: a run ended with ``outcome``."""
    _to_display("ended", key, outcome, line=line)


def say(line: str) -> None:
    """An error or warning from the driver: on the console at once (and in the open sweep's log)."""
    if _active is not None:
        _active.message(line)
    else:
        print(f"[uml-ray] {line}", flush=True)


def _to_display(kind: str, *args, line: str) -> None:
    if _active is not None:
        getattr(_active, kind)(*args, line=line)
    elif line:  # no sweep display open (a bridge used on its own): the event is a console line
        print(f"[uml-ray] {line}", flush=True)


def _is_terminal(stream) -> bool:
    """A terminal with a size: a pty that reports 0 rows or columns (``script`` without a terminal, some
    CI runners) gets plain lines, as tqdm draws nothing there."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return True  # a terminal without a file descriptor to measure (a test's fake): tqdm's width
    return size.columns > 0 and size.lines > 0


def _short_key(key: str) -> str:
    """``train.lr`` -> ``lr``, ``train.alpha.text`` -> ``alpha.text``: the section is implied."""
    return key.split(".", 1)[1] if "." in key else key


def _number(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
