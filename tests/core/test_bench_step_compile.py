"""``bench step --compile`` falls back to eager with one line when compiling fails."""

from __future__ import annotations

import argparse

from multimix.bench import step as S


def test_compile_failure_falls_back_with_a_line(monkeypatch, capsys):
    real = S._step_fn
    calls = []

    def failing(which):
        fn = real(which)

        def step(model, *a, **k):
            calls.append(which)
            if model.encoder._compiled_call_impl is not None:
                raise RuntimeError("inductor: no C++ compiler\nmore detail")
            return fn(model, *a, **k)
        return step

    monkeypatch.setattr(S, "_step_fn", failing)
    p = argparse.ArgumentParser()
    S.add_arguments(p)
    args = p.parse_args(["--size", "32", "--batch", "1", "--width", "0.25", "--compile",
                         "--iters", "1", "--warmup", "0", "--no-memory"])
    res = S.measure(args)
    assert res["settings"]["compile"] is False
    assert res["settings"]["compile_fallback"] == "RuntimeError: inductor: no C++ compiler"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bench step: --compile failed (RuntimeError: inductor: no C++ compiler); "
                   "measuring without compile"]
    assert res["img_per_s"] > 0 and calls[0] == "ours"
