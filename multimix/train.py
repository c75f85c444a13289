"""``multimix train``: distributed MultiMix training with Ray Train (DDP; gloo on CPU, nccl on GPU).

The driver resolves the splits, builds the Ray Data streams and the small in-memory pools, and
starts a :class:`ray.train.torch.TorchTrainer`. Each worker runs :func:`train_loop_per_worker`:
the pure-torch :func:`multimix.engine.train_step` over the batches of
:class:`multimix.data.batches.TrainBatches`, then validation on the held-out labeled data of both
tasks (:func:`multimix.validate.validate`, the path ``multimix evaluate`` scores with; metrics
gathered over workers), then one checkpoint written by rank 0 while every rank reports.

Run layout (``<run.storage_path>/<run.name>/``, a directory or ``s3://``)::

    checkpoint_epoch-0003/checkpoint.pt   Ray-managed: the best (by run.checkpoint_metric) and
    checkpoint_epoch-0004/checkpoint.pt   the latest are kept
    history.json    one metrics dict per finished epoch (no gaps after a resume or a restart)
    best.json       {"checkpoint": "checkpoint_epoch-0003", "epoch": 3, "metric": ..., "value": ...}
    last.json       the same for the latest epoch
    config.json     the run's configuration (secrets never written)

Re-running the same command resumes from the latest checkpoint; a worker that dies is restarted
(``scaling.max_failures``) and training goes on from the latest checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multimix import evaluate, progress, resources, rundir, tracking
from multimix.config import Config, add_config_arguments, load_config
from multimix.data import pipeline, storage
from multimix.data.batches import TrainBatches, open_streams
from multimix.data.pipeline import skipped_counts
from multimix.data.splits import split_record
from multimix.data.state import skipped_rows
from multimix.data.storage import write_file
from multimix.errors import RunFailed, UserError, one_line, root_cause
from multimix.metrics import collective_device, val_score_balanced, validation_cls_metrics
from multimix.preflight import check_inputs
from multimix.validate import validate
from multimix.variants import images_per_step

#: Test hook: ``rank:epoch:step:marker_path`` makes that worker SIGKILL itself once (the marker file
#: records that it happened), to exercise fault tolerance. Forwarded to the workers' environment.
FAULT_ENV = "MULTIMIX_FAULT_INJECT"

#: metrics shown in the one-line epoch summary (every metric is in history.json)
SUMMARY_KEYS = ("train_loss", "train_ce_sup", "train_ce_pseudo", "train_dice", "train_kl",
                "train_accept_rate", "val_cls_accuracy", "val_cls_auc", "val_cls_f1_pneumonia",
                "val_seg_dice_mean", "val_seg_hausdorff_mean", "val_score",
                "val_cls_balanced_accuracy", "val_cls_pred_classes", "val_score_balanced",
                "img_per_s")


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(p) -> None:
    add_config_arguments(p, "paper")
    p.add_argument("--evaluate", action="store_true",
                   help="after training, evaluate the best checkpoint on the validation ids and "
                        "write the report into the run directory")
    add_run_arguments(p)


def add_run_arguments(p) -> None:
    """``--restart`` and ``--verbose``: what ``train``, ``tune`` and ``demo`` share."""
    p.add_argument("--restart", action="store_true",
                   help="delete the run in the run directory (saying what) and start over; "
                        "without it a rerun resumes, and only the same experiment")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Ray's own log lines (Ray Train, Ray Data, the token notice)")


#: set by --verbose; read by every process of the run (Ray's processes inherit it)
VERBOSE_ENV = "MULTIMIX_VERBOSE"


def verbose() -> bool:
    """Whether Ray's own log lines are shown (``--verbose``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def run(args) -> int:
    cfg = load_config(args.config, args.set)
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"
    result = train(cfg, restart=getattr(args, "restart", False))
    print(finished_lines(result, cfg))
    if args.evaluate:
        report = evaluate.evaluate_run(result, cfg)
        print(f"evaluation report: {report['markdown']}")
    return 0


#: files of a run directory named at the end of a run, when they are there
_RESULT_FILES = (("learning curves", "learning_curves.png"), ("TensorBoard logs", "tensorboard"),
                 ("history", "history.json"))


