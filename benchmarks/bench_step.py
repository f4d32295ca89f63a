"""Benchmark: one FedAvg client step (forward, backward, SparseSGDM) under each kernel setting a run can pick.

Each setting runs in a fresh subprocess (determinism and attention switches are global to a process),
on the same random ViT and random uint8 images, through the functions fedavg.py uses (preprocess,
common.forward_logits, common.optimizer_step), and prints images per second and the ratio to the
default kernels:

  default          PyTorch's choice of attention kernel
  no cuDNN attn    cuDNN's fused attention off (flash or memory-efficient take its place)
  math attn        attention by the math kernel only
  --deterministic  what the scripts' --deterministic sets (plumbing.pick_device)
  strict det       an alternative to it: deterministic algorithms without warn_only (an op lacking a
                   deterministic kernel raises) and cuDNN attention off; flash attention's backward
                   then runs its deterministic variant (PyTorch's attention_backward.cu)
  --compile        what the scripts' --compile does (common.compile_backbone); its compile time apart

    python benchmarks/bench_step.py --device cuda --img-size 224 --batch 64   # the real setting (a GPU)
    python benchmarks/bench_step.py --arch test_vit --img-size 32 --batch 8 --settings default,math-attn
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isolated import run_isolated  # noqa: E402  (benchmarks/ is on the path: it holds this script)

SETTINGS = ["default", "no-cudnn-attn", "math-attn", "deterministic", "strict-det", "compile"]


def measure(cfg):
    """Images per second of cfg["steps"] client steps after cfg["warmup"] (and, with compile, the
    seconds the first compiled step took)."""
    import torch
    import common
    import fedavg
    import plumbing
    torch.set_num_threads(cfg["threads"])
    setting = cfg["setting"]
    device = plumbing.pick_device(cfg["device"], deterministic=setting == "deterministic")
    if setting == "strict-det":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if setting in ("no-cudnn-attn", "math-attn", "strict-det") and device.type == "cuda":
        plumbing.fused_attention_off(plumbing.FUSED_ATTENTION if setting == "math-attn" else ("cudnn",))
    args = fedavg.get_args(["--arch", cfg["arch"], "--img-size", str(cfg["img_size"]), "--no-pretrained",
                            "--batch-size", str(cfg["batch"])])
    precision = plumbing.resolve_amp("auto", device)
    torch.manual_seed(0)
    model = common.build_model(args).to(device)
    compile_s = None
    if setting == "compile":
        common.compile_backbone(model)
    phase = fedavg.Phase(model, args)
    scaler = plumbing.grad_scaler(device, precision)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (cfg["batch"], 32, 32, 3), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, common.NUM_CLASSES, (cfg["batch"],), generator=g).to(device)
    model.train()

    def step():
        loss = torch.nn.functional.cross_entropy(
            common.forward_logits(model, common.preprocess(x, args.img_size), device, precision), y)
        common.optimizer_step(phase.opt, loss, scaler)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t = time.perf_counter()
    step()  # the first step: allocations, kernel choices, and with --compile the compile itself
    sync()
    if setting == "compile":
        compile_s = time.perf_counter() - t
    for _ in range(cfg["warmup"]):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    sync()
    return dict(cfg, img_per_s=cfg["steps"] * cfg["batch"] / (time.perf_counter() - t), compile_s=compile_s,
                precision=precision, device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_small_patch16_224", help="timm ViT, random weights")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64, help="a client's batch")
    p.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {SETTINGS}")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one setting as JSON
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(json.loads(a.one))))
        return
    settings = a.settings.split(",")
    if any(s not in SETTINGS for s in settings):
        p.error(f"--settings: each of {SETTINGS}")
    base = {k: v for k, v in vars(a).items() if k not in ("one", "settings")}
    rows = run_isolated(__file__, [dict(base, setting=s) for s in settings], lambda cfg: cfg["setting"])
    first = rows[0]
    print(f"\nClient step, {a.arch} (random weights) at {a.img_size} px, batch {a.batch}, {first['device_name']}, "
          f"precision {first['precision']}, {a.steps} timed steps after {a.warmup + 1}\n")
    print(f"| {'setting':<16} | {'img/s':>8} | {'/ ' + first['setting']:>10} | {'compile (s)':>11} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 12}|{'-' * 13}|")
    for r in rows:
        c = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        print(f"| {r['setting']:<16} | {r['img_per_s']:>8.1f} | {r['img_per_s'] / first['img_per_s']:>10.3f} | {c:>11} |")


if __name__ == "__main__":
    main()
