"""run_all.sh and plan.py under a fuzz round (issue 29; issue 28's dry-run check): a $PYTHON wrapper that
does not exec, LC_ALL=C with a non-ASCII root, glob characters in it, links and odd files in a results
root, flag abbreviations after --, a crafted config.json key, a stop before the first run, unbounded
counts, odd RESULTS values, and a dry run that looks at the data and weights without fetching them.
Each refusal is one `error:` line, exit status 2, nothing written outside the results root."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

import fedavg
import plan
import plumbing
from conftest import ROOT, TINY
from helpers import assert_usage_error, parse_refused
from test_run_all import QUICK_N, calls, fake_map, fake_python, listed_runs, planned, run_all, sbatch_on_path


def fake_env(tmp_path, *runs):
    """The environment of a study of fake runs (test_run_all.fake_python), for these planned runs (lists of
    test_run_all.planned())."""
    return {"PYTHON": fake_python(tmp_path), "FAKE_LOG": str(tmp_path / "calls.log"), "FAKE_ESTIMATE": "1",
            "FAKE_MAP": fake_map(tmp_path, *runs)}


def fake_study(tmp_path, results, *argv, env=None, seeds="0"):
    """A --quick study of fake runs into `results` (--seeds seeds); returns CompletedProcess."""
    argv = ("--seeds", seeds, *argv)
    runs = planned(results, TINY, seeds=[int(x) for x in seeds.split(",")])
    return run_all(*argv, "--quick", "--", *TINY, results=results, env={**fake_env(tmp_path, runs), **(env or {})})


def victim(tmp_path):
    """A file outside the results root that nothing may write to; returns its path."""
    path = tmp_path / "elsewhere.txt"
    path.write_text("precious\n")
    return path


# ----------------------------------------------------------------------------- case 6: a $PYTHON wrapper

def test_a_run_behind_a_wrapper_that_does_not_exec_lives_and_dies_with_run_all(tmp_path):
    """$PYTHON a script that runs python without exec (conda run, uv run, a container launcher): the run's
    parent is the wrapper, run_all.sh its grandparent. The run must not stop at start, and must stop
    once run_all.sh is killed (SIGKILL: no trap of its own runs)."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/bash\n{sys.executable} "$@"\n')  # no exec
    wrapper.chmod(0o755)
    said = tmp_path / "said.txt"
    code = ("import os, sys, time; sys.path.insert(0, sys.argv[1]); import plumbing\n"
            "def main():\n"
            "    print('started', os.getpid(), flush=True)\n"
            "    while True:\n"
            "        time.sleep(0.05)\n"
            "        plumbing.stop_here('waiting')\n"
            "plumbing.run_main(main)\n")
    study = subprocess.Popen(["bash", "-c", f'export RUN_ALL_PID=$$; {shlex.quote(str(wrapper))} -c "$1" "$2" '
                              f'> {shlex.quote(str(said))} 2>&1 & wait', "study", code, ROOT])
    deadline = time.time() + 120
    while "started" not in (said.read_text() if said.exists() else "") and time.time() < deadline:
        time.sleep(0.1)
    run = int(said.read_text().split()[1])
    time.sleep(2)  # the run would stop itself at start (4 watch intervals)
    assert "stopped" not in said.read_text() and os.path.exists(f"/proc/{run}"), said.read_text()
    study.kill()
    study.wait()
    deadline = time.time() + 60
    while os.path.exists(f"/proc/{run}") and time.time() < deadline:
        time.sleep(0.1)
    alive = os.path.exists(f"/proc/{run}")
    if alive:
        os.kill(run, signal.SIGKILL)
    assert not alive, "the run outlived run_all.sh"
    assert "stopped by signal 15 during waiting" in said.read_text()


# ----------------------------------------------------------------------------- case 7: locales, glob characters, odd files

