"""centralized.py end to end on the synthetic set with a tiny random ViT."""
import json
import os

import pytest
import torch

import centralized
import common
import plumbing
from conftest import TINY
from helpers import count_calls, record_plots, run_as_script

FAST = TINY + ["--synthetic-size", "2000", "--batch-size", "64"]


def read(path):
    with open(path) as f:
        return f.read()


def test_short_run_learns_far_above_chance(tmp_path):
    out = tmp_path / "run"
    centralized.main(FAST + ["--lr", "0.1", "--epochs", "8", "--out", str(out)])
    result = json.loads(read(out / "result.json"))
    assert result["test_acc"] > 0.3  # chance is 0.01
    for f in ("config.json", "metrics.csv", "loss.png", "accuracy.png", "head.pt"):
        assert (out / f).is_file(), f
    assert not (out / "checkpoint.pt").exists()  # a finished run drops its checkpoint
    rows = read(out / "metrics.csv").splitlines()
    assert rows[0].startswith("epoch,lr,train_loss,val_loss,val_acc,test_loss,test_acc")
    assert len(rows) == 1 + result["epochs_run"]


def test_grid_and_scheduler_comparison_pick_the_best(tmp_path, monkeypatch):
    plots = record_plots(monkeypatch)
    checked = []  # the probe's check (common.check_head_accuracy): its validation accuracy, once
    monkeypatch.setattr(common, "check_head_accuracy", lambda acc, args, *a: checked.append(acc))
    out = tmp_path / "grid"
    centralized.main(FAST + ["--grid", "--grid-lr", "0.1,0.0001", "--grid-momentum", "0.9", "--grid-wd", "0",
                             "--compare-schedulers", "--schedulers", "cosine,constant", "--epochs", "3",
                             "--out", str(out)])
    grid = read(out / "grid.csv").splitlines()
    assert len(grid) == 3
    accs = [float(r.split(",")[4]) for r in grid[1:]]
    assert accs == sorted(accs, reverse=True)
    result = json.loads(read(out / "result.json"))
    assert result["best"]["lr"] == 0.1  # 1e-4 barely moves in 3 epochs
    assert checked == [result["val_acc"]]
    assert (out / "grid.png").is_file() and (out / "schedulers.png").is_file()
    scheds = [r.split(",") for r in read(out / "schedulers.csv").splitlines()[1:]]
    assert len(scheds) == 2
    best = max(scheds, key=lambda r: float(r[1]))[0]  # first of equals, as the script
    assert result["best"]["scheduler"] == best
    labels, ylabel, (values, *_) = plots["grid.png"]
    assert all(label.endswith(" cosine") for label in labels) and "(%)" in ylabel
    assert values == [100 * a for a in accs]  # grid.csv's fractions, in %
    for png in ("schedulers.png", "accuracy.png"):
        series, ylabel, _ = plots[png]
        assert "(%)" in ylabel and all(v > 1 for _, ys in series.values() for v in ys), png


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    argv = FAST + ["--grid", "--grid-lr", "0.1,0.01", "--grid-momentum", "0.9", "--grid-wd", "0",
                   "--epochs", "4", "--patience", "2", "--aug-views", "2"]
    centralized.main(argv + ["--out", str(tmp_path / "full")])

    real_epoch = common.train_head_epoch
    count_calls(monkeypatch, common, "train_head_epoch", kill_at=6)  # the 6th epoch: inside the second grid point
    with pytest.raises(KeyboardInterrupt):
        centralized.main(argv + ["--out", str(tmp_path / "cut")])
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert len(ckpt["done"]) == 1  # cut inside the second trial, the first one saved
    assert not (tmp_path / "cut" / "result.json").exists()
    monkeypatch.setattr(common, "train_head_epoch", real_epoch)

    with pytest.raises(plumbing.UserError, match="--resume"):  # no silent restart over an interrupted run
        centralized.main(argv + ["--out", str(tmp_path / "cut")])
    centralized.main(argv + ["--out", str(tmp_path / "cut"), "--resume"])

    full, cut = json.loads(read(tmp_path / "full" / "result.json")), json.loads(read(tmp_path / "cut" / "result.json"))
    full.pop("seconds"), cut.pop("seconds")
    assert full == cut
    for f in ("metrics.csv", "grid.csv"):
        assert read(tmp_path / "full" / f) == read(tmp_path / "cut" / f)
    h1 = torch.load(tmp_path / "full" / "head.pt")
    h2 = torch.load(tmp_path / "cut" / "head.pt")
    assert all(torch.equal(h1[k], h2[k]) for k in h1)


