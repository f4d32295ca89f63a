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
