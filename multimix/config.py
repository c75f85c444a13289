"""Typed configuration: dataclasses, preset loading, ``--set`` overrides, validation.

Everything a run needs is one :class:`Config`. It is built once at the edge (CLI, job entry
point, test) by :func:`load_config` and validated there; the rest of the code trusts it.

Errors are :class:`ConfigError` and always name the offending key, e.g.
``objective.threshold: must be in the open interval (0, 1), got 1.5``.

Secrets (S3 keys) live in :class:`StorageConfig` but are excluded from ``repr`` and from
:meth:`Config.to_dict`, so they are never printed, logged or written into a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from multimix.errors import UserError
from multimix.variants import VARIANTS  # the model variants, one per row of the paper's table

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "AugmentConfig",
    "ScalingConfig",
    "StorageConfig",
    "RunConfig",
    "Config",
    "VARIANTS",
    "load_config",
    "parse_overrides",
    "add_config_arguments",
    "list_presets",
]


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range. Names the key."""


Budget = Union[int, Literal["all"]]


#: the largest near-duplicate threshold accepted (``data.near_threshold``, ``multimix overlap
#: --threshold``): bits of the 256-bit perceptual hash (:mod:`multimix.data.overlap`)
MAX_THRESHOLD = 63


@dataclass
class DataConfig:
    """Where the prepared data lives and how it is split and batched.

    ``cls_data`` / ``seg_data`` are URIs of prepared datasets (a directory or ``s3://bucket/prefix``
    holding ``manifest.json`` and Parquet shards, written by ``multimix prepare``), or ``""`` when
    a variant does not need that task.
    """

    cls_data: str = ""
    seg_data: str = ""
    image_size: int = 256
    #: labeled classification images: a number or "all" (paper: 100 / 1000 / all)
    cls_labeled: Budget = 100
    #: labeled segmentation images: a number or "all" (paper: 10 / 50 / all)
    seg_labeled: Budget = 10
    #: how the labeled classification batch is drawn from the labeled pool (with replacement):
    #: "uniform" (the paper: each image equally, so batches keep the pool's class ratio) or
    #: "balanced" (a class uniformly, then an image of it: on average equal classes per batch;
    #: class-balanced sampling, Kang et al., ICLR 2020 — a lever against the drift of the
    #: decision and the pseudo-labels to the majority class; docs/RESULTS.md)
    cls_sampling: Literal["uniform", "balanced"] = "uniform"
    #: fraction of each pool held out (stratified) as labeled validation data
    val_fraction: float = 0.1
    split_seed: int = 0
    #: rows of a labeled or validation pool that may fail to decode (each pool) before the run is
    #: refused: 0 (default) trains only on every row the split asked for
    allow_skipped: int = 0
    #: largest labeled training pool held in memory on the driver and every Train worker, in MB
    #: decoded (rows × image_size² × 1 plane, 3 for segmentation): checked before decoding
    max_labeled_mb: float = 2048.0
    #: object-store memory each streaming dataset's execution may fill ahead of the Train
    #: workers, in MB (Ray Data's resource_limits.object_store_memory); null: Ray's default, a
    #: fraction of the object store. Ray Data reads ahead until that budget is full: with a
    #: pool larger than it, the default makes the data tasks decode rows (CPU) long before
    #: they are used; 256 MB holds ~8 blocks of 256² rows (docs/BENCHMARKS.md, corpus scale)
    readahead_mb: Optional[float] = 256.0
    #: pool the unlabeled segmentation stream is drawn from: the unlabeled classification
    #: images ("cls", the paper's cross-dataset setting), the seg images beyond the budget
    #: ("seg"), every data.unlabeled_data pool ("extra", mixed by their data.unlabeled_weights),
    #: the same mix as the unlabeled classification stream ("cls+extra"), or one URI listed in
    #: data.unlabeled_data (that pool alone)
    unlabeled_seg_from: str = "cls"
    # --- larger unlabeled corpora (docs/DESIGN.md §3b) ---
    #: extra unlabeled pools: URIs (folder or s3://) of prepared datasets of any task
    #: (unlabeled / cls / seg; labels and masks ignored, no split written), all of whose rows
    #: join the unlabeled classification stream after the unlabeled part of cls_data
    unlabeled_data: list[str] = field(default_factory=list)
    #: mixing weights of the unlabeled classification stream, one per source: the unlabeled
    #: part of cls_data first, then each unlabeled_data entry (>= 0, not all 0; normalised);
    #: null: proportional to rows (plain concatenation). Each pass draws round(w_i * total)
    #: rows from source i (row groups without replacement, cycling a smaller pool)
    unlabeled_weights: Optional[list[float]] = None
    #: prepared datasets the run is evaluated on afterwards (experiment paper-table fills it):
    #: protected by the contamination guard like the labeled and validation splits
    eval_data: list[str] = field(default_factory=list)
    #: drop unlabeled rows that are copies of a labeled, validation or eval_data image (same
    #: sha256, or phash within near_threshold bits); counts in <run dir>/contamination.json
    contamination_guard: bool = True
    #: near-duplicate distance of the guard in bits of 256; null: multimix.data.overlap's
    #: measured NEAR_THRESHOLD
    near_threshold: Optional[int] = None
    #: rows of a local shuffle buffer in each Train worker that also mixes the blocks of
    #: concurrent data tasks; 0 (default): none, batches are cut from whole blocks, whose rows
    #: each task already shuffled (row groups a seeded permutation scatters over the pool,
    #: stored in a hashed order). A buffer costs the Train worker one more copy of every row
    shuffle_buffer_rows: int = 0
    #: per-worker batch size of each of the five streams
    cls_batch: int = 10
    unlabeled_batch: int = 10
    seg_batch: int = 10
    unlabeled_seg_batch: int = 10
    eval_batch: int = 32


