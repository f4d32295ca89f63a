"""Model editing with a calibrated gradient mask and SparseSGDM, following TaLoS (Iurada et al., ICLR 2025).

  step 0  a classifier head on the frozen backbone (--head: ridge regression in closed form, an SGD
          warm-up, or a head.pt file), frozen from then on
  step 1  a gradient mask calibrated in --calib-rounds rounds from a sensitivity score (--score) of
          training images cropped and flipped as in training (--calib-images); round r keeps
          int((1 - sparsity) ** (r / rounds) * N) of the N masked entries (TaLoS's count), entries
          already masked out are damped by --calib-damp while the rest are re-scored
  step 2  sparse fine-tuning of the backbone with SparseSGDM: a masked-out entry never changes

The mask is saved as mask.pt ({parameter name: bool tensor}; torch.load(..., weights_only=True))
for fedavg.py --sparse --mask. Example:
    python model_editing.py --sparsity 0.9 --calib-rounds 4
"""
import os
import time

import torch
import torch.nn.functional as F

import common
import plumbing


def get_args(argv=None):
    shared = [plumbing.base_parser(common.DEFAULT_ARCH),
              plumbing.edit_parser(common.MASK_RULES, common.SCORES, common.CALIB_IMAGES)]
    p = plumbing.Parser(parents=shared, description=__doc__.split("\n")[0],
                        example="python model_editing.py --rule least-sensitive --sparsity 0.9 --calib-rounds 4")
    g = p.add_argument_group("--head warmup: SGD on cached frozen-backbone features, cosine schedule")
    g.add_argument("--hparams", type=plumbing.path, default=None,
                   help="lr/momentum/wd of the warm-up from a centralized run's result.json")
    g.add_argument("--warmup-lr", type=plumbing.nonneg_float, default=0.01, help="warm-up lr without --hparams")
    g.add_argument("--warmup-momentum", type=plumbing.unit_float, default=0.9, help="warm-up momentum without --hparams")
    g.add_argument("--warmup-wd", type=plumbing.nonneg_float, default=0.0, help="warm-up weight decay without --hparams")
    g.add_argument("--warmup-epochs", type=plumbing.positive_int, default=20, help="warm-up epochs (early stopping)")
    g.add_argument("--patience", type=plumbing.positive_int, default=5,
                   help="warm-up stops after this many epochs without a better validation accuracy")
    g = p.add_argument_group("mask")
    g.add_argument("--mask", type=plumbing.path, default=None, help="use this mask.pt instead of calibrating one")
    g = p.add_argument_group("step 2: sparse fine-tuning of the backbone (head frozen)")
    g.add_argument("--epochs", type=plumbing.nonneg_int, default=5, help="fine-tuning epochs")
    g.add_argument("--lr", type=plumbing.nonneg_float, default=1e-4,
                   help="fine-tuning learning rate (docs/flags.md: why this low)")
    g.add_argument("--momentum", type=plumbing.unit_float, default=0.9, help="SparseSGDM momentum")
    g.add_argument("--wd", type=plumbing.nonneg_float, default=0.0, help="SparseSGDM weight decay (masked entries: none)")
    g.add_argument("--scheduler", choices=common.SCHEDULERS, default="cosine", help="LR schedule, per epoch")
    g.add_argument("--no-aug", action="store_true", help="no random crop / flip while fine-tuning")
    args = p.parse_args(argv)
    if args.hparams and args.head != "warmup":
        p.error("--hparams sets the SGD warm-up of the head: it needs --head warmup")
    if args.hparams:
        plumbing.refuse_ignored(p, args, ["warmup_lr", "warmup_momentum", "warmup_wd"],
                                "--hparams sets the warm-up's lr, momentum and weight decay")
    if args.mask:
        plumbing.refuse_ignored(p, args, plumbing.CALIBRATION_FLAGS, "--mask gives the mask, nothing is calibrated")
    if args.head in common.FRESH_HEADS:
        p.error(f"model_editing.py freezes the step-0 head, and a frozen --head {args.head} would stay a fresh head "
                f"(a zero head passes the backbone no gradient at all): use ridge, warmup or a head.pt")
    plumbing.check_head_flags(p, args)
    plumbing.check_base_flags(p, args)
    mask = f"mask-{plumbing.file_tag(args.mask)}" if args.mask else f"{args.rule}_s{args.sparsity}_r{args.calib_rounds}"
    mask += plumbing.ridge_views_tag(args)
    args.out = args.out or plumbing.run_name(args, "model_editing", mask,
                                             {"mask", "rule", "sparsity", "calib_rounds", "ridge_views"})
    return args


