"""Centralized baseline: frozen DINO ViT-S/16 backbone, linear head trained with SGD + momentum.

Stages, each optional but the last:
  --grid                 grid search of lr x momentum x weight decay on the validation split
  --compare-schedulers   the best (or given) hyperparameters under every LR schedule
  final training         chosen hyperparameters, test loss/accuracy every epoch

The backbone is frozen, so its features are computed once (and cached on disk) and every
epoch of every trial trains the head on them. Example:
    python centralized.py --grid --compare-schedulers
"""
import argparse
import math
import os
import time

import common
import plumbing


def float_list(s):
    try:
        vals = [float(x) for x in s.split(",")]  # an empty item ("0.1,,0.2") is an error, not skipped
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")
    if not vals or any(v < 0 or math.isinf(v) or math.isnan(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {s!r}")
    shown = [f"{v:g}" for v in vals]  # as trial names and grid.csv show them: two equal ones would be one trial
    same = [v for v, g in zip(s.split(","), shown) if shown.count(g) > 1]
    if same:
        raise argparse.ArgumentTypeError(f"{' and '.join(x.strip() for x in same)} are one value to 6 significant "
                                         f"digits (trial names, grid.csv); give distinct values")
    return vals


def get_args(argv=None):
    p = plumbing.Parser(parents=[plumbing.base_parser(common.DEFAULT_ARCH)], description=__doc__.split("\n")[0],
                        example="python centralized.py --grid --compare-schedulers   # the study's baseline")
    p.add_argument("--epochs", type=plumbing.positive_int, default=30, help="epochs per training")
    p.add_argument("--patience", type=plumbing.positive_int, default=5,
                   help="stop after this many epochs without a better validation accuracy")
    p.add_argument("--lr", type=plumbing.rate, default=0.01, help="learning rate without --grid")
    p.add_argument("--momentum", type=plumbing.unit_float, default=0.9, help="momentum without --grid")
    p.add_argument("--wd", type=plumbing.rate, default=0.0, help="weight decay without --grid")
    p.add_argument("--hparams", type=plumbing.path, default=None,
                   help="take lr/momentum/wd from an earlier centralized run's result.json")
    p.add_argument("--scheduler", choices=common.SCHEDULERS, default="cosine",
                   help="LR schedule (see common.lr_factor), per epoch")
    p.add_argument("--grid", action="store_true", help="grid search lr x momentum x wd first and use the best")
    p.add_argument("--grid-lr", type=float_list, default=[0.1, 0.001, 0.005], help="learning rates of the grid")
    p.add_argument("--grid-momentum", type=float_list, default=[0.8, 0.9, 0.95], help="momenta of the grid")
    p.add_argument("--grid-wd", type=float_list, default=[0.001, 0.0], help="weight decays of the grid")
    p.add_argument("--compare-schedulers", action="store_true",
                   help="train once per schedule in --schedulers, plot them, and use the best")
    p.add_argument("--schedulers", default=",".join(common.SCHEDULERS), help="schedules to compare")
    p.add_argument("--aug-views", type=plumbing.nonneg_int, default=0,
                   help="0: train the head on clean images; V: on V cached augmented views "
                        "(random crop + flip), epoch e uses view e %% V")
    args = p.parse_args(argv)
    args.schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    bad = [s for s in args.schedulers if s not in common.SCHEDULERS]
    if bad or not args.schedulers:
        p.error(f"unknown scheduler in --schedulers: {','.join(bad) or '(empty)'}; "
                f"choose from {','.join(common.SCHEDULERS)}")
    if any(m >= 1 for m in args.grid_momentum):
        p.error("--grid-momentum values must be < 1")
    if args.hparams and args.grid:
        p.error("--hparams and --grid both choose the hyperparameters; give one")
    if args.hparams or args.grid:
        plumbing.refuse_ignored(p, args, ["lr", "momentum", "wd"],
                                f"--{'hparams' if args.hparams else 'grid'} chooses the hyperparameters")
    plumbing.check_base_flags(p, args)
    args.out = args.out or plumbing.run_name(args, "centralized", run_core(args), NAMED_FLAGS)
    return args


# The flags run_core names; plumbing.run_name adds every other one not at its default
NAMED_FLAGS = {"grid", "hparams", "lr", "momentum", "wd", "compare_schedulers", "scheduler"}


def run_core(args):
    """The readable part of a run's name: where the hyperparameters come from and the schedule, e.g.
    grid_compare, lr0.01_m0.9_wd0.0_cosine, hparams-grid_compare-seed0-result_cosine."""
    hp = ("grid" if args.grid else f"hparams-{plumbing.name_value(args.hparams)}" if args.hparams
          else f"lr{args.lr}_m{args.momentum}_wd{args.wd}")
    return f"{hp}_{'compare' if args.compare_schedulers else args.scheduler}"


def trial_key(hp):
    return f"lr={hp['lr']:g} m={hp['momentum']:g} wd={hp['wd']:g} sched={hp['scheduler']}"


def run_trial(name, hp, ckpt, model, feats, args, test=None):
    """Train a fresh head for one hyperparameter setting and checkpoint its summary. A linear probe on
    cached features takes seconds, so an interrupted run redoes at most the trial it was in."""
    if name in ckpt["done"]:
        return ckpt["done"][name]
    plumbing.stop_here(f"trial {name} (before it started)")
    t0 = time.time()
    model.head.load_state_dict(ckpt["init_head"])  # every trial starts from the same head
    flag = "--grid-lr" if args.grid else "--hparams" if args.hparams else "--lr"
    watch = common.LossWatch(f"centralized, trial {name}", f"a learning rate below {hp['lr']:g} ({flag})")
    history, best_epoch = common.train_head(model.head, feats, hp, args.epochs, args.patience, args.batch_size,
                                            args.seed, test=test, watch=watch)
    for row in history:
        plumbing.live_log(args, row["epoch"], row, part=name)
    summary = dict(hp, best_val_acc=history[best_epoch - 1]["val_acc"], best_epoch=best_epoch,
                   epochs_run=len(history), history=history, seconds=time.time() - t0)
    if test is not None:
        summary["head"] = plumbing.cpu_state(model.head)
    ckpt["done"][name] = summary
    plumbing.save_checkpoint(ckpt, args)
    print(f"  {name}: best val acc {summary['best_val_acc']:.4f} at epoch {best_epoch}")
    return summary


def grid_search(ckpt, model, feats, args):
    rows = []
    for lr in args.grid_lr:
        for m in args.grid_momentum:
            for wd in args.grid_wd:
                hp = dict(lr=lr, momentum=m, wd=wd, scheduler=args.scheduler)
                s = run_trial("grid " + trial_key(hp), hp, ckpt, model, feats, args)
                rows.append({k: s[k] for k in ("lr", "momentum", "wd", "scheduler", "best_val_acc",
                                               "best_epoch", "epochs_run")})
    rows.sort(key=lambda r: -r["best_val_acc"])  # stable: ties keep grid order
    plumbing.write_csv(rows, os.path.join(args.out, "grid.csv"))
    plumbing.plot_bars(os.path.join(args.out, "grid.png"),
                       [f"lr={r['lr']:g} m={r['momentum']:g} wd={r['wd']:g} {r['scheduler']}" for r in rows],
                       [100 * r["best_val_acc"] for r in rows], "best validation accuracy (%)", "Grid search (sorted)")
    return {k: rows[0][k] for k in ("lr", "momentum", "wd")}


def compare_schedulers(best, ckpt, model, feats, args):
    rows, curves = [], {}
    for sched in args.schedulers:
        hp = dict(best, scheduler=sched)
        s = run_trial("sched " + trial_key(hp), hp, ckpt, model, feats, args)
        rows.append({"scheduler": sched, "best_val_acc": s["best_val_acc"], "best_epoch": s["best_epoch"],
                     "epochs_run": s["epochs_run"]})
        curves[sched] = ([h["epoch"] for h in s["history"]], [100 * h["val_acc"] for h in s["history"]])
    plumbing.write_csv(rows, os.path.join(args.out, "schedulers.csv"))
    plumbing.plot_lines(os.path.join(args.out, "schedulers.png"), curves, "epoch", "validation accuracy (%)",
                        "LR schedulers")
    return max(rows, key=lambda r: r["best_val_acc"])["scheduler"]  # first of equals wins


def image_passes(a, train, val, test):
    """Images a run pushes through the ViT, (forward+backward, forward only), for run_all.sh's estimate
    (plan.py): a linear probe computes backbone features of every image once (--aug-views V: V views of
    the training set); its epochs run on the cached features."""
    return 0, train * max(1, a.aug_views) + val + test


def main(argv=None):
    args = get_args(argv)
    device, data, model, inputs = common.prepare(args)
    ckpt = plumbing.open_run(args)
    for p in model.parameters():
        p.requires_grad_(False)
    feats = common.cached_features(model, data, args, device, args.aug_views)
    if ckpt is None:
        # The checkpoint (plumbing.save_checkpoint adds "run", the run's flags): "done", every finished
        # trial's summary by name (run_trial; a resumed run skips them), and "init_head", the head every
        # trial starts from.
        ckpt = {"done": {}, "init_head": plumbing.cpu_state(model.head)}
    else:
        plumbing.resuming(args, f"trial {len(ckpt['done']) + 1} ({len(ckpt['done'])} finished)")

    if args.grid:
        print(f"grid search: {len(args.grid_lr) * len(args.grid_momentum) * len(args.grid_wd)} settings")
        best = grid_search(ckpt, model, feats, args)
    elif inputs["hparams"]:
        best = dict(zip(("lr", "momentum", "wd"), inputs["hparams"]))
    else:
        best = dict(lr=args.lr, momentum=args.momentum, wd=args.wd)
    sched = args.scheduler
    if args.compare_schedulers:
        print(f"comparing schedulers {args.schedulers} at {best}")
        sched = compare_schedulers(best, ckpt, model, feats, args)
    hp = dict(best, scheduler=sched)
    print(f"final training: {trial_key(hp)}")
    final = run_trial("final " + trial_key(hp), hp, ckpt, model, feats, args, test=feats["test"])

    hist = final["history"]
    plumbing.write_csv(hist, os.path.join(args.out, "metrics.csv"))
    ep = [h["epoch"] for h in hist]
    plumbing.plot_lines(os.path.join(args.out, "loss.png"),
                        {s: (ep, [h[f"{s}_loss"] for h in hist]) for s in ("train", "val", "test")},
                        "epoch", "cross-entropy", plumbing.plot_title("Centralized baseline: loss", args))
    plumbing.plot_lines(os.path.join(args.out, "accuracy.png"),
                        {s: (ep, [100 * h[f"{s}_acc"] for h in hist]) for s in ("val", "test")},
                        "epoch", "top-1 accuracy (%)", plumbing.plot_title("Centralized baseline: accuracy", args),
                        ymax=100)
    plumbing.atomic_save(final["head"], os.path.join(args.out, "head.pt"))  # CPU tensors: loads anywhere
    best_row = hist[final["best_epoch"] - 1]
    common.check_head_accuracy(best_row["val_acc"], args, "the centralized linear probe")
    result = {"stage": "centralized", "dataset": args.dataset, "seed": args.seed, "best": hp,
              "best_epoch": final["best_epoch"], "epochs_run": final["epochs_run"],
              "val_acc": best_row["val_acc"], "test_acc": best_row["test_acc"],
              "test_loss": best_row["test_loss"], "final_test_acc": hist[-1]["test_acc"],
              "seconds": sum(t["seconds"] for t in ckpt["done"].values())}  # of every trial, across resumes
    plumbing.finish_run(result, args)
    print(f"test accuracy {result['test_acc']:.4f} (val {result['val_acc']:.4f}, epoch {result['best_epoch']}); "
          f"results in {args.out}")


if __name__ == "__main__":
    plumbing.run_main(main)
