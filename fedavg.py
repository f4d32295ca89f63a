"""Federated Averaging (McMahan et al. 2017) of the DINO ViT-S/16 classifier, simulated on one device.

K clients hold disjoint shards of the training set (IID, or Nc classes each). Every round the server
samples ceil(C*K) clients; each starts from the global model, takes J SGD-momentum steps on its own
shard, and the server averages the client models weighted by shard size. Clients train one after
another in the same model, so 100 clients never mean 100 model copies.

--sparse runs the same with a gradient mask (TaLoS, from --mask or calibrated federatedly) and
SparseSGDM: masked-out backbone weights of the global model never change. Example:
    python fedavg.py --nc 5 --j 8 --sparse
"""
import math
import os
import time

import torch

import common as C


def get_args(argv=None):
    p = C.Parser(parents=[C.base_parser(), C.mask_parser()], description=__doc__.split("\n")[0])
    p.set_defaults(batch_size=64)
    g = p.add_argument_group("federation")
    g.add_argument("--k", type=C.positive_int, default=100, help="number of clients (default: 100)")
    g.add_argument("--c", type=float, default=0.1,
                   help="fraction of clients sampled per round, in (0, 1] (default: 0.1)")
    g.add_argument("--j", type=C.positive_int, default=4,
                   help="local steps (optimizer steps) per client per round (default: 4)")
    g.add_argument("--rounds", type=C.positive_int, default=300, help="communication rounds (default: 300)")
    g.add_argument("--scale-rounds", action="store_true",
                   help="--rounds is the count for J=4; run rounds*4/J so total local work is equal across J")
    g.add_argument("--iid", action="store_true", help="IID shards (the default when --nc is not given)")
    g.add_argument("--nc", type=int, default=None, help="non-IID: every client holds exactly NC classes")
    g.add_argument("--eval-every", type=C.positive_int, default=10,
                   help="evaluate the global model on validation and test every N rounds (default: 10)")
    g.add_argument("--ckpt-every", type=C.positive_int, default=5, help="checkpoint every N rounds (default: 5)")
    g = p.add_argument_group("local training")
    g.add_argument("--lr", type=C.nonneg_float, default=0.01, help="client learning rate (default: 0.01)")
    g.add_argument("--momentum", type=C.unit_float, default=0.9,
                   help="client momentum; a fresh buffer for every client and round (default: 0.9)")
    g.add_argument("--wd", type=C.nonneg_float, default=0.0, help="client weight decay (default: 0)")
    g.add_argument("--train", choices=["all", "head"], default="all",
                   help="what clients train: the whole model (default) or the linear head on the frozen backbone")
    g.add_argument("--warmup-rounds", type=C.nonneg_int, default=0,
                   help="extra rounds first that train only the head (federated, not scaled; default: 0)")
    g.add_argument("--no-aug", action="store_true", help="no random crop / flip on the clients")
    g = p.add_argument_group("sparse FedAvg")
    g.add_argument("--sparse", action="store_true",
                   help="clients update only masked-in backbone weights with SparseSGDM (the head stays dense)")
    g.add_argument("--mask", default=None,
                   help="mask.pt from model_editing.py; without it the mask is calibrated federatedly")
    args = p.parse_args(argv)
    if not 0 < args.c <= 1:
        p.error(f"--c must be in (0, 1], got {args.c}")
    if args.k * args.c < 1:
        p.error(f"--k {args.k} x --c {args.c} < 1: no client would be sampled")
    if args.nc is not None and args.iid:
        p.error("--iid and --nc exclude each other")
    if args.nc is not None and not 1 <= args.nc <= C.NUM_CLASSES:
        p.error(f"--nc must be in 1..{C.NUM_CLASSES}, got {args.nc}")
    if args.nc is not None and args.k * args.nc < C.NUM_CLASSES:
        p.error(f"--k x --nc must be >= {C.NUM_CLASSES} so that every class (every sample) has a client")
    if args.mask and not args.sparse:
        p.error("--mask needs --sparse")
    if args.sparse and args.train == "head":
        p.error("--sparse masks the backbone; it cannot go with --train head")
    args.iid = args.nc is None
    if args.scale_rounds:
        args.rounds = max(1, round(args.rounds * 4 / args.j))
    if args.out is None:  # e.g. runs/fedavg/nc5-j8-r150-sparse_least-sensitive_s0.9_r4-seed0
        sparse = (f"sparse_mask_{os.path.basename(os.path.dirname(os.path.abspath(args.mask)))}" if args.mask else
                  f"sparse_{args.rule}_s{args.sparsity}_r{args.calib_rounds}") if args.sparse else "dense"
        args.out = C.default_out("fedavg", {"": args.dataset if args.dataset != "cifar100" else None,
                                            "iid" if args.iid else "nc": "" if args.iid else args.nc,
                                            "j": args.j, "r": args.rounds, "headonly": "" if args.train == "head" else None,
                                            "warm": args.warmup_rounds or None, sparse: "", "seed": args.seed})
    return args


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
            raise C.UserError(f"class {c} has {len(idx)} samples for {len(holders[c])} clients; "
                              f"use fewer clients (--k) or classes per client (--nc)")
        idx = idx[torch.randperm(len(idx), generator=gen)]
        for client, piece in zip(holders[c], torch.tensor_split(idx, len(holders[c]))):
            shards[client].append(piece)
    return [torch.sort(torch.cat(s)).values for s in shards]