def test_a_non_ascii_root_under_lc_all_c_is_quoted_so_python_reads_it(tmp_path):
    results, python = tmp_path / "résultats", fake_python(tmp_path)  # plan.py for real, the prefetch at once
    env = {"LC_ALL": "C"}
    proc = run_all("--dry-run", "--slurm", "--quick", "--", *TINY, results=results, env={**env, "PYTHON": python})
    assert proc.returncode == 0, proc.stderr
    runs = listed_runs(proc.stdout, python)
    assert len(runs) == QUICK_N and {a.results for _, a, _ in runs} == {str(results)}
    summary = [shlex.split(line) for line in proc.stdout.splitlines() if "summarize.py" in line]
    assert summary == [[python, os.path.join(ROOT, "summarize.py"), str(results)]]
    # a finished study is finished: nothing reruns, nothing is reported failed
    assert run_all("--quick", "--", *TINY, results=results, env={**fake_env(tmp_path, planned(results, TINY)), **env}).returncode == 0
    proc = fake_study(tmp_path, results, env=env)
    assert proc.returncode == 0 and "FAILED" not in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("skip (done)") == QUICK_N
    plan = (results / "run_all.plan").read_text().splitlines()
    assert len(plan) == QUICK_N and all((results / line.split("\t")[1] / "result.json").exists() for line in plan)


def test_a_root_with_glob_characters_is_summarized(tmp_path):
    results = tmp_path / "glob[1]"
    proc = fake_study(tmp_path, results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c[0] for c in calls(tmp_path / "calls.log")][-1] == "summarize.py"


@pytest.mark.parametrize("name", ["run_all.settings", "run_all.lock", "run_all.plan"])
def test_a_folder_in_place_of_the_roots_own_file_is_one_line(tmp_path, name):
    results = tmp_path / "runs"
    (results / name).mkdir(parents=True)
    line = assert_usage_error(run_all("--quick", "--", *TINY, results=results, env=fake_env(tmp_path)))
    assert name in line and "not a regular file" in line


# ----------------------------------------------------------------------------- case 1: links in the root

@pytest.mark.parametrize("name", ["run_all.lock", "run_all.settings", "run_all.plan", "logs", "slurm"])
def test_a_link_in_place_of_the_roots_own_file_is_refused_before_anything_is_written(tmp_path, name):
    """A link to a file elsewhere (or a dangling one, whose target would be created): refused, the target
    untouched and not created, nothing run."""
    results, target = tmp_path / "runs", victim(tmp_path)
    results.mkdir()
    (results / name).symlink_to(target if name.startswith("run_all") else tmp_path)
    study = lambda: run_all("--quick", "--", *TINY, results=results, env=fake_env(tmp_path))
    line = assert_usage_error(study())
    assert f"{results}/{name} is a link" in line
    assert target.read_text() == "precious\n" and not (tmp_path / "calls.log").exists()
    (results / name).unlink()
    (results / name).symlink_to(tmp_path / "created")  # dangling
    assert "is a link" in assert_usage_error(study())
    assert not (tmp_path / "created").exists()


def test_a_link_at_a_runs_log_is_refused_before_the_first_run(tmp_path):
    results, target = tmp_path / "runs", victim(tmp_path)
    _, script, words = planned(results, TINY)[5]  # the sixth run of the quick study, as run_all.sh lists them
    some = plan.parse_run(shlex.join([script, *words]))[1].out
    (results / "logs").mkdir(parents=True)
    log = results / "logs" / (os.path.relpath(some, results).replace("/", "_") + ".log")
    log.symlink_to(target)
    line = assert_usage_error(run_all("--quick", "--", *TINY, results=results, env=fake_env(tmp_path, planned(results, TINY))))
    assert f"{log} is a link" in line
    assert target.read_text() == "precious\n" and not (tmp_path / "calls.log").exists()


