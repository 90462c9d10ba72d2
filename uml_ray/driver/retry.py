"""Which trial errors are retried: the one classification (``is_transient``) and the backoff.

A trial trained in the trial process (one worker, or a fused trial) that meets a transient error
is retried in that process from the last checkpoint it wrote, after ``resources.retry_backoff_s``
× 2^(attempt-1) seconds, up to ``resources.transient_retries`` times (``driver/trainable.py``);
the driver prints one line per retry. Any other error is reported at once as the trial's final
result, with its traceback (exit 1). A lost worker, trial process or node is a Ray error, retried
by Tune or Ray Train (``resources.max_failures``) and never classified here.

The policy (an error counts when it, or one it was raised from or while handling, is listed;
README's Reliability section has the same table; tests/test_retry.py shows each row):

- retried: ``ConnectionError`` (refused, reset, aborted, ``BrokenPipeError``), ``TimeoutError``;
  an ``OSError`` whose errno is a network one (``ECONNRESET``, ``ETIMEDOUT``, ``ENETUNREACH``...);
  pyarrow's ``OSError`` (``ArrowIOError``) from object storage naming a network or throttling
  cause (AWS ``NETWORK_CONNECTION``, ``SLOW_DOWN``..., GCS ``UNAVAILABLE``); ``requests``
  ``ConnectionError`` / ``Timeout``; botocore ``ConnectionError`` (``EndpointConnectionError``),
  ``ReadTimeoutError``, ``ConnectionClosedError``; an ``MlflowException`` raised while handling one.
- not retried: ``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``,
  ``NotADirectoryError``, ``FileExistsError``, any other ``OSError`` (a corrupt file, a full disk);
  ``UserError`` (bad config or data) whatever it was raised from; ``ValueError``, ``KeyError``,
  any bug; CUDA out of memory.

Ray-free: the classification reads class names (requests, botocore, MLflow) and never imports them.
"""

from __future__ import annotations

import errno

from uml_ray.errors import UserError

# what a trial's reports carry after an in-process retry: the driver prints one line per new count
RETRIES_KEY = "transient_retries"
RETRY_ERROR_KEY = "transient_error"

# errno values of a network that dropped or did not answer (a plain OSError carries them too)
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "ETIMEDOUT",
        "EPIPE",
        "EHOSTUNREACH",
        "EHOSTDOWN",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
    )
    if hasattr(errno, name)
)
# an OSError that names the file system's verdict on a path: the same on every attempt
_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# the classes (module.qualname, matched anywhere in the MRO) of client libraries' network errors
_NETWORK_CLASSES = frozenset(
    {
        "requests.exceptions.ConnectionError",
        "requests.exceptions.Timeout",
        "botocore.exceptions.ConnectionError",
        "botocore.exceptions.ReadTimeoutError",
        "botocore.exceptions.ConnectionClosedError",
        "urllib3.exceptions.ProtocolError",
        "urllib3.exceptions.TimeoutError",
    }
)
# what the AWS and GCS SDKs under pyarrow say of a retryable failure (pyarrow raises a plain
# OSError with the SDK's message and no errno)
_STORAGE_MARKERS = (
    "NETWORK_CONNECTION",
    "curlCode",
    "SLOW_DOWN",
    "SERVICE_UNAVAILABLE",
    "THROTTLING",
    "REQUEST_TIMEOUT",
    "INTERNAL_FAILURE",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "Connection reset",
    "Broken pipe",
)
# the longest wait between attempts, however many are allowed
MAX_BACKOFF_S = 600.0


def is_transient(exc: BaseException) -> bool:
    """Whether the next attempt after ``exc`` may pass: a network or object-storage error, itself
    or anywhere in its ``__cause__`` / ``__context__`` chain. A ``UserError`` is bad input, never
    transient, whatever it was raised from."""
    if isinstance(exc, UserError):
        return False
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if _transient_itself(current):
            return True
        pending.extend((current.__cause__, current.__context__))
    return False


def _transient_itself(exc: BaseException) -> bool:
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__}
    if names & _NETWORK_CLASSES:
        return True
    if not isinstance(exc, OSError) or isinstance(exc, _PATH_ERRORS):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)) or exc.errno in _NETWORK_ERRNOS:
        return True
    return exc.errno is None and any(marker in str(exc) for marker in _STORAGE_MARKERS)


def backoff_s(attempt: int, base_s: float) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): ``base_s`` doubled each time, at most
    ``MAX_BACKOFF_S``."""
    return min(base_s * 2.0 ** min(attempt - 1, 30), MAX_BACKOFF_S)


def describe(exc: BaseException) -> str:
    """An error as one short line: its class and the first 200 characters of its message."""
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def retry_line(trial_id: str, result: dict, retries_limit: int) -> str:
    """The console line of a trial's retry, from the first report after it."""
    return (
        f"trial {trial_id}: transient {result.get(RETRY_ERROR_KEY, 'error')}; "
        f"retried from its last checkpoint (attempt {int(result[RETRIES_KEY]) + 1}, "
        f"retry {int(result[RETRIES_KEY])} of {retries_limit})"
    )
