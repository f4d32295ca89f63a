"""Benchmark: Fisher scoring (sums of squared per-sample gradients over masked_params) time and memory.

Methods, each on the same images, labels and randomly initialized model (speed and memory do not
depend on the weight values), each in a fresh subprocess so that its peak memory is its own:
  talos      the TaLoS reference: one batched forward, then one backward per sample through the
             retained graph into .grad, square, add (pruners.py TaLoS.score)
  loop       the plain per-sample loop: forward and backward of one image at a time into .grad
  layerwise  common.fisher_sums: per-sample gradients layer by layer inside one batched backward
Extra peak memory = peak minus the model alone (CUDA: allocated bytes; CPU: growth of the resident set).

    python benchmarks/bench_fisher.py --arch vit_small_patch16_224 --img-size 32     # a minute on a CPU
    python benchmarks/bench_fisher.py --arch vit_small_patch16_224 --img-size 224 --device cuda
"""
import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isolated import run_isolated  # noqa: E402  (benchmarks/ is on the path: it holds this script)

METHODS = ["talos", "loop", "layerwise"]


def grad_sums(model, params, sums, objective):
    """backward of objective into .grad of params, squared and added into sums."""
    model.zero_grad()
    objective.backward(retain_graph=True)
    for n, p in params:
        sums[n] += p.grad ** 2


def score(method, model, images, u, cfg, device):
    import torch
    import common
    if method == "layerwise":
        return common.fisher_sums(model, images, u, cfg["img_size"], cfg["batch"], device)[0]
    model.eval()
    params = common.masked_params(model)
    sums = {n: torch.zeros_like(p) for n, p in params}
    for i in range(0, len(images), cfg["batch"]):
        x = common.preprocess(images[i:i + cfg["batch"]].to(device), cfg["img_size"])
        ub = u[i:i + cfg["batch"]]
        if method == "talos":
            logits = model(x)
            samples = logits.gather(1, common.sample_labels(logits, ub)[:, None])
            for j in range(len(x)):
                grad_sums(model, params, sums, samples[j, 0])
        else:
            for j in range(len(x)):
                logits = model(x[j:j + 1])
                grad_sums(model, params, sums, logits[0, common.sample_labels(logits, ub[j:j + 1])[0]])
    return sums


def measure(cfg):
    """Run one method in this process; return a dict of measurements."""
    import torch
    import common
    import plumbing
    torch.set_num_threads(cfg["threads"])
    p = argparse.ArgumentParser(parents=[plumbing.base_parser(common.DEFAULT_ARCH)])
    args = p.parse_args(["--arch", cfg["arch"], "--img-size", str(cfg["img_size"]), "--no-pretrained"])
    device = plumbing.pick_device(cfg["device"])
    torch.manual_seed(0)  # the same random backbone in every subprocess
    model = common.build_model(args).to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg["samples"], cfg["img_size"], cfg["img_size"], 3), generator=gen,
                           dtype=torch.uint8)
    u = torch.rand(cfg["samples"], generator=gen, dtype=torch.float64)
    if device.type == "cuda":  # the device given, not the current one (cuda:0)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    sums = score(cfg["method"], model, images, u, cfg, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - t
    if device.type == "cuda":
        extra, kind = (torch.cuda.max_memory_allocated(device) - base) / 2**20, "CUDA allocated"
    else:
        extra, kind = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**10, "CPU max RSS growth"
    total = sum(float(s.double().sum()) for s in sums.values())
    return dict(cfg, seconds=secs, extra_mib=extra, peak_kind=kind, checksum=total,
                params_m=sum(q.numel() for _, q in common.masked_params(model)) / 1e6, device_name=str(device),
                threads=torch.get_num_threads())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=32, help="images scored per method (default: 32)")
    p.add_argument("--batch", type=int, default=32, help="calibration batch size (default: 32)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    p.add_argument("--device", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config as JSON
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(json.loads(a.one))))
        return
    cfgs = [dict(arch=a.arch, img_size=a.img_size, samples=a.samples, batch=a.batch, method=m, device=a.device,
                 threads=a.threads) for m in a.methods.split(",")]
    rows = run_isolated(__file__, cfgs, lambda cfg: cfg["method"])
    by = {r["method"]: r for r in rows}
    r0 = rows[0]
    print(f"\nFisher scoring, {r0['arch']} ({r0['params_m']:.1f}M masked weights) at {r0['img_size']} px, "
          f"{r0['samples']} samples, batch {r0['batch']}, device {r0['device_name']}, {r0['threads']} thread(s); "
          f"extra memory = {r0['peak_kind']} above the model\n")
    print(f"| {'method':<10} | {'samples/s':>9} | {'seconds':>7} | {'extra MiB':>9} | {'speed / talos':>13} "
          f"| {'speed / loop':>12} | {'memory / loop':>13} |")
    print(f"|{'-' * 12}|{'-' * 11}|{'-' * 9}|{'-' * 11}|{'-' * 15}|{'-' * 14}|{'-' * 15}|")
    for r in rows:
        ratio = lambda ref, key, inv: (f"{(ref[key] / r[key]) if inv else (r[key] / ref[key]):.2f}" if ref else "-")
        print(f"| {r['method']:<10} | {r['samples'] / r['seconds']:>9.2f} | {r['seconds']:>7.2f} | "
              f"{r['extra_mib']:>9.0f} | {ratio(by.get('talos'), 'seconds', True):>13} "
              f"| {ratio(by.get('loop'), 'seconds', True):>12} | {ratio(by.get('loop'), 'extra_mib', False):>13} |")
    sums = {r["method"]: r["checksum"] for r in rows}
    print(f"\nsum of all scores per method (they should agree to float rounding): {sums}")


if __name__ == "__main__":
    main()
