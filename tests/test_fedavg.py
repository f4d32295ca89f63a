"""fedavg.py: sharding, one round against the math, sparse rounds, resume, learning, bad flags."""
import copy
import hashlib
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import common
import fedavg
import plumbing
import splits
from conftest import TINY
from helpers import (assert_usage_error, backbone_file, count_calls, make_shards, masked_weights_moved, run_script,
                     stop_during_call, tiny_model)

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
    shards = make_shards(y, args)
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
    y = uneven_labels()  # and K*nc not a multiple of 100
    shards = splits.Nc(nc).shards(y, k, plumbing.make_generator(0))
    check_partition(shards, len(y))
    for s in shards:
        assert int((torch.bincount(y[s], minlength=100) > 0).sum()) == nc
    holders = torch.zeros(100, dtype=torch.long)  # every class is split over floor/ceil(K*nc/100) clients
    for s in shards:
        holders += torch.bincount(y[s], minlength=100) > 0
    assert holders.max() - holders.min() <= 1


@pytest.mark.parametrize("kind", splits.KINDS, ids=lambda kind: kind.__name__)
def test_every_kind_s_shards_are_a_partition_and_seeded(kind):
    """Every kind of splits.py (its example split, e.g. nc5), K = 100: every client holds a shard, each
    sample is in exactly one; the same seed gives the same shards (every client's), another seed others."""
    y = cifar_labels(45000)
    a, b, c = (make_shards(y, fedavg.get_args(splits.split_flags(kind.example) + ["--seed", seed]))
               for seed in ("1", "1", "2"))
    assert len(a) == len(b) == len(c) == 100 and min(map(len, a)) > 0
    check_partition(a, len(y))
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not all(torch.equal(s, t) for s, t in zip(a, c))


