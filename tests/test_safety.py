"""Files and processes a run must survive: crafted pickles, a second writer, stale temporaries,
permissions, stop signals."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import centralized
import common
import model_editing
from conftest import TINY
from helpers import backbone_file, stop_during_call, tiny_model

FAST = TINY + ["--synthetic-size", "2000", "--batch-size", "64"]


class Payload:
    """A pickle that runs code when loaded without weights_only (it creates the file `marker`)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def craft(path, marker):
    torch.save({"x": Payload(marker)}, path)


def test_no_file_the_code_reads_can_run_code(tmp_path):
    marker = tmp_path / "pwned"
    model = tiny_model()
    # checkpoint.pt of an interrupted run, as resumed by --resume (run_all.sh always passes it)
    out = tmp_path / "run"
    centralized.main(FAST + ["--epochs", "1", "--out", str(out)])
    (out / "result.json").unlink()  # make it look interrupted
    craft(out / "checkpoint.pt", marker)
    with pytest.raises(common.UserError, match="cannot read"):
        centralized.main(FAST + ["--epochs", "1", "--out", str(out), "--resume"])
    # mask.pt, head.pt, --weights and a cached feature file
    craft(tmp_path / "mask.pt", marker)
    with pytest.raises(common.UserError):
        common.load_mask(str(tmp_path / "mask.pt"), model)
    craft(tmp_path / "head.pt", marker)
    with pytest.raises(common.UserError):
        common.load_head_file(str(tmp_path / "head.pt"), model.head)
    craft(tmp_path / "weights.pth", marker)
    with pytest.raises(common.UserError):
        common.read_weights_file(str(tmp_path / "weights.pth"))
    args = centralized.get_args(FAST + ["--data-dir", str(tmp_path / "data")])
    args.precision, args.no_pretrained = "off", False  # a cached file is only read for real weights
    path = common.feature_cache_path(args, "val", 0)
    os.makedirs(os.path.dirname(path))
    craft(path, marker)
    data = common.load_data(args)
    feats = common.cached_features(model, data, args, torch.device("cpu"))  # a bad cache file is recomputed
    assert feats["val"][0].shape == (len(data["val"][1]), model.head.in_features)
    assert not marker.exists()


def test_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        centralized.main(FAST + ["--epochs", "1", "--out", str(out)])
    finally:
        os.umask(old)
    for f in ("config.json", "result.json", "metrics.csv", "head.pt", "accuracy.png"):
        assert (out / f).stat().st_mode & 0o777 == 0o644, f


HOLD = """
import fcntl, os, sys, time
f = open(os.path.join(sys.argv[1], ".lock"), "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.truncate(0); f.write(str(os.getpid())); f.flush()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_pid_and_a_dead_ones_lock_does_not_block(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(common.UserError, match=f"in use by another process \\(PID {holder.pid}\\)"):
            centralized.main(FAST + ["--epochs", "1", "--out", str(out)])
        assert os.listdir(out) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: its lock file (with its PID) is still there, and blocks nothing
    centralized.main(FAST + ["--epochs", "1", "--out", str(out)])
    assert (out / "result.json").is_file()


def test_stale_temporaries_are_cleaned_and_a_dir_holding_only_them_is_empty(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tmpab12cd.tmp").write_bytes(b"x" * 1000)  # a checkpoint write killed mid-way
    (out / "accuracy.png.tmp.png").write_bytes(b"x")
    centralized.main(FAST + ["--epochs", "1", "--out", str(out), "--resume"])
    assert (out / "result.json").is_file()
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_stop_signals_set_the_flag_that_loops_check():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for s in old:
            signal.signal(s, common._on_stop_signal)
        assert not common.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert common.stop_requested()
    finally:
        common._stop_signal = None
        for s, h in old.items():
            signal.signal(s, h)


def test_sigterm_mid_editing_saves_the_step_and_resumes_to_the_same_model(tmp_path, monkeypatch):
    weights, _ = backbone_file(tmp_path)
    argv = FAST + ["--weights", weights, "--epochs", "2", "--synthetic-size", "1000", "--sparsity", "0.7",
                   "--fisher-batches", "1", "--no-aug", "--lr", "0.002"]
    model_editing.main(argv + ["--out", str(tmp_path / "full")])
    stop_during_call(monkeypatch, model_editing, "train_step", 10)  # SIGTERM in step 10 of epoch 1 (of 15)
    with pytest.raises(common.Stopped):
        model_editing.main(argv + ["--out", str(tmp_path / "cut")])
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 10)  # saved mid-epoch, at the step boundary
    monkeypatch.undo()
    model_editing.main(argv + ["--out", str(tmp_path / "cut"), "--resume"])
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "metrics.csv").read_text() == (tmp_path / "cut" / "metrics.csv").read_text()


def test_a_script_exits_143_with_a_checkpoint_on_sigterm(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, os.path.join(os.path.dirname(common.__file__), "fedavg.py"), *FAST, "--k", "10",
            "--c", "0.5", "--rounds", "400", "--eval-every", "400", "--test-every", "400", "--ckpt-every", "1000",
            "--head", "warmup", "--warmup-rounds", "400", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # inside the head-only rounds
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "checkpoint saved" in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 0 < ckpt["round"] < 800 and not (out / "result.json").exists()


def test_an_orphan_dies_with_run_all(tmp_path):
    """A script started by run_all.sh (RUN_ALL_PID set) gets SIGTERM when its parent dies, even by SIGKILL."""
    out = tmp_path / "run"
    script = (f"import subprocess, sys, os; os.environ['RUN_ALL_PID'] = str(os.getpid()); "
              f"p = subprocess.Popen([sys.executable, {os.path.join(os.path.dirname(common.__file__), 'fedavg.py')!r}, "
              f"*{FAST!r}, '--k', '10', '--c', '0.5', '--rounds', '400', '--head', 'warmup', "
              f"'--warmup-rounds', '400', '--out', {str(out)!r}]); print(p.pid, flush=True); "
              f"import time; time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    parent.kill()
    parent.wait()
    for _ in range(100):  # the child checkpoints at its next round and exits
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")
    assert (out / "checkpoint.pt").is_file()


def test_an_out_dir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(common.UserError, match="cannot create --out"):
        centralized.main(FAST + ["--epochs", "1", "--out", str(tmp_path / "afile" / "run")])
