"""run_all.sh: the grid it lists, a quick study end to end, SLURM submission, the stage barrier,
bad input. (summarize.py on its own: test_summarize.py.)"""
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY
from helpers import assert_usage_error

SCRIPT = os.path.join(ROOT, "run_all.sh")
RULES = ["least-sensitive", "most-sensitive", "lowest-magnitude", "highest-magnitude", "random"]


def run_all(*argv, results, env=None, timeout=600):
    """run_all.sh with RESULTS=results; returns CompletedProcess (text)."""
    full_env = {**os.environ, "RESULTS": str(results), "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", SCRIPT, *argv], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def commands(stdout):
    """The python command lines of a --dry-run, each as {'script': ..., 'flags': {flag: value or True}}."""
    out = []
    for line in stdout.splitlines():
        words = shlex.split(line)
        if not words or words[0] != sys.executable or not words[1].endswith(".py"):
            continue
        flags, i = {}, 2
        while i < len(words):
            takes_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            flags[words[i]] = words[i + 1] if takes_value else True
            i += 2 if takes_value else 1
        out.append({"script": os.path.basename(words[1]), "flags": flags})
    return out


def fake_python(tmp_path):
    """A stand-in for python that records every call (script, CUDA_VISIBLE_DEVICES, --out) in
    calls.log and 'finishes' the run by writing result.json into --out; it fails (exit 1) when its
    arguments contain $FAIL_IF."""
    path = tmp_path / "fake_python"
    path.write_text("""#!/usr/bin/env bash
out=""; prev=""
for a in "$@"; do [[ $prev == --out ]] && out=$a; prev=$a; done
echo "$(basename "$1") ${CUDA_VISIBLE_DEVICES:-none} $out" >> "$FAKE_LOG"
if [[ -n ${FAIL_IF:-} && " $* " == *" $FAIL_IF "* ]]; then echo "failing on purpose" >&2; exit 1; fi
if [[ -n $out ]]; then mkdir -p "$out" && echo '{}' > "$out/result.json"; fi
""")
    path.chmod(0o755)
    return str(path)


def calls(log):
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


# ----------------------------------------------------------------------------- the grid (--dry-run)

FULL = dict(edits={(r, "0.9", "4") for r in RULES} |
                  {("least-sensitive", s, r) for s in ("0.5", "0.75", "0.9", "0.95", "0.99") for r in "1248"},
            feds={(split, j, sparse) for split in ("iid", "1", "5", "10", "50") for j in ("4", "8", "16")
                  for sparse in (False, True)},
            default_mask="least-sensitive_s0.9_r4", per_seed=(1, 24, 30), per_stage=(16, 24, 15))
QUICK = dict(edits={(r, "0.9", "2") for r in RULES} |
                   {("least-sensitive", s, r) for s in ("0.5", "0.9") for r in "12"},
             feds={(split, j, sparse) for split in ("iid", "1") for j in ("4", "8") for sparse in (False, True)},
             default_mask="least-sensitive_s0.9_r2", per_seed=(1, 8, 8), per_stage=(5, 8, 4))


@pytest.mark.parametrize("grid,argv", [(FULL, []), (FULL, ["--seeds", "0,1"]), (QUICK, ["--quick"]),
                                       (QUICK, ["--quick", "--seeds", "3,5,7"])])
