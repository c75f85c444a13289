"""``multimix tune``: Ray Tune search over the MultiMix hyper-parameters, variants, budgets, seeds.

Each trial is a Tune function that runs :func:`multimix.train.train` (the same
:class:`TorchTrainer` as ``multimix train``) and forwards its per-epoch reports to Tune with
``TuneReportCallback`` (Ray 2.60 Train V2: ``Tuner(TorchTrainer)`` is gone). Trials reuse the split
files beside the data, so trials with the same budget see exactly the same labeled ids.

    multimix tune --config paper --set data.cls_data=... --set data.seg_data=... \\
        --space objective.threshold=uniform:0.5,0.95 --space objective.lambda_u=loguniform:0.05,1 \\
        --grid data.cls_labeled=100,1000,all --grid optim.seed=0,1,2 \\
        --num-samples 4 --concurrent 2 --scheduler asha --grace-period 2

Search:

- ``--space KEY=KIND:ARGS`` (sampled; ``choice:a,b,c`` | ``uniform:lo,hi`` | ``loguniform:lo,hi`` |
  ``randint:lo,hi``) and ``--grid KEY=a,b,c`` (every value; ``tune.grid_search``). Every grid
  combination is run ``--num-samples`` times with fresh samples of the ``--space`` keys. The
  pseudo-key ``budget=C:S,...`` sets ``data.cls_labeled`` and ``data.seg_labeled`` together (the
  paper's paired budgets, e.g. ``budget=100:10,1000:50,all:all``). Without ``--space`` and
  ``--grid`` the search covers t, λ, α and β around the paper's values. Every value a trial can
  get is validated against the config schema before Ray starts.
- ``--scheduler asha`` stops weak trials early (ASHA on the per-epoch ``run.checkpoint_metric``,
  ``--grace-period`` epochs, ``--reduction-factor``); ``none`` runs every trial to the end.
- ``--concurrent N``: at most N trials at once. A trial itself holds 0.01 CPU; its Train workers
  ask for their own resources (``scaling.*``: a GPU trial takes ``num_workers × gpus_per_worker``
  GPUs), so N bounds what the search asks of the cluster (and of an autoscaler) at any time.
  Without an autoscaler, N is lowered to the trials the cluster holds
  (:func:`multimix.resources.concurrent_trials`).

Experiment directory ``<run.storage_path>/<run.name>/`` (a folder or ``s3://``)::

    tuner.pkl, experiment_state-*.json, <trial>/   Ray Tune's state (restore) and trial results
    trials/<trial>/                                each trial's Train run (checkpoints, history)
    search.json     the search (base config, space, grid, samples, scheduler): a rerun must match
    results.csv, results.md   one row per trial: parameters, best epoch, every validation metric
                              at it, wall time, best checkpoint URI
    best.yaml       the best trial's config: ``multimix train --config best.yaml`` retrains it
    tune_scores.png, learning_curves.png
    eval/           ``--evaluate``: the best checkpoint's report

Rerunning the same command after an interruption (Ctrl-C, a killed driver) restores the
experiment: finished trials are kept, unfinished ones continue from their latest checkpoint.
``--restart`` deletes the experiment directory and starts over.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from multimix import evaluate, resources, rundir, tracking
from multimix import train as train_cmd
from multimix.config import Config, ConfigError, add_config_arguments, load_config
from multimix.data import storage
from multimix.data.storage import absolute_uri as absolute
from multimix.errors import UserError, one_line
from multimix.preflight import Reads, check_inputs, check_run_storage

DEFAULT_SPACE = (
    "objective.threshold=uniform:0.5,0.95",
    "objective.lambda_u=loguniform:0.05,1.0",
    "objective.alpha=loguniform:1.0,10.0",
    "objective.beta=loguniform:0.001,0.1",
)
KINDS = ("choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("none", "asha")
#: a grid/space pseudo-key that sets both label budgets: ``budget=100:10`` (classification:seg)
BUDGET_KEY = "budget"
#: config values that are paths: made absolute in the driver (Tune runs trials in their own cwd)
_PATH_KEYS = (("data", "cls_data"), ("data", "seg_data"), ("run", "storage_path"))


def add_arguments(p) -> None:
    add_config_arguments(p, "paper", what="the fixed settings of every trial")
    p.add_argument("--space", action="append", default=[], metavar="KEY=KIND:ARGS",
                   help="a sampled value, e.g. objective.threshold=uniform:0.5,0.95 or "
                        "data.cls_labeled=choice:100,1000,all (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=A,B,...",
                   help="a grid dimension: every value is run, e.g. model.variant=enc,multimix, "
                        "optim.seed=0,1,2 or budget=100:10,all:all (repeatable)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples of --space per grid point (default: 8 with --space, else 1)")
    p.add_argument("--concurrent", type=int, default=1,
                   help="trials running at once (each runs scaling.num_workers workers)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="none",
                   help="asha: stop weak trials early on the per-epoch run.checkpoint_metric")
    p.add_argument("--grace-period", type=int, default=1,
                   help="ASHA: epochs every trial runs before it can be stopped (default 1)")
    p.add_argument("--reduction-factor", type=float, default=2.0,
                   help="ASHA: keep 1/factor of the trials at each rung (default 2)")
    p.add_argument("--seed", type=int, default=0, help="search seed (default 0)")
    p.add_argument("--retries", type=int, default=1,
                   help="restarts of a failed trial, from its last checkpoint (default 1)")
    p.add_argument("--restart", action="store_true",
                   help="delete <run.storage_path>/<run.name> and start the search over")
    p.add_argument("--evaluate", action="store_true",
                   help="evaluate the best checkpoint on --eval-cls/--eval-seg (default: the "
                        "training sets' held-out ids); report in <experiment>/eval/")
    p.add_argument("--eval-cls", nargs="*", default=[], metavar="URI",
                   help="classification test sets for --evaluate")
    p.add_argument("--eval-seg", nargs="*", default=[], metavar="URI",
                   help="segmentation test sets for --evaluate")


# ---------------------------------------------------------------------------------------------
# the search: parsing and validation (Ray-free)


def parse_space(items: list[str]) -> dict:
    """``["objective.threshold=uniform:0.5,0.95", ...]`` → ``{key: (kind, [args])}``.

    Raises:
        ConfigError: malformed item, unknown kind, or a key the config does not have.
    """
    out = {}
    for item in items:
        key, sep, spec = item.partition("=")
        kind, sep2, raw = spec.partition(":")
        if not sep or not sep2 or kind not in KINDS or not raw:
            raise ConfigError(f"--space {item!r}: expected KEY=KIND:ARGS with KIND one of "
                              f"{', '.join(KINDS)}")
        args = [_scalar(a) for a in raw.split(",")]
        if kind != "choice" and (len(args) != 2 or not all(isinstance(a, (int, float))
                                                           for a in args)):
            raise ConfigError(f"--space {item!r}: {kind} takes two numbers lo,hi")
        out[key.strip()] = (kind, args)
    return out


def _scalar(raw: str):
    """A YAML scalar, except ``C:S`` budgets (YAML 1.1 would read ``100:10`` as base 60)."""
    raw = raw.strip()
    return raw if ":" in raw else yaml.safe_load(raw)


def parse_grid(items: list[str]) -> dict:
    """``["model.variant=enc,multimix", "optim.seed=0,1"]`` → ``{key: [values]}``.

    Raises:
        ConfigError: malformed item, an empty or repeated value, a key given twice.
    """
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = [_scalar(v) for v in raw.split(",")] if raw.strip() else []
        if not sep or not key or not values or any(v in ("", None) for v in values):
            raise ConfigError(f"--grid {item!r}: expected KEY=A,B,... e.g. optim.seed=0,1,2")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ConfigError(f"--grid {item!r}: a value is repeated")
        if key in out:
            raise ConfigError(f"--grid {key}: given twice (put all values in one --grid)")
        out[key] = values
    return out


def param_overrides(params: dict) -> list[str]:
    """A trial's parameters as ``--set`` items (``budget=C:S`` → both budgets)."""
    sets = []
    for key, value in params.items():
        if key == BUDGET_KEY:
            cls, sep, seg = str(value).partition(":")
            if not sep or not cls or not seg:
                raise ConfigError(f"{BUDGET_KEY}: expected CLS:SEG (e.g. 100:10 or all:all), "
                                  f"got {value!r}")
            sets += [f"data.cls_labeled={cls}", f"data.seg_labeled={seg}"]
        else:
            sets.append(f"{key}={value}")
    return sets


