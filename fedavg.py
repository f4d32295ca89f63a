"""Federated Averaging (McMahan et al. 2017) of the DINO ViT-S/16 classifier, simulated on one device.

K clients hold disjoint shards of the training set (IID, or Nc classes each). Every round the server
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
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
import plumbing


def get_args(argv=None):
    shared = [plumbing.base_parser(common.DEFAULT_ARCH),
              plumbing.edit_parser(common.MASK_RULES, common.SCORES, common.CALIB_IMAGES)]
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
    g.add_argument("--iid", action="store_true", help="IID shards (what a run without --nc or --dirichlet gets)")
    g.add_argument("--nc", type=int, default=None, help="non-IID: every client holds exactly NC classes")
    g.add_argument("--dirichlet", type=plumbing.positive_float, default=None, metavar="ALPHA",
                   help="non-IID: each class's samples go to the clients in proportions drawn from "
                        "Dirichlet(ALPHA) (small: a few clients hold most of a class; large: near IID)")
    g.add_argument("--min-shard", type=plumbing.positive_int, default=DIRICHLET_MIN_SHARD,
                   help=f"with --dirichlet: the fewest samples a client may hold; a split with a smaller "
                        f"shard is drawn again, up to {DIRICHLET_DRAWS} times")
    g.add_argument("--eval-every", type=plumbing.positive_int, default=20,
                   help="validation accuracy of the global model every N rounds (curves, rounds to target)")
    g.add_argument("--test-every", type=plumbing.positive_int, default=300,
                   help="test accuracy every N rounds, and always after the last round")
    g.add_argument("--ckpt-every", type=plumbing.positive_int, default=5, help="checkpoint every N rounds")
    g = p.add_argument_group("local training")
    g.add_argument("--lr", type=plumbing.nonneg_float, default=1e-4,
                   help="client learning rate of rounds that train the backbone (dense or --sparse), constant "
                        "(docs/flags.md: why this low)")
    g.add_argument("--head-lr", type=plumbing.nonneg_float, default=0.1,
                   help="client learning rate of head-only rounds (--head warmup's warm-up, --train head)")
    g.add_argument("--momentum", type=plumbing.unit_float, default=0.9,
                   help="client momentum; a fresh buffer for every client and round")
    g.add_argument("--wd", type=plumbing.nonneg_float, default=0.0, help="client weight decay")
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
    algorithm_flags(p)
    args = p.parse_args(argv)
    check_algorithm_flags(p, args)
    if not 0 < args.c <= 1:
        p.error(f"--c must be in (0, 1], got {args.c}")
    if args.k * args.c < 1:
        p.error(f"--k {args.k} x --c {args.c} < 1: no client would be sampled")
    split_given = [f for f, v in (("--iid", args.iid or None), ("--nc", args.nc), ("--dirichlet", args.dirichlet))
                   if v is not None]
    if len(split_given) > 1:
        p.error(f"{' and '.join(split_given)} exclude each other")
    if args.dirichlet is None:
        plumbing.refuse_ignored(p, args, ["min_shard"], "it bounds the shards of --dirichlet")
    if args.nc is not None and not 1 <= args.nc <= common.NUM_CLASSES:
        p.error(f"--nc must be in 1..{common.NUM_CLASSES}, got {args.nc}")
    if args.nc is not None and args.k * args.nc < common.NUM_CLASSES:
        p.error(f"--k x --nc must be >= {common.NUM_CLASSES} so that every class (every sample) has a client")
    if args.mask and not args.sparse:
        p.error("--mask needs --sparse")
    if args.sparse and args.train == "head":
        p.error("--sparse fine-tunes the backbone under a frozen head; it cannot go with --train head")
    plumbing.check_head_flags(p, args)
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
        plumbing.refuse_ignored(p, args, plumbing.CALIBRATION_FLAGS, "they make the mask of --sparse")
    elif args.mask:
        plumbing.refuse_ignored(p, args, plumbing.CALIBRATION_FLAGS, "--mask gives the mask, nothing is calibrated")
    if args.scale_rounds and args.rounds * 4 % args.j:
        p.error(f"--scale-rounds: {args.rounds} rounds x 4 / J={args.j} is not a whole number of rounds, so local "
                f"work would not be equal across J; choose --rounds a multiple of {args.j // math.gcd(args.j, 4)}")
    plumbing.check_base_flags(p, args)
    if args.head != "warmup":
        args.warmup_rounds = 0  # only --head warmup has head-only rounds
    args.split = common.split_name(nc=args.nc, dirichlet=args.dirichlet)  # the one value every use reads
    args.iid = args.split == "iid"  # kept in config.json as older runs recorded it (a resume compares it)
    if args.scale_rounds:
        args.rounds = scaled_rounds(args.rounds, args.j)
    named = NAMED_FLAGS | ({"head"} if args.head in common.FRESH_HEADS else set())
    args.out = args.out or plumbing.run_name(args, "fedavg", run_core(args), named)
    return args


DIRICHLET_MIN_SHARD = 10  # flwr-datasets' DirichletPartitioner's default min_partition_size
DIRICHLET_DRAWS = 100
# The flags run_core names; plumbing.run_name adds every other one not at its default
# (and --head when it is a fresh head: run_core says _from-zero); algorithm_tag names the FL algorithm's flags
NAMED_FLAGS = {"iid", "nc", "dirichlet", "j", "train", "sparse", "mask", "rule", "sparsity", "calib_rounds",
               "rounds", "scale_rounds", "ridge_views",
               "mu", "scaffold", "aggregate", "ties_keep", "server_opt", "server_lr", "server_momentum"}


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
    kind += plumbing.ridge_views_tag(args)
    rounds = "" if args.rounds == scaled_rounds(args.defaults["rounds"], args.j) else f"_R{args.rounds}"
    return f"{args.split}_j{args.j}_{kind}{algorithm_tag(args)}{rounds}"


# ----------------------------------------------------------------------------- the FL algorithms' flags

SERVER_BETAS = (0.9, 0.99)  # FedAdam/FedYogi's beta1, beta2 (Reddi et al. 2021)


def algorithm_flags(p):
    g = p.add_argument_group("FL algorithms (docs/extending.md; every default is FedAvg)")
    g.add_argument("--mu", type=plumbing.nonneg_float, default=0.0,
                   help="FedProx: the proximal term (mu/2)||w - w_global||^2 on every client's objective")
    g.add_argument("--scaffold", action="store_true",
                   help="SCAFFOLD (option II control variates): each client's gradient corrected by c - c_i; "
                        "K client variates of the trained entries on the host (refused if they do not fit)")
    g.add_argument("--aggregate", choices=["mean", "ties"], default="mean",
                   help="the server's aggregate of the client updates: their mean weighted by shard size "
                        "(FedAvg), or TIES-merging (trim each to its top --ties-keep, elect signs, disjoint mean)")
    g.add_argument("--ties-keep", type=plumbing.positive_unit_float, default=0.2,
                   help="--aggregate ties: fraction of each client update's trained entries kept (largest |value|)")
    g.add_argument("--server-opt", choices=["sgd", "adam", "yogi"], default="sgd",
                   help="the server's optimizer on the aggregate (a task vector): sgd (FedAvg, FedAvgM with "
                        f"--server-momentum), adam or yogi (FedAdam/FedYogi, betas {SERVER_BETAS[0]}, {SERVER_BETAS[1]})")
    g.add_argument("--server-lr", type=plumbing.nonneg_float, default=1.0,
                   help="the server's learning rate: task arithmetic's scaling coefficient of the aggregate")
    g.add_argument("--server-momentum", type=plumbing.unit_float, default=0.0,
                   help="--server-opt sgd: momentum on the aggregate (FedAvgM)")
    g.add_argument("--server-eps", type=plumbing.positive_float, default=1e-3,
                   help="--server-opt adam/yogi: tau, the adaptivity floor added to sqrt(v)")


def check_algorithm_flags(p, args):
    if args.aggregate != "ties":
        plumbing.refuse_ignored(p, args, ["ties_keep"], "it is --aggregate ties's")
    if args.server_opt == "sgd":
        plumbing.refuse_ignored(p, args, ["server_eps"], "it is --server-opt adam/yogi's")
    else:
        plumbing.refuse_ignored(p, args, ["server_momentum"], f"--server-opt {args.server_opt} has its own "
                                f"beta1 {SERVER_BETAS[0]}")
    if args.scaffold and not (args.lr > 0 and args.head_lr > 0):
        p.error("--scaffold divides a client's update by its learning rate: give --lr and --head-lr above 0")


def algorithm_tag(args):
    """The run name's part for the algorithm flags that differ from FedAvg ('' for FedAvg)."""
    tag = f"_mu{args.mu:g}" if args.mu else ""
    tag += "_scaffold" if args.scaffold else ""
    tag += f"_ties{args.ties_keep:g}" if args.aggregate == "ties" else ""
    if args.server_opt != "sgd" or args.server_lr != 1 or args.server_momentum:
        tag += f"_{args.server_opt}{args.server_lr:g}" + (f"m{args.server_momentum:g}" if args.server_momentum else "")
    return tag


