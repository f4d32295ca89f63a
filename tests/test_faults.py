"""Faults of a fuzz round (crafted files and links in a results root, racing starts, edge values, signals):
each case refused with one line, or the run goes on; nothing outside the results root is ever touched."""
import os

import pytest
import torch

import centralized
import common
from conftest import TINY
from helpers import run_as_script, tiny_model

FAST = TINY + ["--synthetic-size", "1000", "--eval-batch-size", "64"]


def test_feature_cache_never_returns_another_backbones_features(tmp_path):
    """Two weights files of one name (every DINO training checkpoint is checkpoint.pth) in two folders:
    the second backbone gets its own features, not the first one's from the cache."""
    args = centralized.get_args(FAST + ["--data-dir", str(tmp_path / "data")])
    args.precision, args.no_pretrained = "fp32", False  # features are cached only for real weights
    data = common.load_data(args)
    feats = []
    for folder, seed in (("a", 0), ("b", 1)):
        model = tiny_model(seed)
        os.makedirs(tmp_path / folder)
        args.weights = str(tmp_path / folder / "checkpoint.pth")
        torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, args.weights)
        feats.append(common.cached_features(model, data, args, torch.device("cpu"))["val"][0])
        fresh = common.extract_features(model, data["val"][0], args, torch.device("cpu"))
        assert torch.equal(feats[-1], fresh), f"--weights {folder}/checkpoint.pth got another backbone's features"
    assert not torch.equal(feats[0], feats[1])
    again = common.cached_features(model, data, args, torch.device("cpu"))["val"][0]  # the cache is still used
    assert torch.equal(again, feats[1])
    assert len(os.listdir(tmp_path / "data" / "features")) == 6  # 3 splits x 2 backbones


# A process that races for run directories: for each round r it says it is ready, waits for the file go<r>
# (the barrier: every racer starts at once), then opens RACE/<r> as centralized.py does (the last racer with
# --resume, a little later), and prints "r writer" or "r refused <line>". Winners hold their locks to the end.
RACER = r"""
import os, sys, time
sys.path.insert(0, {root!r})
import centralized, plumbing
race, rounds, me, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
for r in range(rounds):
    open(os.path.join(race, f"ready{{r}}-{{me}}"), "w").close()
    while not os.path.exists(os.path.join(race, f"go{{r}}")):
        time.sleep(0.001)
    if resume:
        time.sleep(0.05 * (r % 4))
    args = centralized.get_args({fast!r} + ["--out", os.path.join(race, str(r))] + (["--resume"] if resume else []))
    try:
        plumbing.open_run(args)
        print(r, "writer", flush=True)
    except plumbing.UserError as e:
        print(r, "refused", e, flush=True)
    except Exception as e:
        print(r, "crashed", type(e).__name__, e, flush=True)
"""


def test_racing_starts_give_one_writer_and_leave_the_winners_files(tmp_path):
    """Three starts on one new --out at the same moment, and a --resume start just after: exactly one
    writer; the others refused with one line; the winner's lock and config.json are intact."""
    import subprocess, sys, time
    from conftest import ROOT
    rounds, racers = 5, 4
    race = tmp_path / "race"
    race.mkdir()
    code = RACER.format(root=ROOT, fast=FAST)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(race), str(rounds), str(i), str(int(i == racers - 1))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(racers)]
    try:
        for r in range(rounds):
            deadline = time.time() + 120
            while len([n for n in os.listdir(race) if n.startswith(f"ready{r}-")]) < racers:
                assert time.time() < deadline and all(p.poll() is None for p in procs), "a racer died"
                time.sleep(0.01)
            (race / f"go{r}").touch()
        time.sleep(0.5)
        # every winner still alive and holding its lock: the lock files must name them
        results = {}
        for r in range(rounds):
            deadline = time.time() + 60
            while not (race / str(r)).is_dir() and time.time() < deadline:
                time.sleep(0.01)
        pids = {p.pid: i for i, p in enumerate(procs)}
        locks = {r: (race / str(r) / ".lock").read_text().strip() if (race / str(r) / ".lock").is_file() else None
                 for r in range(rounds)}
    finally:
        outs = [p.communicate(timeout=120) for p in procs]
    for i, (stdout, stderr) in enumerate(outs):
        assert "Traceback" not in stderr, stderr
        for line in stdout.splitlines():
            r, what, *rest = line.split(" ", 2)
            results.setdefault(int(r), []).append((i, what, rest))
    for r in range(rounds):
        writers = [i for i, what, _ in results[r] if what == "writer"]
        assert len(writers) == 1, (r, results[r])
        assert all(what in ("writer", "refused") for _, what, _ in results[r]), results[r]
        assert locks[r] is not None and pids.get(int(locks[r])) == writers[0], (r, locks[r], results[r])
        assert (race / str(r) / "config.json").is_file(), (r, results[r])


