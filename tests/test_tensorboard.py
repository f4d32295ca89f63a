"""--tensorboard: a live view of a study (plumbing.live_log writes every metrics row into RUN/tb/). The
tensorboard package is optional: the tests that read a log skip without it; the missing package's one
line is tested with the import made to fail."""
import argparse
import csv
import sys

import pytest

import centralized
import fedavg
import model_editing
import plan
import plumbing
from conftest import TINY
from helpers import count_calls, run_as_script


def scalars(folder):
    """{tag: [(step, value)]} of the TensorBoard log in folder, as TensorBoard reads it."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    log = accumulator.EventAccumulator(str(folder))
    log.Reload()
    return {tag: [(e.step, e.value) for e in log.Scalars(tag)] for tag in log.Tags()["scalars"]}


def new_process(monkeypatch):
    """What a new process of the run starts with: no log open."""
    monkeypatch.setattr(plumbing, "_live_logs", {})


def test_each_number_of_a_row_is_logged_and_a_resumed_log_replaces_the_steps_it_redoes(tmp_path, monkeypatch):
    """A run logs rounds 0-3, is killed, and resumes from its checkpoint of round 2: TensorBoard shows each
    round once, rounds 3 on as the resumed run logged them. Empty cells and words are not scalars."""
    pytest.importorskip("tensorboard")
    args = argparse.Namespace(tensorboard=True, out=str(tmp_path))
    new_process(monkeypatch)
    for step in range(4):
        plumbing.live_log(args, step, {"round": step, "val_acc": step / 10, "test_acc": None, "split": "iid"})
    new_process(monkeypatch)
    for step in range(3, 6):
        plumbing.live_log(args, step, {"round": step, "val_acc": 1 + step / 10})
    got = scalars(tmp_path / "tb")
    assert sorted(got) == ["round", "val_acc"]
    assert [s for s, _ in got["val_acc"]] == list(range(6))
    assert [v for _, v in got["val_acc"]] == pytest.approx([0, 0.1, 0.2, 1.3, 1.4, 1.5])


def test_without_the_flag_nothing_is_logged(tmp_path, monkeypatch):
    new_process(monkeypatch)
    plumbing.live_log(argparse.Namespace(tensorboard=False, out=str(tmp_path)), 0, {"val_acc": 0.5})
    assert list(tmp_path.iterdir()) == [] and plumbing._live_logs == {}


def test_a_missing_tensorboard_package_is_one_line_and_exit_2_before_anything_is_written(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    want = ["--tensorboard needs the tensorboard package: pip install tensorboard (or leave --tensorboard out) "
            "(see --help)"]
    status, said = run_as_script(fedavg.main, TINY + ["--tensorboard", "--results", str(tmp_path)], capsys)
    assert status == 2 and [line.partition("error: ")[2] for line in said] == want
    assert list(tmp_path.iterdir()) == []
    # run_all.sh's prefetch (its first step) stops on it too, before the first run starts
    status, said = run_as_script(plan.main, ["--prefetch", "--", *TINY, "--tensorboard"], capsys)
    assert status == 2 and [line.partition("error: ")[2] for line in said] == want


def test_the_flag_is_not_part_of_a_runs_identity():
    """Same run directory, same config.json: a run started without it may be resumed with it."""
    pytest.importorskip("tensorboard")
    flags = TINY + ["--k", "10", "--lr", "0.01"]
    on, off = fedavg.get_args(flags + ["--tensorboard"]), fedavg.get_args(flags)
    assert on.tensorboard and not off.tensorboard
    assert on.out == off.out and plumbing.run_config(on) == plumbing.run_config(off)


# Saves (checkpoints) at rounds 3 (--ckpt-every), 4 (validation), 6; round 5 is logged, not saved
RUN = TINY + ["--synthetic-size", "1000", "--k", "5", "--c", "0.4", "--j", "1", "--batch-size", "16", "--rounds", "6",
              "--eval-every", "4", "--test-every", "6", "--ckpt-every", "3", "--no-aug", "--lr", "0.01"]


def test_a_killed_and_resumed_fedavg_run_logs_each_metrics_row_once(tmp_path, monkeypatch):
    """Killed inside round 6 (2 clients a round), after round 5 was logged but saved only at round 4: the
    resumed run logs rounds 5 and 6 again, and TensorBoard shows metrics.csv, each round once. The finished
    run is the same run without the flag."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    argv = RUN + ["--out", str(out), "--tensorboard"]
    new_process(monkeypatch)
    count_calls(monkeypatch, fedavg, "client_update", kill_at=11)
    with pytest.raises(KeyboardInterrupt):
        fedavg.main(argv)
    assert [s for s, _ in scalars(out / "tb")["train_loss"]] == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    new_process(monkeypatch)
    fedavg.main(argv + ["--resume"])
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    got = scalars(out / "tb")
    for column in ("train_loss", "val_acc", "test_acc"):
        want = [(int(r["round"]), float(r[column])) for r in rows if r[column]]
        assert [(s, pytest.approx(v)) for s, v in got[column]] == want, column
    assert plan.run_state(fedavg.get_args(RUN + ["--out", str(out)])) == "done"


def test_centralized_logs_each_trial_as_a_run_of_its_own(tmp_path, monkeypatch):
    """A centralized run's trials each start at epoch 1: each has its folder under tb/ (TensorBoard draws
    them as runs side by side), and its epochs are the trial's history."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    new_process(monkeypatch)
    centralized.main(TINY + ["--synthetic-size", "1000", "--epochs", "2", "--grid", "--grid-lr", "0.1,0.01",
                             "--grid-momentum", "0.9", "--grid-wd", "0", "--out", str(out), "--tensorboard"])
    trials = sorted(p.name for p in (out / "tb").iterdir())
    assert trials[1:] == ["grid-lr-0.01-m-0.9-wd-0-sched-cosine", "grid-lr-0.1-m-0.9-wd-0-sched-cosine"]
    assert trials[0] in ("final-lr-0.01-m-0.9-wd-0-sched-cosine", "final-lr-0.1-m-0.9-wd-0-sched-cosine")
    final = scalars(out / "tb" / trials[0])
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert final["test_acc"] == [(int(r["epoch"]), pytest.approx(float(r["test_acc"]))) for r in rows]


def test_model_editing_logs_epoch_0_and_each_epoch(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    new_process(monkeypatch)
    model_editing.main(TINY + ["--synthetic-size", "1000", "--epochs", "2", "--no-aug", "--fisher-batches", "1",
                               "--out", str(out), "--tensorboard"])
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert scalars(out / "tb")["val_acc"] == [(int(r["epoch"]), pytest.approx(float(r["val_acc"]))) for r in rows]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