@dataclass
class ModelConfig:
    variant: str = "multimix"
    #: multiplies the encoder widths 16-32-64-128-256
    width: float = 1.0
    dropout: float = 0.25
    num_classes: int = 2
    in_channels: int = 1


@dataclass
class ObjectiveConfig:
    #: confidence threshold t for accepting a pseudo-label
    threshold: float = 0.7
    #: λ, weight of the unlabeled (pseudo-label) classification term
    lambda_u: float = 0.25
    #: α, weight of the supervised Dice term
    alpha: float = 5.0
    #: β, weight of the segmentation KL consistency term
    beta: float = 0.01
    # --- stable semi-supervised levers (docs/RESULTS.md); defaults = the paper ---
    #: pseudo-label acceptance: "fixed" (FixMatch, every class at t), "flexmatch" (Zhang et
    #: al. 2021, class-wise from t) or "freematch" (Wang et al. 2023, self-adaptive)
    pl_threshold: Literal["fixed", "flexmatch", "freematch"] = "fixed"
    #: distribution alignment of the weak-view probabilities (ReMixMatch): "none", "labeled"
    #: (toward the labeled split's class prior) or "uniform"
    dist_align: Literal["none", "labeled", "uniform"] = "none"
    #: momentum of the running statistics of dist_align / flexmatch / freematch
    ssl_momentum: float = 0.99
    #: EMA teacher decay (makes the pseudo-labels, is validated and checkpointed); 0 = none
    ema_decay: float = 0.0
    #: EMA warm-up (Mean Teacher): decay min(ema_decay, 1 - 1/(t+1)) at update t, so a short
    #: schedule does not validate and save a copy that is still mostly the initial weights
    ema_warmup: bool = True
    #: classification decision of evaluate / predict: "argmax" (the paper) or a threshold on
    #: p(class 1) chosen on the validation split by "balanced_accuracy" or "youden"
    decision: Literal["argmax", "balanced_accuracy", "youden"] = "argmax"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    #: StepLR(step_size, gamma), stepped once per epoch
    step_size: int = 8
    gamma: float = 0.1
    epochs: int = 25
    #: optimizer steps per epoch; None derives it from the unlabeled pool and batch size
    steps_per_epoch: Optional[int] = None
    #: mixed precision: "none" or "bf16" (autocast)
    precision: Literal["none", "bf16"] = "none"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0


