"""Issue 35, the third fuzz round (items 2, 3, 7, 11, 12, 14 and the second stop signal): input files that
are FIFOs, folders or devices; a stop while run_all.sh plans; run names too long for a file name; flags
after -- that a grid line also sets; a big grid under --slurm; grid comments and script paths; a second
stop signal. Each case: one line and exit status 2 with nothing written, or a run that goes on or stops
as it should; no traceback, no hang (every wait has a timeout)."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import fedavg
import plan
import plumbing
from conftest import ROOT, TINY
from helpers import assert_usage_error, tiny_model
from test_run_all import fake_map, fake_python, planned, run_all, sbatch_on_path

FAST = TINY + ["--synthetic-size", "2000", "--batch-size", "64"]
FA = FAST + ["--k", "10", "--c", "0.3"]


def wait_for(predicate, timeout=120, what="the condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- a second stop signal

# A run's main, stuck where Python's own handler cannot stop it: a round that checks for a stop only at
# its end (a busy loop), a read that blocks in the kernel, or a torch call that keeps the main thread
# from running Python's handler until both signals have arrived (modelled by blocking them there).
STUCK = {
    "busy": "while True:\n        pass",
    "blocked read": "r, w = os.pipe()\n    os.read(r, 1)",
    "handler late": "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})\n    time.sleep(60)",
}


@pytest.mark.parametrize("stuck", STUCK)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_stop_signal_half_a_second_later_stops_at_once(stuck, signum):
    code = (f"import os, signal, sys, time; sys.path.insert(0, {ROOT!r}); import plumbing\n"
            f"def main():\n    print('ready', flush=True)\n    {STUCK[stuck]}\n"
            f"plumbing.run_main(main)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signum)
        time.sleep(0.5)
        proc.send_signal(signum)
        t = time.time()
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert time.time() - t < 5
    by = "signal 2 (Ctrl-C)" if signum == signal.SIGINT else "signal 15"
    assert proc.returncode == (130 if signum == signal.SIGINT else 143), err
    assert err == f"stopped at once by a second {by}: nothing written yet: rerun the same command to start it again\n"


def test_one_stop_signal_still_waits_for_the_step_and_sigusr1_never_stops_at_once():
    """The first signal only asks (the run checkpoints at its next step); SLURM's SIGUSR1, repeated or
    followed by SIGTERM forwarded as SIGUSR1 (task.sh), asks again."""
    code = (f"import os, signal, sys, time; sys.path.insert(0, {ROOT!r}); import plumbing\n"
            f"def main():\n    print('ready', flush=True)\n    t = time.time()\n"
            f"    while time.time() < t + 2:\n        pass\n    plumbing.stop_here('the busy part')\n"
            f"plumbing.run_main(main)\n")
    for signals in ([signal.SIGTERM], [signal.SIGUSR1, signal.SIGUSR1]):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        for s in signals:
            proc.send_signal(s)
            time.sleep(0.3)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 143 and err.startswith(f"stopped by signal {signals[0]} during the busy part"), err


def test_a_second_ctrl_c_stops_a_fedavg_round_at_once_keeping_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    # rounds of 3 clients x 30 local steps: seconds each; the signals come just after round 1's checkpoint,
    # so both arrive inside round 2
    argv = [sys.executable, os.path.join(ROOT, "fedavg.py"), *TINY, "--synthetic-size", "1000", "--batch-size", "16",
            "--k", "10", "--c", "0.3", "--j", "30", "--rounds", "2000", "--eval-every", "2000", "--test-every", "2000",
            "--ckpt-every", "1", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "checkpoint.pt").exists(), what="the first checkpoint")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        t = time.time()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and time.time() - t < 3, err
    assert err.splitlines()[-1] == ("stopped at once by a second signal 2 (Ctrl-C): its last checkpoint is kept: "
                                    "continue with --resume"), err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] >= 1 and not (out / "result.json").exists()


# ----------------------------------------------------------------------------- 35.2: input files that are no regular files

def in_time(call, timeout=20):
    """call() in a thread: what it raised (or returned), failing the test if it blocks (a FIFO's open
    or read would block forever: the thread is left behind)."""
    said = {}

    def run():
        try:
            said["returned"] = call()
        except BaseException as e:  # noqa: BLE001 (what it raised is the answer)
            said["raised"] = e
    import threading
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked (on a FIFO?)"
    return said.get("raised", said.get("returned"))


def odd_file(tmp_path, kind):
    """A path that is no regular file: a FIFO (no writer: an open or read would block), a folder, a device."""
    if kind == "fifo":
        path = tmp_path / "input.pt"
        os.mkfifo(path)
        return str(path)
    if kind == "folder":
        (tmp_path / "input.pt").mkdir()
        return str(tmp_path / "input.pt")
    return "/dev/zero"  # a device: a read never ends


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_every_input_file_that_is_no_regular_file_is_one_line_naming_it(tmp_path, kind):
    path, model = odd_file(tmp_path, kind), tiny_model()
    reads = {"--hparams": lambda: plumbing.hparams_from(path),
             "--mask": lambda: common.load_mask(path, model),
             "--head": lambda: common.load_head_file(path, model.head),
             "--weights": lambda: plumbing.read_weights_file(path),
             "--weights .safetensors": lambda: plumbing.read_weights_file(safetensors_path(tmp_path, kind)),
             "--grid": lambda: plan.read_grid(path, "runs", [])}
    for flag, read in reads.items():
        e = in_time(read)
        assert isinstance(e, plumbing.UserError), (flag, e)
        assert "not a regular file" in str(e) and "\n" not in str(e), (flag, str(e))
    # the files the code finds by itself: a run's checkpoint, a cached feature file, a JSON file
    assert isinstance(in_time(lambda: plumbing.load_tensors(path)), OSError)
    assert in_time(lambda: plumbing.read_json_object(path)) is None


def safetensors_path(tmp_path, kind):
    """The same kind of file, named .safetensors (read by another loader)."""
    path = tmp_path / "w.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    return str(path)


def test_a_fifo_as_head_of_a_fedavg_run_is_one_line_and_leaves_no_run(tmp_path):
    """The issue's case: `fedavg.py --head FIFO` hung, and SIGTERM did not stop it."""
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "fedavg.py"), *FA, "--rounds", "2", "--head", str(fifo),
                           "--results", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    line = assert_usage_error(proc)
    assert line == f"error: cannot read --head file {fifo} (not a regular file): use ridge, warmup or a head.pt of an " \
                   f"earlier run", line
    assert not (tmp_path / "runs").exists()
