"""``multimix tune``: Ray Tune search over the MultiMix hyper-parameters (t, λ, α, β, budgets).

Each trial is a Tune function that builds the same :class:`TorchTrainer` as ``multimix train``
(:func:`multimix.train.build_trainer`) and forwards its per-epoch reports to Tune with
``TuneReportCallback`` (Ray 2.60 Train V2: ``Tuner(TorchTrainer)`` is gone). Trials reuse the split
files beside the data, so trials with the same budget see exactly the same labeled ids.

    multimix tune --config paper --set data.cls_data=... --set data.seg_data=... \\
        --space objective.threshold=uniform:0.5,0.95 --space objective.lambda_u=loguniform:0.05,1 \\
        --space data.cls_labeled=choice:100,1000,all --num-samples 16 --concurrent 4

Space syntax: ``KEY=choice:a,b,c`` | ``uniform:lo,hi`` | ``loguniform:lo,hi`` | ``randint:lo,hi``.
Without ``--space`` the search covers t, λ, α and β around the paper's values.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from multimix.config import ConfigError, load_config
from multimix.errors import UserError, one_line

DEFAULT_SPACE = (
    "objective.threshold=uniform:0.5,0.95",
    "objective.lambda_u=loguniform:0.05,1.0",
    "objective.alpha=loguniform:1.0,10.0",
    "objective.beta=loguniform:0.001,0.1",
)
KINDS = ("choice", "uniform", "loguniform", "randint")


def add_arguments(p) -> None:
    p.add_argument("--config", "-c", default="paper", help="preset or YAML (default: paper)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed config override (repeatable)")
    p.add_argument("--space", action="append", default=[], metavar="KEY=KIND:ARGS",
                   help="a searched value, e.g. objective.threshold=uniform:0.5,0.95 or "
                        "data.cls_labeled=choice:100,1000,all (repeatable)")
    p.add_argument("--num-samples", type=int, default=8, help="trials (default 8)")
    p.add_argument("--concurrent", type=int, default=1,
                   help="trials running at once (each runs scaling.num_workers workers)")
    p.add_argument("--seed", type=int, default=0, help="search seed (default 0)")


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
        args = [yaml.safe_load(a) for a in raw.split(",")]
        if kind != "choice" and (len(args) != 2 or not all(isinstance(a, (int, float))
                                                           for a in args)):
            raise ConfigError(f"--space {item!r}: {kind} takes two numbers lo,hi")
        out[key.strip()] = (kind, args)
    return out


def check_space(base_cfg, space: dict) -> None:
    """Every searched key exists and every value a trial can draw validates (edge values)."""
    for key, (kind, args) in space.items():
        values = args if kind == "choice" else [args[0], args[1] - (1 if kind == "randint" else 0)]
        for v in values:
            load_config(base_cfg.to_dict(include_secrets=True), [f"{key}={v}"])


def _to_tune(space: dict) -> dict:
    from ray import tune

    make = {"choice": lambda a: tune.choice(a), "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {key: make[kind](args) for key, (kind, args) in space.items()}


def trial(params: dict, base: dict, overrides: list[str]) -> None:
    """One Tune trial: the base config plus this trial's values, trained with Ray Train."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from multimix.train import build_trainer, prepare_inputs

    sets = list(overrides) + [f"{k}={v}" for k, v in params.items()]
    ctx = ray.tune.get_context()
    cfg = load_config(base, sets + [f"run.name={base['run']['name']}-{ctx.get_trial_id()}"])
    trainer = build_trainer(cfg, prepare_inputs(cfg), callbacks=[TuneReportCallback()])
    trainer.fit()


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


def tune(cfg, space: dict, overrides: list[str], num_samples: int = 8, concurrent: int = 1,
         seed: int = 0):
    """Run the search; returns the :class:`ray.tune.ResultGrid`."""
    from ray import tune as rt
    from ray.tune.search import BasicVariantGenerator

    from multimix.data import storage
    from multimix.train import init_ray

    check_space(cfg, space)
    init_ray(cfg)
    storage.check_writable(cfg.run.storage_path, cfg.storage)
    # keyless: Tune pickles it into tuner.pkl / experiment state; keys come from the AWS chain
    fs, path = storage.resolve(cfg.run.storage_path, storage.chain_storage(cfg.storage))
    base = cfg.to_dict(include_secrets=False)  # trial actors read keys from their environment
    _keep_keys_out_of_trial_runtime_envs()
    tuner = rt.Tuner(
        rt.with_resources(rt.with_parameters(trial, base=base, overrides=overrides), {"CPU": 0.01}),
        param_space=_to_tune(space),
        tune_config=rt.TuneConfig(metric=cfg.run.checkpoint_metric, mode=cfg.run.checkpoint_mode,
                                  num_samples=num_samples, max_concurrent_trials=concurrent,
                                  search_alg=BasicVariantGenerator(random_state=seed)),
        run_config=rt.RunConfig(name=f"{cfg.run.name}-tune", storage_path=path,
                                storage_filesystem=fs),
    )
    return tuner.fit()


def summarize(grid, cfg) -> list[dict]:
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial": Path(r.path).name if r.path else None,
                     "config": r.config, cfg.run.checkpoint_metric: m.get(cfg.run.checkpoint_metric),
                     "epochs": (m.get("epoch", -1) + 1) if m else 0,
                     "error": one_line(r.error) if r.error else None})
    return rows


def run(args) -> int:
    from multimix.data import storage

    cfg = load_config(args.config, args.set)
    space = parse_space(args.space or list(DEFAULT_SPACE))
    grid = tune(cfg, space, list(args.set), args.num_samples, args.concurrent, args.seed)
    rows = summarize(grid, cfg)
    out = storage.join(cfg.run.storage_path, f"{cfg.run.name}-tune", "tune_results.json")
    storage.write_bytes(out, json.dumps(rows, indent=2, default=str).encode(), cfg.storage)
    metric = cfg.run.checkpoint_metric
    for row in rows:
        print(f"{row['trial']}: {metric}={row[metric]} {row['config']}"
              + (f" ERROR {row['error']}" if row["error"] else ""))
    print(f"results: {out}")
    failed = [r for r in rows if r["error"]]
    if len(failed) == len(rows):
        raise UserError(f"all {len(rows)} trials failed; first: {failed[0]['error']}")
    best = grid.get_best_result()
    print(f"best: {metric}={best.metrics.get(metric)} with {best.config}")
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} trials failed; first: "
                        f"{failed[0]['error']}")
    return 0
