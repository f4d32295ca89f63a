"""fedavg.py's FL algorithms (FedProx, server optimizers, SCAFFOLD, TIES): neutral settings are FedAvg bit for
bit, each step against a hand computation or autograd, resume, masked entries, memory refusal, bad flags."""
import argparse
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import common
import fedavg
import plumbing
from conftest import TINY
from helpers import count_calls, masked_weights_moved, parse_refused, tiny_model

# 4 clients of ~100 images, 2 a round; evaluated only at the end (the tests compare models, not curves)
SMALL = TINY + ["--synthetic-size", "600", "--k", "4", "--c", "0.5", "--lr", "0.05", "--batch-size", "16",
                "--j", "2", "--rounds", "3", "--eval-every", "100", "--test-every", "100"]


def run(tmp_path, name, *flags):
    out = tmp_path / name
    fedavg.main(SMALL + list(flags) + ["--out", str(out)])
    return out


def model_of(out):
    return torch.load(out / "model.pt", weights_only=True)


def same_model(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def round_args(*extra):
    args = fedavg.get_args(TINY + list(extra))
    args.precision = "off"
    return args


# ----------------------------------------------------------------------------- neutral settings are FedAvg

@pytest.mark.parametrize("algo,setting", [
    # the defaults, spelled out
    (["--mu", "0", "--server-opt", "sgd", "--server-lr", "1", "--server-momentum", "0", "--aggregate", "mean"], []),
    # J = 1: every client's only step is at w = w_global, where the proximal term's gradient is 0
    (["--mu", "0.5"], ["--j", "1"]),
    # one round: the FedAvgM buffer starts at 0, so its first step is the plain aggregate
    (["--server-momentum", "0.9"], ["--rounds", "1"]),
    # one client a round, nothing trimmed: TIES of one update is that update
    (["--aggregate", "ties", "--ties-keep", "1"], ["--c", "0.25"]),
])
def test_an_algorithm_at_its_neutral_setting_is_fedavg_bit_for_bit(tmp_path, algo, setting):
    fedavg_out = run(tmp_path, "fedavg", *setting)
    algo_out = run(tmp_path, "algo", *setting, *algo)
    assert (fedavg_out / "model.pt").read_bytes() == (algo_out / "model.pt").read_bytes()
    assert (fedavg_out / "metrics.csv").read_text() == (algo_out / "metrics.csv").read_text()


# ----------------------------------------------------------------------------- FedProx

def test_fedprox_local_steps_follow_autograd_of_the_proximal_objective():
    torch.manual_seed(0)
    mu, lr, steps = 0.7, 0.05, 3
    args = round_args("--k", "1", "--c", "1", "--j", str(steps), "--mu", str(mu), "--lr", str(lr), "--wd", "0.01")
    model = tiny_model()
    phase = fedavg.Phase(model, args)
    params = [p for _, p in phase.params]
    with torch.no_grad():
        for p, g in zip(params, phase.global_w):  # w_global: somewhere else than the client's start
            g.copy_(p + 0.01 * torch.randn_like(p))
    for p in params:
        p.requires_grad_(True)
    x = torch.randint(0, 256, (steps, 8, 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 100, (steps, 8))
    ref = copy.deepcopy(model)
    ref_params = list(ref.parameters())
    opt = torch.optim.SGD(ref_params, lr=lr, momentum=args.momentum, weight_decay=args.wd)
    for xb, yb in zip(x, y):
        opt.zero_grad()
        prox = sum((p - g).square().sum() for p, g in zip(ref_params, phase.global_w))
        (F.cross_entropy(ref(common.preprocess(xb, 32)), yb) + mu / 2 * prox).backward()
        opt.step()

    model.train()
    ref.train()
    fedavg.client_update(lambda xb: model(common.preprocess(xb, 32)), phase.opt, plumbing.grad_scaler(
        torch.device("cpu"), "off"), (x, y), fedavg.client_grad_term(phase, 0, args))
    for (n, p), q in zip(phase.params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert not all(torch.equal(p, g) for p, g in zip(params, phase.global_w))


# ----------------------------------------------------------------------------- server optimizers

def server_args(kind, lr, eps=0.1, mom=0.0):
    return argparse.Namespace(server_opt=kind, server_lr=lr, server_eps=eps, server_momentum=mom)


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_adaptive_server_steps_follow_reddi_et_al_by_hand(kind):
    """Two rounds on three entries; the third has aggregate 0 both times (no client moved it) and must keep
    its bits."""
    lr, tau, b1, b2 = 0.1, 0.1, 0.9, 0.99
    aggs = [[0.5, -0.2, 0.0], [-0.3, 0.4, 0.0]]
    x0 = [1.0, -2.0, 3.0]
    opt = fedavg.ServerOpt(server_args(kind, lr, tau))
    params = [torch.tensor(x0, dtype=torch.float64)]
    for a in aggs:
        opt.step(params, [torch.tensor(a, dtype=torch.float64)])

    want = []
    for i, x in enumerate(x0):
        m, v = 0.0, tau ** 2
        for a in aggs:
            d = a[i]
            m = b1 * m + (1 - b1) * d
            if kind == "adam":
                v = b2 * v + (1 - b2) * d * d
            else:
                s = (v > d * d) - (v < d * d)
                v = v - (1 - b2) * d * d * s
            x = x + lr * m / (v ** 0.5 + tau)
        want.append(x)
    assert params[0].tolist() == pytest.approx(want, rel=1e-12)
    assert params[0][2].item() == 3.0 and params[0][0].item() != 1.0


def test_fedavgm_and_server_lr_by_hand():
    opt = fedavg.ServerOpt(server_args("sgd", 0.5, mom=0.9))
    p = [torch.tensor([0.0], dtype=torch.float64)]
    for a in (1.0, 2.0, -1.0):
        opt.step(p, [torch.tensor([a], dtype=torch.float64)])
    m1, m2, m3 = 1.0, 0.9 * 1.0 + 2.0, 0.9 * 2.9 - 1.0
    assert p[0].item() == pytest.approx(0.5 * (m1 + m2 + m3), rel=1e-12)


# ----------------------------------------------------------------------------- TIES

def test_ties_merge_on_hand_computed_updates():
    d = [torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0]),   # top 3 by magnitude: -4, 3, 2
         torch.tensor([-2.0, 1.5, -3.0, 0.1, -1.0]),  # -3, -2, 1.5
         torch.tensor([1.0, -2.0, -0.5, 3.0, 0.2])]   # 3, -2, 1
    # trimmed: [3,0,0,2,-4], [-2,1.5,-3,0,0], [1,-2,0,3,0]; equal weights: elected signs of the sums
    # (2, -0.5, -3, 5, -4): + - - + -; the mean of the agreeing kept values: (3+1)/2, -2, -3, (2+3)/2, -4
    third = 1 / 3
    assert fedavg.ties_merge(d, [third] * 3, 0.6).tolist() == pytest.approx([2.0, -2.0, -3.0, 2.5, -4.0])
    # weighted by shard size: entry 0 averages 3 (weight 0.5) and 1 (0.25), entry 3 2 (0.5) and 3 (0.25)
    assert fedavg.ties_merge(d, [0.5, 0.25, 0.25], 0.6).tolist() == pytest.approx([7 / 3, -2.0, -3.0, 7 / 3, -4.0])
    # an entry whose kept values cancel exactly has no elected sign: it stays 0
    assert fedavg.ties_merge([torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 3.0])], [0.5, 0.5], 1).tolist() == [0.0, 2.5]


