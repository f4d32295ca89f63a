"""Benchmark: Fisher scoring (per-sample squared gradients) time and peak memory.

Compares the vmap estimator used by common.fisher_scores at several chunk sizes with the slow
per-sample backward loop, on a randomly initialized model (no weights needed: memory and speed
do not depend on the weight values). Each configuration runs in a fresh subprocess so that peak
memory is its own. Prints a table.

    python benchmarks/bench_fisher.py                       # ViT-S/16 at 224 px, on GPU if there is one
    python benchmarks/bench_fisher.py --arch test_vit --img-size 32 --samples 64   # seconds, any laptop
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
    """Run one configuration in this process; return a dict of measurements."""
    import torch
    import common as C
    p = argparse.ArgumentParser(parents=[C.base_parser()])
    args = p.parse_args(["--arch", cfg["arch"], "--img-size", str(cfg["img_size"]), "--no-pretrained"])
    device = C.pick_device(cfg["device"])
    model = C.build_model(args).to(device)
    x = torch.randn(cfg["samples"], 3, cfg["img_size"], cfg["img_size"], device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.time()
    if cfg["chunk"] == 0:  # reference: one backward per sample
        gen = C.make_generator(0)
        scores = {n: torch.zeros_like(q) for n, q in C.backbone_params(model)}
        with torch.no_grad():
            y = C.sample_labels(model(x), gen)
        for i in range(len(x)):
            model.zero_grad()
            torch.log_softmax(model(x[i:i + 1]), 1)[0, y[i]].backward()
            for n, q in C.backbone_params(model):
                scores[n] += q.grad ** 2
    else:
        batches = [x[i:i + cfg["batch"]] for i in range(0, len(x), cfg["batch"])]
        C.fisher_scores(model, batches, device, C.make_generator(0), chunk=cfg["chunk"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        kind = "GPU alloc above model+inputs"
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20  # KiB -> GiB
        kind = "CPU RSS growth"
    params = sum(q.numel() for _, q in C.backbone_params(model))
    return dict(cfg, seconds=secs, samples_per_s=cfg["samples"] / secs, peak_gib=peak, peak_kind=kind,
                params_m=params / 1e6, device_name=str(device))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_small_patch16_224.dino")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--samples", type=int, default=32, help="images scored per configuration")
    p.add_argument("--batch", type=int, default=32, help="calibration batch size (--fisher-batch-size)")
    p.add_argument("--chunks", default="0,1,4,8,16", help="vmap chunk sizes; 0 = per-sample loop reference")
    p.add_argument("--device", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config as JSON
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(json.loads(a.one))))
        return
    cfgs = [dict(arch=a.arch, img_size=a.img_size, samples=a.samples, batch=a.batch, chunk=int(c), device=a.device)
            for c in a.chunks.split(",")]
    rows = run_isolated(__file__, cfgs, lambda cfg: f"chunk {cfg['chunk']}")
    r0 = rows[0]
    print(f"\nFisher scoring, {r0['arch']} ({r0['params_m']:.1f}M backbone weights) at {r0['img_size']} px, "
          f"{r0['samples']} samples, device {r0['device_name']}; peak = {r0['peak_kind']}\n")
    print(f"| {'method':<22} | {'samples/s':>9} | {'seconds':>7} | {'peak GiB':>8} |")
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 9}|{'-' * 10}|")
    for r in rows:
        name = "per-sample loop" if r["chunk"] == 0 else f"vmap, chunk {r['chunk']}"
        print(f"| {name:<22} | {r['samples_per_s']:>9.2f} | {r['seconds']:>7.1f} | {r['peak_gib']:>8.2f} |")


if __name__ == "__main__":
    main()
