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


def test_two_ctrl_c_half_a_second_apart_stop_a_fedavg_round_within_seconds_keeping_its_checkpoint(tmp_path):
    """The first Ctrl-C ends the round at its next client step (saved as of the round's start); a second one
    0.5 s later finds the run stopped or stopping: either way exit status 130 within seconds, never a death
    by the signal, and the checkpoint kept."""
    out = tmp_path / "run"
    # rounds of 3 clients x 30 local steps: seconds each; the signals come just after round 1's checkpoint,
    # so the first arrives inside round 2
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
    # seconds, not a round: on the busy 2-core machine the save and the interpreter's exit took up to 4 s
    assert proc.returncode == 130 and time.time() - t < 10, err
    assert err.splitlines()[-1] in ("stopped at once by a second signal 2 (Ctrl-C): its last checkpoint is kept: "
                                    "continue with --resume",
                                    "stopped by signal 2 (Ctrl-C) during round 2: checkpoint saved, continue with "
                                    "--resume"), err
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


def test_a_device_is_refused_without_being_opened(monkeypatch):
    """Opening some devices does something (a tape rewinds, a watchdog arms): it is looked at first."""
    opened = []
    real = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    with pytest.raises(OSError, match="not a regular file"):
        plumbing.open_regular("/dev/zero")
    assert opened == []


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


# ----------------------------------------------------------------------------- 35.3: run_all.sh while it plans

def test_run_all_refuses_a_grid_that_is_a_fifo_or_a_folder_at_once(tmp_path):
    results = tmp_path / "runs"
    for kind in ("fifo", "folder"):
        path = odd_file(tmp_path / kind, kind) if (tmp_path / kind).mkdir() is None else None
        line = assert_usage_error(run_all("--grid", path, "--", *TINY, results=results, timeout=60))
        assert line == f"run_all.sh: error: --grid {path} is not a regular file (a FIFO, a folder, a device): give a " \
                       f"grid file", line
    assert not results.exists()


def test_sigterm_while_run_all_plans_a_big_grid_stops_it_within_seconds_leaving_nothing(tmp_path):
    """Planning takes a while (3,000 lines: a minute here); run_all.sh waited for it inside $(...), which
    holds the trap, and its planner was not the child its trap stops."""
    from test_run_all_safety import processes_of
    results, grid = tmp_path / "runs", tmp_path / "grid.txt"
    grid.write_text("".join(f"fedavg.py --iid --eval-every {i}\n" for i in range(1, 3001)))
    env = {**os.environ, "RESULTS": str(results), "PYTHON": sys.executable}
    study = subprocess.Popen(["bash", os.path.join(ROOT, "run_all.sh"), "--grid", str(grid), "--", *TINY], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        planner = lambda: [p for p in processes_of(study.pid) if b"--runs" in open(f"/proc/{p}/cmdline", "rb").read()]
        wait_for(lambda: planner() or study.poll() is not None, what="the planner")
        time.sleep(6)  # past its imports (2-3 s here), planning now (3,000 lines: a minute or more)
        assert study.poll() is None
        study.send_signal(signal.SIGTERM)
        t = time.time()
        _, err = study.communicate(timeout=20)
    finally:
        os.killpg(study.pid, signal.SIGKILL) if study.poll() is None else None
    assert time.time() - t < 10 and study.returncode == 143, err
    assert "Traceback" not in err and "stopped before the first run" in err, err
    wait_for(lambda: processes_of(study.pid) == [], timeout=10, what="the planner to end")
    assert not results.exists()


# ----------------------------------------------------------------------------- 35.7: long run names

def weights_line(tmp_path, length):
    """A grid line whose run's folder name is `length` bytes (a --weights file of a long name)."""
    line = lambda stem: ["fedavg.py", "--iid", "--weights", str(tmp_path / "w" / "eights" / f"{stem}.pth")]
    name = lambda stem: os.path.basename(os.path.dirname(plan.parse_run(shlex.join([*line(stem), *TINY]))[1].out))
    return line("x" * (1 + length - len(name("x"))))


def test_a_run_name_whose_log_name_is_too_long_runs_with_a_shorter_log(tmp_path):
    results, grid = tmp_path / "runs", tmp_path / "grid.txt"
    words = weights_line(tmp_path, 250)  # the run's folder fits, its log's name (+ 17 bytes) would not
    grid.write_text(shlex.join(words) + "\n")
    runs = planned(results, TINY, grid=str(grid))
    env = {"PYTHON": fake_python(tmp_path), "FAKE_LOG": str(tmp_path / "calls.log"), "FAKE_ESTIMATE": "1",
           "FAKE_MAP": fake_map(tmp_path, runs)}
    proc = run_all("--grid", str(grid), "--seeds", "0", "--", *TINY, results=results, env=env)
    assert proc.returncode == 0 and "done (" in proc.stdout, proc.stdout + proc.stderr
    (log,) = os.listdir(results / "logs")
    assert len(log) <= 255 and log.startswith("fedavg_iid_") and log.endswith(".log")
    assert "skip (done)" in run_all("--grid", str(grid), "--seeds", "0", "--", *TINY, results=results, env=env).stdout


def test_a_run_name_longer_than_a_file_name_is_one_line_before_anything_is_written(tmp_path):
    results, grid = tmp_path / "runs", tmp_path / "grid.txt"
    words = weights_line(tmp_path, 300)
    grid.write_text(shlex.join(words) + "\n")
    line = assert_usage_error(run_all("--grid", str(grid), "--", *TINY, results=results))
    assert line.startswith(f"error: --grid {grid}, line 1: the folder name iid_j4_dense_") and "is 300 bytes, more " \
        "than the 255 a name may have: shorten the flag values that name the run" in line, line
    assert not results.exists()
    # alone, the same run says so before anything is written (it left an empty fedavg/ folder)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, *words[:1]), *words[1:], *TINY, "--results",
                           str(results)], capture_output=True, text=True, timeout=120)
    assert "is 300 bytes" in assert_usage_error(proc) and not results.exists()
    # and so does an --out of a name too long
    out = tmp_path / "a" / ("b" * 256) / "seed0"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "fedavg.py"), *FA, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert "is 256 bytes" in assert_usage_error(proc) and not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- 35.11: flags after -- that a line sets

