"""Files and processes a run must survive: crafted pickles, a second writer, stale temporaries,
permissions, stop signals (in every phase), a diverging run."""
import csv
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import centralized
import common
import fedavg
import model_editing
import plumbing
import summarize
from conftest import ROOT, TINY
from helpers import backbone_file, parse_refused, run_as_script, stop_during_call, tiny_model

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
    with pytest.raises(plumbing.UserError, match="cannot read"):
        centralized.main(FAST + ["--epochs", "1", "--out", str(out), "--resume"])
    # mask.pt, head.pt, --weights and a cached feature file
    craft(tmp_path / "mask.pt", marker)
    with pytest.raises(plumbing.UserError):
        common.load_mask(str(tmp_path / "mask.pt"), model)
    craft(tmp_path / "head.pt", marker)
    with pytest.raises(plumbing.UserError):
        common.load_head_file(str(tmp_path / "head.pt"), model.head)
    craft(tmp_path / "weights.pth", marker)
    with pytest.raises(plumbing.UserError):
        plumbing.read_weights_file(str(tmp_path / "weights.pth"))
    args = centralized.get_args(FAST + ["--data-dir", str(tmp_path / "data")])
    args.precision, args.no_pretrained = "fp32", False  # a cached file is only read for real weights
    path = common.feature_cache_path(args, "val", 0, common.backbone_digest(model))
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
        with pytest.raises(plumbing.UserError, match=f"in use by another process \\(PID {holder.pid}\\)"):
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
    (out / ".lock").write_text("12345\n")  # a run of ours killed before config.json: its lock file is there
    (out / "tmpab12cd.tmp").write_bytes(b"x" * 1000)  # config.json's write killed mid-way
    (out / "accuracy.png.tmp.png").write_bytes(b"x")
    centralized.main(FAST + ["--epochs", "1", "--out", str(out), "--resume"])
    assert (out / "result.json").is_file()
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_a_folder_not_known_to_be_this_runs_is_not_touched(tmp_path):
    # a folder that holds no run: its *.tmp files stay, and no lock file is left behind
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.tmp").write_text("x")
    (mine / "b.tmp.png").write_text("y")
    with pytest.raises(plumbing.UserError, match="holds no run"):
        centralized.main(FAST + ["--epochs", "1", "--out", str(mine)])
    assert sorted(os.listdir(mine)) == ["a.tmp", "b.tmp.png"] and (mine / "a.tmp").read_text() == "x"
    # another run's folder (maybe alive, writing a temporary right now): refused, its files as they were
    other = tmp_path / "other"
    centralized.main(FAST + ["--epochs", "1", "--out", str(other)])
    (other / "tmpq1w2e3r4.tmp").write_text("being written")
    before = {n: (other / n).read_bytes() for n in os.listdir(other)}
    with pytest.raises(plumbing.UserError, match="different run"):
        centralized.main(FAST + ["--epochs", "2", "--out", str(other)])
    assert {n: (other / n).read_bytes() for n in os.listdir(other)} == before


def test_stop_signals_set_the_flag_that_loops_check():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for s in old:
            signal.signal(s, plumbing._on_stop_signal)
        assert not plumbing.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert plumbing.stop_requested()
    finally:
        plumbing._stop_signal = None
        for s, h in old.items():
            signal.signal(s, h)


def test_sigterm_mid_editing_saves_the_step_and_resumes_to_the_same_model(tmp_path, monkeypatch):
    weights, _ = backbone_file(tmp_path)
    argv = FAST + ["--weights", weights, "--epochs", "2", "--synthetic-size", "1000", "--sparsity", "0.7",
                   "--fisher-batches", "1", "--no-aug", "--lr", "0.002"]
    model_editing.main(argv + ["--out", str(tmp_path / "full")])
    stop_during_call(monkeypatch, model_editing, "train_step", 10)  # SIGTERM in step 10 of epoch 1 (of 15)
    with pytest.raises(plumbing.Stopped):
        model_editing.main(argv + ["--out", str(tmp_path / "cut")])
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 10)  # saved mid-epoch, at the step boundary
    monkeypatch.undo()
    (tmp_path / "cut" / "head.pt").write_bytes(b"")  # damaged while the run was away: not in the finished run
    model_editing.main(argv + ["--out", str(tmp_path / "cut"), "--resume"])
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for f in ("head.pt", "mask.pt", "model.pt"):
        assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f
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
    assert not (out / "result.json").exists()  # it stopped (a checkpoint only if it was past its features)


