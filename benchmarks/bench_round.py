"""Benchmark: a FedAvg round against the compute floor and against a typical student implementation.

Prints one table of ratios, measured on whatever device it runs on (CPU here; the same command on a GPU):

  time   (interleaved repetitions in one process, median of the per-repetition ratios)
    floor         a bare loop: the same forward + backward + SGD step calls on one model, batches ready
    ours dense    fedavg.train_round (no augmentation, like the floor)
    ours sparse   fedavg.train_round with a 10% mask (SparseSGDM, frozen head)
    user dense,   fedavg.py's path, what a user's round costs (user_round): fedavg.train_round with the
    user sparse   augmentation on, sparse with the mask fedavg.federated_mask calibrates (the defaults), and
                  the round's share of fedavg.py's evaluation cadence; dense
                  also without that share (its training only)
    peer-style    what published student projects do: a deepcopy of the global model per client, a torch
                  DataLoader over a Subset with PIL transforms, state_dict averaging
    SparseSGDM step / torch.optim.SGD step (foreach), the whole model's parameters
    federated calibration (clients' images scored in shared batches) / central, per scored image
    evaluation share of a default fedavg.py run (its --eval-every and --test-every)
  memory (each in a fresh subprocess, so every peak is its own)
    peer-style / ours, and ours for K = 10, 100, 1000 clients

    python benchmarks/bench_round.py                               # ViT-S/16 at 32 px, batch 8: minutes on a CPU
    python benchmarks/bench_round.py --img-size 224 --batch 64     # the real setting (on a GPU)
    ... --profile 3      # and where the time goes: the profiler's top operators, host syncs per round
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isolated import run_isolated  # noqa: E402  (benchmarks/ is on the path: it holds this script)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import fedavg  # noqa: E402
import plumbing  # noqa: E402


# ----------------------------------------------------------------------------- set-up

def setup(a, k=None):
    """Model, data (random uint8 CIFAR-shaped images on the device), shards, args, a random 10% mask."""
    argv = ["--arch", a.arch, "--img-size", str(a.img_size), "--no-pretrained", "--k", str(k or a.k),
            "--c", str(a.c * a.k / (k or a.k)), "--j", str(a.j), "--batch-size", str(a.batch), "--no-aug"]
    args = fedavg.get_args(argv + (["--device", a.device] if a.device else []))
    device = plumbing.pick_device(args.device)
    args.precision = plumbing.resolve_amp("auto", device)
    model = common.build_model(args).to(device)
    n = args.k * a.per_client
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g).to(device)
    y = (torch.arange(n) % common.NUM_CLASSES).to(device)
    shards = list(torch.arange(n).chunk(args.k))
    # a random 10% mask, drawn tensor by tensor (select_mask's global sort would set the memory peak)
    mask = {n: (torch.rand(p.shape, generator=g) < 0.1).to(device) for n, p in common.masked_params(model)}
    return args, device, model, x, y, shards, mask


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the four round implementations

def floor_round(model, x, y, shards, rnd, args, device):
    """The compute floor: the forward/backward/step calls of a round, nothing else."""
    model.requires_grad_(True)  # train_round leaves every parameter frozen between rounds
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    model.train()
    for c in fedavg.sample_clients(args, rnd):
        idx = fedavg.local_batches(shards[c], args.j, args.batch_size, plumbing.make_generator(rnd, c)).to(device)
        for s in range(args.j):
            loss = F.cross_entropy(common.forward_logits(model, common.preprocess(x[idx[s]], args.img_size), device,
                                                         args.precision), y[idx[s]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def ours_round(model, x, y, shards, rnd, args, device, phase):
    """fedavg.py's round; `phase` = fedavg.Phase(...), made once per run as fedavg.py does."""
    fedavg.train_round(model, phase, shards, x, y, rnd, args, device, plumbing.grad_scaler(device, args.precision))


class PilDataset(torch.utils.data.Dataset):
    """CIFAR-style dataset of PIL images with torchvision transforms, as the student projects have it."""

    def __init__(self, x, y, img_size):
        import torchvision.transforms as T
        self.x, self.y = x.cpu().numpy(), y.cpu().tolist()
        self.t = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.Resize(img_size),
                            T.ToTensor(), T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image
        return self.t(Image.fromarray(self.x[i])), self.y[i]