# ----------------------------------------------------------------------------- sharding

def iid_shards(labels, k, gen):
    """Every class shuffled, the classes laid end to end, then dealt round-robin to the K clients:
    client sizes differ by at most 1, and each client holds about count_c / K samples of class c."""
    order = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        order.append(idx[torch.randperm(len(idx), generator=gen)])
    order = torch.cat(order)
    return [torch.sort(order[i::k]).values for i in range(k)]


def noniid_shards(labels, k, nc, gen):
    """Every client holds exactly `nc` classes. The K*nc (client, class) slots are filled with the
    classes in a seeded random order, cycling: slot s takes class perm[s % num_classes]. So every class
    goes to floor or ceil of K*nc/num_classes clients, and a client never gets a class twice (nc <=
    num_classes). Each class's samples are shuffled and cut into near-equal pieces, one per holder.
    With balanced classes and num_classes dividing K*nc (CIFAR-100, K=100) all shards are equal."""
    classes = torch.unique(labels)
    perm = classes[torch.randperm(len(classes), generator=gen)].tolist()
    holders = {c: [] for c in perm}
    for client in range(k):
        for i in range(nc):
            holders[perm[(client * nc + i) % len(perm)]].append(client)
    shards = [[] for _ in range(k)]
    for c in sorted(holders):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < len(holders[c]):
            raise plumbing.UserError(f"class {c} has {len(idx)} samples for {len(holders[c])} clients; "
                                     f"use fewer clients (--k) or classes per client (--nc)")
        idx = idx[torch.randperm(len(idx), generator=gen)]
        for client, piece in zip(holders[c], torch.tensor_split(idx, len(holders[c]))):
            shards[client].append(piece)
    return [torch.sort(torch.cat(s)).values for s in shards]


