"""algorithms.py, the FL algorithm seam, through fedavg.py: every algorithm of the registry at its neutral setting is
FedAvg bit for bit, at its example resumes bit for bit and keeps masked entries; each step against a hand
computation or autograd; SCAFFOLD on heterogeneous quadratics under momentum; a stop mid-round; memory refusal;
bad flags and combinations."""
import argparse
import copy
import itertools
import json
import os
import signal
import types

import pytest
import torch
import torch.nn.functional as F

import algorithms
import common
import fedavg
import plumbing
from conftest import TINY
from helpers import count_calls, masked_weights_moved, parse_refused, run_as_script, tiny_model

REGISTRY = list(algorithms.REGISTRY.values())

# 4 clients of ~100 images, 2 a round; evaluated only at the end (the tests compare models, not curves)
SMALL = TINY + ["--synthetic-size", "600", "--k", "4", "--c", "0.5", "--lr", "0.05", "--batch-size", "16",
                "--j", "2", "--rounds", "3", "--eval-every", "100", "--test-every", "100", "--no-aug"]


@pytest.fixture
def no_plots(monkeypatch):
    """The curves are not what these tests compare (model.pt, metrics.csv): drawing them took most of a run."""
    monkeypatch.setattr(plumbing, "plot_lines", lambda *a, **k: None)


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


# ----------------------------------------------------------------------------- the registry

class FlagRecorder:
    """An argparse group stand-in: the dests of the flags added to it."""
    def __init__(self):
        self.dests = []

    def add_argument(self, *names, **kw):
        self.dests.append(kw.get("dest", names[0].lstrip("-").replace("-", "_")))


def test_every_algorithm_declares_its_flags_grid_and_settings():
    for cls in REGISTRY:
        g = FlagRecorder()
        cls.add_flags(g)  # a flag missing from `flags` is named twice in run names and never refused
        assert set(g.dests) <= set(cls.flags), f"{cls.name}.flags lacks {sorted(set(g.dests) - set(cls.flags))}"
        if issubclass(cls, algorithms.Aggregator):  # --aggregate's help says what each choice is
            assert cls.says and cls.says in " ".join(algorithms.aggregate_help().split()), cls.name
        assert 1 <= len(cls.grid) <= 4 and cls.grid[0] is not None, cls.name
        for flags in [*cls.grid, cls.example] + ([cls.neutral + cls.neutral_context] if cls.neutral else []):
            args = fedavg.get_args(TINY + flags)  # each a setting the parser accepts ...
            if flags is not (cls.neutral + cls.neutral_context if cls.neutral else None):
                assert algorithms.selected_class(args) is cls, (cls.name, flags)  # ... that runs this algorithm
        assert set(cls.flags) <= set(algorithms.FLAGS)
    assert algorithms.identify({})[0] == "FedAvg"  # a config older than every algorithm flag
    # a run from before one algorithm a run: both named, both flags
    assert algorithms.identify({"mu": 0.1, "scaffold": True}) == ("FedProx+SCAFFOLD", {"mu": 0.1, "server_lr": 1.0,
                                                                                      "scaffold": True})


@pytest.mark.parametrize("cls", REGISTRY, ids=lambda c: c.name)
def test_identify_names_the_algorithm_of_a_runs_config(cls):
    args = fedavg.get_args(TINY + cls.example)
    name, flags = algorithms.identify(json.loads(json.dumps(plumbing.run_config(args))))
    assert name == cls.name and flags == {f: getattr(args, f) for f in cls.flags}


# ----------------------------------------------------------------------------- neutral settings are FedAvg