def check_space(base_cfg: Config, space: dict, grid: dict | None = None) -> None:
    """Every searched key exists and every value a trial can get validates (edge values of
    ranges). Raises :class:`ConfigError` naming the key."""
    base = base_cfg.to_dict(include_secrets=True)
    both = set(space) & set(grid or {})
    if both:
        raise ConfigError(f"{sorted(both)[0]}: both in --space and --grid (choose one)")
    for key, (kind, args) in space.items():
        values = args if kind == "choice" else [args[0], args[1] - (1 if kind == "randint" else 0)]
        if kind != "choice" and args[0] >= args[1]:
            raise ConfigError(f"--space {key}: {kind} needs lo < hi, got {args[0]},{args[1]}")
        for v in values:
            load_config(base, param_overrides({key: v}))
    for key, values in (grid or {}).items():
        for v in values:
            load_config(base, param_overrides({key: v}))


@dataclass
class Search:
    """What a Tune experiment searches and how; stored as ``search.json`` so that a rerun can be
    checked against it before it is restored."""

    space: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    num_samples: int = 1
    scheduler: str = "none"
    grace_period: int = 1
    reduction_factor: float = 2.0
    concurrent: int = 1
    seed: int = 0
    #: restarts of a failed trial (Tune FailureConfig); it resumes its Train run's last epoch
    retries: int = 1

    def check(self, cfg: Config) -> None:
        """Validate against ``cfg`` (one-line :class:`ConfigError` / :class:`UserError`)."""
        if self.num_samples < 1:
            raise UserError(f"--num-samples: must be >= 1, got {self.num_samples}")
        if self.concurrent < 1:
            raise UserError(f"--concurrent: must be >= 1, got {self.concurrent}")
        if self.retries < 0:
            raise UserError(f"--retries: must be >= 0, got {self.retries}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"--scheduler: one of {', '.join(SCHEDULERS)}, got "
                            f"{self.scheduler!r}")
        if self.scheduler == "asha":
            if self.grace_period < 1 or self.grace_period > cfg.optim.epochs:
                raise UserError(f"--grace-period: must be in [1, optim.epochs={cfg.optim.epochs}]"
                                f", got {self.grace_period}")
            if self.reduction_factor <= 1:
                raise UserError(f"--reduction-factor: must be > 1, got {self.reduction_factor}")
            if "optim.epochs" in self.space or "optim.epochs" in self.grid:
                raise UserError("optim.epochs: cannot be searched with --scheduler asha (ASHA "
                                "needs one epoch budget; set it with --set optim.epochs=N)")
        check_space(cfg, self.space, self.grid)

    def fingerprint(self, base: dict) -> dict:
        """What must not change between a run and its restore: the base config (less the run
        name and storage) and the search itself (not ``concurrent``)."""
        cfg = json.loads(json.dumps(base, default=str))
        cfg.get("run", {}).pop("name", None)
        cfg.get("run", {}).pop("storage_path", None)
        for key in ("tensorboard", "mlflow", "mlflow_uri"):  # tracking: not the search
            cfg.get("run", {}).pop(key, None)
        d = json.loads(json.dumps(asdict(self), default=str))
        d.pop("concurrent"), d.pop("retries")
        return {"search": d, "config": cfg}


