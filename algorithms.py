"""The FL algorithms of fedavg.py: one class each, and the registry (REGISTRY) fedavg.py's round calls.

As in FL-bench an algorithm is one object with a client side and a server side, and as in Flower the
server's aggregate calls a pure function of the client updates (ties_merge, coordinate_median, gma_mean,
fisher_merge). fedavg.Phase makes one object per phase of a run (head warm-up, main rounds); fedavg.train_round
calls its hooks and names no algorithm. A class holds:

  flags, add_flags   the flags it reads (dests) and the ones it defines (argparse, with help texts)
  grid, neutral, example   its hyperparameter grid for a fair comparison (the first its default guess), flags
                     that make it FedAvg bit for bit (under `neutral_context`), or None, and flags that do something
  selected(args), how   whether a run's flags choose it, and how a user chooses it (for messages)
  tag(args)          its part of the run folder's name (exact values: plumbing.name_value)
  check(p, args)     its own refusals (one-line parser errors, exit 2, before anything is written)
  host_copies        per-client copies of the trained entries it keeps on the host (check_memory)
  uploads            values a client uploads per trained entry (1: its update)
  mean_weights(sizes)   the clients' weights in the round's mean (shard sizes, or 1/|S| where the paper says so)
  client_term(client)   a closed-form gradient term added before each SparseSGDM step (the step masks the
                     gradient after it: a masked-out entry still never moves), or None
  client_done(client, delta)   after a client's J steps (only if reads_update): its packed update Δ_i
  aggregate(deltas, weights)   a stacked aggregator's aggregate of the packed updates (else: the mean)
  server_step(params, agg)     the server's step: the only place its state changes
  state_dict/load_state_dict   its state, checkpointed by fedavg.py under the checkpoint's `algo` key

Rounds are transactional: client_term/client_done only record per-client results in `self.pending`, and
server_step commits them, so a round stopped between two clients is undone by putting the global weights
back (fedavg.train_round) and discard().

Composition: a run is one algorithm of the registry (FedAvg when no flag chooses another); --server-lr, the
server's scaling of the aggregate (task arithmetic's coefficient, SCAFFOLD's and Reddi et al.'s global rate),
goes with every algorithm whose server step is `w += lr x step(aggregate)` (all but FedDyn). So a client-side
algorithm (FedProx, SCAFFOLD, FedDyn) runs with plain server sgd, an aggregator (TIES, median, FedGMA,
Fisher) alone, a server optimizer (FedAvgM, FedAdam, FedYogi) on the plain mean; any other mix is refused.
"""
import argparse
import math

import torch

import common
import plumbing

SERVER_BETAS = (0.9, 0.99)  # FedAdam/FedYogi's beta1, beta2 (Reddi et al. 2021)
MEMORY_MARGIN = (1.1, 1e9)  # host memory a run may plan for: need x 1.1 + 1 GB must fit in what is available
FISHER_FLOOR = 1e-6  # fisher_merge: each Fisher gets this x the round's mean Fisher (no 0/0; F -> 0 is the mean)


def bounded(lo, hi, lo_open=False):
    """An argparse type: a float in [lo, hi] ((lo, hi] with lo_open). The upper bounds keep every value far
    from float32's range, so no value passes here and overflows mid-run (eps ** 2, mu x a weight)."""
    def parse(s):
        v = float(s)
        if not ((lo < v) if lo_open else (lo <= v)) or not v <= hi:
            raise argparse.ArgumentTypeError(f"must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {s}")
        return v
    return parse


def name(v):
    return plumbing.name_value(v)


def stacked_weights(weights, like):
    return torch.tensor(weights, device=like.device, dtype=like.dtype)[:, None]


# ----------------------------------------------------------------------------- pure aggregates of packed updates

