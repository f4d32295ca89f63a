"""Pieces shared by centralized.py, model_editing.py and fedavg.py.

Data and transforms, the ViT classifier and its weights, SparseSGDM, evaluation,
frozen-backbone features and head training, Fisher scores and gradient masks,
and run directories (config, metrics, atomic checkpoints, resume).

Run it as a script to prefetch CIFAR-100 and the DINO weights for offline use:
    python common.py --data-dir ./data
"""
import argparse
import csv
import json
import math
import os
import socket
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 100

DEFAULT_ARCH = "vit_small_patch16_224.dino"
# The DINO backbone was pre-trained on ImageNet with these statistics, so its inputs
# must be normalized the same way (CIFAR-100's own statistics would shift every feature).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, no network): one line, exit 2."""


def run_main(main):
    """Call main(); turn a UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: continue later with --resume", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- flags

class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return v


def nonneg_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def nonneg_float(s):
    v = float(s)
    if not v >= 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def unit_float(s):
    """A fraction in [0, 1)."""
    v = float(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def float_list(s):
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")
    if not vals or any(v < 0 or math.isinf(v) or math.isnan(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {s!r}")
    return vals


def base_parser():
    """Flags every script spells the same way (an argparse parent)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data and model (shared by all scripts)")
    g.add_argument("--dataset", choices=["cifar100", "synthetic"], default="cifar100",
                   help="cifar100 (downloaded into --data-dir) or a small learnable synthetic "
                        "CIFAR-shaped set for tests and offline trials (default: cifar100)")
    g.add_argument("--data-dir", default="./data", help="where CIFAR-100 lives or is downloaded (default: ./data)")
    g.add_argument("--synthetic-size", type=positive_int, default=5000,
                   help="training images in the synthetic set; its test set is a fifth of that (default: 5000)")
    g.add_argument("--val-frac", type=unit_float, default=0.1,
                   help="fraction of the training set held out for validation, stratified by class (default: 0.1)")
    g.add_argument("--arch", default=DEFAULT_ARCH,
                   help=f"timm ViT name (default: {DEFAULT_ARCH}; tests use test_vit)")
    g.add_argument("--weights", default=None,
                   help="local weights file: official DINO checkpoint (dino_deitsmall16_pretrain.pth) "
                        "or a timm state dict (.pth/.safetensors); default: timm's hub weights")
    g.add_argument("--no-pretrained", action="store_true",
                   help="random backbone weights (for tests and smoke runs only)")
    g.add_argument("--img-size", type=positive_int, default=224,
                   help="images are resized to this many pixels before the ViT (default: 224)")
    g.add_argument("--batch-size", type=positive_int, default=128, help="training batch size (default: 128)")
    g.add_argument("--eval-batch-size", type=positive_int, default=256, help="evaluation batch size (default: 256)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")
    g.add_argument("--no-amp", action="store_true",
                   help="run the ViT in float32 on GPU (default: bfloat16 autocast on GPU, float32 on CPU)")
    g.add_argument("--out", default=None, help="run directory (default: runs/<stage>/<name from flags>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (starts fresh if there is none)")
    return p