def user_round(model, x, y, shards, rnd, args, device, phase, evals):
    """A round of fedavg.main as a user runs it (args without --no-aug; phase made with the calibrated mask
    or none): train_round and the round's share of the evaluation cadence: `evals`,
    the (images, labels) of 1/--eval-every of the validation set and 1/--test-every of the test set,
    through common.evaluate as main evaluates them (the loss check and the metrics row cost nothing)."""
    ours_round(model, x, y, shards, rnd, args, device, phase)
    for xs, ys in evals:
        common.evaluate(model, xs, ys, args, device)


def user_setup(model, x, y, shards, args, device):
    """(args, the calibrated mask on the device, evals) of user_round: fedavg.py's flags (the defaults but
    for the benchmark's size flags), augmentation on, the mask as fedavg.main calibrates it, and the
    evaluation shares of CIFAR-100's 5000 validation and 10000 test images."""
    user = argparse.Namespace(**dict(vars(args), no_aug=False))
    mask, _ = fedavg.federated_mask(model, shards, x, common.Calibration.of(user), user.seed, user.img_size, device)
    mask = {n: m.to(device) for n, m in mask.items()}
    evals = [(x[:math.ceil(n / every)], y[:math.ceil(n / every)])
             for n, every in ((5000, user.eval_every), (10000, user.test_every))]
    return user, mask, evals


