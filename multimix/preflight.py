"""A run's inputs checked before Ray starts (no Ray): ``train``, ``tune`` and ``experiment
paper-table`` call :func:`check_inputs` first, so a wrong input costs no Ray start-up and
leaves nothing behind.

Checked, each failure one :class:`~multimix.errors.UserError` line naming the config key:

- no S3 keys in the config when connecting to a cluster (``RAY_ADDRESS``);
- the run directory can be written (``run.storage_path``: bucket and credentials, or a local
  directory);
- every dataset the variant needs is set (``data.cls_data`` / ``data.seg_data``), is a prepared
  dataset of the right task (a segmentation set given as ``data.cls_data`` is refused), was
  prepared at ``data.image_size``, has ``model.num_classes`` classes, and its shards match its
  manifest (:func:`multimix.data.dataset.open_dataset`: shard list, sizes, row counts);
- every extra unlabeled pool (``data.unlabeled_data``: any task, prepared at
  ``data.image_size``, no split, nothing written into it) and evaluation set
  (``data.eval_data``) opens: manifest and shards;
- the label budgets fit the pools (the split is computed in memory, never written here), and
  a variant that trains on unlabeled images has some left (or extra pools);
- (``train``) the labeled and validation pools decode, losing at most ``data.allow_skipped``
  rows each.

Split files are written by :func:`multimix.data.pipeline.build_data` only after every check
(these, and the labeled pools' skipped-row check) passed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from multimix import resources, tracking
from multimix.config import ConfigError
from multimix.data import dataset, splits, storage
from multimix.data.pipeline import check_skipped, load_pools
from multimix.errors import DataError, StorageError, UserError
from multimix.variants import datasets_for, variant_flags

__all__ = ["Preflight", "Reads", "check_inputs", "check_dataset",
           "check_run_storage"]

_TASK_WORD = {"cls": "classification", "seg": "segmentation"}


@dataclass
class Preflight:
    """What the checks found: per task (``cls`` / ``seg``) the manifest, the verified dataset
    (:class:`~multimix.data.dataset.VerifiedDataset`) and the split (computed, not written);
    ``classes``: class names of the classification set; ``pools``: the decoded labeled and
    validation pools (:func:`multimix.data.pipeline.load_pools`), when asked for."""

    manifests: dict = field(default_factory=dict)
    datasets: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)
    classes: list = field(default_factory=list)
    pools: Optional[dict] = None


class Reads:
    """The dataset reads of the checks (manifests, opened shards, computed splits), each made
    once per dataset (and budget) and kept: ``tune`` checks every searched combination with one
    ``Reads``, so a grid of budgets × variants reads each dataset once, not once per combination
    (on S3 each read is a request). A failed read is not kept (it raises, as without the memo).
    One ``Reads`` serves one storage config (``storage_cfg``)."""

    def __init__(self, storage_cfg=None):
        self.storage = storage_cfg
        self._manifests: dict = {}
        self._datasets: dict = {}
        self._splits: dict = {}
        self._columns: dict = {}

    def manifest(self, uri: str) -> dict:
        """:func:`multimix.data.dataset.read_manifest` of ``uri``."""
        if uri not in self._manifests:
            self._manifests[uri] = dataset.read_manifest(uri, self.storage)
        return self._manifests[uri]

    def dataset(self, uri: str, manifest: dict):
        """:func:`multimix.data.dataset.open_dataset` of ``uri`` (shards checked against
        ``manifest``)."""
        if uri not in self._datasets:
            self._datasets[uri] = dataset.open_dataset(uri, self.storage, manifest=manifest)
        return self._datasets[uri]

    def columns(self, uri: str):
        """The split columns (id, label, hash) of ``uri`` as one Arrow table, read once from
        the shards :meth:`dataset` checked."""
        if uri not in self._columns:
            manifest = self.manifest(uri)
            data = self.dataset(uri, manifest) if manifest.get("shards") else None
            self._columns[uri] = dataset.read_table(uri, splits.SPLIT_COLUMNS, self.storage,
                                            manifest=manifest, data=data)
        return self._columns[uri]

    def split(self, uri: str, budget, val_fraction: float, seed: int, budget_key: str):
        """:func:`multimix.data.splits.ensure_split` computed in memory (``write=False``) from
        :meth:`columns`; ``budget_key`` names the key in its error."""
        key = (uri, str(budget), float(val_fraction), int(seed))
        if key not in self._splits:
            manifest = self.manifest(uri)
            table = None if manifest.get("task") == "unlabeled" else self.columns(uri)
            self._splits[key] = splits.ensure_split(
                uri, budget, val_fraction, seed, self.storage, budget_key=budget_key,
                write=False, manifest=manifest, table=table)
        return self._splits[key]


def _keyed(key: str, exc: UserError) -> UserError:
    """``exc`` as the same error class with its message prefixed by ``key``."""
    msg = str(exc)
    return type(exc)(msg if msg.startswith(f"{key}:") else f"{key}: {msg}")


def check_dataset(cfg, task: str, key: Optional[str] = None, reads: Optional[Reads] = None):
    """The manifest and verified shards of the ``task`` dataset (``data.<task>_data``), read
    through ``reads`` (a fresh :class:`Reads` when None).

    Raises:
        ConfigError: not set, wrong task, other image size, other class count (names the key).
        DataError / StorageError: missing, not a prepared dataset, shards that do not match the
            manifest, storage trouble (message prefixed with the key).
    """
    reads = reads or Reads(cfg.storage)
    key = key or f"data.{task}_data"
    uri = getattr(cfg.data, f"{task}_data")
    if not uri:
        raise ConfigError(f"{key}: variant {cfg.model.variant!r} needs a prepared "
                          f"{_TASK_WORD[task]} dataset (multimix prepare ...)")
    try:
        man = reads.manifest(uri)
    except UserError as exc:
        raise _keyed(key, exc) from None
    got = man.get("task")
    if got != task:
        raise ConfigError(f"{key}: {uri} is a {_TASK_WORD.get(got, repr(got))} dataset "
                          f"(task={got}); give a {_TASK_WORD[task]} dataset")
    if int(man.get("image_size", -1)) != cfg.data.image_size:
        raise ConfigError(
            f"data.image_size: is {cfg.data.image_size} but {key} was prepared at "
            f"{man.get('image_size')}² (prepare it again with --size {cfg.data.image_size}, or "
            f"--set data.image_size={man.get('image_size')})")
    if task == "cls":
        classes = man.get("classes")
        if not isinstance(classes, list) or len(classes) < 2:
            raise DataError(f"{key}: {uri}/manifest.json lists no classes (got {classes!r})")
        if len(classes) != cfg.model.num_classes:
            raise ConfigError(f"model.num_classes: is {cfg.model.num_classes} but {uri} has "
                              f"classes {list(classes)}")
    try:
        data = reads.dataset(uri, man)
    except UserError as exc:
        raise _keyed(key, exc) from None
    return man, data


def check_run_storage(cfg) -> str:
    """The run directory ``<run.storage_path>/<run.name>``, checked writable (bucket and
    credentials; a local path whose nearest existing folder is a writable directory).

    Raises:
        StorageError: naming ``run.storage_path``.
    """
    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    try:
        storage.check_writable(run_dir, cfg.storage)
    except UserError as exc:
        raise _keyed("run.storage_path", exc) from None
    if not storage.is_s3(run_dir):
        _, p = storage.resolve(run_dir)
        while not os.path.exists(p) and os.path.dirname(p) != p:
            p = os.path.dirname(p)
        if os.path.isdir(p) and not os.access(p, os.W_OK | os.X_OK):
            raise StorageError(f"run.storage_path: {p} is not writable (run directory "
                               f"{run_dir})")
    return run_dir


def _extra_pools(cfg, names, reads: Reads) -> dict:
    """Open every ``data.unlabeled_data`` pool (manifest and shards, any task, prepared at
    ``data.image_size``) and every ``data.eval_data`` set (manifest and shards), when the
    variant reads unlabeled images (``names``: its datasets). Returns ``{URI: manifest}`` of
    the extra pools.

    Raises:
        ConfigError / DataError / StorageError: one line naming ``data.unlabeled_data[i]`` (or
            ``data.eval_data[i]``) and the URI.
    """
    out = {}
    keys = [("unlabeled_data", u) for u in (cfg.data.unlabeled_data if names else [])]
    keys += [("eval_data", u) for u in cfg.data.eval_data]
    for key, uri in keys:
        key = f"data.{key}[{getattr(cfg.data, key).index(uri)}]"
        try:
            man = reads.manifest(uri)
            reads.dataset(uri, man)
        except UserError as exc:
            raise _keyed(key, exc) from None
        if key.startswith("data.unlabeled_data") and \
                int(man.get("image_size", -1)) != cfg.data.image_size:
            raise ConfigError(f"{key}: {uri} was prepared at {man.get('image_size')}², but "
                              f"data.image_size is {cfg.data.image_size} (prepare it again "
                              f"with --size {cfg.data.image_size})")
        if key.startswith("data.unlabeled_data"):
            out[uri] = man
    return out


def check_inputs(cfg, *, storage: bool = True, pools: bool = False,
                 unlabeled: bool = True, reads: Optional[Reads] = None) -> Preflight:
    """Every check of the module docstring, in order (first failure raised). ``storage``:
    also check the run directory (False for a config only compared, never run); ``unlabeled``:
    refuse a variant that trains on unlabeled images when the budget leaves none (``tune``
    leaves this to the trial: ``experiment paper-table``'s default ``all:all`` budget gives
    the SSL rows none, and those trials fail alone, with this line); ``pools``:
    also load the labeled and validation pools and refuse undecodable rows beyond
    ``data.allow_skipped`` (:func:`multimix.data.pipeline.check_skipped`); ``reads``: a
    :class:`Reads` shared with other checks of the same storage (a fresh one when None)."""
    reads = reads or Reads(cfg.storage)
    resources.check_cluster_keys(cfg.storage)
    if storage:
        run_dir = check_run_storage(cfg)
        # a rerun resumes: its checkpoint is read and checked here, not in a Train worker
        from multimix.checkpoint import check_resume

        check_resume(run_dir, cfg.storage)
        tracking.check(cfg)  # the mlflow extra when run.mlflow is on; its URI made absolute
    flags = variant_flags(cfg.model.variant)
    out = Preflight()
    for task, need in (("cls", flags.has_cls), ("seg", flags.has_seg)):
        if not need:
            continue
        out.manifests[task], out.datasets[task] = check_dataset(cfg, task, reads=reads)
        if task == "cls":
            out.classes = list(out.manifests[task]["classes"])
    names = datasets_for(cfg.model.variant)
    extra = _extra_pools(cfg, names, reads)
    for task in out.datasets:
        uri = getattr(cfg.data, f"{task}_data")
        budget = getattr(cfg.data, f"{task}_labeled")
        out.splits[task] = reads.split(uri, budget, cfg.data.val_fraction,
                                       cfg.data.split_seed, f"data.{task}_labeled")
    for name in names:
        frm = "cls+extra" if name == "unl_cls" else cfg.data.unlabeled_seg_from
        task = frm.split("+")[0] if frm in ("cls", "seg", "cls+extra") else None
        if task is not None and task not in out.splits:
            raise ConfigError(f"data.unlabeled_seg_from: is {task!r} but variant "
                              f"{cfg.model.variant!r} has no {_TASK_WORD[task]} dataset")
        more = bool(extra) and frm != task  # the stream also reads the extra pools
        if unlabeled and task is not None and not out.splits[task].unlabeled and not more:
            raise ConfigError(
                f"data.{task}_labeled: {getattr(cfg.data, f'{task}_labeled')!r} leaves no "
                f"unlabeled images in {getattr(cfg.data, f'{task}_data')}, but variant "
                f"{cfg.model.variant!r} trains on them ({name}); give a smaller budget"
                + (" or data.unlabeled_data" if name == "unl_cls" else ""))
    if pools:
        out.pools = load_pools(cfg, out.splits)
        check_skipped(cfg, out.pools, out.splits)
    return out
