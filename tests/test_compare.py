"""The fair algorithm comparison of the study (run_all.sh --extensions): every FL algorithm at every setting
of its grid, from both starts (a zero head; the step-0 head, dense and sparse), on the extension splits;
its runs parse, have directories of their own, leave the default study as it was, and the grid table and
--dry-run say what they add. The planner runs in-process (no run is made)."""
import functools
import importlib
import re
import shlex

import pytest

import algorithms
import plan
import splits
from conftest import TINY

STUDIES = [(plan.FULL, False), (plan.QUICK, True)]
IDS = ["full", "quick"]


def plan_of(quick, groups=(), seeds=(0,)):
    """[(stage, script, parsed args, group)] of the study, as run_all.sh gets it (parsed once per study and
    algorithm grids: the tests share it)."""
    return parsed_plan(quick, tuple(groups), tuple(seeds), repr(plan.ALGORITHMS))


@functools.cache
def parsed_plan(quick, groups, seeds, _algorithms):
    _, runs = plan.plan_runs(list(seeds), "R", [], quick=quick, groups=groups)
    return [(stage, script, plan.parse_run(f"{script} {args}")[1], group) for stage, script, args, group in runs]


def extension_dirs(s, seed=0):
    """{run directory: stage} of every run the comparison needs, built here from the sizes s and
    plan.ALGORITHMS (not from plan.families): each algorithm's settings x splits x starts."""
    starts = {"fedavg head": ["--train", "head", "--head", "zero"], "fedavg dense": [],
              "fedavg sparse": ["--sparse", "--rule", "least-sensitive", "--sparsity", str(s["sparsity"]),
                                "--calib-rounds", str(s["calib"]), *s["mask"]]}
    out = {}
    for name, grid in plan.ALGORITHMS.items():
        for flags in grid[:s["extension_settings"]]:
            for split in s["extension_splits"]:
                for stage, start in starts.items():
                    words = ["fedavg.py", *s["fed"], *splits.split_flags(split), "--j", "4", *start,
                             *s["extension_split_flags"].get(split, []), *flags,
                             "--results", "R", "--seed", str(seed), "--resume", "--deterministic"]
                    out[plan.parse_run(shlex.join(words))[1].out] = stage
    return out


@pytest.mark.parametrize("s,quick", STUDIES, ids=IDS)
def test_every_setting_of_every_algorithm_runs_from_both_starts_on_each_split_dense_and_sparse(s, quick):
    base, ext = plan_of(quick), plan_of(quick, ["extensions"])
    want = extension_dirs(s)
    base_dirs = {a.out for _, _, a, _ in base}
    assert {a.out: stage for stage, _, a, _ in ext if a.out in want} == want  # each once, in its stage
    # and nothing else: the group adds exactly the runs the study does not have already
    assert {a.out for _, _, a, group in ext if group == "extensions"} == set(want) - base_dirs
    assert all(a.j == 4 and a.split in s["extension_splits"] for _, _, a, g in ext if g == "extensions")


@pytest.mark.parametrize("s,quick", STUDIES, ids=IDS)
def test_every_run_line_parses_and_no_two_share_a_run_directory(s, quick):
    """The planner's lines, parsed by fedavg.py's own parser (plan.parse_run, which raises on a flag it
    refuses), each a directory of its own (the run names tell every setting apart)."""
    runs = plan_of(quick, ["extensions"])
    dirs = [a.out for _, _, a, _ in runs]
    assert len(set(dirs)) == len(dirs)


def test_the_full_comparison_has_every_split_kind_and_setting_and_the_quick_one_less_of_each():
    """Full: IID, an Nc and a Dirichlet split, every setting. Quick (every algorithm and start: the test
    above): fewer splits, and a second setting where a grid has one, fewer runs."""
    kinds = lambda s: {type(splits.parse_split(sp)) for sp in s["extension_splits"]}
    assert kinds(plan.FULL) == set(splits.KINDS) and plan.FULL["extension_settings"] is None
    assert kinds(plan.QUICK) <= kinds(plan.FULL) and plan.QUICK["extension_settings"] >= 2
    assert any(len(grid) >= 2 for grid in plan.ALGORITHMS.values())  # a second setting to run
    quick = [a for _, _, a, g in plan_of(True, ["extensions"]) if g == "extensions"]
    assert len(quick) < len(extension_dirs(plan.FULL))