def test_dry_run_lists_exactly_the_grid(tmp_path, grid, argv):
    results = tmp_path / "runs"
    proc = run_all("--dry-run", *argv, results=results)
    assert proc.returncode == 0, proc.stderr
    assert not results.exists()  # a dry run writes nothing
    cmds = commands(proc.stdout)
    seeds = argv[argv.index("--seeds") + 1].split(",") if "--seeds" in argv else ["0"]
    headers = [line for line in proc.stdout.splitlines() if line.startswith("# stage ")]
    assert [int(h.split(": ")[-1].split()[0]) for h in headers] == [n * len(seeds) for n in grid["per_stage"]]

    prefetch = [c for c in cmds if c["script"] == "common.py"]
    assert len(prefetch) == 1 and cmds[0] is prefetch[0]  # cifar100: downloaded once, before any run
    for c in cmds:
        if c["script"] not in ("common.py", "summarize.py"):
            assert c["flags"]["--resume"] is True and c["flags"]["--seed"] in seeds
            assert c["flags"]["--out"].endswith(f"/seed{c['flags']['--seed']}")
    assert len({c["flags"].get("--out") for c in cmds if "--out" in c["flags"]}) == len(cmds) - 2  # distinct dirs
    assert cmds[-1]["script"] == "summarize.py"

    central = [c for c in cmds if c["script"] == "centralized.py"]
    edits = [c for c in cmds if c["script"] == "model_editing.py"]
    feds = [c for c in cmds if c["script"] == "fedavg.py"]
    assert (len(central), len(edits), len(feds)) == tuple(n * len(seeds) for n in grid["per_seed"])
    assert (1, len(grid["edits"]), len(grid["feds"])) == grid["per_seed"]
    for seed in seeds:
        c = [c for c in central if c["flags"]["--seed"] == seed]
        assert len(c) == 1 and c[0]["flags"]["--grid"] and c[0]["flags"]["--compare-schedulers"]
        e = [c for c in edits if c["flags"]["--seed"] == seed]
        assert {tuple(x["flags"][k] for k in ("--rule", "--sparsity", "--calib-rounds")) for x in e} == grid["edits"]
        assert all(x["flags"]["--hparams"] == f"{results}/centralized/seed{seed}/result.json" for x in e)
        fd = [c for c in feds if c["flags"]["--seed"] == seed]
        assert {(x["flags"].get("--nc", "iid"), x["flags"]["--j"], "--sparse" in x["flags"]) for x in fd} == \
            grid["feds"]
        mask_dir = f"{results}/editing/{grid['default_mask']}/seed{seed}"
        assert any(x["flags"]["--out"] == mask_dir for x in e)  # the default editing run is in the grid
        for x in fd:
            assert x["flags"]["--scale-rounds"] and x["flags"]["--k"] == "100" and x["flags"]["--c"] == "0.1"
            assert x["flags"].get("--mask") == (f"{mask_dir}/mask.pt" if "--sparse" in x["flags"] else None)

    # stages in order: whatever a run reads is made in an earlier stage
    at = {}
    for i, c in enumerate(cmds):
        at.setdefault(c["script"] + (" sparse" if "--sparse" in c["flags"] else ""), []).append(i)
    assert max(at["centralized.py"] + at["fedavg.py"]) < min(at["model_editing.py"])
    assert max(at["model_editing.py"]) < min(at["fedavg.py sparse"])


def test_dry_run_skips_finished_runs_and_appends_the_passthrough_flags_last(tmp_path):
    results = tmp_path / "runs"
    (results / "centralized" / "seed0").mkdir(parents=True)
    (results / "centralized" / "seed0" / "result.json").write_text("{}")
    before = sorted(p for p in results.rglob("*"))
    proc = run_all("--dry-run", "--quick", "--", "--dataset", "synthetic", "--batch-size", "9", results=results)
    assert proc.returncode == 0, proc.stderr
    assert f"skip (done): {results}/centralized/seed0" in proc.stdout.splitlines()
    cmds = commands(proc.stdout)
    assert not [c for c in cmds if c["script"] in ("centralized.py", "common.py")]  # synthetic: no prefetch
    assert len(cmds) == 16 + 1
    for c in cmds[:-1]:
        assert list(c["flags"])[-2:] == ["--dataset", "--batch-size"] and c["flags"]["--batch-size"] == "9"
    assert sorted(p for p in results.rglob("*")) == before


# ----------------------------------------------------------------------------- a quick study, end to end

