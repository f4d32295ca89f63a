"""Federated Averaging (McMahan et al. 2017) of the DINO ViT-S/16 classifier, simulated on one device.

K clients hold disjoint shards of the training set (splits.py: IID, Nc, Dirichlet). Every round the server
samples ceil(C*K) clients; each starts from the global model, takes J SGD-momentum steps on its own
shard, and the server adds the average of the client updates (client - global, weighted by shard size)
to the global model. Clients train one after another in the same model, so 100 clients never mean 100
model copies.

--sparse runs the spec's three steps federatedly: step 0 a classifier head (--head; default: ridge
regression from the clients' sufficient statistics, one round), frozen from then on; step 1 a gradient
mask calibrated from the clients' summed Fisher scores (or --mask); step 2 FedAvg rounds in which the
clients update only masked-in backbone entries with SparseSGDM. Example:
    python fedavg.py --nc 5 --j 8 --sparse
"""
import dataclasses
import math
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F

import algorithms
import common
import plumbing
import splits


def get_args(argv=None):
    shared = [plumbing.base_parser(common.DEFAULT_ARCH),
              common.edit_parser()]
    p = plumbing.Parser(parents=shared, description=__doc__.split("\n")[0],
                        example="python fedavg.py --nc 5 --j 8 --sparse   # sparse FedAvg, 5 classes per client")
    p.set_defaults(batch_size=64)
    g = p.add_argument_group("federation")
    g.add_argument("--k", type=plumbing.positive_int, default=100, help="number of clients")
    g.add_argument("--c", type=float, default=0.1, help="fraction of clients sampled per round, in (0, 1]")
    g.add_argument("--j", type=plumbing.positive_int, default=4,
                   help="local steps (optimizer steps) per client per round")
    g.add_argument("--rounds", type=plumbing.positive_int, default=300, help="communication rounds")
    g.add_argument("--scale-rounds", action="store_true",
                   help="--rounds is the count for J=4; run rounds*4/J so total local work is equal across J")
    splits.add_flags(g)  # --iid, --nc, --dirichlet, --min-shard
    g.add_argument("--eval-every", type=plumbing.positive_int, default=20,
                   help="validation accuracy of the global model every N rounds (curves, rounds to target)")
    g.add_argument("--test-every", type=plumbing.positive_int, default=300,
                   help="test accuracy every N rounds, and always after the last round")
    g.add_argument("--ckpt-every", type=plumbing.positive_int, default=5, help="checkpoint every N rounds")
    g = p.add_argument_group("local training")
    g.add_argument("--lr", type=plumbing.rate, default=1e-4,
                   help="client learning rate of rounds that train the backbone (dense or --sparse), constant "
                        "(docs/flags.md: why this low)")
    g.add_argument("--head-lr", type=plumbing.rate, default=0.1,
                   help="client learning rate of head-only rounds (--head warmup's warm-up, --train head)")
    g.add_argument("--momentum", type=plumbing.unit_float, default=0.9,
                   help="client momentum; a fresh buffer for every client and round")
    g.add_argument("--wd", type=plumbing.rate, default=0.0, help="client weight decay")
    g.add_argument("--train", choices=["all", "head"], default="all",
                   help="what dense clients train: the whole model, or only the head on the frozen backbone "
                        "(then on cached clean features)")
    g.add_argument("--warmup-rounds", type=plumbing.nonneg_int, default=20,
                   help="with --head warmup: head-only rounds (on cached clean features) before the main rounds")
    g.add_argument("--no-aug", action="store_true", help="no random crop / flip on the clients")
    g = p.add_argument_group("sparse FedAvg")
    g.add_argument("--sparse", action="store_true",
                   help="frozen head; clients update only masked-in backbone entries with SparseSGDM")
    g.add_argument("--mask", type=plumbing.path, default=None,
                   help="mask.pt from model_editing.py; without it the mask is calibrated federatedly")
    algorithms.add_flags(p)
    args = p.parse_args(argv)
    algorithms.check_flags(p, args)
    if not 0 < args.c <= 1:
        p.error(f"--c must be in (0, 1], got {args.c}")
    if args.k * args.c < 1:
        p.error(f"--k {args.k} x --c {args.c} < 1: no client would be sampled")
    splits.check_flags(p, args)
    if args.mask and not args.sparse:
        p.error("--mask needs --sparse")
    if args.sparse and args.train == "head":
        p.error("--sparse fine-tunes the backbone under a frozen head; it cannot go with --train head")
    common.check_head_flags(p, args)
    if args.sparse and args.head in common.FRESH_HEADS:
        p.error(f"--sparse freezes the head, and a frozen --head {args.head} would stay a fresh head (a zero head "
                f"passes the backbone no gradient at all): use ridge, warmup or a head.pt")
    if args.head == "warmup" and args.warmup_rounds < 1:
        p.error("--head warmup needs --warmup-rounds >= 1")
    if args.head != "warmup":
        plumbing.refuse_ignored(p, args, ["warmup_rounds"], f"head-only rounds are --head warmup's, not --head {args.head}'s")
    if args.head != "warmup" and args.train != "head":
        plumbing.refuse_ignored(p, args, ["head_lr"], "it is the rate of head-only rounds (--head warmup's "
                                "warm-up, --train head), and this run has none")
    if args.train == "head":
        plumbing.refuse_ignored(p, args, ["lr"], "every round of --train head is head-only, at --head-lr")
    if not args.sparse:
        plumbing.refuse_ignored(p, args, common.CALIBRATION_FLAGS, "they make the mask of --sparse")
    elif args.mask:
        plumbing.refuse_ignored(p, args, common.CALIBRATION_FLAGS, "--mask gives the mask, nothing is calibrated")
    if args.scale_rounds and args.rounds * 4 % args.j:
        p.error(f"--scale-rounds: {args.rounds} rounds x 4 / J={args.j} is not a whole number of rounds, so local "
                f"work would not be equal across J; choose --rounds a multiple of {args.j // math.gcd(args.j, 4)}")
    plumbing.check_base_flags(p, args)
    if args.head != "warmup":
        args.warmup_rounds = 0  # only --head warmup has head-only rounds
    args.split = splits.of_args(args).name  # the one value every use reads
    args.iid = args.split == "iid"  # kept in config.json as older runs recorded it (a resume compares it)
    if args.scale_rounds:
        args.rounds = scaled_rounds(args.rounds, args.j)
    named = NAMED_FLAGS | ({"head"} if args.head in common.FRESH_HEADS else set())
    args.out = args.out or plumbing.run_name(args, "fedavg", run_core(args), named)
    return args