def dirichlet_draw(by_class, k, alpha, gen, rng):
    """One Dirichlet split of the samples `by_class` (a list of each class's indices): for every class,
    client proportions p ~ Dir(alpha) over the K clients (numpy's sampler, seeded from `gen`), and the
    class's shuffled samples cut at round(cumsum(p) * count), as flwr-datasets' DirichletPartitioner and
    the FL literature (Hsu et al. 2019) do."""
    samples, owners = [], []
    for idx, p in zip(by_class, rng.dirichlet(np.full(k, alpha), size=len(by_class))):
        samples.append(idx[torch.randperm(len(idx), generator=gen)])
        cuts = np.round(np.cumsum(p) * len(idx))[:-1]  # client c gets positions cuts[c-1] to cuts[c]
        owners.append(np.searchsorted(cuts, np.arange(len(idx)), side="right"))
    samples, owners = torch.cat(samples), torch.from_numpy(np.concatenate(owners))
    order = torch.argsort(owners * (int(samples.max()) + 1) + samples)  # by client, then by sample
    return list(torch.split(samples[order], torch.bincount(owners, minlength=k).tolist()))


def dirichlet_shards(labels, k, alpha, min_shard, gen):
    """A Dirichlet split (dirichlet_draw) in which every client holds at least `min_shard` samples: drawn
    again, from the same stream, until one is (at most DIRICHLET_DRAWS times, then a UserError)."""
    if k * min_shard > len(labels):
        raise plumbing.UserError(f"--k {k} clients x --min-shard {min_shard} > {len(labels)} training images; "
                                 f"lower --k or --min-shard")
    by_class = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen)))
    for _ in range(DIRICHLET_DRAWS):
        shards = dirichlet_draw(by_class, k, alpha, gen, rng)
        if min(map(len, shards)) >= min_shard:
            return shards
    raise plumbing.UserError(f"--dirichlet {alpha:g}: none of {DIRICHLET_DRAWS} draws gave every one of the {k} "
                             f"clients {min_shard}+ samples; raise --dirichlet or lower --k or --min-shard")


def make_shards(labels, args):
    if args.k > len(labels):
        raise plumbing.UserError(f"--k {args.k} clients for {len(labels)} training images: some would hold nothing; "
                                 f"lower --k")
    gen = plumbing.stream("shards", args.seed)
    kind, value = common.parse_split(args.split)
    if kind == "iid":
        return iid_shards(labels, args.k, gen)
    if kind == "dir":
        return dirichlet_shards(labels, args.k, value, args.min_shard, gen)
    return noniid_shards(labels, args.k, value, gen)


def shard_rows(shards, labels):
    """shards.csv: per client its samples, its classes, and the share of its largest class (1 when it
    holds one class; about 1/classes when its classes are balanced)."""
    rows = []
    for i, s in enumerate(shards):
        counts = torch.bincount(labels[s])
        rows.append({"client": i, "samples": len(s), "classes": int((counts > 0).sum()),
                     "largest_class_share": float(counts.max()) / len(s)})
    return rows


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

def federated_mask(model, shards, x, args, device):
    """Calibrate the mask without pooling data: in every calibration round each of the K clients scores
    ceil(fisher_batches * fisher_batch_size / K) of its own images (squared per-sample gradients, labels
    sampled from the model) and sends the per-entry sums and its count; the server adds them up and
    divides by the total count: the Fisher over the union of the scored images.
    Simulated in shared batches: per-sample terms do not depend on their batch-mates (eval mode,
    labels from per-sample uniforms), so the sums are those of per-client scoring, at the cost of
    central calibration instead of K small calls."""
    per_client = math.ceil(args.fisher_batches * args.fisher_batch_size / args.k)

    def draw(r):  # each client draws (and, by default, crops and flips) its own images
        images, u = [], []
        for client, shard in enumerate(shards):
            i, v = common.draw_calibration(len(shard), per_client, plumbing.stream("fed_calib", args.seed, r, client))
            images.append(common.calibration_view(x[shard[i].to(x.device)], args.calib_images,
                                                  plumbing.stream("fed_calib_aug", args.seed, r, client)))
            u.append(v)
        return torch.cat(images), torch.cat(u)
    return common.calibrate(model, draw, args, device)


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


