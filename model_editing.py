"""Model editing with a Fisher-calibrated gradient mask and SparseSGDM (TaLoS, Iurada et al. 2025).

  1. warm up the linear head on the frozen backbone (same code and hyperparameters as centralized.py);
     the head stays frozen afterwards
  2. score every backbone weight with the diagonal Fisher information
  3. calibrate a binary mask over several rounds (the kept fraction shrinks exponentially)
  4. fine-tune only the masked-in backbone weights with SparseSGDM

The mask is saved as mask.pt ({parameter name: bool tensor}, load with torch.load(weights_only=True))
for fedavg.py --sparse --mask. Example:
    python model_editing.py --hparams runs/centralized/<run>/result.json --sparsity 0.9 --calib-rounds 4
"""
import os
import time

import torch

import common as C


def get_args(argv=None):
    p = C.Parser(parents=[C.base_parser(), C.mask_parser()], description=__doc__.split("\n")[0])
    g = p.add_argument_group("head warm-up (frozen backbone, cached features)")
    g.add_argument("--hparams", default=None,
                   help="lr/momentum/wd of the warm-up from a centralized run's result.json")
    g.add_argument("--warmup-lr", type=C.nonneg_float, default=0.01, help="without --hparams (default: 0.01)")
    g.add_argument("--warmup-momentum", type=C.unit_float, default=0.9, help="without --hparams (default: 0.9)")
    g.add_argument("--warmup-wd", type=C.nonneg_float, default=0.0, help="without --hparams (default: 0)")
    g.add_argument("--warmup-epochs", type=C.nonneg_int, default=20,
                   help="head warm-up epochs, cosine schedule, early stopping (default: 20)")
    g.add_argument("--patience", type=C.positive_int, default=5, help="warm-up early stopping (default: 5)")
    g = p.add_argument_group("mask")
    g.add_argument("--mask", default=None, help="use this mask.pt instead of calibrating one")
    g = p.add_argument_group("sparse fine-tuning of the backbone (head frozen)")
    g.add_argument("--epochs", type=C.nonneg_int, default=5, help="fine-tuning epochs (default: 5)")
    g.add_argument("--lr", type=C.nonneg_float, default=1e-3, help="fine-tuning learning rate (default: 0.001)")
    g.add_argument("--momentum", type=C.unit_float, default=0.9, help="default: 0.9")
    g.add_argument("--wd", type=C.nonneg_float, default=0.0, help="default: 0")
    g.add_argument("--scheduler", choices=C.SCHEDULERS, default="cosine", help="default: cosine")
    g.add_argument("--no-aug", action="store_true", help="no random crop / flip while fine-tuning")
    args = p.parse_args(argv)
    if args.out is None:
        mask = f"mask_{os.path.basename(os.path.dirname(os.path.abspath(args.mask)))}" if args.mask else \
            f"{args.rule}_s{args.sparsity}_r{args.calib_rounds}"
        args.out = C.default_out("editing", {"": args.dataset if args.dataset != "cifar100" else None,
                                             "m": mask, "ep": args.epochs, "lr": args.lr, "seed": args.seed})
    return args


def warm_up_head(model, data, args, device):
    """Train the head on cached backbone features, exactly as the centralized baseline does."""
    if args.hparams:
        lr, m, wd = C.hparams_from(args.hparams)
    else:
        lr, m, wd = args.warmup_lr, args.warmup_momentum, args.warmup_wd
    feats = C.cached_features(model, data, args, device)
    state = C.train_head(model.head, feats, dict(lr=lr, momentum=m, wd=wd, scheduler="cosine"),
                         args, args.warmup_epochs, args.patience) if args.warmup_epochs else None
    model.head.requires_grad_(False)  # from here on the head is frozen
    val = C.evaluate_head(model.head, *feats["val"])
    print(f"head warm-up: val acc {val[1]:.4f} after {state['epoch'] if state else 0} epochs (lr={lr} m={m} wd={wd})")
    return {"warmup_val_loss": val[0], "warmup_val_acc": val[1], "test": C.evaluate_head(model.head, *feats["test"])}


def make_mask(model, data, args, device):
    """Calibrate the mask in --calib-rounds rounds on training images (a fresh sample each round)."""
    x = data["train"][0]
    rnd = {"r": 0}

    def score(mask):
        rnd["r"] += 1
        gen = C.make_generator(args.seed, rnd["r"], 31)
        batches = C.calibration_batches(x, args.fisher_batches * args.fisher_batch_size, args, device, gen)
        scores, n = C.fisher_scores(model, batches, device, gen,
                                    mask=mask, damp=args.calib_damp, chunk=args.fisher_chunk)
        return {k: v / n for k, v in scores.items()}

    t = time.time()
    mask, log = C.calibrate_mask(model, score, args.rule, args.sparsity, args.calib_rounds,
                                 C.make_generator(args.seed, 37))
    for row in log:
        print(f"  calibration round {row['round']}: keep {row['kept']} weights ({row['kept_frac']:.4%})")
    print(f"mask ({args.rule}, sparsity {args.sparsity}) calibrated in {time.time() - t:.1f}s")
    return mask, log