def shards_digest(shards):
    h = hashlib.sha256()
    for s in shards:
        h.update(str(len(s)).encode())
        h.update(s.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def uneven_labels():
    """Classes of unequal size: class c has 20 + c samples."""
    return torch.cat([torch.full((20 + c,), c) for c in range(100)])


@pytest.mark.parametrize("n,flags,digest", [
    (45000, ["--k", "100"], "e6637dd5bb972b60"), (45000, ["--k", "37", "--seed", "3"], "101562d03016934c"),
    (45000, ["--nc", "1"], "2d6da0979edc952c"), (45000, ["--nc", "5"], "6f81a703524bf524"),
    (45000, ["--nc", "5", "--seed", "1"], "45773fe4e5597d63"),
    (None, ["--nc", "50", "--k", "7", "--c", "0.5"], "3cbbd4d6b7550de5"),
    (45000, ["--dirichlet", "0.1"], "93c59383cbdd0853"), (45000, ["--dirichlet", "1", "--seed", "2"], "ab54010f75e1ecb1"),
    (45000, ["--dirichlet", "1000"], "1501e0bf1be4162f"),
    (2000, ["--dirichlet", "0.3", "--min-shard", "11"], "654eb48232f20ddb")])  # drawn several times
def test_shards_are_those_of_earlier_versions(n, flags, digest):
    """Every client's shard, bit for bit, as fedavg.py drew them before the splits moved to splits.py
    (a26795e; these digests were measured there): a run resumed or repeated keeps its clients' data.
    The Dirichlet draws go through numpy's sampler: a numpy that changed it would fail here too."""
    y = uneven_labels() if n is None else cifar_labels(n)
    assert shards_digest(make_shards(y, fedavg.get_args(flags))) == digest


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

def round_args(*extra):
    args = fedavg.get_args(TINY + list(extra))
    args.precision = "off"  # prepare() resolves it in the scripts
    return args


def fp32_scaler():
    return plumbing.grad_scaler(torch.device("cpu"), "off")


def one_round(model, shards, inputs, y, args, mask=None, head_only=False):
    phase = fedavg.Phase(model, args, mask, head_only)
    return fedavg.train_round(model, phase, shards, inputs, y, 0, args, torch.device("cpu"), fp32_scaler())


@pytest.mark.parametrize("sizes", [(50, 50, 50, 50), (20, 80, 35, 65)])
def test_one_round_with_c1_j1_full_batches_is_one_gradient_step_on_the_union(sizes):
    """Each client's update is -lr * (gradient of its mean loss); weighted by shard size, their sum is
    -lr * the gradient of the mean loss over the union: plain gradient descent."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (sum(sizes), 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 100, (sum(sizes),))
    shards = list(torch.split(torch.arange(sum(sizes)), list(sizes)))
    args = round_args("--k", str(len(sizes)), "--c", "1", "--j", "1", "--momentum", "0",
                      "--batch-size", "1000", "--no-aug", "--lr", "0.1")
    model = tiny_model()
    reference = copy.deepcopy(model)
    one_round(model, shards, x, y, args)

    reference.train()
    loss = F.cross_entropy(reference(common.preprocess(x, 32)), y)
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    start = tiny_model().state_dict()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters())  # every tensor moved


def reference_round(params, clients, weights, train_client):
    """The textbook server, one tensor at a time: Σ_i w_i (client_i - global) added to global."""
    global_w = [p.detach().clone() for p in params]
    update = [torch.zeros_like(p) for p in params]
    deltas = []
    for c, w in zip(clients, weights):
        train_client(c)
        with torch.no_grad():
            deltas.append([(p - g).clone() for p, g in zip(params, global_w)])
            for u, p, g in zip(update, params, global_w):
                u.add_(p - g, alpha=w)
                p.copy_(g)
    with torch.no_grad():
        for p, u in zip(params, update):
            p.add_(u)
    return deltas


def test_aggregation_is_bit_identical_to_the_per_tensor_server_and_measures_agreement(monkeypatch):
    torch.manual_seed(0)
    args = round_args("--k", "3", "--c", "1")
    model = tiny_model()
    phase = fedavg.Phase(model, args)
    ours = [p for _, p in phase.params]
    params = [p.detach().clone() for p in ours]
    moves = {c: [torch.randn_like(p) for p in params] for c in range(3)}
    shards = [torch.arange(50), torch.arange(30), torch.arange(20)]  # weights 0.5, 0.3, 0.2

    def train_client(c, ps):
        with torch.no_grad():
            for p, m in zip(ps, moves[c]):
                p.add_(m)
        return torch.tensor(float(c))

    # the round's clients move by `moves` (client_batches hands client_update the client's number)
    monkeypatch.setattr(fedavg, "client_batches", lambda x, y, shard, rnd, client, *a: client)
    monkeypatch.setattr(fedavg, "client_update", lambda forward, opt, scaler, client, grad_term: train_client(client, ours))
    loss, norm, agreement = fedavg.train_round(model, phase, shards, None, None, 0, args, torch.device("cpu"),
                                               fp32_scaler())
    clients = fedavg.sample_clients(args, 0)
    weights = [[0.5, 0.3, 0.2][c] for c in clients]
    ref = [p.clone() for p in params]
    deltas = reference_round(ref, clients, weights, lambda c: train_client(c, ref))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))  # same bits as the per-tensor server
    flat = [torch.cat([d.flatten() for d in ds]) for ds in deltas]
    avg = sum(w * f for w, f in zip(weights, flat))
    want = float(avg.square().sum() / sum(w * f.square().sum() for w, f in zip(weights, flat)))
    assert agreement == pytest.approx(want, rel=1e-5)
    assert norm == pytest.approx(float(sum(f.norm() for f in flat) / 3), rel=1e-5)
    assert loss == pytest.approx(1.0)


def test_agreement_is_one_for_identical_clients_and_below_for_different_shards():
    data = common.load_data(round_args("--synthetic-size", "2000"))
    x, y = data["train"]
    args = round_args("--k", "4", "--c", "1", "--j", "1", "--no-aug", "--batch-size", "16", "--lr", "0.05")
    same = [torch.arange(16)] * 4
    _, _, a_same = one_round(tiny_model(), same, x, y, args)
    assert a_same == pytest.approx(1.0, abs=1e-5)
    different = list(torch.arange(64).view(4, 16))
    _, _, a_diff = one_round(tiny_model(), different, x, y, args)
    assert 0 < a_diff < 0.99


def test_head_only_rounds_train_the_head_on_features_and_leave_the_backbone_untouched():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    args = round_args(*[f for f in FAST[len(TINY):] if f not in ("--lr", "0.05")], "--train", "head")
    data = common.load_data(args)
    feats = common.cached_features(model, data, args, torch.device("cpu"))
    shards = make_shards(data["train"][1], args)
    one_round(model, shards, feats["train"][0], data["train"][1], args, head_only=True)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]) != n.startswith("head."), n


def test_a_client_update_reads_nothing_back_from_the_device_per_step(monkeypatch):
    args = round_args("--j", "6", "--batch-size", "8")
    model = tiny_model()
    data = common.load_data(round_args("--synthetic-size", "2000"))
    x, y = data["train"]
    batches = fedavg.client_batches(x, y, torch.arange(100), 0, 0, args, torch.device("cpu"), True)
    opt = common.SparseSGDM(list(model.parameters()), [None] * len(list(model.parameters())), lr=0.01, momentum=0.9)
    calls = {"n": 0}
    real_item = torch.Tensor.item

    def counting_item(self):
        calls["n"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    loss = fedavg.client_update(lambda xb: common.forward_logits(model, common.preprocess(xb, 32), torch.device("cpu"), "off"),
                                opt, fp32_scaler(), batches)
    assert calls["n"] <= 1 and loss.dim() == 0


def test_federated_ridge_equals_central_ridge_on_the_union():
    model = tiny_model()
    args = round_args(*FAST[len(TINY):])
    data = common.load_data(args)
    feats = common.cached_features(model, data, args, torch.device("cpu"))
    central = copy.deepcopy(model.head)
    common.ridge_head(central, common.ridge_stats(*feats["train"]), *feats["val"])
    for split in (["--iid"], ["--k", "100", "--nc", "1"]):
        shards = make_shards(data["train"][1], round_args(*FAST[len(TINY):], *split))
        fed = copy.deepcopy(model.head)
        fedavg.federated_ridge(fed, shards, feats)
        torch.testing.assert_close(fed.weight, central.weight, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fed.bias, central.bias, rtol=1e-4, atol=1e-4)
    assert not torch.equal(central.weight, model.head.weight)


def test_federated_calibration_in_shared_batches_equals_per_client_scoring(monkeypatch):
    model = tiny_model()
    args = round_args(*FAST[len(TINY):], "--fisher-batches", "1", "--fisher-batch-size", "20", "--calib-rounds", "1", "--sparse")
    data = common.load_data(args)
    x = data["train"][0]
    shards = make_shards(data["train"][1], args)
    seen = []
    real = common.fisher_sums

    def recording(*a, **k):
        sums, n = real(*a, **k)
        seen.append((sums, n))
        return sums, n

    monkeypatch.setattr(common, "fisher_sums", recording)
    fedavg.federated_mask(model, shards, x, common.Calibration.of(args), args.seed, 32, torch.device("cpu"))
    batched, count = seen[0]
    monkeypatch.setattr(common, "fisher_sums", real)
    per_client = math.ceil(20 / args.k)
    total = {k: torch.zeros_like(v) for k, v in batched.items()}
    for client, shard in enumerate(shards):  # what each client would send: its own images, cropped and flipped
        i, u = common.draw_calibration(len(shard), per_client, plumbing.stream("fed_calib", args.seed, 1, client))
        off, flip = common.draw_augmentation(len(i), plumbing.stream("fed_calib_aug", args.seed, 1, client))
        sums, n = common.fisher_sums(model, common.augment(x[shard[i]], off, flip), u, 32, 4, torch.device("cpu"),
                                     score=args.score)
        for k in total:
            total[k] += sums[k]
    assert count == per_client * args.k
    for k in total:
        torch.testing.assert_close(batched[k], total[k], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("flags,how", [([], "train-aug"), (["--calib-images", "clean"], "clean")])
def test_federated_calibration_scores_the_images_calib_images_names(monkeypatch, flags, how):
    """Default: each client's calibration images through the training crop and flip, a fresh draw per
    client and round (as the TaLoS reference scores through its training preprocessing); clean: as they are."""
    args = round_args(*FAST[len(TINY):], "--fisher-batches", "1", "--fisher-batch-size", "20", "--calib-rounds", "2", "--sparse",
                      *flags)
    data = common.load_data(args)
    x = data["train"][0]
    shards = make_shards(data["train"][1], args)
    seen = []

    def recording(model, images, *a, **k):
        seen.append(images.clone())
        return {n: torch.zeros_like(p) for n, p in common.masked_params(model)}, len(images)

    monkeypatch.setattr(common, "fisher_sums", recording)
    fedavg.federated_mask(tiny_model(), shards, x, common.Calibration.of(args), args.seed, 32, torch.device("cpu"))
    assert len(seen) == 2
    per_client = math.ceil(20 / args.k)
    for r, images in enumerate(seen, 1):
        clean, augmented = [], []
        for client, shard in enumerate(shards):
            i, _ = common.draw_calibration(len(shard), per_client, plumbing.stream("fed_calib", args.seed, r, client))
            off, flip = common.draw_augmentation(len(i), plumbing.stream("fed_calib_aug", args.seed, r, client))
            clean.append(x[shard[i]])
            augmented.append(common.augment(x[shard[i]], off, flip))
        clean, augmented = torch.cat(clean), torch.cat(augmented)
        assert not torch.equal(clean, augmented)
        assert torch.equal(images, augmented if how == "train-aug" else clean)


# ----------------------------------------------------------------------------- fedavg.py end to end

def test_sparse_fedavg_keeps_the_head_and_the_masked_out_entries_bit_identical(tmp_path, monkeypatch):
    weights, pre = backbone_file(tmp_path)
    checked = []  # the ridge head's check (common.check_head_accuracy) at round 0, once
    monkeypatch.setattr(common, "check_head_accuracy", lambda acc, args, *a: checked.append(acc))
    out = tmp_path / "sparse"
    fedavg.main(FAST + ["--weights", weights, "--sparse", "--sparsity", "0.9", "--no-aug", "--lr", "0.005",
                        "--calib-rounds", "2", "--rounds", "4", "--eval-every", "2", "--out", str(out)])
    mask = common.load_mask(str(out / "mask.pt"), pre)
    final = torch.load(out / "model.pt", weights_only=True)
    moved, free = masked_weights_moved(final, pre, mask)
    assert 0.99 * free <= moved <= free
    head = torch.load(out / "head.pt", weights_only=True)  # written at step 0, before any round
    assert torch.equal(final["head.weight"], head["weight"]) and torch.equal(final["head.bias"], head["bias"])
    args = fedavg.get_args(FAST + ["--weights", weights])
    args.precision = "off"
    data = common.load_data(args)
    feats = common.cached_features(pre, data, args, torch.device("cpu"))
    ridge = copy.deepcopy(pre.head)
    fedavg.federated_ridge(ridge, make_shards(data["train"][1], args), feats)
    assert torch.equal(head["weight"], ridge.weight) and torch.equal(head["bias"], ridge.bias)  # the ridge head
    total = sum(p.numel() for _, p in common.masked_params(pre))
    result = json.loads((out / "result.json").read_text())
    assert result["mask_kept_frac"] == int((1 - 0.9) * total) / total  # the reference's count
    assert result["changed_frac"] == moved / total
    dense_extra = sum(p.numel() for n, p in common.backbone_params(pre) if n not in mask)  # cls_token, pos_embed
    assert result["comm_values_per_client_round"] == sum(int(m.sum()) for m in mask.values()) + dense_extra
    d = pre.head.in_features + 1
    assert result["comm_mb_total"] == pytest.approx(
        (result["comm_values_per_client_round"] * 5 * 4 + (d * d + d * 100 + 1) * 10) * 4 / 1e6)
    assert (out / "calibration.csv").read_text().count("\n") == 3  # header + 2 calibration rounds
    round0 = (out / "metrics.csv").read_text().splitlines()[1].split(",")
    assert checked == [float(round0[5])]  # round 0's val_acc
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "round,train_loss,update_norm,agreement,val_loss,val_acc,test_loss,test_acc"
    assert len(rows) == 6 and all(0 < float(r.split(",")[3]) <= 1 for r in rows[2:])
    # round 0: the ridge head before any round (no training yet), where every curve starts
    assert rows[1].startswith("0,,,,") and [float(v) for v in rows[1].split(",")[4:]] == pytest.approx(
        [v for split in ("val", "test") for v in common.evaluate_head(ridge, *feats[split])], rel=1e-5)


def test_plots_show_accuracy_in_percent_from_round_0_and_the_training_loss(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(plumbing, "plot_lines", lambda path, series, xlabel, ylabel, title, **kw: calls.update(
        {os.path.basename(path): (series, ylabel)}))
    rows = [{"round": 0, "train_loss": None, "val_loss": 2.0, "val_acc": 0.25, "test_loss": 2.1, "test_acc": 0.2},
            {"round": 1, "train_loss": 1.5, "val_loss": None, "val_acc": None, "test_loss": None, "test_acc": None},
            {"round": 2, "train_loss": 1.2, "val_loss": 1.8, "val_acc": 0.5, "test_loss": 1.9, "test_acc": 0.45}]
    fedavg.write_outputs(rows, fedavg.get_args(FAST + ["--out", str(tmp_path)]))
    series, ylabel = calls["accuracy.png"]
    assert "(%)" in ylabel and series == {"val": ([0, 2], [25.0, 50.0]), "test": ([0, 2], [20.0, 45.0])}
    series, _ = calls["loss.png"]
    assert series["train"] == ([1, 2], [1.5, 1.2]) and series["val"] == ([0, 2], [2.0, 1.8])


def test_dense_fedavg_starts_from_the_given_head_file(tmp_path):
    weights, pre = backbone_file(tmp_path)
    head = {"weight": torch.randn(100, pre.head.in_features), "bias": torch.randn(100)}
    torch.save(head, tmp_path / "head.pt")
    out = tmp_path / "run"
    fedavg.main(FAST + ["--weights", weights, "--head", str(tmp_path / "head.pt"), "--lr", "0", "--rounds", "1",
                        "--out", str(out)])
    final = torch.load(out / "model.pt", weights_only=True)
    assert torch.equal(final["head.weight"], head["weight"]) and torch.equal(final["head.bias"], head["bias"])


def test_sparse_fedavg_reuses_a_mask_file(tmp_path):
    weights, pre = backbone_file(tmp_path)
    params = dict(common.masked_params(pre))
    mask = common.select_mask(None, "random", 5000, gen=plumbing.make_generator(3), params=params)
    common.save_mask(mask, str(tmp_path / "given.pt"))
    out = tmp_path / "run"
    fedavg.main(FAST + ["--weights", weights, "--sparse", "--mask", str(tmp_path / "given.pt"),
                        "--rounds", "2", "--out", str(out)])
    saved = common.load_mask(str(out / "mask.pt"), pre)
    assert all(torch.equal(saved[n], mask[n]) for n in mask)
    final = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(final[n][~mask[n]], p[~mask[n]]) for n, p in params.items())
    assert json.loads((out / "result.json").read_text())["changed_frac"] > 0


RESUME = FAST + ["--sparse", "--sparsity", "0.8", "--calib-rounds", "2", "--rounds", "5", "--eval-every", "3",
                 "--test-every", "2", "--ckpt-every", "2", "--fisher-batches", "1", "--lr", "0.005"]


def assert_same_run(a, b):
    ma, mb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    for f in ("model.pt", "head.pt", "mask.pt"):  # byte for byte (plumbing.atomic_save)
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for f in ("metrics.csv", "calibration.csv", "shards.csv", "config.json"):
        assert (a / f).read_text() == (b / f).read_text(), f
    ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    ra.pop("seconds"), rb.pop("seconds")
    assert ra == rb


@pytest.fixture(scope="session")  # not module: under pytest-xdist its tests may run apart (conftest.schedule_order)
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    fedavg.main(RESUME + ["--out", str(out)])
    return out


def test_interrupted_run_resumes_to_the_same_files(tmp_path, monkeypatch, uninterrupted):
    real = fedavg.client_update
    # 5 clients a round: killed inside round 4, after the checkpoint of round 3
    count_calls(monkeypatch, fedavg, "client_update", kill_at=18)
    with pytest.raises(KeyboardInterrupt):
        fedavg.main(RESUME + ["--out", str(tmp_path / "cut")])
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["round"] == 3 and not (tmp_path / "cut" / "result.json").exists()  # cut mid-run
    monkeypatch.setattr(fedavg, "client_update", real)
    with pytest.raises(plumbing.UserError, match="--resume"):
        fedavg.main(RESUME + ["--out", str(tmp_path / "cut")])
    (tmp_path / "cut" / "head.pt").write_bytes(b"")  # damaged while the run was away: not in the finished run
    (tmp_path / "cut" / "shards.csv").write_text("junk\n")
    fedavg.main(RESUME + ["--out", str(tmp_path / "cut"), "--resume"])
    assert_same_run(uninterrupted, tmp_path / "cut")


def test_a_kill_between_the_mask_and_the_checkpoint_recalibrates(tmp_path, monkeypatch, uninterrupted):
    real = plumbing.save_checkpoint

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(plumbing, "save_checkpoint", killed)  # the first checkpoint follows the mask
    with pytest.raises(KeyboardInterrupt):
        fedavg.main(RESUME + ["--out", str(tmp_path / "cut")])
    assert (tmp_path / "cut" / "mask.pt").is_file() and not (tmp_path / "cut" / "checkpoint.pt").exists()
    monkeypatch.setattr(plumbing, "save_checkpoint", real)
    fedavg.main(RESUME + ["--out", str(tmp_path / "cut"), "--resume"])
    assert_same_run(uninterrupted, tmp_path / "cut")


def test_a_stop_signal_checkpoints_at_the_round_boundary_and_resumes(tmp_path, monkeypatch, uninterrupted):
    stop_during_call(monkeypatch, fedavg, "train_round", 2)  # SIGTERM during round 2
    with pytest.raises(plumbing.Stopped):
        fedavg.main(RESUME + ["--out", str(tmp_path / "cut")])
    # round 2 stops at its next client step and is undone: the checkpoint is round 1's end
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["round"] == 1
    monkeypatch.undo()
    fedavg.main(RESUME + ["--out", str(tmp_path / "cut"), "--resume"])
    assert_same_run(uninterrupted, tmp_path / "cut")


def test_iid_learns_and_one_class_per_client_learns_less(tmp_path):
    argv = TINY + ["--synthetic-size", "2000", "--k", "100", "--c", "0.1", "--j", "4", "--rounds", "8",
                   "--eval-every", "4", "--lr", "0.01", "--batch-size", "16", "--no-aug"]
    fedavg.main(argv + ["--iid", "--out", str(tmp_path / "iid")])
    fedavg.main(argv + ["--nc", "1", "--out", str(tmp_path / "nc1")])
    iid = json.loads((tmp_path / "iid" / "result.json").read_text())
    nc1 = json.loads((tmp_path / "nc1" / "result.json").read_text())
    assert iid["test_acc"] > 0.1  # chance is 0.01
    assert nc1["test_acc"] < iid["test_acc"] - 0.03
    shards = (tmp_path / "nc1" / "shards.csv").read_text().splitlines()[1:]
    assert len(shards) == 100 and all(r.endswith(",1") for r in shards)
    assert {f.name for f in (tmp_path / "iid").iterdir()} >= {"config.json", "metrics.csv", "accuracy.png",
                                                             "loss.png", "model.pt", "head.pt", "result.json"}


@pytest.mark.parametrize("bad", [["--nc", "0"], ["--nc", "101"], ["--c", "0"], ["--c", "1.5"],
                                 ["--k", "5", "--c", "0.1"], ["--k", "10", "--nc", "5"], ["--j", "0"],
                                 ["--mask", "m.pt"], ["--sparse", "--train", "head"], ["--iid", "--nc", "5"],
                                 ["--head-lr", "0.5"], ["--train", "head", "--lr", "0.5"],
                                 ["--head", "warmup", "--warmup-rounds", "0"], ["--score", "fisher"],
                                 ["--amp", "fp8"], ["--eval-every", "0"], ["--calib-images", "clean"],
                                 ["--sparse", "--mask", "m.pt", "--calib-images", "clean"]])
def test_bad_flags_are_one_line_errors(capsys, bad):
    with pytest.raises(SystemExit) as e:
        fedavg.get_args(FAST + bad)
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("bad,says", [(["--k", "3000"], "lower --k"), (["--img-size", "30"], "multiple"),
                                      (["--device", "bogus"], "not a device"), (["--amp", "bf16"], "needs a CUDA"),
                                      (["--sparse", "--sparsity", "0.9999999"], "keeps none"),
                                      (["--head", "nohead.pt"], "not found")])
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, bad, says):
    with pytest.raises(plumbing.UserError, match=says):
        fedavg.main(FAST + ["--out", str(tmp_path / "r")] + bad)
    assert not (tmp_path / "r").exists()


def test_bad_flag_end_to_end_is_one_line_and_exit_2(tmp_path):
    proc = run_script("fedavg.py", *FAST, "--out", str(tmp_path / "r"), "--img-size", "30")
    assert "multiple" in assert_usage_error(proc)
    assert not (tmp_path / "r").exists()


def test_missing_or_misfit_mask_is_a_one_line_error(tmp_path):
    with pytest.raises(plumbing.UserError, match="not found"):
        fedavg.main(FAST + ["--sparse", "--mask", str(tmp_path / "none.pt"), "--out", str(tmp_path / "r")])
    torch.save({"blocks.0.norm1.weight": torch.ones(3, dtype=torch.bool)}, tmp_path / "bad.pt")
    with pytest.raises(plumbing.UserError, match="does not fit"):
        fedavg.main(FAST + ["--sparse", "--mask", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- the run's state is its checkpoint

def stopped_run(tmp_path, monkeypatch, at=2):
    """RESUME stopped (SIGTERM) during round `at` + 1, which the stop undoes: its folder, holding the
    checkpoint of round `at`."""
    stop_during_call(monkeypatch, fedavg, "train_round", at + 1)
    with pytest.raises(plumbing.Stopped):
        fedavg.main(RESUME + ["--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    return tmp_path / "cut"


def test_resume_takes_the_mask_from_the_checkpoint_and_a_planted_link_does_not_survive(tmp_path, monkeypatch,
                                                                                    uninterrupted):
    """Issue 35.1: mask.pt of an interrupted run replaced by a link to an all-True mask; --resume used it (a
    different model under a name that says sparsity 0.8) and the finished run's mask.pt was still a link."""
    cut = stopped_run(tmp_path, monkeypatch)
    everything = {n: torch.ones_like(m) for n, m in common.load_mask(str(cut / "mask.pt"), tiny_model()).items()}
    common.save_mask(everything, str(tmp_path / "all.pt"))
    before = (tmp_path / "all.pt").read_bytes()
    (cut / "mask.pt").unlink()
    (cut / "mask.pt").symlink_to(tmp_path / "all.pt")
    fedavg.main(RESUME + ["--out", str(cut), "--resume"])
    assert not (cut / "mask.pt").is_symlink()
    assert (tmp_path / "all.pt").read_bytes() == before  # nothing written through the link
    assert_same_run(uninterrupted, cut)  # the checkpoint's mask: model.pt, mask.pt and result.json as uninterrupted
    assert json.loads((cut / "result.json").read_text())["mask_kept_frac"] < 0.3


def crafted(ckpt):
    """Checkpoints of the right run stamp, each wrong in one way (issue 35.8), as {what: checkpoint}."""
    def edit(**changes):
        c = dict(ckpt, **changes)
        return {k: v for k, v in c.items() if v is not DROP}
    model = dict(ckpt["model"])
    model["blocks.0.norm1.weight"] = torch.zeros(3)
    return {"no model": edit(model=DROP), "an unknown key": edit(extra=1), "a model of other shapes": edit(model=model),
            "round 10^30": edit(round=10**30), "round 3 with no rows": edit(round=3, rows=[]),
            "rows that skip a round": edit(rows=[ckpt["rows"][0], ckpt["rows"][2]]),
            "a row of text": edit(rows=[ckpt["rows"][0], "junk", ckpt["rows"][2]]),
            "no mask after calibration": edit(mask=None), "a mask of other names": edit(mask={"x": torch.ones(2) > 0}),
            "round as text": edit(round="2"), "a head of other shapes": edit(head={"weight": torch.zeros(1)}),
            "an older checkpoint that left the mask to mask.pt": edit(mask=DROP, calibrated=True)}


DROP = object()


def test_a_crafted_checkpoint_of_this_run_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    from helpers import run_as_script
    cut = stopped_run(tmp_path, monkeypatch)
    real = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert not (cut / "metrics.csv").exists()  # evaluated first at round 3
    for what, ckpt in crafted(real).items():
        torch.save(ckpt, cut / "checkpoint.pt")
        status, lines = run_as_script(fedavg.main, RESUME + ["--out", str(cut), "--resume"], capsys)
        assert status == 2 and len(lines) == 1, (what, lines)
        assert str(cut / "checkpoint.pt") in lines[0] and "delete it to start the run over" in lines[0], (what, lines)
        assert not (cut / "result.json").exists() and not (cut / "metrics.csv").exists(), what
    torch.save(real, cut / "checkpoint.pt")  # the real one still resumes
    fedavg.main(RESUME + ["--out", str(cut), "--resume"])
    assert (cut / "result.json").exists()


def test_a_last_round_whose_server_step_diverges_stops_with_no_result(tmp_path, monkeypatch, capsys):
    """Issue 35.10: the weights made non-finite by the last round's server step (as --server-opt yogi
    --server-eps 1e-300 did) went into result.json as accuracy 0.01 and a null test loss, exit 0."""
    from helpers import run_as_script
    real = fedavg.train_round

    def diverging(model, phase, *a, **k):
        out = real(model, phase, *a, **k)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")  # the server's step went wrong
        return out

    monkeypatch.setattr(fedavg, "train_round", diverging)
    out = tmp_path / "run"
    status, lines = run_as_script(fedavg.main, FAST + ["--rounds", "1", "--no-aug", "--out", str(out)], capsys)
    assert status == plumbing.DIVERGED_EXIT and len(lines) == 1, lines
    assert "FedAvg rounds, round 1: the weights are not finite" in lines[0] and "--lr below" in lines[0], lines
    assert not (out / "result.json").exists()
    monkeypatch.undo()  # finite weights whose evaluated loss is not (logits that overflow): the same
    monkeypatch.setattr(common, "evaluate", lambda *a: (float("inf"), 0.01))
    status, lines = run_as_script(fedavg.main, FAST + ["--rounds", "1", "--no-aug", "--out", str(tmp_path / "b")], capsys)
    assert status == plumbing.DIVERGED_EXIT and len(lines) == 1, lines
    assert "round 1: the val loss is inf and the test loss is inf after the step" in lines[0], lines
    assert not (tmp_path / "b" / "result.json").exists()


def test_a_new_flag_reaches_result_json_and_results_csv_with_no_edit(tmp_path, monkeypatch):
    """result.json is the run's config plus what it measured (no hand-listed flags), and results.csv has a
    column for every flag: a flag added to a parser is in both, with nothing else edited."""
    import csv
    import summarize
    real = common.edit_parser

    def with_a_new_flag():
        p = real()
        p.add_argument("--probe", type=int, default=7)
        return p

    monkeypatch.setattr(common, "edit_parser", with_a_new_flag)
    monkeypatch.setattr(summarize, "fedavg_plots", lambda *a: ([], []))
    root = tmp_path / "root"
    fedavg.main(FAST + ["--rounds", "1", "--no-aug", "--probe", "9", "--results", str(root)])
    result = json.loads(next(root.glob("fedavg/*/seed0/result.json")).read_text())
    assert result["probe"] == 9 and result["lr"] == 0.05 and result["k"] == 10 and result["split"] == "iid"
    assert result["mask_file"] is None and "mask" not in result  # the mask's key, under summarize.SCHEMA's name
    assert result["rule"] is result["score"] is result["calib_images"] is None  # no mask made: its flags did nothing
    summarize.main([str(root)])
    with open(root / "summary" / "results.csv") as f:
        row, = list(csv.DictReader(f))
    assert row["probe"] == "9" and row["lr"] == "0.05" and row["train"] == "all" and row["rule"] == row["mask"] == ""