def train_step(model, opt, scaler, xb, yb, args, device):
    """One optimizer step of the whole model on a uint8 batch already on the device (augmented by the
    caller). Returns the loss as a 0-d device tensor: reading it with .item() waits for the GPU, so the
    loop adds losses up on the device and reads them once per epoch."""
    model.train()
    logits = common.forward_logits(model, common.preprocess(xb, args.img_size), device, args.precision)
    loss = F.cross_entropy(logits, yb)
    common.optimizer_step(opt, loss, scaler)
    return loss.detach()


def evaluate_splits(model, data, args, device, splits=("val", "test")):
    """Loss and accuracy of the whole model on each split, as one metrics row."""
    row = {}
    for s in splits:
        row[f"{s}_loss"], row[f"{s}_acc"] = common.evaluate(model, *data[s], args, device)
    return row


def make_head(model, data, args, device, inputs):
    """Step 0: the classifier head on the frozen backbone, then frozen. Returns its accuracies."""
    feats = common.cached_features(model, data, args, device)
    info = {}
    if args.head == "ridge":
        views = common.split_features(model, data, "train", args.ridge_views, args, device) if args.ridge_views else None
        info = dict(common.ridge_head(model.head, common.ridge_stats(*feats["train"], views), *feats["val"]),
                    ridge_views=args.ridge_views)
    elif args.head == "warmup":
        lr, m, wd = inputs["hparams"] or (args.warmup_lr, args.warmup_momentum, args.warmup_wd)
        watch = common.LossWatch("head warm-up", f"a warm-up learning rate below {lr:g} "
                                 f"({'--hparams' if inputs['hparams'] else '--warmup-lr'})")
        _, best_epoch = common.train_head(model.head, feats, dict(lr=lr, momentum=m, wd=wd, scheduler="cosine"),
                                          args.warmup_epochs, args.patience, args.batch_size, args.seed, watch=watch)
        info = {"warmup_epoch": best_epoch, "warmup_lr": lr, "warmup_momentum": m, "warmup_wd": wd}
    else:
        model.head.load_state_dict(inputs["head"])
    model.head.requires_grad_(False)
    val, test = common.evaluate_head(model.head, *feats["val"]), common.evaluate_head(model.head, *feats["test"])
    print(f"head ({args.head}): val acc {val[1]:.4f}, test acc {test[1]:.4f} {info}")
    common.check_head_accuracy(val[1], args)
    info = dict(info, head_val_acc=val[1], head_test_acc=test[1])
    if not args.no_aug:  # the head fine-tuning is about to train under, on the images it trains on
        gap = common.augmentation_gap(model, *data["train"], args, device)
        common.warn_augmentation_gap(gap)
        info.update(gap)
    return info


def make_mask(model, data, args, device):
    """Step 1: calibrate the mask on --fisher-batches x --fisher-batch-size training images, a fresh
    sample each round (TaLoS scores its validation split; we keep that split for model selection),
    as --calib-images says (by default with a fresh crop and flip each round)."""
    x = data["train"][0]

    def draw(r):
        idx, u = common.draw_calibration(len(x), args.fisher_batches * args.fisher_batch_size,
                                         plumbing.stream("edit_calib", args.seed, r))
        return common.calibration_view(x[idx], args.calib_images, plumbing.stream("edit_calib_aug", args.seed, r)), u
    return common.calibrate(model, draw, args, device)


