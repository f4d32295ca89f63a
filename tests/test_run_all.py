"""run_all.sh and its planner plan.py: the grid it lists, in its order, and what it costs (--dry-run,
--describe-runs, --prefetch, the probe's estimate), the quick study's core end to end (killed, resumed, then
nothing to redo, then summarized), a finished run of other flags, the settings file, the study lock, --gpus
and --per-gpu, SLURM submission and its task script, bad input."""
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import centralized
import common
import plan
import plumbing
import splits
import summarize
from test_summarize import check_latex
import fedavg
import model_editing
from conftest import ROOT, TINY
from helpers import assert_usage_error, backbone_file

SCRIPT = os.path.join(ROOT, "run_all.sh")
STAGES = ["centralized", "model_editing", "fedavg dense", "fedavg sparse", "fedavg head"]
# A tiny study on the CPU: 600 synthetic images is the smallest set that leaves a validation image per
# class. Its time goes mostly into starting 17 processes (importing torch, timm, matplotlib), not compute.
SMALL = TINY + ["--synthetic-size", "600", "--batch-size", "16"]


def run_all(*argv, results, env=None, timeout=600):
    """run_all.sh with RESULTS=results; returns CompletedProcess (text)."""
    full_env = {**os.environ, "RESULTS": str(results), "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", SCRIPT, *argv], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def listed_runs(stdout, python=sys.executable):
    """The stage-script commands of a --dry-run (run by $PYTHON python), each as (script, parsed args):
    parsed by the script's own get_args, so a flag it would refuse fails here."""
    parse = {"centralized.py": centralized.get_args, "model_editing.py": model_editing.get_args,
             "fedavg.py": fedavg.get_args}
    out = []
    for line in stdout.splitlines():
        words = shlex.split(line) if line.startswith(python) else []
        if len(words) > 1 and words[0] == python and os.path.basename(words[1]) in parse:
            script = os.path.basename(words[1])
            out.append((script, parse[script](words[2:]), words[2:]))
    return out


def stage_lines(stdout):
    """{stage: (runs, images fwd+bwd, images fwd)} and the total, from the summary lines of a --dry-run."""
    got = {}
    for line in stdout.splitlines():
        if line.startswith(("stage ", "total: ")):
            name, _, rest = line.partition(": ")
            words = rest.split()
            got[name.removeprefix("stage ")] = (int(words[0]), int(words[2]), int(words[5]))
    return got


def run_key(script, a):
    """(stage, what distinguishes the run in the grid)."""
    if script == "centralized.py":
        return "centralized", (a.grid, a.compare_schedulers)
    if script == "model_editing.py":
        return "model_editing", (a.rule, a.sparsity, a.calib_rounds)
    split = a.split
    if a.train == "head":
        return "fedavg head", (split, a.j, a.head)
    if a.sparse:
        return "fedavg sparse", (split, a.j, a.rule, a.sparsity, a.calib_rounds)
    return "fedavg dense", (split, a.j)


def fake_python(tmp_path, runs="fake"):
    """A stand-in for $PYTHON. plan.py runs for real (run_all.sh asks it for run directories), except
    that with $FAKE_ESTIMATE set, `plan.py --estimate` answers at once instead of measuring: the
    --per-gpu asked for (auto: 1), $FAKE_THREADS (if set) as the runs' threads, and $FAKE_ESTIMATE
    milliseconds per run; with $FAKE_OMP a run logs 'omp OMP_NUM_THREADS'; and with runs='fake',
    `plan.py --prefetch` answers 'fake prefetch: ready' at once (what fake runs need is nothing: the
    prefetch's own tests and the real study run it for real). summarize.py is recorded and
    does nothing (its own tests are in test_summarize.py). A stage script is run for real with
    runs='real'; with runs='fake' it is recorded in $FAKE_LOG as 'SCRIPT CUDA_VISIBLE_DEVICES RUN_ALL_PID
    ARGS...' and 'finishes' by writing result.json and config.json into the run directory that $FAKE_MAP
    gives for its arguments (lines 'ARGS<tab>DIR<tab>CONFIG'), after $FAKE_SLEEP seconds if set, then
    logs 'end SCRIPT CUDA_VISIBLE_DEVICES'; it fails (exit $FAIL_STATUS,
    default 1) when its arguments contain $FAIL_IF, and
    with $FAKE_WAIT it waits for SIGUSR1, then exits 143 as a checkpointing run does."""
    path = tmp_path / f"python_{runs}"
    path.write_text(f"""#!/usr/bin/env bash
script=$(basename "$1")
if [[ $script == plan.py && $2 == --estimate && -n ${{FAKE_ESTIMATE:-}} ]]; then
  n=$(grep -c .); per_gpu=${{*: -1}}; [[ $per_gpu != auto ]] || per_gpu=1
  printf 'per-gpu\t%s\nsay\tfake estimate\n' "$per_gpu"
  [[ -z ${{FAKE_THREADS:-}} ]] || printf 'threads\t%s\n' "$FAKE_THREADS"
  for ((i = 0; i < n; i++)); do printf 'cost\t%s\n' "$FAKE_ESTIMATE"; done
  exit 0
fi
if [[ $script == plan.py && $2 == --prefetch && {runs} == fake ]]; then echo "fake prefetch: ready"; exit 0; fi
[[ $script != plan.py ]] || exec {sys.executable} "$@"
echo "$script ${{CUDA_VISIBLE_DEVICES-unset}} ${{RUN_ALL_PID-unset}} ${{*:2}}" >> "$FAKE_LOG"
[[ -z ${{FAKE_OMP:-}} || $script == summarize.py ]] || echo "omp ${{OMP_NUM_THREADS-unset}}" >> "$FAKE_LOG"
[[ $script != summarize.py ]] || exit 0
[[ {runs} == fake ]] || exec {sys.executable} "$@"
if [[ -n ${{FAKE_WAIT:-}} ]]; then
  trap 'echo "got signal" >> "$FAKE_LOG"; exit 143' USR1 TERM
  echo "waiting" >> "$FAKE_LOG"
  while :; do sleep 0.05; done
fi
if [[ -n ${{FAIL_IF:-}} && " $* " == *" $FAIL_IF "* ]]; then echo "failing on purpose" >&2; exit ${{FAIL_STATUS:-1}}; fi
IFS=$'\t' read -r out config < <(awk -F'\t' -v k="${{*:2}}" '$1 == k {{print $2 "\t" $3}}' "$FAKE_MAP")
[[ -z ${{FAKE_SLEEP:-}} ]] || sleep "$FAKE_SLEEP"
mkdir -p "$out" && echo '{{}}' > "$out/result.json" && echo "$config" > "$out/config.json"
[[ -z ${{FAKE_SLEEP:-}} ]] || echo "end $script ${{CUDA_VISIBLE_DEVICES-unset}}" >> "$FAKE_LOG"
""")
    path.chmod(0o755)
    return str(path)


def planned(results, extra=(), seeds=(0,), quick=True, **kw):
    """The runs plan.py gives run_all.sh, as (stage, script, words): the same call as run_all.sh's."""
    _, runs = plan.plan_runs(list(seeds), str(results), list(extra), quick=quick, **kw)
    return [(stage, script, shlex.split(args)) for stage, script, args, _ in runs]


QUICK_N = len(planned("runs"))  # runs in one seed of the quick study


def fake_map(tmp_path, *runs):
    """$FAKE_MAP for these planned runs (lists of planned())."""
    path = tmp_path / "fake.map"
    with open(path, "a") as f:
        for _, script, words in (run for some in runs for run in some):
            _, a = plan.parse_run(shlex.join([script, *words]))
            f.write(" ".join(words) + "\t" + a.out + "\t" + json.dumps(plumbing.run_config(a)) + "\n")
    return str(path)