@pytest.mark.parametrize("quick", [False, True], ids=IDS)
def test_the_default_study_is_the_same_without_extensions_whatever_the_algorithms(quick, monkeypatch):
    """The algorithm grids reach only the opt-in group: the default (and quick) study's runs do not change
    when they do, and with --extensions the study's runs come first in each seed, unchanged."""
    base = plan.plan_runs([0, 1], "R", [], quick=quick)[1]
    ext = plan.plan_runs([0, 1], "R", [], quick=quick, groups=["extensions"])[1]
    assert all(group == "-" for *_, group in base)
    per_seed, per_seed_ext = len(base) // 2, len(ext) // 2
    for k in (0, 1):  # seed by seed: the study's runs, then the group's
        mine = ext[k * per_seed_ext:(k + 1) * per_seed_ext]
        assert mine[:per_seed] == base[k * per_seed:(k + 1) * per_seed]
        assert all(group == "extensions" for *_, group in mine[per_seed:]) and per_seed_ext > per_seed
    monkeypatch.setattr(plan, "ALGORITHMS", {"FedProx": [["--mu", "0.3"]]})
    assert plan.plan_runs([0, 1], "R", [], quick=quick)[1] == base
    assert plan.plan_runs([0, 1], "R", [], quick=quick, groups=["extensions"])[1] != ext


def test_the_grids_come_from_algorithms_registry(monkeypatch):
    """plan.ALGORITHMS is each registered algorithm's grid (algorithms.REGISTRY, name -> class with `grid`):
    a new algorithm's grid reaches --extensions with no edit of plan.py."""
    fake = {"FedAvg": type("FedAvg", (), {"grid": [[]]}),
            "FedProx": type("FedProx", (), {"grid": [("--mu", "0.5"), ("--mu", "0.05")]})}
    with monkeypatch.context() as m:
        m.setattr(algorithms, "REGISTRY", fake)
        importlib.reload(plan)
        grids = plan.ALGORITHMS
    importlib.reload(plan)  # the real registry again (fedavg.py parses the runs with it)
    assert grids == {"FedAvg": [[]], "FedProx": [["--mu", "0.5"], ["--mu", "0.05"]]}
    monkeypatch.setattr(plan, "ALGORITHMS", grids)
    runs = [a for _, _, a, g in plan_of(False, ["extensions"]) if g == "extensions"]
    assert sorted({a.mu for a in runs}) == [0.0, 0.05, 0.5]


def adds_row(table):
    """The grid table's '--extensions adds' row: (runs per seed, with 3 seeds, quick)."""
    row = next(line for line in table.splitlines() if line.startswith("| **--extensions adds**"))
    return tuple(map(int, re.fullmatch(r"\| \*\*--extensions adds\*\* \| \| \*\*(\d+)\*\* \((\d+) with 3 seeds\) "
                                       r"\| \*\*(\d+)\*\* \|", row).groups()))


def test_the_grid_table_says_what_the_extensions_add():
    """Its group rows add up to the runs the planner adds, full and quick; the README holds the table."""
    added = [len(plan_of(q, ["extensions"])) - len(plan_of(q)) for q in (False, True)]
    n, three, q = adds_row(plan.grid_table())
    assert (n, three, q) == (added[0], 3 * added[0], added[1])
    rows = [line for line in plan.grid_table().split("*with --extensions:*")[1].splitlines()
            if line.startswith("| extensions:")]
    assert [sum(int(r.split("|")[k]) for r in rows) for k in (3, 4)] == added
    assert len(rows) == 3 and all(f"{name} {len(grid)}" in rows[0] for name, grid in plan.ALGORITHMS.items())


def test_dry_run_says_how_many_runs_and_how_long_the_extensions_add(tmp_path):
    """run_all.sh --dry-run: a line with the runs --extensions adds (the planner's count) and their time
    (a fake probe: 60 s per run); none without --extensions."""
    from test_run_all import fake_python, hms, run_all
    env = {"PYTHON": fake_python(tmp_path), "FAKE_ESTIMATE": "60000"}
    added = len(plan_of(True, ["extensions"])) - len(plan_of(True))
    proc = run_all("--dry-run", "--quick", "--extensions", "--", *TINY, results=tmp_path / "r", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"of these, --extensions adds {added} runs, about {hms(60 * added)}\n" in proc.stdout
    assert f"total: {len(plan_of(True, ['extensions']))} runs" in proc.stdout
    proc = run_all("--dry-run", "--quick", "--", *TINY, results=tmp_path / "r", env=env)
    assert proc.returncode == 0 and "--extensions adds" not in proc.stdout