def search_from_args(args) -> Search:
    space = parse_space(args.space)
    grid = parse_grid(args.grid)
    if not space and not grid:
        space = parse_space(list(DEFAULT_SPACE))
    n = args.num_samples if args.num_samples is not None else (8 if space else 1)
    return Search(space=space, grid=grid, num_samples=n, scheduler=args.scheduler,
                  grace_period=args.grace_period, reduction_factor=args.reduction_factor,
                  concurrent=args.concurrent, seed=args.seed, retries=args.retries)


def absolute_paths(cfg: Config) -> Config:
    """Local path values made absolute (Tune trials run with the trial folder as cwd)."""
    for sec, key in _PATH_KEYS:
        setattr(getattr(cfg, sec), key, absolute(getattr(getattr(cfg, sec), key)))
    d = cfg.data  # the lists of paths (extra unlabeled pools, evaluation sets), and unlabeled_seg_from naming one of them
    if d.unlabeled_seg_from in d.unlabeled_data:
        d.unlabeled_seg_from = absolute(d.unlabeled_seg_from)
    d.unlabeled_data = [absolute(u) for u in d.unlabeled_data]
    d.eval_data = [absolute(u) for u in d.eval_data]
    return cfg


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{key}.")
        elif a.get(k) != b.get(k):
            out.append(f"{key}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


# ---------------------------------------------------------------------------------------------
# running it


def _to_tune(search: Search) -> dict:
    from ray import tune

    make = {"choice": lambda a: tune.choice(a), "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    out = {key: make[kind](args) for key, (kind, args) in search.space.items()}
    out.update({key: tune.grid_search(values) for key, values in search.grid.items()})
    return out


def _input_values(search: Search) -> dict:
    """``{key: [values]}`` of the searched keys that change a run's inputs (``data.*``,
    ``model.*``, ``budget``): grid values, choices, or a range's edge values."""
    out = {k: list(v) for k, v in search.grid.items()}
    for key, (kind, args) in search.space.items():
        out[key] = list(args) if kind == "choice" else [args[0],
                                                        args[1] - (1 if kind == "randint" else 0)]
    return {k: v for k, v in out.items()
            if k == BUDGET_KEY or k.startswith("data.") or k.startswith("model.")}


def check_search_inputs(cfg: Config, search: Search) -> None:
    """:func:`multimix.preflight.check_inputs` (no Ray) for every combination of the searched
    values that changes a run's inputs (datasets, budgets, variant, classes), and the
    experiment directory once. Raises the first failure's one line, naming the key. A budget
    that leaves an SSL variant no unlabeled images fails that trial only (its one line in the
    results table). Each dataset's manifest and shards, and each budget's split, are read once
    for all combinations (:class:`multimix.preflight.Reads`)."""
    import itertools

    check_run_storage(cfg)
    values = _input_values(search)
    base = cfg.to_dict(include_secrets=True)
    reads = Reads(cfg.storage)  # the combinations vary data.*, model.*, budget; never storage.*
    for combo in itertools.product(*values.values()):
        params = dict(zip(values, combo))
        check_inputs(load_config(base, param_overrides(params)) if params else cfg,
                     storage=False, unlabeled=False, reads=reads)


def trial_run_dir(exp_uri: str, trial_id: str) -> str:
    """The Train run directory of a trial: ``<experiment>/trials/<trial_id>``."""
    return storage.join(exp_uri, "trials", trial_id)


def trial(params: dict, base: dict, exp_uri: str) -> None:
    """One Tune trial: the base config plus this trial's values, trained with Ray Train into
    ``<experiment>/trials/<trial_id>`` (a restored trial resumes that run)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    tid = ray.tune.get_context().get_trial_id()
    # an all-digit trial id such as 83046_00000 stays a string: --set values are read by the
    # type of their field (config.parse_overrides)
    cfg = load_config(base, param_overrides(params) + [
        f"run.storage_path={exp_uri.rstrip('/')}/trials", f"run.name={tid}",
        # Tune's own loggers record the trial (TensorBoard; MLflow: tracking.tune_callbacks)
        "run.tensorboard=false", "run.mlflow=false"])
    # under the search's lease (a restarted trial takes its directory over at once)
    train_cmd.train(cfg, callbacks=[TuneReportCallback()], lease=False)


#: variables Ray Tune would copy from the driver into every trial actor's runtime env
_KEY_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                       "AWS_SESSION_TOKEN"})


def _keep_keys_out_of_trial_runtime_envs() -> None:
    """Ray Tune 2.60 copies ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/... from the driver's
    environment into each trial actor's ``runtime_env.env_vars`` (``ray.tune.execution.
    class_cache.ENV_VARS_TO_PROPAGATE``), which Ray keeps in its actor table, shows in the
    dashboard and writes into the runtime-env agent's log. The trial actors need no copy: they
    inherit the environment of the Ray processes (the AWS chain, DESIGN.md §9), so the keys are
    taken off that list."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - _KEY_VARS


def experiment_uri(cfg: Config) -> str:
    return storage.join(cfg.run.storage_path, cfg.run.name)


def _fit_concurrency(cfg: Config, search: Search) -> Search:
    """``--concurrent`` lowered to what the connected cluster holds when no autoscaler can add
    nodes (:func:`multimix.resources.concurrent_trials`; a line says so)."""
    from dataclasses import replace

    n, msg = resources.concurrent_trials(cfg, search.concurrent, resources.cluster_nodes(),
                                         resources.autoscaler_running())
    if msg:
        print(f"[multimix] {msg}", flush=True)
    return replace(search, concurrent=n)


def tune(cfg: Config, search: Search, restart: bool = False):
    """Run (or restore and finish) the search; returns the :class:`ray.tune.ResultGrid`.

    The experiment directory has one writer: the search holds its lease
    (:class:`multimix.rundir.Lease`) while it runs; ``restart`` deletes what it holds first.

    Raises:
        UserError: the stored experiment was started with another search or base config.
        RunDirBusy: another search is writing into the experiment directory.
    """
    cfg = absolute_paths(cfg)
    search.check(cfg)
    check_search_inputs(cfg, search)  # datasets, budgets, storage: before Ray starts
    exp_uri = experiment_uri(cfg)
    held = rundir.Lease(exp_uri, cfg.storage, command="multimix tune",
                        uri=rundir.beside(exp_uri)).acquire()
    try:
        return _tune(cfg, search, restart)
    finally:
        held.release()


def _tune(cfg: Config, search: Search, restart: bool):
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    train_cmd.init_ray(cfg, log_to_driver=True)  # each trial's lines, under Tune's table
    search = _fit_concurrency(cfg, search)
    exp_uri = experiment_uri(cfg)
    if restart:
        rundir.clear(exp_uri, cfg.storage)
    # keyless: Tune pickles it into tuner.pkl / experiment state; keys come from the AWS chain
    fs, path = storage.resolve(cfg.run.storage_path, storage.chain_storage(cfg.storage))
    base = cfg.to_dict(include_secrets=False)  # trial actors read keys from their environment
    _keep_keys_out_of_trial_runtime_envs()
    trainable = rt.with_resources(rt.with_parameters(trial, base=base, exp_uri=exp_uri),
                                  {"CPU": resources.TRIAL_ACTOR_CPU})
    exp_path = f"{path.rstrip('/')}/{cfg.run.name}"
    search_uri = storage.join(exp_uri, "search.json")
    fingerprint = search.fingerprint(base)
    if rt.Tuner.can_restore(exp_path, storage_filesystem=fs):
        stored = (json.loads(storage.read_bytes(search_uri, cfg.storage))
                  if storage.exists(search_uri, cfg.storage) else {})
        diff = _diff(stored, fingerprint)
        if diff:
            raise UserError(
                f"{exp_uri} holds a search started with other settings ({'; '.join(diff[:3])}"
                f"{'; ...' if len(diff) > 3 else ''}): rerun it with the same --config/--set/"
                "--space/--grid/--num-samples/--scheduler to continue it, add --restart to "
                "delete it and start over, or choose another --set run.name=...")
        print(f"[multimix] restoring the search in {exp_uri} (finished trials are kept)",
              flush=True)
        tuner = rt.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                 resume_errored=True, storage_filesystem=fs)
        # Tune would run the callbacks pickled in tuner.pkl by the first driver: this command's
        # tracking settings decide (they are not in the fingerprint, so run.mlflow may have been
        # turned on), made here as for a new search (with MLflow's file-store permission)
        local = getattr(tuner, "_local_tuner", None)  # None through the Ray Client
        if local is not None:
            local.get_run_config().callbacks = tracking.tune_callbacks(cfg, exp_uri)
    else:
        storage.write_bytes(search_uri, json.dumps(fingerprint, indent=1).encode(), cfg.storage)
        if search.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.optim.epochs,
                                      grace_period=search.grace_period,
                                      reduction_factor=search.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        tuner = rt.Tuner(
            trainable,
            param_space=_to_tune(search),
            tune_config=rt.TuneConfig(
                metric=cfg.run.checkpoint_metric, mode=cfg.run.checkpoint_mode,
                num_samples=search.num_samples, scheduler=scheduler,
                # the generator itself holds back trials: TuneConfig.max_concurrent_trials is
                # ignored (with a warning) when search_alg is a BasicVariantGenerator
                search_alg=BasicVariantGenerator(random_state=search.seed,
                                                 max_concurrent=search.concurrent),
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            # a failed trial restarts and resumes its Train run (under heavy load Ray 2.60's
            # PlacementGroupCleaner can take a live trial's workers for dead: ray#65447)
            run_config=rt.RunConfig(
                name=cfg.run.name, storage_path=path, storage_filesystem=fs,
                failure_config=rt.FailureConfig(max_failures=search.retries),
                callbacks=tracking.tune_callbacks(cfg, exp_uri)),  # MLflow: a run per trial
        )
    return tuner.fit()


def _trial_name(t) -> str:
    return t.trial_id


# ---------------------------------------------------------------------------------------------
# results


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def collect(grid, cfg: Config, exp_uri: str) -> tuple[list[dict], dict]:
    """One row per trial and the per-epoch curves.

    Returns ``(rows, curves)``: each row has ``trial``, ``status`` (``done`` / ``stopped``
    (early, by the scheduler) / ``error`` / ``unfinished``), the searched parameters as
    ``param:<key>``, ``epochs``, ``best_epoch``, every ``val_*`` metric at the best epoch,
    ``time_s`` and ``checkpoint`` (URI of the best epoch's checkpoint); ``curves`` maps the
    trial id to ``(epochs (E,), metric (E,))``.
    """
    metric, mode = cfg.run.checkpoint_metric, cfg.run.checkpoint_mode
    rows, curves = [], {}
    # Tune's own trial states (ResultGrid has no public per-trial status)
    states = {t.trial_id: t.status for t in grid._experiment_analysis.trials}
    for r in grid:
        tid = Path(r.path).name if r.path else "?"
        df = r.metrics_dataframe
        hist = df.to_dict("records") if df is not None and len(df) else []
        hist = [h for h in hist if "epoch" in h and _finite(h.get("epoch"))]
        # the Train run's own history: complete also when the driver died between an epoch's
        # report and Tune's record of it (the restored trial then had nothing left to report)
        run_hist = _run_history(trial_run_dir(exp_uri, tid), cfg)
        if len(run_hist) > len(hist):
            hist = run_hist
        scored = [h for h in hist if _finite(h.get(metric))]
        best = (max if mode == "max" else min)(scored, key=lambda h: h[metric]) if scored else None
        epochs = int(max(h["epoch"] for h in hist)) + 1 if hist else 0
        state = states.get(tid)
        if r.error is not None or state == "ERROR":
            status = "error"
        elif epochs >= _epochs_of(cfg, r.config):
            status = "done"
        elif state == "TERMINATED":
            status = "stopped"  # by the scheduler (ASHA)
        else:
            status = "unfinished"  # PENDING / RUNNING / PAUSED: the search was interrupted
        row = {"trial": tid, "status": status,
               **{f"param:{k}": v for k, v in sorted((r.config or {}).items())},
               "epochs": epochs, "best_epoch": int(best["epoch"]) if best else None,
               metric: best.get(metric) if best else None}
        if best:
            row.update({k: v for k, v in sorted(best.items())
                        if k.startswith("val_") and k != metric and _finite(v)})
        row["time_s"] = round(float(r.metrics.get("time_total_s", 0.0)), 1) if r.metrics else None
        row["checkpoint"] = (storage_join(trial_run_dir(exp_uri, tid),
                                          f"checkpoint_epoch-{int(best['epoch']):04d}")
                             if best else None)
        row["error"] = one_line(r.error) if r.error is not None else None
        rows.append(row)
        if scored:
            curves[tid] = ([int(h["epoch"]) for h in scored], [float(h[metric]) for h in scored])
    rows.sort(key=lambda row: row["trial"])
    return rows, curves


def _run_history(run_dir: str, cfg: Config) -> list[dict]:
    """``history.json`` of a trial's Train run (one metrics dict per finished epoch), or []."""
    uri = storage.join(run_dir, "history.json")
    if not storage.exists(uri, cfg.storage):
        return []
    return json.loads(storage.read_bytes(uri, cfg.storage))


def storage_join(uri: str, *parts: str) -> str:
    return storage.join(uri, *parts)


def _epochs_of(cfg: Config, params: dict | None) -> int:
    if params and "optim.epochs" in params:
        return int(params["optim.epochs"])
    return cfg.optim.epochs


def best_row(rows: list[dict], cfg: Config) -> dict | None:
    metric, mode = cfg.run.checkpoint_metric, cfg.run.checkpoint_mode
    scored = [r for r in rows if _finite(r.get(metric)) and r["status"] != "error"]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric])