def finished_lines(result: "TrainResult", cfg: Config) -> str:
    """What the end of ``train`` prints: where the run, its best checkpoint, its curves and its
    TensorBoard logs are."""
    lines = [f"training finished: {result.epochs} epochs; run directory: {result.run_dir}",
             f"best checkpoint: {result.best_checkpoint}  ({cfg.run.checkpoint_metric} = "
             f"{result.best_value:.4f})"]
    for what, name in _RESULT_FILES:
        uri = storage.join(result.run_dir, name)
        try:
            there = storage.exists(uri, cfg.storage)
        except UserError:
            there = False
        if there:
            extra = f"  (tensorboard --logdir {uri})" if name == "tensorboard" else ""
            lines.append(f"{what}: {uri}{extra}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# driver


@dataclass
class TrainResult:
    run_dir: str
    epochs: int
    history: list[dict]
    best_checkpoint: str | None
    last_checkpoint: str | None
    best_value: float


@dataclass(frozen=True)
class WorkerInputs:
    """What the driver hands every Train worker (``train_loop_config={"inputs": ...}``).

    ``config``: ``Config.to_dict()`` without secrets (workers rebuild the typed config);
    ``splits``: ``{"cls"|"seg": split record}`` (:func:`multimix.data.splits.split_record`: the
    split file beside the data and the sha256 of its ids; stored in the checkpoints);
    ``classes``: class names in label order; ``pools``: object ref of
    ``{"cls_labeled", "seg_labeled"} → LabeledPool`` and ``{"cls_val", "seg_val"} →
    StreamedPool`` (validation rows read per row group when scored); ``state``: the
    pipeline's state actor; ``datasets``: names of the Train datasets this worker reads
    (``ray.train.get_dataset_shard``); ``steps``: global steps per epoch; ``extra``: what a
    replacement loop needs besides (``multimix bench train``).
    """

    config: dict
    splits: dict
    classes: list
    pools: Any
    state: Any
    datasets: tuple
    steps: int
    extra: dict = field(default_factory=dict)
    #: the run's progress actor (:func:`multimix.progress.create_board`), or None
    board: Any = None


def prepare_inputs(cfg: Config, checked=None):
    """Driver-side work before the trainer starts (splits, pools, streams):
    :func:`multimix.data.pipeline.build_data` (``checked``: the run's
    :class:`~multimix.preflight.Preflight`; checked here when not given)."""
    if checked is None:
        checked = check_inputs(cfg, storage=False)
    return pipeline.build_data(cfg, checked)


def build_trainer(cfg: Config, inputs, callbacks: list | None = None, loop=None,
                  extra: dict | None = None, board=None):
    """The :class:`TorchTrainer` for ``cfg`` and the driver's
    :class:`~multimix.data.pipeline.DataInputs` (exposed so Ray Tune trials can run it).
    ``loop`` replaces :func:`train_loop_per_worker` and ``extra`` goes to
    :attr:`WorkerInputs.extra` (``multimix bench train``); ``board``: the progress actor the
    workers post to (:mod:`multimix.progress`)."""
    import ray
    from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig, RunConfig,
                           ScalingConfig)
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    scaling = ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                            resources_per_worker=resources)
    # keyless: Ray pickles this into its run state; workers resolve keys through the AWS chain
    fs, path = storage.resolve(cfg.run.storage_path, storage.chain_storage(cfg.storage))
    env_vars = {k: os.environ[k] for k in (FAULT_ENV, VERBOSE_ENV) if k in os.environ}
    run_config = RunConfig(
        name=cfg.run.name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=s.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=1,  # the best; Ray always keeps the latest as well
            checkpoint_score_attribute=cfg.run.checkpoint_metric,
            checkpoint_score_order=cfg.run.checkpoint_mode,
        ),
        callbacks=callbacks or [],
        worker_runtime_env={"env_vars": env_vars} if env_vars else None,
        # Ray Train's own lines (resources requested, each report, a failure's traceback echo)
        # stay in Ray's session logs; the run's progress and its one error line are ours
        logging_config=LoggingConfig(log_level="INFO" if verbose() else "CRITICAL"),
    )
    worker_inputs = WorkerInputs(
        config=cfg.to_dict(include_secrets=False),
        splits={k: split_record(v) for k, v in inputs.splits.items()},
        classes=list(inputs.classes),
        pools=ray.put(inputs.pools),
        state=inputs.state,
        datasets=tuple(sorted(inputs.datasets)),
        steps=inputs.steps,
        extra=dict(extra or {}),
        board=board,
    )
    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config={"inputs": worker_inputs},
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        datasets=inputs.datasets,
        dataset_config=pipeline.dataset_config(inputs.datasets, cfg),
    )


