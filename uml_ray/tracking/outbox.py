"""The outbox: MLflow writes sent in order, held while the server is unreachable, replayed once it answers.

A tracking outage neither stalls nor fails a sweep: each write gives up on an unreachable server
within seconds (``WRITE_HTTP``), is held with every write after it, and the held writes are tried
again in order every ``RETRY_WRITES_S`` seconds, or waited for at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

from uml_ray.tracking.store import WRITE_HTTP, bounded_http, one_line

# how often held writes try an unreachable server again, and how long the last ones wait for it
RETRY_WRITES_S = 5.0
FINAL_WAIT_S = 300.0


class Outbox:
    """The writes of one tracker to the store at ``uri``: each a no-argument call, sent after every
    earlier one. Files a held write will send are copied aside (``keep``): their owners' are temporary."""

    def __init__(self, uri: str):
        self.uri = uri
        self._held: list[tuple[str, Callable[[], None]]] = []  # (what, write) not yet sent, in order
        self._retry_at = 0.0
        self._spool: str | None = None  # copies of held artifacts

    @property
    def holding(self) -> bool:
        """Whether writes are held for an unreachable server."""
        return bool(self._held)

    def send(self, what: str, write: Callable[[], None]) -> None:
        """Send ``write`` after any held ones; hold it while the server is unreachable. ``what`` names it
        in the note on writes never sent."""
        self._held.append((what, write))
        self.flush()

    def flush(self, wait_s: float = 0.0) -> bool:
        """Send held writes in order, waiting up to ``wait_s`` for an unreachable server; True when none
        is left.

        A write that fails for another reason than an unreachable server is dropped and its error raised.
        """
        deadline = time.monotonic() + wait_s
        while self._held:
            pause = self._retry_at - time.monotonic()
            if pause > 0:
                if time.monotonic() + pause > deadline:
                    return False
                time.sleep(pause)
            what, write = self._held[0]
            try:
                with bounded_http(WRITE_HTTP):
                    write()
            except Exception as exc:  # noqa: BLE001 - MLflow raises many types; is_unreachable sorts them
                if not is_unreachable(exc):
                    self._held.pop(0)
                    raise
                if not self._retry_at:
                    _note(
                        f"MLflow at {self.uri} is unreachable ({one_line(exc)}); holding its writes "
                        f"and trying again every {RETRY_WRITES_S:g} s"
                    )
                self._retry_at = time.monotonic() + RETRY_WRITES_S
                continue
            self._held.pop(0)
            if self._retry_at and not self._held:
                _note(f"MLflow at {self.uri} answers again: held writes sent")
                self._retry_at = 0.0
        if self._spool:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None
        return True

    def close(self, wait_s: float = FINAL_WAIT_S) -> None:
        """Send what is held, waiting up to ``wait_s`` for the server; say what could not be sent."""
        if not self.flush(wait_s):
            unsent = ", ".join(sorted({what for what, _ in self._held}))
            _note(
                f"MLflow at {self.uri} stayed unreachable for {wait_s:g} s: "
                f"{len(self._held)} write(s) not recorded ({unsent})"
            )

    def keep(self, paths: dict[str, str]) -> dict[str, str]:
        """Copies of local files and folders that a held write will send after their owner deleted them."""
        if self._spool is None:
            self._spool = tempfile.mkdtemp(prefix="uml-ray-mlflow-")
        copies = {}
        for key, path in paths.items():
            folder = tempfile.mkdtemp(dir=self._spool)
            if os.path.isdir(path):
                copies[key] = shutil.copytree(path, os.path.join(folder, "tree"))
            else:
                copies[key] = shutil.copy(path, folder)
        return copies


def is_unreachable(exc: BaseException) -> bool:
    """Whether an MLflow error means the server did not answer (refused, timed out, kept failing with
    5xx/429): worth sending again later, unlike a refused request. MLflow re-raises these as a bare
    MlflowException, the requests error only in ``__context__``."""
    import requests

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(
            exc,
            (
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                requests.exceptions.RetryError,
            ),
        ):
            return True
        if "Max retries exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _note(line: str) -> None:
    print(f"[uml-ray] {line}", file=sys.stderr, flush=True)