# The flags run_core names; plumbing.run_name adds every other one not at its default
# (and --head when it is a fresh head: run_core says _from-zero); algorithms.tag names the FL algorithm's flags
NAMED_FLAGS = {*splits.NAME_FLAGS, "j", "train", "sparse", "mask", "rule", "sparsity", "calib_rounds",
               "rounds", "scale_rounds", "ridge_views"} | algorithms.TAGGED


def scaled_rounds(rounds, j):
    """--scale-rounds: rounds*4/J, so total local work is that of `rounds` rounds at J=4."""
    return max(1, round(rounds * 4 / j))


def run_core(args):
    """The readable part of a FedAvg run's name: split, J, what trains, and the rounds run when they are not
    the default's at this J with --scale-rounds (300*4/J), e.g. nc5_j4_sparse-least-sensitive_s0.9_r4 or
    iid_j8_dense_R300. So the study's runs (--scale-rounds) keep their names, and --scale-rounds needs no
    word of its own: the rounds run are named (a --j 4 run is the same with and without it)."""
    kind = "head" if args.train == "head" else "dense"
    if args.sparse:
        kind = (f"sparse-mask-{plumbing.file_tag(args.mask)}" if args.mask
                else f"sparse-{args.rule}_s{args.sparsity}_r{args.calib_rounds}")
    if args.head in common.FRESH_HEADS:  # the baseline where FedAvg learns the head: not the ridge head's run
        kind += f"_from-{args.head}"
    kind += common.ridge_views_tag(args)
    rounds = "" if args.rounds == scaled_rounds(args.defaults["rounds"], args.j) else f"_R{args.rounds}"
    return f"{args.split}_j{args.j}_{kind}{algorithms.tag(args)}{rounds}"


# ----------------------------------------------------------------------------- step 0: the head (federated ridge)

def federated_ridge(head, shards, feats, views=None):
    """Each client sends the ridge statistics of its own images (Σφφᵀ, Σφyᵀ, count; features of the
    shared frozen backbone), the server adds them up and solves once: exactly the ridge solution on the
    union of the clients' data, in one round, no image pooled. The server picks lambda on the validation
    split, which it also uses to evaluate the global model. views (V×N×D, --ridge-views): augmented
    views of the training images, each client adding those of its own images (a client crops its own;
    drawn here once over the training set, which gives every image the same crops as the centralized
    ridge head and the same distribution as per-client drawing)."""
    f, y = feats["train"]
    stats = None
    for shard in shards:
        plumbing.stop_here("the federated ridge head")
        s = common.ridge_stats(f[shard], y[shard], None if views is None else views[:, shard])
        stats = s if stats is None else tuple(a + b for a, b in zip(stats, s))
    return common.ridge_head(head, stats, *feats["val"])


# ----------------------------------------------------------------------------- step 1: federated mask calibration