def init_ray(cfg: Config, log_to_driver: bool | None = None) -> None:
    """:func:`multimix.resources.connect_ray` with the config's storage settings: Ray's own
    log lines quiet, and its processes' output not echoed (``log_to_driver``, default: only
    with ``--verbose``; the run's progress and errors reach the console through
    :mod:`multimix.progress` and :func:`record_failure`)."""
    resources.connect_ray(cfg.storage, quiet=not verbose(),
                          log_to_driver=verbose() if log_to_driver is None else log_to_driver)


def train(cfg: Config, callbacks: list | None = None, checked=None, *, lease: bool = True,
          restart: bool = False) -> TrainResult:
    """Train ``cfg`` to ``optim.epochs`` epochs (resuming a run of the same name if it exists).

    The inputs are checked before Ray starts (:func:`multimix.preflight.check_inputs`, or
    ``checked``, its result); so is the run directory (:mod:`multimix.rundir`): its lease
    (``lease``; a Tune trial runs under its search's lease), that a rerun is the same
    experiment (or ``restart``: deleted first), and that no incomplete checkpoint is left in
    it. A failure inside Ray (a Train worker, the controller, a data task) is raised as
    :class:`~multimix.errors.RunFailed`: its root cause in one line, the full traceback in
    ``<run dir>/error.log`` (:func:`record_failure`); Ctrl-C as :class:`Interrupted`.
    """
    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    # datasets, budgets, storage, the labeled pools: all before Ray starts
    checked = checked if checked is not None else check_inputs(cfg, pools=True)
    held = rundir.Lease(run_dir, cfg.storage, command="multimix train").acquire() if lease \
        else None
    try:
        if restart:
            rundir.clear(run_dir, cfg.storage)
        else:
            rundir.check_same_experiment(run_dir, cfg)
            rundir.remove_incomplete_checkpoints(run_dir, cfg.storage)
        return _train(cfg, callbacks, checked, run_dir)
    finally:
        if held is not None:
            held.release()


def _train(cfg: Config, callbacks, checked, run_dir: str) -> TrainResult:
    init_ray(cfg)

    resources.check(cfg.scaling)  # fails at once when no node could ever place the workers

    inputs = prepare_inputs(cfg, checked)
    storage.write_bytes(storage.join(run_dir, "config.json"),
                        json.dumps(cfg.to_dict(), indent=2).encode(), cfg.storage)
    storage.write_bytes(storage.join(run_dir, CONTAMINATION),  # the guard's counts
                        json.dumps(inputs.contamination, indent=1).encode(), cfg.storage)
    board = progress.create_board()
    trainer = build_trainer(cfg, inputs, callbacks, board=board)
    console = progress.Console(board).start()
    try:
        fit_trainer(trainer)
    except KeyboardInterrupt:
        console.stop()
        line = console.interrupted_line(_resume_epoch(run_dir, cfg))
        _stop_ray()
        raise Interrupted(line) from None
    except Exception as exc:  # noqa: BLE001 - Train V2 / Tune wrappers: one line + a log file
        console.stop()
        failed = record_failure(exc, run_dir, cfg.storage, "training")
        rundir.remove_incomplete_checkpoints(run_dir, cfg.storage)
        raise failed from exc
    console.stop()
    return read_run(run_dir, cfg)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: the message says where it stopped and how to resume."""


def fit_trainer(trainer):
    """``trainer.fit()``; from the main thread, run in a helper thread so that Ctrl-C reaches
    the main thread as :class:`KeyboardInterrupt`. In the main thread Ray Train 2.60 installs
    its own SIGINT handler, which ends the process with no word on where the run stopped, and
    never removes it: the handler keeps the finished run's controller actor (and its data
    actors) alive for the rest of the process, and a later Ctrl-C goes to that old run."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    box: dict = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="multimix-fit", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _stop_ray() -> None:
    """After Ctrl-C: end this driver's Ray (a local Ray and its processes; on a cluster, the
    run's actors, which this driver owns), so nothing keeps training in the background."""
    import ray

    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - already going down
        pass