def test_quick_study_end_to_end_then_nothing_to_redo(tmp_path):
    results = tmp_path / "runs"
    tiny = TINY + ["--synthetic-size", "1000"]
    proc = run_all("--quick", "--gpus", "2", "--", *tiny, results=results)  # two at a time, even on a CPU
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sum(line.startswith("run: ") for line in proc.stdout.splitlines()) == 17
    assert "skip (done)" not in proc.stdout

    finished = sorted(results.rglob("result.json"))
    assert len(finished) == 17
    by_stage = {}
    for path in finished:
        by_stage.setdefault(json.loads(path.read_text())["stage"], []).append(path)
    assert {s: len(p) for s, p in by_stage.items()} == {"centralized": 1, "editing": 8, "fedavg": 8}
    mask = results / "editing" / "least-sensitive_s0.9_r2" / "seed0" / "mask.pt"
    for path in by_stage["fedavg"]:
        r = json.loads(path.read_text())
        assert r["mask_file"] == (str(mask) if r["sparse"] else None)
    for path in finished:  # logs live outside the run directories
        assert not list(path.parent.glob("*.log"))
    assert len(list((results / "logs").glob("*.log"))) == 17

    summary = results / "summary"
    with open(summary / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 17 and {r["stage"] for r in rows} == {"centralized", "editing", "fedavg"}
    assert all(0 <= float(r["final_test_acc"]) <= 1 and float(r["seconds"]) > 0 for r in rows)
    report = (summary / "report.md").read_text()
    for title in ("Grid search", "schedulers", "Sparsity × calibration rounds", "Mask rules",
                  "FedAvg, dense", "FedAvg, sparse"):
        assert title in report, title
    pngs = sorted(p.name for p in summary.glob("*.png"))
    assert "editing_rules.png" in pngs and "fedavg_dense_j4.png" in pngs and "fedavg_sparse_j8.png" in pngs

    # again (one run at a time this time): every run is skipped, none is touched
    mtimes = {p: p.stat().st_mtime_ns for p in finished}
    proc = run_all("--quick", "--", *tiny, results=results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("skip (done): ")]
    assert len(skipped) == 17 and "run: " not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in results.rglob("result.json")} == mtimes

    # the same root with other settings is refused rather than silently mixed
    proc = run_all("--", *tiny, results=results)
    assert "other settings" in assert_usage_error(proc)


# ----------------------------------------------------------------------------- local runner, stage barrier

