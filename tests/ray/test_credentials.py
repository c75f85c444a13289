"""S3 keys stay out of what Ray stores: refused in the config on a cluster, and `multimix tune`
keeps them out of the runtime envs Ray Tune gives its trial actors."""

from __future__ import annotations

import pytest


def test_tune_copies_no_aws_key_into_trial_runtime_envs(monkeypatch):
    """Ray Tune's own list of variables it copies into trial actors loses the AWS keys (the
    attribute must exist: a Ray upgrade that moves it fails here instead of leaking)."""
    from ray.tune.execution import class_cache

    from multimix import tune

    # the list as Ray ships it (an earlier search in this process has already taken the keys
    # off: put them back, so the test does not depend on which tests ran before it)
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE",
                        set(class_cache.ENV_VARS_TO_PROPAGATE) | set(tune._KEY_VARS))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("PL_DISABLE_FORK", "1")
    tune._keep_keys_out_of_trial_runtime_envs()
    cached = class_cache._ActorClassCache()

    class Trainable:
        pass

    remote = cached.get(Trainable)
    env_vars = remote._default_options["runtime_env"]["env_vars"]
    assert "AWS_SECRET_ACCESS_KEY" not in env_vars and env_vars["PL_DISABLE_FORK"] == "1"


def test_keys_in_the_config_are_refused_on_a_cluster(monkeypatch):
    from multimix.config import ConfigError, load_config
    from multimix.train import init_ray

    cfg = load_config("cpu-small", ["storage.access_key_id=AKIAEXAMPLE",
                                    "storage.secret_access_key=inline-secret"])
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # never reached: refused first
    with pytest.raises(ConfigError, match="for local runs") as info:
        init_ray(cfg)
    assert "inline-secret" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)