def test_a_flag_after_dashdash_that_a_grid_line_also_sets_is_one_line(tmp_path):
    results, grid = tmp_path / "runs", tmp_path / "grid.txt"
    grid.write_text("fedavg.py --iid --j 4\nfedavg.py --nc 5 --lr 0.01 --rounds=7\n")
    for extra, flag in ((["--lr", "0.001", "--rounds", "3"], "--lr"), (["--rounds=3"], "--rounds")):
        with pytest.raises(plumbing.UserError) as e:
            plan.read_grid(str(grid), "runs", [*TINY, *extra])
        assert str(e.value) == f"--grid {grid}, line 2: {flag} is set both on this line and after -- (which would " \
                               f"win silently): set it in one place"
    line = assert_usage_error(run_all("--grid", str(grid), "--", *TINY, "--lr", "0.001", results=results))
    assert "line 2: --lr is set both on this line and after --" in line and not results.exists()
    assert len(plan.read_grid(str(grid), "runs", [*TINY, "--eval-every", "2"])) == 2  # other flags: every run


# ----------------------------------------------------------------------------- 35.12: --slurm on a big grid

def test_slurm_takes_a_big_grid_whose_settings_travel_in_a_file(tmp_path):
    """A grid of 277 KB: its settings (all its lines) went to sbatch as one argument, over the 128 KiB one
    argument may have (Argument list too long, exit 126, after the plan and the SLURM files were written)."""
    results, grid, sub_log = tmp_path / "runs", tmp_path / "grid.txt", tmp_path / "sbatch.log"
    grid.write_text("".join("fedavg.py --iid" + " --val-frac 0.1" * 460 + f" --j {j}\n" for j in range(1, 41)))
    runs = planned(results, TINY, grid=str(grid))
    env = {"PATH": f"{sbatch_on_path(tmp_path)}:{os.environ['PATH']}", "SBATCH_LOG": str(sub_log),
           "PYTHON": fake_python(tmp_path), "FAKE_LOG": str(tmp_path / "calls.log"), "FAKE_MAP": fake_map(tmp_path, runs)}
    proc = run_all("--slurm", "--grid", str(grid), "--", *TINY, results=results, env=env)
    assert proc.returncode == 0, proc.stderr
    (_, *array), _ = [json.loads(line) for line in sub_log.read_text().splitlines()]
    assert max(map(len, array)) < 1000
    task, cmds, settings, target = array[-4:]
    subprocess.run(["bash", task, cmds, settings, target], env={**os.environ, **env, "SLURM_ARRAY_TASK_ID": "39",
                   "SLURM_ARRAY_JOB_ID": "4200"}, check=True, capture_output=True, timeout=120)
    recorded = (results / "run_all.settings").read_text()
    assert target == str(results / "run_all.settings") and len(recorded) > 270_000
    assert recorded.startswith("grid=file: fedavg.py --iid --val-frac 0.1 ") and recorded.endswith(
        f" --j 40 extra={shlex.join(TINY)}\n")