def test_links_in_a_results_root_never_steer_a_write_outside_it(tmp_path):
    """R/centralized -> elsewhere, a run folder that is a link, a .lock linked to a file elsewhere: each
    refused in one line, the targets untouched."""
    import pytest
    import plumbing
    root, elsewhere, victim = tmp_path / "R", tmp_path / "elsewhere", tmp_path / "victim"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    victim.write_text("precious")
    run = FAST + ["--epochs", "1", "--results", str(root)]
    os.symlink(elsewhere, root / "centralized")
    with pytest.raises(plumbing.UserError, match="symbolic link"):
        centralized.main(run)
    os.remove(root / "centralized")
    os.symlink(elsewhere, root / "mine")  # --out inside the root, itself a link
    with pytest.raises(plumbing.UserError, match="symbolic link"):
        centralized.main(run + ["--out", str(root / "mine")])
    out = root / "run"
    out.mkdir()
    os.symlink(victim, out / ".lock")
    with pytest.raises(plumbing.UserError, match="symbolic link"):
        centralized.main(run + ["--out", str(out)])
    assert victim.read_text() == "precious"
    assert os.listdir(elsewhere) == ["keep.txt"] and (elsewhere / "keep.txt").read_text() == "mine"
    assert os.listdir(out) == [".lock"] and os.listdir(root) == ["mine", "run"]
    centralized.main(run)  # a root of real folders: the run goes on
    assert len(list(root.glob("centralized/*/seed0/result.json"))) == 1


@pytest.mark.parametrize("script", ["centralized", "model_editing", "fedavg"])
@pytest.mark.parametrize("split", [["--val-frac", "0.99"], ["--synthetic-size", "100", "--val-frac", "0.6"]])
def test_a_split_with_no_training_image_is_one_line_and_writes_nothing(script, split, tmp_path, capsys):
    module = __import__(script)
    out = tmp_path / "run"
    status, lines = run_as_script(module.main, TINY + ["--synthetic-size", "500"] + split + ["--out", str(out)], capsys)
    assert status == 2 and len(lines) == 1 and "no training image" in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("where,phase", [("augment", "pretraining the stand-in backbone standin (step 4 of 150)"),
                                         ("roll", "building the synthetic set")])
def test_a_stop_while_building_the_stand_in_or_the_data_says_so_and_writes_nothing(where, phase, tmp_path,
                                                                                   monkeypatch):
    """A stop signal while the stand-in backbone is pretrained or a synthetic set built: the run stops there
    (it used to go on for seconds, then stop in the feature extraction with config.json written, so that
    the same command was refused as an interrupted run)."""
    import plumbing
    from helpers import stop_during_call
    stop_during_call(monkeypatch, common if where == "augment" else torch, where, 3)
    out, data_dir = tmp_path / "run", tmp_path / "data"
    argv = [a for a in FAST if a != "--no-pretrained"] + ["--weights", "standin", "--data-dir", str(data_dir)]
    with pytest.raises(plumbing.Stopped) as e:
        centralized.main(argv + ["--out", str(out), "--synthetic-size", "3000"])
    assert e.value.phase == phase
    assert not out.exists() and not (data_dir / "standin").exists()


