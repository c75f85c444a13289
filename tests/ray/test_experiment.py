"""multimix experiment paper-table: aggregation over seeds (Ray-free) and a tiny end-to-end table
(2 rows × 1 budget × 2 seeds on the synthetic demo set, evaluated in- and cross-domain)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from multimix.errors import UserError
from multimix.experiment import markdown, parse_rows, search_for, table


def _eval(variant, seed, acc=None, dice=None, hd=None):
    sets = {"cls": {}, "seg": {}}
    if acc is not None:
        sets["cls"]["kermany"] = {"accuracy": acc, "f1_normal": 0.5, "f1_pneumonia": 0.8,
                                  "auc": float("nan")}
    if dice is not None:
        sets["seg"]["v7"] = {"dice_mean": dice, "jaccard_mean": dice / 2, "hausdorff_mean": hd}
        sets["seg"]["gb"] = {"dice_mean": dice - 0.1, "jaccard_mean": 0.1, "hausdorff_mean": hd}
    return {"trial": f"{variant}{seed}", "variant": variant, "budget": "100:10", "seed": seed,
            "sets": sets}


def test_table_mean_std_over_seeds_and_missing_heads():
    evals = [_eval("enc", 0, acc=0.8), _eval("enc", 1, acc=0.9), _eval("enc", 2, acc=0.7),
             _eval("unet", 0, dice=0.9, hd=10.0), _eval("unet", 1, dice=0.7, hd=20.0),
             _eval("multimix", 0, acc=0.6, dice=0.8, hd=4.0)]
    records, sets = table(evals, ["unet", "enc", "multimix"], ["100:10", "all:all"])
    assert sets == {"cls": ["kermany"], "seg": ["v7", "gb"]}
    by = {(r["budget"], r["row"]): r for r in records}
    m, s, n = by[("100:10", "Enc")]["kermany Acc"]
    assert (m, n) == (pytest.approx(80.0), 3)
    assert s == pytest.approx(np.std([80, 90, 70], ddof=1))
    assert by[("100:10", "Enc")]["v7 Dice"] is None  # no seg head: no cell
    assert by[("100:10", "U-Net")]["v7 HD"] == (pytest.approx(15.0), pytest.approx(
        math.sqrt(50)), 2)  # HD in pixels, not scaled
    assert by[("100:10", "U-Net")]["gb Dice"][0] == pytest.approx(70.0)
    assert by[("100:10", "MultiMix")]["kermany AUC"][2] == 0  # NaN AUC (one class) left out
    assert by[("100:10", "MultiMix")]["v7 Dice"] == (pytest.approx(80.0), 0.0, 1)
    assert by[("all:all", "Enc")]["seeds"] == 0
    text = markdown(records, sets, ["100:10", "all:all"])
    assert "| Enc | 3 | 80.0 ± 10.0 | 50.0 ± 0.0 | 80.0 ± 0.0 | n/a | — | — | — |" in text
    assert "## Labeled: classification all, segmentation all" in text


def test_rows_and_search_grid():
    assert parse_rows("enc, multimix") == ["enc", "multimix"]
    with pytest.raises(UserError, match="--rows: unknown variant 'umtl-xl'"):
        parse_rows("enc,umtl-xl")
    s = search_for(["enc", "multimix"], ["100:10", "all:all"], 3)
    assert s.grid == {"model.variant": ["enc", "multimix"], "budget": ["100:10", "all:all"],
                      "optim.seed": [0, 1, 2]} and s.num_samples == 1
    with pytest.raises(UserError, match="--seeds"):
        search_for(["enc"], ["100:10"], 0)


@pytest.mark.slow
def test_paper_table_end_to_end_tiny(ray_local, tmp_path, capsys):
    from multimix.cli import main
    from multimix.data.prepare import prepare_demo

    prepare_demo(str(tmp_path / "demo"), image_size=64)
    prepare_demo(str(tmp_path / "other"), image_size=64, seed=1)
    d, o = tmp_path / "demo", tmp_path / "other"
    code = main(["experiment", "paper-table", "--cls-data", str(d / "cls"),
                 "--seg-data", str(d / "seg"), "--eval-seg", str(o / "seg"),
                 "--rows", "enc,umtl", "--seeds", "2", "--budgets", "40:5", "--preset",
                 "cpu-small", "--set", f"run.storage_path={tmp_path / 'runs'}",
                 "--set", "optim.epochs=1", "--set", "optim.steps_per_epoch=2",
                 "--set", "scaling.data_concurrency=1", "--concurrent", "2",
                 # two trials at once fit the 2-CPU test Ray (resources.concurrent_trials)
                 "--set", "scaling.cpus_per_worker=0.25",
                 "--set", "scaling.data_cpus_per_task=0.25"])
    exp = tmp_path / "runs" / "paper-table"
    # on failure the CI log shows why (the trials' error files and the command's last lines)
    assert code == 0, (capsys.readouterr().err[-3000:] + "".join(
        f"\n{p}:\n{p.read_text()[-3000:]}" for p in sorted(exp.rglob("error.txt"))[:2]))
    text = (exp / "paper_table.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    head, enc, umtl = lines[0], lines[1], lines[2]
    assert enc.startswith("| Enc | 2 |") and umtl.startswith("| UMTL | 2 |")
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert any(c.endswith(" AUC") for c in cols) and sum(c.endswith(" Dice") for c in cols) == 2
    enc_cells = [c.strip() for c in enc.strip("|").split("|")]
    umtl_cells = [c.strip() for c in umtl.strip("|").split("|")]
    for c, e, u in zip(cols, enc_cells, umtl_cells):
        if c.endswith((" Dice", " Jaccard", " HD")):
            assert e == "—" and "±" in u, (c, e, u)  # Enc has no segmentation head
        elif c.endswith((" Acc", " F1-P")):
            assert "±" in e and "±" in u, (c, e, u)
    assert len(list((exp / "eval").glob("*/report.json"))) == 4
    assert list(exp.glob("box_40-5_*_dice.png")) and list(exp.glob("box_40-5_*_auc.png"))
    assert "Protocol: preset cpu-small" in text


def test_tune_and_table_plots_sizes(tmp_path):
    from PIL import Image

    from multimix import plots

    p = plots.plot_metric_boxes({"Enc": [80.0, 82.5], "MultiMix": [85.0, float("nan")],
                                 "U-Net": []}, tmp_path / "box.png", ylabel="AUC (%)")
    assert Image.open(p).size == (600, 400)  # 3 groups: the 6 in minimum width
    rows = [{"param:lr": 0.001, "param:v": "enc", "val_score": 0.5},
            {"param:lr": 0.1, "param:v": "all", "val_score": 0.7},
            {"param:lr": 0.01, "param:v": "enc", "val_score": None}]
    p = plots.plot_tune_scores(rows, ["param:lr", "param:v"], "val_score", tmp_path / "s.png")
    assert Image.open(p).size == (800, 300)  # two 4x3 in panels
    p = plots.plot_learning_curves({"t0": ([0, 1], [0.5, 0.6])}, "val_score", tmp_path / "c.png")
    assert Image.open(p).size == (600, 400)