def test_a_refused_slurm_submission_leaves_nothing_behind(tmp_path):
    results, grid = tmp_path / "runs", tmp_path / "grid.txt"
    grid.write_text("fedavg.py --iid\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "sbatch: error: Batch job submission failed" >&2\nexit 1\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": fake_python(tmp_path),
           "FAKE_LOG": str(tmp_path / "calls.log")}
    proc = run_all("--slurm", "--grid", str(grid), "--", *TINY, results=results, env=env)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "sbatch: error: Batch job submission failed",
        "run_all.sh: error: sbatch refused the job array (exit 1, its message above): nothing was submitted"], proc.stderr
    assert not results.exists()  # a new root: gone again
    results.mkdir()
    (results / "mine.txt").write_text("kept\n")
    proc = run_all("--slurm", "--grid", str(grid), "--", *TINY, results=results, env=env)
    assert proc.returncode == 2 and not list(results.glob("slurm/*.cmds")) and not list(results.glob("slurm/*.settings"))
    assert (results / "mine.txt").read_text() == "kept\n"


# ----------------------------------------------------------------------------- 35.14: grid comments and script paths

@pytest.mark.parametrize("sep", ["\u2028", "\v", "\f", "\x1c", "\x85", "\r"])
def test_a_grid_comment_ends_at_a_line_feed_only(tmp_path, sep):
    grid = tmp_path / "grid.txt"
    grid.write_text(f"# off: fedavg.py --nc 1{sep}fedavg.py --nc 50\nfedavg.py --iid\r\n", encoding="utf-8",
                    newline="")
    runs = plan.read_grid(str(grid), "runs", TINY)
    assert [flags for _, _, flags in runs] == [["--iid"]]


def test_a_nul_byte_in_a_grid_line_is_one_line(tmp_path):
    """bash drops a NUL byte from what it reads: the run would get another value than the line's."""
    grid = tmp_path / "grid.txt"
    grid.write_bytes(b"fedavg.py --iid --data-dir da\0ta\n")
    with pytest.raises(plumbing.UserError, match=r"line 1: a quoted word holds a tab, a line break or a NUL byte"):
        plan.read_grid(str(grid), "runs", TINY)


@pytest.mark.parametrize("script", ["../fedavg.py", "/elsewhere/fedavg.py", os.path.join(ROOT, "fedavg.py"),
                                    "./fedavg.py"])
def test_a_grid_line_names_a_script_by_its_name_alone(tmp_path, script):
    grid = tmp_path / "grid.txt"
    grid.write_text(f"{script} --iid\n")
    with pytest.raises(plumbing.UserError) as e:
        plan.read_grid(str(grid), "runs", TINY)
    assert str(e.value) == f"--grid {grid}, line 1: '{script} --iid --results runs {shlex.join(TINY)}': the first " \
                           f"word must be one of centralized.py, model_editing.py, fedavg.py, by name alone (run_all.sh " \
                           f"runs the project's own scripts)"


def test_a_second_sigterm_to_run_all_stops_its_runs_at_once(tmp_path):
    """run_all.sh passes a stop on to its runs (which checkpoint at their next client step); a second one
    too, and a run still running stops at once on it."""
    results, grid = tmp_path / "runs", tmp_path / "grid.txt"
    grid.write_text("fedavg.py --iid --j 30 --rounds 2000 --eval-every 2000 --test-every 2000 --ckpt-every 1\n")
    flags = [*TINY, "--synthetic-size", "1000", "--batch-size", "16", "--k", "10", "--c", "0.3"]
    ((_, script, words),) = planned(results, flags, grid=str(grid))
    out = plan.parse_run(shlex.join([script, *words]))[1].out
    env = {**os.environ, "RESULTS": str(results), "PYTHON": fake_python(tmp_path, runs="real"), "FAKE_ESTIMATE": "1",
           "FAKE_LOG": str(tmp_path / "calls.log")}
    study = subprocess.Popen(["bash", os.path.join(ROOT, "run_all.sh"), "--grid", str(grid), "--seeds", "0", "--",
                              *flags], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        wait_for(lambda: os.path.exists(os.path.join(out, "checkpoint.pt")) or study.poll() is not None,
                 what="the run's first checkpoint")
        study.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        study.send_signal(signal.SIGTERM)
        t = time.time()
        _, err = study.communicate(timeout=60)
    finally:
        os.killpg(study.pid, signal.SIGKILL) if study.poll() is None else None
    assert study.returncode == 130 and time.time() - t < 5 and "interrupted" in err, err
    (log,) = (results / "logs").iterdir()
    assert log.read_text().splitlines()[-1] in ("stopped at once by a second signal 15: its last checkpoint is kept: "
                                                "continue with --resume",
                                                "stopped by signal 15 during round 2: checkpoint saved, continue "
                                                "with --resume"), log.read_text()