def mask_parser():
    """Mask flags shared by model_editing.py and fedavg.py --sparse (an argparse parent)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("gradient mask (model_editing.py, fedavg.py --sparse)")
    g.add_argument("--rule", choices=MASK_RULES, default="least-sensitive",
                   help="which backbone weights may be updated (default: least-sensitive, as TaLoS)")
    g.add_argument("--sparsity", type=unit_float, default=0.9,
                   help="fraction of backbone weights that are FROZEN: 0.9 updates 10%% of them (default: 0.9)")
    g.add_argument("--calib-rounds", type=positive_int, default=4,
                   help="mask calibration rounds; the kept fraction shrinks exponentially to 1-sparsity (default: 4)")
    g.add_argument("--fisher-batches", type=positive_int, default=8,
                   help="batches of --fisher-batch-size images scored per calibration round (default: 8)")
    g.add_argument("--fisher-batch-size", type=positive_int, default=32, help="default: 32")
    g.add_argument("--calib-damp", type=nonneg_float, default=0.1,
                   help="while calibrating, weights already masked out are scaled by this (TaLoS: 0.1)")
    g.add_argument("--fisher-chunk", type=positive_int, default=16,
                   help="per-sample gradients computed at once: memory grows with it (default: 16)")
    return p


def hparams_from(path):
    """lr / momentum / weight decay chosen by a centralized run (its result.json)."""
    try:
        with open(path) as f:
            best = json.load(f)["best"]
        return float(best["lr"]), float(best["momentum"]), float(best["wd"])
    except FileNotFoundError:
        raise UserError(f"no such file: {path} (point --hparams at a finished centralized run's result.json)")
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a centralized result.json with a 'best' entry")


def pick_device(name):
    dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cpu":
        # Denormal floats are many times slower on CPUs (a one-class FedAvg client, whose gradients
        # quickly become tiny, ran ~15x slower). GPUs flush them to zero anyway; do the same here.
        torch.set_flush_denormal(True)
    return dev


def autocast(device, enabled=True):
    """bfloat16 autocast on GPU (2-3x faster ViT, same accuracy for these models); no-op on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def seed_everything(seed):
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(*keys):
    """A CPU generator seeded from (seed, epoch, step, ...): randomness that a resumed run replays exactly."""
    h = 0
    for k in keys:
        h = (h * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(h)


# ----------------------------------------------------------------------------- data

def load_cifar100(data_dir):
    """CIFAR-100 as uint8 tensors: (x_train N×32×32×3, y_train, x_test, y_test)."""
    import torchvision
    sets = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR100(data_dir, train=train, download=False)
        except RuntimeError:  # not there yet: download it
            if not network_reachable("www.cs.toronto.edu"):
                raise UserError(f"CIFAR-100 is not in {data_dir} and there is no network: run "
                                f"`python common.py --data-dir DIR` on a machine with internet, copy DIR here "
                                f"and pass --data-dir DIR (or use --dataset synthetic)")
            try:
                ds = torchvision.datasets.CIFAR100(data_dir, train=train, download=True)
            except Exception as e:
                raise UserError(f"could not download CIFAR-100 into {data_dir}: {e}")
        sets += [torch.from_numpy(ds.data), torch.tensor(ds.targets, dtype=torch.long)]
    return tuple(sets)


def make_synthetic(n_train, n_test, seed=0, num_classes=NUM_CLASSES, noise=0.3):
    """A learnable CIFAR-shaped set: each class is a fixed smooth, mirror-symmetric colour pattern;
    each image is that pattern, randomly shifted a little, plus pixel noise. Classes are balanced.
    Hard enough that a linear probe on a random tiny ViT stays well below 100%, so fine-tuning
    and federated runs have something left to learn."""
    g = torch.Generator().manual_seed(1234)  # the class patterns do not depend on --seed
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    protos = (protos + protos.flip(-1)) / 2  # mirror-symmetric: a horizontal flip keeps the class
    protos = (protos - protos.mean(dim=(1, 2, 3), keepdim=True)) * 2.5 + 0.5

    def draw(n, gen):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=gen)]
        shift = torch.randint(-2, 3, (n, 2), generator=gen)
        x = protos[y]
        x = torch.stack([torch.roll(img, (int(s[0]), int(s[1])), dims=(1, 2)) for img, s in zip(x, shift)])
        x = x + noise * torch.randn(x.shape, generator=gen)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return x, y

    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = draw(n_train, gen)
    x_te, y_te = draw(n_test, gen)
    return x_tr, y_tr, x_te, y_te


