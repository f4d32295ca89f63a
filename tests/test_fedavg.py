"""fedavg.py: sharding, one round against the math, sparse rounds, resume, learning, bad flags."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import common as C
import fedavg
from conftest import TINY
from helpers import assert_usage_error, backbone_file, masked_weights_moved, run_script, tiny_model

FAST = TINY + ["--synthetic-size", "2000", "--k", "10", "--c", "0.5", "--lr", "0.05", "--batch-size", "32"]


# ----------------------------------------------------------------------------- sharding

def cifar_labels(n, seed=0):
    """Labels of a CIFAR-100-sized training set (n/100 per class) in a random order."""
    y = torch.arange(n) % 100
    return y[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def check_partition(shards, n):
    every = torch.cat(shards)
    assert len(every) == n and torch.equal(torch.sort(every).values, torch.arange(n))  # disjoint and covering


@pytest.mark.parametrize("n", [45000, 50000])  # the training split after validation, and all of it
@pytest.mark.parametrize("nc", [None, 1, 5, 10, 50])
def test_shards_are_disjoint_covering_balanced_with_nc_classes(n, nc):
    y = cifar_labels(n)
    args = fedavg.get_args(["--k", "100"] + (["--nc", str(nc)] if nc else ["--iid"]))
    shards = fedavg.make_shards(y, args)
    assert len(shards) == 100
    check_partition(shards, n)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    for s in shards:
        counts = torch.bincount(y[s], minlength=100)
        if nc is None:  # IID: every class spread evenly, n/100/100 of each
            assert counts.min() >= n // 100 // 100 and counts.max() <= -(-n // 100 // 100)
        else:
            assert int((counts > 0).sum()) == nc


@pytest.mark.parametrize("k,nc", [(7, 30), (13, 9), (30, 4), (100, 1)])
def test_noniid_shards_on_uneven_sizes_stay_as_close_as_the_classes_allow(k, nc):
    # classes of unequal size (20..119 samples) and K*nc not a multiple of 100
    y = torch.cat([torch.full((20 + c,), c) for c in range(100)])
    shards = fedavg.noniid_shards(y, k, nc, C.make_generator(0))
    check_partition(shards, len(y))
    for s in shards:
        assert int((torch.bincount(y[s], minlength=100) > 0).sum()) == nc
    holders = torch.zeros(100, dtype=torch.long)  # every class is split over floor/ceil(K*nc/100) clients
    for s in shards:
        holders += torch.bincount(y[s], minlength=100) > 0
    assert holders.max() - holders.min() <= 1


def test_shards_are_seeded():
    y = cifar_labels(45000)
    a = fedavg.make_shards(y, fedavg.get_args(["--nc", "5", "--seed", "1"]))
    b = fedavg.make_shards(y, fedavg.get_args(["--nc", "5", "--seed", "1"]))
    c = fedavg.make_shards(y, fedavg.get_args(["--nc", "5", "--seed", "2"]))
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not all(torch.equal(s, t) for s, t in zip(a, c))


def test_client_sampling_is_seeded_distinct_and_ceil_ck():
    args = fedavg.get_args(["--k", "100", "--c", "0.1"])
    picks = [fedavg.sample_clients(args, r) for r in range(50)]
    assert all(len(p) == 10 == len(set(p)) for p in picks)
    assert picks == [fedavg.sample_clients(args, r) for r in range(50)]
    assert len({tuple(p) for p in picks}) == 50
    assert len(fedavg.sample_clients(fedavg.get_args(["--k", "15", "--c", "0.1"]), 0)) == 2  # ceil(1.5)


@pytest.mark.parametrize("j,rounds", [(4, 200), (8, 100), (16, 50)])
def test_scale_rounds_keeps_total_local_work_equal(j, rounds):
    args = fedavg.get_args(["--j", str(j), "--rounds", "200", "--scale-rounds"])
    assert args.rounds == rounds and args.rounds * args.j == 800
    assert fedavg.get_args(["--j", str(j), "--rounds", "200"]).rounds == 200


# ----------------------------------------------------------------------------- one round against the math

@pytest.mark.parametrize("sizes", [(50, 50, 50, 50), (20, 80, 35, 65)])
def test_one_round_with_c1_j1_full_batches_is_one_gradient_step_on_the_union(sizes):
    """Each client's update is -lr * (gradient of its mean loss); weighted by shard size, their sum is
    -lr * the gradient of the mean loss over the union: plain gradient descent."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (sum(sizes), 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 100, (sum(sizes),))
    shards = list(torch.split(torch.arange(sum(sizes)), list(sizes)))
    args = fedavg.get_args(TINY + ["--k", str(len(sizes)), "--c", "1", "--j", "1", "--momentum", "0",
                                   "--batch-size", "1000", "--no-aug", "--lr", "0.1"])
    model = tiny_model()
    reference = copy.deepcopy(model)
    fedavg.fedavg_round(model, shards, x, y, args, torch.device("cpu"), rnd=0)

    reference.train()
    loss = F.cross_entropy(reference(C.preprocess(x, 32)), y)
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    start = tiny_model().state_dict()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters())  # every tensor moved


def test_head_only_rounds_leave_the_backbone_untouched():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    args = fedavg.get_args(FAST)
    data = C.load_data(args)
    shards = fedavg.make_shards(data["train"][1], args)
    fedavg.fedavg_round(model, shards, *data["train"], args, torch.device("cpu"), rnd=0, head_only=True)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]) != n.startswith("head."), n


# ----------------------------------------------------------------------------- fedavg.py end to end