def calls(log):
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def hms(seconds):
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- the grid (--dry-run)

def expected_grid(s):
    """{stage: {run_key}} of one seed of the study with the lists and sizes s (plan.FULL or plan.QUICK),
    built here from the lists as README.md's table describes the families, not from plan.families; sets,
    so that a run two families both name counts once."""
    default = (s["sparsity"], s["calib"])
    js = {4, *s["js"]}  # the core runs at J=4 on every split, then the J sweep
    return {
        "centralized": {(True, True)},
        "model_editing": {(r, *default) for r in ["least-sensitive", *s["rules"]]}
                         | {("least-sensitive", sp, r) for sp in s["edit_sparsities"] for r in s["edit_calibs"]},
        "fedavg dense": {(sp, j) for sp in s["splits"] for j in js},
        "fedavg sparse": {(sp, j, "least-sensitive", *default) for sp in s["splits"] for j in js}
                         | {(sp, 4, r, *default) for sp in s["rule_splits"] for r in s["rules"]}
                         | {(s["ablation_split"], 4, "least-sensitive", sp, r)
                            for sp in s["fed_sparsities"] for r in s["fed_calibs"]},
        "fedavg head": {(sp, j, "zero") for sp in s["splits"] for j in s["js"]},  # the head-only baseline
    }


def core_runs(s):
    """The assignment's core runs of one seed (run first): centralized, the default editing run, dense
    and sparse FedAvg at J=4 on every split."""
    default = ("least-sensitive", s["sparsity"], s["calib"])
    return ({("centralized", (True, True)), ("model_editing", default)}
            | {("fedavg dense", (sp, 4)) for sp in s["splits"]}
            | {("fedavg sparse", (sp, 4, *default)) for sp in s["splits"]})


def test_the_study_is_its_lists_every_mask_rule_and_split_of_the_full_study_and_a_smaller_quick_one():
    full, quick = (expected_grid(s) for s in (plan.FULL, plan.QUICK))
    assert plan.FULL["rules"] is common.MASK_RULES and plan.FULL["splits"] is plan.SPLITS
    assert {k[0] for k in full["model_editing"]} == set(common.MASK_RULES)
    assert {k[0] for k in full["fedavg dense"]} == set(plan.SPLITS)
    for stage in STAGES:  # the quick study: every kind of run of the full one, fewer of each
        assert 0 < len(quick[stage]) <= len(full[stage])
    assert set(plan.QUICK["rules"]) <= set(common.MASK_RULES) and set(plan.QUICK["splits"]) <= set(plan.SPLITS)


def test_a_new_mask_rule_or_split_changes_the_study_and_its_table_in_one_place(tmp_path):
    """As a student adds them: one entry in common.MASK_RULES, one in plan.SPLITS (in place)."""
    before, table = planned(tmp_path, quick=False), plan.grid_table()
    common.MASK_RULES.append("mean-gradient")
    plan.SPLITS.append("dir0.5")
    try:
        after, grown = planned(tmp_path, quick=False), plan.grid_table()
    finally:
        common.MASK_RULES.remove("mean-gradient")
        plan.SPLITS.remove("dir0.5")
    s = plan.FULL
    new = [w for w in after if w not in before]
    assert all("mean-gradient" in words or "--dirichlet" in words for _, _, words in new)
    # the rule: an editing run and one per rule split in sparse FedAvg; the split: dense and sparse FedAvg
    # at every J, and the head-only baseline at every J of the sweep
    assert len(new) == len(after) - len(before) == 1 + len(s["rule_splits"]) + 2 * len({4, *s["js"]}) + len(s["js"])
    assert f"**{len(after)}**" in grown and f"**{len(before)}**" in table
    assert planned(tmp_path, quick=False) == before


@pytest.mark.parametrize("sizes", [plan.FULL, plan.QUICK], ids=["full", "quick"])
def test_the_planned_study_is_its_grid_seed_by_seed_core_first(sizes):
    """The planner alone (fast); run_all.sh lists the same runs (test_dry_run_lists_the_planned_grid...)."""
    runs = [(s, plan.parse_run(shlex.join([s, *words]))[1]) for _, s, words in
            planned("runs", seeds=(0, 1), quick=sizes is plan.QUICK)]
    grid, core = expected_grid(sizes), core_runs(sizes)
    per_seed = sum(map(len, grid.values()))
    assert len(runs) == 2 * per_seed
    for k, seed in enumerate((0, 1)):
        mine = [run_key(s, a) for s, a in runs[k * per_seed:(k + 1) * per_seed] if a.seed == seed]
        assert len(mine) == per_seed and set(mine[:len(core)]) == core
        assert {(stage, key) for stage in STAGES for key in grid[stage]} == set(mine)


# --slurm: the same list, without the local speed probe (test_dry_run_estimates_the_time_from_a_probe)
@pytest.mark.parametrize("sizes,argv,seeds", [(plan.FULL, [], [0, 1, 2]), (plan.QUICK, ["--quick", "--seeds", "3,5"], [3, 5])])
def test_dry_run_lists_the_planned_grid_and_counts_its_runs_and_images(tmp_path, sizes, argv, seeds):
    # plan.py runs for real; the dry run's look at the data and weights (a model built: seconds) is answered
    # at once, as it has tests of its own (test_a_dry_run_reads_a_weights_file_and_makes_no_stand_in)
    results, python = tmp_path / "runs", fake_python(tmp_path)
    proc = run_all("--dry-run", "--slurm", *argv, results=results, env={"PYTHON": python})
    assert proc.returncode == 0, proc.stderr
    assert not results.exists()  # a dry run writes nothing

    runs = listed_runs(proc.stdout, python)
    assert [(script, words) for script, _, words in runs] == \
        [(script, words) for _, script, words in planned(results, seeds=seeds, quick=sizes is plan.QUICK)]
    for _, a, words in runs:  # what run_all.sh adds to every run
        assert a.results == str(results) and a.resume and a.deterministic and a.seed in seeds
        assert a.out.startswith(f"{results}/") and a.out.endswith(f"/seed{a.seed}")
    assert len({a.out for _, a, _ in runs}) == len(runs)  # no run twice
    grid = expected_grid(sizes)
    got = {(seed, *run_key(s, a)) for s, a, _ in runs for seed in [a.seed]}
    assert got == {(seed, stage, key) for seed in seeds for stage in STAGES for key in grid[stage]}
    # seed by seed, and within a seed the core first
    per_seed = sum(len(grid[s]) for s in STAGES)
    core = core_runs(sizes)
    for k, seed in enumerate(seeds):
        mine = runs[k * per_seed:(k + 1) * per_seed]
        assert {a.seed for _, a, _ in mine} == {seed}
        assert {run_key(s, a) for s, a, _ in mine[:len(core)]} == core
    for script, a, _ in runs:
        if script == "fedavg.py":
            assert (a.k, a.c, a.scale_rounds) == (100, 0.1, True)
    if sizes is plan.QUICK:  # short runs
        assert all(a.epochs <= 2 for s, a, _ in runs if s != "fedavg.py")
        assert all(a.rounds <= 4 and a.eval_every == a.test_every == 2 for s, a, _ in runs if s == "fedavg.py")
        assert all(a.fisher_batches == 1 for s, a, _ in runs if s == "model_editing.py" or getattr(a, "sparse", 0))

    counted = stage_lines(proc.stdout)
    assert [counted[s][0] for s in STAGES] == [len(grid[s]) * len(seeds) for s in STAGES]
    images = {s: [0, 0] for s in STAGES}
    for script, a, words in runs:
        _, fb, f, _, _ = plan.describe_run(shlex.join([script] + words))
        images[run_key(script, a)[0]][0] += fb
        images[run_key(script, a)[0]][1] += f
    for s in STAGES:
        assert counted[s][1:] == tuple(images[s])
        assert counted[s][2] > 0 and (counted[s][1] > 0) == (s not in ("centralized", "fedavg head"))  # these train no backbone
    assert counted["total"] == tuple(sum(counted[s][k] for s in STAGES) for k in range(3))


