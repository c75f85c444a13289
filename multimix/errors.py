"""Errors that mean "the user's input is wrong". The CLI prints them as one line (exit code 2);
a :class:`RunFailed` (a run that failed inside Ray) also as one line."""


class UserError(Exception):
    """Bad input from the user: a file, a URI, a flag, a value. The message names it."""


class DataError(UserError):
    """A dataset, file or row cannot be used (unreadable image, missing manifest, bad layout)."""


class StorageError(UserError):
    """Object storage refused or cannot find something (credentials, bucket, endpoint)."""


class RunFailed(Exception):
    """A run that failed inside Ray (a Train worker, the controller, a Tune trial): the message
    is one line (the root cause's, and where the full traceback was written); ``root`` is the
    root cause (:func:`root_cause`), ``log_path`` the traceback file. The CLI prints the
    message alone and exits 2 when ``root`` is a :class:`UserError`, else 1."""

    def __init__(self, message: str, root: BaseException | None = None,
                 log_path: str | None = None):
        super().__init__(message)
        self.root, self.log_path = root, log_path

    def __reduce__(self):
        return (self.__class__, (str(self), self.root, self.log_path))


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc``'s root cause is the user's input (a :class:`UserError`, also behind a
    :class:`RunFailed`)."""
    root = root_cause(exc)
    if isinstance(root, RunFailed):
        return isinstance(root.root, UserError)
    return isinstance(root, UserError)


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
            if isinstance(exc, (UserError, RunFailed)):
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
    if isinstance(root, (UserError, RunFailed)):
        return msg or type(root).__name__
    return f"{type(root).__name__}: {msg}" if msg else type(root).__name__