@pytest.mark.parametrize("cls", [c for c in REGISTRY if c.neutral is not None], ids=lambda c: c.name)
def test_an_algorithm_at_its_neutral_setting_is_fedavg_bit_for_bit(tmp_path, no_plots, cls):
    fedavg_out = run(tmp_path, "fedavg", *cls.neutral_context)
    algo_out = run(tmp_path, "algo", *cls.neutral_context, *cls.neutral)
    assert json.loads((algo_out / "result.json").read_text())["algorithm"] == cls.name
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
        torch.device("cpu"), "off"), (x, y), phase.algo.client_term(0))
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
    opt = algorithms.REGISTRY[{"adam": "FedAdam", "yogi": "FedYogi"}[kind]](None, server_args(kind, lr, tau))
    params = [torch.tensor(x0, dtype=torch.float64)]
    for a in aggs:
        opt.server_step(params, [torch.tensor(a, dtype=torch.float64)])

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
    opt = algorithms.FedAvgM(None, server_args("sgd", 0.5, mom=0.9))
    p = [torch.tensor([0.0], dtype=torch.float64)]
    for a in (1.0, 2.0, -1.0):
        opt.server_step(p, [torch.tensor([a], dtype=torch.float64)])
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
    assert algorithms.ties_merge(d, [third] * 3, 0.6).tolist() == pytest.approx([2.0, -2.0, -3.0, 2.5, -4.0])
    # weighted by shard size: entry 0 averages 3 (weight 0.5) and 1 (0.25), entry 3 2 (0.5) and 3 (0.25)
    assert algorithms.ties_merge(d, [0.5, 0.25, 0.25], 0.6).tolist() == pytest.approx([7 / 3, -2.0, -3.0, 7 / 3, -4.0])
    # an entry whose kept values cancel exactly has no elected sign: it stays 0
    assert algorithms.ties_merge([torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 3.0])], [0.5, 0.5], 1).tolist() == [0.0, 2.5]


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
    merged = algorithms.ties_merge(deltas, weights, 0.3)
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
    """Head-only rounds on fixed features (fast, exact): 5 clients, 2 a round, 4 rounds, J = 3, momentum 0.9:
    c_i from the move divided by lr x (1 + 1.9 + 2.71), the momentum weights' sum; the unweighted mean."""
    torch.manual_seed(0)
    k, j, lr, rounds = 5, 3, 0.1, 4
    args = round_args("--k", str(k), "--c", "0.4", "--j", str(j), "--head-lr", str(lr), "--train", "head",
                      "--scaffold", "--batch-size", "8", "--momentum", "0.9")
    model = tiny_model()
    feats = torch.randn(100, model.head.in_features)
    y = torch.randint(0, 100, (100,))
    shards = list(torch.split(torch.arange(100), [10, 30, 15, 25, 20]))  # unequal: the mean is unweighted
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
        update, dc = [torch.zeros_like(t) for t in w], [torch.zeros_like(t) for t in w]
        for i in clients:
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
                new = [b - a + (g - t) / ((1 + 1.9 + 2.71) * lr) for t, g, a, b in zip(local, w, c, ci[i])]
                for u, t, g in zip(update, local, w):
                    u += (t - g) / len(clients)
                for d, n, b in zip(dc, new, ci[i]):
                    d += n - b
                ci[i] = new
        w = [g + u for g, u in zip(w, update)]
        c = [a + d / k for a, d in zip(c, dc)]

    for p, q in zip(model.head.parameters(), w):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for a, b in zip(phase.algo.c, c):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sampled = {i for r in range(rounds) for i in fedavg.sample_clients(args, r)}
    assert set(phase.algo.ci) == sampled and len(sampled) < k  # partial participation: some never sampled
    for i in sampled:
        for a, b in zip(phase.unpack(phase.algo.ci[i]), ci[i]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(float(t.abs().max()) > 0 for t in phase.algo.c)


@pytest.mark.parametrize("flags", [["--scaffold"], ["--feddyn-alpha", "0.1"]], ids=["SCAFFOLD", "FedDyn"])
def test_per_client_state_that_does_not_fit_with_a_margin_is_refused_before_writing_anything(tmp_path, monkeypatch,
                                                                                            flags):
    model = tiny_model()
    args = round_args(*SMALL[len(TINY):], *flags)
    need = algorithms.host_bytes(model, args)
    assert need == 4 * 4 * sum(p.numel() for p in model.parameters())  # K x fp32
    monkeypatch.setattr(plumbing, "host_memory_available", lambda: int(need * 1.1 + 1e9) - 1)  # just short of the margin
    with pytest.raises(plumbing.UserError, match=f"{algorithms.selected_class(args).name} \\(.*\\) keeps 4 client"):
        fedavg.main(SMALL + flags + ["--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    assert algorithms.host_bytes(model, round_args(*SMALL[len(TINY):], "--mu", "0.1")) == 0  # FedProx keeps none


def test_scaffold_memory_of_a_sparse_run_counts_only_its_trained_entries():
    model = tiny_model()
    mask = {n: torch.rand_like(p) < 0.1 for n, p in common.masked_params(model)}
    args = round_args("--k", "10", "--scaffold", "--sparse", "--mask", "m.pt")
    extra = sum(p.numel() for n, p in common.backbone_params(model) if n not in mask)
    assert algorithms.host_bytes(model, args, mask) == 10 * 4 * (sum(int(m.sum()) for m in mask.values()) + extra)


# ----------------------------------------------------------------------------- SCAFFOLD under momentum

def quadratic_distance(monkeypatch, momentum, *flags, rounds=40, k=10, d=5, j=4, lr=0.02, old_variates=False):
    """Distance to the global optimum after `rounds` of fedavg.train_round (the project's Phase, SparseSGDM and
    the algorithm's hooks) on K heterogeneous quadratics f_i(w) = 1/2 ||A_i w - b_i||^2, full-batch gradients,
    every client every round, equal shards."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(k, d, d, generator=gen, dtype=torch.float64) + 2 * torch.eye(d, dtype=torch.float64)
    b = 3 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    optimum = torch.linalg.solve(sum(m.T @ m for m in a), sum(m.T @ v for m, v in zip(a, b)))
    args = round_args("--train", "head", "--head", "zero", "--k", str(k), "--c", "1", "--j", str(j),
                      "--head-lr", str(lr), "--momentum", str(momentum), *flags)
    head = torch.nn.Module()
    head.w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    model = types.SimpleNamespace(head=head)  # what Phase reads of a model in a head-only phase
    phase = fedavg.Phase(model, args, head_only=True)
    if old_variates:
        phase.algo.scale = j * lr  # the variate as the paper writes it for plain SGD: (x - y_i) / (J lr)

    def local_steps(forward, opt, scaler, client, grad_term):
        opt.restart()
        for _ in range(j):
            head.w.grad = a[client].T @ (a[client] @ head.w.detach() - b[client])
            if grad_term:
                grad_term()
            opt.step()
        return torch.tensor(0.0)
    monkeypatch.setattr(fedavg, "client_batches", lambda x, y, shard, rnd, client, *rest: client)
    monkeypatch.setattr(fedavg, "client_update", local_steps)
    scaler = plumbing.grad_scaler(torch.device("cpu"), "off")
    for rnd in range(rounds):
        fedavg.train_round(model, phase, [torch.arange(10)] * k, None, None, rnd, args, torch.device("cpu"), scaler)
    return float((head.w.detach() - optimum).norm())


def test_scaffold_converges_on_heterogeneous_quadratics_where_fedavg_drifts_at_the_default_momentum(monkeypatch):
    momentum = fedavg.get_args(TINY).momentum
    assert momentum == 0.9
    assert quadratic_distance(monkeypatch, momentum) > 1e-2  # FedAvg: client drift
    assert quadratic_distance(monkeypatch, momentum, "--scaffold") < 1e-4
    assert quadratic_distance(monkeypatch, 0.0, "--scaffold") < 1e-4
    assert quadratic_distance(monkeypatch, momentum, "--scaffold", old_variates=True) > 1  # J lr under momentum


def test_the_momentum_weights_sum_to_j_without_momentum():
    assert algorithms.momentum_weight_sum(4, 0.0) == 4
    assert algorithms.momentum_weight_sum(3, 0.9) == pytest.approx(1 + 1.9 + 2.71)


# ----------------------------------------------------------------------------- the new aggregators

UPDATES = [torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0]),
           torch.tensor([-2.0, 1.5, -3.0, 0.1, 0.0]),
           torch.tensor([1.0, -2.0, -0.5, 3.0, 0.0]),
           torch.tensor([4.0, -0.5, 1.0, 1.0, 0.0])]


def test_coordinate_median_on_hand_computed_updates():
    # sorted per entry: [-2,1,3,4], [-2,-1,-0.5,1.5], [-3,-0.5,0.5,1], [0.1,1,2,3], [0,0,0,0]: means of the middle two
    assert algorithms.coordinate_median(UPDATES).tolist() == [2.0, -0.75, 0.0, 1.5, 0.0]
    assert algorithms.coordinate_median(UPDATES[:3]).tolist() == [1.0, -1.0, -0.5, 2.0, 0.0]  # odd: the middle one


def test_fedgma_keeps_the_mean_where_the_signs_agree_enough():
    w = [0.4, 0.3, 0.2, 0.1]
    mean = sum(wi * u for wi, u in zip(w, UPDATES)).tolist()
    # |mean sign|: (3-1)/4 = 0.5, (1-3)/4 -> 0.5, (2-2)/4 = 0, 4/4 = 1, 0 (no client moved it)
    assert algorithms.gma_mean(UPDATES, w, 0.5).tolist() == pytest.approx([mean[0], mean[1], 0.0, mean[3], 0.0])
    assert algorithms.gma_mean(UPDATES, w, 0.6).tolist() == pytest.approx([0.0, 0.0, 0.0, mean[3], 0.0])
    assert mean[2] != 0  # dropped where the clients disagree, though their mean is not 0


def test_fisher_merge_weights_each_entry_by_the_clients_fisher():
    f = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 0.0, 0.0])]
    d = [torch.tensor([1.0, 5.0, -1.0]), torch.tensor([-1.0, 7.0, 4.0])]
    w = [0.5, 0.5]
    floor = algorithms.FISHER_FLOOR * 1.0  # x the mean Fisher, (1+0+2+3+0+0)/6
    got = algorithms.fisher_merge(d, f, w).tolist()
    # entry 0: (1x1 - 3x1)/(1+3); entry 1: no curvature anywhere -> the plain mean (5+7)/2; entry 2: client 0's
    assert got == pytest.approx([-0.5, 6.0, (-(2 + floor) + 4 * floor) / (2 + 2 * floor)], rel=1e-6)
    assert algorithms.fisher_merge(d, [torch.zeros(3)] * 2, [0.25, 0.75]).tolist() == pytest.approx([-0.5, 6.5, 2.75])


def test_fisher_merge_accumulates_the_squared_gradients_of_the_clients_own_steps():
    torch.manual_seed(0)
    args = round_args("--train", "head", "--aggregate", "fisher", "--j", "3", "--head-lr", "0.1")
    model = tiny_model()
    phase = fedavg.Phase(model, args, head_only=True)
    feats, y = torch.randn(3, 8, model.head.in_features), torch.randint(0, 100, (3, 8))
    ref = copy.deepcopy(model.head)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=args.momentum)
    want = [torch.zeros_like(p) for p in ref.parameters()]
    for xb, yb in zip(feats, y):
        opt.zero_grad()
        F.cross_entropy(ref(xb), yb).backward()
        for s, p in zip(want, ref.parameters()):
            s += p.grad ** 2
        opt.step()
    for p in model.head.parameters():
        p.requires_grad_(True)
    fedavg.client_update(model.head, phase.opt, plumbing.grad_scaler(torch.device("cpu"), "off"), (feats, y),
                         phase.algo.client_term(7))
    phase.algo.client_done(7, None)
    torch.testing.assert_close(phase.algo.pending[7], phase.pack(want))


def test_feddyn_client_term_and_server_step_by_hand():
    """One trained tensor of 2 entries, K = 4, two clients a round: g_i -= alpha Δ_i, h -= alpha/K sum Δ_i,
    w += mean Δ - h/alpha; the client's gradient term alpha (w - w_global) - g_i."""
    alpha, k = 0.5, 4
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    phase = types.SimpleNamespace(params=[("w", w)], global_w=[w.detach().clone()],
                                  pack=lambda ts: ts[0].flatten(), unpack=lambda flat: [flat.view(2)])
    algo = algorithms.FedDyn(phase, argparse.Namespace(feddyn_alpha=alpha, k=k, server_lr=1.0))
    deltas = {0: torch.tensor([0.2, -0.4], dtype=torch.float64), 3: torch.tensor([0.6, 0.0], dtype=torch.float64)}
    for c, d in deltas.items():
        assert algo.client_term(c) is not None and c not in algo.g
        algo.client_done(c, d)
    assert not algo.g  # pending until the server step
    mean = (deltas[0] + deltas[3]) / 2
    algo.server_step([w], [mean])
    h = -alpha / k * (deltas[0] + deltas[3])
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -1.0], dtype=torch.float64) + mean - h / alpha)
    torch.testing.assert_close(algo.g[3], -alpha * deltas[3])
    phase.global_w[0].copy_(w.detach())
    with torch.no_grad():
        w += torch.tensor([0.1, 0.3], dtype=torch.float64)  # a client 0 step away from the new global weights
    w.grad = torch.zeros(2, dtype=torch.float64)
    algo.client_term(0)()
    torch.testing.assert_close(w.grad, alpha * torch.tensor([0.1, 0.3], dtype=torch.float64) + alpha * deltas[0])


