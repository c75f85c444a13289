"""Experiment tracking of a run: TensorBoard event files, ``learning_curves.png`` and, as an
option, MLflow.

- **TensorBoard** (``run.tensorboard``, default on): rank 0 of every ``multimix train`` run
  writes each epoch's numeric metrics (``train/*``, ``val/*``, ``run/*`` tags, step = epoch,
  1-based) with ``tensorboardX`` (the writer Ray Tune's own ``TBXLoggerCallback`` uses, installed
  with ``ray[train]``) into a local folder and copies the event file into
  ``<run dir>/tensorboard/`` through the run's filesystem after every epoch, so
  ``tensorboard --logdir <run dir>`` shows the curves for a local or an ``s3://`` run directory
  (TensorBoard reads ``s3://`` itself). A resumed run adds a second event file; TensorBoard
  reads them as one. A ``multimix tune`` trial leaves this to Tune's ``TBXLoggerCallback``
  (on by default in Tune), which writes each trial's reported metrics into
  ``<experiment>/<trial id>/``: ``tensorboard --logdir <experiment>`` shows every trial.
- **learning_curves.png** in every run directory (tune trials' too), redrawn after each
  epoch (:func:`multimix.plots.plot_run_curves`).
- **MLflow** (``run.mlflow``, off by default; the ``mlflow`` extra: ``pip install
  'multimix[mlflow]'``), to ``run.mlflow_uri`` (default: ``mlruns/`` in the directory the
  command is started from), through Ray's own integrations: a ``train`` run logs from its
  rank-0 worker through :func:`ray.air.integrations.mlflow.setup_mlflow` (one MLflow run per
  run directory, tagged ``multimix.run_dir``; a resumed run continues it): the config as
  params, every epoch's metrics; ``--evaluate`` adds the best checkpoint's evaluation
  (``eval.<set>.<metric>``) and ``report.md``. ``tune`` adds
  :class:`ray.air.integrations.mlflow.MLflowLoggerCallback` (one MLflow run per trial, tagged
  ``trial_name``: the searched values as params, every reported epoch as metrics; ``--evaluate``
  adds the best trial's evaluation to its run). The MLflow experiment is ``run.name``. A local
  ``mlruns/`` is MLflow's file store, which MLflow 3 serves only with
  ``MLFLOW_ALLOW_FILE_STORE=true``: set here for ``file:`` URIs.

Tracking never stops training: a failure to write an event file, a figure or an MLflow record
is logged once (a warning line) and that tracker is switched off for the run.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import tempfile
import uuid
from pathlib import Path

from multimix.data import storage
from multimix.errors import UserError

__all__ = ["TENSORBOARD_DIR", "CURVES", "check", "mlflow_uri", "run_key", "tag", "RunTracker",
           "tune_callbacks", "log_evaluation", "read_scalars"]

logger = logging.getLogger("multimix.tracking")

#: the folder of a run directory that holds its TensorBoard event files
TENSORBOARD_DIR = "tensorboard"
#: the learning-curve figure of a run directory
CURVES = "learning_curves.png"
#: the MLflow tag naming a train run's directory (finds its MLflow run again)
RUN_DIR_TAG = "multimix.run_dir"
#: the extra that installs MLflow
EXTRA = "pip install 'multimix[mlflow]'"


def check(cfg) -> None:
    """Before Ray starts (on the driver): with ``run.mlflow`` on, MLflow must be importable,
    and ``run.mlflow_uri`` is made absolute (workers and trials run elsewhere).

    Raises:
        UserError: ``run.mlflow: ... install ...`` when mlflow is missing.
    """
    if not cfg.run.mlflow:
        return
    if importlib.util.find_spec("mlflow") is None:
        raise UserError(f"run.mlflow: MLflow is not installed; {EXTRA} (or set "
                        "run.mlflow=false)")
    cfg.run.mlflow_uri = mlflow_uri(cfg.run.mlflow_uri)


def mlflow_uri(value: str) -> str:
    """The tracking URI of ``run.mlflow_uri``: ``""`` → ``file:<cwd>/mlruns``; a local path
    → ``file:<absolute path>``; a URI with a scheme (``file:``, ``sqlite:``, ``http(s)://``,
    ``databricks``) as it is."""
    if not value:
        value = "mlruns"
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value) and not re.match(r"^[A-Za-z]:\\", value):
        return value
    return "file:" + os.path.abspath(os.path.expanduser(value))


def run_key(run_dir: str, storage_cfg=None) -> str:
    """How MLflow names a train run (tag ``multimix.run_dir``): its path on its filesystem
    (absolute local path, or ``bucket/prefix/name``), the same on the driver and in a worker."""
    return storage.resolve(run_dir, storage.chain_storage(storage_cfg))[1].rstrip("/")


def _allow_file_store(uri: str) -> None:
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def tag(key: str) -> str:
    """The TensorBoard tag of a history key: ``train_loss`` → ``train/loss``,
    ``val_cls_auc`` → ``val/cls_auc``, anything else ``run/<key>``."""
    for prefix in ("train_", "val_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return f"run/{key}"


def _numbers(metrics: dict, finite: bool = False) -> dict:
    out = {}
    for k, v in metrics.items():
        if k == "epoch" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if finite and not math.isfinite(v):
            continue
        out[k] = float(v)
    return out


def _params(cfg) -> dict:
    """The config (no secrets) as flat ``section.key`` params."""
    return {f"{sec}.{k}": ("" if v is None else str(v))
            for sec, d in cfg.to_dict(include_secrets=False).items() for k, v in d.items()}


class RunTracker:
    """Rank 0's trackers of one ``train`` run: call :meth:`epoch` with the history after each
    epoch's checkpoint, :meth:`close` at the end. Other ranks get an inert tracker.

    Args:
        cfg: the run's :class:`~multimix.config.Config`.
        fs, root: the run directory on its filesystem (``storage_ctx.storage_filesystem``,
            ``storage_ctx.experiment_fs_path`` in a Train worker); ``root`` names the run in
            MLflow (:func:`run_key`).
    """

    def __init__(self, cfg, fs, root: str, rank: int = 0) -> None:
        self.cfg, self.fs, self.root = cfg, fs, root.rstrip("/")
        self.run_dir = self.root
        self.active = rank == 0
        self._tmp = tempfile.TemporaryDirectory(prefix="multimix-track-") if self.active else None
        self._writer = None
        self._tensorboard = self.active and cfg.run.tensorboard
        self._curves = self.active
        self._mlflow = None
        if self.active and cfg.run.mlflow:
            self._guard("MLflow", self._start_mlflow)

    # ---- each tracker; a failure switches that one off

    def _guard(self, what: str, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception as exc:  # noqa: BLE001 - tracking never stops a run
            logger.warning("multimix: %s tracking off for this run: %s: %s", what,
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return False

    def _start_mlflow(self) -> None:
        from mlflow.tracking import MlflowClient
        from ray.air.integrations.mlflow import setup_mlflow

        uri = mlflow_uri(self.cfg.run.mlflow_uri)
        _allow_file_store(uri)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(self.cfg.run.name)
        if exp is not None:  # a resumed run continues its MLflow run
            run_id = find_run(client, exp.experiment_id, {RUN_DIR_TAG: self.run_dir})
            if run_id:
                os.environ["MLFLOW_RUN_ID"] = run_id
        self._mlflow = setup_mlflow(
            _params(self.cfg), tracking_uri=uri, experiment_name=self.cfg.run.name,
            run_name=self.cfg.run.name, tags={RUN_DIR_TAG: self.run_dir},
            create_experiment_if_not_exists=True)

    def _write_tensorboard(self, metrics: dict, step: int) -> None:
        import time

        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        if self._writer is None:  # synchronous (SummaryWriter's thread may not have written)
            # the name has the second it was made in: a random part keeps two writers of one
            # run directory (a resume, in the same process, the same second) off one file
            self._writer = EventsWriter(f"{self._tmp.name}/events",
                                        f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
        values = [Summary.Value(tag=tag(k), simple_value=v) for k, v in _numbers(metrics).items()]
        self._writer.write_event(Event(wall_time=time.time(), step=step,
                                       summary=Summary(value=values)))
        self._writer.flush()
        for f in sorted(Path(self._tmp.name).iterdir()):
            if "tfevents" in f.name:
                storage.write_file(self.fs, f"{self.root}/{TENSORBOARD_DIR}/{f.name}",
                                   f.read_bytes())

    def _write_curves(self, history: list) -> None:
        from multimix import plots

        local = Path(self._tmp.name) / CURVES
        plots.plot_run_curves(history, local, title=f"{self.cfg.run.name}: learning curves")
        storage.write_file(self.fs, f"{self.root}/{CURVES}", local.read_bytes())

    def _log_mlflow(self, metrics: dict, step: int) -> None:
        self._mlflow.log_metrics(_numbers(metrics, finite=True), step=step)

    # ---- the hooks

    def epoch(self, history: list) -> None:
        """After an epoch (rank 0): its metrics (``history[-1]``) to TensorBoard and MLflow,
        and the learning curves redrawn."""
        if not self.active or not history:
            return
        metrics = history[-1]
        step = int(metrics.get("epoch", len(history) - 1)) + 1
        if self._tensorboard:
            self._tensorboard = self._guard("TensorBoard", self._write_tensorboard, metrics,
                                            step)
        if self._curves:
            self._curves = self._guard("learning-curve", self._write_curves, history)
        if self._mlflow is not None and not self._guard("MLflow", self._log_mlflow, metrics,
                                                        step):
            self._mlflow = None

    def close(self) -> None:
        if self._writer is not None:
            self._guard("TensorBoard", self._writer.close)
        if self._mlflow is not None:
            self._guard("MLflow", self._mlflow.end_run)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def find_run(client, experiment_id: str, tags: dict) -> str | None:
    """The id of the experiment's MLflow run with these tag values (the first found), or
    None: how a resumed train run, a restored Tune trial and an evaluation find their run."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=where, max_results=1)
    return runs[0].info.run_id if runs else None