def test_refuses_a_directory_holding_a_different_run(tmp_path):
    out = str(tmp_path / "run")
    centralized.main(FAST + ["--epochs", "1", "--out", out])
    before = read(os.path.join(out, "result.json"))
    with pytest.raises(plumbing.UserError, match="different run"):
        centralized.main(FAST + ["--epochs", "2", "--out", out])
    with pytest.raises(plumbing.UserError, match="finished"):
        centralized.main(FAST + ["--epochs", "1", "--out", out])
    with pytest.raises(plumbing.Finished):  # finished: nothing to do (run_main exits 0)
        centralized.main(FAST + ["--epochs", "1", "--out", out, "--resume"])
    assert read(os.path.join(out, "result.json")) == before


@pytest.mark.parametrize("bad", [
    ["--epochs", "-1"],
    ["--scheduler", "linear"],
    ["--schedulers", "cosine,bogus", "--compare-schedulers"],
    ["--val-frac", "1.5"],
    ["--grid-lr", "0.1,abc"],
    ["--grid", "--hparams", "r.json"],
])
def test_bad_flags_are_one_line_errors(capsys, bad):
    with pytest.raises(SystemExit) as e:
        centralized.get_args(FAST + bad)
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("bad,says", [
    (["--synthetic-size", "500"], "no validation image"),  # 5 images a class: a 10% split would be empty
    (["--hparams", "."], "cannot read"),  # a directory
    (["--hparams", "missing.json"], "cannot read"),
    (["--img-size", "30"], "multiple of"),
    (["--device", "cuda:1"], "cuda"),
])
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, bad, says):
    with pytest.raises(plumbing.UserError, match=says):
        centralized.main(FAST + ["--out", str(tmp_path / "r")] + bad)
    assert not (tmp_path / "r").exists()


def test_malformed_hparams_are_refused_before_features_or_a_run_dir(tmp_path):
    (tmp_path / "r.json").write_text('{"best": {"lr": 0.1}}')
    with pytest.raises(plumbing.UserError, match="not a centralized result.json"):
        centralized.main(FAST + ["--hparams", str(tmp_path / "r.json"), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    (tmp_path / "r.json").write_text('{"best": {"lr": 0.1, "momentum": 0.9, "wd": 0}}')
    centralized.main(FAST + ["--hparams", str(tmp_path / "r.json"), "--epochs", "1", "--out", str(tmp_path / "r")])
    assert (tmp_path / "r" / "result.json").is_file()  # the corrected command works


def test_missing_and_corrupt_weights_are_one_line_errors(tmp_path, capsys):
    # main() as the script's __main__ runs it, in this process (a new one costs seconds of imports; the
    # scripts' own processes are tested in test_safety.py)
    status, err = run_as_script(centralized.main, FAST + ["--weights", str(tmp_path / "nope.pth"),
                                                          "--out", str(tmp_path / "r")], capsys)
    assert status == 2 and len(err) == 1 and "not found" in err[0], err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage")
    status, err = run_as_script(centralized.main, FAST + ["--weights", str(bad), "--out", str(tmp_path / "r2")], capsys)
    assert status == 2 and len(err) == 1 and "cannot read" in err[0], err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()