def test_an_out_dir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(plumbing.UserError, match="cannot create --out"):
        centralized.main(FAST + ["--epochs", "1", "--out", str(tmp_path / "afile" / "run")])


def test_an_empty_path_is_refused_in_every_path_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # main() as the script's __main__ runs it, here (no new process's imports)
    status, err = run_as_script(fedavg.main, FAST + ["--results", ""], capsys)  # wrote to /fedavg/... before
    assert status == 2 and len(err) == 1 and "--results: an empty path" in err[0], err
    assert os.listdir(tmp_path) == []
    for get_args, flags in [(centralized.get_args, ["--results", "--out", "--data-dir", "--weights", "--hparams"]),
                            (model_editing.get_args, ["--head", "--mask", "--hparams"]),
                            (fedavg.get_args, ["--head", "--mask"])]:
        for flag in flags:
            assert f"{flag}: an empty path" in parse_refused(get_args, [f"{flag}="], capsys)
    assert "root: an empty path" in parse_refused(summarize.main, [""], capsys)


GRID = FAST + ["--grid", "--grid-lr", "0.1,0.01", "--grid-momentum", "0.9", "--grid-wd", "0", "--epochs", "1"]


def interrupted_grid(out, monkeypatch):
    """A centralized grid run stopped during its second trial, with the first in checkpoint.pt."""
    stop_during_call(monkeypatch, common, "train_head", 2)
    with pytest.raises(plumbing.Stopped):
        centralized.main(GRID + ["--out", str(out)])
    monkeypatch.undo()
    assert len(torch.load(out / "checkpoint.pt", weights_only=True)["done"]) == 1


def test_a_resumed_run_reads_only_its_own_files(tmp_path, monkeypatch):
    out = tmp_path / "run"
    centralized.main(FAST + ["--epochs", "1", "--out", str(out)])
    (out / "result.json").write_text("")  # an empty result.json does not mark a finished run
    with pytest.raises(plumbing.UserError, match="interrupted run: add --resume"):  # nor does config.json alone
        centralized.main(FAST + ["--epochs", "1", "--out", str(out)])
    with pytest.raises(plumbing.UserError, match="differs in eval_batch_size"):  # it changes test_loss
        centralized.main(FAST + ["--epochs", "1", "--out", str(out), "--resume", "--eval-batch-size", "100"])
    centralized.main(FAST + ["--epochs", "1", "--out", str(out), "--resume"])  # runs again, from the start
    assert json.loads((out / "result.json").read_text())["test_acc"] > 0
    # a checkpoint copied from another run: refused, not resumed from
    interrupted_grid(tmp_path / "grid", monkeypatch)
    (out / "result.json").unlink()
    os.replace(tmp_path / "grid" / "checkpoint.pt", out / "checkpoint.pt")
    with pytest.raises(plumbing.UserError, match="not this run's checkpoint"):
        centralized.main(FAST + ["--epochs", "1", "--out", str(out), "--resume"])


def forget_flag(out, flag):
    """Make run directory `out` look written before `flag` existed: its config.json and checkpoint lack it."""
    config = json.loads((out / "config.json").read_text())
    del config[flag]
    (out / "config.json").write_text(json.dumps(config))
    if (out / "checkpoint.pt").exists():
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        del ckpt["run"][flag]
        torch.save(ckpt, out / "checkpoint.pt")


def test_a_run_written_before_a_flag_existed_is_the_run_of_that_flags_default(tmp_path, monkeypatch):
    import plan
    out = tmp_path / "grid"
    interrupted_grid(out, monkeypatch)
    forget_flag(out, "compile")  # an interrupted run of the code before --compile
    centralized.main(GRID + ["--out", str(out), "--resume"])  # its config and checkpoint are this run's
    assert json.loads((out / "result.json").read_text())["test_acc"] > 0
    assert "compile" not in json.loads((out / "config.json").read_text())
    assert plan.run_state(centralized.get_args(GRID + ["--out", str(out)])) == "done"
    assert plumbing.finished(centralized.get_args(GRID + ["--out", str(out)]))
    other = centralized.get_args(GRID + ["--out", str(out), "--compile"])  # not the default: another run
    assert plan.run_state(other) == "differs in compile" and not plumbing.finished(other)
    with pytest.raises(plumbing.UserError, match=r"holds a different run \(differs in compile\)"):
        centralized.main(GRID + ["--out", str(out), "--resume", "--compile"])


