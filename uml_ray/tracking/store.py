"""The MLflow connection: tracking URIs checked and resolved, clients, bounded HTTP, MLflow's record types.

The only module of ours that imports MLflow; the rest of ``tracking`` reaches it through here.
Credentials in a tracking URI (``http://alice:s3cret@host:5000``) never reach MLflow's client: it is
given the URI without them and they authenticate its requests to that server (``_credentials``);
every param and tag value is redacted (``uri.redact_text``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import os
import re
import threading
import urllib.parse
from pathlib import Path

from uml_ray.errors import UserError
from uml_ray.uri import redact, redact_text, split_credentials

# What MLflow's tracking-store registry accepts; its file store (a plain folder, file:) is refused
# by MLflow 3 unless MLFLOW_ALLOW_FILE_STORE is set.
TRACKING_SCHEMES = (
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "databricks",
    "databricks-uc",
    "uc",
)
# the pre-launch checks and `uml-ray best` give up on an unreachable server in seconds; MLflow's
# defaults (7 retries with backoff, 120 s timeout) took over 4 minutes to say so
CHECK_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# a sweep's writes give up on an unreachable server within seconds too, and are held and sent
# later (the outbox): waiting out MLflow's minutes of backoff would stall the driver and with
# it every trial waiting for its report to be taken
WRITE_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute (trials and later commands run elsewhere)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix) :])
    if "://" not in uri:
        return os.path.abspath(uri)
    return uri


def default_artifact_location(uri: str, artifact_location: str) -> str | None:
    """Artifacts beside a SQLite store (``./mlartifacts``) unless configured."""
    if artifact_location:
        return artifact_location
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).resolve().parent.joinpath("mlartifacts").as_uri()
    return None


def client(uri: str):
    """An ``MlflowClient`` on the (resolved) tracking URI; an HTTP server's given without its userinfo,
    whose user name and password authenticate every request to that server instead (``_credentials``)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=_credentials(resolve_tracking_uri(uri)))


# user name and password (None where not given) by the origin (scheme://host:port) of the HTTP
# tracking URIs that named them; held in memory only
_CREDENTIALS: dict[str, tuple[str | None, str | None]] = {}


def _credentials(uri: str) -> str:
    """An HTTP tracking URI without its userinfo, the userinfo kept for MLflow's requests to that server;
    other URIs as they are (a database URI's password is for its driver, not for MLflow's client).

    MLflow given ``http://alice:s3cret@host`` prints the URI itself ("View run ... at") and echoes it
    in its errors; given ``http://host``, it cannot. It still authenticates: every set of credentials
    MLflow builds for a request to that server (``MlflowHostCreds``: the tracking store's, the artifact
    repository's, in whichever thread) takes the user name and password the URI gave where the
    environment (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``) gives none. Nothing is set in
    ``os.environ``: child processes and requests to other servers get nothing.
    """
    if urllib.parse.urlparse(uri).scheme.lower() not in ("http", "https"):
        return uri
    bare, user, password = split_credentials(uri)
    if user is not None or password is not None:
        _fill_host_credentials()
        with _SCOPING:
            known_user, known_password = _CREDENTIALS.get(_origin(bare), (None, None))
            if password is None and user in (None, known_user):  # a redacted URI: the password known
                password = known_password
            _CREDENTIALS[_origin(bare)] = (user or known_user, password)
    return bare


def keep_credentials(uri: str) -> str:
    """``uri`` redacted, its credentials kept for this process's MLflow requests: the form of a tracking
    URI to hand to what is pickled into files (Tune's saved callbacks) or recorded. A client given it
    later in this process authenticates as one given ``uri``."""
    _credentials(resolve_tracking_uri(uri))
    return redact(uri)


def _origin(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    return f"{parsed.scheme.lower()}://{(parsed.hostname or '').lower()}:{parsed.port or ''}"


def _fill_host_credentials() -> None:
    """Once per process: MLflow's request credentials for a server whose tracking URI named a user name
    or password take them where the environment gave none."""
    from mlflow.utils.rest_utils import MlflowHostCreds

    with _SCOPING:
        if "_uml_ray_filled" in vars(MlflowHostCreds):
            return
        build = MlflowHostCreds.__init__

        @functools.wraps(build)
        def filled(self, host, username=None, password=None, *args, **kwargs):
            known_user, known_password = _CREDENTIALS.get(_origin(str(host)), (None, None))
            build(self, host, username or known_user, password or known_password, *args, **kwargs)

        MlflowHostCreds.__init__ = filled
        MlflowHostCreds._uml_ray_filled = True


def param_value(value) -> str:
    """A param or tag value as MLflow stores it: a string of bounded length (dicts and lists as JSON),
    every URI in it redacted (no password or credential query parameter is ever recorded)."""
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return redact_text(text)[:6000]


def metric(key: str, value: float, timestamp_ms: int, step: int):
    """One MLflow metric value, for ``log_batch``."""
    from mlflow.entities import Metric

    return Metric(key, value, timestamp_ms, step)


def param(key: str, value):
    """One MLflow param (its value made a bounded string), for ``log_batch``."""
    from mlflow.entities import Param

    return Param(key, param_value(value))


def tag(key: str, value):
    """One MLflow tag (its value made a bounded string), for ``log_batch``."""
    from mlflow.entities import RunTag

    return RunTag(key, param_value(value))


def download_artifact(uri: str, run_id: str, path: str, dst: str) -> str:
    """Fetch one artifact of a run to a local folder; returns the local path. No progress bar: a
    command fetching a few small files says what it fetched itself."""
    import mlflow.artifacts

    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        return mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=path,
            dst_path=dst,
            tracking_uri=_credentials(resolve_tracking_uri(uri)),
        )
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved


