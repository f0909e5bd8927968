"""Which failures a stage is retried for: transient ones (network, tracking server, object storage) only.

A bad config or bad data fails at once: retrying it would only repeat the error.
"""

from __future__ import annotations

_TRANSIENT_NAMES = {"ConnectionError", "TimeoutError", "TransportError", "TimeoutException",
                    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ServiceUnavailable", "GetTimeoutError"}
# A database error is transient when the database was busy or away, not when the query was wrong.
_TRANSIENT_DB_WORDS = ("locked", "timeout", "timed out", "connection", "could not connect", "server closed")
_TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
_TRANSIENT_S3_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                       "ThrottlingException", "RequestTimeTooSkewed", "500", "502", "503", "504"}


def is_transient(exc: BaseException | None) -> bool:
    """A network, tracking-server or object-storage hiccup, anywhere in the exception's chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {c.__name__ for c in type(exc).__mro__}
        if names & _TRANSIENT_NAMES:
            return True
        if "OperationalError" in names and any(w in str(exc).lower() for w in _TRANSIENT_DB_WORDS):
            return True
        if "MlflowException" in names:
            code = str(getattr(exc, "error_code", ""))
            if (code in _TRANSIENT_MLFLOW_CODES or ("RestException" in names and code == "INTERNAL_ERROR")
                    or "Max retries exceeded" in str(exc)):  # a 5xx of the server; the REST client giving up
                return True
        if "ClientError" in names:  # botocore
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in _TRANSIENT_S3_CODES:
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry a failed stage only for a transient error."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return is_transient(exc if isinstance(exc, BaseException) else None)