def test_a_number_json_cannot_hold_is_written_as_null_saying_what_it_was(tmp_path, capsys):
    path = tmp_path / "result.json"
    plumbing.write_json({"test_acc": 0.5, "test_loss": float("inf"), "best": {"lr": float("nan")},
                         "curve": [1.0, float("-inf")]}, str(path))

    def bare(constant):  # what json.loads would otherwise take: NaN, Infinity, -Infinity
        raise ValueError(f"bare {constant}")
    assert json.loads(path.read_text(), parse_constant=bare) == {
        "test_acc": 0.5, "test_loss": None, "best": {"lr": None}, "curve": [1.0, None],
        "not_finite": {"test_loss": "inf", "best.lr": "nan", "curve[1]": "-inf"}}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {path}: test_loss is inf, best.lr is nan, curve[1] is -inf")
    plumbing.write_json({"test_acc": 0.5}, str(path))  # a finite result: as before, no "not_finite", no warning
    assert json.loads(path.read_text()) == {"test_acc": 0.5} and not capsys.readouterr().err


def test_identical_runs_write_byte_identical_files(tmp_path):
    for name in ("a", "b"):
        centralized.main(FAST + ["--epochs", "1", "--out", str(tmp_path / name)])
    for f in ("head.pt", "metrics.csv", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


@pytest.mark.parametrize("argv, says", [
    (["--seed", str(2**64)], "--seed: must be an integer from -2^63 to 2^64-1"),
    (["--synthetic-size", "100000000000"], "--synthetic-size: must be at most"),
])
def test_flags_beyond_what_torch_or_memory_take_are_one_line(argv, says, capsys):
    for get_args in (centralized.get_args, model_editing.get_args, fedavg.get_args):
        assert says in parse_refused(get_args, argv, capsys)


@pytest.mark.parametrize("best, says", [
    ({"lr": -1, "momentum": 0.9, "wd": 0}, "its lr must be in [0, 1e+38]"),
    ({"lr": 0.1, "momentum": 5, "wd": 0}, "its momentum must be in [0, 1)"),
    ({"lr": float("nan"), "momentum": 0.9, "wd": 0}, "its lr must be in [0, 1e+38]"),
    ({"lr": 0.1, "momentum": 0.9, "wd": 1e39}, "its wd must be in [0, 1e+38]"),  # as --wd: torch would overflow
])
def test_hparams_out_of_range_are_refused_before_anything_is_written(tmp_path, best, says):
    (tmp_path / "r.json").write_text(json.dumps({"best": dict(best, scheduler="cosine")}))
    with pytest.raises(plumbing.UserError, match=re.escape(says)):
        centralized.main(FAST + ["--hparams", str(tmp_path / "r.json"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_run_files_of_the_wrong_kind_are_one_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").mkdir()
    with pytest.raises(plumbing.UserError, match="cannot open .*lock"):
        centralized.main(FAST + ["--epochs", "1", "--out", str(out)])
    interrupted_grid(tmp_path / "grid", monkeypatch)
    (tmp_path / "grid" / "checkpoint.pt").unlink()
    (tmp_path / "grid" / "checkpoint.pt").mkdir()
    with pytest.raises(plumbing.UserError, match="checkpoint.pt is not a regular file"):
        centralized.main(GRID + ["--out", str(tmp_path / "grid"), "--resume"])
    (tmp_path / "grid" / "checkpoint.pt").rmdir()
    for crafted in ("[1, 2]", "[" * 100_000):  # a JSON list; JSON nested too deep for the parser
        (tmp_path / "grid" / "config.json").write_text(crafted)
        with pytest.raises(plumbing.UserError, match="config.json is not a run's config"):
            centralized.main(GRID + ["--out", str(tmp_path / "grid"), "--resume"])


def test_a_full_disk_is_one_line_and_the_last_checkpoint_is_kept(tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid"
    interrupted_grid(out, monkeypatch)
    kept = (out / "checkpoint.pt").read_bytes()
    real_open, real_write_json, full = open, plumbing.write_json, {"now": True}

    def write_json(obj, path):  # with full["now"] False, the disk fills up as result.json is written
        full["now"] = full["now"] or path.endswith("result.json")
        real_write_json(obj, path)

    def to_full(path, mode="r", *a, **k):  # a new file then lands on a full device (/dev/full: ENOSPC)
        if "w" in mode and str(path).endswith(".tmp") and full["now"]:
            return real_open("/dev/full", mode, *a, **k)
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(plumbing, "open", to_full, raising=False)
    monkeypatch.setattr(plumbing, "write_json", write_json)
    status, err = run_as_script(centralized.main, GRID + ["--out", str(out), "--resume"], capsys)
    assert status == 2 and len(err) == 1 and re.match(r"error: no space left .*checkpoint.pt.*is kept", err[0])
    assert (out / "checkpoint.pt").read_bytes() == kept
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]

    full["now"] = False  # the run gets to its end; then result.json cannot be written
    status, err = run_as_script(centralized.main, GRID + ["--out", str(out), "--resume"], capsys)
    assert status == 2 and len(err) == 1 and re.match(r"error: no space left .*result.json: it was not written", err[0])
    assert "a run keeps its last checkpoint" in err[0] and "--resume" in err[0]
    assert not (out / "result.json").exists() and (out / "checkpoint.pt").exists()
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    monkeypatch.undo()
    centralized.main(GRID + ["--out", str(out), "--resume"])  # space again: it finishes from that checkpoint
    assert json.loads((out / "result.json").read_text())["test_acc"] > 0


def unwritable(monkeypatch, folder, err):
    """Make `folder` act as one this process cannot write (tests run as root, whom chmod does not stop):
    creating, removing or renaming a file in it fails with OSError(err); so does opening a file in it for
    writing, where err is EROFS (a read-only file system) or the file is new."""
    folder, real_open = str(folder), open

    def refuse(path):
        raise OSError(err, os.strerror(err), str(path))

    def inside(path):
        return os.path.abspath(str(path)).startswith(folder + os.sep)

    def guard(real, writes=lambda *a: True):
        def call(path, *a, **k):
            if inside(path) and writes(path, *a):
                refuse(path)
            return real(path, *a, **k)
        return call

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    monkeypatch.setattr(os, "open", guard(os.open, lambda p, flags, *a: flags & write_flags and (
        err == errno.EROFS or flags & os.O_CREAT and not os.path.exists(p))))
    for name in ("remove", "unlink", "replace", "rename", "mkdir", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    monkeypatch.setattr(plumbing, "open", guard(real_open, lambda p, mode="r", *a: set(mode) & set("wax+") and (
        err == errno.EROFS or not os.path.exists(p))), raising=False)


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS])
def test_resume_in_a_read_only_run_folder_is_one_line_and_changes_nothing(tmp_path, monkeypatch, capsys, err):
    done, stopped = tmp_path / "done", tmp_path / "grid"
    centralized.main(FAST + ["--epochs", "1", "--out", str(done)])
    interrupted_grid(stopped, monkeypatch)
    files = lambda: {p: p.read_bytes() for p in (*done.iterdir(), *stopped.iterdir()) if p.name != ".lock"}
    for stale in (True, False):  # a killed writer's temporary, removed on reopening (if it can be), or none
        if stale:
            (stopped / "x.tmp").write_text("half a file")
        before = files()
        unwritable(monkeypatch, tmp_path, err)
        with pytest.raises(plumbing.Finished):  # a finished run: nothing to do, nothing written
            centralized.main(FAST + ["--epochs", "1", "--out", str(done), "--resume"])
        status, lines = run_as_script(centralized.main, GRID + ["--out", str(stopped), "--resume"], capsys)
        monkeypatch.undo()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
        assert os.strerror(err) in lines[0] and str(stopped) in lines[0]
        assert files() == before  # the checkpoint and config.json as they were, no result, no temporary
        if stale:
            (stopped / "x.tmp").unlink()


def test_two_masks_of_the_project_layout_name_two_runs():
    """Masks of two runs of one seed share their folder's name (seed0): the run on a mask is named after
    the mask's run too."""
    masks = ["runs/model_editing/random_s0.5_r1/seed0/mask.pt", "runs/fedavg/iid_j4_sparse-random_s0.5_r1/seed0/mask.pt"]
    for script, flags in ((model_editing, []), (fedavg, ["--sparse"])):
        outs = {script.get_args(FAST + flags + ["--mask", m]).out for m in masks}
        assert len(outs) == 2, outs


def test_an_edit_on_a_given_mask_is_filed_under_that_masks_settings(tmp_path):
    base = FAST + ["--synthetic-size", "1000", "--epochs", "0", "--results", str(tmp_path)]
    model_editing.main(base + ["--rule", "random", "--sparsity", "0.5", "--calib-rounds", "1"])
    made = tmp_path / "model_editing" / "random_s0.5_r1_synthetic_n1000_test-vit_random_px32_b64_ep0" / "seed0"
    model_editing.main(base + ["--mask", str(made / "mask.pt")])
    name = "mask-random_s0.5_r1_synthetic_n1000_test-vit_random_px32_b64_ep0-seed0-mask_synthetic_n1000_test-vit_random_px32_b64_ep0"
    given = json.loads((tmp_path / "model_editing" / name / "seed0" / "result.json").read_text())
    assert (given["rule"], given["sparsity"], given["calib_rounds"]) == (None, None, None)  # not the flag defaults
    summarize.main([str(tmp_path)])
    with open(tmp_path / "summary" / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    row = rows[f"model_editing/{name}/seed0"]
    assert (row["rule"], row["sparsity"], row["calib_rounds"]) == ("random", "0.5", "1")


@pytest.mark.parametrize("get_args, argv, says", [
    (centralized.get_args, ["--hparams", "r.json", "--lr", "0.5"], "--lr would be ignored: --hparams chooses"),
    (centralized.get_args, ["--grid", "--wd", "0.1"], "--wd would be ignored: --grid chooses"),
    (centralized.get_args, ["--grid-lr", "0.1,,0.2"], "--grid-lr: expected comma-separated numbers"),
    (model_editing.get_args, ["--head", "warmup", "--hparams", "r.json", "--warmup-lr", "0.5"],
     "--warmup-lr would be ignored: --hparams sets"),
    (model_editing.get_args, ["--mask", "m.pt", "--rule", "random"], "--rule would be ignored: --mask gives"),
    (model_editing.get_args, ["--calib-damp", "2"], "--calib-damp: must be in [0, 1]"),
    (fedavg.get_args, ["--warmup-rounds", "5"], "--warmup-rounds would be ignored"),
    (fedavg.get_args, ["--sparsity", "0.5", "--rule", "random"], "--rule --sparsity would be ignored: they make "
                                                                 "the mask of --sparse"),
    (fedavg.get_args, ["--sparse", "--mask", "m.pt", "--calib-rounds", "2"], "--calib-rounds would be ignored"),
    (fedavg.get_args, ["--scale-rounds", "--j", "16", "--rounds", "2"], "not a whole number of rounds"),
    (fedavg.get_args, ["--scale-rounds", "--j", "3", "--rounds", "4"], "choose --rounds a multiple of 3"),
])
def test_contradicting_flags_are_refused(get_args, argv, says, capsys):
    assert says in parse_refused(get_args, argv, capsys)


def test_weights_with_no_pretrained_say_which_one_counts(capsys):
    for get_args in (centralized.get_args, model_editing.get_args, fedavg.get_args):
        get_args(["--weights", "w.pth", "--no-pretrained"])
        out = capsys.readouterr().out.splitlines()
        assert out == ["note: --no-pretrained is ignored: --weights w.pth gives the backbone"]


def test_input_files_that_fit_only_in_shape_are_refused(tmp_path):
    model = tiny_model()
    nothing = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in common.masked_params(model)}
    torch.save(nothing, tmp_path / "none.pt")  # as --sparsity that keeps nothing, which is refused
    with pytest.raises(plumbing.UserError, match="keeps no entry"):
        common.load_mask(str(tmp_path / "none.pt"), model)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(plumbing.UserError, match="not a mask file .*holds a list"):
        common.load_mask(str(tmp_path / "list.pt"), model)
    # a head of another backbone of the same width: its run's config.json says so
    src = tmp_path / "src"
    src.mkdir()
    torch.save(plumbing.cpu_state(model.head), src / "head.pt")
    config = vars(centralized.get_args(FAST))
    (src / "config.json").write_text(json.dumps(dict(config, arch="vit_small_patch16_224", img_size=224)))
    with pytest.raises(plumbing.UserError, match="trained on another backbone .*--arch vit_small_patch16_224"):
        model_editing.main(FAST + ["--head", str(src / "head.pt"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    (src / "config.json").write_text(json.dumps(config))  # the same backbone: accepted
    model_editing.main(FAST + ["--head", str(src / "head.pt"), "--epochs", "0", "--rule", "random",
                               "--out", str(tmp_path / "run")])


def test_messages_say_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(plumbing.UserError, match="resnet18 is not a timm VisionTransformer"):
        centralized.main(FAST + ["--arch", "resnet18", "--out", str(tmp_path / "r")])
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"junk")
    monkeypatch.setattr(plumbing, "network_reachable", lambda *a, **k: False)
    with pytest.raises(plumbing.UserError, match="incomplete or corrupt"):
        common.load_cifar100(str(tmp_path))


def stop_in_time(argv, ready, tmp_path):
    """Start a script (argv after the interpreter), wait until ready(stdout so far) holds, send SIGTERM, and
    return (seconds until it said that it stopped, exit status, stderr). Process exit is not timed: the
    interpreter's teardown of torch alone takes seconds on a busy machine."""
    log = tmp_path / "stdout.txt"
    with open(log, "w") as stdout:
        proc = subprocess.Popen([sys.executable, "-u", *argv], stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ready(log.read_text()):
            assert proc.poll() is None and time.time() < deadline, f"never reached the phase: {log.read_text()}"
            time.sleep(0.1)
        time.sleep(0.5)  # well inside the phase
        proc.send_signal(signal.SIGTERM)
        t, err = time.time(), ""
        while not err.endswith("\n") or "stopped by signal" not in err:
            line = proc.stderr.readline()
            if not line:
                break
            err += line
        took = time.time() - t
        err += proc.communicate(timeout=120)[1]
        return took, proc.returncode, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_during_feature_extraction_stops_within_seconds_and_says_nothing_was_saved(tmp_path):
    out = tmp_path / "run"
    # at 224 px the tiny ViT takes about a minute for these features on one busy CPU thread, ~1 s a batch
    argv = [os.path.join(ROOT, "centralized.py"), *TINY, "--img-size", "224", "--synthetic-size", "2000",
            "--eval-batch-size", "32", "--epochs", "1", "--out", str(out)]
    took, status, err = stop_in_time(argv, lambda stdout: (out / "config.json").exists(), tmp_path)
    assert status == 143 and took < 10, (took, err)
    assert err.strip() == ("stopped by signal 15 during feature extraction (train features): no checkpoint yet "
                           "and nothing needed saving: rerun with --resume to start it over")
    assert not (out / "checkpoint.pt").exists() and not (out / "result.json").exists()


def test_sigterm_during_calibration_stops_within_seconds(tmp_path):
    out = tmp_path / "run"
    argv = [os.path.join(ROOT, "model_editing.py"), *TINY, "--synthetic-size", "1000", "--calib-rounds", "2000",
            "--fisher-batches", "1", "--epochs", "1", "--no-aug",  # no augmentation gap between the head and step 1
            "--out", str(out)]  # 2000 rounds: a minute or more
    took, status, err = stop_in_time(argv, lambda stdout: "head (ridge)" in stdout, tmp_path)
    assert status == 143 and took < 10, (took, err)
    last = err.strip().splitlines()[-1]  # after the step-0 head's warnings, if any
    assert last.startswith("stopped by signal 15 during mask calibration") and "no checkpoint yet" in last, err
    assert not (out / "checkpoint.pt").exists() and not (out / "mask.pt").exists()


def phase_calls():
    """{phase: a call that runs it}, on the tiny model and a few images."""
    model = tiny_model()
    args = centralized.get_args(FAST + ["--eval-batch-size", "8"])
    args.precision = "off"
    x = common.make_synthetic(200, 100)[0][:32]
    y = torch.arange(32) % common.NUM_CLASSES
    f = torch.randn(64, model.head.in_features)
    feats = {s: (f, torch.arange(64) % common.NUM_CLASSES) for s in ("train", "val")}
    u = torch.rand(32, dtype=torch.float64)
    fisher = lambda r, mask: common.fisher_sums(model, x, u, 32, 8, torch.device("cpu"))[0]
    hp = dict(lr=0.1, momentum=0.9, wd=0.0, scheduler="constant")
    return {"feature extraction": lambda: common.extract_features(model, x, args, torch.device("cpu")),
            "ridge head": lambda: common.ridge_head(model.head, common.ridge_stats(*feats["train"]), *feats["val"]),
            "federated ridge": lambda: fedavg.federated_ridge(model.head, [torch.arange(32), torch.arange(32, 64)],
                                                              feats),
            "calibration round": lambda: common.calibrate_mask(model, fisher, "random", 0.5, 4, torch.Generator()),
            "fisher batch": lambda: fisher(1, None),
            "head epoch": lambda: common.train_head(model.head, feats, hp, 20, 20, 16, 0)}, model, y


@pytest.mark.parametrize("phase", ["feature extraction", "ridge head", "federated ridge", "calibration round",
                                   "fisher batch", "head epoch"])
def test_every_phase_stops_between_its_batches(phase, monkeypatch):
    calls, model, _ = phase_calls()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    # the stop arrives during the phase's first batch (call 2 of stop_requested, the first being
    # before it): the phase must stop at its next batch boundary
    asked = {"n": 0}

    def stop_requested():
        asked["n"] += 1
        return asked["n"] >= 2
    monkeypatch.setattr(plumbing, "stop_requested", stop_requested)
    with pytest.raises(plumbing.Stopped) as e:
        calls[phase]()
    assert asked["n"] == 2 and not e.value.saved
    if phase in ("fisher batch", "calibration round"):  # damped weights restored, flags as they were
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert [p.requires_grad for p in model.parameters()] == flags


def raising(exc):
    def main(argv):
        raise exc
    return main


def test_the_stop_message_says_truly_what_was_saved(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plumbing, "_stop_signal", signal.SIGTERM)
    monkeypatch.setattr(plumbing, "_open_run", str(tmp_path))
    status, err = run_as_script(raising(plumbing.Stopped("round 3", saved=True)), [], capsys)
    assert status == 143 and err == ["stopped by signal 15 during round 3: checkpoint saved, continue with --resume"]
    status, err = run_as_script(raising(plumbing.Stopped("feature extraction (val features)")), [], capsys)
    assert err == ["stopped by signal 15 during feature extraction (val features): no checkpoint yet and nothing "
                   "needed saving: rerun with --resume to start it over"]
    monkeypatch.setattr(plumbing, "_open_run", None)  # stopped before its run folder was opened
    status, err = run_as_script(raising(plumbing.Stopped("the pretrained stand-in")), [], capsys)
    assert err == ["stopped by signal 15 during the pretrained stand-in: nothing written yet: rerun the same "
                   "command to start it again"]
    monkeypatch.setattr(plumbing, "_open_run", str(tmp_path))
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # a resumed run that stops before it has anything new
    status, err = run_as_script(raising(plumbing.Stopped("mask calibration, round 2 of 4")), [], capsys)
    assert err == ["stopped by signal 15 during mask calibration, round 2 of 4: nothing new to save, its last "
                   "checkpoint is kept: continue with --resume"]


# ----------------------------------------------------------------------------- a diverging run

DIVERGING = {  # an absurd learning rate: the training loss is nan within the first epoch or round
    "centralized": (centralized, ["--epochs", "5", "--lr", "1e38"], r"epoch 1:"),  # a linear head needs this much
    "model_editing": (model_editing, ["--epochs", "3", "--lr", "1e20", "--fisher-batches", "1", "--no-aug"],
                      r"epoch 1:"),
    "fedavg": (fedavg, ["--k", "10", "--c", "0.5", "--rounds", "20", "--lr", "1e8", "--no-aug", "--ckpt-every", "1"],
               r"round [12]:"),
}


@pytest.mark.parametrize("script", DIVERGING)
def test_a_diverging_run_stops_at_once_with_one_line_and_no_result(script, tmp_path, capsys):
    module, flags, when = DIVERGING[script]
    out = tmp_path / "run"
    status, err = run_as_script(module.main, FAST + flags + ["--out", str(out)], capsys)
    assert status == plumbing.DIVERGED_EXIT == 3
    assert len(err) == 1 and err[0].startswith("diverged: ") and "training loss is nan" in err[0], err
    assert re.search(when, err[0]) and "--lr" in err[0], err
    assert not (out / "result.json").exists()
    if script == "fedavg":  # checkpointed every round, but never the diverged one
        assert not (out / "checkpoint.pt").exists() or torch.load(out / "checkpoint.pt")["round"] < 1


def test_a_loss_that_is_not_finite_stops_and_a_high_one_warns_once(capsys):
    watch = common.LossWatch("the stage", "a lower --lr")
    watch.check(9.0, "epoch 1")
    watch.warn(9.0, "epoch 1")  # below twice chance (2 ln 100 = 9.21): no warning
    assert capsys.readouterr().err == ""
    watch.warn(1365.0, "round 20")
    watch.warn(1615.0, "round 40")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the stage, round 20: training loss 1365") and "--lr" in err[0]
    for loss in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(plumbing.Diverged, match="the stage, epoch 2: the training loss is .*try a lower --lr"):
            watch.check(loss, "epoch 2")


def test_fp16_skipped_steps_are_not_divergence_but_a_scaler_that_skips_every_step_is():
    """The scaler skips a step whose gradients overflow and halves its scale: normal now and then. Only
    a scale driven down by every step (gradients that are not finite at any scale) is divergence."""
    p = torch.ones(3, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    watch = common.LossWatch("fp16 training", "a lower --lr")

    def steps(n, grad):
        for _ in range(n):
            opt.zero_grad()
            scaler.scale((p * grad).sum()).backward()
            scaler.step(opt)
            scaler.update()

    steps(3, float("inf"))  # three skipped steps, then training goes on
    steps(5, 1.0)
    assert scaler.get_scale() == 2.0 ** 13 and not torch.equal(p, torch.ones(3))
    watch.check(4.0, "round 1", scaler)
    steps(40, float("nan"))  # every step skipped: the scale backs off all the way
    with pytest.raises(plumbing.Diverged, match="round 2: the fp16 gradient scaler skipped every step"):
        watch.check(4.0, "round 2", scaler)


# ----------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_checkpoints_at_the_round_boundary_exits_130_and_resumes_to_the_same_run(tmp_path, monkeypatch,
                                                                                        capsys):
    """Ctrl-C as round 2 starts: the round stops before its first client step and the checkpoint is round 1's
    end (a stop between clients: tests/test_algorithms.py)."""
    argv = FAST + ["--k", "10", "--c", "0.5", "--rounds", "4", "--eval-every", "2", "--ckpt-every", "10",
                   "--lr", "0.01"]
    fedavg.main(argv + ["--out", str(tmp_path / "full")])
    calls = {"n": 0}
    real = fedavg.train_round

    def ctrl_c_in_round_2(*a, **k):  # a real SIGINT to this process, as a terminal's Ctrl-C sends it
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(fedavg, "train_round", ctrl_c_in_round_2)
    monkeypatch.setattr(plumbing, "_stop_signal", None)  # undo() puts it back after the stop
    status, err = run_as_script(fedavg.main, argv + ["--out", str(tmp_path / "cut")], capsys)
    assert status == 130 and err[-1] == ("stopped by signal 2 (Ctrl-C) during round 2: checkpoint saved, continue "
                                         "with --resume"), err
    assert all(line.startswith("warning: ") for line in err[:-1]), err  # the one line of the stop, warnings aside
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["round"] == 1  # cut mid-run
    assert not (tmp_path / "cut" / "result.json").exists()
    monkeypatch.undo()
    fedavg.main(argv + ["--out", str(tmp_path / "cut"), "--resume"])
    assert f"resuming {tmp_path / 'cut'} from round 2 of 4" in capsys.readouterr().out
    for f in ("model.pt", "head.pt", "metrics.csv", "shards.csv", "config.json"):
        assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f


def test_a_resumed_editing_run_says_the_epoch_and_step_it_continues_from(tmp_path, monkeypatch, capsys):
    argv = FAST + ["--epochs", "2", "--synthetic-size", "1000", "--sparsity", "0.7", "--fisher-batches", "1",
                   "--no-aug", "--out", str(tmp_path / "cut")]
    stop_during_call(monkeypatch, model_editing, "train_step", 10)
    with pytest.raises(plumbing.Stopped):
        model_editing.main(argv)
    monkeypatch.undo()
    capsys.readouterr()
    model_editing.main(argv + ["--resume"])
    assert f"resuming {tmp_path / 'cut'} from fine-tuning epoch 1 of 2, step 11" in capsys.readouterr().out