def federated_mask(model, shards, x, calib, seed, img_size, device):
    """Calibrate the mask (common.calibrate, as `calib` says) without pooling data: in every calibration round
    each of the K clients scores ceil(fisher_batches * fisher_batch_size / K) of its own images (squared
    per-sample gradients, labels sampled from the model) and sends the per-entry sums and its count; the server
    adds them up and divides by the total count: the Fisher over the union of the scored images.
    Simulated in shared batches: per-sample terms do not depend on their batch-mates (eval mode,
    labels from per-sample uniforms), so the sums are those of per-client scoring, at the cost of
    central calibration instead of K small calls."""
    per_client = math.ceil(calib.fisher_batches * calib.fisher_batch_size / len(shards))

    def draw(r):  # each client draws (and, by default, crops and flips) its own images
        images, u = [], []
        for client, shard in enumerate(shards):
            i, v = common.draw_calibration(len(shard), per_client, plumbing.stream("fed_calib", seed, r, client))
            images.append(common.calibration_view(x[shard[i].to(x.device)], calib.calib_images,
                                                  plumbing.stream("fed_calib_aug", seed, r, client)))
            u.append(v)
        return torch.cat(images), torch.cat(u)
    return common.calibrate(model, draw, calib, seed, img_size, device)


# ----------------------------------------------------------------------------- one round

def clients_per_round(args):
    # the epsilon: C*K is a float product and can land a hair above an integer (0.7 * 10 is 7.000000000000001)
    return math.ceil(args.c * args.k - 1e-9)


def sample_clients(args, rnd):
    """ceil(C*K) distinct clients, a function of (seed, round) only: a resumed run draws the same ones."""
    return torch.randperm(args.k, generator=plumbing.stream("clients", args.seed, rnd))[:clients_per_round(args)].tolist()


def local_batches(shard, j, batch_size, gen):
    """J×b sample indices from one shard, walking through fresh permutations of it
    (every sample is seen once before any is seen twice). A batch never exceeds the shard."""
    b = min(batch_size, len(shard))
    perms, n = [], 0
    while n < j * b:
        perms.append(shard[torch.randperm(len(shard), generator=gen)])
        n += len(shard)
    return torch.cat(perms)[:j * b].view(j, b)


def client_batches(x, y, shard, rnd, client, args, device, augment):
    """A client's J local batches, drawn at once: one copy of indices (and crop/flip offsets) to the
    device per client, none per step. x, y live on the device already."""
    idx = local_batches(shard, args.j, args.batch_size, plumbing.stream("client_batches", args.seed, rnd, client))
    idx = idx.to(device, non_blocking=True)
    xb, yb = x[idx.flatten()], y[idx.flatten()]
    if augment:
        off, flip = common.draw_augmentation(len(xb), plumbing.stream("client_aug", args.seed, rnd, client))
        xb = common.augment(xb, off.to(device, non_blocking=True), flip.to(device, non_blocking=True))
    return xb.view(args.j, -1, *xb.shape[1:]), yb.view(args.j, -1)


def trained_params(model, mask=None, head_only=False):
    """(name, param) the clients train: with head_only the head, with a mask the backbone (masked
    tensors through the mask, cls_token/pos_embed densely, the head frozen), else everything."""
    if head_only:
        return list(model.head.named_parameters())
    return common.backbone_params(model) if mask is not None else list(model.named_parameters())


def upload_per_client(params, mask):
    """Values one client uploads per round: every trained entry, except that in a sparse run only the
    masked-in entries of the masked tensors (the server knows the mask; the rest are exactly 0)."""
    return sum(int(mask[n].sum()) if mask is not None and n in mask else p.numel() for n, p in params)


def values_per_client(params, mask, args):
    """Values one client uploads per round: its update (upload_per_client), times the algorithm's uploads
    per trained entry (SCAFFOLD also uploads its variate's change, FisherMerge its Fisher)."""
    return upload_per_client(params, mask) * algorithms.selected_class(args).uploads


class Phase:
    """What the clients train in a phase of the run (head warm-up or main rounds), made once: the
    (name, param) list, one SparseSGDM over it (masks cast once; each client restarts its momentum),
    the server's two buffers, reused every round (see trained_params), the values a client uploads, and
    the FL algorithm (algorithms.make: its hooks and state; state_dict for the checkpoint).

    pack/unpack: a list shaped like `params` <-> one 1-D tensor of the trained entries only (the
    masked-in ones of a masked tensor, all of the others), in order: the algorithms' client updates and
    per-client state are packed so (with --sparse, only their trained entries cost memory)."""

    def __init__(self, model, args, mask=None, head_only=False):
        self.params = trained_params(model, mask, head_only)
        tensors = [p for _, p in self.params]
        self.keep = [mask.get(n) if mask is not None else None for n, _ in self.params]  # None: trained densely
        self.opt = common.SparseSGDM(tensors, self.keep,
                                     lr=args.head_lr if head_only else args.lr, momentum=args.momentum,
                                     weight_decay=args.wd)
        self.global_w, self.update = [torch.empty_like(p) for p in tensors], [torch.empty_like(p) for p in tensors]
        self.head_only = head_only
        self.upload = values_per_client(self.params, mask, args)  # counted once: a device mask's sums sync the host
        self.counts = [p.numel() if k is None else int(k.sum()) for p, k in zip(tensors, self.keep)]
        self.algo = algorithms.make(self, args)

    def pack(self, tensors):
        return torch.cat([t.flatten() if k is None else t[k] for t, k in zip(tensors, self.keep)])

    def unpack(self, flat):
        out = []
        for piece, g, k in zip(torch.split(flat, self.counts), self.global_w, self.keep):
            if k is None:
                out.append(piece.view_as(g))
            else:
                t = torch.zeros_like(g)
                t[k] = piece
                out.append(t)
        return out

    def state_dict(self):
        return {"head_only": self.head_only, **self.algo.state_dict()}

    def load_state_dict(self, state):
        self.algo.load_state_dict(state, self.global_w[0].device)