def test_temporary_names_in_the_root_steer_no_write(tmp_path):
    """Links at the names the temporary files once had (run_all.plan.tmp, slurm/task.sh.tmp): the plan and
    the SLURM task script are written next to them, the targets stay as they were."""
    results, target = tmp_path / "runs", victim(tmp_path)
    (results / "slurm").mkdir(parents=True)
    (results / "run_all.plan.tmp").symlink_to(target)
    (results / "slurm" / "task.sh.tmp").symlink_to(target)
    env = {"PATH": f"{sbatch_on_path(tmp_path)}:{os.environ['PATH']}", "SBATCH_LOG": str(tmp_path / "sbatch.log")}
    proc = fake_study(tmp_path, results, "--slurm", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert target.read_text() == "precious\n" and os.stat(target).st_mode & 0o777 == 0o644
    assert len((results / "run_all.plan").read_text().splitlines()) == QUICK_N
    task = results / "slurm" / "task.sh"
    assert not task.is_symlink() and os.access(task, os.X_OK) and "job array" in task.read_text()


def test_only_well_formed_lines_of_an_old_plan_are_carried_into_the_new_one(tmp_path):
    results = tmp_path / "runs"
    assert fake_study(tmp_path, results, seeds="1").returncode == 0  # a study of this root: settings
    plan = results / "run_all.plan"
    foreign = 'fedavg dense\tfedavg/iid_j4/seed9\t{"k": 100}'
    bad = [f"touch {tmp_path}/PWNED #\tx\t{{}}", "fedavg dense\t../../escape/seed0\t{}",
           "fedavg dense\t/abs/seed0\t{}", "no-such-stage\tfedavg/x/seed0\t{}", "fedavg dense\tfedavg/y/seed0\tnot json",
           "fedavg dense\tfedavg/z/seed0\t{}\textra"]
    plan.write_text(plan.read_text() + "\n".join([foreign, *bad]) + "\n")
    proc = fake_study(tmp_path, results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = plan.read_text().splitlines()
    assert foreign in lines and not set(bad) & set(lines)
    assert len(lines) == 2 * QUICK_N + 1  # seed 0, seed 1 (kept: the same study), the foreign line


# ----------------------------------------------------------------------------- case 2: abbreviations

@pytest.mark.parametrize("flag", ["--resul", "--see", "--ou", "--resu", "--results=/x", "--resul=/x"])
def test_run_all_refuses_its_own_flags_after_dashdash_however_abbreviated(tmp_path, flag):
    results = tmp_path / "runs"
    line = assert_usage_error(run_all("--dry-run", "--quick", "--", *TINY, flag, "7", results=results))
    assert "set by run_all.sh itself" in line and not results.exists()


def test_the_scripts_take_no_abbreviated_flag(capsys):
    line = parse_refused(fedavg.get_args, [*TINY, "--resul", "/elsewhere"], capsys)
    assert "unrecognized arguments: --resul" in line


# ----------------------------------------------------------------------------- case 8: a crafted config.json

@pytest.mark.parametrize("key", ["a\tb", "a\nb"])
def test_a_tab_or_newline_in_a_config_key_keeps_the_plan_whole(tmp_path, key):
    results = tmp_path / "runs"
    _, script, words = planned(results, TINY)[2]  # the third run of the quick study
    out = plan.parse_run(shlex.join([script, *words]))[1].out
    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({key: 1}, f)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({}, f)
    python = fake_python(tmp_path)  # plan.py for real, the prefetch answered at once
    proc = run_all("--dry-run", "--slurm", "--quick", "--", *TINY, results=results, env={"PYTHON": python})
    assert proc.returncode == 0, proc.stderr
    assert len(listed_runs(proc.stdout, python)) == QUICK_N - 1
    assert f"skip (other flags): {out} holds a finished run that differs in " in proc.stdout


# ----------------------------------------------------------------------------- case 11: a stop before the first run

def processes_of(pid):
    """PIDs of the processes whose environment says RUN_ALL_PID=pid (run_all.sh's children)."""
    found = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                if f"RUN_ALL_PID={pid}".encode() in f.read().split(b"\0"):
                    found.append(int(p))
        except (OSError, ValueError):
            pass
    return found


@pytest.mark.parametrize("at", ["prefetch: ", "backbone "])  # during the prefetch; during the estimate's probe
def test_a_stop_before_the_first_run_ends_the_planner_quietly_and_leaves_no_root(tmp_path, at):
    results = tmp_path / "runs"
    env = {**os.environ, "RESULTS": str(results), "PYTHON": sys.executable}
    study = subprocess.Popen(["bash", os.path.join(ROOT, "run_all.sh"), "--quick", "--", *TINY], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while not seen.startswith(at):
        seen = study.stdout.readline()
        assert seen, study.stderr.read()
    study.send_signal(signal.SIGTERM)
    out, err = study.communicate(timeout=300)  # until every writer of its pipes is gone, orphans too
    assert study.returncode == 143, err
    assert "Traceback" not in err and "stopped before the first run" in err, err
    assert processes_of(study.pid) == []
    assert not results.exists()  # the root it had created, lock and all, is gone


# ----------------------------------------------------------------------------- case 12: bounds

@pytest.mark.parametrize("argv", [["--per-gpu", "99999999999999999999"], ["--per-gpu", "65"],
                                  ["--gpus", "99999999999999999999"], ["--slurm", "--max-parallel", "9" * 20],
                                  ["--seeds", ",".join(map(str, range(101)))]])
def test_counts_beyond_any_machine_are_one_line(tmp_path, argv):
    results = tmp_path / "runs"
    line = assert_usage_error(run_all("--dry-run", "--quick", *argv, "--", *TINY, results=results))
    assert argv[-2] in line and not results.exists()


# ----------------------------------------------------------------------------- case 13: RESULTS values

def test_results_slash_is_named_as_the_filesystems_root(tmp_path):
    for root in ("/", "//"):
        line = assert_usage_error(run_all("--dry-run", "--quick", "--", *TINY, results=root))
        assert "RESULTS=/ is the filesystem's root" in line


def test_results_starting_with_a_dash_is_a_folder_not_a_flag(tmp_path):
    env, python = {"PWD": str(tmp_path)}, fake_python(tmp_path)  # plan.py for real, the prefetch at once
    proc = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "--dry-run", "--slurm", "--quick", "--", *TINY],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, **env, "RESULTS": "-x", "PYTHON": python})
    assert proc.returncode == 0, proc.stderr
    runs = listed_runs(proc.stdout, python)
    assert len(runs) == QUICK_N and {a.results for _, a, _ in runs} == {"./-x"}
    assert not (tmp_path / "-x").exists()