def make_shards(labels, args):
    gen = C.make_generator(args.seed, 47)
    if args.iid:
        return iid_shards(labels, args.k, gen)
    return noniid_shards(labels, args.k, args.nc, gen)


# ----------------------------------------------------------------------------- one round

def clients_per_round(args):
    return math.ceil(args.c * args.k - 1e-9)  # the epsilon: 0.1 * 100 is 10.000000000000002 in floats


def sample_clients(args, rnd):
    """ceil(C*K) distinct clients, a function of (seed, round) only: a resumed run draws the same ones."""
    return torch.randperm(args.k, generator=C.make_generator(args.seed, rnd, 53))[:clients_per_round(args)].tolist()


def local_batches(shard, j, batch_size, gen):
    """J batches of sample indices from one shard, walking through fresh permutations of it
    (every sample is seen once before any is seen twice). A batch never exceeds the shard."""
    b = min(batch_size, len(shard))
    perms, n = [], 0
    while n < j * b:
        perms.append(shard[torch.randperm(len(shard), generator=gen)])
        n += len(shard)
    flat = torch.cat(perms)
    return [flat[s * b:(s + 1) * b] for s in range(j)]


def make_optimizer(params, mask, args):
    """Plain SGD for dense clients; SparseSGDM when a mask covers the backbone (the head, not in the
    mask, stays dense). Created anew for every client: no momentum leaks between clients or rounds."""
    tensors = [p for _, p in params]
    if mask is None:
        return torch.optim.SGD(tensors, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    return C.SparseSGDM(tensors, [mask.get(n) for n, _ in params], lr=args.lr, momentum=args.momentum,
                        weight_decay=args.wd)


def client_update(model, params, mask, shard, x, y, args, device, rnd, client):
    """J local steps of one client, starting from whatever weights `model` holds. Returns mean loss."""
    opt = make_optimizer(params, mask, args)
    batches = local_batches(shard, args.j, args.batch_size, C.make_generator(args.seed, rnd, client, 59))
    losses = []
    for s, idx in enumerate(batches):
        gen = None if args.no_aug else C.make_generator(args.seed, rnd, client, s, 61)
        losses.append(C.train_step(model, opt, x[idx], y[idx], args, device, gen))
    return sum(losses) / len(losses)


def trainable(model, head_only):
    """(name, param) trained this round; everything else is frozen (no gradient computed)."""
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(not head_only or n.startswith("head."))
        if p.requires_grad:
            params.append((n, p))
    return params


def fedavg_round(model, shards, x, y, args, device, rnd, mask=None, head_only=False):
    """One round: sampled clients train in turn from the global weights (held in `model`), the server
    averages their updates weighted by shard size and applies them to `model`. Returns mean client loss.

    The server keeps a running average of the updates (client - global), not of the weights: an entry
    no client changed (masked out, or frozen) gets an update of exactly 0 and stays bit-for-bit the same,
    where averaging the weights themselves could round it."""
    params = trainable(model, head_only)
    clients = sample_clients(args, rnd)
    total = sum(len(shards[c]) for c in clients)
    global_w = {n: p.detach().clone() for n, p in params}
    update = {n: torch.zeros_like(p) for n, p in params}
    losses = []
    for c in clients:
        losses.append(client_update(model, params, mask, shards[c], x, y, args, device, rnd, c))
        with torch.no_grad():
            for n, p in params:
                update[n].add_(p - global_w[n], alpha=len(shards[c]) / total)
                p.copy_(global_w[n])  # the next client starts from the global model again
    with torch.no_grad():
        for n, p in params:
            p.add_(update[n])
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- federated mask calibration

def federated_mask(model, shards, x, args, device):
    """Calibrate the mask without pooling data: in every calibration round each of the K clients scores
    its own images (sum of squared per-sample gradients, labels sampled from the model) and sends the
    per-weight sums and its sample count; the server adds them up and divides by the total count, i.e.
    the Fisher over the union of the scored samples (client Fishers averaged, weighted by sample count).
    The --fisher-batches x --fisher-batch-size images of a round are split evenly over the clients."""
    per_client = math.ceil(args.fisher_batches * args.fisher_batch_size / args.k)
    calib_round = {"r": 0}

    def score(mask):
        calib_round["r"] += 1
        total, count = None, 0
        for client, shard in enumerate(shards):
            gen = C.make_generator(args.seed, calib_round["r"], client, 67)
            s, n = C.fisher_scores(model, C.calibration_batches(x[shard], per_client, args, device, gen),
                                   device, gen, mask=mask, damp=args.calib_damp, chunk=args.fisher_chunk)
            if total is None:
                total = s
            else:
                for k in total:
                    total[k] += s[k]
            count += n
        return {k: v / count for k, v in total.items()}

    mask, log = C.calibrate_mask(model, score, args.rule, args.sparsity, args.calib_rounds,
                                 C.make_generator(args.seed, 37))
    for row in log:
        print(f"  calibration round {row['round']}: keep {row['kept']} weights ({row['kept_frac']:.4%})")
    return mask, log


# ----------------------------------------------------------------------------- main

def write_outputs(rows, args):
    C.write_csv(rows, os.path.join(args.out, "metrics.csv"))
    r = [row["round"] for row in rows]
    name = f"FedAvg {'IID' if args.iid else f'Nc={args.nc}'}, J={args.j}{', sparse' if args.sparse else ''}"
    C.plot_lines(os.path.join(args.out, "accuracy.png"), {s: (r, [row[f"{s}_acc"] for row in rows])
                                                         for s in ("val", "test")},
                 "round", "top-1 accuracy", name)
    C.plot_lines(os.path.join(args.out, "loss.png"), {s: (r, [row[f"{s}_loss"] for row in rows])
                                                     for s in ("val", "test")},
                 "round", "cross-entropy", name)


def main(argv=None):
    from tqdm import tqdm
    args = get_args(argv)
    prepared = C.prepare(args)
    if prepared is None:
        return
    device, data, model = prepared
    given_mask = C.load_mask(args.mask, model) if args.mask else None
    shards = make_shards(data["train"][1], args)  # may refuse a combination the data cannot shard
    ckpt = C.open_run(args)
    x, y = (t.to(device) for t in data["train"])  # uint8: the whole training set fits on any GPU
    total_rounds = args.warmup_rounds + args.rounds
    print(f"{args.k} clients ({'IID' if args.iid else f'{args.nc} classes each'}, "
          f"{min(map(len, shards))}-{max(map(len, shards))} samples), {clients_per_round(args)} per "
          f"round, J={args.j}, {args.warmup_rounds} head warm-up + {args.rounds} rounds"
          f"{' (scaled from J=4)' if args.scale_rounds else ''}")
    initial = {n: p.detach().cpu().clone() for n, p in C.backbone_params(model)} if args.sparse else None
    if ckpt is None:
        C.write_csv([{"client": i, "samples": len(s), "classes": len(torch.unique(y[s.to(device)]))}
                     for i, s in enumerate(shards)], os.path.join(args.out, "shards.csv"))
        ckpt = {"round": 0, "rows": [], "losses": [], "calib_log": [], "elapsed": 0.0}
        if given_mask is not None:
            C.save_mask(given_mask, os.path.join(args.out, "mask.pt"))
    else:
        model.load_state_dict(ckpt["model"])
    t0 = time.time() - ckpt["elapsed"]
    mask_path = os.path.join(args.out, "mask.pt")
    mask = None
    if os.path.isfile(mask_path):  # given, or calibrated before an interruption
        mask = {n: m.to(device) for n, m in C.load_mask(mask_path, model).items()}

    def save():
        ckpt.update(model=model.state_dict(), elapsed=time.time() - t0)
        C.save_checkpoint(ckpt, args)

    bar = tqdm(range(ckpt["round"], total_rounds), desc="rounds", disable=None)
    for rnd in bar:
        head_only = rnd < args.warmup_rounds or args.train == "head"
        if args.sparse and not head_only and mask is None:  # after the head warm-up: the Fisher needs a head
            mask, ckpt["calib_log"] = federated_mask(model, shards, x, args, device)
            C.save_mask(mask, mask_path)
            save()
        ckpt["losses"].append(fedavg_round(model, shards, x, y, args, device, rnd,
                                           None if head_only else mask, head_only))
        ckpt["round"] = rnd + 1
        if ckpt["round"] % args.eval_every == 0 or ckpt["round"] == total_rounds:
            row = dict(round=ckpt["round"], train_loss=sum(ckpt["losses"]) / len(ckpt["losses"]),
                       **C.evaluate_splits(model, data, args, device))
            ckpt["rows"].append(row)
            ckpt["losses"] = []
            write_outputs(ckpt["rows"], args)
            bar.write(f"round {row['round']}: train loss {row['train_loss']:.4f}  val acc {row['val_acc']:.4f}  "
                      f"test acc {row['test_acc']:.4f}")
        if ckpt["round"] % args.ckpt_every == 0 or ckpt["round"] % args.eval_every == 0:
            save()

    rows = ckpt["rows"]  # metrics.csv and the plots were written at the last round's evaluation
    if ckpt["calib_log"]:
        C.write_csv(ckpt["calib_log"], os.path.join(args.out, "calibration.csv"))
    best = max(rows, key=lambda r: r["val_acc"])  # first of equals wins
    result = {"stage": "fedavg", "dataset": args.dataset, "seed": args.seed, "k": args.k, "c": args.c,
              "j": args.j, "rounds": args.rounds, "warmup_rounds": args.warmup_rounds, "iid": args.iid,
              "nc": args.nc, "train": args.train, "sparse": args.sparse,
              "rule": args.rule if args.sparse and not args.mask else None,
              "sparsity": args.sparsity if args.sparse and not args.mask else None, "mask_file": args.mask,
              "val_acc": rows[-1]["val_acc"], "test_acc": rows[-1]["test_acc"], "test_loss": rows[-1]["test_loss"],
              "best_val_acc": best["val_acc"], "best_round": best["round"],
              "test_acc_at_best_val": best["test_acc"], "seconds": time.time() - t0}
    if args.sparse:
        params = C.backbone_params(model)
        changed = sum(int((p.detach().cpu() != initial[n]).sum()) for n, p in params)
        result.update(mask_kept_frac=C.mask_density(mask), changed_frac=changed / sum(p.numel() for _, p in params))
    C.atomic_save(model.state_dict(), os.path.join(args.out, "model.pt"))
    C.finish_run(result, args)
    print(f"test acc {result['test_acc']:.4f} after {total_rounds} rounds (best val {best['val_acc']:.4f} at "
          f"round {best['round']}); results in {args.out}")


if __name__ == "__main__":
    C.run_main(main)