def tune_callbacks(cfg, exp_uri: str) -> list:
    """The Tune callbacks of ``cfg``'s tracking: Ray's ``MLflowLoggerCallback`` with
    ``run.mlflow`` (one MLflow run per trial, experiment ``run.name``), else none (Tune adds
    its ``TBXLoggerCallback`` itself)."""
    if not cfg.run.mlflow:
        return []
    check(cfg)
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = mlflow_uri(cfg.run.mlflow_uri)
    _allow_file_store(uri)

    class ResumingMLflowLoggerCallback(MLflowLoggerCallback):
        """A trial of a restored search logs into the MLflow run its first driver opened (found
        by the trial's name and the experiment's URI), not into a second run of the same
        name; Tune's callback keeps its trial → run map in the driver's memory only."""

        def log_trial_start(self, trial):
            if trial not in self._trial_runs:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(uri)
                run_id = find_run(client, self.mlflow_util.experiment_id,
                                  {"trial_name": str(trial), "multimix.experiment": exp_uri})
                if run_id:
                    self._trial_runs[trial] = run_id
                    client.update_run(run_id, status="RUNNING")
            super().log_trial_start(trial)

    return [ResumingMLflowLoggerCallback(tracking_uri=uri, experiment_name=cfg.run.name,
                                         tags={"multimix.experiment": exp_uri})]


