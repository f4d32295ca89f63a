"""Benchmark: peak memory and time of FedAvg rounds, for several numbers of clients K.

Clients train one after another in the one model, so peak memory must not grow with K: it is the
model, the server's copy of the global weights and running average of updates, one client's optimizer
state and the activations of one batch. Each configuration runs in a fresh subprocess (its own peak)
on a randomly initialized model and random CIFAR-shaped images (memory and speed do not depend on
values). Prints a table.

    python benchmarks/bench_fedavg.py                        # ViT-S/16 at 224 px, on GPU if there is one
    python benchmarks/bench_fedavg.py --arch test_vit --img-size 32     # seconds, any laptop
"""
import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isolated import run_isolated  # noqa: E402  (benchmarks/ is on the path: it holds this script)


def measure(cfg):
    """Run `rounds` FedAvg rounds in this process; return a dict of measurements."""
    import torch
    import common as C
    import fedavg
    argv = ["--arch", cfg["arch"], "--img-size", str(cfg["img_size"]), "--no-pretrained", "--k", str(cfg["k"]),
            "--c", str(cfg["c"]), "--j", str(cfg["j"]), "--batch-size", str(cfg["batch"])]
    argv += ["--sparse", "--mask", "x"] if cfg["sparse"] else []
    argv += ["--device", cfg["device"]] if cfg["device"] else []
    args = fedavg.get_args(argv)
    device = C.pick_device(args.device)
    model = C.build_model(args).to(device)
    n = cfg["k"] * cfg["per_client"]
    x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, device=device)
    y = torch.arange(n, device=device) % C.NUM_CLASSES
    shards = list(torch.arange(n).chunk(cfg["k"]))
    mask = None
    if cfg["sparse"]:  # a random 10% mask: memory does not depend on which weights are kept
        params = dict(C.backbone_params(model))
        total = sum(p.numel() for p in params.values())
        mask = C.select_mask(None, "random", total // 10, gen=C.make_generator(0), params=params)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    for rnd in range(cfg["rounds"]):
        fedavg.fedavg_round(model, shards, x, y, args, device, rnd, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak, kind = torch.cuda.max_memory_allocated() / 2**30, "GPU memory allocated (all of it)"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "CPU peak RSS of the process"
    params = sum(p.numel() for p in model.parameters())
    return dict(cfg, seconds_per_round=(time.time() - t) / cfg["rounds"], peak_gib=peak, peak_kind=kind,
                params_m=params / 1e6, device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_small_patch16_224.dino")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--ks", default="10,100", help="numbers of clients to compare (default: 10,100)")
    p.add_argument("--c", type=float, default=0.1, help="fraction of clients per round (default: 0.1)")
    p.add_argument("--j", type=int, default=4, help="local steps (default: 4)")
    p.add_argument("--batch", type=int, default=64, help="client batch size (default: 64, fedavg.py's)")
    p.add_argument("--per-client", type=int, default=450, help="samples per client (default: 450, CIFAR-100/100)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config as JSON
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(json.loads(a.one))))
        return
    # the same number of clients per round for every K: only K itself changes
    cfgs = [dict(arch=a.arch, img_size=a.img_size, k=k, c=min(1.0, a.c * 100 / k), j=a.j, batch=a.batch,
                 per_client=a.per_client, rounds=a.rounds, sparse=sparse, device=a.device)
            for sparse in (False, True) for k in [int(v) for v in a.ks.split(",")]]
    rows = run_isolated(__file__, cfgs, lambda cfg: f"K={cfg['k']} sparse={cfg['sparse']}")
    r0 = rows[0]
    print(f"\nFedAvg rounds, {r0['arch']} ({r0['params_m']:.1f}M weights) at {r0['img_size']} px, batch {r0['batch']}, "
          f"J={r0['j']}, device {r0['device_name']}; peak = {r0['peak_kind']}\n")
    print(f"| {'clients K':>9} | {'per round':>9} | {'mode':<6} | {'s/round':>7} | {'peak GiB':>8} |")
    print(f"|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 9}|{'-' * 10}|")
    for r in rows:
        per_round = round(r["c"] * r["k"])
        mode = "sparse" if r["sparse"] else "dense"
        print(f"| {r['k']:>9} | {per_round:>9} | {mode:<6} | {r['seconds_per_round']:>7.2f} | {r['peak_gib']:>8.2f} |")


if __name__ == "__main__":
    main()