def test_a_failed_run_stops_at_the_stage_barrier_and_a_rerun_does_only_the_rest(tmp_path):
    results, log = tmp_path / "runs", tmp_path / "calls.log"
    env = {"PYTHON": fake_python(tmp_path), "FAKE_LOG": str(log), "FAIL_IF": "random",
           "CUDA_VISIBLE_DEVICES": "5,7"}
    proc = run_all("--quick", "--gpus", "2", "--", "--dataset", "synthetic", results=results, env=env)
    assert proc.returncode == 1
    assert "FAILED (exit 1)" in proc.stdout and "random_s0.9_r2" in proc.stdout
    assert "failing on purpose" in (results / "logs" / "editing_random_s0.9_r2_seed0.log").read_text()
    first = calls(log)
    scripts = [c[0] for c in first]
    assert scripts.count("centralized.py") == 1 and scripts.count("model_editing.py") == 8
    assert scripts.count("fedavg.py") == 4  # the dense ones; sparse FedAvg (stage 3) never started
    assert "summarize.py" not in scripts
    assert {c[1] for c in first} == {"5", "7"}  # one run per listed GPU

    env.pop("FAIL_IF")
    proc = run_all("--quick", "--", "--dataset", "synthetic", results=results, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = calls(log)[len(first):]
    assert sorted(c[2].split("/")[-2] for c in again if c[0] != "summarize.py") == \
        ["iid_j4_sparse", "iid_j8_sparse", "nc1_j4_sparse", "nc1_j8_sparse", "random_s0.9_r2"]
    assert again[-1][0] == "summarize.py"
    assert proc.stdout.count("skip (done): ") == 12


# ----------------------------------------------------------------------------- SLURM

def test_slurm_submits_one_array_per_stage_chained_by_dependencies(tmp_path):
    results, log = tmp_path / "runs", tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"  # records its arguments, answers like `sbatch --parsable`
    sbatch.write_text(f"""#!{sys.executable}
import json, os, sys
log = os.environ["SBATCH_LOG"]
n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
open(log, "a").write(json.dumps(sys.argv[1:]) + "\\n")
print(f"{{4200 + n}};cluster")
""")
    sbatch.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_LOG": str(tmp_path / "sbatch.log"),
           "PYTHON": fake_python(tmp_path), "FAKE_LOG": str(log), "SLURM_ACCOUNT": "proj1", "SLURM_TIME": ""}
    proc = run_all("--slurm", "--seeds", "0,1", "--partition", "gpu", "--time", "2:00:00", results=results, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    subs = [json.loads(line) for line in (tmp_path / "sbatch.log").read_text().splitlines()]
    assert len(subs) == 4
    prefetch = calls(log)
    assert [c[0] for c in prefetch] == ["common.py"]  # once, on this node, before anything is submitted

    def opt(argv, name):
        return argv[argv.index(name) + 1] if name in argv else None

    for k, (argv, size) in enumerate(zip(subs[:3], (16 * 2, 24 * 2, 15 * 2))):
        assert opt(argv, "--array") == f"0-{size - 1}"
        assert opt(argv, "--dependency") == (None if k == 0 else f"afterok:{4200 + k - 1}")
        assert opt(argv, "--partition") == "gpu" and opt(argv, "--time") == "2:00:00"
        assert opt(argv, "--account") == "proj1" and opt(argv, "--gres") == "gpu:1"
        task, cmds = argv[-2:]
        lines = open(cmds).read().splitlines()
        assert len(lines) == size
        # the array task runs line SLURM_ARRAY_TASK_ID of the command file
        last = len(calls(log))
        subprocess.run(["bash", task, cmds], env=dict(os.environ, SLURM_ARRAY_TASK_ID=str(size - 1), **env),
                       check=True, capture_output=True)
        ran = calls(log)[last:]
        assert len(ran) == 1 and ran[0][2] == shlex.split(lines[-1])[shlex.split(lines[-1]).index("--out") + 1]
    summary = subs[3]
    assert opt(summary, "--dependency") == "afterok:4202" and "--array" not in summary
    assert "summarize.py" in opt(summary, "--wrap") and "--gres" not in summary


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv", [["--frobnicate"], ["--seeds", "a,b"], ["--seeds", "0,,1"], ["--seeds", "0,1,0"],
                                  ["--seeds", "01"], ["--seeds"], ["--gpus", "0"], ["--gpus", "two"],
                                  ["--gpus", "2", "--slurm"], ["--", "--seed", "3"], ["--", "--out", "x"]])
def test_bad_flags_are_one_line_errors_that_write_nothing(tmp_path, argv):
    results = tmp_path / "runs"
    assert_usage_error(run_all(*argv, results=results))
    assert not results.exists()


def test_a_results_root_that_is_a_file_is_refused(tmp_path):
    results = tmp_path / "runs"
    results.write_text("not a directory")
    assert "is a file" in assert_usage_error(run_all("--quick", results=results))
    assert results.read_text() == "not a directory"


def test_slurm_without_sbatch_is_refused(tmp_path):
    bash_dir = os.path.dirname(shutil.which("bash"))
    path = os.pathsep.join(dict.fromkeys([bash_dir, "/usr/bin", "/bin"]))
    if shutil.which("sbatch", path=path):
        pytest.skip("sbatch is installed here")
    results = tmp_path / "runs"
    assert "sbatch" in assert_usage_error(run_all("--slurm", results=results, env={"PATH": path}))
    assert not results.exists()