class RoundStopped(Exception):
    """A stop request (SIGTERM, SIGUSR1, Ctrl-C) reached a round between two client steps: train_round put
    the global weights back and dropped the round's pending algorithm results, so the run's state is that of
    the round's start, and main saves it."""


def stop_between_steps():
    if plumbing.stop_requested():
        raise RoundStopped


def client_update(forward, opt, scaler, batches, grad_term=None):
    """J local steps from whatever weights the model holds, with fresh momentum; grad_term() adds the
    client objective's closed-form terms to the gradients before each step (the algorithm's client_term).
    A stop request ends it between two steps (RoundStopped). Returns the mean loss as a device tensor
    (read once per round, never per step)."""
    opt.restart()  # nothing leaks between clients or rounds
    total = 0
    for xb, yb in zip(*batches):
        stop_between_steps()
        loss = F.cross_entropy(forward(xb), yb)
        common.optimizer_step(opt, loss, scaler, grad_term)
        total = total + loss.detach()
    return total / len(batches[0])


def train_round(model, phase, shards, x, y, rnd, args, device, scaler):
    """Round `rnd` of FedAvg on `model`, in place, for a Phase, through its algorithm's hooks
    (algorithms.py): on cached features (`x`) in a head-only phase, else on uint8 images (`x`). Each sampled
    client trains in turn from the global weights (plus the algorithm's client_term); the round's mean of
    the updates Δ_i = client_i - global (weighted by the algorithm's mean_weights) goes to the algorithm's
    server_step, or, for a stacked aggregator, its aggregate of the packed Δ_i (client_done sees each Δ_i).
    The Phase's `params` are the global weights; its `global_w` and `update` are the server's buffers.

    Averaging updates rather than weights keeps every entry that no client changed (masked out,
    frozen) bit-for-bit the same. The task-arithmetic lens is computed on the way, O(1) extra memory:
    update_norm = mean ||Δ_i||, agreement = ||Σ w_iΔ_i||² / Σ w_i||Δ_i||² with the mean's weights (1 when
    all clients move the same way, 1/n for n equally weighted orthogonal updates, 0 when they cancel).
    A stop request between two clients or two steps undoes the round and raises RoundStopped.
    Returns (mean client loss, update_norm, agreement) as floats."""
    if phase.head_only:
        net, augment, forward = model.head, False, model.head
    else:
        net, augment = model, not args.no_aug

        def forward(xb):
            return common.forward_logits(model, common.preprocess(xb, args.img_size), device, args.precision)
    params, global_w, update, algo = [p for _, p in phase.params], phase.global_w, phase.update, phase.algo
    for p in params:
        p.requires_grad_(True)
    clients = sample_clients(args, rnd)
    weights = algo.mean_weights([len(shards[c]) for c in clients])
    net.train()
    with torch.no_grad():
        torch._foreach_copy_(global_w, params)
        torch._foreach_zero_(update)
    scale = scaler.state_dict() if scaler.is_enabled() else None  # the fp16 scale at the round's start
    try:
        losses, sq_norms, deltas = train_clients(forward, phase, shards, x, y, rnd, clients, weights, args, device,
                                                 scaler, augment)
    except RoundStopped:
        with torch.no_grad():  # back to the round's start: the global weights, no pending result, the scale
            torch._foreach_copy_(params, global_w)
        algo.discard()
        if scale is not None:
            scaler.load_state_dict(scale)
        for p in params:
            p.requires_grad_(False)
        raise
    with torch.no_grad():
        agg = torch.stack(torch._foreach_norm(update)).square().sum()  # the lens: on the clients' mean update
        algo.server_step(params, phase.unpack(algo.aggregate(deltas, weights)) if algo.stacked else update)
    for p in params:
        p.requires_grad_(False)
    sq = torch.stack(sq_norms).square().view(len(clients), -1).sum(1)
    spread = float((torch.tensor(weights, device=sq.device) * sq).sum())
    return (float(torch.stack(losses).mean()), float(sq.sqrt().mean()),
            float(agg) / spread if spread > 0 else float("nan"))