@pytest.mark.parametrize("rule", ["least-sensitive", "random"])
def test_sparse_fedavg_never_changes_masked_out_global_weights(tmp_path, rule):
    weights, pre = backbone_file(tmp_path)
    out = tmp_path / "sparse"
    fedavg.main(FAST + ["--weights", weights, "--sparse", "--rule", rule, "--sparsity", "0.9",
                        "--calib-rounds", "2", "--rounds", "4", "--eval-every", "2", "--out", str(out)])
    mask = C.load_mask(str(out / "mask.pt"), pre)
    moved, free = masked_weights_moved(torch.load(out / "model.pt", weights_only=True), pre, mask)
    assert 0.99 * free <= moved <= free
    total = sum(p.numel() for _, p in C.backbone_params(pre))
    result = json.loads((out / "result.json").read_text())
    assert result["mask_kept_frac"] == (total - round(0.9 * total)) / total
    assert result["changed_frac"] == moved / total
    assert (out / "calibration.csv").read_text().count("\n") == 3  # header + 2 calibration rounds


def test_sparse_fedavg_reuses_a_mask_file(tmp_path):
    weights, pre = backbone_file(tmp_path)
    params = dict(C.backbone_params(pre))
    mask = C.select_mask(None, "random", 5000, gen=C.make_generator(3), params=params)
    C.save_mask(mask, str(tmp_path / "given.pt"))
    out = tmp_path / "run"
    fedavg.main(FAST + ["--weights", weights, "--sparse", "--mask", str(tmp_path / "given.pt"),
                        "--rounds", "2", "--out", str(out)])
    saved = C.load_mask(str(out / "mask.pt"), pre)
    assert all(torch.equal(saved[n], mask[n]) for n in mask)
    final = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(final[n][~mask[n]], p[~mask[n]]) for n, p in params.items())
    assert json.loads((out / "result.json").read_text())["changed_frac"] > 0


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    argv = FAST + ["--sparse", "--sparsity", "0.8", "--calib-rounds", "2", "--warmup-rounds", "2", "--rounds", "5",
                   "--eval-every", "3", "--ckpt-every", "2"]
    fedavg.main(argv + ["--out", str(tmp_path / "full")])

    real, calls = fedavg.client_update, {"n": 0}

    def dying_client(*a, **k):  # 5 clients a round: dies inside round 6, after the checkpoint of round 4
        calls["n"] += 1
        if calls["n"] == 28:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fedavg, "client_update", dying_client)
    with pytest.raises(KeyboardInterrupt):
        fedavg.main(argv + ["--out", str(tmp_path / "cut")])
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "result.json").exists()
    monkeypatch.setattr(fedavg, "client_update", real)
    with pytest.raises(C.UserError, match="--resume"):
        fedavg.main(argv + ["--out", str(tmp_path / "cut")])
    fedavg.main(argv + ["--out", str(tmp_path / "cut"), "--resume"])

    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for f in ("metrics.csv", "calibration.csv", "shards.csv"):
        assert (tmp_path / "full" / f).read_text() == (tmp_path / "cut" / f).read_text(), f
    rows = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["round", "3", "6", "7"]


def test_iid_learns_and_one_class_per_client_learns_less(tmp_path):
    argv = TINY + ["--synthetic-size", "4000", "--k", "100", "--c", "0.1", "--j", "4", "--rounds", "24",
                   "--eval-every", "8", "--lr", "0.05", "--batch-size", "32"]
    fedavg.main(argv + ["--iid", "--out", str(tmp_path / "iid")])
    fedavg.main(argv + ["--nc", "1", "--out", str(tmp_path / "nc1")])
    iid = json.loads((tmp_path / "iid" / "result.json").read_text())
    nc1 = json.loads((tmp_path / "nc1" / "result.json").read_text())
    assert iid["test_acc"] > 0.1  # chance is 0.01
    assert nc1["test_acc"] < iid["test_acc"] - 0.03
    shards = (tmp_path / "nc1" / "shards.csv").read_text().splitlines()[1:]
    assert len(shards) == 100 and all(r.endswith(",1") for r in shards)
    assert {f.name for f in (tmp_path / "iid").iterdir()} >= {"config.json", "metrics.csv", "accuracy.png",
                                                             "loss.png", "model.pt", "result.json"}


@pytest.mark.parametrize("bad", [["--nc", "0"], ["--nc", "101"], ["--c", "0"], ["--c", "1.5"],
                                 ["--k", "5", "--c", "0.1"], ["--k", "10", "--nc", "5"], ["--j", "0"],
                                 ["--mask", "m.pt"], ["--sparse", "--train", "head"], ["--iid", "--nc", "5"]])
def test_bad_flags_are_one_line_errors(tmp_path, bad):
    proc = run_script("fedavg.py", *FAST, "--out", str(tmp_path / "r"), *bad)
    assert_usage_error(proc)
    assert not (tmp_path / "r").exists()


def test_missing_or_misfit_mask_is_a_one_line_error(tmp_path):
    proc = run_script("fedavg.py", *FAST, "--sparse", "--mask", str(tmp_path / "none.pt"), "--out", str(tmp_path / "r"))
    assert "not found" in assert_usage_error(proc)
    torch.save({"cls_token": torch.ones(3, dtype=torch.bool)}, tmp_path / "bad.pt")
    proc = run_script("fedavg.py", *FAST, "--sparse", "--mask", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "r"))
    assert "does not fit" in assert_usage_error(proc)
    assert not (tmp_path / "r").exists()