# The HTTP settings of the calls inside the innermost ``bounded_http`` block of this thread (None:
# MLflow's own, from the environment).
_HTTP_SETTINGS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("uml_ray_http", default=None)
_SCOPING = threading.Lock()


@contextlib.contextmanager
def bounded_http(settings: dict = CHECK_HTTP):
    """MLflow HTTP requests made inside the block (by this thread) retry and time out as ``settings`` say
    (by default: once, 10 s); nothing changes for other threads, child processes or later calls."""
    _scope_http_settings()
    token = _HTTP_SETTINGS.set(settings)
    try:
        yield
    finally:
        _HTTP_SETTINGS.reset(token)


def _scope_http_settings() -> None:
    """Once per process: MLflow's HTTP request settings read the calling context's ``bounded_http``
    values first, and the environment as before outside such a block.

    MLflow 3 takes no request settings per client or per call for its tracking store (``RestStore``
    calls ``http_request`` without them) nor for artifact uploads: every request reads
    ``MLFLOW_HTTP_REQUEST_*`` through these variables' ``get``. Setting ``os.environ`` around our calls
    changed them for every thread of the process and every child started meanwhile; a context
    variable changes them for our calls only.
    """
    from mlflow import environment_variables as variables

    with _SCOPING:
        for variable in (
            variables.MLFLOW_HTTP_REQUEST_MAX_RETRIES,
            variables.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
            variables.MLFLOW_HTTP_REQUEST_TIMEOUT,
        ):
            if "get" not in vars(variable):  # not yet scoped
                variable.get = functools.partial(_scoped_get, variable, variable.get)


def _scoped_get(variable, read_environment):
    settings = _HTTP_SETTINGS.get()
    if settings is not None and variable.name in settings:
        return variable.type(settings[variable.name])
    return read_environment()


def check_tracking(uri: str, experiment: str) -> None:
    """Reach the tracking store before any cluster work (a typo'd server URI fails here, clearly,
    within seconds)."""
    check_tracking_uri(uri)
    try:
        with bounded_http(), _quiet_store_creation():
            client(uri).get_experiment_by_name(experiment)
    except Exception as exc:  # MLflow raises many types for unreachable/unauthorised stores
        raise UserError(
            f"tracking.uri={redact(uri)}: cannot reach the MLflow store ({one_line(exc)}); "
            "start the server or fix tracking.uri"
        ) from None


@contextlib.contextmanager
def _quiet_store_creation():
    """Hide MLflow's "Creating initial MLflow database tables..." lines: the check may create an empty
    SQLite store, and a refusal that follows must still be the only line on stderr."""
    logger = logging.getLogger("mlflow.store.db.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_tracking_uri(uri: str) -> None:
    """Refuse a tracking URI MLflow cannot use, naming the supported schemes (MLflow's own errors speak
    of the model registry or the file store's maintenance mode)."""
    scheme = urllib.parse.urlparse(uri).scheme.lower().split("+")[0]  # postgresql+psycopg2 is postgresql
    hint = "use sqlite:///path/to/mlflow.db (a local file) or http(s)://host:port (an MLflow server)"
    if uri == "databricks" or scheme in TRACKING_SCHEMES:
        if scheme == "sqlite":
            _check_sqlite_uri(uri, hint)
        return
    if scheme in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
            return
        raise UserError(
            f"tracking URI {redact(uri)!r} is a folder (MLflow's file store), which MLflow 3 no longer "
            f"accepts; {hint}"
        )
    raise UserError(
        f"tracking URI {redact(uri)!r}: unsupported scheme '{scheme}'; {hint} "
        f"(MLflow also takes postgresql://, mysql://, mssql:// and databricks)"
    )


def _check_sqlite_uri(uri: str, hint: str) -> None:
    """A SQLite store needs a file path whose folder exists (SQLAlchemy's own error is a page of text)."""
    path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        raise UserError(f"tracking URI {uri!r} names no file: an in-memory store loses every run; {hint}")
    folder = Path(resolve_tracking_uri(uri)[len("sqlite:///") :]).parent
    if not folder.is_dir():
        raise UserError(
            f"tracking URI {uri!r}: folder {folder} does not exist; create it or point the URI elsewhere"
        )


def one_line(exc: Exception) -> str:
    """An exception as one short line: the OS error under MLflow's HTTP wrapping when there is one
    (e.g. "Connection refused"), else its type and the start of its message."""
    text = " ".join(str(exc).split())
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(r"(Read timed out|timed out)", text)
    return found.group(1).strip() if found else f"{type(exc).__name__}: {text[:200]}"