def train_clients(forward, phase, shards, x, y, rnd, clients, weights, args, device, scaler, augment):
    """The sampled clients' J steps, one after another from the global weights: adds w_i Δ_i into
    phase.update, hands Δ_i (packed) to the algorithm's client_done when it reads it, and returns (the
    clients' mean losses, the per-tensor norms of their Δ_i, their packed Δ_i for a stacked aggregator)."""
    params, global_w, update, algo = [p for _, p in phase.params], phase.global_w, phase.update, phase.algo
    groups = common.cache_sized_groups(params)
    losses, sq_norms, deltas = [], [], []
    for client, w in zip(clients, weights):
        stop_between_steps()
        batches = client_batches(x, y, shards[client], rnd, client, args, device, augment)
        losses.append(client_update(forward, phase.opt, scaler, batches, algo.client_term(client)))
        with torch.no_grad():
            if algo.reads_update:
                delta = phase.pack(torch._foreach_sub(params, global_w))
                algo.client_done(client, delta)
                if algo.stacked:
                    deltas.append(delta)
            for i in groups:  # on the CPU a few MB at a time: the four passes below then read it from the cache
                p, g, u = [params[k] for k in i], [global_w[k] for k in i], [update[k] for k in i]
                torch._foreach_sub_(p, g)  # p now holds Δ_i
                torch._foreach_add_(u, p, alpha=w)
                sq_norms += torch._foreach_norm(p)
                torch._foreach_copy_(p, g)  # the next client starts from the global model again
    return losses, sq_norms, deltas


# ----------------------------------------------------------------------------- outputs, and what the planner asks

def write_outputs(rows, args):
    plumbing.write_csv(rows, os.path.join(args.out, "metrics.csv"))
    name = plumbing.plot_title(f"FedAvg {splits.split_label(args.split)}, J={args.j}, "
                               f"{'sparse' if args.sparse else 'dense'}, train {args.train}, head {args.head}",
                               args, named=(*splits.NAME_FLAGS, "j", "sparse", "train", "head"))
    for kind, label, scale in (("acc", "top-1 accuracy (%)", 100), ("loss", "cross-entropy", 1)):
        series = {}
        for split in ("train", "val", "test") if kind == "loss" else ("val", "test"):
            done = [r for r in rows if r.get(f"{split}_{kind}") is not None]
            series[split] = ([r["round"] for r in done], [scale * r[f"{split}_{kind}"] for r in done])
        plumbing.plot_lines(os.path.join(args.out, f"{'accuracy' if kind == 'acc' else 'loss'}.png"), series,
                            "round (0 = the head, before any round)", label, name,
                            ymax=100 if kind == "acc" else None)


def needs_features(a):
    """Whether a run computes the frozen backbone's features: for the ridge head, the head-only rounds,
    and the evaluations while the backbone does not change."""
    return a.head == "ridge" or a.warmup_rounds or a.train == "head"


def measures_aug_gap(a):
    """Whether the run records its head's augmentation gap (common.augmentation_gap): when it trains the
    backbone through the training augmentation, which is when a gap matters."""
    return a.train == "all" and not a.no_aug


