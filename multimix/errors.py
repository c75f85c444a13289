"""Errors that mean "the user's input is wrong". The CLI prints them as one line (exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a file, a URI, a flag, a value. The message names it."""


class DataError(UserError):
    """A dataset, file or row cannot be used (unreadable image, missing manifest, bad layout)."""


class StorageError(UserError):
    """Object storage refused or cannot find something (credentials, bucket, endpoint)."""


def root_cause(exc: BaseException) -> BaseException:
    """The error behind Ray's wrappers: a Train ``WorkerGroupError`` (lowest failing rank),
    ``ControllerError``, a ``RayTaskError``/``RayActorError`` (``.cause``), a Tune trial error,
    and plain ``raise ... from`` chains. Duck-typed, so this module never imports ``ray``."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            exc = failures[min(failures)]
            continue
        for attr in ("controller_failure", "cause"):
            nxt = getattr(exc, attr, None)
            if isinstance(nxt, BaseException):
                exc = nxt
                break
        else:
            if isinstance(exc, UserError):
                return exc
            nxt = exc.__cause__
            if nxt is None or not _is_wrapper(exc):
                return exc
            exc = nxt
    return exc


def _is_wrapper(exc: BaseException) -> bool:
    """Ray's and our own wrappers (walk on to ``__cause__``); anything else is the root."""
    mod = type(exc).__module__ or ""
    return mod.startswith("ray.") or mod == "ray"


def one_line(exc: BaseException) -> str:
    """``exc``'s root cause as one line: a UserError's message, else ``Type: first line``."""
    root = root_cause(exc)
    lines = [ln.strip() for ln in str(root).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    if isinstance(root, UserError):
        return msg or type(root).__name__
    return f"{type(root).__name__}: {msg}" if msg else type(root).__name__