def table_rows(table):
    """README's grid table -> [(family, stage, per seed, quick)] and the totals (full, quick)."""
    lines = table.splitlines()[2:]
    lines = lines[:next((i for i, line in enumerate(lines) if line.startswith("| *with --")), len(lines))]  # opt-in groups
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    total = next(r for r in rows if r[0] == "**total**")
    return ([(r[0], r[1], int(r[2]), int(r[3])) for r in rows if r[1]],
            (int(total[2].split("**")[1]), int(total[3].strip("*"))))


def test_the_grid_table_counts_each_stage_and_the_readme_holds_it():
    table = plan.grid_table()
    rows, totals = table_rows(table)
    full, quick = (expected_grid(s) for s in (plan.FULL, plan.QUICK))
    for stage in STAGES:  # the families of a stage add up to its runs, each counted once
        assert sum(n for _, st, n, _ in rows if st == stage) == len(full[stage])
        assert sum(q for _, st, _, q in rows if st == stage) == len(quick[stage])
    assert totals == (sum(map(len, full.values())), sum(map(len, quick.values())))
    assert f"({3 * totals[0]} with 3 seeds)" in table
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("<!-- grid-table -->\n")[1].split("<!-- /grid-table -->")[0]
    assert block.strip() == table, "README.md's grid table is stale: paste `python plan.py --grid-table` into it"


def test_grid_table_is_printed_by_the_command(capsys):
    plan.main(["--grid-table"])
    assert capsys.readouterr().out == plan.grid_table() + "\n"


def test_the_extensions_group_is_opt_in_and_the_head_baseline_is_in_the_study(tmp_path):
    """--extensions adds its runs after the study's (what they are: tests/test_compare.py); the
    head-only FedAvg baseline from a zero head is part of the default study, one run per split x J."""
    base, table = planned(tmp_path, quick=False), plan.grid_table()
    ext = planned(tmp_path, quick=False, groups=["extensions"])
    s = plan.FULL
    assert len(ext) > len(base) and ext[:len(base)] == base
    assert "*with --extensions:*" in table
    baseline = [w for _, _, w in base if "--train" in w]
    assert len(baseline) == len(s["splits"]) * len(s["js"]) * 1  # seed 0
    assert all(w[w.index("--train"):w.index("--train") + 4] == ["--train", "head", "--head", "zero"] for w in baseline)
    assert sorted({(w[w.index("--j") + 1], " ".join(w[w.index("--k"):w.index("--j")])) for w in baseline}) == \
        sorted({(str(j), " ".join([*s["fed"], *splits.split_flags(sp)])) for sp in s["splits"] for j in s["js"]})


# ----------------------------------------------------------------------------- run_all.sh --grid FILE

def test_a_grid_file_runs_per_seed_through_the_same_machinery(tmp_path):
    """Comments and blank lines skipped; each line once per seed, with run_all.sh's flags; the file's runs
    are the recorded settings, so another grid on the same root is refused."""
    results, log, grid = tmp_path / "runs", tmp_path / "calls.log", tmp_path / "grid.txt"
    grid.write_text("# my grid\n\nfedavg.py --nc 5 --j 4 --lr 0.001  # a lower rate\n"
                    "  model_editing.py --rule random --epochs 1\nfedavg.py --iid --train head --head zero\n")
    lines = [["fedavg.py", "--nc", "5", "--j", "4", "--lr", "0.001"], ["model_editing.py", "--rule", "random", "--epochs", "1"],
             ["fedavg.py", "--iid", "--train", "head", "--head", "zero"]]
    python = fake_python(tmp_path)  # plan.py for real, the prefetch answered at once
    proc = run_all("--dry-run", "--slurm", "--grid", str(grid), "--seeds", "0,1", "--", *TINY, results=results,
                   env={"PYTHON": python})
    assert proc.returncode == 0, proc.stderr
    common_flags = lambda seed: ["--results", str(results), "--seed", str(seed), "--resume", "--deterministic", *TINY]
    assert [[s, *w] for s, _, w in listed_runs(proc.stdout, python)] == \
        [[*line, *common_flags(seed)] for seed in (0, 1) for line in lines]
    counted = stage_lines(proc.stdout)
    assert [counted[s][0] for s in STAGES] == [0, 2, 2, 0, 2]  # a head-only line is the stage 'fedavg head'

    runs = planned(results, TINY, seeds=(0, 1), grid=str(grid))
    env = {"PYTHON": fake_python(tmp_path), "FAKE_LOG": str(log), "FAKE_MAP": fake_map(tmp_path, runs),
           "FAKE_ESTIMATE": "1"}
    proc = run_all("--grid", str(grid), "--seeds", "0,1", "--", *TINY, results=results, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c[0] for c in calls(log)] == ["fedavg.py", "model_editing.py", "fedavg.py"] * 2 + ["summarize.py"]
    assert (results / "run_all.settings").read_text() == \
        f"grid=file: {'; '.join(map(shlex.join, lines))} extra={shlex.join(TINY)}\n"
    assert [line.split("\t")[0] for line in (results / "run_all.plan").read_text().splitlines()] == \
        ["fedavg dense", "model_editing", "fedavg head"] * 2
    proc = run_all("--grid", str(grid), "--seeds", "0,1", "--", *TINY, results=results, env=env)
    assert proc.returncode == 0 and proc.stdout.count("skip (done): ") == 6
    grid.write_text("fedavg.py --nc 5 --j 8\n")  # another grid: another study
    assert "other settings (grid=file: fedavg.py --nc 5 --j 4" in assert_usage_error(
        run_all("--grid", str(grid), "--", *TINY, results=results, env=env))


@pytest.mark.parametrize("text,says", [
    ("fedavg.py --iid\nfedavg.py --bogus 3\n", "line 2: fedavg.py: unrecognized arguments: --bogus"),
    ("# only\n\n", "no run in it"),
    ("train.py --lr 1\n", "line 1: 'train.py --lr 1"),
    ("fedavg.py --nc 'five\n", "line 1: No closing quotation"),
    ("fedavg.py --iid --seed 3\n", "line 1: --seed is set by run_all.sh itself"),
    ("fedavg.py --out=x\n", "line 1: --out=x is set by run_all.sh itself"),
    ("fedavg.py --iid --j 4\nfedavg.py --j 4 --iid\n", "line 2: the same run directory as line 1"),
    ("fedavg.py --iid --data-dir 'a\tb'\n", "line 1: a quoted word holds a tab"),
])
def test_a_bad_grid_line_is_one_error_naming_the_file_and_line(tmp_path, text, says):
    grid = tmp_path / "grid.txt"
    grid.write_text(text)
    with pytest.raises(plumbing.UserError) as e:
        plan.read_grid(str(grid), "runs", TINY)
    assert str(e.value).startswith(f"--grid {grid}") and says in str(e.value), str(e.value)


def test_run_all_refuses_a_bad_grid_file_and_writes_nothing(tmp_path):
    results, grid = tmp_path / "runs", tmp_path / "grid.txt"
    grid.write_text("fedavg.py --iid\n\nfedavg.py --k 0\n")
    assert f"--grid {grid}, line 3: fedavg.py: argument --k" in assert_usage_error(
        run_all("--grid", str(grid), "--", *TINY, results=results))
    assert "--grid FILE is the whole study" in assert_usage_error(
        run_all("--grid", str(grid), "--quick", results=results))
    assert "cannot read it" in assert_usage_error(run_all("--grid", str(tmp_path / "nope"), results=results))
    assert not results.exists()


