"""What Tune logs while a sweep runs: the tracebacks of what it recovers from go to the sweep's
``tune-errors.log``, and the console gets at most one line for each."""

from __future__ import annotations

import contextlib
import logging
import os

from uml_ray.driver import progress
from uml_ray.uri import is_remote


class ToFile(logging.Filter):
    """Keeps Tune's tracebacks of what it recovers from off the console, appending them to ``log``.

    - "Error handling checkpoint": on ``--resume``, Tune's checkpoint manager may hold a checkpoint
      the killed driver had already deleted (the rotation ran, the snapshot naming it was not
      rewritten yet); deleting it again raises FileNotFoundError, which Tune logs with a traceback
      though the trial goes on unharmed.
    - "Trial task failed": a trial process or worker died (``ActorDiedError``); Tune retries the
      trial from its checkpoint (``resources.max_failures``), so the console gets one line naming
      the trial and the error class, and the bridge says how the trial ended.
    """

    def __init__(self, log: str):
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Trial task failed for trial"):
            error = record.exc_info[1] if record.exc_info else None
            where = f"; traceback in {self.log}" if self.log else ""
            progress.say(
                f"{message.removeprefix('Trial task failed for ')}: its process failed "
                f"({type(error).__name__}); retried from its last checkpoint while "
                f"resources.max_failures allows{where}"
            )
        elif not message.startswith("Trial %s: Error handling checkpoint"):
            return True
        if self.log:
            with contextlib.suppress(OSError), open(self.log, "a") as handle:
                handle.write(logging.Formatter("%(asctime)s %(levelname)s %(message)s").format(record) + "\n")
        return False


@contextlib.contextmanager
def tune_errors_to_file(path: str):
    """While a sweep runs: the tracebacks of what Tune recovers from (checkpoint handling, a trial
    process that died) go to ``tune-errors.log`` in its folder (dropped for a remote one), not to
    the console."""
    logger = logging.getLogger("ray.tune.execution.tune_controller")
    keep = ToFile("" if is_remote(path) else os.path.join(path, "tune-errors.log"))
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