def ties_merge(deltas, weights, keep):
    """TIES-merging (Yadav et al. 2023) of packed client updates (1-D, trained entries only): trim each
    to its ceil(keep * n) entries of largest magnitude (per client, over all its trained entries, as TIES
    trims a whole task vector), elect each entry's sign as that of the weighted sum of the trimmed
    updates (the side with more mass), and average, weighted, only the kept values of the elected sign
    (a disjoint mean; an entry no kept value agrees with stays 0). The weights are the shard sizes'
    (FedAvg's); with equal shards this is TIES as published. Holds all sampled clients' updates at once."""
    k = max(1, math.ceil(keep * deltas[0].numel()))
    trimmed = torch.zeros(len(deltas), deltas[0].numel(), device=deltas[0].device, dtype=deltas[0].dtype)
    for row, d in zip(trimmed, deltas):
        idx = d.abs().topk(k, sorted=False).indices
        row[idx] = d[idx]
    w = stacked_weights(weights, trimmed)
    elected = torch.sign((w * trimmed).sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    mass = (w * agree).sum(0)
    return torch.where(mass > 0, (w * trimmed * agree).sum(0) / mass.clamp_min(torch.finfo(mass.dtype).tiny), 0.0)


def coordinate_median(deltas):
    """Per entry, the median of the client updates (Yin et al. 2018), unweighted as there: the middle value,
    or the mean of the two middle ones for an even count."""
    s = torch.stack(deltas).sort(0).values
    n = len(deltas)
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def gma_mean(deltas, weights, tau):
    """FedGMA (Tenison et al. 2023): the weighted mean update, kept on the entries whose clients agree in
    sign, A = |mean_i sign(Δ_i)| >= tau (unweighted, as the paper's agreement score), and 0 elsewhere."""
    stack = torch.stack(deltas)
    agreement = torch.sign(stack).mean(0).abs()
    return torch.where(agreement >= tau, (stacked_weights(weights, stack) * stack).sum(0), 0.0)


def fisher_merge(deltas, fishers, weights):
    """Fisher-weighted mean (Matena & Raffel 2022; FedFisher, Jhunjhunwala et al. 2024): per entry
    sum_i w_i F_i Δ_i / sum_i w_i F_i, w_i the shard weights, F_i client i's diagonal Fisher. Each F_i gets
    FISHER_FLOOR x the mean of all the F's, so an entry with no curvature anywhere gets the plain weighted
    mean rather than 0/0 (and all-zero Fishers give FedAvg's mean)."""
    f = torch.stack(fishers)
    mean = f.mean()
    f = f + torch.where(mean > 0, FISHER_FLOOR * mean, 1.0)
    wf = stacked_weights(weights, f) * f
    return (wf * torch.stack(deltas)).sum(0) / wf.sum(0)


# ----------------------------------------------------------------------------- the algorithms

class FedAvg:
    """FedAvg (McMahan et al. 2017): the clients' mean update weighted by shard size, w += lr x mean;
    the base of every other algorithm (each overrides what it changes)."""
    name = "FedAvg"
    flags = ["server_lr"]
    how = "no algorithm flag"
    grid = [[], ["--server-lr", "2"]]
    neutral, neutral_context = ["--server-lr", "1", "--server-opt", "sgd", "--aggregate", "mean"], []
    example = ["--server-lr", "0.5"]
    host_copies, uploads = 0, 1
    reads_update = stacked = False

    @staticmethod
    def add_flags(g):
        """Its own flags (the shared ones, --aggregate, --server-opt, --server-lr, are add_flags's below)."""

    @staticmethod
    def selected(args):
        return False  # chosen when no other is (selected_class)

    @classmethod
    def tag(cls, args):
        return cls.own_tag(args) + server_tag(args)

    @staticmethod
    def own_tag(args):
        return ""

    @staticmethod
    def check(p, args):
        pass

    def __init__(self, phase, args):
        self.phase, self.args, self.lr = phase, args, args.server_lr
        self.pending = {}  # client -> what it left this round, committed by server_step

    def mean_weights(self, sizes):
        return [s / sum(sizes) for s in sizes]

    def client_term(self, client):
        return None

    def client_done(self, client, delta):
        pass

    def aggregate(self, deltas, weights):
        raise NotImplementedError  # only stacked aggregators have one; the others take the streaming mean

    def discard(self):
        """Forget the round's pending results (a round stopped between clients)."""
        self.pending = {}

    @torch.no_grad()
    def server_step(self, params, agg):
        torch._foreach_add_(params, agg, alpha=self.lr)

    def state_dict(self):
        return {}

    def load_state_dict(self, state, device):
        pass


class UniformMean(FedAvg):
    """An algorithm whose paper averages the sampled clients' updates with 1/|S| (SCAFFOLD, FedAdam, FedYogi,
    FedDyn), not by shard size (the same with equal shards)."""

    def mean_weights(self, sizes):
        return [1 / len(sizes)] * len(sizes)


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): (mu/2)||w - w_global||^2 on every client's objective, as the gradient term
    mu (w - w_global)."""
    name, flags, how = "FedProx", ["mu", "server_lr"], "--mu > 0"
    grid = [["--mu", "0.01"], ["--mu", "0.1"], ["--mu", "1"]]
    neutral, neutral_context = ["--mu", "0.5"], ["--j", "1"]  # J = 1: the only step is at w_global, term 0
    example = ["--mu", "0.5"]

    @staticmethod
    def add_flags(g):
        g.add_argument("--mu", type=bounded(0, 1e4), default=0.0,
                       help="FedProx: the proximal term (mu/2)||w - w_global||^2 on every client's objective")

    @staticmethod
    def selected(args):
        return args.mu > 0

    @staticmethod
    def own_tag(args):
        return f"_mu{name(args.mu)}"

    def client_term(self, client):
        params, global_w, mu = [p for _, p in self.phase.params], self.phase.global_w, self.args.mu

        def add():
            torch._foreach_add_([p.grad for p in params], torch._foreach_sub(params, global_w), alpha=mu)
        return add


def momentum_weight_sum(steps, momentum):
    """S = sum over the J steps t of sum_{s<=t} b^(t-s): with SGD momentum b (buffer m = b m + g, from m = 0)
    J steps of rate lr move w by lr x sum_t m_t = lr x sum_s (sum_{t>=s} b^(t-s)) g_s, so S lr is the move
    per unit of a constant gradient. J at b = 0."""
    total, m = 0.0, 0.0
    for _ in range(steps):
        m = momentum * m + 1
        total += m
    return total


class SCAFFOLD(UniformMean):
    """SCAFFOLD (Karimireddy et al. 2020, option II): the server's c (shaped like the trained params, on the
    device) and each client's c_i (a packed 1-D tensor of the trained entries, on the host; a client not yet
    sampled holds c_i = 0 and costs nothing). A client's gradient is corrected by c - c_i; after its J steps
    at rate lr and momentum b, c_i+ = c_i - c + (w_global - w_i)/(S lr), S = momentum_weight_sum(J, b) (the
    paper's J lr assumes plain SGD steps: S = J at b = 0; under momentum b = 0.9 the move is about 2.3x
    that at J = 4, and dividing by J lr made c_i overshoot and SCAFFOLD diverge). The server adds the
    unweighted mean update (the paper's 1/|S|) and (|S|/K) mean_i(c_i+ - c_i) = sum_i(c_i+ - c_i)/K to c.
    Entries no client trains are 0 in c and c_i from the start and stay 0 (there w_i = w_global)."""
    name, flags, how = "SCAFFOLD", ["scaffold", "server_lr"], "--scaffold"
    grid = [["--scaffold"], ["--scaffold", "--server-lr", "2"]]
    # one round, one client: c = c_i = 0, so the correction is 0 and the mean of one update is that update
    neutral, neutral_context = ["--scaffold"], ["--rounds", "1", "--c", "0.25"]
    example = ["--scaffold"]
    host_copies, uploads, reads_update = 1, 2, True  # c_i on the host; each client uploads Δ_i and Δc_i

    @staticmethod
    def add_flags(g):
        g.add_argument("--scaffold", action="store_true",
                       help="SCAFFOLD (option II control variates): each client's gradient corrected by c - c_i, "
                            "c_i from the client's move divided by lr x the sum of its J steps' momentum weights "
                            "(J without momentum); K client variates of the trained entries on the host "
                            "(refused if they do not fit)")

    @staticmethod
    def selected(args):
        return args.scaffold

    @staticmethod
    def own_tag(args):
        return "_scaffold"

    @staticmethod
    def check(p, args):
        if not (args.lr > 0 and args.head_lr > 0):
            p.error("--scaffold divides a client's update by its learning rate: give --lr and --head-lr above 0")

    def __init__(self, phase, args):
        super().__init__(phase, args)
        group = phase.opt.param_groups[0]
        self.k, self.scale = args.k, momentum_weight_sum(args.j, group["momentum"]) * group["lr"]
        self.c = [torch.zeros_like(g) for g in phase.global_w]
        self.ci = {}

    def client_term(self, client):
        if not self.ci:
            return None  # no round committed yet: c = c_i = 0, nothing to add
        corr = self.c if client not in self.ci else \
            torch._foreach_sub(self.c, self.phase.unpack(self.ci[client].to(self.c[0].device)))
        params = [p for _, p in self.phase.params]

        def add():
            torch._foreach_add_([p.grad for p in params], corr)
        return add

    def client_done(self, client, delta):
        old = self.ci[client].to(delta.device) if client in self.ci else torch.zeros_like(delta)
        self.pending[client] = (old - self.phase.pack(self.c) - delta / self.scale).cpu()

    @torch.no_grad()
    def server_step(self, params, agg):
        super().server_step(params, agg)
        dc = sum(new - self.ci[client] if client in self.ci else new for client, new in self.pending.items())
        torch._foreach_add_(self.c, self.phase.unpack(dc.to(self.c[0].device) / self.k))
        self.ci.update(self.pending)
        self.pending = {}

    def state_dict(self):
        return {"scaffold": {"c": [t.cpu() for t in self.c], "ci": dict(self.ci)}}

    def load_state_dict(self, state, device):
        self.c = [t.to(device) for t in state["scaffold"]["c"]]
        self.ci = dict(state["scaffold"]["ci"])


class FedDyn(UniformMean):
    """FedDyn (Acar et al. 2021): client i minimizes L_i(w) - <g_i, w> + (alpha/2)||w - w_global||^2 (the
    gradient term alpha (w - w_global) - g_i), then g_i -= alpha Δ_i (g_i a packed host tensor per client,
    0 until sampled); the server keeps h: h -= alpha (1/K) sum_{i in S} Δ_i, and sets w = mean_i(w_i) - h/alpha,
    i.e. w += mean(Δ) - h/alpha (the unweighted mean of the paper). On a masked-out entry Δ_i = 0, so g_i and
    h stay 0 and the entry never moves."""
    name, flags, how = "FedDyn", ["feddyn_alpha"], "--feddyn-alpha > 0"
    grid = [["--feddyn-alpha", "0.01"], ["--feddyn-alpha", "0.1"], ["--feddyn-alpha", "0.001"]]
    neutral, example = None, ["--feddyn-alpha", "0.1"]
    host_copies, reads_update = 1, True

    @staticmethod
    def add_flags(g):
        g.add_argument("--feddyn-alpha", type=bounded(0, 1e4), default=0.0,
                       help="FedDyn: alpha of the dynamic regularizer -<g_i, w> + (alpha/2)||w - w_global||^2 "
                            "(0: off); K client states g_i of the trained entries on the host")

    @staticmethod
    def selected(args):
        return args.feddyn_alpha > 0

    @staticmethod
    def own_tag(args):
        return f"_feddyn{name(args.feddyn_alpha)}"

    def __init__(self, phase, args):
        super().__init__(phase, args)
        self.alpha, self.k = args.feddyn_alpha, args.k
        self.h = [torch.zeros_like(g) for g in phase.global_w]
        self.g = {}

    def client_term(self, client):
        params, global_w, alpha = [p for _, p in self.phase.params], self.phase.global_w, self.alpha
        gi = self.phase.unpack(self.g[client].to(global_w[0].device)) if client in self.g else None

        def add():
            grads = [p.grad for p in params]
            torch._foreach_add_(grads, torch._foreach_sub(params, global_w), alpha=alpha)
            if gi is not None:
                torch._foreach_sub_(grads, gi)
        return add

    def client_done(self, client, delta):
        old = self.g[client].to(delta.device) if client in self.g else torch.zeros_like(delta)
        self.pending[client] = (old - self.alpha * delta).cpu()

    @torch.no_grad()
    def server_step(self, params, agg):
        # sum_{i in S} Δ_i = |S| x the unweighted mean
        torch._foreach_add_(self.h, agg, alpha=-self.alpha * len(self.pending) / self.k)
        torch._foreach_add_(params, agg)
        torch._foreach_add_(params, self.h, alpha=-1 / self.alpha)
        self.g.update(self.pending)
        self.pending = {}

    def state_dict(self):
        return {"feddyn": {"h": [t.cpu() for t in self.h], "g": dict(self.g)}}

    def load_state_dict(self, state, device):
        self.h = [t.to(device) for t in state["feddyn"]["h"]]
        self.g = dict(state["feddyn"]["g"])


class FedAvgM(FedAvg):
    """FedAvgM (Hsu et al. 2019): server momentum on the shard-weighted mean Δ, m = b m + Δ (from m = 0),
    w += lr m. An entry no client moved has Δ = 0 every round, so m = 0 there and it keeps its bits."""
    name, flags, how = "FedAvgM", ["server_momentum", "server_lr"], "--server-momentum > 0"
    grid = [["--server-momentum", "0.9", "--server-lr", "0.1"], ["--server-momentum", "0.9", "--server-lr", "0.3"],
            ["--server-momentum", "0.5", "--server-lr", "0.5"]]
    neutral, neutral_context = ["--server-momentum", "0.9"], ["--rounds", "1"]  # m starts at 0: m = Δ once
    example = ["--server-momentum", "0.9", "--server-lr", "0.8"]

    @staticmethod
    def add_flags(g):
        g.add_argument("--server-momentum", type=plumbing.unit_float, default=0.0,
                       help="--server-opt sgd: momentum on the aggregate (FedAvgM)")

    @staticmethod
    def selected(args):
        return args.server_opt == "sgd" and args.server_momentum > 0

    def __init__(self, phase, args):
        super().__init__(phase, args)
        self.m = self.v = None  # made at the first step, shaped like the aggregate

    @torch.no_grad()
    def server_step(self, params, agg):
        if self.m is None:
            self.m = [torch.zeros_like(a) for a in agg]
        torch._foreach_mul_(self.m, self.args.server_momentum)
        torch._foreach_add_(self.m, agg)
        torch._foreach_add_(params, self.m, alpha=self.lr)

    def state_dict(self):
        return {"server": {"m": [t.cpu() for t in self.m] if self.m else None,
                           "v": [t.cpu() for t in self.v] if self.v else None}}

    def load_state_dict(self, state, device):
        self.m = [t.to(device) for t in state["server"]["m"]] if state["server"]["m"] else None
        self.v = [t.to(device) for t in state["server"]["v"]] if state["server"]["v"] else None


class FedAdam(UniformMean, FedAvgM):
    """FedAdam (Reddi et al. 2021, Algorithm 2, no bias correction) on the unweighted mean Δ (the paper's
    1/|S|): m = b1 m + (1-b1)Δ from m = 0; v from tau^2 (the paper's v_{-1} >= tau^2), v = b2 v + (1-b2)Δ^2;
    w += lr m / (sqrt(v) + tau). An entry no client moved has m = 0, so its step is exactly 0 there."""
    name, flags, how = "FedAdam", ["server_opt", "server_lr", "server_eps"], "--server-opt adam"
    grid = [["--server-opt", "adam", "--server-lr", "0.01"], ["--server-opt", "adam", "--server-lr", "0.001"],
            ["--server-opt", "adam", "--server-lr", "0.1"]]
    neutral, example = None, ["--server-opt", "adam", "--server-lr", "0.01"]
    kind = "adam"

    @staticmethod
    def add_flags(g):
        g.add_argument("--server-eps", type=bounded(1e-10, 1e3), default=1e-3,
                       help="--server-opt adam/yogi: tau, the adaptivity floor added to sqrt(v)")

    @classmethod
    def selected(cls, args):
        return args.server_opt == cls.kind

    @torch.no_grad()
    def server_step(self, params, agg):
        eps, (b1, b2) = self.args.server_eps, SERVER_BETAS
        if self.m is None:
            self.m = [torch.zeros_like(a) for a in agg]
            self.v = [torch.full_like(a, eps ** 2) for a in agg]
        torch._foreach_mul_(self.m, b1)
        torch._foreach_add_(self.m, agg, alpha=1 - b1)
        self.second_moment(torch._foreach_mul(agg, agg), b2)
        denom = torch._foreach_add(torch._foreach_sqrt(self.v), eps)
        torch._foreach_addcdiv_(params, self.m, denom, value=self.lr)

    def second_moment(self, sq, b2):
        torch._foreach_mul_(self.v, b2)
        torch._foreach_add_(self.v, sq, alpha=1 - b2)


class FedYogi(FedAdam):
    """FedYogi (Reddi et al. 2021): FedAdam with v = v - (1-b2) Δ^2 sign(v - Δ^2)."""
    name, how, kind = "FedYogi", "--server-opt yogi", "yogi"
    grid = [[f.replace("adam", "yogi") for f in flags] for flags in FedAdam.grid]
    example = ["--server-opt", "yogi", "--server-lr", "0.01"]

    @staticmethod
    def add_flags(g):
        pass  # --server-eps is FedAdam's, shared

    def second_moment(self, sq, b2):
        sign = [torch.sign(v - s) for v, s in zip(self.v, sq)]
        torch._foreach_sub_(self.v, torch._foreach_mul(sq, sign), alpha=1 - b2)


class Aggregator(FedAvg):
    """A server aggregate other than the mean: the round keeps every sampled client's packed update and
    hands them to aggregate(), a pure function (memory: the sampled clients' updates at once)."""
    reads_update = stacked = True
    choice = None  # its --aggregate value
    says = None  # what it is, in --aggregate's help

    @classmethod
    def selected(cls, args):
        return args.aggregate == cls.choice


class TIES(Aggregator):
    __doc__ = ties_merge.__doc__
    name, flags, how, choice = "TIES", ["aggregate", "ties_keep", "server_lr"], "--aggregate ties", "ties"
    says = "TIES-merging (trim each to its top --ties-keep, elect signs, disjoint mean)"
    grid = [["--aggregate", "ties"], ["--aggregate", "ties", "--ties-keep", "0.1"],
            ["--aggregate", "ties", "--ties-keep", "0.5"]]
    # one client a round, nothing trimmed: TIES of one update is that update
    neutral, neutral_context = ["--aggregate", "ties", "--ties-keep", "1"], ["--c", "0.25"]
    example = ["--aggregate", "ties"]

    @staticmethod
    def add_flags(g):
        g.add_argument("--ties-keep", type=plumbing.positive_unit_float, default=0.2,
                       help="--aggregate ties: fraction of each client update's trained entries kept (largest |value|)")

    @staticmethod
    def own_tag(args):
        return f"_ties{name(args.ties_keep)}"

    def aggregate(self, deltas, weights):
        return ties_merge(deltas, weights, self.args.ties_keep)


class Median(Aggregator):
    __doc__ = coordinate_median.__doc__
    name, flags, how, choice = "Median", ["aggregate", "server_lr"], "--aggregate median", "median"
    says = "the coordinate-wise median"
    grid = [["--aggregate", "median"], ["--aggregate", "median", "--server-lr", "0.5"]]
    neutral, neutral_context = ["--aggregate", "median"], ["--c", "0.25"]  # the median of one update
    example = ["--aggregate", "median"]

    @staticmethod
    def own_tag(args):
        return "_median"

    def aggregate(self, deltas, weights):
        return coordinate_median(deltas)


class FedGMA(Aggregator):
    __doc__ = gma_mean.__doc__
    name, flags, how, choice = "FedGMA", ["aggregate", "gma_tau", "server_lr"], "--aggregate gma", "gma"
    says = "FedGMA's sign-agreement masked mean (--gma-tau)"
    grid = [["--aggregate", "gma"], ["--aggregate", "gma", "--gma-tau", "0.2"],
            ["--aggregate", "gma", "--gma-tau", "0.6"]]
    neutral, neutral_context = ["--aggregate", "gma"], ["--c", "0.25"]  # one client agrees with itself: A = 1
    example = ["--aggregate", "gma"]

    @staticmethod
    def add_flags(g):
        g.add_argument("--gma-tau", type=bounded(0, 1, lo_open=True), default=0.4,
                       help="--aggregate gma: keep an entry's mean update where |mean of the clients' signs| >= TAU")

    @staticmethod
    def own_tag(args):
        return f"_gma{name(args.gma_tau)}"

    def aggregate(self, deltas, weights):
        return gma_mean(deltas, weights, self.args.gma_tau)


class FisherMerge(Aggregator):
    """Fisher-weighted mean of the client updates (fisher_merge). F_i is the client's empirical Fisher from
    its own J local steps at no extra pass: the sum of the squared mini-batch gradients of its loss (before
    weight decay and masking), accumulated during training. Squares of batch means, not of per-sample
    gradients: a coarser, cheaper estimate than Matena & Raffel's per-example Fisher at the final weights.
    Each client uploads F_i with Δ_i (twice FedAvg's values)."""
    name, flags, how, choice = "FisherMerge", ["aggregate", "server_lr"], "--aggregate fisher", "fisher"
    says = "the Fisher-weighted mean (each client's squared gradients of its J steps)"
    # unlike the mean, it does not shrink an update only one client makes: a server rate below 1 stands in
    grid = [["--aggregate", "fisher"], ["--aggregate", "fisher", "--server-lr", "0.2"],
            ["--aggregate", "fisher", "--server-lr", "0.5"]]
    neutral, example = None, ["--aggregate", "fisher"]  # one client: F Δ / F is Δ only to rounding
    uploads = 2

    @staticmethod
    def own_tag(args):
        return "_fisher"

    def __init__(self, phase, args):
        super().__init__(phase, args)
        self.sq = [torch.zeros_like(g) for g in phase.global_w]

    def client_term(self, client):
        params, sq = [p for _, p in self.phase.params], self.sq
        torch._foreach_zero_(sq)

        def add():  # reads the loss's gradients, adds nothing
            grads = [p.grad for p in params]
            torch._foreach_addcmul_(sq, grads, grads)
        return add

    def client_done(self, client, delta):
        # a skipped fp16 step's inf/nan squares count as nothing
        self.pending[client] = torch.nan_to_num(self.phase.pack(self.sq), nan=0.0, posinf=0.0)

    def aggregate(self, deltas, weights):
        return fisher_merge(deltas, list(self.pending.values()), weights)

    def server_step(self, params, agg):
        super().server_step(params, agg)
        self.pending = {}


REGISTRY = {cls.name: cls for cls in (FedAvg, FedProx, SCAFFOLD, FedDyn, FedAvgM, FedAdam, FedYogi,
                                      TIES, Median, FedGMA, FisherMerge)}
AGGREGATORS = [cls for cls in REGISTRY.values() if issubclass(cls, Aggregator)]
ADAPTIVE = [FedAdam, FedYogi]
FLAGS = sorted({f for cls in REGISTRY.values() for f in cls.flags})  # every algorithm flag (dests)
# The flags tag() names; the others (--server-eps) plumbing.run_name names in its short form, as runs always were
TAGGED = set(FLAGS) - {"server_eps"}


# ----------------------------------------------------------------------------- the seam's flags and choice

def aggregate_help():
    """--aggregate's help: the mean, then each Aggregator's `says`."""
    says = [c.says for c in AGGREGATORS]
    return (f"the server's aggregate of the client updates: their mean weighted by shard size (FedAvg), "
            f"{', '.join(says[:-1])}, or {says[-1]}")


def add_flags(p):
    """The "FL algorithms" group of fedavg.py: the shared choices (--aggregate, --server-opt, --server-lr)
    and each class's own flags."""
    g = p.add_argument_group("FL algorithms (docs/extending.md; every default is FedAvg; one algorithm a run)")
    g.add_argument("--aggregate", choices=["mean"] + [c.choice for c in AGGREGATORS], default="mean",
                   help=aggregate_help())
    g.add_argument("--server-opt", choices=["sgd"] + [c.kind for c in ADAPTIVE], default="sgd",
                   help="the server's optimizer on the aggregate (a task vector): sgd (FedAvg, FedAvgM with "
                        f"--server-momentum), adam or yogi (FedAdam/FedYogi, betas {SERVER_BETAS[0]}, "
                        f"{SERVER_BETAS[1]}, on the unweighted mean as Reddi et al.)")
    g.add_argument("--server-lr", type=bounded(0, 100), default=1.0,
                   help="the server's learning rate: task arithmetic's scaling coefficient of the aggregate "
                        "(every algorithm but FedDyn)")
    for cls in REGISTRY.values():
        cls.add_flags(g)


def selected_classes(args):
    return [cls for cls in REGISTRY.values() if cls.selected(args)]


def selected_class(args):
    """The run's algorithm (FedAvg when no flag chooses another); check_flags made sure it is one."""
    chosen = selected_classes(args)
    return chosen[0] if chosen else FedAvg


def check_flags(p, args):
    """One algorithm a run, no flag another algorithm would read, and the algorithm's own refusals."""
    chosen = selected_classes(args)
    if len(chosen) > 1:
        p.error(f"{' and '.join(f'{c.name} ({c.how})' for c in chosen)} do not combine: a run is one FL "
                f"algorithm (with --server-lr where it takes one, docs/extending.md); choose one")
    cls = chosen[0] if chosen else FedAvg
    for flag in FLAGS:
        if flag not in cls.flags:
            owners = [f"{c.name}'s ({c.how})" for c in REGISTRY.values() if flag in c.flags]
            whose = f"it is {' and '.join(owners)}, and " if len(owners) <= 2 else ""
            plumbing.refuse_ignored(p, args, [flag], f"{whose}this run is {cls.name} ({cls.how}), which does not "
                                                     f"read it")
    cls.check(p, args)


def server_tag(args):
    """The name part of the server's step, as runs have been named: _OPTLR, plus mMOMENTUM, when not sgd at lr 1."""
    if args.server_opt == "sgd" and args.server_lr == 1 and not args.server_momentum:
        return ""
    return f"_{args.server_opt}{name(args.server_lr)}" + (f"m{name(args.server_momentum)}" if args.server_momentum else "")


def tag(args):
    """The run name's part for the algorithm ('' for FedAvg at its defaults)."""
    return selected_class(args).tag(args)


def make(phase, args):
    return selected_class(args)(phase, args)


def defaults():
    p = argparse.ArgumentParser(add_help=False)
    add_flags(p)
    return vars(p.parse_args([]))


def identify(cfg):
    """A run's config.json dict -> (algorithm name, {flag: value} of that algorithm's flags). A flag the
    config lacks (a run older than the flag) is at its default. A run from before one algorithm a run was
    enforced may have chosen several: their names joined by '+', their flags together."""
    d = defaults()
    args = argparse.Namespace(**{k: cfg.get(k, v) for k, v in d.items()})
    chosen = selected_classes(args) or [FedAvg]
    return "+".join(c.name for c in chosen), {f: getattr(args, f) for c in chosen for f in c.flags}


# ----------------------------------------------------------------------------- host memory

def trained_entries(model, args, mask=None):
    """(entries, bytes per entry) the clients train in the main rounds: the head with --train head; every
    weight dense; with --sparse the backbone's masked-in entries (`mask`'s count or, before calibration, the
    (1 - sparsity) share the rule keeps) plus cls_token and pos_embed."""
    if args.train == "head":
        params = list(model.head.parameters())
        n = sum(p.numel() for p in params)
    elif not args.sparse:
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
    else:
        params = [p for _, p in common.backbone_params(model)]
        masked = {n for n, _ in common.masked_params(model)}
        n = sum(p.numel() for name_, p in common.backbone_params(model) if name_ not in masked)
        n += (sum(int(m.sum()) for m in mask.values()) if mask is not None else
              math.ceil((1 - args.sparsity) * sum(p.numel() for _, p in common.masked_params(model))))
    return n, params[0].element_size()


def host_bytes(model, args, mask=None):
    """Bytes the run's algorithm keeps on the host: its per-client copies of the trained entries, K of each."""
    n, size = trained_entries(model, args, mask)
    return selected_class(args).host_copies * args.k * n * size


def check_memory(model, args, mask=None):
    """Refuse, before anything is written, a run whose per-client state (SCAFFOLD's c_i, FedDyn's g_i, on the
    host) would not fit, with a margin, in the host memory available now."""
    cls, need = selected_class(args), host_bytes(model, args, mask)
    free = plumbing.host_memory_available()
    if need and need * MEMORY_MARGIN[0] + MEMORY_MARGIN[1] > free:
        raise plumbing.UserError(f"{cls.name} ({cls.how}) keeps {args.k} client states, {need / 1e9:.1f} GB (plus "
                                 f"10% and 1 GB to spare), and the host has {free / 1e9:.1f} GB available: use fewer "
                                 f"clients (--k), --sparse, or a bigger machine")
