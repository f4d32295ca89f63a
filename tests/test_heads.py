"""Step-0 heads: a fresh head FedAvg trains from scratch (--head zero / random), the ridge head fitted on
augmented views too (--ridge-views), and the step-0 head's augmentation gap (common.augmentation_gap)."""
import copy
import csv
import json

import pytest
import torch

import common
import fedavg
import model_editing
import plumbing
from conftest import TINY
from helpers import make_shards, parse_refused, tiny_model

STANDIN = [f for f in TINY if f != "--no-pretrained"]
FAST = TINY + ["--synthetic-size", "2000", "--k", "10", "--c", "0.5", "--batch-size", "32"]


def rows_of(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def result_of(out):
    return json.loads((out / "result.json").read_text())


# ----------------------------------------------------------------------------- --head zero / random

def zero_head_run(tmp_path, standin_dir, name, *flags):
    out = tmp_path / name
    fedavg.main(STANDIN + ["--data-dir", standin_dir, "--weights", "standin-sharp", "--synthetic-size", "2000",
                           "--train", "head", "--head", "zero", "--rounds", "20", "--eval-every", "10",
                           "--out", str(out), *flags])
    return result_of(out), [float(r["val_acc"]) for r in rows_of(out) if r["val_acc"]]


def test_fedavg_learns_a_zero_head_and_iid_learns_more_than_one_class_per_client(tmp_path, standin_dir):
    """The federated baseline: a zero head (every logit 0: class 0 for every image, 1% on 100 balanced
    classes) that FedAvg's head-only rounds train on the frozen stand-in, at the default --head-lr.
    standin-sharp: its features separate the classes, so an SGD head learns in tens of rounds (on
    standin an SGD head learns slowly, centralized too: README)."""
    iid, val_iid = zero_head_run(tmp_path, standin_dir, "iid")
    nc1, val_nc1 = zero_head_run(tmp_path, standin_dir, "nc1", "--nc", "1")
    assert val_iid[0] == val_nc1[0] == pytest.approx(0.01)  # round 0: the same zero head
    assert iid["train"] == "head" and iid["head"] == "zero"  # what the run trained, where its head came from
    assert val_iid[-1] > 0.3, val_iid  # learns, far above chance
    assert iid["val_acc"] > nc1["val_acc"] + 0.05, (val_iid, val_nc1)
    assert "head_train_aug_acc" not in iid or iid["head_train_aug_acc"] is None  # no backbone training: no gap


def test_zero_head_runs_have_their_own_names_and_refuse_a_frozen_fresh_head(capsys):
    assert fedavg.get_args(["--train", "head", "--head", "zero"]).out.endswith("iid_j4_head_from-zero/seed0")
    assert fedavg.get_args(["--head", "random", "--nc", "5"]).out.endswith("nc5_j4_dense_from-random/seed0")
    assert fedavg.get_args(["--train", "head"]).out.endswith("iid_j4_head/seed0")  # the ridge head's, as before
    assert fedavg.get_args(["--ridge-views", "4"]).out.endswith("iid_j4_dense_ridge4views/seed0")
    assert model_editing.get_args(["--ridge-views", "2"]).out.endswith("s0.9_r4_ridge2views/seed0")
    assert "--sparse freezes the head" in parse_refused(fedavg.get_args, TINY + ["--sparse", "--head", "zero"], capsys)
    assert "freezes the step-0 head" in parse_refused(model_editing.get_args, TINY + ["--head", "random"], capsys)
    for get_args in (fedavg.get_args, model_editing.get_args):
        line = parse_refused(get_args, TINY + ["--head", "warmup", "--ridge-views", "2"], capsys)
        assert "--ridge-views" in line and "ignored" in line


def test_fresh_heads_zero_and_seeded():
    head = tiny_model(3).head
    seeded = copy.deepcopy(head)
    common.fresh_head(seeded, "random")
    assert torch.equal(seeded.weight, head.weight)  # build_model's head, seeded by --seed
    assert not torch.equal(tiny_model(4).head.weight, head.weight)
    common.fresh_head(head, "zero")
    assert not head.weight.any() and not head.bias.any()


ZERO_RESUME = FAST + ["--train", "head", "--head", "zero", "--rounds", "6", "--eval-every", "4", "--ckpt-every", "2"]


def test_a_zero_head_run_resumes_bit_exact(tmp_path, monkeypatch):
    fedavg.main(ZERO_RESUME + ["--out", str(tmp_path / "full")])
    stop_at = {"n": 0}
    real = fedavg.train_round

    def stopping(*a, **k):
        stop_at["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(fedavg, "train_round", stopping)
    monkeypatch.setattr(plumbing, "stop_requested", lambda: stop_at["n"] >= 3)  # SIGTERM during round 3
    with pytest.raises(plumbing.Stopped):
        fedavg.main(ZERO_RESUME + ["--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    fedavg.main(ZERO_RESUME + ["--out", str(tmp_path / "cut"), "--resume"])
    for f in ("model.pt", "head.pt", "metrics.csv"):
        assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f
    full, cut = result_of(tmp_path / "full"), result_of(tmp_path / "cut")
    full.pop("seconds"), cut.pop("seconds")
    assert full == cut
    head = torch.load(tmp_path / "full" / "head.pt", weights_only=True)
    assert not head["weight"].any()  # head.pt: the step-0 head, zero


# ----------------------------------------------------------------------------- --ridge-views

def test_ridge_stats_with_views_are_those_of_the_stacked_rows():
    g = torch.Generator().manual_seed(0)
    f, views, y = torch.randn(30, 5, generator=g), torch.randn(3, 30, 5, generator=g), torch.randint(0, 100, (30,), generator=g)
    got = common.ridge_stats(f, y, views)
    want = common.ridge_stats(torch.cat([f, *views]), y.repeat(4))
    assert got[2] == want[2] == 120
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b)


def test_augmented_ridge_is_fitted_on_the_views_and_federated_equals_central():
    """--ridge-views 2 on the tiny model: the centralized head equals ridge_head on explicitly stacked clean +
    augmented features (each view from its own stream, as split_features draws it), the federated head
    equals it at IID and at one class per client, and the views change the head."""
    model, device = tiny_model(), torch.device("cpu")
    args = fedavg.get_args(FAST + ["--ridge-views", "2"])
    args.precision = "off"
    data = common.load_data(args)
    feats = common.cached_features(model, data, args, device)
    x, y = data["train"]
    views = [common.extract_features(model, x, args, device, plumbing.stream("feature_view", args.seed, v))
             for v in range(2)]
    stacked = copy.deepcopy(model.head)
    common.ridge_head(stacked, common.ridge_stats(torch.cat([feats["train"][0], *views]), y.repeat(3)), *feats["val"])
    central = copy.deepcopy(model.head)
    common.ridge_head(central, common.ridge_stats(*feats["train"], common.split_features(model, data, "train", 2, args,
                                                                                          device)), *feats["val"])
    torch.testing.assert_close(central.weight, stacked.weight)
    clean = copy.deepcopy(model.head)
    common.ridge_head(clean, common.ridge_stats(*feats["train"]), *feats["val"])
    assert not torch.allclose(clean.weight, stacked.weight, rtol=1e-3, atol=1e-3)
    for split in (["--iid"], ["--k", "100", "--nc", "1"]):
        shards = make_shards(y, fedavg.get_args(FAST + split))
        fed = copy.deepcopy(model.head)
        fedavg.federated_ridge(fed, shards, feats, torch.stack(views))
        torch.testing.assert_close(fed.weight, stacked.weight, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fed.bias, stacked.bias, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the augmentation gap

def independent_gap(out, flags):
    """The gap recomputed from the run's own head.pt and flags, by hand: the sample and crops drawn
    from the aug_gap stream, the logits of the whole model on each image."""
    args = fedavg.get_args(flags)
    model = tiny_model(args.seed)
    model.head.load_state_dict(torch.load(out / "head.pt", weights_only=True))
    model.eval()
    x, y = common.load_data(args)["train"]
    gen = plumbing.stream("aug_gap", args.seed)
    idx = torch.randperm(len(x), generator=gen)[:common.AUG_GAP_IMAGES]
    off, flip = common.draw_augmentation(len(idx), gen)
    with torch.no_grad():
        acc = [int((model(common.preprocess(images, 32)).argmax(1) == y[idx]).sum()) / len(idx)
               for images in (x[idx], common.augment(x[idx], off, flip))]
    return {"head_train_acc": acc[0], "head_train_aug_acc": acc[1]}


@pytest.mark.parametrize("script", ["fedavg", "model_editing"])
def test_round_0_records_the_heads_accuracy_on_clean_and_augmented_training_images(tmp_path, script, capsys):
    out = tmp_path / "run"
    flags = FAST + ["--out", str(out)]
    if script == "fedavg":
        fedavg.main(flags + ["--rounds", "1", "--lr", "0.01"])
    else:
        flags = TINY + ["--synthetic-size", "2000", "--out", str(out), "--batch-size", "32"]
        model_editing.main(flags + ["--epochs", "1", "--rule", "random"])
    result, rows = result_of(out), rows_of(out)
    want = independent_gap(out, flags if script == "fedavg" else TINY + ["--synthetic-size", "2000"])
    for k, v in want.items():
        assert result[k] == pytest.approx(v, abs=1e-9), k
        assert float(rows[0][k]) == pytest.approx(v, abs=1e-5), k  # metrics.csv's round / epoch 0
        assert rows[1][k] == ""  # measured once, at the start
    assert want["head_train_acc"] != want["head_train_aug_acc"]
    warned = "warning: the step-0 head" in capsys.readouterr().err
    assert warned == (want["head_train_acc"] - want["head_train_aug_acc"] > common.AUG_GAP_WARN)


def test_no_gap_is_measured_without_augmentation(tmp_path):
    fedavg.main(FAST + ["--out", str(tmp_path / "r"), "--rounds", "1", "--lr", "0.01", "--no-aug"])
    result = result_of(tmp_path / "r")
    assert result["head_train_acc"] is None and result["head_train_aug_acc"] is None
    assert fedavg.image_passes(fedavg.get_args(FAST + ["--no-aug"]), 2000, 100, 100)[1] + 2000 == \
        fedavg.image_passes(fedavg.get_args(FAST), 2000, 100, 100)[1]  # 1000 images, clean and augmented


@pytest.mark.parametrize("clean,aug,warns", [(0.96, 0.48, True), (0.84, 0.73, True), (0.84, 0.75, False),
                                             (0.5, 0.55, False)])
def test_the_gap_warning_fires_above_ten_points_and_names_the_remedies(capsys, clean, aug, warns):
    assert common.warn_augmentation_gap({"head_train_acc": clean, "head_train_aug_acc": aug}) == warns
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == int(warns)
    if warns:
        assert all(r in err[0] for r in ("--no-aug", "--ridge-views", "--lr", f"{aug:.1%}"))