def stratified_split(labels, val_frac, seed):
    """(train_idx, val_idx): round(val_frac * count) samples of every class go to validation."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(val_frac * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(val)).values


def load_data(args):
    """dict with x/y for 'train', 'val', 'test' (uint8 images, int64 labels), on the CPU."""
    if args.dataset == "synthetic":
        x_tr, y_tr, x_te, y_te = make_synthetic(args.synthetic_size, max(args.synthetic_size // 5, NUM_CLASSES))
    else:
        x_tr, y_tr, x_te, y_te = load_cifar100(args.data_dir)
    # The split seed is fixed (not --seed) so that every run and every seed sees the same validation set.
    tr, va = stratified_split(y_tr, args.val_frac, seed=0)
    if len(va) == 0:
        raise UserError(f"--val-frac {args.val_frac} leaves no validation image; raise it (or --synthetic-size)")
    return {"train": (x_tr[tr], y_tr[tr]), "val": (x_tr[va], y_tr[va]), "test": (x_te, y_te)}


# ----------------------------------------------------------------------------- transforms (batched, on device)

def augment(x, gen):
    """Random crop (4-pixel zero padding) and horizontal flip on a uint8 N×H×W×C batch.
    The offsets come from the CPU generator `gen`, so the result is the same on any device."""
    n, h, w, _ = x.shape
    off = torch.randint(0, 9, (n, 2), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    xp = F.pad(x, (0, 0, 4, 4, 4, 4))  # pad H and W by 4 on each side
    rows = off[:, 0, None] + torch.arange(h, device=x.device)  # n×h
    cols = off[:, 1, None] + torch.arange(w, device=x.device)  # n×w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return xp[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


def preprocess(x, img_size):
    """uint8 N×H×W×C -> normalized float N×C×img_size×img_size (bilinear resize)."""
    x = x.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- model and weights

def network_reachable(host, port=443, timeout=3.0):
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _unwrap_state_dict(sd):
    """Accept the official DINO files (plain backbone dict, or a training checkpoint with
    teacher/student entries and module./backbone. prefixes) and timm state dicts."""
    for key in ("teacher", "student", "model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("not a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # DINO training checkpoint: drop the projection head
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def read_weights_file(path):
    if not os.path.isfile(path):
        raise UserError(f"weights file not found: {path} (download dino_deitsmall16_pretrain.pth or drop --weights)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        return _unwrap_state_dict(sd)
    except Exception as e:
        raise UserError(f"cannot read weights file {path} ({type(e).__name__}); re-download it")


def load_backbone_weights(model, sd, source):
    """Load a state dict into `model`, resizing position embeddings to its image size.
    A head in the file is used only if it has the model's shape (a file saved by this code)."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    sd = dict(sd)
    head = {k: sd.pop(k) for k in list(sd) if k.startswith("head.")}
    try:
        sd = checkpoint_filter_fn(sd, model)
        if head and all(k in model.state_dict() and model.state_dict()[k].shape == v.shape for k, v in head.items()):
            sd.update(head)
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except (RuntimeError, KeyError, ValueError) as e:  # shapes that do not match
        raise UserError(f"{source} does not fit --arch {model.default_cfg.get('architecture', '?')}: "
                        f"{str(e).splitlines()[0][:200]}")
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise UserError(f"{source} does not fit --arch {model.default_cfg.get('architecture', '?')}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def hub_weights(arch):
    """Path of the timm hub weights for `arch`: from the local cache, else downloaded.
    Offline without a cache this fails in seconds instead of retrying for a minute."""
    import timm
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        raise UserError(f"timm has no hub weights for {arch}; pass --weights FILE or --no-pretrained")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    for fname in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(cfg.hf_hub_id, fname)
        if isinstance(cached, str):
            return cached
    if not network_reachable("huggingface.co"):
        raise UserError(f"no network and no cached weights for {arch}: run `python common.py` where there is "
                        f"internet (fills ~/.cache/huggingface), or pass --weights dino_deitsmall16_pretrain.pth")
    try:
        return hf_hub_download(cfg.hf_hub_id, "model.safetensors")
    except Exception as e:
        raise UserError(f"could not download weights for {arch} ({type(e).__name__}); pass --weights FILE")


def build_model(args, num_classes=NUM_CLASSES):
    """timm ViT with a fresh linear head of `num_classes`; backbone weights from --weights,
    the hub, or random (--no-pretrained). The head is initialized from --seed."""
    import timm
    try:
        model = timm.create_model(args.arch, pretrained=False, num_classes=num_classes, img_size=args.img_size)
    except Exception as e:  # unknown name, or an image size the arch cannot take
        raise UserError(f"cannot build --arch {args.arch} at --img-size {args.img_size}: {e}")
    # Same head on every run with this seed, whatever the backbone weights
    # (a weights file saved by this code may bring its own head and replace it).
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        bound = 1 / math.sqrt(model.head.in_features)
        model.head.weight.copy_(torch.empty_like(model.head.weight).uniform_(-bound, bound, generator=g))
        model.head.bias.zero_()
    if args.weights:
        load_backbone_weights(model, read_weights_file(args.weights), args.weights)
    elif not args.no_pretrained:
        path = hub_weights(args.arch)
        load_backbone_weights(model, read_weights_file(path), path)
    return model


def backbone_params(model):
    """(name, param) of every weight except the classifier head: the tensors that masks cover."""
    return [(n, p) for n, p in model.named_parameters() if not n.startswith("head.")]


# ----------------------------------------------------------------------------- optimizer

class SparseSGDM(torch.optim.Optimizer):
    """SGD with momentum, dampening, Nesterov and weight decay (same update as torch.optim.SGD)
    where each parameter has a mask: 1/True = may change, 0/False = frozen.

    A frozen entry never changes: its gradient and weight-decay term are zeroed *before*
    they reach the momentum buffer, so the buffer stays +0 there and the update is exactly -0.
    `masks` is a list aligned with `params`; None means dense (no mask) for that tensor.

    step() runs multi-tensor (torch._foreach_*) ops over all parameters at once, using p.grad as
    scratch space (afterwards it holds the decayed gradient, masked or not: zero_grad discards it).
    Each mask is cast once to the parameter's dtype and device as keep (1 kept, 0 frozen) and
    drop = keep - 1. Masking d is d + d * drop: for finite d exactly torch.where(mask, d, +0.0)
    (d plus a zero of d's own sign is d; d - d is +0). With momentum, no dampening and no Nesterov
    (the default) the mask rides on the buffer update instead, buf + d * keep (buf + d where kept,
    +0 + ±0 = +0 where frozen), which saves a pass. Either way the results are bit for bit those of
    a per-tensor torch.where form. A non-finite gradient at a frozen entry is not zeroed (inf * 0)."""

    def __init__(self, params, masks, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        params = list(params)
        if len(masks) != len(params):
            raise ValueError("need one mask (or None) per parameter")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))
        # Masks are configuration, not state: kept out of state_dict() so a checkpoint's
        # load_state_dict (which casts state to the parameter dtype) cannot touch them.
        self.masks = {}
        for p, m in zip(params, masks):
            if m is not None:
                if m.shape != p.shape:
                    raise ValueError(f"mask shape {tuple(m.shape)} != parameter shape {tuple(p.shape)}")
                keep = m.to(device=p.device, dtype=torch.bool).to(p.dtype)
                self.masks[p] = (keep, keep - 1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group, params):
        lr, mom, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        d = [p.grad for p in params]
        if wd != 0:
            torch._foreach_add_(d, params, alpha=wd)
        bufs = [self.state[p].get("momentum_buffer") for p in params] if mom != 0 else []
        on_buffer = mom != 0 and damp == 0 and not group["nesterov"] and all(b is not None for b in bufs)
        masked = [i for i, p in enumerate(params) if p in self.masks]
        pick = lambda ts, idx: [ts[i] for i in idx]
        if not on_buffer:
            _foreach(torch._foreach_addcmul_, pick(d, masked), pick(d, masked),
                     [self.masks[params[i]][1] for i in masked])
        if mom != 0:
            old = [i for i, b in enumerate(bufs) if b is not None]
            _foreach(torch._foreach_mul_, pick(bufs, old), mom)
            if on_buffer:
                dense = [i for i in old if params[i] not in self.masks]
                _foreach(torch._foreach_add_, pick(bufs, dense), pick(d, dense))
                _foreach(torch._foreach_addcmul_, pick(bufs, masked), pick(d, masked),
                         [self.masks[params[i]][0] for i in masked])
            else:
                _foreach(torch._foreach_add_, pick(bufs, old), pick(d, old), alpha=1 - damp)
            for i, b in enumerate(bufs):
                if b is None:
                    bufs[i] = self.state[params[i]]["momentum_buffer"] = d[i].clone()
            if group["nesterov"]:
                torch._foreach_add_(d, bufs, alpha=mom)
            else:
                d = bufs
        torch._foreach_add_(params, d, alpha=-lr)