def image_passes(a, train, val, test):
    """Images a run pushes through the ViT, (forward+backward, forward only), for run_all.sh's estimate
    (plan.py): features once (the head), Fisher calibration (sensitivity rules only, per-sample
    gradients), fine-tuning epochs, and val+test evaluation before editing and after every epoch; with
    augmentation, the head's augmentation gap (common.augmentation_gap)."""
    calib = a.calib_rounds * a.fisher_batches * a.fisher_batch_size if not a.mask and a.rule in common.SCORED_RULES else 0
    feats = (1 + a.ridge_views) * train + val + test + (0 if a.no_aug else common.aug_gap_passes(train))
    return calib + a.epochs * train, feats + (a.epochs + 1) * (val + test)


def main(argv=None):
    args = get_args(argv)
    device, data, model, inputs = common.prepare(args)
    ckpt = plumbing.open_run(args)
    if ckpt:
        plumbing.resuming(args, f"fine-tuning epoch {ckpt['epoch'] + 1} of {args.epochs}, step {ckpt['step'] + 1}")
    t0 = time.time() - (ckpt["elapsed"] if ckpt else 0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    pretrained = {n: p.detach().cpu().clone() for n, p in common.masked_params(model)}
    mask_path = os.path.join(args.out, "mask.pt")

    if ckpt is None:  # steps 0 and 1, checkpointed together once both are done
        head = make_head(model, data, args, device, inputs)
        mask, log = (inputs["mask"], []) if inputs["mask"] is not None else make_mask(model, data, args, device)
        common.save_mask(mask, mask_path)
        # The checkpoint: all of a run's state (plumbing.save_checkpoint adds "run", the run's flags).
        #   epoch, step            where step 2 goes on: the epoch, and the next step in it
        #   loss_sum               that epoch's training loss so far (summed on the device)
        #   rows                   metrics.csv so far: epoch 0 (before any edit), then one row per epoch
        #   head_info, head        step 0: how the head was made, and its weights (frozen from then on)
        #   calib_log              step 1: the calibration rounds (calibration.csv); the mask is mask.pt
        #   elapsed                seconds of work so far, across resumes
        #   model, opt, scaler     from the first save in step 2: weights, SparseSGDM's momentum, fp16 scale
        ckpt = {"epoch": 0, "step": 0, "loss_sum": torch.zeros(()), "rows": [], "head_info": head,
                "calib_log": log, "head": plumbing.cpu_state(model.head), "elapsed": time.time() - t0}
        plumbing.save_checkpoint(ckpt, args)
    # (re)written from the checkpoint on resume too: a head.pt damaged meanwhile does not survive
    plumbing.atomic_save(ckpt["head"], os.path.join(args.out, "head.pt"))
    mask = common.load_mask(mask_path, model)
    model.head.load_state_dict(ckpt["head"])

    # Step 2. The optimizer sees the whole backbone: the masked tensors through their masks, cls_token
    # and pos_embed (outside TaLoS's mask) densely; the head stays frozen.
    params = common.backbone_params(model)
    for _, p in params:
        p.requires_grad_(True)
    opt = common.SparseSGDM([p for _, p in params], [mask.get(n) for n, _ in params],
                            lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    scaler = plumbing.grad_scaler(device, args.precision)
    if "model" in ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        scaler.load_state_dict(ckpt["scaler"])
    if not ckpt["rows"]:  # epoch 0: the model with its frozen head, before any edit
        ckpt["rows"].append(dict(epoch=0, train_loss=None, **evaluate_splits(model, data, args, device),
                                 **{k: ckpt["head_info"].get(k) for k in ("head_train_acc", "head_train_aug_acc")}))
        plumbing.live_log(args, 0, ckpt["rows"][-1])

    def save():
        ckpt.update(model=plumbing.cpu_state(model), opt=opt.state_dict(), scaler=scaler.state_dict(),
                    loss_sum=loss_sum.cpu(), elapsed=time.time() - t0)
        plumbing.save_checkpoint(ckpt, args)

    x, y = data["train"]
    loss_sum = ckpt["loss_sum"].to(device)
    watch = common.LossWatch("sparse fine-tuning", f"a --lr below {args.lr:g}")
    while ckpt["epoch"] < args.epochs:
        ep = ckpt["epoch"]
        for g in opt.param_groups:
            g["lr"] = args.lr * common.lr_factor(args.scheduler, ep, args.epochs)
        perm = torch.randperm(len(x), generator=plumbing.stream("edit_epoch", args.seed, ep))
        for s in range(ckpt["step"], -(-len(x) // args.batch_size)):
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            if not args.no_aug:
                off, flip = common.draw_augmentation(len(idx), plumbing.stream("edit_aug", args.seed, ep, s))
                xb = common.augment(xb, off.to(device), flip.to(device))
            loss_sum += train_step(model, opt, scaler, xb, yb, args, device) * len(idx)
            ckpt["step"] = s + 1
            if plumbing.stop_requested():  # SLURM preemption / time limit: save at this step boundary
                save()
                raise plumbing.Stopped(f"fine-tuning epoch {ep + 1}, step {s + 1}", saved=True)
        train_loss = float(loss_sum) / len(x)  # the epoch's one read of the loss
        watch.check(train_loss, f"epoch {ep + 1}", scaler)  # before anything of this epoch is saved
        row = dict(epoch=ep + 1, train_loss=train_loss, **evaluate_splits(model, data, args, device))
        watch.warn(train_loss, f"epoch {ep + 1}")
        print(f"epoch {ep + 1}: train loss {row['train_loss']:.4f}  val acc {row['val_acc']:.4f}  "
              f"test acc {row['test_acc']:.4f}")
        loss_sum.zero_()
        ckpt["rows"].append(row)
        plumbing.live_log(args, row["epoch"], row)
        ckpt.update(epoch=ep + 1, step=0)
        save()
        plumbing.write_csv(ckpt["rows"], os.path.join(args.out, "metrics.csv"))

    rows = ckpt["rows"]
    plumbing.write_csv(rows, os.path.join(args.out, "metrics.csv"))
    if ckpt["calib_log"]:
        plumbing.write_csv(ckpt["calib_log"], os.path.join(args.out, "calibration.csv"))
    title = plumbing.plot_title(
        "Sparse fine-tuning, " + (f"{args.rule}, sparsity {args.sparsity}, {args.calib_rounds} calibration rounds"
                                  if args.mask is None else f"mask {args.mask}") + f", head {args.head}",
        args, named=("rule", "sparsity", "calib_rounds", "mask", "head"))
    for kind, label, scale in (("acc", "top-1 accuracy (%)", 100), ("loss", "cross-entropy", 1)):
        series = {}
        for s in ("train", "val", "test") if kind == "loss" else ("val", "test"):  # no train loss at epoch 0
            done = [r for r in rows if r.get(f"{s}_{kind}") is not None]
            series[s] = ([r["epoch"] for r in done], [scale * r[f"{s}_{kind}"] for r in done])
        plumbing.plot_lines(os.path.join(args.out, f"{'accuracy' if kind == 'acc' else 'loss'}.png"), series,
                            "epoch (0 = frozen head, before editing)", label, title,
                            ymax=100 if kind == "acc" else None)
    changed, total = common.changed_count(model, pretrained)
    best = max(rows, key=lambda r: r["val_acc"])  # first of equals wins
    calibrated = args.mask is None  # a given mask's rule and rounds are its own run's (summarize.py reads them)
    result = {"stage": "model_editing", "dataset": args.dataset, "seed": args.seed,
              "rule": args.rule if calibrated else None, "sparsity": args.sparsity if calibrated else None,
              "calib_rounds": args.calib_rounds if calibrated else None, "mask_file": args.mask,
              "head": args.head, "score": args.score, **ckpt["head_info"],
              "mask_kept_frac": common.mask_kept_frac(mask), "changed_frac": changed / total,
              "val_acc": rows[-1]["val_acc"], "test_acc": rows[-1]["test_acc"],
              "best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "test_acc_at_best_val": best["test_acc"],
              "seconds": time.time() - t0}
    plumbing.atomic_save(plumbing.cpu_state(model), os.path.join(args.out, "model.pt"))
    plumbing.finish_run(result, args)
    print(f"changed {changed}/{total} entries of the masked tensors ({changed / total:.4%}); "
          f"mask keeps {result['mask_kept_frac']:.4%}")
    print(f"val acc {result['head_val_acc']:.4f} (frozen head) -> {result['val_acc']:.4f}; "
          f"test acc {result['test_acc']:.4f}; results in {args.out}")


if __name__ == "__main__":
    plumbing.run_main(main)