def test_diverging_head_only_rounds_name_their_rate_and_an_impossible_calib_rounds_is_blamed(tmp_path, capsys):
    import fedavg
    import model_editing
    fed = FAST + ["--k", "10", "--c", "0.5", "--rounds", "2", "--eval-every", "2", "--head-lr", "1e38"]
    status, lines = run_as_script(fedavg.main, fed + ["--train", "head", "--out", str(tmp_path / "a")], capsys)
    assert status == 3 and len(lines) == 1, lines
    assert "head-only rounds (--train head)" in lines[0] and "try a --head-lr below 1e+38" in lines[0], lines
    status, lines = run_as_script(fedavg.main, fed + ["--head", "warmup", "--warmup-rounds", "2", "--out",
                                                      str(tmp_path / "b")], capsys)
    assert status == 3 and "head warm-up rounds" in lines[0] and "--head-lr below" in lines[0], lines
    status, lines = run_as_script(model_editing.main, FAST + ["--calib-rounds", "400000", "--out",
                                                              str(tmp_path / "c")], capsys)
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: --calib-rounds 400000 is too many"), lines
    assert not (tmp_path / "c").exists()


def test_one_word_for_the_precision_and_runs_that_wrote_off_still_resume(tmp_path, capsys):
    import json
    out = tmp_path / "run"
    argv = FAST + ["--epochs", "1", "--out", str(out)]
    centralized.main(argv)
    assert "precision fp32" in capsys.readouterr().out
    for f in ("config.json", "result.json"):
        assert json.loads((out / f).read_text())["precision"] == "fp32", f
    # a run interrupted before this change wrote "off": still this run, resumed (started over) under --resume
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, precision="off")))
    os.remove(out / "result.json")
    centralized.main(argv + ["--resume"])
    assert json.loads((out / "result.json").read_text())["precision"] == "fp32"


# ----------------------------------------------------------------------------- summarize.py on crafted roots

def a_root(root):
    """A small study root (fake runs as the stage scripts write them) and its first summary."""
    from test_summarize import fed, real_config, with_config, write_run
    import fedavg
    write_run(root, "centralized", "grid_compare", 0, 0.8)
    for seed in (0, 1):
        with_config(fed(root, "nc5", 4, seed, 0.5 + 0.01 * seed),
                    real_config(fedavg, "--nc", "5", "--rounds", "8", "--scale-rounds", "--seed", str(seed)))
    return root


def summary_files(root):
    out = root / "summary"
    return {n: (out / n).read_bytes() for n in sorted(os.listdir(out))}


def test_summarize_leaves_out_crafted_files_with_a_warning_each(tmp_path, capsys):
    """Well-formed but crafted files (a plan line whose config is a list, a flag of the wrong type in a
    config.json, a number too large for a float, '$' in a title): a warning each, never a traceback."""
    import json
    import summarize
    from test_summarize import fed, real_config, with_config
    import fedavg
    root = a_root(tmp_path / "R")
    for seed, change in ((5, {"rounds": "4"}), (6, {"j": None}), (7, {"rounds": 10 ** 400})):
        d = fed(root, "nc5", 4, seed, 0.4)
        with_config(d, dict(real_config(fedavg, "--nc", "5", "--rounds", "8", "--scale-rounds", "--seed", str(seed)),
                            **change))
    d = fed(root, "nc5", 4, 8, 0.4)
    r = json.loads((d / "result.json").read_text())
    (d / "result.json").write_text(json.dumps(dict(r, seconds=10 ** 400)))
    fed(root, "iid", 4, 0, 0.4, head="a $x$ and $\\frac{$ head")  # mathtext would fail on this title
    summarize.main([str(root)])
    err = capsys.readouterr().err.splitlines()
    assert all(line.startswith("warning: ") for line in err), err
    assert sum("seed5" in line or "seed6" in line or "seed7" in line or "seed8" in line for line in err) == 4, err
    (root / "run_all.plan").write_text("fedavg\tfedavg/nc5_j4_dense/seed0\t[1, 2]\n")
    summarize.main([str(root)])
    err = capsys.readouterr().err.splitlines()
    assert any("run_all.plan" in line for line in err) and all(line.startswith("warning: ") for line in err), err
    assert b"nc5_j4_dense/seed0" in summary_files(root)["results.csv"]