def _foreach(op, tensors, *args, **kwargs):
    """op(tensors, *args, **kwargs) unless the list is empty (torch._foreach_* ops refuse that)."""
    if tensors:
        op(tensors, *args, **kwargs)


# ----------------------------------------------------------------------------- learning-rate schedules

SCHEDULERS = ["cosine", "step", "exponential", "constant", "warmup-cosine"]


def lr_factor(name, epoch, epochs, warmup=2):
    """Multiplier of the base learning rate for `epoch` (0-based) out of `epochs`.
    A pure function, so a resumed run needs no scheduler state."""
    if name == "constant":
        return 1.0
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if name == "step":  # /10 at one third and two thirds of training
        return 0.1 ** (epoch // max(1, math.ceil(epochs / 3)))
    if name == "exponential":  # reaches 1% of the base rate at the last epoch
        return 0.01 ** (epoch / max(1, epochs - 1))
    if name == "warmup-cosine":
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))
    raise ValueError(f"unknown scheduler {name}")


# ----------------------------------------------------------------------------- features, head training, evaluation

@torch.no_grad()
def extract_features(model, x, args, device, gen=None, desc="features"):
    """Backbone features (pre-logits) of uint8 images x, batched; augmented views if gen is given."""
    from tqdm import tqdm
    model.eval()
    out = []
    for i in tqdm(range(0, len(x), args.eval_batch_size), desc=desc, leave=False, disable=None):
        xb = x[i:i + args.eval_batch_size].to(device)
        if gen is not None:
            xb = augment(xb, gen)
        with autocast(device, not args.no_amp):
            f = model.forward_head(model.forward_features(preprocess(xb, args.img_size)), pre_logits=True)
        out.append(f.float())
    return torch.cat(out)


@torch.no_grad()
def evaluate_logits_fn(fn, xs, ys, batch_size):
    """Mean cross-entropy and top-1 accuracy of fn(batch) -> logits over (xs, ys)."""
    loss, correct = 0.0, 0
    for i in range(0, len(xs), batch_size):
        logits = fn(xs[i:i + batch_size]).float()
        yb = ys[i:i + batch_size].to(logits.device)
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return loss / len(xs), correct / len(xs)


def evaluate(model, x, y, args, device):
    """(loss, accuracy) of the whole model on uint8 images x, no augmentation, no gradients."""
    model.eval()

    def logits(xb):
        with autocast(device, not args.no_amp):
            return model(preprocess(xb.to(device), args.img_size))
    return evaluate_logits_fn(logits, x, y, args.eval_batch_size)


def evaluate_splits(model, data, args, device):
    """Validation and test loss and accuracy of the whole model, as one metrics row."""
    vl, va = evaluate(model, *data["val"], args, device)
    tl, ta = evaluate(model, *data["test"], args, device)
    return dict(val_loss=vl, val_acc=va, test_loss=tl, test_acc=ta)


def evaluate_head(head, feats, y, batch_size=4096):
    head.eval()
    return evaluate_logits_fn(head, feats, y, batch_size)


