"""Learning dynamics on the pretrained stand-in (common.STANDINS): fine-tuning under the frozen step-0
head must keep what the head achieved, at the scripts' default flags. A random backbone cannot tell:
its features are not worth keeping."""
import csv
import json
import os

import pytest
import torch

import centralized
import common
import fedavg
import model_editing
from conftest import TINY
from helpers import run_as_script

SCRIPTS = {"centralized.py": centralized, "model_editing.py": model_editing, "fedavg.py": fedavg}
STANDIN = [f for f in TINY if f != "--no-pretrained"]  # the default --synthetic-size 5000: 45 images a client


def run(tmp_path, standin_dir, script, name, *flags):
    """One run of the script at these flags, in this process (the same main() its command line runs,
    without paying for a new process's imports); -> (result.json, the validation accuracies)."""
    out = tmp_path / name
    SCRIPTS[script].main([*STANDIN, "--data-dir", standin_dir, "--out", str(out), *flags])
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["val_acc"]]
    with open(out / "result.json") as f:
        return json.load(f), [float(r["val_acc"]) for r in rows]


def test_standin_is_deterministic_and_cached(tmp_path, standin_dir):
    path = common.standin_weights("standin", standin_dir)
    mtime = os.path.getmtime(path)
    assert common.standin_weights("standin", standin_dir) == path and os.path.getmtime(path) == mtime
    again = torch.load(common.standin_weights("standin", str(tmp_path)), weights_only=True)
    first = torch.load(path, weights_only=True)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("script,flags", [
    ("fedavg.py", ["--rounds", "2", "--eval-every", "1"]),
    ("fedavg.py", ["--rounds", "2", "--eval-every", "1", "--sparse"]),
    ("model_editing.py", ["--epochs", "1"]),
])
def test_fine_tuning_keeps_a_near_perfect_step0_head(tmp_path, standin_dir, script, flags):
    """standin-sharp: the ridge head separates the validation set, where an unbounded logit scale made
    the first round wreck the backbone (1.0 -> 0.02). Every evaluation stays within 3 points of it."""
    result, val = run(tmp_path, standin_dir, script, "run", "--weights", "standin-sharp", "--synthetic-size", "2000",
                      *flags)
    head = result["head_val_acc"]
    assert head >= 0.95
    assert result["ridge_temperature"] < common.RIDGE_TEMPERATURES[-1] / 10
    assert min(val) >= head - 0.03, (head, val)


@pytest.mark.parametrize("script,flags", [
    ("fedavg.py", ["--rounds", "4", "--eval-every", "1"]),
    ("fedavg.py", ["--rounds", "2", "--eval-every", "1", "--sparse"]),
    ("model_editing.py", ["--epochs", "1"]),
])
def test_fine_tuning_keeps_and_improves_a_partial_step0_head(tmp_path, standin_dir, script, flags):
    """standin: the ridge head is about 80% right, so there is room to learn. Without augmentation
    (at 32 px a 4-pixel crop moves a quarter of one of test_vit's 4 patches: a shift of distribution
    the clean-image head has not seen), no evaluation falls more than 5 points below the head (dense
    FedAvg's first round dips most: it moves the head too), and dense FedAvg ends above it."""
    result, val = run(tmp_path, standin_dir, script, "run", "--weights", "standin", "--no-aug", *flags)
    head = result["head_val_acc"]
    assert 0.5 <= head <= 0.95
    assert min(val) >= head - 0.05, (head, val)
    if script == "fedavg.py" and "--sparse" not in flags:
        assert val[-1] > head, (head, val)


def test_fedavg_head_warmup_learns_a_head(tmp_path, standin_dir):
    """--head warmup's head-only rounds come close to the centralized baseline's head (same features)."""
    flags = ["--weights", "standin-sharp", "--synthetic-size", "2000"]
    central, _ = run(tmp_path, standin_dir, "centralized.py", "central", *flags)
    fed, val = run(tmp_path, standin_dir, "fedavg.py", "fed", *flags, "--head", "warmup", "--rounds", "1",
                   "--eval-every", "20")  # the default 20 warm-up rounds
    assert val[1] >= central["val_acc"] - 0.1, (val, central["val_acc"])  # val[0]: round 0, the untrained head


def test_iid_fedavg_ends_above_one_class_per_client(tmp_path, standin_dir):
    """The heterogeneity effect the study measures: dense FedAvg, IID vs Nc = 1, same rounds."""
    flags = ["--weights", "standin", "--synthetic-size", "2000", "--rounds", "3", "--eval-every", "3"]
    iid, _ = run(tmp_path, standin_dir, "fedavg.py", "iid", *flags)
    nc1, _ = run(tmp_path, standin_dir, "fedavg.py", "nc1", *flags, "--nc", "1")
    assert iid["val_acc"] > nc1["val_acc"] + 0.1, (iid["val_acc"], nc1["val_acc"])


def test_a_standin_on_another_arch_is_one_line(tmp_path, capsys):
    flags = [f for f in STANDIN if f not in ("--arch", "test_vit")]
    # main() as the script's __main__ runs it, in this process (a new one costs seconds of imports)
    status, err = run_as_script(fedavg.main, [*flags, "--arch", "vit_tiny_patch16_224", "--weights", "standin",
                                              "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")],
                                capsys)
    assert status == 2 and len(err) == 1 and "use it with --arch test_vit" in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data" / "standin").exists()