def client_update(forward, opt, scaler, batches, grad_term=None):
    """J local steps from whatever weights the model holds, with fresh momentum; grad_term() adds the
    client objective's closed-form terms to the gradients before each step (client_grad_term).
    Returns the mean loss as a device tensor (read once per round, never per step)."""
    opt.restart()  # nothing leaks between clients or rounds
    total = 0
    for xb, yb in zip(*batches):
        loss = F.cross_entropy(forward(xb), yb)
        common.optimizer_step(opt, loss, scaler, grad_term)
        total = total + loss.detach()
    return total / len(batches[0])


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
    """Values one client uploads per round: its update (upload_per_client), and with --scaffold as many
    again, the change of its control variate."""
    return upload_per_client(params, mask) * (2 if args.scaffold else 1)


class Phase:
    """What the clients train in a phase of the run (head warm-up or main rounds), made once: the
    (name, param) list, one SparseSGDM over it (masks cast once; each client restarts its momentum),
    the server's two buffers, reused every round (see trained_params), the values a client uploads, and
    the FL algorithm's state (server optimizer, SCAFFOLD's variates; state_dict for the checkpoint).

    pack/unpack: a list shaped like `params` <-> one 1-D tensor of the trained entries only (the
    masked-in ones of a masked tensor, all of the others), in order: TIES trims over them, and
    SCAFFOLD's client variates are stored so (with --sparse, only their trained entries cost memory)."""

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
        self.server = ServerOpt(args)
        self.scaffold = Scaffold(self, args) if args.scaffold else None

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
        return {"head_only": self.head_only, "server": self.server.state_dict(),
                "scaffold": self.scaffold.state_dict() if self.scaffold else None}

    def load_state_dict(self, state):
        device = self.global_w[0].device
        self.server.load_state_dict(state["server"], device)
        if self.scaffold:
            self.scaffold.load_state_dict(state["scaffold"], device)


class ServerOpt:
    """The server's step on the round's aggregate Δ (a task vector), x += server_lr * step(Δ):
    sgd: step = Δ, or with --server-momentum β the FedAvgM buffer m = βm + Δ (from m = 0);
    adam/yogi (Reddi et al. 2021, Algorithm 2, no bias correction): m = β1 m + (1-β1)Δ, from m = 0;
    v from τ² (the paper's v_{-1} >= τ²), adam v = β2 v + (1-β2)Δ², yogi v = v - (1-β2)Δ² sign(v - Δ²);
    step = m / (sqrt(v) + τ). An entry no client moved has Δ = 0 at every round, so m = 0 and its step is
    exactly 0 there (masked-out entries stay bit for bit). Plain sgd at lr 1 is FedAvg, bit for bit."""

    def __init__(self, args):
        self.kind, self.lr, self.mom, self.eps = args.server_opt, args.server_lr, args.server_momentum, args.server_eps
        self.m = self.v = None  # made at the first step, shaped like the aggregate

    @torch.no_grad()
    def step(self, params, agg):
        if self.kind == "sgd" and not self.mom:
            torch._foreach_add_(params, agg, alpha=self.lr)
            return
        if self.m is None:
            self.m = [torch.zeros_like(a) for a in agg]
            self.v = None if self.kind == "sgd" else [torch.full_like(a, self.eps ** 2) for a in agg]
        if self.kind == "sgd":
            torch._foreach_mul_(self.m, self.mom)
            torch._foreach_add_(self.m, agg)
            torch._foreach_add_(params, self.m, alpha=self.lr)
            return
        b1, b2 = SERVER_BETAS
        torch._foreach_mul_(self.m, b1)
        torch._foreach_add_(self.m, agg, alpha=1 - b1)
        sq = torch._foreach_mul(agg, agg)
        if self.kind == "adam":
            torch._foreach_mul_(self.v, b2)
            torch._foreach_add_(self.v, sq, alpha=1 - b2)
        else:
            sign = [torch.sign(v - s) for v, s in zip(self.v, sq)]
            torch._foreach_sub_(self.v, torch._foreach_mul(sq, sign), alpha=1 - b2)
        denom = torch._foreach_add(torch._foreach_sqrt(self.v), self.eps)
        torch._foreach_addcdiv_(params, self.m, denom, value=self.lr)

    def state_dict(self):
        return {"m": [t.cpu() for t in self.m] if self.m else None, "v": [t.cpu() for t in self.v] if self.v else None}

    def load_state_dict(self, state, device):
        self.m = [t.to(device) for t in state["m"]] if state["m"] else None
        self.v = [t.to(device) for t in state["v"]] if state["v"] else None