# ----------------------------------------------------------------------------- issue 28: the dry run looks at data and weights
# (a warning, not an error: the dry run still lists and estimates the runs)

def test_a_dry_run_says_that_cifar100_is_missing_offline(tmp_path):
    if plumbing.network_reachable("www.cs.toronto.edu"):
        pytest.skip("online: the study would download CIFAR-100, a dry run only says so")
    data = tmp_path / "data"
    proc = run_all("--dry-run", "--slurm", "--quick", "--", *TINY[2:], "--data-dir", str(data), results=tmp_path / "runs")
    assert proc.returncode == 0 and len(listed_runs(proc.stdout)) == QUICK_N, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.strip()]
    assert line.startswith(f"run_all.sh: warning: the study would stop at its prefetch: CIFAR-100 is not in {data}")
    assert "python plan.py --data-dir" in line
    assert not data.exists() and not (tmp_path / "runs").exists()


def test_a_dry_run_reads_a_weights_file_and_makes_no_stand_in(tmp_path):
    flags = ["--dataset", "synthetic", "--arch", "test_vit", "--img-size", "32", "--device", "cpu"]
    data = tmp_path / "data"
    proc = run_all("--dry-run", "--slurm", "--quick", "--", *flags, "--weights", str(tmp_path / "none.pth"),
                   results=tmp_path / "runs")
    assert proc.returncode == 0 and f"warning: the study would stop at its prefetch: weights file not found: " \
        f"{tmp_path / 'none.pth'}" in proc.stderr
    proc = run_all("--dry-run", "--slurm", "--quick", "--", *flags, "--weights", "standin", "--data-dir", str(data),
                   results=tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    assert ("backbone test_vit at 32 px with --weights standin (made once: pretraining a tiny ViT, a minute or more "
            "on a busy CPU): the study fetches or makes them first") in proc.stdout
    assert not data.exists()  # the stand-in is pretrained by the study, not by a dry run
