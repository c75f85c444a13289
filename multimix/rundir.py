"""A run directory (``<run.storage_path>/<run.name>``, a folder or ``s3://``) and its rules: one
writer at a time, a rerun resumes only the same experiment, and a checkpoint is whole or absent.

**One writer** (:class:`Lease`): ``train`` and ``tune`` hold ``lease.json`` in the directory
while they run: the holder's host, pid, command, start time and a refresh time it rewrites every
:data:`REFRESH_S` seconds. A second command into the same directory is refused with one line
naming the holder. A lease is *stale*, and taken over with a line saying so, when its process is
gone (same host, pid not running) or when it has not been refreshed for :data:`STALE_S`
seconds (another host: a crashed driver). The writes are conditional, so of two commands that
start together one wins: S3's ``If-None-Match``/``If-Match`` on PutObject, an ``flock`` on a
local disk (:func:`multimix.data.storage.write_if`). A search's lease sits beside its folder
(:func:`beside`): Tune uploads that folder again from its local copy when it restores. A Tune
trial's Train run holds no lease of its own: the search's lease covers its trial directories,
and a restarted trial must be able to take its directory over at once.

**The same experiment** (:func:`check_same_experiment`): a rerun compares the stored
``config.json`` with the new configuration; any difference but the schedule's length
(``optim.epochs``) and operational settings (:data:`OPERATIONAL`) is refused with one line
listing the keys; ``--restart`` deletes the old run first (:func:`clear`), saying what it
deletes.

**Whole checkpoints** (:func:`remove_incomplete_checkpoints`): Ray Train copies each checkpoint
folder into the run directory itself, so a full disk or a lost S3 endpoint during that copy can
leave a truncated ``checkpoint.pt``. ``last.json``, written after Ray has persisted the
checkpoint it names, marks what is complete; any checkpoint folder after it is verified
(:func:`multimix.checkpoint.load_bytes`: the file's sha256s) and removed when it does not load,
both when a run fails and before a rerun starts. The folder ``best.json`` names is never touched.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Optional

import pyarrow.fs as pafs

from multimix.config import Config
from multimix.data import storage
from multimix.errors import UserError

__all__ = ["LEASE", "OPERATIONAL", "Lease", "RunDirBusy", "check_same_experiment", "clear",
           "has_run", "remove_incomplete_checkpoints"]

#: the lease file in the run directory
LEASE = "lease.json"
#: seconds between two refreshes of a held lease
REFRESH_S = 15.0
#: a lease not refreshed for this long is stale (its holder is taken for dead)
STALE_S = 120.0

#: config keys that may differ between a run and its resumption: the schedule's length and
#: settings that change how, where or how fast it runs, not what it learns
OPERATIONAL = ("optim.epochs", "scaling.", "storage.", "run.name", "run.storage_path",
               "run.log_every", "data.readahead_mb", "data.max_labeled_mb", "data.eval_batch",
               "optim.compile", "optim.channels_last")

#: files of a run (besides the checkpoint folders) that show it has trained
_RUN_FILES = ("history.json", "last.json", "best.json")


def beside(run_dir: str) -> str:
    """``<parent>/.<name>.lease.json``: the lease of a directory kept next to it, for Tune's
    experiment folder, which Tune uploads again from its local copy when it restores a search
    (a lease inside would be overwritten by the stale copy)."""
    parent, _, name = run_dir.rstrip("/").rpartition("/")
    return storage.join(parent or ".", f".{name}.lease.json")


class RunDirBusy(UserError):
    """Another command is writing into the run directory."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class Lease:
    """The run directory's lease (module docstring). Use as a context manager, or
    :meth:`acquire` / :meth:`release`; a daemon thread refreshes it while held.

    Args:
        run_dir: the run directory (folder or ``s3://``).
        command: what holds it, for the refusal message (``"multimix train"``).
        out: where the takeover line is printed (default stdout).
        uri: the lease file (default ``<run_dir>/lease.json``; :func:`beside` for a folder
            that another program rewrites from a copy of its own).
    """

    def __init__(self, run_dir: str, storage_cfg=None, command: str = "multimix",
                 out=None, refresh_s: float = REFRESH_S, stale_s: float = STALE_S,
                 uri: Optional[str] = None):
        self.run_dir, self.storage, self.command = run_dir, storage_cfg, command
        self.uri = uri or storage.join(run_dir, LEASE)
        self.out = out or sys.stdout
        self.refresh_s, self.stale_s = refresh_s, stale_s
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.started = _now()
        self.version: Optional[str] = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- the record

    def _record(self) -> bytes:
        return json.dumps({"host": self.host, "pid": self.pid, "command": self.command,
                           "started": _iso(self.started), "refreshed": _now(),
                           "token": self.token}, indent=1).encode()

    def stale_reason(self, held: dict) -> Optional[str]:
        """Why the lease ``held`` is stale, or None while its holder is alive."""
        age = _now() - float(held.get("refreshed", 0))
        if held.get("host") == self.host:
            pid = int(held.get("pid", -1))
            if pid > 0 and not _pid_alive(pid):
                return f"its process {pid} on {self.host} is gone"
        if age > self.stale_s:
            return f"not refreshed for {age:.0f} s"
        return None

    def _describe(self, held: dict) -> str:
        age = _now() - float(held.get("refreshed", 0))
        return (f"{held.get('command', 'a run')} (host {held.get('host')}, pid {held.get('pid')}, "
                f"since {held.get('started')}; refreshed {max(age, 0):.0f} s ago)")

    # -- acquire / refresh / release

    def acquire(self) -> "Lease":
        """Take the lease, or take over a stale one (a line says so).

        Raises:
            RunDirBusy: a live holder; the message names it.
            StorageError: the directory cannot be written.
        """
        for _ in range(5):
            if storage.write_if(self.uri, self._record(), self.storage):
                self._after_write()
                return self
            got = storage.read_versioned(self.uri, self.storage)
            if got is None:  # released in between: try again
                continue
            raw, version = got
            try:
                held = json.loads(raw)
            except ValueError:
                held = {}
            if held.get("token") == self.token:  # our own write (a retried request)
                self.version = version
                self._after_write()
                return self
            reason = self.stale_reason(held) if held else "unreadable"
            if reason is None:
                raise RunDirBusy(
                    f"{self.run_dir} is being written by {self._describe(held)}: wait for it "
                    "to finish, stop it, or choose another --set run.name=...")
            if storage.write_if(self.uri, self._record(), self.storage, version=version):
                print(f"[multimix] took over the stale lease of {self.run_dir} "
                      f"({reason}; it was held by {self._describe(held)})",
                      file=self.out, flush=True)
                self._after_write()
                return self
        raise RunDirBusy(f"{self.run_dir}: could not take its lease ({self.uri} keeps changing)")

    def _after_write(self) -> None:
        got = storage.read_versioned(self.uri, self.storage)
        self.version = got[1] if got is not None else None
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, name="multimix-lease",
                                        daemon=True)
        self._thread.start()

    def refresh(self) -> bool:
        """Rewrite the refresh time; False (and :attr:`lost`) when another process has taken
        the lease over meanwhile."""
        if self.version is None or self.lost:
            return False
        if storage.write_if(self.uri, self._record(), self.storage, version=self.version):
            got = storage.read_versioned(self.uri, self.storage)
            self.version = got[1] if got is not None else None
            return True
        self.lost = True
        print(f"[multimix] warning: the lease of {self.run_dir} was taken over by another "
              "process; this run is no longer the only writer", file=sys.stderr, flush=True)
        return False

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                if not self.refresh():
                    return
            except Exception:  # noqa: BLE001 - storage hiccup: try again at the next tick
                continue

    def release(self) -> None:
        """Stop refreshing and delete the lease (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.version is not None and not self.lost:
            try:
                storage.remove_if(self.uri, self.storage, version=self.version)
            except Exception:  # noqa: BLE001 - a stale lease is taken over by the next run
                pass
        self.version = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# the same experiment


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _operational(key: str) -> bool:
    return any(key == o or (o.endswith(".") and key.startswith(o)) for o in OPERATIONAL)


def _checkpoint_dirs(run_dir: str, storage_cfg) -> list[str]:
    fs, root = storage.resolve(run_dir, storage_cfg)
    with storage.storage_errors(run_dir, storage_cfg):
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(os.path.basename(i.path.rstrip("/")) for i in infos
                  if i.type == pafs.FileType.Directory
                  and os.path.basename(i.path.rstrip("/")).startswith("checkpoint_epoch-"))


def has_run(run_dir: str, storage_cfg=None) -> bool:
    """Whether ``run_dir`` holds a run that has trained (a checkpoint or its history)."""
    if any(storage.exists(storage.join(run_dir, f), storage_cfg) for f in _RUN_FILES):
        return True
    return bool(_checkpoint_dirs(run_dir, storage_cfg))


def config_differences(stored: dict, cfg: Config) -> list[str]:
    """``["key: old -> new", ...]`` over the keys that make another experiment."""
    new = _flat(cfg.to_dict(include_secrets=False))
    old = _flat(stored)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if not _operational(k) and old.get(k) != new.get(k)]


def check_same_experiment(run_dir: str, cfg: Config) -> None:
    """A rerun into ``run_dir`` must be the same experiment as the run it holds.

    Raises:
        UserError: the keys that differ (one line).
    """
    uri = storage.join(run_dir, "config.json")
    if not storage.exists(uri, cfg.storage) or not has_run(run_dir, cfg.storage):
        return
    stored = json.loads(storage.read_bytes(uri, cfg.storage))
    diff = config_differences(stored, cfg)
    if diff:
        keys = ", ".join(d.split(":")[0] for d in diff)
        raise UserError(
            f"{run_dir} holds a run of another experiment ({keys} differ: "
            f"{'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}): rerun with the same "
            "settings to resume it, add --restart to delete it and start over, or choose "
            "another --set run.name=...")


def clear(run_dir: str, storage_cfg=None, out=None) -> list[str]:
    """Delete everything in ``run_dir`` but its lease (``--restart``), after printing what;
    returns the deleted names."""
    out = out or sys.stdout
    fs, root = storage.resolve(run_dir, storage_cfg)
    with storage.storage_errors(run_dir, storage_cfg):
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    names = sorted(os.path.basename(i.path.rstrip("/")) for i in infos)
    names = [n for n in names if n not in (LEASE, f".{LEASE}.lock")]
    if not names:
        return []
    ckpts = [n for n in names if n.startswith("checkpoint_epoch-")]
    epochs = ""
    if "history.json" in names:
        try:
            epochs = f", the history of {len(json.loads(storage.read_bytes(storage.join(run_dir, 'history.json'), storage_cfg)))} epoch(s)"  # noqa: E501
        except Exception:  # noqa: BLE001 - unreadable history: deleted all the same
            epochs = ""
    print(f"[multimix] --restart: deleting the run in {run_dir} ({len(ckpts)} checkpoint(s)"
          f"{epochs}, {len(names)} entries: {', '.join(names[:6])}"
          f"{', ...' if len(names) > 6 else ''})", file=out, flush=True)
    with storage.storage_errors(run_dir, storage_cfg):
        for info in infos:
            name = os.path.basename(info.path.rstrip("/"))
            if name not in names:
                continue
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)
            else:
                fs.delete_file(info.path)
    return names


# ---------------------------------------------------------------------------------------------
# whole checkpoints


def _read_json(run_dir: str, name: str, storage_cfg) -> Optional[dict]:
    uri = storage.join(run_dir, name)
    try:
        if not storage.exists(uri, storage_cfg):
            return None
        return json.loads(storage.read_bytes(uri, storage_cfg))
    except (ValueError, UserError):
        return None


def remove_incomplete_checkpoints(run_dir: str, storage_cfg=None, out=None) -> list[str]:
    """Remove the checkpoint folders after the one ``last.json`` names whose ``checkpoint.pt``
    is missing or does not load (module docstring); returns their names. Best effort: a
    storage that cannot be reached leaves them to the next run's check."""
    out = out or sys.stdout
    try:
        names = _checkpoint_dirs(run_dir, storage_cfg)
    except UserError:
        return []
    last = _read_json(run_dir, "last.json", storage_cfg) or {}
    best = _read_json(run_dir, "best.json", storage_cfg) or {}
    confirmed = last.get("checkpoint")
    names = [n for n in names
             if n != best.get("checkpoint") and (confirmed is None or n > confirmed)]
    if not names:
        return []
    from multimix import checkpoint  # torch (1.6 s): only when there is a folder to verify

    removed = []
    for name in names:
        uri = storage.join(run_dir, name, checkpoint.FILENAME)
        try:
            checkpoint.load_bytes(storage.read_bytes(uri, storage_cfg), name=uri)
            continue  # whole: Ray persisted it but the run stopped before last.json
        except UserError as exc:
            why = str(exc).split(": ", 1)[-1] if ": " in str(exc) else str(exc)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is incomplete
            why = f"{type(exc).__name__}: {exc}"
        try:
            storage.delete_dir(storage.join(run_dir, name), storage_cfg)
        except UserError:
            continue
        removed.append(name)
        print(f"[multimix] removed the incomplete checkpoint {storage.join(run_dir, name)} "
              f"({why[:120]})", file=out, flush=True)
    return removed