# ----------------------------------------------------------------------------- resume and masks, every algorithm

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
    """5 clients a round: enough that a median, a sign vote or a Fisher-weighted mean differs from the mean."""
    return ["--sparse", "--mask", path, "--k", "5", "--c", "1", "--rounds", "3", "--ckpt-every", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def sparse_fedavg(tmp_path_factory, random_mask):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(plumbing, "plot_lines", lambda *a, **k: None)
        return model_of(run(tmp_path_factory.mktemp("fedavg"), "run", *sparse_flags(random_mask[0])))


@pytest.mark.parametrize("cls", [c for c in REGISTRY if c is not algorithms.FedAvg] + [algorithms.FedAvg],
                         ids=lambda c: c.name)
def test_every_algorithm_resumes_bit_for_bit_and_keeps_masked_entries(tmp_path, monkeypatch, no_plots, cls,
                                                                     random_mask, sparse_fedavg):
    path, model = random_mask
    flags = sparse_flags(path) + cls.example
    full = run(tmp_path, "full", *flags)
    assert not same_model(model_of(full), sparse_fedavg)  # the algorithm did something: not the plain mean
    real = fedavg.client_update
    count_calls(monkeypatch, fedavg, "client_update", kill_at=13)  # 5 clients a round: inside round 3
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
    assert result["algorithm"] == cls.name
    assert result["comm_values_per_client_round"] == trained * cls.uploads


def test_scaffold_state_survives_a_resume_across_the_head_warmup(tmp_path, monkeypatch, no_plots):
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


def test_a_stop_between_two_clients_saves_the_rounds_start_and_resumes_to_the_same_model(tmp_path, monkeypatch,
                                                                                         no_plots, capsys):
    """SIGTERM while round 3's second client trains (SCAFFOLD: its variates would change in the round): the run
    stops within that client's next step, its checkpoint is round 2's end with round 2's variates, and --resume
    gives the uninterrupted run's files byte for byte."""
    flags = ["--scaffold", "--rounds", "4", "--ckpt-every", "10"]
    full = run(tmp_path, "full", *flags)
    calls = count_calls(monkeypatch, fedavg, "client_update")
    real_step = common.optimizer_step
    steps = {"n": 0}

    def step(*a, **k):  # SIGTERM during the first step of round 3's second client (2 clients a round, J = 2)
        steps["n"] += 1
        if calls["n"] == 6 and steps["n"] == 11:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*a, **k)
    monkeypatch.setattr(common, "optimizer_step", step)
    monkeypatch.setattr(plumbing, "_stop_signal", None)  # undo() puts it back after the stop
    status, err = run_as_script(fedavg.main, SMALL + flags + ["--out", str(tmp_path / "cut")], capsys)
    assert status == 143 and err[-1] == ("stopped by signal 15 during round 3: checkpoint saved, continue with "
                                         "--resume"), err
    assert steps["n"] == 11  # it stopped before the client's second step
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["round"] == 2 and len(ckpt["rows"]) == 3 and not (tmp_path / "cut" / "result.json").exists()
    assert set(ckpt["algo"]["scaffold"]["ci"]) == {c for r in range(2) for c in fedavg.sample_clients(
        fedavg.get_args(SMALL + flags), r)}  # round 2's variates: none of round 3's pending ones
    monkeypatch.undo()
    fedavg.main(SMALL + flags + ["--out", str(tmp_path / "cut"), "--resume"])
    for f in ("model.pt", "metrics.csv", "head.pt"):
        assert (full / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f


def test_a_stopped_round_puts_back_the_weights_the_fp16_scale_and_the_pending_state(monkeypatch):
    """train_round alone, head-only on features, FedDyn (per-client state), an fp16 scaler that doubles its scale
    every step: a stop during the second client's steps leaves the weights, the scale and the algorithm's state
    as they were at the round's start."""
    torch.manual_seed(0)
    args = round_args("--train", "head", "--k", "3", "--c", "1", "--j", "3", "--feddyn-alpha", "0.1")
    model = tiny_model()
    phase = fedavg.Phase(model, args, head_only=True)
    feats, y = torch.randn(60, model.head.in_features), torch.randint(0, 100, (60,))
    shards = list(torch.arange(60).view(3, -1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    fedavg.train_round(model, phase, shards, feats, y, 0, args, torch.device("cpu"), scaler)  # a committed round
    start = {k: v.clone() for k, v in model.head.state_dict().items()}
    state, scale = copy.deepcopy(phase.state_dict()), scaler.get_scale()
    steps = count_calls(monkeypatch, common, "optimizer_step")
    monkeypatch.setattr(plumbing, "stop_requested", lambda: steps["n"] >= 5)  # during client 2's steps
    with pytest.raises(fedavg.RoundStopped):
        fedavg.train_round(model, phase, shards, feats, y, 1, args, torch.device("cpu"), scaler)
    assert steps["n"] == 5 and scaler.get_scale() == scale
    assert all(torch.equal(v, start[k]) for k, v in model.head.state_dict().items())
    assert not phase.algo.pending and not any(p.requires_grad for p in model.head.parameters())
    after = phase.state_dict()
    assert after["feddyn"]["g"].keys() == state["feddyn"]["g"].keys()
    assert all(torch.equal(after["feddyn"]["g"][c], state["feddyn"]["g"][c]) for c in state["feddyn"]["g"])
    assert all(torch.equal(a, b) for a, b in zip(after["feddyn"]["h"], state["feddyn"]["h"]))


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("bad,says", [(["--ties-keep", "0.5"], "--aggregate ties"),
                                      (["--server-eps", "0.1"], "FedAdam's"),
                                      (["--server-opt", "adam", "--server-momentum", "0.9"], "FedAvgM's"),
                                      (["--aggregate", "ties", "--ties-keep", "0"], "(0, 1]"),
                                      (["--gma-tau", "0.5"], "--aggregate gma"),
                                      (["--scaffold", "--lr", "0"], "--scaffold"),
                                      (["--server-opt", "adamw"], "invalid choice"),
                                      (["--mu", "-1"], "[0, 10000]"),
                                      # values that would overflow mid-run (eps ** 2, mu or lr x a weight)
                                      (["--server-opt", "adam", "--server-eps", "1e200"], "[1e-10, 1000]"),
                                      (["--mu", "1e308"], "[0, 10000]"),
                                      (["--server-lr", "1e300"], "[0, 100]"),
                                      (["--feddyn-alpha", "1e308"], "[0, 10000]"),
                                      (["--mu", "nan"], "[0, 10000]"),
                                      (["--aggregate", "gma", "--gma-tau", "0"], "(0, 1]"),
                                      # one algorithm a run
                                      (["--mu", "0.1", "--scaffold"], "FedProx (--mu > 0) and SCAFFOLD (--scaffold) "
                                                                      "do not combine"),
                                      (["--scaffold", "--server-opt", "adam"], "do not combine"),
                                      (["--aggregate", "median", "--server-momentum", "0.9"], "do not combine"),
                                      (["--feddyn-alpha", "0.1", "--server-lr", "0.5"], "FedDyn")])
def test_bad_algorithm_flags_are_one_line_errors(capsys, bad, says):
    assert says in parse_refused(fedavg.get_args, TINY + bad, capsys)


def test_no_two_algorithms_combine_and_server_lr_goes_with_all_but_feddyn(capsys):
    for a, b in itertools.combinations([c for c in REGISTRY if c is not algorithms.FedAvg], 2):
        if {"aggregate", "server_opt"} & set(a.flags) & set(b.flags):
            continue  # two values of one choice flag: the last one given wins
        parse_refused(fedavg.get_args, TINY + a.example + b.example, capsys)
    for cls in REGISTRY:
        if "server_lr" in cls.flags:
            assert algorithms.selected_class(fedavg.get_args(TINY + cls.example + ["--server-lr", "0.3"])) is cls


def test_run_names_tell_the_algorithms_apart_and_keep_their_names():
    names = {fedavg.get_args(TINY + c.example).out for c in REGISTRY} | {fedavg.get_args(TINY).out}
    assert len(names) == len(REGISTRY) + 1
    assert fedavg.get_args(TINY).out == fedavg.get_args(TINY + ["--mu", "0", "--aggregate", "mean"]).out  # defaults name nothing
    # the names runs have had (with the :g formatting, exact at these values) stay
    for flags, part in ((["--mu", "0.5"], "_mu0.5_"), (["--scaffold"], "_scaffold_"), (["--aggregate", "ties"], "_ties0.2_"),
                        (["--server-opt", "adam", "--server-lr", "0.01"], "_adam0.01_"),
                        (["--server-momentum", "0.9", "--server-lr", "0.8"], "_sgd0.8m0.9_"), (["--mu", "1e-5"], "_mu1e-05_"),
                        (["--server-opt", "yogi", "--server-eps", "0.01"], "_yogi1_synthetic_test-vit_random_px32_server-eps0.01/")):
        assert part in fedavg.get_args(TINY + flags).out, (flags, fedavg.get_args(TINY + flags).out)
    # values :g rounded to one name now name two runs (issue 35.6)
    for flag in ("--mu", "--server-lr", "--ties-keep", "--server-momentum", "--gma-tau", "--feddyn-alpha"):
        context = {"--ties-keep": ["--aggregate", "ties"], "--gma-tau": ["--aggregate", "gma"]}.get(flag, [])
        a, b = (fedavg.get_args(TINY + context + [flag, v]).out for v in ("0.1", "0.1000001"))
        assert a != b and "0.1000001" in b, flag


def test_the_gradient_term_is_added_to_unscaled_gradients_under_the_fp16_scaler():
    """With the fp16 gradient scaler on, .grad holds scale x the gradient after backward: the term must be
    added after unscaling, or it would be divided by the scale (2^10 here) at the step."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = common.SparseSGDM([w], [None], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    common.optimizer_step(opt, (w * torch.tensor([3.0, -1.0])).sum(), scaler, lambda: w.grad.add_(0.5))
    assert w.tolist() == [1.0 - 3.5, 2.0 + 0.5]
