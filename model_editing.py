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
import dataclasses
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F

import common
import plumbing


def get_args(argv=None):
    shared = [plumbing.base_parser(common.DEFAULT_ARCH),
              common.edit_parser()]
    p = plumbing.Parser(parents=shared, description=__doc__.split("\n")[0],
                        example="python model_editing.py --rule least-sensitive --sparsity 0.9 --calib-rounds 4")
    g = p.add_argument_group("--head warmup: SGD on cached frozen-backbone features, cosine schedule")
    g.add_argument("--hparams", type=plumbing.path, default=None,
                   help="lr/momentum/wd of the warm-up from a centralized run's result.json")
    g.add_argument("--warmup-lr", type=plumbing.rate, default=0.01, help="warm-up lr without --hparams")
    g.add_argument("--warmup-momentum", type=plumbing.unit_float, default=0.9, help="warm-up momentum without --hparams")
    g.add_argument("--warmup-wd", type=plumbing.rate, default=0.0, help="warm-up weight decay without --hparams")
    g.add_argument("--warmup-epochs", type=plumbing.positive_int, default=20, help="warm-up epochs (early stopping)")
    g.add_argument("--patience", type=plumbing.positive_int, default=5,
                   help="warm-up stops after this many epochs without a better validation accuracy")
    g = p.add_argument_group("mask")
    g.add_argument("--mask", type=plumbing.path, default=None, help="use this mask.pt instead of calibrating one")
    g = p.add_argument_group("step 2: sparse fine-tuning of the backbone (head frozen)")
    g.add_argument("--epochs", type=plumbing.nonneg_int, default=5, help="fine-tuning epochs")
    g.add_argument("--lr", type=plumbing.rate, default=1e-4,
                   help="fine-tuning learning rate (docs/flags.md: why this low)")
    g.add_argument("--momentum", type=plumbing.unit_float, default=0.9, help="SparseSGDM momentum")
    g.add_argument("--wd", type=plumbing.rate, default=0.0, help="SparseSGDM weight decay (masked entries: none)")
    g.add_argument("--scheduler", choices=common.SCHEDULERS, default="cosine", help="LR schedule, per epoch")
    g.add_argument("--no-aug", action="store_true", help="no random crop / flip while fine-tuning")
    args = p.parse_args(argv)
    if args.hparams and args.head != "warmup":
        p.error("--hparams sets the SGD warm-up of the head: it needs --head warmup")
    if args.hparams:
        plumbing.refuse_ignored(p, args, ["warmup_lr", "warmup_momentum", "warmup_wd"],
                                "--hparams sets the warm-up's lr, momentum and weight decay")
    if args.mask:
        plumbing.refuse_ignored(p, args, common.CALIBRATION_FLAGS, "--mask gives the mask, nothing is calibrated")
    if args.head in common.FRESH_HEADS:
        p.error(f"model_editing.py freezes the step-0 head, and a frozen --head {args.head} would stay a fresh head "
                f"(a zero head passes the backbone no gradient at all): use ridge, warmup or a head.pt")
    common.check_head_flags(p, args)
    plumbing.check_base_flags(p, args)
    mask = f"mask-{plumbing.file_tag(args.mask)}" if args.mask else f"{args.rule}_s{args.sparsity}_r{args.calib_rounds}"
    mask += common.ridge_views_tag(args)
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


def make_mask(model, x, calib, seed, img_size, device):
    """Step 1: calibrate the mask (common.calibrate, as `calib` says) on fisher_batches x fisher_batch_size of
    the training images `x`, a fresh sample each round (TaLoS scores its validation split; we keep that split
    for model selection), as calib_images says (by default with a fresh crop and flip each round)."""
    def draw(r):
        idx, u = common.draw_calibration(len(x), calib.fisher_batches * calib.fisher_batch_size,
                                         plumbing.stream("edit_calib", seed, r))
        return common.calibration_view(x[idx], calib.calib_images, plumbing.stream("edit_calib_aug", seed, r)), u
    return common.calibrate(model, draw, calib, seed, img_size, device)