def _resume_epoch(run_dir: str, cfg: Config):
    """The epoch (0-based) a rerun resumes after: the last one ``last.json`` records, or
    None."""
    try:
        last = json.loads(storage.read_bytes(storage.join(run_dir, "last.json"), cfg.storage))
        return int(last["epoch"]) + 1
    except Exception:  # noqa: BLE001 - nothing checkpointed (or unreadable): from the start
        return None


#: the file in the run directory that holds the full traceback of a failed run
ERROR_LOG = "error.log"
#: the file in the run directory with what the contamination guard removed (DESIGN §3b)
CONTAMINATION = "contamination.json"


def _traceback_text(exc: BaseException) -> str:
    """``exc``'s traceback (with its causes), then each Train worker's failure, each with the
    traceback Ray recorded where it was raised."""
    import traceback

    parts = ["".join(traceback.format_exception(exc))]
    failures = getattr(exc, "worker_failures", None)
    for rank, err in sorted((failures or {}).items()):
        parts.append(f"\n--- worker rank {rank} ---\n"
                     + "".join(traceback.format_exception(err)))
    return "\n".join(parts)


def record_failure(exc: BaseException, run_dir: str, storage_cfg, what: str) -> RunFailed:
    """Write ``exc``'s full traceback to ``<run_dir>/error.log`` (a local temporary file when
    the run directory cannot be written, e.g. the storage is what failed) and return the
    :class:`~multimix.errors.RunFailed` to raise: ``<what> failed: <root cause, one line>
    (full traceback: <path>)``."""
    import tempfile

    text = f"multimix {what} failed: {one_line(exc)}\n\n{_traceback_text(exc)}"
    path = storage.join(run_dir, ERROR_LOG)
    try:
        if not storage.is_s3(path):
            os.makedirs(os.path.dirname(storage.resolve(path)[1]), exist_ok=True)
        storage.write_text(path, text, storage_cfg)
    except Exception:  # noqa: BLE001 - the run directory is what failed: keep it locally
        fd, path = tempfile.mkstemp(prefix="multimix-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    root = root_cause(exc)
    if isinstance(root, RunFailed):  # already recorded (a Tune trial's train())
        return root
    root = storage_cause(root, run_dir, storage_cfg)
    return RunFailed(f"{what} failed: {one_line(root)} (full traceback: {path})", root, path)


def storage_cause(root: BaseException, run_dir: str, storage_cfg) -> BaseException:
    """A storage error raised inside Ray (a pyarrow ``OSError`` from S3 in a data task or a
    Train worker, a full disk under Ray's checkpoint copy) as the same
    :class:`~multimix.errors.StorageError` the driver gives for that fault
    (:func:`multimix.data.storage.translate`); any other error as it is."""
    if isinstance(root, UserError) or not isinstance(root, OSError):
        return root
    msg = str(root)
    m = re.search(r"key '([^']*)' in bucket '([^']*)'", msg)
    if m:
        uri = f"s3://{m.group(2)}/{m.group(1)}"
    elif getattr(root, "errno", None) == errno.ENOSPC or "No space left" in msg:
        uri = getattr(root, "filename", None) or run_dir
    elif "AWS Error" in msg:
        uri = run_dir
    else:
        return root
    return storage.translate(root, uri, storage_cfg)


def read_run(run_dir: str, cfg: Config) -> TrainResult:
    """Read ``history.json`` / ``best.json`` / ``last.json`` of a run directory."""
    def read(name):
        return json.loads(storage.read_bytes(storage.join(run_dir, name), cfg.storage))

    history = read("history.json")
    best, last = read("best.json"), read("last.json")
    return TrainResult(
        run_dir=run_dir,
        epochs=len(history),
        history=history,
        best_checkpoint=storage.join(run_dir, best["checkpoint"]),
        last_checkpoint=storage.join(run_dir, last["checkpoint"]),
        best_value=float(best["value"]),
    )


# ---------------------------------------------------------------------------------------------
# worker


def _maybe_inject_fault(rank: int, epoch: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    r, e, s, marker = spec.split(":", 3)
    if (int(r), int(e), int(s)) == (rank, epoch, step) and not os.path.exists(marker):
        Path(marker).write_text(f"killed rank {rank} at epoch {epoch} step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def _log(rank: int, msg: str) -> None:
    """Progress line from rank 0, once (Train's patched ``print`` would log it twice)."""
    if rank != 0:
        return
    logger = logging.getLogger("multimix.train")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.__stdout__)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logger.info(msg)


def _say(report: "progress.Reporter", rank: int, text: str) -> None:
    """A message of the run: to the driver's console, or rank 0's log without a board."""
    if report.board is not None:
        report.message(text)
    else:
        _log(rank, f"[multimix] {text}")


def best_epoch(history: list[dict], metric: str, mode: str) -> dict:
    """The epoch's metrics dict that ``best.json`` names: the best ``metric`` (ties to the
    later epoch, as Ray's CheckpointConfig keeps that one), else the last."""
    def at_least(a, b):
        return a >= b if mode == "max" else a <= b

    best = None
    for h in history:
        v = h.get(metric)
        if v is not None and v == v and (best is None or at_least(v, best[metric])):
            best = h
    return best or history[-1]


def _mean_over_workers(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the workers (all-reduce on the process group's device: a
    CUDA tensor under NCCL, see :func:`multimix.metrics.collective_device`)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def train_loop_per_worker(loop_cfg: dict) -> None:
    """One Train worker: ``loop_cfg["inputs"]`` is the driver's :class:`WorkerInputs`."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from multimix import checkpoint as ckpt_mod
    from multimix.engine import build_optimizer, prepare_model, train_step
    from multimix.model import create_model, unwrap
    from multimix.objective import TERM_KEYS, class_rates, make_labeler

    inputs: WorkerInputs = loop_cfg["inputs"]
    cfg = load_config(inputs.config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    report = progress.Reporter(inputs.board, rank)
    if not verbose():  # Ray Train's INFO lines logged under the root logger (each report)
        logging.getLogger().setLevel(logging.WARNING)
    device = ray.train.torch.get_device()
    if device.type == "cuda":  # collectives under NCCL use the current device (Ray sets it too)
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.optim.seed + rank)

    model = prepare_model(create_model(cfg.model), cfg, device)  # channels_last / compile
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1
    optimizer, scheduler = build_optimizer(model, cfg)

    start_epoch, history = 0, []
    storage_ctx = ctx.get_storage()
    # TensorBoard, learning_curves.png, MLflow (rank 0; multimix.tracking)
    tracker = tracking.RunTracker(cfg, storage_ctx.storage_filesystem,
                                  storage_ctx.experiment_fs_path, rank)
    restored = ray.train.get_checkpoint()
    state, source = None, None
    if restored is not None:
        with restored.as_directory() as d:
            state = ckpt_mod.load_bytes((Path(d) / ckpt_mod.FILENAME).read_bytes(),
                                        name=f"{restored.path}/{ckpt_mod.FILENAME}")
        source = restored.path
    # An interruption between a checkpoint's upload and Ray's own bookkeeping leaves Ray an older
    # checkpoint (or none); last.json is written only after the checkpoint is persisted.
    last, last_source = _read_last_checkpoint(storage_ctx)
    if last is not None and (state is None or last["epoch"] > state["epoch"]):
        state, source = last, last_source
    ema = None
    if cfg.objective.ema_decay > 0:  # EMA teacher (pseudo-labels, validated, saved)
        from multimix.ema import ModelEMA

        ema = ModelEMA(unwrap(model), cfg.objective.ema_decay, warmup=cfg.objective.ema_warmup)
    if state is not None:
        unwrap(model).load_state_dict(state.get("student", state["model"]))
        if ema is not None:
            ema.load_state_dict(state["model"])
            # the warm-up continues where it stopped (a checkpoint without the count: past it)
            ema.updates = int(state.get("ema_updates", 1 << 30))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt_mod.set_rng_state(state["rng"])
        torch.manual_seed(cfg.optim.seed + rank + 1000 * (state["epoch"] + 1))
        start_epoch, history = state["epoch"] + 1, list(state["history"])
        _say(report, rank, f"resumed after epoch {state['epoch'] + 1} ({source})")

    pools = ray.get(inputs.pools)
    labeler = None
    if "cls_labeled" in pools:  # per-class pseudo-label statistics; DA / adaptive thresholds
        labeler = make_labeler(cfg.objective, cfg.model.num_classes, pools["cls_labeled"].labels)
        if state is not None and state.get("labeler"):
            labeler.load_state_dict(state["labeler"])
    skipped = _SkippedRows(pools, inputs.state, inputs.datasets)
    shards = {name: ray.train.get_dataset_shard(name) for name in inputs.datasets}
    # one cursor per stream for the whole run: a Ray Data execution spans epochs
    streams = open_streams(cfg, shards, rank, start_epoch, state=inputs.state)
    steps = inputs.steps
    n_img = images_per_step(cfg.model.variant, cfg.data)  # the streams the variant consumes
    for epoch in range(start_epoch, cfg.optim.epochs):
        model.train()
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        batches = TrainBatches(cfg, streams, pools.get("cls_labeled"), pools.get("seg_labeled"),
                               rank, epoch, steps_per_epoch=steps)
        for step, batch in enumerate(batches):
            _maybe_inject_fault(rank, epoch, step)
            terms = train_step(model, batch, optimizer, cfg, device,
                               teacher=ema.module if ema is not None else None, labeler=labeler)
            if ema is not None:
                ema.update(unwrap(model))
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            rate = (step + 1) * n_img * world / (time.perf_counter() - t0)
            if report.board is not None:
                report.step(epoch, cfg.optim.epochs, step, steps, terms, rate)
            elif (step + 1) % cfg.run.log_every == 0 or step + 1 == steps:
                _log(rank, f"[multimix] epoch {epoch + 1}/{cfg.optim.epochs} step {step + 1}/"
                           f"{steps} " + " ".join(f"{k}={v:.4f}" for k, v in terms.items()
                                                  if k in TERM_KEYS)
                     + f" img/s={rate:.1f}")
        train_time = time.perf_counter() - t0
        scheduler.step()
        train_means = _mean_over_workers({f"train_{k}": v / max(steps, 1)
                                          for k, v in sums.items()})
        train_means.update(class_rates(train_means))
        vres = validate(ema.module if ema is not None else model, device,
                        cls=pools.get("cls_val"), seg=pools.get("seg_val"),
                        classes=inputs.classes, batch_size=cfg.data.eval_batch, rank=rank,
                        world_size=world)
        val = vres.flat()
        if vres.cls is not None:  # balanced scores, resample, val-chosen threshold
            val.update({f"val_cls_{k}": v for k, v in validation_cls_metrics(
                vres.cls.probs, vres.cls.labels, inputs.classes or None,
                cfg.objective.decision).items()})
        val["val_score_balanced"] = val_score_balanced(val)
        metrics = {"epoch": epoch, **train_means, **val,
                   "img_per_s": steps * n_img * world / max(train_time, 1e-9),
                   "lr": optimizer.param_groups[0]["lr"], **skipped.epoch()}
        history.append(metrics)
        if report.board is not None:
            best = best_epoch(history, cfg.run.checkpoint_metric, cfg.run.checkpoint_mode)
            report.epoch(epoch, cfg.optim.epochs, metrics,
                         {"epoch": best["epoch"], "value": best.get(cfg.run.checkpoint_metric)})
            if metrics.get("skipped_rows"):
                report.message(f"epoch {epoch + 1}: " + skipped.summary(metrics))
        else:
            _log(rank, f"[multimix] epoch {epoch + 1}/{cfg.optim.epochs} done: "
                 + " ".join(f"{k}={metrics[k]:.4f}" for k in SUMMARY_KEYS if k in metrics)
                 + " " + skipped.summary(metrics))
        name = f"checkpoint_epoch-{epoch:04d}"
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                state = ckpt_mod.build_state(
                    model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                    config=cfg, splits=inputs.splits, classes=inputs.classes,
                    history=history, ema=ema, labeler=labeler,
                    threshold=val.get("val_cls_threshold"))
                ckpt_mod.save(state, os.path.join(d, ckpt_mod.FILENAME))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=name)
            _write_run_files(storage_ctx, cfg, history, name)
            tracker.epoch(history)
        else:
            ray.train.report(metrics, checkpoint_dir_name=name)
    tracker.close()


class _SkippedRows:
    """Rows that could not be decoded, per pool, for each epoch's metrics:
    ``skipped_<pool>`` for the labeled and validation pools (decoded once, before training:
    the same count every epoch) and ``skipped_<dataset>`` for the unlabeled streams (the rows
    their data tasks dropped since the previous epoch's count, as the pipeline's state actor
    tallies them; tasks read ahead, so a row can count in the epoch before the one it would
    have been trained in); ``skipped_rows``: their sum."""

    def __init__(self, pools: dict, state, datasets) -> None:
        self.fixed = skipped_counts(pools)
        self.state, self.datasets = state, tuple(sorted(datasets))
        self.seen: dict = {}

    def epoch(self) -> dict:
        out = dict(self.fixed)
        counts = {}
        if self.state is not None and self.datasets:
            counts = skipped_rows(self.state)["counts"]
        for name in self.datasets:
            total = int(counts.get(name, 0))
            out[f"skipped_{name}"] = total - self.seen.get(name, 0)
            self.seen[name] = total
        out["skipped_rows"] = sum(out.values())
        return out

    @staticmethod
    def summary(metrics: dict) -> str:
        """``skipped_rows=N`` and, when N > 0, the pools that lost rows."""
        n = int(metrics.get("skipped_rows", 0))
        detail = " ".join(f"{k[8:]}={v}" for k, v in sorted(metrics.items())
                          if k.startswith("skipped_") and k != "skipped_rows" and v)
        return f"skipped_rows={n}" + (f" ({detail})" if detail else "")


def _read_last_checkpoint(storage_ctx):
    """``(state, path)`` of the checkpoint named by ``last.json`` in the run directory, or
    ``(None, None)`` when there is none."""
    import pyarrow.fs as pafs

    from multimix import checkpoint as ckpt_mod

    fs, root = storage_ctx.storage_filesystem, storage_ctx.experiment_fs_path
    if fs.get_file_info(f"{root}/last.json").type != pafs.FileType.File:
        return None, None
    with fs.open_input_stream(f"{root}/last.json") as f:
        name = json.loads(f.read())["checkpoint"]
    path = f"{root}/{name}/{ckpt_mod.FILENAME}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None, None
    with fs.open_input_stream(path) as f:
        return ckpt_mod.load_bytes(f.read(), name=path), path


def _write_run_files(storage_ctx, cfg: Config, history: list[dict], name: str) -> None:
    """history.json, last.json, best.json beside the checkpoints (rank 0)."""
    fs, root = storage_ctx.storage_filesystem, storage_ctx.experiment_fs_path
    metric, mode = cfg.run.checkpoint_metric, cfg.run.checkpoint_mode

    def put(fname: str, obj) -> None:  # atomic: a kill never leaves a truncated last.json
        write_file(fs, f"{root}/{fname}", json.dumps(obj, indent=1, default=float).encode())

    best = best_epoch(history, metric, mode)
    put("history.json", history)
    last = history[-1]
    put("last.json", {"checkpoint": name, "epoch": last["epoch"], "metric": metric,
                      "value": last.get(metric)})
    put("best.json", {"checkpoint": f"checkpoint_epoch-{best['epoch']:04d}",
                      "epoch": best["epoch"], "metric": metric, "value": best.get(metric)})


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="multimix train")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
