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
from helpers import assert_usage_error, run_script
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