def image_passes(a, train, val, test):
    """Images a run pushes through the ViT, (forward+backward, forward only), for run_all.sh's estimate
    (plan.py): features once (the head), Fisher calibration (sensitivity rules only, per-sample
    gradients), fine-tuning epochs, and val+test evaluation before editing and after every epoch; with
    augmentation, the head's augmentation gap (common.augmentation_gap)."""
    calib = a.calib_rounds * a.fisher_batches * a.fisher_batch_size if not a.mask and a.rule in common.SCORED_RULES else 0
    feats = (1 + a.ridge_views) * train + val + test + (0 if a.no_aug else common.aug_gap_passes(train))
    return calib + a.epochs * train, feats + (a.epochs + 1) * (val + test)


# ----------------------------------------------------------------------------- the run's state: its checkpoint

@dataclasses.dataclass
class EditState(plumbing.CheckpointState, common.EditedModelState):
    """All of an editing run's state, which is its checkpoint (plumbing.CheckpointState: the fields are its
    schema; save_checkpoint adds "run", the run's flags). Steps 0 and 1 are saved together once both are done."""
    head: dict                  # step 0: the head (head.pt), frozen from then on
    head_info: dict             # step 0: how it was made, its accuracies (into result.json)
    mask: dict                  # step 1: the mask (mask.pt is written from it)
    calib_log: list             # step 1: its calibration rounds (calibration.csv)
    epoch: int = 0              # where step 2 goes on: the epoch,
    step: int = 0               # and the next step in it
    loss_sum: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))  # that epoch's loss so far
    rows: list = dataclasses.field(default_factory=list)  # metrics.csv so far: epoch 0 (before any edit), one per epoch
    elapsed: float = 0.0        # seconds of work so far, across resumes
    model: Optional[dict] = None  # from the first save in step 2: the weights,
    opt: Optional[dict] = None    # SparseSGDM's momentum,
    scaler: Optional[dict] = None  # and the fp16 gradient scale
    MAY_LACK = ("model", "opt", "scaler")  # the first checkpoint, after steps 0 and 1, has none

    def misfit(self, args, model, steps):
        """What makes this state not one of this run's (`steps` a epoch), or None; the mask is kept as
        common.checked_mask reads it."""
        started = self.model is not None  # step 2 saved once
        if not (0 <= self.epoch <= args.epochs and 0 <= self.step <= steps) or self.epoch == args.epochs and self.step:
            return f"epoch {self.epoch}, step {self.step} of a run of {args.epochs} epochs of {steps} steps"
        if len(self.rows) != (self.epoch + 1 if started else 0) or (not started and (self.epoch or self.step)):
            return f"{len(self.rows)} rows of metrics at epoch {self.epoch}, step {self.step}"
        for i, row in enumerate(self.rows):
            if not isinstance(row, dict) or row.get("epoch") != i or \
                    not all(plumbing.type_ok(row.get(k), float) for k in ("val_acc", "test_acc")):
                return f"row {i} of its metrics is not epoch {i}'s"
        if self.loss_sum.shape != () or not self.loss_sum.is_floating_point() or self.elapsed < 0:
            return "its loss so far is not a number"
        if (self.opt is not None, self.scaler is not None) != (started, started):
            return "a model without its optimizer and scaler, or these without a model"
        problem = self.model_misfit(model, saved=started)
        if problem:
            return problem
        groups = self.opt.get("param_groups") if started else None
        if started and not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict) and
                            len(groups[0].get("params", ())) == len(common.backbone_params(model))):
            return "its optimizer is not the backbone's"
        return None


# ----------------------------------------------------------------------------- step 2 and the result