def train_step(model, opt, xb, yb, args, device, gen=None):
    """One optimizer step of the whole model on a uint8 batch, augmented when `gen` is given.
    Returns the batch loss."""
    model.train()
    xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
    if gen is not None:
        xb = augment(xb, gen)
    with autocast(device, not args.no_amp):
        logits = model(preprocess(xb, args.img_size))
    loss = F.cross_entropy(logits.float(), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def train_head_epoch(head, opt, feats, y, batch_size, gen):
    """One epoch of the linear head on cached features; returns the mean training loss."""
    head.train()
    perm = torch.randperm(len(feats), generator=gen).to(feats.device)
    total = 0.0
    for i in range(0, len(feats), batch_size):
        idx = perm[i:i + batch_size]
        loss = F.cross_entropy(head(feats[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(feats)


def train_head(head, feats, hp, args, epochs, patience, state=None, on_epoch=None, test=None):
    """Train a linear head on cached features with SGDM, a schedule and early stopping.

    feats: {'train': (f, y, views or None), 'val': (f, y)}; hp: dict(lr, momentum, wd, scheduler).
    `state` (from a checkpoint) resumes mid-way; `on_epoch(state)` is called after every epoch
    so the caller can checkpoint. Returns the final state; the head ends with the best-val weights.
    """
    head.requires_grad_(True)
    opt = torch.optim.SGD(head.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["wd"])
    if state is None:
        state = {"epoch": 0, "best_acc": -1.0, "best_epoch": -1, "bad": 0, "history": [],
                 "best_head": None}
    else:
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
    f_tr, y_tr, views = feats["train"]
    f_va, y_va = feats["val"]
    while state["epoch"] < epochs and state["bad"] < patience:
        ep = state["epoch"]
        for g in opt.param_groups:
            g["lr"] = hp["lr"] * lr_factor(hp["scheduler"], ep, epochs)
        f = f_tr if views is None else f_tr[ep % views]
        tr_loss = train_head_epoch(head, opt, f, y_tr, args.batch_size, make_generator(args.seed, ep, 7))
        va_loss, va_acc = evaluate_head(head, f_va, y_va)
        row = {"epoch": ep + 1, "lr": opt.param_groups[0]["lr"], "train_loss": tr_loss,
               "val_loss": va_loss, "val_acc": va_acc}
        if test is not None:
            row["test_loss"], row["test_acc"] = evaluate_head(head, *test)
        state["history"].append(row)
        if va_acc > state["best_acc"]:
            state.update(best_acc=va_acc, best_epoch=ep + 1, bad=0,
                         best_head={k: v.detach().clone() for k, v in head.state_dict().items()})
        else:
            state["bad"] += 1
        state["epoch"] = ep + 1
        state["head"] = head.state_dict()
        state["opt"] = opt.state_dict()
        if on_epoch is not None:
            on_epoch(state)
    head.load_state_dict(state["best_head"])
    return state


def feature_cache_path(args, split, views):
    """Features depend on data, backbone and image size only; cache them so grids and reruns skip it."""
    w = os.path.basename(args.weights) if args.weights else ("random" if args.no_pretrained else "hub")
    src = f"{args.dataset}{args.synthetic_size if args.dataset == 'synthetic' else ''}"
    aug = f"_{views}views_seed{args.seed}" if views else ""  # augmented views depend on the seed
    amp = "_fp32" if args.no_amp else ""  # bf16 autocast gives slightly different features
    name = f"{src}_{args.arch}_{w}_{args.img_size}px{amp}_v{args.val_frac}_{split}{aug}.pt"
    return os.path.join(args.data_dir, "features", name.replace("/", "_"))


def cached_features(model, data, args, device, aug_views=0):
    """{'train': (f, y, views), 'val': (f, y), 'test': (f, y)} of the frozen backbone, on device.
    aug_views=0: clean training images (exact: training without augmentation).
    aug_views=V: V augmented copies of the training set, epoch e uses copy e % V (exact for that
    augmentation schedule). Features are cached on disk in --data-dir/features."""
    out = {}
    for split in ("train", "val", "test"):
        views = aug_views if split == "train" else 0
        path = feature_cache_path(args, split, views)
        x, y = data[split]
        f = None
        if os.path.isfile(path) and not args.no_pretrained:
            try:
                f = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                f = None  # a corrupt cache file is just recomputed
        if f is None:
            if views == 0:
                f = extract_features(model, x, args, device, desc=f"{split} features").cpu()
            else:
                f = torch.stack([extract_features(model, x, args, device, gen=make_generator(args.seed, v, 11),
                                                  desc=f"{split} view {v}").cpu() for v in range(views)])
            if not args.no_pretrained:  # random backbones differ by seed: never cache them
                atomic_save(f, path)
        out[split] = (f.to(device), y.to(device)) + ((views or None,) if split == "train" else ())
    return out


# ----------------------------------------------------------------------------- Fisher scores and masks

MASK_RULES = ["least-sensitive", "most-sensitive", "lowest-magnitude", "highest-magnitude", "random"]
SCORES = ["logit", "loglik"]
# The layers whose weight and bias TaLoS masks (its layers.mask_pretrained_vit wraps exactly these).
MASKED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)


def _masked_layers(model):
    """[(module name, module)] of the MASKED_LAYERS outside the classifier head that own parameters."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, MASKED_LAYERS) and n != "head" and not n.startswith("head.")
            and any(True for _ in m.parameters(recurse=False))]


def masked_params(model):
    """(name, param) of every weight and bias of the Linear, Conv2d and LayerNorm layers outside the
    classifier head, in named_parameters() order: the tensors TaLoS scores, damps and freezes (patch
    embedding, attention and MLP projections, every LayerNorm). Not cls_token nor pos_embed: those
    sit on no such layer, and fine-tuning trains them densely. Masks and sparsity cover exactly these."""
    owned = {f"{mn}.{pn}" for mn, m in _masked_layers(model) for pn, _ in m.named_parameters(recurse=False)}
    return [(n, p) for n, p in model.named_parameters() if n in owned]


def sample_labels(logits, u):
    """y ~ softmax(logits) per row by inverse CDF with the given uniforms u in [0, 1), one per row: the
    smallest class whose cumulative probability exceeds u (float64). A sample's label depends on its own
    logits and u only, not on how samples are batched."""
    cdf = torch.softmax(logits.detach().double(), dim=1).cumsum(1)
    y = torch.searchsorted(cdf, u.to(cdf.device, torch.float64)[:, None], right=True).squeeze(1)
    return y.clamp_(max=logits.shape[1] - 1)


def draw_calibration(n_items, n, gen):
    """(idx, u): n random items out of n_items (all if n >= n_items) and one float64 uniform per item
    for sample_labels, both from the CPU generator gen (a fresh draw per call)."""
    idx = torch.randperm(n_items, generator=gen)[:n]
    return idx, torch.rand(len(idx), generator=gen, dtype=torch.float64)


def _per_sample_grads(module, x, g):
    """(weight, bias) gradients of each sample, batch first, of a Linear, Conv2d or LayerNorm layer from
    its input x and the gradient g of its output (None for a missing bias). Linear and Conv2d: the
    einsum of input and output gradient over tokens / positions; LayerNorm: output gradient times the
    normalized input; bias: output gradient summed over tokens."""
    n = len(x)
    if isinstance(module, torch.nn.Linear):
        x, g = x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])
        return torch.bmm(g.transpose(1, 2), x), g.sum(1)
    if isinstance(module, torch.nn.Conv2d):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise NotImplementedError("per-sample gradients of a Conv2d need numeric zero padding")
        groups = module.groups
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        cols = cols.view(n, groups, -1, cols.shape[-1])                      # n × G × (Cin/G·kh·kw) × L
        g = g.reshape(n, groups, -1, cols.shape[-1])                         # n × G × Cout/G × L
        w = torch.einsum("ngol,ngil->ngoi", g, cols).reshape(n, *module.weight.shape)
        return w, g.sum(3).reshape(n, -1)
    dims = len(module.normalized_shape)  # LayerNorm: per-sample sums over every non-normalized dim
    x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
    flat = lambda t: t.reshape(n, -1, *t.shape[t.dim() - dims:])
    return flat(g * x_hat).sum(1), flat(g).sum(1)


# Up to this many tokens per sample, a Linear layer's squared per-sample gradients are summed without
# forming them: sum_n (G_n^T A_n)^2 = sum over n and token pairs t <= t' of (g_t g_t')^T (a_t a_t'), one
# matrix product. Its cost grows with tokens^2 (forming them: with tokens); measured on one CPU thread
# for ViT-S's fc1 at 32 images, it is 5x faster at 5 tokens (ViT-S at 32 px), 2x at 8, 2x slower at 16.
GRAM_MAX_TOKENS = 8


def _squared_sums(module, x, g):
    """(weight, bias) sums over the batch of the squared per-sample gradients of `module`."""
    if isinstance(module, torch.nn.Linear) and x.dim() > 2 and x[0].numel() <= GRAM_MAX_TOKENS * x.shape[-1]:
        x, g = x.reshape(len(x), -1, x.shape[-1]), g.reshape(len(g), -1, g.shape[-1])
        i, j = torch.triu_indices(x.shape[1], x.shape[1], device=x.device)
        twice = torch.where(i == j, 1.0, 2.0).to(g.dtype)[None, :, None]  # t != t' pairs count twice
        gg = (g[:, i] * g[:, j] * twice).reshape(-1, g.shape[-1])
        return gg.T @ (x[:, i] * x[:, j]).reshape(-1, x.shape[-1]), g.sum(1).square_().sum(0)
    return tuple(t.square_().sum(0) for t in _per_sample_grads(module, x, g))


def _square_into(sums, prefix, module):
    """Forward hook for `module` (named prefix): on the output it registers a gradient hook that adds
    the squared per-sample gradients of the module's weight and bias into sums, one layer at a time."""
    names = [f"{prefix}.weight", f"{prefix}.bias"]

    def add_squares(x, g):
        for name, sq in zip(names, _squared_sums(module, x, g)):
            if name in sums:
                sums[name].add_(sq)

    def hook(mod, inputs, out):
        if out.requires_grad:
            x = inputs[0].detach()
            out.register_hook(lambda g: add_squares(x, g))
    return hook


@torch.no_grad()
def _damp(model, mask, damp):
    """Multiply the masked-out entries of every masked tensor by damp, in place; returns the original
    tensors, to be copied back exactly."""
    saved = {}
    for n, p in masked_params(model):
        saved[n] = p.detach().clone()
        p.copy_(torch.where(mask[n].to(p.device), p, p * damp))
    return saved


def fisher_sums(model, images, u, img_size, batch_size, device, mask=None, damp=0.1, score="logit"):
    """Sensitivity scores of the masked tensors (masked_params): for every entry, the sum over samples of
    its squared per-sample gradient. Returns ({name: sum}, number of samples); sums add across calls.

    Each sample's objective is, at a label y drawn from the model itself (sample_labels with the sample's
    uniform in `u`, from the same forward pass): score="logit", the raw logit of y, as TaLoS's code
    (`logits.gather(1, y)`); score="loglik", log p(y|x), which makes the sums the textbook (empirical
    over images, true over labels) diagonal Fisher. `images` are uint8 N×H×W×C, scored batch_size at a
    time; the result does not depend on batch_size (up to float rounding). With `mask`, masked-out
    entries are multiplied by `damp` during the forward pass (TaLoS's re-scoring), then restored bit for
    bit; their own sums are gradients at the damped values (select_mask ignores them).

    Per-sample gradients come layer by layer out of one batched backward: hooks keep each masked layer's
    input, receive its output gradient, and square and add the per-sample weight and bias gradients at
    once, so at most one layer's per-sample gradients exist at a time (none for a Linear layer with few
    tokens: see GRAM_MAX_TOKENS). The backward computes no .grad
    of any parameter (their requires_grad is off meanwhile; the input image requires grad instead).
    Runs in the model's own dtype (float32), never under autocast: the sums are squared, often tiny
    gradients whose ranking decides the mask, and bfloat16's 8-bit mantissa would tie and reorder them."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score}")
    params = masked_params(model)
    sums = {n: torch.zeros_like(p) for n, p in params}
    dtype = params[0][1].dtype
    hooks = [m.register_forward_hook(_square_into(sums, n, m)) for n, m in _masked_layers(model)]
    flags, training, saved = [(p, p.requires_grad) for p in model.parameters()], model.training, {}
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        if mask is not None:
            saved = _damp(model, mask, damp)
        with torch.enable_grad():
            for i in range(0, len(images), batch_size):
                x = preprocess(images[i:i + batch_size].to(device), img_size).to(dtype).requires_grad_()
                logits = model(x)
                y = sample_labels(logits, u[i:i + batch_size])
                out = logits if score == "logit" else F.log_softmax(logits, dim=1)
                torch.autograd.grad(out.gather(1, y[:, None]).sum(), x)
    finally:
        with torch.no_grad():
            for n, p in params:
                if n in saved:
                    p.copy_(saved[n])
        for p, flag in flags:
            p.requires_grad_(flag)
        for h in hooks:
            h.remove()
        model.train(training)
    return sums, len(images)


def select_mask(scores, rule, keep, current=None, gen=None, params=None):
    """Binary mask {name: bool} keeping (True = may be updated) exactly `keep` entries overall.

    A single global threshold over all tensors (as TaLoS). Rules:
      least-sensitive / most-sensitive: keep the lowest / highest `scores` (Fisher);
      lowest-magnitude / highest-magnitude: keep the smallest / largest |weight| (`params`);
      random: keep a uniformly random subset (seeded by `gen`).
    Entries already masked out in `current` stay out. Ties go to the lower flat index."""
    names = list(scores if scores is not None else params)
    if rule in ("least-sensitive", "most-sensitive"):
        key = torch.cat([scores[n].flatten().float() for n in names])
    elif rule in ("lowest-magnitude", "highest-magnitude"):
        key = torch.cat([params[n].detach().flatten().abs().float() for n in names])
    elif rule == "random":
        sizes = sum(params[n].numel() for n in names)
        key = torch.rand(sizes, generator=gen).to(params[names[0]].device)
    else:
        raise ValueError(f"unknown rule {rule}")
    if rule in ("most-sensitive", "highest-magnitude"):
        key = -key
    if current is not None:
        out = torch.cat([~current[n].flatten().to(key.device) for n in names])
        key = torch.where(out, torch.full_like(key, float("inf")), key)
        if keep > int((~out).sum()):
            raise ValueError("cannot keep more entries than the current mask has")
    order = torch.sort(key, stable=True).indices
    flat = torch.zeros(len(key), dtype=torch.bool, device=key.device)
    flat[order[:keep]] = True
    mask, i = {}, 0
    for n in names:
        shape = (scores if scores is not None else params)[n].shape
        mask[n] = flat[i:i + math.prod(shape)].view(shape)
        i += math.prod(shape)
    return mask


def keep_schedule(total, sparsity, rounds):
    """Entries kept after each calibration round: exponential decay of the kept fraction,
    (1 - sparsity) ** (r / rounds), ending at exactly round(total * (1 - sparsity))."""
    final = total - int(round(total * sparsity))
    ks = [int(round(total * (1 - sparsity) ** (r / rounds))) for r in range(1, rounds + 1)]
    ks[-1] = final
    return [max(k, final) for k in ks]


def calibrate_mask(model, score_fn, rule, sparsity, rounds, gen):
    """Multi-round calibration of a mask over masked_params(model): in round r, score with the current
    mask applied (score_fn(mask) -> {name: score}), then shrink the kept set to keep_schedule(...)[r]
    among the entries still kept. Returns (mask, per-round log)."""
    params = dict(masked_params(model))
    total = sum(p.numel() for p in params.values())
    mask, log = None, []
    for r, keep in enumerate(keep_schedule(total, sparsity, rounds)):
        scores = score_fn(mask) if rule in ("least-sensitive", "most-sensitive") else None
        mask = select_mask(scores, rule, keep, current=mask, gen=gen, params=params)
        log.append({"round": r + 1, "kept": keep, "kept_frac": keep / total})
    return mask, log


def save_mask(mask, path):
    """A mask file is a plain dict {parameter name: bool tensor}, loadable with weights_only=True."""
    atomic_save({n: m.detach().cpu().bool() for n, m in mask.items()}, path)


def load_mask(path, model):
    """Read a mask file and check it fits masked_params(model) (every name, every shape)."""
    try:
        mask = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"mask file not found: {path} (make one with model_editing.py)")
    except Exception as e:
        raise UserError(f"cannot read mask file {path} ({type(e).__name__}); recreate it with model_editing.py")
    params = dict(masked_params(model))
    if isinstance(mask, dict) and {"cls_token", "pos_embed"} & set(mask):
        raise UserError(f"mask {path} was made by an older version (it masks cls_token/pos_embed); "
                        "recalibrate it: rerun model_editing.py")
    if not isinstance(mask, dict) or set(mask) != set(params):
        extra = sorted(set(mask) - set(params)) if isinstance(mask, dict) else []
        missing = sorted(set(params) - set(mask)) if isinstance(mask, dict) else []
        raise UserError(f"mask {path} does not fit --arch: missing {missing[:3]}, unknown {extra[:3]}")
    for n, p in params.items():
        if not isinstance(mask[n], torch.Tensor) or mask[n].shape != p.shape:
            raise UserError(f"mask {path} does not fit --arch: {n} should have shape {tuple(p.shape)}")
    return {n: m.bool() for n, m in mask.items()}


def mask_density(mask):
    return sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())


# ----------------------------------------------------------------------------- run directories

def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(obj, path):
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def write_csv(rows, path):
    """Rows (dicts) to CSV, atomically; columns in first-seen order."""
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(buf.getvalue(), path)


# Flags that do not change a run's result: a run may be resumed with other values of these.
NON_RESULT_FLAGS = {"out", "resume", "device", "eval_batch_size", "data_dir"}


def run_config(args):
    return {k: v for k, v in sorted(vars(args).items()) if k not in NON_RESULT_FLAGS}


def default_out(stage, parts):
    """runs/<stage>/<k1>_<v1>-<k2>_<v2>...: readable and distinct per flag combination."""
    name = "-".join(f"{k}{v}" for k, v in parts.items() if v is not None and v is not False)
    return os.path.join("runs", stage, name.replace("/", "_") or "default")


def open_run(args):
    """Prepare args.out. Returns the checkpoint to resume from (or None).
    Refuses a directory that holds a different run, or an unfinished one without --resume."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory")
    cfg_path, ckpt_path = os.path.join(out, "config.json"), os.path.join(out, "checkpoint.pt")
    config = run_config(args)
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                old = json.load(f)
        except ValueError:
            raise UserError(f"{cfg_path} is corrupt; delete {out} or choose another --out")
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise UserError(f"{out} holds a different run (differs in {', '.join(diff)}); "
                            f"choose another --out or delete it")
        if os.path.isfile(os.path.join(out, "result.json")) and not args.resume:
            raise UserError(f"{out} already holds a finished run; choose another --out or delete it")
        if os.path.isfile(ckpt_path):
            if not args.resume:
                raise UserError(f"{out} holds an interrupted run: add --resume to continue it, "
                                f"or choose another --out")
            try:
                return torch.load(ckpt_path, map_location="cpu", weights_only=False)
            except Exception as e:
                raise UserError(f"cannot read {ckpt_path} ({type(e).__name__}); delete it to start over")
    elif os.path.isdir(out) and os.listdir(out):
        raise UserError(f"--out {out} is not empty and holds no run; choose another --out")
    os.makedirs(out, exist_ok=True)
    write_json(config, cfg_path)
    return None


def prepare(args):
    """The start every script shares: None if --resume finds the run already finished,
    else (device, data, model). Nothing is written yet: bad data or weights leave no run dir."""
    if args.resume and finished(args):
        print(f"{args.out} is already finished")
        return None
    device = pick_device(args.device)
    seed_everything(args.seed)
    data = load_data(args)
    model = build_model(args).to(device)
    return device, data, model


def finished(args):
    """True if args.out holds this very run (same config), finished (result.json written)."""
    try:
        with open(os.path.join(args.out, "config.json")) as f:
            same = json.load(f) == run_config(args)
    except (OSError, ValueError):
        return False
    return same and os.path.isfile(os.path.join(args.out, "result.json"))


def save_checkpoint(state, args):
    atomic_save(state, os.path.join(args.out, "checkpoint.pt"))


def finish_run(result, args):
    """Write result.json (the marker of a finished run) and drop the now useless checkpoint."""
    write_json(result, os.path.join(args.out, "result.json"))
    ckpt = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(ckpt):
        os.remove(ckpt)


# ----------------------------------------------------------------------------- plots

def plot_lines(path, series, xlabel, ylabel, title):
    """series: {label: (xs, ys)} -> one PNG line plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def plot_bars(path, labels, values, ylabel, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(labels)), 4))
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- prefetch for offline use

def main():
    p = Parser(description="Download CIFAR-100 and the DINO ViT-S/16 weights, for later offline runs.")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--arch", default=DEFAULT_ARCH)
    p.add_argument("--data-only", action="store_true", help="only CIFAR-100 (you bring --weights FILE)")
    a = p.parse_args()
    load_cifar100(a.data_dir)
    print(f"CIFAR-100 is in {a.data_dir}")
    if not a.data_only:
        print(f"weights for {a.arch}: {hub_weights(a.arch)}")


if __name__ == "__main__":
    run_main(main)