def test_ties_round_merges_the_packed_updates_and_measures_agreement_on_the_raw_ones(monkeypatch):
    torch.manual_seed(0)
    args = round_args("--k", "3", "--c", "1", "--aggregate", "ties", "--ties-keep", "0.3")
    model = tiny_model()
    mask = {n: torch.rand_like(p) < 0.5 for n, p in common.masked_params(model)}
    phase = fedavg.Phase(model, args, mask)
    ours = [p for _, p in phase.params]
    start = [p.detach().clone() for p in ours]
    moves = {c: [torch.randn_like(p) * (k if k is not None else 1) for p, k in zip(start, phase.keep)]
             for c in range(3)}

    def train_client(c):
        with torch.no_grad():
            for p, m in zip(ours, moves[c]):
                p.add_(m)
        return torch.tensor(0.0)

    monkeypatch.setattr(fedavg, "client_batches", lambda x, y, shard, rnd, client, *a: client)
    monkeypatch.setattr(fedavg, "client_update", lambda forward, opt, scaler, client, grad_term: train_client(client))
    shards = [torch.arange(50), torch.arange(30), torch.arange(20)]
    _, _, agreement = fedavg.train_round(model, phase, shards, None, None, 0, args, torch.device("cpu"),
                                         plumbing.grad_scaler(torch.device("cpu"), "off"))
    clients = fedavg.sample_clients(args, 0)
    weights = [[0.5, 0.3, 0.2][c] for c in clients]
    deltas = [phase.pack([(s + m) - s for s, m in zip(start, moves[c])]) for c in clients]  # as the round sees them
    merged = fedavg.ties_merge(deltas, weights, 0.3)
    for p, s, m in zip(ours, start, phase.unpack(merged)):
        assert torch.equal(p, s + m)
    for (n, p), s in zip(phase.params, start):  # masked-out entries: bit for bit
        if n in mask:
            assert torch.equal(p[~mask[n]], s[~mask[n]])
    flat = [torch.cat([m.flatten() for m in moves[c]]) for c in clients]
    mean = sum(w * f for w, f in zip(weights, flat))
    assert agreement == pytest.approx(float(mean.square().sum() / sum(w * f.square().sum()
                                                                      for w, f in zip(weights, flat))), rel=1e-5)