def test_a_finished_run_counts_as_done_only_with_the_flags_of_the_study(tmp_path):
    """A run directory holding a finished run of other flags (e.g. an example run with other epochs) is
    neither counted as done nor run over: one line says what differs, the study ends with exit 1."""
    results, log = tmp_path / "runs", tmp_path / "calls.log"
    flags = [*TINY, "--batch-size", "9"]
    first = planned(results, flags)
    n, n_editing = len(first), sum(stage == "model_editing" for stage, _, _ in first)
    editing = [(plan.parse_run(shlex.join([s, *words]))[1], words) for _, s, words in first if s == "model_editing.py"]
    (done, _), (other, other_words) = editing[:2]
    for a, epochs in (done, done.epochs), (other, other.epochs + 1):
        os.makedirs(a.out)
        with open(os.path.join(a.out, "result.json"), "w") as f:
            f.write("{}")
        plumbing.write_json({**plumbing.run_config(a), "epochs": epochs, "precision": "off"},
                            os.path.join(a.out, "config.json"))
    python = fake_python(tmp_path)  # plan.py for real, the prefetch answered at once
    proc = run_all("--dry-run", "--slurm", "--quick", "--", *flags, results=results, env={"PYTHON": python})
    assert proc.returncode == 0, proc.stderr
    assert f"skip (done): {done.out}" in proc.stdout.splitlines()
    assert (f"skip (other flags): {other.out} holds a finished run that differs in epochs: not this study's run, "
            f"not counted as done; move it away to run this one") in proc.stdout.splitlines()
    runs = listed_runs(proc.stdout, python)
    assert len(runs) == n - 2 and not {done.out, other.out} & {a.out for _, a, _ in runs}
    assert stage_lines(proc.stdout)["model_editing"][0] == n_editing - 2
    for _, a, words in runs:
        assert words[-len(flags):] == flags and a.batch_size == 9
    prefetch = [line for line in proc.stdout.splitlines() if line.startswith(python) and "plan.py" in line]
    assert prefetch == [shlex.join([python, os.path.join(ROOT, "plan.py"), "--prefetch", "--", *flags])]

    # running: the other run is left alone, reported at the end, and the summary does not count it
    env = {"PYTHON": fake_python(tmp_path), "FAKE_LOG": str(log), "FAKE_ESTIMATE": "1",
           "FAKE_MAP": fake_map(tmp_path, first)}
    mtime = os.stat(os.path.join(other.out, "result.json")).st_mtime_ns
    proc = run_all("--quick", "--", *flags, results=results, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    ran = [c for c in calls(log) if c[0] != "summarize.py"]
    assert len(ran) == n - 2 and other_words not in [c[3:] for c in ran]
    assert os.stat(os.path.join(other.out, "result.json")).st_mtime_ns == mtime
    assert f"1 run(s) not run: their directories hold finished runs with other flags (see above):\n  {other.out}\n" \
        in proc.stderr
    plan_file = (results / "run_all.plan").read_text().splitlines()
    centralized_run = os.path.relpath(plan.parse_run(shlex.join([first[0][1], *first[0][2]]))[1].out, results)
    assert centralized_run == ("centralized/grid_compare_synthetic_test-vit_random_px32_b9_ep2_glr0.1,0.01_gm0.9_gwd0_"
                               "scheds-cosine,constant/seed0")  # every flag of the quick grid and after --
    assert len(plan_file) == n and plan_file[0].split("\t")[:2] == ["centralized", centralized_run]
    assert [json.loads(line.split("\t")[2]) for line in plan_file if line.split("\t")[1] ==
            os.path.relpath(other.out, results)] == [plumbing.run_config(other)]


# ----------------------------------------------------------------------------- plan.py --describe-runs / --prefetch

def describe(monkeypatch, capsys, *lines):
    """plan.py --describe-runs on these lines (in this process): its output."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    plan.main(["--describe-runs"])
    return capsys.readouterr().out


def test_a_result_json_that_is_no_json_object_is_not_done(tmp_path):
    args = model_editing.get_args([*TINY, "--out", str(tmp_path / "run")])
    os.makedirs(args.out)
    plumbing.write_json(dict(plumbing.run_config(args), precision="off"), os.path.join(args.out, "config.json"))
    for text, state in (("", "todo"), ('{"stage": "edi', "todo"), ("[1]", "todo"), ("{}", "done")):
        (tmp_path / "run" / "result.json").write_text(text)
        assert plan.run_state(args) == state, text  # as the script's --resume sees it: it runs again


def test_describe_runs_names_the_run_directory_and_counts_images_by_hand(tmp_path, monkeypatch, capsys):
    line = (f"fedavg.py --k 100 --c 0.1 --j 8 --scale-rounds --nc 10 --sparse --rule least-sensitive "
            f"--sparsity 0.9 --calib-rounds 4 --results {tmp_path}/r --seed 1")
    out = describe(monkeypatch, capsys, line, f"model_editing.py --rule random --epochs 2 --results {tmp_path}/r")
    fed, edit = [row.split("\t") for row in out.splitlines()]
    assert [fed[3], edit[3]] == ["todo", "todo"]  # nothing finished there
    assert json.loads(edit[4]) == plumbing.run_config(model_editing.get_args(
        ["--rule", "random", "--epochs", "2", "--results", f"{tmp_path}/r"]))  # what its config.json will hold
    fed, edit = fed[:3], edit[:3]
    # CIFAR-100: 45000 train, 5000 val, 10000 test. J=8 scales 300 rounds to 150; 10 clients a round,
    # batch 64; calibration: 4 rounds x 100 clients x ceil(8 x 32 / 100) = 3 images; val after rounds
    # 20, 40, ..., 140 and 150; test after 150 only (every 300); features of every image once (ridge head),
    # and the step-0 head's augmentation gap: AUG_GAP_IMAGES training images clean and augmented.
    assert fed == [f"{tmp_path}/r/fedavg/nc10_j8_sparse-least-sensitive_s0.9_r4/seed1",
                   str(150 * 10 * 8 * 64 + 4 * 100 * 3), str(60000 + 8 * 5000 + 1 * 10000 + 2 * 1000)]
    # editing with a magnitude-free rule: no Fisher pass; 2 epochs; val+test before and after each epoch; the gap
    assert edit == [f"{tmp_path}/r/model_editing/random_s0.9_r4_ep2/seed0", str(2 * 45000),
                    str(60000 + 3 * 15000 + 2 * 1000)]


@pytest.mark.parametrize("line,says", [("fedavg.py --bogus 3", "fedavg.py: unrecognized arguments: --bogus"),
                                       ("fedavg.py --iid --nc 5", "fedavg.py: --iid and --nc exclude"),
                                       ("train.py --lr 1", "first word must be one of"),
                                       ("fedavg.py 'unclosed", "cannot split"),
                                       ("centralized.py --help", "centralized.py: not a run")])
def test_describe_run_refuses_a_bad_line_in_one_line(line, says):
    with pytest.raises(plumbing.UserError, match=says.replace("(", r"\(")):
        plan.describe_run(line)


def test_describe_runs_refuses_a_bad_line_and_prints_no_row(monkeypatch, capsys):
    """(Its exit status 2 and one line: test_a_flag_the_scripts_refuse_stops_everything_before_anything_is_written.)"""
    with pytest.raises(plumbing.UserError, match="fedavg.py: argument --k"):
        describe(monkeypatch, capsys, "centralized.py", "fedavg.py --k 0")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("flags,want", [(["--dataset", "synthetic", "--k", "5"], ["backbone hub"]),
                                        (["--data-dir", "D", "--weights", "w.pth"], ["data D", "backbone w.pth"]),
                                        (["--no-pretrained", "--data-dir=D"], ["data D", "backbone random"]),
                                        (["--arch", "vit_x", "--epochs", "3"], ["data ./data", "backbone hub"])])
def test_prefetch_fetches_what_the_flags_after_the_separator_need(monkeypatch, flags, want):
    """Synthetic data needs no download, but the backbone does (offline, every run used to fail after 73 s)."""
    got = []
    monkeypatch.setattr(common, "load_cifar100", lambda d, download=True: got.append(f"data {d}"))
    monkeypatch.setattr(plumbing, "hub_weights", lambda arch, download=True: f"cache/{arch}")
    monkeypatch.setattr(common, "build_model", lambda a: got.append(
        f"backbone {a.weights or ('random' if a.no_pretrained else 'hub')}"))
    plan.main(["--prefetch", "--", *flags])
    assert got == want


def test_prefetch_reads_and_fits_the_weights_file(tmp_path, capsys):
    weights, _ = backbone_file(tmp_path)
    tiny = ["--dataset", "synthetic", "--arch", "test_vit", "--img-size", "32"]
    plan.main(["--prefetch", "--", *tiny, "--weights", weights])
    assert f"--weights {weights}: ready" in capsys.readouterr().out
    with pytest.raises(plumbing.UserError, match="weights file not found"):
        plan.main(["--prefetch", "--", *tiny, "--weights", str(tmp_path / "typo.pth")])
    with pytest.raises(plumbing.UserError, match="does not fit --arch"):  # another ViT's weights
        plan.main(["--prefetch", "--", *tiny[:2], "--arch", "vit_tiny_patch16_224", "--img-size", "32",
                   "--weights", weights])


def test_a_missing_weights_file_stops_the_study_in_seconds_with_one_line(tmp_path):
    results = tmp_path / "runs"
    proc = run_all("--quick", "--", "--dataset", "synthetic", "--arch", "test_vit", "--img-size", "32",
                   "--device", "cpu", "--weights", str(tmp_path / "dino.pth"), results=results)
    assert "weights file not found" in assert_usage_error(proc)
    assert not results.exists()  # the prefetch failed before any run started: nothing left behind


@pytest.mark.parametrize("argv", [["--prefetch", "--data-dir", "x", "--"], ["--", "--dataset", "synthetic"],
                                  ["--prefetch", "--", "--dataset", "bogus"], ["--describe-runs", "--data-only"]])
def test_common_main_refuses_bad_combinations(argv):
    with pytest.raises(SystemExit) as e:
        plan.main(argv)
    assert e.value.code == 2


# ----------------------------------------------------------------------------- a quick study: killed, resumed, done

def stage_children(pid):
    """PIDs of the stage-script processes whose parent is pid."""
    out = []
    for p in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{p}/stat").read()
            cmd = open(f"/proc/{p}/cmdline").read()
        except (OSError, ValueError):
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid and any(s in cmd for s in
                                                                 ("centralized.py", "model_editing.py", "fedavg.py")):
            out.append(int(p))
    return out


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] != "Z"  # a zombie is gone
    except OSError:
        return False


def quick_core_grid(path):
    """The quick study's core (centralized, the default editing run, dense and sparse FedAvg at J=4 on each
    split) and its first head-only run, as a grid file: every stage of the quick study at its sizes, in 7
    real runs instead of 21 (the other 14 differ from these in one flag's value: the dry-run tests parse
    them with the scripts' own flags, and each flag has its own tests). -> [(stage, script, flags)]."""
    fams = plan.families(plan.QUICK)
    core = [(f.stage, *run) for f in fams[:4] for run in f.runs]
    head = next(f for f in fams if f.stage == "fedavg head")
    runs = core + [(head.stage, *head.runs[0])]
    path.write_text("".join(shlex.join([script, *flags]) + "\n" for _, script, flags in runs))
    return runs


def test_a_quick_study_killed_then_resumed_then_nothing_to_redo(tmp_path):
    results, log = tmp_path / "runs", tmp_path / "calls.log"
    grid = quick_core_grid(tmp_path / "core.txt")
    n = len(grid)
    assert {stage for stage, _, _ in grid} == set(STAGES) and n == 7
    # the estimate answers at once: its probe is test_dry_run_estimates_the_time_from_a_probe's
    env = {"PYTHON": fake_python(tmp_path, runs="real"), "FAKE_LOG": str(log), "CUDA_VISIBLE_DEVICES": "0,1",
           "FAKE_ESTIMATE": "1"}
    argv = ["--grid", str(tmp_path / "core.txt"), "--seeds", "0", "--gpus", "2", "--", *SMALL]  # two at a time
    full_env = {**os.environ, "RESULTS": str(results), **env}

    # SIGKILL run_all.sh while runs are going (after at least one finished): its children must not go on
    # as orphans that a rerun would race with
    with open(tmp_path / "killed.out", "w") as out:
        proc = subprocess.Popen(["bash", SCRIPT, *argv], stdout=out, stderr=subprocess.STDOUT, env=full_env)
    deadline = time.time() + 600
    first = None  # the children running when the first run had finished
    while time.time() < deadline and proc.poll() is None:
        children = stage_children(proc.pid)
        if first is None and list(results.rglob("result.json")):
            first = set(children)
        if first is not None and set(children) - first:  # a run started since: far from its end
            break
        time.sleep(0.1)
    assert first is not None and set(children) - first, (tmp_path / "killed.out").read_text()
    runs = []  # the run directory of each child, from its command line
    for pid in children:
        try:
            words = open(f"/proc/{pid}/cmdline").read().split("\0")[:-1]
        except OSError:  # finished in the meantime
            continue
        script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        if script is None:  # forked, not yet a stage script: no run of its own yet
            continue
        runs.append(plan.describe_run(shlex.join([os.path.basename(words[script])] + words[script + 1:]))[0])
    proc.kill()
    proc.wait()
    deadline = time.time() + 300  # each saves a checkpoint at its next step boundary first
    while any(map(alive, children)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, children))
    # stopped, not finished (one killed at its very last step may still finish)
    logs = [results / "logs" / (os.path.relpath(r, results).replace("/", "_") + ".log") for r in runs]
    stopped = [log for log in logs if "stopped by signal 15" in log.read_text()]
    assert stopped and all(not os.path.exists(os.path.join(r, "result.json")) for r, log in zip(runs, logs)
                           if log in stopped)
    finished_before = len(list(results.rglob("result.json")))
    assert 0 < finished_before < n

    # the same command continues the study
    proc = run_all(*argv, results=results, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("skip (done): ") == finished_before
    assert sum(line.startswith("run: ") for line in proc.stdout.splitlines()) == n - finished_before
    # the estimate before the first run, one progress line after each
    total = f"total: {n - finished_before} runs, "
    assert [line for line in proc.stdout.splitlines() if line.startswith(total)][0].endswith(" with 2 run(s) at once")
    progress = [line for line in proc.stdout.splitlines() if line.startswith("progress: ")]
    assert len(progress) == n - finished_before and " left" in progress[-1]
    assert progress[-1].startswith(f"progress: {n - finished_before}/{n - finished_before} runs finished, ")
    finished = sorted(results.rglob("result.json"))
    kinds = {}
    for path in finished:
        r = json.loads(path.read_text())
        kind = r["stage"] + (" sparse" if r.get("sparse") else " head" if r.get("train") == "head"
                             else " dense" if r["stage"] == "fedavg" else "")
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == {stage: sum(s == stage for s, _, _ in grid) for stage in STAGES}
    assert all(p.parent.name == "seed0" for p in finished)
    assert len(list((results / "logs").glob("*.log"))) == n
    assert calls(log)[-1][:1] == ["summarize.py"] and calls(log)[-1][-1] == str(results)
    assert all(c[2] != "unset" for c in calls(log) if c[0] != "summarize.py")  # RUN_ALL_PID for every run
    assert (results / "run_all.settings").read_text().startswith("grid=file: centralized.py --grid ")
    # the real summary of the real study: every table in LaTeX, the heatmap, the agreement plot
    summarize.main([str(results)])
    check_latex((results / "summary" / "tables.tex").read_text())
    report = (results / "summary" / "report.md").read_text()
    assert "six models" in report.lower() and "Synthetic data" in report
    for png in ("fedavg_heatmap.png", "fedavg_agreement_j4.png"):
        assert (results / "summary" / png).stat().st_size > 1000, png
    rows = (results / "summary" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + n

    # again: every run is skipped, none is touched
    mtimes = {p: p.stat().st_mtime_ns for p in finished}
    proc = run_all(*argv, results=results, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("skip (done): ") == n and "run: " not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in results.rglob("result.json")} == mtimes
    # (the same root with other settings is refused: test_settings_are_recorded_only_once_a_run_succeeded)


# ----------------------------------------------------------------------------- settings, --gpus, signals (fake runs)

def test_sigterm_stops_the_running_runs_and_exits_130_and_a_second_study_on_the_root_is_refused(tmp_path):
    results, log = tmp_path / "runs", tmp_path / "calls.log"
    env = {"PYTHON": fake_python(tmp_path), "FAKE_LOG": str(log), "FAKE_WAIT": "1", "FAKE_MAP": "/dev/null",
           "CUDA_VISIBLE_DEVICES": "0,1", "FAKE_ESTIMATE": "1"}
    proc = subprocess.Popen(["bash", SCRIPT, "--quick", "--gpus", "2", "--", *TINY],
                            env={**os.environ, "RESULTS": str(results), **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # run_all.sh plans first: a Python start-up, slow on a busy machine
    while [c[0] for c in calls(log)].count("waiting") < 2 and time.time() < deadline:
        time.sleep(0.05)
    children = stage_children(proc.pid)
    assert len(children) == 2

    # one study per root: a second one is refused at once, naming the first, and touches nothing
    before = sorted(str(p) for p in results.rglob("*"))
    second = run_all("--quick", "--", *TINY, results=results, env={**env, "FAKE_WAIT": ""})
    assert f"in use by another run_all.sh (PID {proc.pid})" in assert_usage_error(second)
    assert sorted(str(p) for p in results.rglob("*")) == before and len(calls(log)) == 4  # 2 runs, 2 waiting

    proc.terminate()
    assert proc.wait(timeout=300) == 130 and "interrupted" in proc.stderr.read()
    assert [c[0] for c in calls(log)].count("got") == 2 and not any(map(alive, children))


def test_tensorboard_reaches_every_run_and_is_not_a_setting_of_the_study(tmp_path):
    """./run_all.sh --tensorboard gives every run --tensorboard; the study's settings leave it out, so the
    same study without it finds every run done."""
    pytest.importorskip("tensorboard")  # without it the planner refuses the flag (tests/test_tensorboard.py)
    results, log = tmp_path / "runs", tmp_path / "calls.log"
    maps = fake_map(tmp_path, planned(results, [*TINY, "--tensorboard"]))
    env = {"PYTHON": fake_python(tmp_path), "FAKE_LOG": str(log), "FAKE_MAP": maps, "FAKE_ESTIMATE": "1"}
    proc = run_all("--quick", "--tensorboard", "--", *TINY, results=results, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [c for c in calls(log) if c[0] in ("centralized.py", "model_editing.py", "fedavg.py")]
    assert len(runs) == QUICK_N and all(c[-1] == "--tensorboard" for c in runs)
    assert "tensorboard" not in (results / "run_all.settings").read_text()
    proc = run_all("--quick", "--", *TINY, results=results, env=env)
    assert proc.returncode == 0 and proc.stdout.count("skip (done)") == QUICK_N, proc.stdout + proc.stderr


def test_the_runs_get_the_cpu_threads_the_probe_chose(tmp_path):
    """Where the probe chose the runs' threads (one, on a busy CPU), each run gets OMP_NUM_THREADS=1;
    where it chose none, a lone CPU run keeps torch's default as before; OMP_NUM_THREADS given wins."""
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHON=fake_python(tmp_path), FAKE_LOG=str(log), FAKE_ESTIMATE="1", FAKE_OMP="1")
    for root, more, want in (("a", {"FAKE_THREADS": "1"}, "1"), ("b", {}, "unset"),
                             ("c", {"FAKE_THREADS": "1", "OMP_NUM_THREADS": "2"}, "2")):
        results = tmp_path / root
        log.unlink(missing_ok=True)
        proc = subprocess.run(["bash", SCRIPT, "--quick", "--", *TINY], capture_output=True, text=True, timeout=600,
                              env={**env, **more, "RESULTS": str(results),
                                   "FAKE_MAP": fake_map(tmp_path, planned(results, TINY))})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert [c for c in calls(log) if c[0] == "omp"] == [["omp", want]] * QUICK_N, root


def test_settings_are_recorded_only_once_a_run_succeeded(tmp_path):
    results, log = tmp_path / "runs", tmp_path / "calls.log"
    typo, good = [*TINY, "--eval-batch-size", "77"], [*TINY, "--eval-batch-size", "78"]
    runs = [planned(results, f) for f in (typo, good)]
    maps = fake_map(tmp_path, *runs)
    env = {"PYTHON": fake_python(tmp_path), "FAKE_LOG": str(log), "FAKE_MAP": maps, "FAIL_IF": "77",
           "FAIL_STATUS": str(plumbing.DIVERGED_EXIT), "CUDA_VISIBLE_DEVICES": "5,7", "FAKE_ESTIMATE": "1"}

    proc = run_all("--quick", "--gpus", "2", "--", *typo, results=results, env=env)  # every run fails (diverges)
    assert proc.returncode == 1
    assert f"{QUICK_N} run(s) failed" in proc.stderr and "summarize.py" not in log.read_text()
    assert proc.stdout.count("FAILED (exit 3)") == QUICK_N  # and run_all.sh went on after each
    some = plan.parse_run(shlex.join([runs[0][3][1], *runs[0][3][2]]))[1].out
    log_file = results / "logs" / (os.path.relpath(some, results).replace("/", "_") + ".log")
    assert f"{some}: see {log_file}" in proc.stderr and "failing on purpose" in log_file.read_text()
    assert not (results / "run_all.settings").exists()
    assert f"progress: {QUICK_N}/{QUICK_N} runs finished ({QUICK_N} failed)" in proc.stdout
    first = calls(log)
    assert len(first) == QUICK_N and {c[1] for c in first} == {"5", "7"}  # one run per listed GPU
    assert all(c[2] != "unset" for c in first)  # RUN_ALL_PID: the runs die with run_all.sh

    proc = run_all("--quick", "--", *good, results=results, env=env)  # the corrected command works
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (results / "run_all.settings").read_text() == f"grid=quick extra={shlex.join(good)}\n"
    assert len(calls(log)) == 2 * QUICK_N + 1 and calls(log)[-1][0] == "summarize.py"

    proc = run_all("--quick", "--", *typo, results=results, env=env)  # now the root holds a study
    assert "other settings" in assert_usage_error(proc)


def test_gpus_beyond_the_visible_ones_are_refused(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\n[[ $1 == -L ]] && printf 'GPU 0: A (UUID: a)\\n"
                                        "GPU 1: B (UUID: b)\\n'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    results = tmp_path / "runs"

    def go(gpus, **extra):
        return subprocess.run(["bash", SCRIPT, "--dry-run", "--quick", "--gpus", gpus, "--", *TINY],
                              capture_output=True, text=True,
                              env={**env, "RESULTS": str(results), "PYTHON": fake_python(tmp_path),
                                   "FAKE_ESTIMATE": "1", **extra})
    assert "only 2 GPU(s) visible" in assert_usage_error(go("3"))  # nvidia-smi -L: 2
    assert "only 0 GPU(s) visible" in assert_usage_error(go("1", CUDA_VISIBLE_DEVICES=""))  # empty: none
    assert "only 1 GPU(s) visible" in assert_usage_error(go("2", CUDA_VISIBLE_DEVICES="3"))
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != str(bin_dir))
    if not any(os.path.exists(os.path.join(p, "nvidia-smi")) for p in env["PATH"].split(os.pathsep)):
        assert "only 0 GPU(s) visible" in assert_usage_error(go("1"))  # no nvidia-smi, nothing set: none
    assert not results.exists()
    assert go("2", CUDA_VISIBLE_DEVICES="3,4").returncode == 0


# ----------------------------------------------------------------------------- several runs per GPU, the estimate

def test_per_gpu_packs_that_many_runs_on_each_gpu_and_never_more(tmp_path):
    """Fake GPUs 0 and 1, --gpus 2 --per-gpu 2, the runs on the CPU: four at once, two on each device."""
    results, log = tmp_path / "runs", tmp_path / "calls.log"
    env = {"PYTHON": fake_python(tmp_path), "FAKE_LOG": str(log), "FAKE_MAP": fake_map(tmp_path, planned(results, TINY)),
           "FAKE_SLEEP": "0.5", "FAKE_ESTIMATE": "60000", "CUDA_VISIBLE_DEVICES": "0,1"}  # 1 min a run
    proc = run_all("--quick", "--gpus", "2", "--per-gpu", "2", "--", *TINY, results=results, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    running, most = {}, {}  # device -> runs going now / at most; from the log, in order
    at_once = 0
    for c in calls(log):
        if c[0] in ("centralized.py", "model_editing.py", "fedavg.py"):
            running[c[1]] = running.get(c[1], 0) + 1
        elif c[0] == "end":
            running[c[2]] -= 1
        most = {d: max(most.get(d, 0), n) for d, n in running.items()}
        at_once = max(at_once, sum(running.values()))
    assert most == {"0": 2, "1": 2} and at_once == 4
    assert sum(c[0] == "end" for c in calls(log)) == QUICK_N
    # the estimate: QUICK_N runs of a minute, 4 at once; then the time left, corrected by the runs that took
    # half a second instead of a minute (uncorrected it would be a minute per 4 runs left)
    assert f"total: {QUICK_N} runs, " in proc.stdout
    assert f", about {hms(QUICK_N * 60 // 4)} with 4 run(s) at once\n" in proc.stdout
    progress = [line for line in proc.stdout.splitlines() if line.startswith("progress: ")]
    assert [line.split(",")[0] for line in progress] == [f"progress: {k}/{QUICK_N} runs finished"
                                                         for k in range(1, QUICK_N + 1)]
    left = [re.search(r"about 0:(\d\d):(\d\d) left$", line).groups() for line in progress]
    assert max(int(m) * 60 + int(s) for m, s in left) < 30 and left[-1] == ("00", "00")


def test_dry_run_estimates_the_time_from_a_probe(tmp_path):
    """The probe measures (2 processes at once, as --per-gpu 2 packs the runs) and the estimate is each
    run's start-up plus its images at the measured speed (the median of the probe's windows; its spread
    at the fastest and the slowest window's), divided among the 4 runs at once."""
    results = tmp_path / "runs"
    proc = run_all("--dry-run", "--quick", "--gpus", "2", "--per-gpu", "2", "--", *TINY, results=results,
                   env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert proc.returncode == 0, proc.stderr
    assert not results.exists()
    said = [line for line in proc.stdout.splitlines() if line.startswith("# probe (")]
    assert len(said) == 1 and "2 run(s) at once on the CPU" in said[0], proc.stdout
    speed = r"([\d.]+) \(([\d.]+)-([\d.]+)\)"
    fb_mid, fb_lo, fb_hi, f_mid, f_lo, f_hi, startup = (float(x) for x in re.search(
        rf"batch \d+: {speed} images/s forward\+backward and {speed} forward only, all together \(the median of "
        r"its timed windows, their slowest-fastest in brackets\); ([\d.]+) s to start", said[0]).groups())
    assert fb_lo <= fb_mid <= fb_hi and f_lo <= f_mid <= f_hi
    assert "no GPU: these runs go to the CPU" in proc.stdout and "--slurm" in proc.stdout
    passes = [plan.describe_run(shlex.join([s, *words]))[1:3] for s, _, words in listed_runs(proc.stdout)]
    want = [sum(startup + 2 * (fb_i / fb + f_i / f) for fb_i, f_i in passes) / 4
            for fb, f in ((fb_mid, f_mid), (fb_hi, f_hi), (fb_lo, f_lo))]
    total = [line for line in proc.stdout.splitlines() if line.startswith("total: ")][0]
    hms_re = r"(\d+):(\d\d):(\d\d)"
    got = re.search(rf"about {hms_re} \({hms_re} to {hms_re}\) with 4 run\(s\) at once$", total).groups()
    for k, w in enumerate(want):
        h, m, sec = map(int, got[3 * k:3 * k + 3])
        assert abs(h * 3600 + m * 60 + sec - w) <= 1 + 0.01 * w, (total, want)
    assert all(re.search(rf", about {hms_re}( \({hms_re} to {hms_re}\))?$", line)
               for line in proc.stdout.splitlines() if line.startswith("stage "))


def test_runs_per_gpu_keeps_a_big_gpu_busy_and_a_small_one_alone():
    assert plan.runs_per_gpu(40, 15) == 1  # T4
    assert plan.runs_per_gpu(108, 40) == 3  # A100
    assert plan.runs_per_gpu(132, 80) == plan.runs_per_gpu(132, 139) == 4  # H100, H200
    assert plan.runs_per_gpu(128, 24) == 3  # RTX 4090: memory bounds it
    assert plan.runs_per_gpu(16, 4) == 1  # never none


def test_a_probe_that_fails_says_why_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(plumbing.UserError, match=r"^the speed probe \(1 at once\) failed: --device cuda asked for, "
                                               r"but no CUDA GPU is visible; use --device cpu$"):
        plan.estimate([shlex.join(["fedavg.py", *TINY[:-2], "--device", "cuda"])], 0, 1)


# ----------------------------------------------------------------------------- SLURM

def sbatch_on_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"  # records its arguments and SBATCH_GRES, answers like `sbatch --parsable`
    sbatch.write_text(f"""#!{sys.executable}
import json, os, sys
log = os.environ["SBATCH_LOG"]
n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
open(log, "a").write(json.dumps([os.environ.get("SBATCH_GRES")] + sys.argv[1:]) + "\\n")
print(f"{{4200 + n}};cluster")
""")
    sbatch.chmod(0o755)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\necho "scontrol $*" >> "$FAKE_LOG"\n')
    scontrol.chmod(0o755)
    return str(bin_dir)


def opt(argv, name):
    """The value of option `name` in argv ('--name value' or '--name=value'), None if absent."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def test_slurm_submits_one_throttled_array_and_a_summary_after_it(tmp_path):
    results, log, sub_log = tmp_path / "runs", tmp_path / "calls.log", tmp_path / "sbatch.log"
    flags = TINY
    env = {"PATH": f"{sbatch_on_path(tmp_path)}:{os.environ['PATH']}", "SBATCH_LOG": str(sub_log),
           "PYTHON": fake_python(tmp_path), "FAKE_LOG": str(log), "SBATCH_ACCOUNT": "proj1",
           "FAKE_MAP": fake_map(tmp_path, planned(results, flags))}
    proc = run_all("--slurm", "--quick", "--max-parallel", "3", "--partition", "gpu", "--time", "2:00:00",
                   "--", *flags, results=results, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (gres, *array), (summary_gres, *summary) = [json.loads(line) for line in sub_log.read_text().splitlines()]
    assert opt(array, "--array") == f"0-{QUICK_N - 1}%3"
    assert opt(array, "--signal") == "B:USR1@120" and "--requeue" in array
    assert opt(array, "--partition") == "gpu" and opt(array, "--time") == "2:00:00"
    assert opt(array, "--account") is None  # sbatch reads SBATCH_ACCOUNT itself
    assert opt(array, "--gres") == "gpu:1" and opt(array, "--dependency") is None
    assert opt(summary, "--dependency") == "afterany:4200" and opt(summary, "--kill-on-invalid-dep") == "yes"
    assert "--array" not in summary and opt(summary, "--gres") is None and summary_gres is None
    assert "summarize.py" in opt(summary, "--wrap") and opt(summary, "--partition") == "gpu"
    assert [c[0] for c in calls(log)] == []  # nothing ran here (the prefetch is plan.py: not logged)
    assert not (results / "run_all.settings").exists()

    # a task runs its line of the command file, records the settings once it succeeded
    task, cmds = array[-4:-2]
    lines = open(cmds).read().splitlines()
    assert [shlex.split(line)[3:] for line in lines] == [words for _, _, words in planned(results, flags)]
    subprocess.run(["bash", task, *array[-3:]], env={**os.environ, **env, "SLURM_ARRAY_TASK_ID": str(QUICK_N - 1),
                                                     "SLURM_ARRAY_JOB_ID": "4200"}, check=True, capture_output=True)
    (ran,) = calls(log)
    assert ran[3:] == shlex.split(lines[-1])[3:]
    assert (results / "run_all.settings").read_text() == f"grid=quick extra={shlex.join(flags)}\n"

    # SBATCH_GRES in the environment is sbatch's to read; --gres '' asks for no GPU at all
    for gres_flag, want in ([], (None, "gpu:a100:2")), (["--gres", ""], (None, None)):
        sub_log.unlink()
        proc = run_all("--slurm", "--quick", *gres_flag, "--", *flags, results=results,
                       env={**env, "SBATCH_GRES": "gpu:a100:2"})
        assert proc.returncode == 0, proc.stderr
        (gres, *array), _ = [json.loads(line) for line in sub_log.read_text().splitlines()]
        assert (opt(array, "--gres"), gres) == want and opt(array, "--array") == f"0-{QUICK_N - 2}"  # one run done


def test_slurm_task_passes_the_warning_signal_to_the_run_and_requeues_itself(tmp_path):
    results, log = tmp_path / "runs", tmp_path / "calls.log"
    env = {"PATH": f"{sbatch_on_path(tmp_path)}:{os.environ['PATH']}", "SBATCH_LOG": str(tmp_path / "sbatch.log"),
           "PYTHON": fake_python(tmp_path), "FAKE_LOG": str(log), "FAKE_MAP": "/dev/null"}
    proc = run_all("--slurm", "--quick", "--", *TINY, results=results, env=env)
    assert proc.returncode == 0, proc.stderr
    array = json.loads((tmp_path / "sbatch.log").read_text().splitlines()[0])[1:]
    task = subprocess.Popen(["bash", *array[-4:]], env={**os.environ, **env, "FAKE_WAIT": "1",
                                                        "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_JOB_ID": "77"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(calls(log)) < 2 and time.time() < deadline:  # the fake run has set its trap
        time.sleep(0.05)
    task.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends: to the batch shell only
    assert task.wait(timeout=300) == 143
    assert [c[0] for c in calls(log)] == ["fedavg.py", "waiting", "got", "scontrol"]  # task 3: FedAvg at J=4 (the core)
    assert calls(log)[-1] == ["scontrol", "requeue", "77_3"]
    assert not (results / "run_all.settings").exists()


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv", [["--frobnicate"], ["--seeds", "a,b"], ["--seeds", "0,,1"], ["--seeds", "0,1,0"],
                                  ["--seeds", "01"], ["--seeds"], ["--gpus", "0"], ["--gpus", "two"],
                                  ["--gpus", "2", "--slurm"], ["--max-parallel", "0", "--slurm"],
                                  ["--partition", "gpu"], ["--max-parallel", "4"],
                                  ["--", "--seed", "3"], ["--", "--out", "x"], ["--", "--results=x"],
                                  ["--", "--resume"], ["--seeds", ""], ["--per-gpu", "0"], ["--per-gpu", "two"],
                                  ["--per-gpu", ""], ["--per-gpu", "2", "--slurm"], ["--grid"], ["--grid", "--quick"]])
def test_bad_flags_are_one_line_errors_that_write_nothing(tmp_path, argv):
    results = tmp_path / "runs"
    assert_usage_error(run_all("--quick", "--dry-run", *argv, results=results))
    assert not results.exists()


@pytest.mark.parametrize("value,says", [("", "RESULTS is empty"), ("/", "RESULTS=/ is the filesystem's root")])
def test_an_empty_results_root_is_refused(tmp_path, value, says):
    """RESULTS= (empty) is no default: it would put the runs under /fedavg/...; nor is the filesystem's root."""
    proc = subprocess.run(["bash", SCRIPT, "--quick", "--", *TINY], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "RESULTS": value, "PYTHON": sys.executable}, timeout=60)
    assert says in assert_usage_error(proc) and not list(tmp_path.iterdir())


def test_a_flag_the_scripts_refuse_stops_everything_before_anything_is_written(tmp_path):
    results = tmp_path / "runs"
    proc = run_all("--quick", "--", "--dataset", "synthetic", "--bogus", results=results)
    assert "unrecognized arguments: --bogus" in assert_usage_error(proc)
    assert not results.exists()


def test_a_results_root_that_is_a_file_is_refused(tmp_path):
    results = tmp_path / "runs"
    results.write_text("not a directory")
    assert "is a file" in assert_usage_error(run_all("--quick", results=results))
    assert results.read_text() == "not a directory"


def test_slurm_without_sbatch_is_refused(tmp_path):
    bash_dir = os.path.dirname(subprocess.run(["bash", "-c", "command -v bash"], capture_output=True,
                                              text=True).stdout.strip())
    path = os.pathsep.join(dict.fromkeys([bash_dir, "/usr/bin", "/bin"]))
    if any(os.path.exists(os.path.join(p, "sbatch")) for p in path.split(os.pathsep)):
        pytest.skip("sbatch is installed here")
    results = tmp_path / "runs"
    assert "sbatch" in assert_usage_error(run_all("--slurm", results=results, env={"PATH": path}))
    assert not results.exists()


def test_help_is_the_header_comment(tmp_path):
    proc = run_all("--help", results=tmp_path / "runs")
    assert proc.returncode == 0 and proc.stdout.startswith("run_all.sh - the whole study")
    assert "--max-parallel M" in proc.stdout and "set -euo" not in proc.stdout
    assert "--per-gpu N" in proc.stdout and "one run per 32 streaming multiprocessors" in proc.stdout