def image_passes(a, train, val, test):
    """Images a run pushes through the ViT, (forward+backward, forward only), for run_all.sh's estimate
    (plan.py): features once (ridge head / head-only rounds), and --ridge-views augmented views of the
    training set; the head's augmentation gap (measures_aug_gap); sampled clients x J local batches per main
    round; federated calibration: every client scores ceil(fisher_batches * fisher_batch_size / k) images
    per calibration round; validation every --eval-every rounds, test every --test-every, both at the end.
    A client's batch never exceeds its shard (client_batch)."""
    feats = train + val + test if needs_features(a) else 0
    feats += a.ridge_views * train  # --head ridge's augmented views
    if a.train == "head":  # every round and every evaluation on cached features
        return 0, feats
    feats += common.aug_gap_passes(train) if measures_aug_gap(a) else 0
    calib = 0
    if a.sparse and not a.mask and a.rule in common.SCORED_RULES:
        calib = a.calib_rounds * a.k * math.ceil(a.fisher_batches * a.fisher_batch_size / a.k)
    evals = (a.rounds // a.eval_every + 1) * val + (a.rounds // a.test_every + 1) * test
    return a.rounds * clients_per_round(a) * a.j * client_batch(a, train) + calib, feats + evals


def client_batch(a, train):
    """The batch a client steps at (local_batches), for run_all.sh's estimate: --batch-size, or its shard
    where that is smaller, taken as train // k images (IID's; uneven non-IID shards make it an upper bound
    of the mean)."""
    return max(1, min(a.batch_size, train // a.k))


# ----------------------------------------------------------------------------- the run's state: its checkpoint

ROW_KEYS = ("round", "train_loss", "update_norm", "agreement", "val_loss", "val_acc", "test_loss", "test_acc")


@dataclasses.dataclass
class RunState(plumbing.CheckpointState, common.EditedModelState):
    """All of a FedAvg run's state, which is its checkpoint (plumbing.CheckpointState: the fields are its
    schema; save_checkpoint adds "run", the run's flags)."""
    head: dict                  # step 0: the head after it (head.pt; with --head warmup, before its warm-up rounds)
    head_info: dict             # step 0: how the head was made (into result.json)
    upload: int                 # values the clients uploaded so far
    round: int = 0              # rounds done, warm-up rounds included
    rows: list = dataclasses.field(default_factory=list)  # metrics.csv so far: round 0 (the head), one per round
    mask: Optional[dict] = None  # step 1: the mask once made ({name: bool tensor}; mask.pt is written from it)
    calib_log: list = dataclasses.field(default_factory=list)  # step 1: its rounds (calibration.csv)
    elapsed: float = 0.0        # seconds of work so far, across resumes
    model: Optional[dict] = None   # from the first save on: the global model
    scaler: Optional[dict] = None  # from the first save on: the fp16 gradient scaler
    algo: Optional[dict] = None    # the FL algorithm's state of the phase then running (Phase.state_dict), or None
    MAY_LACK = ("mask",)  # before version 2026-12-08 the mask was in mask.pt alone
    DROPPED = ("calibrated",)  # the same versions' "the mask is in mask.pt", which a resume no longer trusts

    def misfit(self, args, model):
        """What makes this state not one of this run's, or None; the mask is kept as common.checked_mask reads it."""
        total = args.warmup_rounds + args.rounds
        if not 0 <= self.round <= total:
            return f"round {self.round} of a run of {total} rounds"
        problem = rows_problem(self.rows, self.round, total)
        if problem:
            return problem
        if self.upload < 0 or self.elapsed < 0:
            return "a negative upload or time"
        calibrated = args.sparse and self.round > args.warmup_rounds  # the mask is made before the first main round
        if self.mask is None and calibrated:
            return f"no mask at round {self.round} (older versions left it to mask.pt, which a resume does not trust)"
        if self.mask is not None and (not args.sparse or self.round < args.warmup_rounds):
            return f"a mask at round {self.round}, before step 1"
        if self.algo is not None and not isinstance(self.algo.get("head_only"), bool):
            return "its FL algorithm's state has no phase"
        return self.model_misfit(model)


def rows_problem(rows, done, total):
    """What keeps `rows` from being the metrics of a run `done` rounds into `total` (round 0 first, one row per
    round, every value a number or empty, round 0 and the last round evaluated), or None."""
    if len(rows) != done + 1:
        return f"{len(rows)} rows of metrics for round {done}"
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or row.get("round") != i or not set(ROW_KEYS) <= set(row) or \
                not all(v is None or plumbing.type_ok(v, float) for k, v in row.items() if k != "round"):
            return f"row {i} of its metrics is not round {i}'s"
    if not plumbing.type_ok(rows[0]["val_acc"], float) or done == total and \
            not all(plumbing.type_ok(rows[-1][k], float) for k in ("val_acc", "test_acc", "test_loss")):
        return "its metrics lack the evaluation of round 0 or of its last round"
    return None


# ----------------------------------------------------------------------------- the rounds

class Rounds:
    """A run's FedAvg rounds on its RunState: --head warmup's head-only rounds, then the main ones (step 2).
    Holds what they share: the training set on the device, the cached features, the shards, the fp16 scaler,
    the FL algorithm's phase (made afresh when the run passes from head-only to backbone rounds, as an
    uninterrupted run does, and restored from the checkpoint in the phase it was saved in) and the loss
    watches of both kinds of rounds."""

    def __init__(self, model, data, feats, shards, state, args, device):
        self.model, self.data, self.feats, self.shards, self.state = model, data, feats, shards, state
        self.args, self.device = args, device
        self.x, self.y = (t.to(device) for t in data["train"])  # uint8: the whole training set fits on any GPU
        self.t0 = time.time() - state.elapsed
        self.scaler = plumbing.grad_scaler(device, args.precision)
        if state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        self.phase, self.resumed_algo = None, state.algo
        self.mask = None  # state.mask on the device, once made
        head_rounds = "FedAvg head-only rounds (--train head)" if args.train == "head" else "FedAvg head warm-up rounds"
        self.watches = {True: common.LossWatch(head_rounds, f"a --head-lr below {args.head_lr:g}"),  # their rate
                        False: common.LossWatch(f"{'sparse ' if args.sparse else ''}FedAvg rounds",
                                                f"a --lr below {args.lr:g}")}

    def save(self):
        s = self.state
        s.model, s.scaler = plumbing.cpu_state(self.model), self.scaler.state_dict()
        s.elapsed, s.algo = time.time() - self.t0, self.phase.state_dict() if self.phase is not None else None
        plumbing.save_checkpoint(s.to_checkpoint(), self.args)

    def evaluate(self, split, backbone_changed):
        if backbone_changed:
            return common.evaluate(self.model, *self.data[split], self.args, self.device)
        return common.evaluate_head(self.model.head, *self.feats[split])  # same numbers, no ViT pass

    def round_zero(self):
        """Round 0's row: the head every curve leaves from, before any round."""
        if self.state.rows:
            return
        row = {"round": 0, "train_loss": None, "update_norm": None, "agreement": None}
        for split in ("val", "test"):
            row[f"{split}_loss"], row[f"{split}_acc"] = self.evaluate(split, backbone_changed=self.feats is None)
        self.state.rows.append(row)
        plumbing.live_log(self.args, 0, row)
        print(f"round 0 (the head): val acc {row['val_acc']:.4f}  test acc {row['test_acc']:.4f}")
        if self.args.head != "warmup" and self.args.head not in common.FRESH_HEADS:  # at chance by design
            common.check_head_accuracy(row["val_acc"], self.args)

    def phase_for(self, head_only):
        if self.phase is None or self.phase.head_only != head_only:
            if self.mask is None and self.state.mask is not None:
                self.mask = {n: m.to(self.device) for n, m in self.state.mask.items()}
            self.phase = Phase(self.model, self.args, None if head_only else self.mask, head_only)
            if self.resumed_algo is not None and self.resumed_algo["head_only"] == head_only:  # saved in this phase
                self.phase.load_state_dict(self.resumed_algo)
            self.resumed_algo = None  # saved in an earlier phase: this one starts afresh, as it did uninterrupted
        return self.phase

    def train(self, until):
        """The rounds from state.round to `until`: each checked for divergence, its loss and its server step,
        before anything of it is kept; evaluated and checkpointed as --eval-every, --test-every and
        --ckpt-every say. A stop request ends the run between two client steps, saved as of the round's start
        (RoundStopped), or at the round's end, saved (Stopped)."""
        from tqdm import tqdm
        a, state = self.args, self.state
        total = a.warmup_rounds + a.rounds
        for rnd in tqdm(range(state.round, until), desc="rounds", disable=None):
            head_only = rnd < a.warmup_rounds or a.train == "head"
            phase = self.phase_for(head_only)
            try:
                loss, norm, agreement = train_round(self.model, phase, self.shards, self.feats["train"][0]
                                                    if head_only else self.x, self.y, rnd, a, self.device, self.scaler)
            except RoundStopped:  # a stop mid-round: train_round undid the round, so save the state of its start
                self.save()
                raise plumbing.Stopped(f"round {rnd + 1}", saved=True)
            watch = self.watches[head_only]
            watch.check(loss, f"round {rnd + 1}", self.scaler)  # nothing of this round is kept before the checks
            row = {"round": rnd + 1, "train_loss": loss, "update_norm": norm, "agreement": agreement}
            last = rnd + 1 == total
            for split, every in (("val", a.eval_every), ("test", a.test_every)):
                if (rnd + 1) % every == 0 or last:
                    row[f"{split}_loss"], row[f"{split}_acc"] = self.evaluate(split, backbone_changed=not head_only)
                else:
                    row[f"{split}_loss"] = row[f"{split}_acc"] = None
            watch.check_step([p for _, p in trained_params(self.model, self.mask, head_only)],
                             {"val": row["val_loss"], "test": row["test_loss"]}, f"round {rnd + 1}",
                             f"{watch.hint}, or a gentler server step (--server-*)")
            state.upload += phase.upload * clients_per_round(a)
            state.round = rnd + 1
            state.rows.append(row)
            plumbing.live_log(a, row["round"], row)
            if row["val_acc"] is not None:
                watch.warn(loss, f"round {rnd + 1}")
                write_outputs(state.rows, a)
                tqdm.write(f"round {rnd + 1}: train loss {loss:.4f}  val acc {row['val_acc']:.4f}"
                           + (f"  test acc {row['test_acc']:.4f}" if row["test_acc"] is not None else ""))
            stop = plumbing.stop_requested()  # read once: a signal between two reads would skip the save
            if (rnd + 1) % a.ckpt_every == 0 or row["val_acc"] is not None or stop:
                self.save()
            if stop and not last:  # SLURM preemption / time limit: saved at this round boundary
                raise plumbing.Stopped(f"round {rnd + 1}", saved=True)

    def measure_aug_gap(self):
        """The head the backbone is about to train under (round 0's, or after the warm-up rounds), on a sample
        of the union of the shards: as if clients counted on their own images and the server added."""
        a, row = self.args, self.state.rows[self.args.warmup_rounds]
        if self.state.round == a.warmup_rounds and measures_aug_gap(a) and "head_train_aug_acc" not in row:
            gap = common.augmentation_gap(self.model, *self.data["train"], self.args, self.device)
            row.update(gap)
            common.warn_augmentation_gap(gap)


# ----------------------------------------------------------------------------- the run, in its stages

def make_head(model, shards, feats, data, head_file, args, device):
    """Step 0, on model.head: the federated ridge head (one round of the clients' statistics), a head.pt, or a
    fresh head (--head warmup: the one its warm-up rounds start from). Returns (how it was made, the values
    each client uploaded for it)."""
    if args.head == "ridge":
        views = common.split_features(model, data, "train", args.ridge_views, args, device) \
            if args.ridge_views else None
        d = model.head.in_features + 1
        return federated_ridge(model.head, shards, feats, views), d * d + d * common.NUM_CLASSES + 1  # Σφφᵀ, Σφyᵀ, n
    if head_file is not None:
        model.head.load_state_dict(head_file)
    else:
        common.fresh_head(model.head, args.head)
    return {}, 0


def result_of(state, model, pretrained, label_skew, args, seconds):
    """result.json: every flag of the run (plumbing.run_config, so a new flag is in it with no edit) and what
    the run measured. Mask flags that made nothing are null, as summarize.SCHEMA reads them (--score is the
    run's own with --mask too, as older results have it); the mask file is "mask_file"."""
    rows, mask = state.rows, state.mask
    config = plumbing.run_config(args)
    mask_file = config.pop("mask")
    made_nothing = () if args.sparse and not args.mask else \
        [k for k in common.CALIBRATION_FLAGS if not (args.sparse and k == "score")]
    best = max((r for r in rows if r["val_acc"] is not None), key=lambda r: r["val_acc"])  # first of equals wins
    params = trained_params(model, mask, args.train == "head")
    result = {"stage": "fedavg", **config, "split": args.split, "mask_file": mask_file,
              "algorithm": algorithms.selected_class(args).name,
              "label_skew": label_skew,  # the shards' mean client-to-global label TV distance (splits.label_skew)
              **dict.fromkeys(made_nothing), **state.head_info,
              **{k: rows[args.warmup_rounds].get(k) for k in ("head_train_acc", "head_train_aug_acc")},
              "val_acc": rows[-1]["val_acc"], "test_acc": rows[-1]["test_acc"], "test_loss": rows[-1]["test_loss"],
              "best_val_acc": best["val_acc"], "best_round": best["round"],
              "clients_per_round": clients_per_round(args),
              "comm_values_per_client_round": values_per_client(params, mask, args),
              "comm_mb_total": state.upload * 4 / 1e6, "seconds": seconds}
    if args.sparse:
        changed, total = common.changed_count(model, pretrained)
        result.update(mask_kept_frac=common.mask_kept_frac(mask), changed_frac=changed / total)
    return result


def main(argv=None):
    args = get_args(argv)
    device, data, model, inputs = common.prepare(args)
    shards = splits.make_shards(data["train"][1], splits.of_args(args), args.k, args.seed)
    label_skew = splits.label_skew(shards, data["train"][1])
    algorithms.check_memory(model, args, inputs["mask"])
    ckpt = plumbing.open_run(args)
    state = RunState.from_checkpoint(ckpt, args, model) if ckpt is not None else None  # checked before any work
    print(f"{args.k} clients ({splits.split_label(args.split)}, {min(map(len, shards))}-{max(map(len, shards))} "
          f"samples, label skew {label_skew:.3f}), {clients_per_round(args)} per round, J={args.j}, {args.warmup_rounds} head warm-up + "
          f"{args.rounds} rounds{' (scaled from J=4)' if args.scale_rounds else ''}; head: {args.head}")
    model.requires_grad_(False)
    # Frozen-backbone features of the clean images: the ridge statistics, head-only rounds and their
    # evaluation (the backbone does not change there) all read them instead of running the ViT.
    feats = common.cached_features(model, data, args, device) if needs_features(args) else None
    pretrained = {n: p.detach().cpu().clone() for n, p in common.masked_params(model)}
    # written on resume too (the same bytes): a shards.csv damaged meanwhile does not survive
    plumbing.write_csv(splits.shard_rows(shards, data["train"][1]), os.path.join(args.out, "shards.csv"))

    # -------- step 0: the head (federated ridge, a head.pt, a fresh head; --head warmup: trained in its rounds)
    if state is None:
        head_info, upload = make_head(model, shards, feats, data, inputs["head"], args, device)
        state = RunState(head=plumbing.cpu_state(model.head), head_info=head_info, upload=upload * args.k)
    else:
        plumbing.resuming(args, f"round {state.round + 1} of {args.warmup_rounds + args.rounds}")
        model.load_state_dict(state.model)
    state.write_files(args.out)
    rounds = Rounds(model, data, feats, shards, state, args, device)
    rounds.round_zero()
    rounds.train(until=args.warmup_rounds)  # --head warmup's head-only rounds (none otherwise)

    # -------- step 1 (--sparse): the mask, under the head the backbone will train under
    if args.sparse and state.mask is None:
        mask, state.calib_log = (inputs["mask"], []) if inputs["mask"] is not None else \
            federated_mask(model, shards, rounds.x, common.Calibration.of(args), args.seed, args.img_size, device)
        state.mask = {n: m.detach().cpu().bool() for n, m in mask.items()}
        state.write_files(args.out)
        rounds.save()

    # -------- step 2: the rounds
    rounds.measure_aug_gap()
    rounds.train(until=args.warmup_rounds + args.rounds)

    # -------- the result
    write_outputs(state.rows, args)
    if state.calib_log:
        plumbing.write_csv(state.calib_log, os.path.join(args.out, "calibration.csv"))
    result = result_of(state, model, pretrained, label_skew, args, time.time() - rounds.t0)
    plumbing.atomic_save(plumbing.cpu_state(model), os.path.join(args.out, "model.pt"))
    plumbing.finish_run(result, args)
    print(f"test acc {result['test_acc']:.4f} after {state.round} rounds (best val {result['best_val_acc']:.4f} "
          f"at round {result['best_round']}); results in {args.out}")


if __name__ == "__main__":
    plumbing.run_main(main)