def peer_round(model, dataset, shards, rnd, args, device):
    """Deepcopy per client, DataLoader over a Subset, state_dict averaging."""
    states, sizes = [], []
    model.requires_grad_(True)
    for c in fedavg.sample_clients(args, rnd):
        local = copy.deepcopy(model)
        local.train()
        opt = torch.optim.SGD(local.parameters(), lr=args.lr, momentum=args.momentum)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shards[c].tolist()),
                                             batch_size=args.batch_size, shuffle=True)
        it = iter(loader)
        for _ in range(args.j):
            try:
                xb, yb = next(it)
            except StopIteration:
                it = iter(loader)
                xb, yb = next(it)
            xb, yb = xb.to(device), yb.to(device)
            with plumbing.autocast(device, args.precision):
                loss = F.cross_entropy(local(xb).float(), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        states.append(copy.deepcopy(local.state_dict()))
        sizes.append(len(shards[c]))
    total = sum(sizes)
    model.load_state_dict({k: sum(s[k] * (n / total) for s, n in zip(states, sizes)) for k in states[0]})


# ----------------------------------------------------------------------------- time (interleaved)

def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def time_rounds(a):
    args, device, model, x, y, shards, mask = setup(a)
    dataset = PilDataset(x, y, a.img_size)
    dense, sparse = fedavg.Phase(model, args), fedavg.Phase(model, args, mask)
    user, user_mask, evals = user_setup(model, x, y, shards, args, device)
    user_dense, user_sparse = fedavg.Phase(model, user), fedavg.Phase(model, user, user_mask)
    variants = {
        "floor": lambda r: floor_round(model, x, y, shards, r, args, device),
        "ours dense": lambda r: ours_round(model, x, y, shards, r, args, device, dense),
        "ours sparse": lambda r: ours_round(model, x, y, shards, r, args, device, sparse),
        "peer-style": lambda r: peer_round(model, dataset, shards, r, args, device),
        "user dense (training)": lambda r: user_round(model, x, y, shards, r, user, device, user_dense, []),
        "user dense": lambda r: user_round(model, x, y, shards, r, user, device, user_dense, evals),
        "user sparse": lambda r: user_round(model, x, y, shards, r, user, device, user_sparse, evals),
    }
    for fn in variants.values():  # warm-up (allocator, kernels)
        fn(0)
    times = {name: [] for name in variants}
    for rep in range(a.reps):
        for name, fn in variants.items():
            times[name].append(timed(lambda: fn(rep + 1), device))
    ratio = {name: statistics.median(t / f for t, f in zip(ts, times["floor"])) for name, ts in times.items()}
    profiles = profile_rounds(variants, ("floor", "user dense", "user sparse"), a.profile, device) if a.profile else []
    return times, ratio, profiles, (args, device, model, x, y, shards, mask)


# Host-side events that wait for the device: each one drains the GPU's queue of work.
HOST_SYNCS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def profile_rounds(variants, names, rounds, device):
    """Where a round's time goes beyond the floor's: for each named variant, `rounds` rounds under
    torch.profiler, as its table of the top operators by self time on the device (the CPU on a CPU) and
    the host syncs per round."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    out = []
    for name in names:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for r in range(rounds):
                variants[name](1000 + r)
            sync(device)
        events = prof.key_averages()
        syncs = sum(e.count for e in events if e.key in HOST_SYNCS) / rounds
        out.append(f"\n{name}: {rounds} round(s) profiled, {syncs:.0f} host syncs per round\n" +
                   events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=15))
    return out


def time_optimizers(model, mask, device, reps):
    """SparseSGDM (10% mask on the masked tensors, the rest dense) vs torch.optim.SGD(foreach=True)."""
    params = [p for _, p in model.named_parameters()]
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.randn_like(p) * 1e-3
    masks = [mask.get(n) for n, _ in model.named_parameters()]
    sparse = common.SparseSGDM(params, masks, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    dense = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4, foreach=True)
    ratios = []
    for _ in range(reps):
        ts = timed(lambda: [sparse.step() for _ in range(10)], device)
        td = timed(lambda: [dense.step() for _ in range(10)], device)
        ratios.append(ts / td)
    return statistics.median(ratios)


def time_calibration(a, model, x, shards, args, device, reps):
    """Per scored image: the federated score of one calibration round (each client's images, scored in
    shared batches) vs a central one on as many images; and vs one call per client (how it was scored
    before the shared batches)."""
    per_client = math.ceil(8 * 32 / len(shards))
    u = torch.rand(per_client * len(shards), dtype=torch.float64)
    idx = torch.cat([s[:per_client] for s in shards]).to(device)
    central = torch.randperm(len(x))[:len(idx)].to(device)
    out = {"federated": [], "central": [], "one call per client": []}
    for _ in range(reps):
        out["federated"].append(timed(lambda: common.fisher_sums(model, x[idx], u, args.img_size, 32, device), device))
        out["central"].append(timed(lambda: common.fisher_sums(model, x[central], u, args.img_size, 32, device), device))
        out["one call per client"].append(timed(lambda: [
            common.fisher_sums(model, x[idx[i:i + per_client]], u[i:i + per_client], args.img_size, 32, device)
            for i in range(0, len(idx), per_client)], device))
    return {k: statistics.median(v) / statistics.median(out["central"]) for k, v in out.items()}


def evaluation_share(model, x, y, shards, args, device):
    """Share of a default fedavg.py run's time spent evaluating: CIFAR-100's 5000 validation images
    every --eval-every rounds and 10000 test images every --test-every rounds (their defaults), from
    the measured time of one evaluated image (--eval-batch-size) and of one round at the default
    client batch size."""
    default = fedavg.get_args([])
    n = min(len(x), 1024)
    args.eval_batch_size = default.eval_batch_size
    per_image = timed(lambda: common.evaluate(model, x[:n], y[:n], args, device), device) / n
    run = argparse.Namespace(**dict(vars(args), batch_size=default.batch_size))
    phase = fedavg.Phase(model, run)
    ours_round(model, x, y, shards, 0, run, device, phase)  # warm-up
    per_round = statistics.median(timed(lambda: ours_round(model, x, y, shards, r, run, device, phase), device)
                                  for r in range(1, 4))
    per_round_eval = per_image * (5000 / default.eval_every + 10000 / default.test_every)
    return per_round_eval / (per_round_eval + per_round)


# ----------------------------------------------------------------------------- memory (one subprocess each)

def proc_status_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def measure_memory(cfg):
    a = argparse.Namespace(**cfg)
    args, device, model, x, y, shards, mask = setup(a, k=cfg["k"])
    dataset = PilDataset(x, y, a.img_size) if cfg["kind"] == "peer-style" else None
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = proc_status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak (VmHWM) to the current RSS
            f.write("5")
    for r in range(2):
        if cfg["kind"] == "peer-style":
            peer_round(model, dataset, shards, r, args, device)
        else:
            ours_round(model, x, y, shards, r, args, device,
                       fedavg.Phase(model, args, mask if cfg["kind"] == "ours sparse" else None))
    sync(device)
    if device.type == "cuda":
        peak, what = (torch.cuda.max_memory_allocated(device) - base) / 2**20, "GPU MiB allocated above model+data"
    else:
        peak, what = proc_status_mib("VmHWM") - base, "CPU peak RSS above model + data (MiB)"
    return dict(cfg, peak_mib=peak, what=what)


# ----------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_small_patch16_224", help="timm ViT, random weights")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--c", type=float, default=0.1)
    p.add_argument("--j", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--per-client", type=int, default=40, help="images per client")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the ratios are per thread)")
    p.add_argument("--device", default=None)
    p.add_argument("--profile", type=int, default=0,
                   help="also profile this many rounds of the floor and of the user rounds (torch.profiler)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one memory config as JSON
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(measure_memory(json.loads(a.one))))
        return
    times, ratio, profiles, (args, device, model, x, y, shards, mask) = time_rounds(a)
    opt_ratio = time_optimizers(model, mask, device, a.reps)
    calib = time_calibration(a, model, x, shards, args, device, max(3, a.reps // 2))
    share = evaluation_share(model, x, y, shards, args, device)
    base = {k: v for k, v in vars(a).items() if k not in ("one", "reps")}
    mem = run_isolated(__file__, [dict(base, kind=kind, k=a.k) for kind in ("ours dense", "peer-style")] +
                       [dict(base, kind="ours dense", k=k) for k in (10, 1000)],
                       lambda cfg: f"{cfg['kind']} K={cfg['k']}")
    peak = {(m["kind"], m["k"]): m["peak_mib"] for m in mem}

    print(f"\nFedAvg round, {a.arch} (random weights) at {a.img_size} px, K={a.k}, C={a.c}, J={a.j}, batch {a.batch}, "
          f"device {device}, {torch.get_num_threads()} thread(s), precision {args.precision}, "
          f"{a.reps} interleaved repetitions (median ratio)\n")
    print(f"| {'what':<48} | {'value':>8} |")
    print(f"|{'-' * 50}|{'-' * 10}|")
    rows = [("floor, seconds per round", statistics.median(times["floor"]), ".3f"),
            ("dense FedAvg round / floor", ratio["ours dense"], ".3f"),
            ("sparse FedAvg round / floor", ratio["ours sparse"], ".3f"),
            ("user dense round (fedavg.py's path) / floor", ratio["user dense"], ".3f"),
            ("  (its training only / floor)", ratio["user dense (training)"], ".3f"),
            ("user sparse round (fedavg.py's path) / floor", ratio["user sparse"], ".3f"),
            ("peer-style round / ours dense", ratio["peer-style"] / ratio["ours dense"], ".3f"),
            ("SparseSGDM step / torch.optim.SGD step (foreach)", opt_ratio, ".3f"),
            ("federated calibration / central, per image", calib["federated"], ".3f"),
            ("  (one fisher call per client / central)", calib["one call per client"], ".3f"),
            ("evaluation share of a default run", share, ".1%")]
    if peak.get(("ours dense", a.k)) and ("peer-style", a.k) in peak:
        rows.append(("peak memory, peer-style / ours", peak[("peer-style", a.k)] / peak[("ours dense", a.k)], ".2f"))
    for k in (10, a.k, 1000):
        if ("ours dense", k) in peak:
            rows.append((f"peak memory, ours, K={k} (MiB)", peak[("ours dense", k)], ".0f"))
    for name, v, fmt in rows:
        print(f"| {name:<48} | {format(v, fmt):>8} |")
    if mem:
        print(f"\nmemory: {mem[0]['what']}")
    print(*profiles, sep="\n")


if __name__ == "__main__":
    main()