@dataclass
class AugmentConfig:
    #: RandAugment: number of ops per strong view and magnitude (0..10)
    n_ops: int = 2
    magnitude: int = 10
    #: random-crop reflect padding as a fraction of the image size (weak and strong views)
    pad_fraction: float = 0.125
    cutout: bool = False
    #: geometric augmentation of labeled segmentation pairs (off in the paper)
    seg_augment: bool = False


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    #: CPUs reserved for each Train worker (fractions allowed: on 2 cores leave room for Ray Data)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    #: CPUs for each Ray Data decode/augment task
    data_cpus_per_task: float = 1.0
    #: upper bound on concurrent Ray Data augment tasks (None: as many as CPUs allow)
    data_concurrency: Optional[int] = None
    #: restarts after a worker failure (Ray Train FailureConfig.max_failures); -1 = unlimited
    max_failures: int = 0


@dataclass
class StorageConfig:
    """Object-storage access. ``endpoint``/``region`` fall back to ``AWS_ENDPOINT_URL(_S3)`` /
    ``AWS_REGION``; keys set here are for local runs only (they are exported to the environment
    of the local Ray and never stored); unset keys come from the standard AWS credential chain
    where the filesystem is used."""

    endpoint: Optional[str] = None
    region: Optional[str] = None
    access_key_id: Optional[str] = field(default=None, repr=False)
    secret_access_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)

    SECRET_FIELDS = ("access_key_id", "secret_access_key", "session_token")


@dataclass
class RunConfig:
    name: str = "multimix"
    #: where runs (checkpoints, results) are written: a directory or s3://bucket/prefix
    storage_path: str = "./runs"
    #: validation metric that selects the "best" checkpoint, and whether higher is better;
    #: default: balanced accuracy of the decision + Dice (metrics.val_score_balanced), robust to
    #: a decision collapsed to the majority class; "val_score" = AUC + Dice (the earlier default)
    checkpoint_metric: str = "val_score_balanced"
    checkpoint_mode: Literal["max", "min"] = "max"
    log_every: int = 10
    #: TensorBoard event files in <run dir>/tensorboard/ (multimix.tracking); a Tune trial
    #: leaves them to Tune's own TensorBoard logger
    tensorboard: bool = True
    #: MLflow tracking (the mlflow extra): the config, every epoch's metrics, the evaluation
    mlflow: bool = False
    #: MLflow tracking URI: "" = mlruns/ in the working directory, a local path, or a URI
    #: (sqlite:///..., http://host:5000, databricks)
    mlflow_uri: str = ""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self, include_secrets: bool = False) -> dict:
        """Plain nested dict (YAML/JSON-safe). Secrets are left out unless asked for."""
        out = dataclasses.asdict(self)
        if not include_secrets:
            for key in StorageConfig.SECRET_FIELDS:
                out["storage"].pop(key, None)
        return out

    def validate(self) -> "Config":
        _validate(self)
        return self


# ---------------------------------------------------------------------------------------------
# building from dicts, with type checks that name the key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + (
            " or null" if type(None) in typing.get_args(tp) else ""
        )
    return getattr(tp, "__name__", str(tp))


#: a number as written in a config or --set (``1e-4``, ``-2.5E3``, ``.5``)
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is not bool:
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, e.g. [a, b], got {value!r}")
        item = typing.get_args(tp)[0]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads 1e-4 as a string: it wants a dot (1.0e-4)
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # programming error


#: keys that existed once: setting one is an error that says what is used now
REMOVED_KEYS = {
    "data.reader": "was removed: the unlabeled pools are always read by multimix's row-group "
                   "reader (the former data.reader=row_groups); drop the key",
    "data.sharding": "was removed: the unlabeled streams are always split across the Train "
                     "workers by Ray Train (the former data.sharding=streaming_split); drop "
                     "the key",
}