class FineTuning:
    """Step 2 on a run's EditState: sparse fine-tuning of the backbone under the frozen head. The optimizer
    sees the whole backbone: the masked tensors through their masks, cls_token and pos_embed (outside
    TaLoS's mask) densely; the head stays frozen."""

    def __init__(self, model, data, state, args, device):
        self.model, self.data, self.state, self.args, self.device = model, data, state, args, device
        self.t0 = time.time() - state.elapsed
        params = common.backbone_params(model)
        for _, p in params:
            p.requires_grad_(True)
        self.opt = common.SparseSGDM([p for _, p in params], [state.mask.get(n) for n, _ in params],
                                     lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
        self.scaler = plumbing.grad_scaler(device, args.precision)
        if state.model is not None:
            model.load_state_dict(state.model)
            self.opt.load_state_dict(state.opt)
            self.scaler.load_state_dict(state.scaler)
        self.loss_sum = state.loss_sum.to(device)
        self.watch = common.LossWatch("sparse fine-tuning", f"a --lr below {args.lr:g}")

    def save(self):
        s = self.state
        s.model, s.opt, s.scaler = plumbing.cpu_state(self.model), self.opt.state_dict(), self.scaler.state_dict()
        s.loss_sum, s.elapsed = self.loss_sum.cpu(), time.time() - self.t0
        plumbing.save_checkpoint(s.to_checkpoint(), self.args)

    def epoch_zero(self):
        """Epoch 0's row: the model with its frozen head, before any edit."""
        if not self.state.rows:
            self.state.rows.append(dict(epoch=0, train_loss=None, **evaluate_splits(self.model, self.data, self.args,
                                                                                   self.device),
                                        **{k: self.state.head_info.get(k) for k in ("head_train_acc",
                                                                                     "head_train_aug_acc")}))
            plumbing.live_log(self.args, 0, self.state.rows[-1])

    def train(self):
        """The epochs from state.epoch, step state.step on: a stop request saves at the next step boundary
        (Stopped); each epoch is checked for divergence, evaluated and saved."""
        a, state, (x, y) = self.args, self.state, self.data["train"]
        while state.epoch < a.epochs:
            ep = state.epoch
            for g in self.opt.param_groups:
                g["lr"] = a.lr * common.lr_factor(a.scheduler, ep, a.epochs)
            perm = torch.randperm(len(x), generator=plumbing.stream("edit_epoch", a.seed, ep))
            for s in range(state.step, steps_per_epoch(len(x), a.batch_size)):
                idx = perm[s * a.batch_size:(s + 1) * a.batch_size]
                xb, yb = x[idx].to(self.device, non_blocking=True), y[idx].to(self.device, non_blocking=True)
                if not a.no_aug:
                    off, flip = common.draw_augmentation(len(idx), plumbing.stream("edit_aug", a.seed, ep, s))
                    xb = common.augment(xb, off.to(self.device), flip.to(self.device))
                self.loss_sum += train_step(self.model, self.opt, self.scaler, xb, yb, a, self.device) * len(idx)
                state.step = s + 1
                if plumbing.stop_requested():  # SLURM preemption / time limit: save at this step boundary
                    self.save()
                    raise plumbing.Stopped(f"fine-tuning epoch {ep + 1}, step {s + 1}", saved=True)
            train_loss = float(self.loss_sum) / len(x)  # the epoch's one read of the loss
            self.watch.check(train_loss, f"epoch {ep + 1}", self.scaler)  # before anything of this epoch is saved
            row = dict(epoch=ep + 1, train_loss=train_loss, **evaluate_splits(self.model, self.data, a, self.device))
            self.watch.warn(train_loss, f"epoch {ep + 1}")
            print(f"epoch {ep + 1}: train loss {row['train_loss']:.4f}  val acc {row['val_acc']:.4f}  "
                  f"test acc {row['test_acc']:.4f}")
            self.loss_sum.zero_()
            state.rows.append(row)
            plumbing.live_log(self.args, row["epoch"], row)
            state.epoch, state.step = ep + 1, 0
            self.save()
            plumbing.write_csv(state.rows, os.path.join(a.out, "metrics.csv"))


def steps_per_epoch(n, batch_size):
    return -(-n // batch_size)


def write_outputs(state, args):
    """metrics.csv, calibration.csv and the accuracy and loss plots."""
    rows = state.rows
    plumbing.write_csv(rows, os.path.join(args.out, "metrics.csv"))
    if state.calib_log:
        plumbing.write_csv(state.calib_log, os.path.join(args.out, "calibration.csv"))
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


def result_of(state, model, pretrained, args, seconds):
    """result.json: every flag of the run (plumbing.run_config, so a new flag is in it with no edit), how the
    head was made (--hparams' warm-up values over the flags') and what the run measured. With --mask the
    calibration flags made nothing: null, as summarize.SCHEMA reads them (it takes them from the mask's own
    run; --score stays, as older results have it); the mask file is "mask_file"."""
    rows, config = state.rows, plumbing.run_config(args)
    mask_file = config.pop("mask")
    made_nothing = [k for k in common.CALIBRATION_FLAGS if k != "score"] if args.mask else []
    changed, total = common.changed_count(model, pretrained)
    best = max(rows, key=lambda r: r["val_acc"])  # first of equals wins
    return {"stage": "model_editing", **config, "mask_file": mask_file, **dict.fromkeys(made_nothing),
            **state.head_info, "mask_kept_frac": common.mask_kept_frac(state.mask), "changed_frac": changed / total,
            "val_acc": rows[-1]["val_acc"], "test_acc": rows[-1]["test_acc"], "best_val_acc": best["val_acc"],
            "best_epoch": best["epoch"], "test_acc_at_best_val": best["test_acc"], "seconds": seconds}


def main(argv=None):
    args = get_args(argv)
    device, data, model, inputs = common.prepare(args)
    ckpt = plumbing.open_run(args)
    model.requires_grad_(False)
    steps = steps_per_epoch(len(data["train"][0]), args.batch_size)
    state = EditState.from_checkpoint(ckpt, args, model, steps) if ckpt else None  # checked before any work
    pretrained = {n: p.detach().cpu().clone() for n, p in common.masked_params(model)}

    # -------- steps 0 and 1: the head, then the mask under it, checkpointed together once both are done
    if state is None:
        t0 = time.time()
        head_info = make_head(model, data, args, device, inputs)
        mask, log = (inputs["mask"], []) if inputs["mask"] is not None else \
            make_mask(model, data["train"][0], common.Calibration.of(args), args.seed, args.img_size, device)
        state = EditState(head=plumbing.cpu_state(model.head), head_info=head_info, calib_log=log,
                          mask={n: m.detach().cpu().bool() for n, m in mask.items()}, elapsed=time.time() - t0)
        plumbing.save_checkpoint(state.to_checkpoint(), args)
    else:
        plumbing.resuming(args, f"fine-tuning epoch {state.epoch + 1} of {args.epochs}, step {state.step + 1}")
    state.write_files(args.out)
    model.head.load_state_dict(state.head)

    # -------- step 2: sparse fine-tuning of the backbone
    tuning = FineTuning(model, data, state, args, device)
    tuning.epoch_zero()
    tuning.train()

    # -------- the result
    write_outputs(state, args)
    result = result_of(state, model, pretrained, args, time.time() - tuning.t0)
    plumbing.atomic_save(plumbing.cpu_state(model), os.path.join(args.out, "model.pt"))
    plumbing.finish_run(result, args)
    print(f"changed {result['changed_frac']:.4%} of the entries of the masked tensors; mask keeps "
          f"{result['mask_kept_frac']:.4%}")
    print(f"val acc {result['head_val_acc']:.4f} (frozen head) -> {result['val_acc']:.4f}; "
          f"test acc {result['test_acc']:.4f}; results in {args.out}")


if __name__ == "__main__":
    plumbing.run_main(main)