def test_a_summary_is_all_new_or_all_old(tmp_path, monkeypatch, capsys):
    import summarize
    from test_summarize import fed
    root = a_root(tmp_path / "R")
    summarize.main([str(root)])
    before = summary_files(root)
    fed(root, "iid", 4, 0, 0.3)  # a new run, then a failure while plotting

    def broken(*a, **k):
        raise RuntimeError("a plot failed")

    monkeypatch.setattr(summarize, "fedavg_plots", broken)
    import pytest
    with pytest.raises(RuntimeError):
        summarize.main([str(root)])
    assert summary_files(root) == before  # results.csv was new while report.md was old
    monkeypatch.undo()
    summarize.main([str(root)])
    assert summary_files(root)["results.csv"] != before["results.csv"] and b"iid_j4" in summary_files(root)["results.csv"]


def test_a_summary_folder_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    import pytest
    import plumbing
    import summarize
    root, figs = a_root(tmp_path / "R"), tmp_path / "figs"
    figs.mkdir()
    (figs / "mine.png").write_bytes(b"png")
    os.symlink(figs, root / "summary")
    with pytest.raises(plumbing.UserError, match="symbolic link"):
        summarize.main([str(root)])
    assert os.listdir(figs) == ["mine.png"]


def test_sigterm_stops_a_summary_with_one_line_and_status_143_leaving_the_old_one(tmp_path, monkeypatch, capsys):
    import signal
    import summarize
    root = a_root(tmp_path / "R")
    summarize.main([str(root)])
    before = summary_files(root)
    from test_summarize import fed
    fed(root, "iid", 4, 0, 0.3)
    real = summarize.read_metrics

    sent = []

    def sigterm_while_reading(d):  # one SIGTERM, at the first read (a second one would stop at once)
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return real(d)

    monkeypatch.setattr(summarize, "read_metrics", sigterm_while_reading)
    monkeypatch.setattr(summarize.plumbing, "_stop_signal", None)
    status, lines = run_as_script(summarize.main, [str(root)], capsys)
    assert status == 143 and len(lines) == 1 and lines[0].startswith("stopped by signal 15"), lines
    assert summary_files(root) == before