def fine_tune_epoch(model, opt, data, args, device, epoch):
    from tqdm import tqdm
    x, y = data["train"]
    perm = torch.randperm(len(x), generator=C.make_generator(args.seed, epoch, 41))
    total, steps = 0.0, range(0, len(x), args.batch_size)
    for s, i in enumerate(tqdm(steps, desc=f"epoch {epoch + 1}", leave=False, disable=None)):
        idx = perm[i:i + args.batch_size]
        gen = None if args.no_aug else C.make_generator(args.seed, epoch, s, 43)
        total += C.train_step(model, opt, x[idx], y[idx], args, device, gen) * len(idx)
    return total / len(x)


def main(argv=None):
    args = get_args(argv)
    prepared = C.prepare(args)
    if prepared is None:
        return
    device, data, model = prepared
    given_mask = C.load_mask(args.mask, model) if args.mask else None
    ckpt = C.open_run(args)
    t0 = time.time() - (ckpt["elapsed"] if ckpt else 0.0)
    params = C.backbone_params(model)
    for p in model.parameters():
        p.requires_grad_(False)
    pretrained = {n: p.detach().clone() for n, p in params}

    if ckpt is None:  # warm-up and calibration are one step: checkpointed once both are done
        warm = warm_up_head(model, data, args, device)
        mask, log = (given_mask, []) if given_mask is not None else make_mask(model, data, args, device)
        C.save_mask(mask, os.path.join(args.out, "mask.pt"))
        ckpt = {"epoch": 0, "rows": [], "warm": warm, "calib_log": log, "head": model.head.state_dict(),
                "elapsed": time.time() - t0}
        C.save_checkpoint(ckpt, args)
    mask = C.load_mask(os.path.join(args.out, "mask.pt"), model)
    model.head.load_state_dict(ckpt["head"])
    for _, p in params:
        p.requires_grad_(True)
    opt = C.SparseSGDM([p for _, p in params], [mask[n] for n, _ in params],
                       lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    if "model" in ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
    if not ckpt["rows"]:  # epoch 0: the warmed-up model before any edit
        ckpt["rows"].append(dict(epoch=0, train_loss=float("nan"),
                                 **C.evaluate_splits(model, data, args, device)))

    while ckpt["epoch"] < args.epochs:
        ep = ckpt["epoch"]
        for g in opt.param_groups:
            g["lr"] = args.lr * C.lr_factor(args.scheduler, ep, args.epochs)
        loss = fine_tune_epoch(model, opt, data, args, device, ep)
        row = dict(epoch=ep + 1, train_loss=loss, **C.evaluate_splits(model, data, args, device))
        print(f"epoch {ep + 1}: train loss {loss:.4f}  val acc {row['val_acc']:.4f}  test acc {row['test_acc']:.4f}")
        ckpt["rows"].append(row)
        ckpt.update(epoch=ep + 1, model=model.state_dict(), opt=opt.state_dict(), elapsed=time.time() - t0)
        C.save_checkpoint(ckpt, args)
        C.write_csv(ckpt["rows"], os.path.join(args.out, "metrics.csv"))

    rows = ckpt["rows"]
    C.write_csv(rows, os.path.join(args.out, "metrics.csv"))
    if ckpt["calib_log"]:
        C.write_csv(ckpt["calib_log"], os.path.join(args.out, "calibration.csv"))
    ep = [r["epoch"] for r in rows]
    C.plot_lines(os.path.join(args.out, "accuracy.png"), {s: (ep, [r[f"{s}_acc"] for r in rows]) for s in ("val", "test")},
                 "epoch (0 = warmed-up head, before editing)", "top-1 accuracy",
                 f"Sparse fine-tuning ({args.rule}, sparsity {args.sparsity})")
    C.plot_lines(os.path.join(args.out, "loss.png"), {s: (ep, [r[f"{s}_loss"] for r in rows]) for s in ("val", "test")},
                 "epoch (0 = warmed-up head, before editing)", "cross-entropy", "Sparse fine-tuning: loss")
    changed = sum(int((p.detach() != pretrained[n]).sum()) for n, p in params)
    total = sum(p.numel() for _, p in params)
    best = max(rows, key=lambda r: r["val_acc"])
    result = {"stage": "editing", "dataset": args.dataset, "seed": args.seed, "rule": args.rule,
              "sparsity": args.sparsity, "calib_rounds": args.calib_rounds, "mask_file": args.mask,
              "mask_kept_frac": C.mask_density(mask), "changed_frac": changed / total,
              "warmup_val_acc": ckpt["warm"]["warmup_val_acc"], "warmup_test_acc": ckpt["warm"]["test"][1],
              "val_acc": rows[-1]["val_acc"], "test_acc": rows[-1]["test_acc"],
              "best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "test_acc_at_best_val": best["test_acc"],
              "seconds": time.time() - t0}
    C.atomic_save(model.state_dict(), os.path.join(args.out, "model.pt"))
    C.finish_run(result, args)
    print(f"changed {changed}/{total} backbone weights ({changed / total:.4%}); mask keeps {result['mask_kept_frac']:.4%}")
    print(f"val acc {result['warmup_val_acc']:.4f} (warmed-up head) -> {result['val_acc']:.4f}; "
          f"test acc {result['test_acc']:.4f}; results in {args.out}")


if __name__ == "__main__":
    C.run_main(main)