class Scaffold:
    """SCAFFOLD's control variates (Karimireddy et al. 2020, option II): the server's c (shaped like the
    trained params, on the device) and each client's c_i (a packed 1-D tensor of the trained entries, on the
    host; a client not yet sampled holds c_i = 0 and costs nothing). A client's gradient is corrected by
    c - c_i; after its J steps at rate lr, c_i+ = c_i - c + (w_global - w_i)/(J lr); after the round the
    server adds (|S|/K) mean_i(c_i+ - c_i) = sum_i(c_i+ - c_i) / K to c. Entries no client trains are 0 in
    c and c_i from the start and stay 0 (there w_i = w_global), so they move nothing."""

    def __init__(self, phase, args):
        self.phase, self.k = phase, args.k
        self.steps, self.lr = args.j, phase.opt.param_groups[0]["lr"]
        self.c = [torch.zeros_like(g) for g in phase.global_w]
        self.ci = {}
        self.dc = None

    def correction(self, client):
        """c - c_i, shaped like the params."""
        if client not in self.ci:
            return self.c
        return torch._foreach_sub(self.c, self.phase.unpack(self.ci[client].to(self.c[0].device)))

    def client_done(self, client, delta):
        """Client `client` trained; delta: its packed update w_i - w_global."""
        old = self.ci[client].to(delta.device) if client in self.ci else torch.zeros_like(delta)
        new = old - self.phase.pack(self.c) - delta / (self.steps * self.lr)
        self.dc = new - old if self.dc is None else self.dc.add_(new - old)
        self.ci[client] = new.cpu()

    def server_step(self):
        torch._foreach_add_(self.c, self.phase.unpack(self.dc / self.k))
        self.dc = None

    def state_dict(self):
        return {"c": [t.cpu() for t in self.c], "ci": dict(self.ci)}

    def load_state_dict(self, state, device):
        self.c = [t.to(device) for t in state["c"]]
        self.ci = dict(state["ci"])


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
    w = torch.tensor(weights, device=trimmed.device, dtype=trimmed.dtype)[:, None]
    elected = torch.sign((w * trimmed).sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    mass = (w * agree).sum(0)
    return torch.where(mass > 0, (w * trimmed * agree).sum(0) / mass.clamp_min(torch.finfo(mass.dtype).tiny), 0.0)


def scaffold_bytes(model, args, mask=None):
    """Bytes of SCAFFOLD's K client variates: K x the trained entries of the main rounds (the head with
    --train head; every weight dense; with --sparse the backbone's masked-in entries, `mask`'s count or,
    before calibration, the (1 - sparsity) share the rule keeps, plus cls_token and pos_embed)."""
    if args.train == "head":
        params = list(model.head.parameters())
        n = sum(p.numel() for p in params)
    elif not args.sparse:
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
    else:
        params = [p for _, p in common.backbone_params(model)]
        masked = {n for n, _ in common.masked_params(model)}
        n = sum(p.numel() for name, p in common.backbone_params(model) if name not in masked)
        n += (sum(int(m.sum()) for m in mask.values()) if mask is not None else
              math.ceil((1 - args.sparsity) * sum(p.numel() for _, p in common.masked_params(model))))
    return args.k * n * params[0].element_size()


def check_scaffold_memory(model, args, mask=None):
    """Refuse, before anything is written, a --scaffold run whose client variates (on the host) would not
    fit in the host memory available now."""
    need, free = scaffold_bytes(model, args, mask), plumbing.host_memory_available()
    if need > free:
        raise plumbing.UserError(f"--scaffold keeps {args.k} client control variates, {need / 1e9:.1f} GB, and the "
                                 f"host has {free / 1e9:.1f} GB available: use fewer clients (--k), --sparse, or "
                                 f"a bigger machine")


def client_grad_term(phase, client, args):
    """The client objective's closed-form gradient terms, or None for FedAvg's plain loss: FedProx's
    mu (w - w_global) and SCAFFOLD's correction c - c_i. SparseSGDM masks the gradient after them, so on
    a masked-out entry they move nothing."""
    params = [p for _, p in phase.params]
    corr = phase.scaffold.correction(client) if phase.scaffold else None
    if not args.mu and corr is None:
        return None

    def add_terms():
        grads = [p.grad for p in params]
        if args.mu:
            torch._foreach_add_(grads, torch._foreach_sub(params, phase.global_w), alpha=args.mu)
        if corr is not None:
            torch._foreach_add_(grads, corr)
    return add_terms


def train_round(model, phase, shards, x, y, rnd, args, device, scaler):
    """Round `rnd` of FedAvg on `model`, in place, for a Phase: on cached features (`x`) in a
    head-only phase, else on uint8 images (`x`). Each sampled client trains in turn from the global
    weights, then the server adds the weighted average of the updates Δ_i = client_i - global to the
    global weights (the Phase's `params`; its `global_w` and `update` are the server's buffers).

    Averaging updates rather than weights keeps every entry that no client changed (masked out,
    frozen) bit-for-bit the same. The task-arithmetic lens is computed on the way, O(1) extra memory:
    update_norm = mean ||Δ_i||, agreement = ||Σ w_iΔ_i||² / Σ w_i||Δ_i||² (1 when all clients move the
    same way, 1/n for n equally weighted orthogonal updates, 0 when they cancel).
    Returns (mean client loss, update_norm, agreement) as floats."""
    if phase.head_only:
        net, augment, forward = model.head, False, model.head
    else:
        net, augment = model, not args.no_aug

        def forward(xb):
            return common.forward_logits(model, common.preprocess(xb, args.img_size), device, args.precision)
    params, global_w, update = [p for _, p in phase.params], phase.global_w, phase.update
    for p in params:
        p.requires_grad_(True)
    clients = sample_clients(args, rnd)
    sizes = [len(shards[c]) for c in clients]
    weights = [s / sum(sizes) for s in sizes]
    net.train()
    with torch.no_grad():
        torch._foreach_copy_(global_w, params)
        torch._foreach_zero_(update)
    groups = common.cache_sized_groups(params)
    losses, sq_norms, deltas = [], [], []
    for client, w in zip(clients, weights):
        batches = client_batches(x, y, shards[client], rnd, client, args, device, augment)
        losses.append(client_update(forward, phase.opt, scaler, batches, client_grad_term(phase, client, args)))
        with torch.no_grad():
            if phase.scaffold or args.aggregate == "ties":  # they read the whole Δ_i
                delta = phase.pack(torch._foreach_sub(params, global_w))
                if phase.scaffold:
                    phase.scaffold.client_done(client, delta)
                if args.aggregate == "ties":
                    deltas.append(delta)
            for i in groups:  # on the CPU a few MB at a time: the four passes below then read it from the cache
                p, g, u = [params[k] for k in i], [global_w[k] for k in i], [update[k] for k in i]
                torch._foreach_sub_(p, g)  # p now holds Δ_i
                torch._foreach_add_(u, p, alpha=w)
                sq_norms += torch._foreach_norm(p)
                torch._foreach_copy_(p, g)  # the next client starts from the global model again
    with torch.no_grad():
        agg = torch.stack(torch._foreach_norm(update)).square().sum()  # the lens: on the clients' mean update
        phase.server.step(params, update if args.aggregate == "mean" else
                          phase.unpack(ties_merge(deltas, weights, args.ties_keep)))  # the server's step
        if phase.scaffold:
            phase.scaffold.server_step()
    for p in params:
        p.requires_grad_(False)
    sq = torch.stack(sq_norms).square().view(len(clients), -1).sum(1)
    spread = float((torch.tensor(weights, device=sq.device) * sq).sum())
    return (float(torch.stack(losses).mean()), float(sq.sqrt().mean()),
            float(agg) / spread if spread > 0 else float("nan"))


# ----------------------------------------------------------------------------- main

def write_outputs(rows, args):
    plumbing.write_csv(rows, os.path.join(args.out, "metrics.csv"))
    name = plumbing.plot_title(f"FedAvg {common.split_label(args.split)}, J={args.j}, "
                               f"{'sparse' if args.sparse else 'dense'}, train {args.train}, head {args.head}",
                               args, named=("iid", "nc", "dirichlet", "j", "sparse", "train", "head"))
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


def main(argv=None):
    from tqdm import tqdm
    args = get_args(argv)
    device, data, model, inputs = common.prepare(args)
    given_mask = inputs["mask"]
    shards = make_shards(data["train"][1], args)
    if args.scaffold:
        check_scaffold_memory(model, args, given_mask)
    ckpt = plumbing.open_run(args)
    x, y = (t.to(device) for t in data["train"])  # uint8: the whole training set fits on any GPU
    total_rounds = args.warmup_rounds + args.rounds
    print(f"{args.k} clients ({common.split_label(args.split)}, "
          f"{min(map(len, shards))}-{max(map(len, shards))} samples), {clients_per_round(args)} per "
          f"round, J={args.j}, {args.warmup_rounds} head warm-up + {args.rounds} rounds"
          f"{' (scaled from J=4)' if args.scale_rounds else ''}; head: {args.head}")
    for p in model.parameters():
        p.requires_grad_(False)
    # Frozen-backbone features of the clean images: the ridge statistics, head-only rounds and their
    # evaluation (the backbone does not change there) all read them instead of running the ViT.
    feats = common.cached_features(model, data, args, device) if needs_features(args) else None
    pretrained = {n: p.detach().cpu().clone() for n, p in common.masked_params(model)}
    mask_path = os.path.join(args.out, "mask.pt")

    # written on resume too (the same bytes): a shards.csv damaged meanwhile does not survive
    plumbing.write_csv(shard_rows(shards, data["train"][1]), os.path.join(args.out, "shards.csv"))
    # -------- step 0: the head (federated ridge, a head.pt, or the warm-up rounds below)

    if ckpt is None:
        head_info, head_upload = {}, 0
        if args.head == "ridge":
            views = common.split_features(model, data, "train", args.ridge_views, args, device) \
                if args.ridge_views else None
            head_info = dict(federated_ridge(model.head, shards, feats, views), ridge_views=args.ridge_views)
            d = model.head.in_features + 1
            head_upload = d * d + d * common.NUM_CLASSES + 1  # Σφφᵀ, Σφyᵀ and a count, once per client
        elif inputs["head"] is not None:
            model.head.load_state_dict(inputs["head"])
        else:
            common.fresh_head(model.head, args.head)
        # The checkpoint: all of a run's state (plumbing.save_checkpoint adds "run", the run's flags).
        #   round                  rounds done (warm-up rounds included)
        #   rows                   metrics.csv so far, one row per round
        #   calibrated, calib_log  step 1 done (the mask is mask.pt), and its rounds (calibration.csv)
        #   head_info, head        step 0: how the head was made, and the head after it (head.pt)
        #   upload                 values the clients uploaded so far
        #   elapsed                seconds of work so far, across resumes
        #   model, scaler          from the first save on: the global model, the fp16 gradient scale
        #   algo                   from the first save on: the FL algorithm's state of the phase then running
        #                          (Phase.state_dict: server optimizer buffers, SCAFFOLD's c and c_i), or None
        ckpt = {"round": 0, "rows": [], "calib_log": [], "calibrated": False, "head_info": head_info,
                "upload": head_upload * args.k, "elapsed": 0.0, "head": plumbing.cpu_state(model.head)}
    else:
        plumbing.resuming(args, f"round {ckpt['round'] + 1} of {total_rounds}")
        model.load_state_dict(ckpt["model"])
    # the head after step 0 (ridge, a head.pt, or with --head warmup the random head before its warm-up
    # rounds); model.pt holds the final one. Rewritten from the checkpoint on resume: a head.pt damaged
    # meanwhile does not survive
    plumbing.atomic_save(ckpt["head"], os.path.join(args.out, "head.pt"))
    t0 = time.time() - ckpt["elapsed"]
    mask = common.load_mask(mask_path, model) if ckpt["calibrated"] else None
    mask = {n: m.to(device) for n, m in mask.items()} if mask else None
    scaler = plumbing.grad_scaler(device, args.precision)
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])

    def save():
        ckpt.update(model=plumbing.cpu_state(model), scaler=scaler.state_dict(), elapsed=time.time() - t0,
                    algo=phase.state_dict() if phase is not None else None)
        plumbing.save_checkpoint(ckpt, args)

    def evaluate(split, backbone_changed):
        if backbone_changed:
            return common.evaluate(model, *data[split], args, device)
        return common.evaluate_head(model.head, *feats[split])  # same numbers, no ViT pass

    if ckpt["round"] == 0 and not ckpt["rows"]:  # round 0: the head every curve leaves from
        row = {"round": 0, "train_loss": None, "update_norm": None, "agreement": None}
        for split in ("val", "test"):
            row[f"{split}_loss"], row[f"{split}_acc"] = evaluate(split, backbone_changed=feats is None)
        ckpt["rows"].append(row)
        plumbing.live_log(args, 0, row)
        print(f"round 0 (the head): val acc {row['val_acc']:.4f}  test acc {row['test_acc']:.4f}")
        if args.head != "warmup" and args.head not in common.FRESH_HEADS:  # at chance by design: trained in rounds
            common.check_head_accuracy(row["val_acc"], args)

    # -------- the rounds: head warm-up rounds; with --sparse, step 1 (the mask, once), then step 2

    phase, resumed_algo = None, ckpt.get("algo")
    head_rounds = "FedAvg head-only rounds (--train head)" if args.train == "head" else "FedAvg head warm-up rounds"
    watches = {True: common.LossWatch(head_rounds, f"a --head-lr below {args.head_lr:g}"),  # their rate
               False: common.LossWatch(f"{'sparse ' if args.sparse else ''}FedAvg rounds", f"a --lr below {args.lr:g}")}
    bar = tqdm(range(ckpt["round"], total_rounds), desc="rounds", disable=None)
    for rnd in bar:
        head_only = rnd < args.warmup_rounds or args.train == "head"
        if args.sparse and not head_only and not ckpt["calibrated"]:  # step 1, once the head is there
            mask, ckpt["calib_log"] = (given_mask, []) if given_mask is not None else \
                federated_mask(model, shards, x, args, device)
            common.save_mask(mask, mask_path)
            mask = {n: m.to(device) for n, m in mask.items()}
            ckpt["calibrated"] = True
            save()
        if rnd == args.warmup_rounds and measures_aug_gap(args) and "head_train_aug_acc" not in ckpt["rows"][rnd]:
            # the head the backbone is about to train under (round 0's, or after the warm-up rounds), on a
            # sample of the union of the shards: as if clients counted on their own images and the server added
            gap = common.augmentation_gap(model, *data["train"], args, device)
            ckpt["rows"][rnd].update(gap)
            common.warn_augmentation_gap(gap)
        if phase is None or phase.head_only != head_only:
            phase = Phase(model, args, None if head_only else mask, head_only)
            if resumed_algo is not None and resumed_algo["head_only"] == head_only:  # saved in this phase
                phase.load_state_dict(resumed_algo)
            resumed_algo = None  # saved in an earlier phase: this one starts afresh, as it did uninterrupted
        loss, norm, agreement = train_round(model, phase, shards, feats["train"][0] if head_only else x, y, rnd,
                                            args, device, scaler)
        watches[head_only].check(loss, f"round {rnd + 1}", scaler)  # before anything of this round is kept
        ckpt["upload"] += phase.upload * clients_per_round(args)
        ckpt["round"] = rnd + 1
        row = {"round": rnd + 1, "train_loss": loss, "update_norm": norm, "agreement": agreement}
        last = rnd + 1 == total_rounds
        for split, every in (("val", args.eval_every), ("test", args.test_every)):
            if (rnd + 1) % every == 0 or last:
                row[f"{split}_loss"], row[f"{split}_acc"] = evaluate(split, backbone_changed=not head_only)
            else:
                row[f"{split}_loss"] = row[f"{split}_acc"] = None
        ckpt["rows"].append(row)
        plumbing.live_log(args, row["round"], row)
        if row["val_acc"] is not None:
            watches[head_only].warn(loss, f"round {rnd + 1}")
            write_outputs(ckpt["rows"], args)
            bar.write(f"round {rnd + 1}: train loss {loss:.4f}  val acc {row['val_acc']:.4f}"
                      + (f"  test acc {row['test_acc']:.4f}" if row["test_acc"] is not None else ""))
        stop = plumbing.stop_requested()  # read once: a signal between two reads would skip the save
        if (rnd + 1) % args.ckpt_every == 0 or row["val_acc"] is not None or stop:
            save()
        if stop and not last:  # SLURM preemption / time limit: saved at this round boundary
            raise plumbing.Stopped(f"round {rnd + 1}", saved=True)

    # -------- results

    rows = ckpt["rows"]
    write_outputs(rows, args)
    if ckpt["calib_log"]:
        plumbing.write_csv(ckpt["calib_log"], os.path.join(args.out, "calibration.csv"))
    evaluated = [r for r in rows if r["val_acc"] is not None]
    best = max(evaluated, key=lambda r: r["val_acc"])  # first of equals wins
    per_client = values_per_client(trained_params(model, mask, args.train == "head"), mask, args)
    result = {"stage": "fedavg", "dataset": args.dataset, "seed": args.seed, "k": args.k, "c": args.c,
              "j": args.j, "rounds": args.rounds, "warmup_rounds": args.warmup_rounds, "split": args.split,
              "iid": args.iid, "nc": args.nc, "train": args.train, "sparse": args.sparse, "head": args.head,
              **ckpt["head_info"],
              **{k: rows[args.warmup_rounds].get(k) for k in ("head_train_acc", "head_train_aug_acc")},
              "score": args.score if args.sparse else None,
              "rule": args.rule if args.sparse and not args.mask else None,
              "sparsity": args.sparsity if args.sparse and not args.mask else None,
              "calib_rounds": args.calib_rounds if args.sparse and not args.mask else None, "mask_file": args.mask,
              "val_acc": rows[-1]["val_acc"], "test_acc": rows[-1]["test_acc"], "test_loss": rows[-1]["test_loss"],
              "best_val_acc": best["val_acc"], "best_round": best["round"],
              "clients_per_round": clients_per_round(args), "comm_values_per_client_round": per_client,
              "comm_mb_total": ckpt["upload"] * 4 / 1e6, "seconds": time.time() - t0}
    if args.sparse:
        changed, total = common.changed_count(model, pretrained)
        result.update(mask_kept_frac=common.mask_kept_frac(mask), changed_frac=changed / total)
    plumbing.atomic_save(plumbing.cpu_state(model), os.path.join(args.out, "model.pt"))
    plumbing.finish_run(result, args)
    print(f"test acc {result['test_acc']:.4f} after {total_rounds} rounds (best val {best['val_acc']:.4f} at "
          f"round {best['round']}); results in {args.out}")


if __name__ == "__main__":
    plumbing.run_main(main)