def without_removed_keys(data: dict) -> dict:
    """A copy of a stored config dict (``Config.to_dict()`` of an older checkpoint) without
    the keys in :data:`REMOVED_KEYS`, which then held the values used now."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key in REMOVED_KEYS:
        section, name = key.split(".")
        if isinstance(out.get(section), dict):
            out[section].pop(name, None)
    return out


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    for name in data:
        key = f"{prefix}.{name}" if prefix else name
        if key in REMOVED_KEYS:
            raise ConfigError(f"{key} {REMOVED_KEYS[key]}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            + ", ".join(f"{where}{k}" for k in unknown)
            + f" (known: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# validation of ranges and cross-field rules


def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}, got {value!r}")


def _validate(cfg: Config) -> None:
    d, m, o, op, a, s = cfg.data, cfg.model, cfg.objective, cfg.optim, cfg.augment, cfg.scaling
    _check(d.image_size >= 32 and d.image_size % 32 == 0, "data.image_size",
           "must be a positive multiple of 32",
           d.image_size)
    for key in ("cls_labeled", "seg_labeled"):
        v = getattr(d, key)
        _check(v == "all" or v >= 1, f"data.{key}", "must be a positive number or 'all'", v)
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)", d.val_fraction)
    _check(d.allow_skipped >= 0, "data.allow_skipped", "must be >= 0", d.allow_skipped)
    _check(d.max_labeled_mb > 0, "data.max_labeled_mb", "must be > 0", d.max_labeled_mb)
    _check(d.readahead_mb is None or d.readahead_mb > 0, "data.readahead_mb",
           "must be > 0 MB or null (Ray's default)", d.readahead_mb)
    for key in ("cls_batch", "unlabeled_batch", "seg_batch", "unlabeled_seg_batch", "eval_batch"):
        _check(getattr(d, key) >= 1, f"data.{key}", "must be >= 1", getattr(d, key))
    _check(d.shuffle_buffer_rows >= 0, "data.shuffle_buffer_rows", "must be >= 0 (0: none)",
           d.shuffle_buffer_rows)
    _validate_unlabeled(d)

    _check(m.variant in VARIANTS, "model.variant", f"must be one of {', '.join(VARIANTS)}", m.variant)
    _check(m.width > 0, "model.width", "must be > 0", m.width)
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)", m.dropout)
    _check(m.num_classes >= 2, "model.num_classes", "must be >= 2", m.num_classes)
    _check(m.in_channels >= 1, "model.in_channels", "must be >= 1", m.in_channels)

    _check(0.0 < o.threshold < 1.0, "objective.threshold",
           "must be in the open interval (0, 1)", o.threshold)
    for key in ("lambda_u", "alpha", "beta"):
        _check(getattr(o, key) >= 0.0, f"objective.{key}", "must be >= 0 (a loss weight)",
               getattr(o, key))
    _check(0.0 <= o.ssl_momentum < 1.0, "objective.ssl_momentum", "must be in [0, 1)",
           o.ssl_momentum)
    _check(0.0 <= o.ema_decay < 1.0, "objective.ema_decay", "must be in [0, 1) (0: no EMA)",
           o.ema_decay)
    _check(o.decision == "argmax" or m.num_classes == 2, "objective.decision",
           "a threshold decision needs model.num_classes = 2", o.decision)

    _check(op.lr > 0, "optim.lr", "must be > 0", op.lr)
    _check(op.weight_decay >= 0, "optim.weight_decay", "must be >= 0", op.weight_decay)
    _check(op.step_size >= 1, "optim.step_size", "must be >= 1", op.step_size)
    _check(0 < op.gamma <= 1, "optim.gamma", "must be in (0, 1]", op.gamma)
    _check(op.epochs >= 1, "optim.epochs", "must be >= 1", op.epochs)
    _check(op.steps_per_epoch is None or op.steps_per_epoch >= 1, "optim.steps_per_epoch",
           "must be >= 1 or null", op.steps_per_epoch)

    _check(0 <= a.n_ops <= 13, "augment.n_ops", "must be in [0, 13]", a.n_ops)
    _check(0 <= a.magnitude <= 10, "augment.magnitude", "must be in [0, 10]", a.magnitude)
    _check(0 <= a.pad_fraction <= 0.5, "augment.pad_fraction", "must be in [0, 0.5]",
           a.pad_fraction)

    _check(s.num_workers >= 1, "scaling.num_workers", "must be >= 1", s.num_workers)
    _check(s.cpus_per_worker >= 0, "scaling.cpus_per_worker", "must be >= 0", s.cpus_per_worker)
    _check(s.gpus_per_worker >= 0, "scaling.gpus_per_worker", "must be >= 0", s.gpus_per_worker)
    _check(not s.use_gpu or s.gpus_per_worker > 0, "scaling.gpus_per_worker",
           "must be > 0 when scaling.use_gpu is true", s.gpus_per_worker)
    _check(s.data_cpus_per_task > 0, "scaling.data_cpus_per_task", "must be > 0",
           s.data_cpus_per_task)
    _check(s.data_concurrency is None or s.data_concurrency >= 1, "scaling.data_concurrency",
           "must be >= 1 or null", s.data_concurrency)
    _check(s.max_failures >= -1, "scaling.max_failures", "must be >= -1", s.max_failures)

    _check(bool(cfg.run.name.strip()), "run.name", "must not be empty", cfg.run.name)
    _check(cfg.run.log_every >= 1, "run.log_every", "must be >= 1", cfg.run.log_every)
    _check(cfg.run.mlflow_uri == cfg.run.mlflow_uri.strip() and "\n" not in cfg.run.mlflow_uri,
           "run.mlflow_uri", "must be a path or a URI (no surrounding spaces)",
           cfg.run.mlflow_uri)


def _validate_unlabeled(d: DataConfig) -> None:
    """The larger-corpus keys: extra unlabeled pools, their weights, the guard."""
    for key in ("unlabeled_data", "eval_data"):
        uris = getattr(d, key)
        for i, uri in enumerate(uris):
            _check(bool(uri.strip()), f"data.{key}[{i}]", "must be a dataset URI", uri)
        dup = sorted({u for u in uris if uris.count(u) > 1})
        _check(not dup, f"data.{key}", f"lists {dup[0] if dup else ''} twice", uris)
    for i, uri in enumerate(d.unlabeled_data):
        _check(uri.rstrip("/") not in (d.cls_data.rstrip("/"), d.seg_data.rstrip("/"))
               or not uri, f"data.unlabeled_data[{i}]",
               "is data.cls_data or data.seg_data (their unlabeled part is used already)", uri)
    w = d.unlabeled_weights
    if w is not None:
        n = 1 + len(d.unlabeled_data)
        _check(len(w) == n, "data.unlabeled_weights",
               f"needs {n} weights (cls_data's unlabeled part, then each of "
               f"data.unlabeled_data), or null", w)
        _check(all(x >= 0 for x in w) and sum(w) > 0, "data.unlabeled_weights",
               "must be >= 0 and not all 0", w)
    known = ("cls", "seg", "extra", "cls+extra")
    _check(d.unlabeled_seg_from in known or d.unlabeled_seg_from in d.unlabeled_data,
           "data.unlabeled_seg_from", f"must be one of {', '.join(known)} or a URI listed in "
           "data.unlabeled_data", d.unlabeled_seg_from)
    _check(d.unlabeled_seg_from not in ("extra", "cls+extra") or bool(d.unlabeled_data),
           "data.unlabeled_seg_from", "needs data.unlabeled_data (no extra pools given)",
           d.unlabeled_seg_from)
    _check(d.near_threshold is None or 0 <= d.near_threshold <= MAX_THRESHOLD,
           "data.near_threshold", f"must be in [0, {MAX_THRESHOLD}] bits (of 256) or null",
           d.near_threshold)


# ---------------------------------------------------------------------------------------------
# presets, YAML files and overrides


def list_presets() -> list[str]:
    """Names of the presets shipped inside the package (``multimix/presets/*.yaml``)."""
    root = resources.files("multimix") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))



def _read_yaml(source: str) -> dict:
    """Read a preset name (``paper``) or a YAML file path; return its mapping."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {source!r} does not exist")
        text = path.read_text()
        where = str(path)
    else:
        res = resources.files("multimix") / "presets" / f"{source}.yaml"
        if not res.is_file():
            raise ConfigError(
                f"unknown preset {source!r} (presets: {', '.join(list_presets())}; "
                "or give a path to a .yaml file)"
            )
        text = res.read_text()
        where = f"preset {source}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_read_yaml(base), data)
    return data


def _field_type(key: str) -> Any:
    """The annotation of the Config field ``key`` (``"run.name"``), or None where ``key`` names
    no leaf field (an unknown key is reported by ``_build``)."""
    tp: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return None if dataclasses.is_dataclass(tp) else tp


def _fits(value: Any, tp: Any, key: str) -> bool:
    try:
        _coerce(value, tp, key)
    except ConfigError:
        return False
    return True


def add_config_arguments(parser, default: Optional[str] = None, *, what: str = "",
                         aliases: tuple = ()) -> None:
    """Add ``-c/--config`` and ``-s/--set`` to a subcommand's parser: the one way every
    command that reads a config takes it (``args.config``, ``args.set``; read them with
    :func:`load_config`).

    Args:
        default: the preset used when ``--config`` is not given (None: the dataclass defaults,
            which are the paper's hyper-parameters).
        what: what this command reads from the config, for the help text (e.g. "storage
            settings").
        aliases: more option strings for ``--config`` (``experiment paper-table --preset``).
    """
    used = f"{what}; " if what else ""
    fallback = default or "the built-in defaults, which are the paper's"
    parser.add_argument(
        "-c", "--config", *aliases, dest="config", default=default, metavar="PRESET|YAML",
        help=f"{used}a preset ({', '.join(list_presets())}) or a YAML file "
             f"(default: {fallback})")
    parser.add_argument(
        "-s", "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.epochs=3 or "
             "--set storage.endpoint=http://127.0.0.1:8333 (repeatable; applied after "
             "--config)")


def parse_overrides(items: list[str] | None) -> dict:
    """``["objective.threshold=0.8", "data.cls_labeled=all"]`` → nested dict.

    Values are parsed as YAML scalars (``0.8`` → float, ``true`` → bool, ``null`` → None),
    then by the type of the field they set: where the YAML value does not fit the field and the
    text as written does (a string field), the text is kept. So ``run.name=2024_01`` stays the
    name ``"2024_01"`` (YAML reads an integer) and ``run.name=true`` the name ``"true"``, while
    ``storage.endpoint=null`` still clears an optional field. (Unknown keys are kept as parsed;
    ``load_config`` reports them.)
    """
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. objective.threshold=0.8")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        tp = _field_type(key)
        if tp is not None and value != raw.strip():
            if not _fits(value, tp, key) and _fits(raw.strip(), tp, key):
                value = raw.strip()
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return out


def load_config(
    source: str | dict | None = None, overrides: list[str] | dict | None = None
) -> Config:
    """Build and validate a :class:`Config`.

    Args:
        source: a preset name (``"paper"``, ``"cpu-small"``), a YAML path, a dict, or None for
            the dataclass defaults (which equal the paper's hyper-parameters).
        overrides: ``["section.key=value", ...]`` (``--set``) or a nested dict, applied last.
    """
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        data = _read_yaml(source)
    if overrides:
        upd = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        data = _merge(data, upd)
    cfg = _build(Config, data, "")
    _fill_storage_from_env(cfg.storage)
    return cfg.validate()


def _fill_storage_from_env(st: StorageConfig) -> None:
    """Endpoint and region (not secret) from the standard AWS variables when the config has none.

    Keys are never copied from the environment into the config: where the user gave none, the
    S3 filesystem is built without keys and pyarrow's default AWS chain (environment, shared
    config, instance profile, IRSA/pod identity) resolves them in the process that uses it, so
    nothing that Ray pickles (run state, Tune state) holds a key (docs/DESIGN.md §9)."""
    env = os.environ
    if st.endpoint is None:
        st.endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    if st.region is None:
        st.region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