# ----------------------------------------------------------------------------- SCAFFOLD

def test_scaffold_matches_a_per_client_reference_with_partial_participation():
    """Head-only rounds on fixed features (fast, exact): 5 clients, 2 a round, 4 rounds, J = 3."""
    torch.manual_seed(0)
    k, j, lr, rounds = 5, 3, 0.1, 4
    args = round_args("--k", str(k), "--c", "0.4", "--j", str(j), "--head-lr", str(lr), "--train", "head",
                      "--scaffold", "--batch-size", "8", "--momentum", "0.9")
    model = tiny_model()
    feats = torch.randn(100, model.head.in_features)
    y = torch.randint(0, 100, (100,))
    shards = list(torch.arange(100).view(k, -1))
    ref = copy.deepcopy(model.head)
    phase = fedavg.Phase(model, args, head_only=True)
    scaler = plumbing.grad_scaler(torch.device("cpu"), "off")
    for rnd in range(rounds):
        fedavg.train_round(model, phase, shards, feats, y, rnd, args, torch.device("cpu"), scaler)

    # the reference: one tensor at a time, torch.optim.SGD as the client
    w = [p.detach().clone() for p in ref.parameters()]
    c = [torch.zeros_like(t) for t in w]
    ci = {i: [torch.zeros_like(t) for t in w] for i in range(k)}
    for rnd in range(rounds):
        clients = fedavg.sample_clients(args, rnd)
        assert len(clients) == 2
        sizes = [len(shards[i]) for i in clients]
        update, dc = [torch.zeros_like(t) for t in w], [torch.zeros_like(t) for t in w]
        for i, size in zip(clients, sizes):
            local = [t.clone().requires_grad_(True) for t in w]
            opt = torch.optim.SGD(local, lr=lr, momentum=0.9)
            xb, yb = fedavg.client_batches(feats, y, shards[i], rnd, i, args, torch.device("cpu"), False)
            for xs, ys in zip(xb, yb):
                opt.zero_grad()
                F.cross_entropy(xs @ local[0].T + local[1], ys).backward()
                with torch.no_grad():
                    for t, a, b in zip(local, c, ci[i]):
                        t.grad += a - b
                opt.step()
            with torch.no_grad():
                new = [b - a + (g - t) / (j * lr) for t, g, a, b in zip(local, w, c, ci[i])]
                for u, t, g in zip(update, local, w):
                    u += size / sum(sizes) * (t - g)
                for d, n, b in zip(dc, new, ci[i]):
                    d += n - b
                ci[i] = new
        w = [g + u for g, u in zip(w, update)]
        c = [a + d / k for a, d in zip(c, dc)]

    for p, q in zip(model.head.parameters(), w):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for a, b in zip(phase.scaffold.c, c):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sampled = {i for r in range(rounds) for i in fedavg.sample_clients(args, r)}
    assert set(phase.scaffold.ci) == sampled and len(sampled) < k  # partial participation: some never sampled
    for i in sampled:
        for a, b in zip(phase.unpack(phase.scaffold.ci[i]), ci[i]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(float(t.abs().max()) > 0 for t in phase.scaffold.c)


def test_scaffold_refuses_variates_that_do_not_fit_before_writing_anything(tmp_path, monkeypatch):
    model = tiny_model()
    args = round_args(*SMALL[len(TINY):], "--scaffold")
    assert fedavg.scaffold_bytes(model, args) == 4 * 4 * sum(p.numel() for p in model.parameters())  # K x fp32
    monkeypatch.setattr(plumbing, "host_memory_available", lambda: fedavg.scaffold_bytes(model, args) - 1)
    with pytest.raises(plumbing.UserError, match="--scaffold keeps 4 client"):
        fedavg.main(SMALL + ["--scaffold", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_scaffold_memory_of_a_sparse_run_counts_only_its_trained_entries():
    model = tiny_model()
    mask = {n: torch.rand_like(p) < 0.1 for n, p in common.masked_params(model)}
    args = round_args("--k", "10", "--scaffold", "--sparse", "--mask", "m.pt")
    extra = sum(p.numel() for n, p in common.backbone_params(model) if n not in mask)
    assert fedavg.scaffold_bytes(model, args, mask) == 10 * 4 * (sum(int(m.sum()) for m in mask.values()) + extra)


# ----------------------------------------------------------------------------- resume and masks, every algorithm

ALGOS = [["--mu", "0.5"], ["--server-momentum", "0.9", "--server-lr", "0.8"], ["--server-opt", "adam", "--server-lr", "0.01"],
         ["--server-opt", "yogi", "--server-lr", "0.01"], ["--scaffold"], ["--aggregate", "ties"]]


@pytest.fixture(scope="module")
def random_mask(tmp_path_factory):
    """A mask file for SMALL's (random-init) model: sparse runs then skip calibration."""
    model = tiny_model()
    params = dict(common.masked_params(model))
    path = tmp_path_factory.mktemp("mask") / "mask.pt"
    common.save_mask(common.select_mask(None, "random", 20000, gen=plumbing.make_generator(3), params=params),
                     str(path))
    return str(path), model


def sparse_flags(path):
    return ["--sparse", "--mask", path, "--rounds", "4", "--ckpt-every", "2"]


@pytest.fixture(scope="module")
def sparse_fedavg(tmp_path_factory, random_mask):
    return model_of(run(tmp_path_factory.mktemp("fedavg"), "run", *sparse_flags(random_mask[0])))


@pytest.mark.parametrize("algo", ALGOS, ids=lambda a: "".join(a))
def test_every_algorithm_resumes_bit_for_bit_and_keeps_masked_entries(tmp_path, monkeypatch, algo, random_mask,
                                                                     sparse_fedavg):
    path, model = random_mask
    flags = sparse_flags(path) + algo
    full = run(tmp_path, "full", *flags)
    assert not same_model(model_of(full), sparse_fedavg)  # the algorithm did something
    real = fedavg.client_update
    count_calls(monkeypatch, fedavg, "client_update", kill_at=6)  # 2 clients a round: inside round 3
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "cut", *flags)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["round"] == 2 and not (tmp_path / "cut" / "result.json").exists()  # cut mid-run
    monkeypatch.setattr(fedavg, "client_update", real)
    run(tmp_path, "cut", *flags, "--resume")
    assert (full / "model.pt").read_bytes() == (tmp_path / "cut" / "model.pt").read_bytes()
    assert (full / "metrics.csv").read_text() == (tmp_path / "cut" / "metrics.csv").read_text()

    mask = common.load_mask(path, model)
    moved, free = masked_weights_moved(model_of(full), model, mask)
    assert moved > 0.5 * free
    result = json.loads((full / "result.json").read_text())
    trained = sum(int(m.sum()) for m in mask.values()) + sum(
        p.numel() for n, p in common.backbone_params(model) if n not in mask)
    assert result["comm_values_per_client_round"] == trained * (2 if "--scaffold" in algo else 1)


def test_scaffold_state_survives_a_resume_across_the_head_warmup(tmp_path, monkeypatch):
    """Variates of the warm-up phase and of the main rounds: the cut falls in the main rounds, after a
    checkpoint taken there; and a second cut inside the warm-up."""
    flags = ["--scaffold", "--head", "warmup", "--warmup-rounds", "2", "--head-lr", "0.05", "--ckpt-every", "1"]
    full = run(tmp_path, "full", *flags)
    real = fedavg.client_update
    for name, kill_at, saved in (("main", 9, 4), ("warm", 4, 1)):
        count_calls(monkeypatch, fedavg, "client_update", kill_at=kill_at)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, name, *flags)
        ckpt = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        assert ckpt["round"] == saved and ckpt["algo"]["head_only"] == (saved <= 2)
        assert ckpt["algo"]["scaffold"]["ci"]  # the variates are in it
        monkeypatch.setattr(fedavg, "client_update", real)
        run(tmp_path, name, *flags, "--resume")
        assert (full / "model.pt").read_bytes() == (tmp_path / name / "model.pt").read_bytes(), name


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("bad,says", [(["--ties-keep", "0.5"], "--aggregate ties"),
                                      (["--server-eps", "0.1"], "adam/yogi"),
                                      (["--server-opt", "adam", "--server-momentum", "0.9"], "beta1"),
                                      (["--aggregate", "ties", "--ties-keep", "0"], "(0, 1]"),
                                      (["--scaffold", "--lr", "0"], "--scaffold"),
                                      (["--server-opt", "adamw"], "invalid choice"),
                                      (["--mu", "-1"], ">= 0")])
def test_bad_algorithm_flags_are_one_line_errors(capsys, bad, says):
    assert says in parse_refused(fedavg.get_args, TINY + bad, capsys)


def test_run_names_tell_the_algorithms_apart():
    names = {fedavg.get_args(TINY + a).out for a in [[], *ALGOS, ["--server-lr", "0.5"]]}
    assert len(names) == len(ALGOS) + 2
    assert fedavg.get_args(TINY).out == fedavg.get_args(TINY + ["--mu", "0", "--aggregate", "mean"]).out  # defaults name nothing


def test_the_gradient_term_is_added_to_unscaled_gradients_under_the_fp16_scaler():
    """With the fp16 gradient scaler on, .grad holds scale x the gradient after backward: the term must be
    added after unscaling, or it would be divided by the scale (2^10 here) at the step."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = common.SparseSGDM([w], [None], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    common.optimizer_step(opt, (w * torch.tensor([3.0, -1.0])).sum(), scaler, lambda: w.grad.add_(0.5))
    assert w.tolist() == [1.0 - 3.5, 2.0 + 0.5]
