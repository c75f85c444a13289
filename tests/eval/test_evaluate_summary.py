"""``evaluate``'s terminal summary (a few lines, at most 100 columns; the tables stay in
report.md) and its figures' per-image titles (true label, predicted label, p(PNEUMONIA); Dice
of that very image), on the known network of :mod:`test_evaluate_known`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from test_evaluate_known import OTHER_CLS, known  # noqa: F401 - the fixture

from multimix import plots
from multimix.evaluate import SUMMARY_WIDTH, evaluate_checkpoint, summary_text


def test_the_cli_prints_a_summary_that_fits_100_columns(known, tmp_path, capsys):  # noqa: F811
    from multimix.cli import main

    assert main(["evaluate", "--checkpoint", known["ckpt"], "--cls-data", known["other_cls"],
                 known["own_cls"], "--seg-data", known["own_seg"],
                 "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in out[:-1]) <= SUMMARY_WIDTH, out
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    text = "\n".join(out)
    assert "| set |" not in text  # the tables are in report.md, not on the terminal
    for name, m in report["cls"].items():
        row = next(line for line in out if line.startswith(name))
        assert row.split()[1:] == [str(m["n"]), f"{m['accuracy']:.4f}",
                                   f"{m['balanced_accuracy']:.4f}", f"{m['auc']:.4f}"]
    s = report["seg"]["own-seg"]
    row = next(line for line in out if line.startswith("own-seg"))
    assert row.split()[1:] == [str(s["n"]), f"{s['dice_mean']:.4f}", f"{s['hd95_mean']:.1f}"]
    assert out[-1].startswith("report: ")


def test_long_set_names_are_cut_to_fit():
    r = {"epoch": 0, "variant": "multimix", "image_size": 256, "decision_threshold": 0.4321,
         "cls": {"x" * 150: {"n": 123456, "accuracy": 0.9, "balanced_accuracy": float("nan"),
                             "auc": 0.95}},
         "seg": {"y" * 99: {"n": 3, "dice_mean": 0.9, "hd95_mean": 1234.5}}}
    lines = summary_text(r).splitlines()
    assert len(lines) == 5 and max(map(len, lines)) <= 100
    assert "n/a" in lines[2] and "1234.5" in lines[4]


def test_figures_are_titled_per_image(known, tmp_path, monkeypatch):  # noqa: F811
    seen = {}

    def spy(name, real):
        def f(*args, **kw):
            seen[name] = kw.get("titles")
            return real(*args, **kw)
        return f

    monkeypatch.setattr(plots, "plot_saliency", spy("saliency", plots.plot_saliency))
    monkeypatch.setattr(plots, "plot_boundaries", spy("boundaries", plots.plot_boundaries))
    res = evaluate_checkpoint(known["ckpt"], cls_data=[known["other_cls"]],
                              out_dir=str(tmp_path / "cls"))
    titles = seen.pop("saliency")
    assert len(titles) == len(OTHER_CLS)
    names = ("NORMAL", "PNEUMONIA")
    for t in titles:  # P(PNEUMONIA) = v / 255 for the known network; argmax decision
        image_id, labels, p = t.split("\n")
        y, v = OTHER_CLS[image_id]
        assert labels == f"true {names[y]}, pred {names[int(v > 127.5)]}"
        assert p == f"p(PNEUMONIA) = {v / 255:.2f}"
    assert Path(res["json"]).exists()
    res = evaluate_checkpoint(known["ckpt"], seg_data=[known["own_seg"]],
                              out_dir=str(tmp_path / "seg"))
    report = json.loads(Path(res["json"]).read_text())
    with open(report["per_image"]["seg"], newline="") as f:
        dice = {r["id"]: float(r["dice"]) for r in csv.DictReader(f)}
    titles = seen["boundaries"]
    assert titles and all(t == f"{t.split(chr(10))[0]}\nDice {dice[t.split(chr(10))[0]]:.3f}"
                          for t in titles), titles


def test_run_curves_figure(tmp_path):
    nan = float("nan")
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_ce_sup": 0.5,
                "val_cls_auc": 0.6 + 0.1 * e, "val_cls_balanced_accuracy": 0.5,
                "val_seg_dice_mean": 0.8, "val_cls_threshold": 0.4 + 0.1 * e,
                "train_accept_rate": 0.2, "train_accept_rate_c0": 0.1,
                "train_accept_rate_c1": nan if e == 0 else 0.3} for e in range(3)]
    assert plots._curve_keys(history, plots.RUN_CURVES[3][2]) == [
        "train_accept_rate", "train_accept_rate_c0", "train_accept_rate_c1"]
    assert plots._curve_keys(history, ("train_kl",)) == []
    path = plots.plot_run_curves(history, tmp_path / "learning_curves.png")
    from PIL import Image

    assert Image.open(path).size == (1000, 700)
    plots.plot_run_curves([], tmp_path / "empty.png")  # before any epoch: empty panels