def test_a_fifo_in_a_root_does_not_hang_summarize_and_a_c_locale_writes_utf8(tmp_path):
    """metrics.csv a FIFO (a read would block forever): a warning, the run without curves. Under a C locale
    without UTF-8 (Python's locale coercion off) the text files are still written, in UTF-8 (±)."""
    import subprocess
    import sys
    from conftest import ROOT
    root = a_root(tmp_path / "R")
    os.remove(root / "fedavg" / "nc5_j4_dense" / "seed1" / "metrics.csv")
    os.mkfifo(root / "fedavg" / "nc5_j4_dense" / "seed1" / "metrics.csv")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "summarize.py"), str(root)], capture_output=True,
                          text=True, env=env, timeout=120)  # a hang guard, not a timing
    assert proc.returncode == 0, proc.stderr
    assert "metrics.csv" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "±" in (root / "summary" / "report.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- the third fuzz round (issue 35)

@pytest.mark.parametrize("script,argv", [
    ("fedavg", ["--lr", "1e39"]), ("fedavg", ["--head", "warmup", "--head-lr", "1e39"]), ("fedavg", ["--wd", "1e39"]),
    ("fedavg", ["--lr", "inf"]), ("fedavg", ["--wd", "nan"]),
    ("model_editing", ["--lr", "1e39"]), ("model_editing", ["--wd", "1e39"]),
    ("model_editing", ["--head", "warmup", "--warmup-lr", "1e39"]), ("centralized", ["--lr", "1e39"]),
    ("fedavg", ["--ridge-views", "100000000"]), ("model_editing", ["--ridge-views", "33"])])
def test_a_rate_that_would_overflow_mid_run_or_endless_views_are_refused_before_the_run_folder(script, argv, tmp_path,
                                                                                                  capsys):
    """--lr 1e39 passed, then torch could not cast it to the float32 weights: a traceback mid-run with the
    run folder half-written; --ridge-views 10^8 was accepted (months of passes)."""
    module = __import__(script)
    out = tmp_path / "run"
    status, lines = run_as_script(module.main, FAST + argv + ["--out", str(out)], capsys)
    assert status == 2 and len(lines) == 1 and f"argument {argv[-2]}: must be" in lines[0], lines
    assert not out.exists()


def test_the_bounds_are_said_in_help_and_the_largest_is_taken(capsys):
    import fedavg
    import plumbing
    with pytest.raises(SystemExit):
        fedavg.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(0 to {plumbing.MAX_RATE:g}) (default: 0.0001)" in text  # --lr
    assert f"at most {common.MAX_RIDGE_VIEWS}" in text
    args = fedavg.get_args(FAST + ["--lr", "1e38", "--wd", "1e38", "--ridge-views", str(common.MAX_RIDGE_VIEWS)])
    assert args.lr == args.wd == 1e38


def test_no_module_defines_a_name_twice():
    """plumbing.py defined positive_float twice, the second silently winning: every top-level function,
    class and constant of the project's modules is defined once."""
    import ast
    from conftest import ROOT
    for name in ("plumbing", "common", "fedavg", "model_editing", "centralized", "plan", "summarize"):
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read())
        seen = set()
        for node in tree.body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            for n in names:
                assert n not in seen, f"{name}.py defines {n} twice"
                seen.add(n)


@pytest.mark.parametrize("value,ok", [("1e-300", True), ("5", True), ("0", False), ("-1", False), ("nan", False),
                                      ("inf", False), ("-inf", False)])
def test_positive_float_takes_only_finite_numbers_above_0(value, ok):
    import argparse
    import plumbing
    if ok:
        assert plumbing.positive_float(value) == float(value)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="finite number > 0"):
            plumbing.positive_float(value)


def test_a_feature_cache_of_another_shape_source_or_content_is_recomputed_with_a_warning(tmp_path, capsys):
    """Issue 35.9: a cache file of the right name and another shape was an IndexError after the run folder
    existed; one of the right shape and other contents was used silently."""
    args = centralized.get_args(FAST + ["--data-dir", str(tmp_path / "data")])
    args.precision, args.no_pretrained = "fp32", False  # features are cached only for real weights
    data, model, cpu = common.load_data(args), tiny_model(), torch.device("cpu")
    fresh = common.extract_features(model, data["val"][0], args, cpu)
    path = common.feature_cache_path(args, "val", 0, common.backbone_digest(model))
    assert torch.equal(common.split_features(model, data, "val", 0, args, cpu), fresh)  # written
    good = torch.load(path, weights_only=True)
    other = tiny_model(seed=1)
    elsewhere = dict(good, features=common.extract_features(other, data["val"][0], args, cpu))
    crafted = {"another shape": torch.zeros(3, 5), "a plain tensor of the right shape": torch.zeros_like(fresh),
               "altered contents": dict(good, features=torch.zeros_like(fresh)),
               "another backbone's features, their digest right": dict(elsewhere, digest=common.tensor_digest(
                   elsewhere["features"]), source=dict(good["source"], backbone="0" * 16))}
    capsys.readouterr()
    for what, content in crafted.items():
        torch.save(content, path)
        assert torch.equal(common.split_features(model, data, "val", 0, args, cpu), fresh), what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"warning: cached features {path}: ") and "recomputed" in err[0], err
        assert torch.equal(torch.load(path, weights_only=True)["features"], fresh), what  # rewritten
    common.split_features(model, data, "val", 0, args, cpu)
    assert capsys.readouterr().err == ""  # a good cache is used without a word
