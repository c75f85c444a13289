"""`multimix tune` keeps S3 keys out of the runtime envs Ray Tune gives its trial actors."""

from __future__ import annotations


def test_tune_copies_no_aws_key_into_trial_runtime_envs(monkeypatch):
    """Ray Tune's own list of variables it copies into trial actors loses the AWS keys (the
    attribute must exist: a Ray upgrade that moves it fails here instead of leaking)."""
    from ray.tune.execution import class_cache

    from multimix import tune

    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE",
                        set(class_cache.ENV_VARS_TO_PROPAGATE))
    assert "AWS_SECRET_ACCESS_KEY" in class_cache.ENV_VARS_TO_PROPAGATE
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("PL_DISABLE_FORK", "1")
    tune._keep_keys_out_of_trial_runtime_envs()
    cached = class_cache._ActorClassCache()

    class Trainable:
        pass

    remote = cached.get(Trainable)
    env_vars = remote._default_options["runtime_env"]["env_vars"]
    assert "AWS_SECRET_ACCESS_KEY" not in env_vars and env_vars["PL_DISABLE_FORK"] == "1"