def _eval_metrics(report: dict) -> dict:
    """``eval.<set>.<metric>`` of an evaluation's sets (numbers only; set names made MLflow
    safe)."""
    out = {}
    for task, sets in report.get("sets", {}).items():
        for name, m in sets.items():
            safe = re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", str(name))
            out.update({f"eval.{task}.{safe}.{k}": v
                        for k, v in _numbers(m, finite=True).items()})
    return out


def log_evaluation(cfg, report: dict, *, run_dir: str | None = None,
                   trial: str | None = None) -> str | None:
    """The best checkpoint's evaluation (:func:`multimix.evaluate.evaluate_checkpoint`'s
    return) into the MLflow run of a train run directory (``run_dir``) or of a Tune trial
    (``trial``): its numbers as ``eval.<task>.<set>.<metric>`` and ``report.md`` as an
    artifact. Returns the MLflow run id, or None (``run.mlflow`` off, or no such run)."""
    if not cfg.run.mlflow:
        return None
    from mlflow.tracking import MlflowClient

    uri = mlflow_uri(cfg.run.mlflow_uri)
    _allow_file_store(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.run.name)
    if exp is None:
        return None
    run_id = find_run(client, exp.experiment_id,
                      {RUN_DIR_TAG: run_key(run_dir, cfg.storage)} if run_dir is not None
                      else {"trial_name": trial})
    if not run_id:
        return None
    for k, v in _eval_metrics(report).items():
        client.log_metric(run_id, k, v)
    if report.get("markdown_text"):
        client.log_text(run_id, report["markdown_text"], "evaluation/report.md")
    return run_id


def read_scalars(folder) -> dict:
    """``{tag: [(step, value), ...]}`` of every TensorBoard event file in a local ``folder``
    (files in name order, records in file order): what TensorBoard shows of a run directory's
    ``tensorboard/``."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict = {}
    for f in sorted(Path(folder).iterdir()):
        if "tfevents" not in f.name:
            continue
        data, at = f.read_bytes(), 0
        while at + 12 <= len(data):  # length (8), its crc (4), record, its crc (4)
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out