def best_config(cfg: Config, row: dict) -> dict:
    """The config that reproduces ``row``'s trial as a ``multimix train`` run (secrets never
    written): the base config and the trial's parameters, run name ``<run.name>-best``."""
    params = {k[len("param:"):]: v for k, v in row.items() if k.startswith("param:")}
    out = load_config(cfg.to_dict(include_secrets=False),
                      param_overrides(params) + [f"run.name={cfg.run.name}-best"])
    return out.to_dict(include_secrets=False)


def _csv_text(rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def markdown_table(rows: list[dict], metric: str) -> str:
    """``results.md``: the rows as one Markdown table (the best trial first, then by trial)."""
    if not rows:
        return "no trials\n"
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k != "error"]
    lines = ["| " + " | ".join(k.replace("param:", "") for k in keys) + " |",
             "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
    errors = [f"- {r['trial']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines) + "\n" + ("\nErrors:\n\n" + "\n".join(errors) + "\n" if errors else "")


def write_results(grid, cfg: Config, search: Search | None = None) -> dict:
    """Write ``results.csv``, ``results.md``, ``best.yaml`` and the plots into the experiment
    directory (local or ``s3://``). Returns ``{"rows", "best", "files": {name: uri}}``."""
    from multimix import plots

    cfg = absolute_paths(cfg)
    exp_uri = experiment_uri(cfg)
    metric = cfg.run.checkpoint_metric
    rows, curves = collect(grid, cfg, exp_uri)
    best = best_row(rows, cfg)
    files = {}
    with storage.staged_output(exp_uri, cfg.storage) as local:
        storage.replace_local(local / "results.csv", _csv_text(rows))
        head = (f"# Tune results: {cfg.run.name}\n\nmetric: {metric} ({cfg.run.checkpoint_mode})"
                f"; best: {best['trial'] if best else 'none'}\n\n")
        storage.replace_local(local / "results.md", head + markdown_table(rows, metric))
        names = ["results.csv", "results.md"]
        if best:
            storage.replace_local(
                local / "best.yaml",
                f"# best trial {best['trial']} of {exp_uri} ({metric}={best[metric]:.4f} at "
                f"epoch {best['best_epoch']}); multimix train --config best.yaml\n"
                + yaml.safe_dump(best_config(cfg, best), sort_keys=False))
            names.append("best.yaml")
        params = sorted({k for r in rows for k in r if k.startswith("param:")})
        if params and any(_finite(r.get(metric)) for r in rows):
            plots.plot_tune_scores(rows, [p for p in params], metric, local / "tune_scores.png")
            names.append("tune_scores.png")
        if curves:
            plots.plot_learning_curves(curves, metric, local / "learning_curves.png")
            names.append("learning_curves.png")
    files = {n: storage.join(exp_uri, n) for n in names}
    return {"rows": rows, "best": best, "files": files}


def run(args) -> int:
    cfg = absolute_paths(load_config(args.config, args.set))
    search = search_from_args(args)
    grid = tune(cfg, search, restart=args.restart)
    out = write_results(grid, cfg, search)
    rows, best, metric = out["rows"], out["best"], cfg.run.checkpoint_metric
    for row in rows:
        params = {k[6:]: v for k, v in row.items() if k.startswith("param:")}
        print(f"{row['trial']}: {row['status']} {metric}={row[metric]} epochs={row['epochs']} "
              f"{params}" + (f" ERROR {row['error']}" if row["error"] else ""))
    print("results: " + ", ".join(out["files"].values()))
    unfinished = [r for r in rows if r["status"] == "unfinished"]
    if unfinished:
        print(f"{len(unfinished)} of {len(rows)} trials unfinished: rerun the same command to "
              "continue the search")
        return 130
    failed = [r for r in rows if r["error"]]
    if best is None:
        raise UserError(f"no trial reported {metric}" + (
            f"; {len(failed)} of {len(rows)} failed, first: {failed[0]['error']}"
            if failed else ""))
    print(f"best: {metric}={best[metric]} trial {best['trial']} epoch {best['best_epoch']} "
          f"checkpoint {best['checkpoint']}")
    print(f"retrain it: multimix train --config {out['files']['best.yaml']}")
    if args.evaluate:
        report = evaluate.evaluate_checkpoint(
            best["checkpoint"],
            cls_data=args.eval_cls or ([cfg.data.cls_data] if cfg.data.cls_data else []),
            seg_data=args.eval_seg or ([cfg.data.seg_data] if cfg.data.seg_data else []),
            out_dir=storage_join(experiment_uri(cfg), "eval"), storage_cfg=cfg.storage)
        print(report["summary_text"])
        print(f"evaluation report: {report['markdown']}")
        tracking.log_evaluation(cfg, report, trial=best["trial"])
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} trials failed; first: "
                        f"{failed[0]['error']}")
    return 0
