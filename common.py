"""Pieces shared by centralized.py, model_editing.py and fedavg.py.

Read it top to bottom: errors and signals, flags, device and precision, random streams, data and
transforms, the ViT and its weights, SparseSGDM, learning-rate schedules, forward passes and
evaluation, frozen-backbone features and heads (SGD and ridge), Fisher scores and masks (TaLoS steps
1-2), files and run directories (atomic writes, locks, resume), plots, and the command line (prefetch
for offline use, the run list of run_all.sh and its time estimate).

Run it as a script to prefetch CIFAR-100 and the DINO weights for offline use:
    python common.py --data-dir ./data
"""
import argparse
import csv
import errno
import fcntl
import io
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 100

DEFAULT_ARCH = "vit_small_patch16_224.dino"
# The DINO backbone was pre-trained on ImageNet with these statistics, so its inputs
# must be normalized the same way (CIFAR-100's own statistics would shift every feature).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- errors and signals

class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, no network): one line, exit 2."""


class Finished(Exception):
    """--resume found the run already finished: nothing to do (exit status 0)."""


class Stopped(Exception):
    """SIGTERM or SIGUSR1 arrived (SLURM preemption or time limit): the run stopped during `phase`,
    right after saving a checkpoint if `saved`, else at a point with nothing new worth saving."""

    def __init__(self, phase, saved=False):
        super().__init__(phase)
        self.phase, self.saved = phase, saved


class Diverged(Exception):
    """The training loss is not finite (see LossWatch): the run stops without a result."""


DIVERGED_EXIT = 3  # exit status of a diverged run (2: bad input, 143: stopped by a signal)

_stop_signal = None
_open_run = None  # the run directory open_run prepared: where run_main looks for a checkpoint on a stop


def _on_stop_signal(signum, frame):
    global _stop_signal
    _stop_signal = signum


def stop_requested():
    """True once SIGTERM/SIGUSR1 arrived: loops checkpoint at the next step boundary, then raise Stopped."""
    return _stop_signal is not None


def stop_here(phase):
    """Raise Stopped(phase) if a stop was requested: called between the batches of phases that keep no
    partial state (features, ridge, calibration, head epochs), which are redone on --resume."""
    if stop_requested():
        raise Stopped(phase)


def _what_was_kept(stopped):
    """What a stopped run left for later, truly: the checkpoint it just saved, the one it had, or none."""
    if stopped.saved:
        return "checkpoint saved, continue with --resume"
    if _open_run and os.path.isfile(os.path.join(_open_run, "checkpoint.pt")):
        return "nothing new to save, its last checkpoint is kept: continue with --resume"
    return "no checkpoint yet and nothing needed saving: rerun the same command to start it again"


def die_with_parent():
    """Under run_all.sh (which sets RUN_ALL_PID), get SIGTERM when run_all.sh dies, even by SIGKILL:
    an orphaned run would otherwise go on writing while a rerun of run_all.sh starts it again."""
    parent = os.environ.get("RUN_ALL_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != parent:  # run_all.sh died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_main(main):
    """Call main(): a UserError is one line on stderr and exit status 2; a diverged run (Diverged) one
    line and DIVERGED_EXIT; SIGTERM/SIGUSR1 make the run stop within seconds (checkpointing at its
    next step boundary where it has new state) and exit 143, ready for --resume."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, _on_stop_signal)
    die_with_parent()
    try:
        main()
    except Finished as e:
        print(e)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"diverged: {e}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT)
    except Stopped as e:
        print(f"stopped by signal {_stop_signal} during {e.phase}: {_what_was_kept(e)}", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("interrupted: continue later with --resume", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- flags

class Parser(argparse.ArgumentParser):
    """argparse that prints every default in --help (so help cannot drift from the code), and a bad
    flag as one line (no usage dump) with exit status 2."""

    def __init__(self, **kw):
        super().__init__(**{"formatter_class": argparse.ArgumentDefaultsHelpFormatter, **kw})

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


def seed_int(s):
    """A seed torch can take: from -2^63 to 2^64 - 1."""
    v = int(s)
    if not -2**63 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer from -2^63 to 2^64-1 (torch's seed range), got {s}")
    return v


MAX_SYNTHETIC = 200_000  # 4x CIFAR-100's training set; the set is built in float32 (12 kB an image)


def synthetic_size(s):
    v = positive_int(s)
    if v > MAX_SYNTHETIC:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SYNTHETIC} (it is built in memory, "
                                         f"12 kB an image), got {s}")
    return v


def path(s):
    """A file or folder flag: an empty one is refused (it would silently mean the current folder, or the
    root: --results "" put runs under /fedavg/...)."""
    if not s.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return s


def damping(s):
    """A factor in [0, 1]: 1 damps nothing, above 1 would amplify."""
    v = float(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (a damping factor), got {s}")
    return v


def unit_float(s):
    """A fraction in [0, 1)."""
    v = float(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def changed_flags(p, args, names):
    """The flags among `names` (dest names) whose value differs from their default: given on purpose."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) != p.get_default(n)]


def refuse_ignored(p, args, names, why):
    """p.error if a flag among `names` was changed from its default although `why` makes it do nothing."""
    given = changed_flags(p, args, names)
    if given:
        p.error(f"{' '.join(given)} would be ignored: {why}; drop {'it' if len(given) == 1 else 'them'}")


def check_base_flags(p, args):
    """Contradictions among base_parser's flags (every script's get_args calls this)."""
    if args.weights and args.no_pretrained:  # said, not refused: the tests' tiny flags carry --no-pretrained
        print(f"note: --no-pretrained is ignored: --weights {args.weights} gives the backbone")


def base_parser():
    """Flags every script spells the same way (an argparse parent)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data and model (shared by all scripts)")
    g.add_argument("--dataset", choices=["cifar100", "synthetic"], default="cifar100",
                   help="cifar100 (downloaded into --data-dir) or a small learnable synthetic "
                        "CIFAR-shaped set for tests and offline trials")
    g.add_argument("--data-dir", type=path, default="./data", help="where CIFAR-100 and cached features live")
    g.add_argument("--synthetic-size", type=synthetic_size, default=5000,
                   help="training images in the synthetic set; its test set is a fifth of that")
    g.add_argument("--val-frac", type=unit_float, default=0.1,
                   help="fraction of the training set held out for validation, stratified by class")
    g.add_argument("--arch", default=DEFAULT_ARCH, help="timm ViT name (tests use test_vit)")
    g.add_argument("--weights", type=path, default=None,
                   help="local weights file: official DINO checkpoint (dino_deitsmall16_pretrain.pth) "
                        "or a timm state dict (.pth/.safetensors); none: timm's hub weights; "
                        "standin or standin-sharp (with --arch test_vit): a tiny ViT the project pretrains "
                        "itself on other synthetic classes, cached in DATA_DIR/standin/ (tests, offline trials)")
    g.add_argument("--no-pretrained", action="store_true",
                   help="random backbone weights (for tests and smoke runs only)")
    g.add_argument("--img-size", type=positive_int, default=224,
                   help="images are resized to this many pixels before the ViT (a multiple of its patch size)")
    g.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    g.add_argument("--eval-batch-size", type=positive_int, default=256, help="evaluation batch size")
    g.add_argument("--seed", type=seed_int, default=0, help="random seed of everything but the validation split")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (none: cuda if available, else cpu)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision of the backbone on a GPU: auto = bf16 where the GPU supports it "
                        "natively (compute capability >= 8.0), fp16 with a gradient scaler on older GPUs "
                        "(T4, V100), off (fp32) on the CPU. The head and every accuracy are fp32 always")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (bit-identical reruns and resumes on a GPU; a little slower)")
    g.add_argument("--results", type=path, default="runs", help="root of the default run directories")
    g.add_argument("--out", type=path, default=None,
                   help="run directory (none: RESULTS/STAGE/NAME/seedSEED, NAME from the main flags)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (starts fresh if there is none)")
    return p


def edit_parser():
    """Head and mask flags shared by model_editing.py and fedavg.py --sparse (an argparse parent)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("step 0: the classifier head, frozen from then on")
    g.add_argument("--head", type=path, default="ridge", metavar="{ridge,warmup,FILE}",
                   help="ridge: closed-form ridge regression on frozen-backbone features, lambda chosen on "
                        "the validation split (fedavg.py: from the clients' sufficient statistics, one "
                        "round); warmup: SGD on the frozen backbone (fedavg.py: --warmup-rounds head-only "
                        "rounds); FILE: a head.pt saved by an earlier run (e.g. the centralized baseline)")
    g = p.add_argument_group("steps 1-2: gradient mask (model_editing.py, fedavg.py --sparse)")
    g.add_argument("--rule", choices=MASK_RULES, default="least-sensitive",
                   help="which backbone weights may be updated (TaLoS: least-sensitive)")
    g.add_argument("--sparsity", type=unit_float, default=0.9,
                   help="fraction of the masked tensors' N entries that are FROZEN: the mask keeps "
                        "int((1 - sparsity) * N) of them updatable, 1 - sparsity in floating point (TaLoS's "
                        "count; 0.9 updates 10%% of them, rounded down)")
    g.add_argument("--calib-rounds", type=positive_int, default=4,
                   help="mask calibration rounds; round r keeps int((1 - sparsity) ** (r / rounds) * N) "
                        "entries (TaLoS's count), at least one fewer than the round before")
    g.add_argument("--score", choices=["logit", "loglik"], default="logit",
                   help="sensitivity: squared per-sample gradient of the sampled class's raw logit (TaLoS's "
                        "code) or of its log-probability (the textbook Fisher)")
    g.add_argument("--fisher-batches", type=positive_int, default=8,
                   help="batches of --fisher-batch-size images scored per calibration round")
    g.add_argument("--fisher-batch-size", type=positive_int, default=32,
                   help="images per Fisher batch; memory grows with it (one layer's per-sample gradients)")
    g.add_argument("--calib-damp", type=damping, default=0.1,
                   help="while calibrating, weights already masked out are scaled by this (TaLoS: 0.1)")
    g.add_argument("--calib-images", choices=CALIB_IMAGES, default="train-aug",
                   help="calibration images scored through the training augmentation, a fresh random crop "
                        "and flip each round (train-aug: TaLoS scores through its training preprocessing) "
                        "or as they are (clean); independent of --no-aug")
    return p


# edit_parser's flags that make a mask: they do nothing without one to make (no --sparse, or --mask FILE)
CALIBRATION_FLAGS = ("rule", "sparsity", "calib_rounds", "score", "fisher_batches", "fisher_batch_size",
                     "calib_damp")


def hparams_from(path):
    """lr / momentum / weight decay chosen by a centralized run (its result.json), checked as the flags
    --lr, --momentum and --wd are."""
    try:
        with open(path) as f:
            best = json.load(f)["best"]
        hp = float(best["lr"]), float(best["momentum"]), float(best["wd"])
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): point --hparams at a finished centralized "
                        f"run's result.json")
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a centralized result.json with a 'best' entry")
    for name, v, check in zip(("lr", "momentum", "wd"), hp, (nonneg_float, unit_float, nonneg_float)):
        try:
            check(v)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"--hparams {path}: its {name} {e}")
    return hp


# ----------------------------------------------------------------------------- device, precision, determinism

def pick_device(name, deterministic=False):
    """torch.device from --device, checked; also sets TF32 off and, with --deterministic, the
    deterministic kernels (before any CUDA work, as cuBLAS needs)."""
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {name} is not a device: use cpu, cuda or cuda:N")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        # fp32 means fp32: PyTorch's default lets convolutions (the patch embedding) run in TF32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if deterministic and dev.type == "cuda":  # CPU kernels are deterministic already (and the switch costs ~2 s)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op with no deterministic CUDA kernel in the installed PyTorch prints a warning
        # (in the run's log) instead of stopping a study that run_all.sh started with this flag
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if dev.type == "cpu":
        # Denormal floats are many times slower on CPUs: a one-class FedAvg client, whose gradients
        # quickly become tiny, ran ~15x slower. Flushing them to zero changes no accuracy we report.
        torch.set_flush_denormal(True)
    return dev


def resolve_amp(amp, device):
    """The precision actually used: 'bf16', 'fp16' or 'off' (fp32), from --amp and the device."""
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            raise UserError(f"--amp {amp} needs a CUDA GPU; on the CPU use --amp off (or auto)")
        return "off"
    if amp != "auto":
        return amp
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"  # T4 (7.5) and V100 (7.0) have no fast bf16


def autocast(device, precision):
    """Mixed-precision context for the backbone; the head runs outside it (see forward_logits)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(device, precision):
    """fp16 gradients underflow without loss scaling; the scaler is a no-op in bf16 and fp32.
    A step whose gradients hold inf/nan is skipped entirely (SparseSGDM's frozen entries included)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# ----------------------------------------------------------------------------- seeding and random streams

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


# Every kind of random draw has its own stream: the name's number is mixed into the generator's seed
# last, so two streams never share numbers and adding a draw to one leaves the others unchanged.
STREAMS = {
    "head_epoch": 7,       # centralized / warm-up head: order of each epoch's samples
    "feature_view": 11,    # augmented feature views
    "edit_calib": 31,      # model_editing.py: calibration images of each round
    "mask_rule": 37,       # the random mask rule
    "edit_epoch": 41,      # model_editing.py: order of each epoch's samples
    "edit_aug": 43,        # model_editing.py: crop/flip of each step
    "shards": 47,          # fedavg.py: who holds which sample
    "clients": 53,         # fedavg.py: clients sampled each round
    "client_batches": 59,  # fedavg.py: a client's local batches
    "client_aug": 61,      # fedavg.py: crop/flip of a client's local steps
    "fed_calib": 67,       # fedavg.py: calibration images of each client and round
    "edit_calib_aug": 71,  # model_editing.py: crop/flip of each round's calibration images
    "fed_calib_aug": 73,   # fedavg.py: crop/flip of each client's calibration images, per round
    "standin": 79,         # the pretrained stand-in backbone: its batches and crops
}


def stream(name, seed, *keys):
    """The generator of random stream `name` for (seed, *keys)."""
    return make_generator(seed, *keys, STREAMS[name])


# ----------------------------------------------------------------------------- data

def load_cifar100(data_dir):
    """CIFAR-100 as uint8 tensors: (x_train N×32×32×3, y_train, x_test, y_test)."""
    import torchvision
    sets = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR100(data_dir, train=train, download=False)
        except RuntimeError:  # not there yet (or its files fail torchvision's checksum): download it
            folder = os.path.join(data_dir, "cifar-100-python")
            if os.path.isdir(folder) and not network_reachable("www.cs.toronto.edu"):
                raise UserError(f"CIFAR-100 in {folder} is incomplete or corrupt (its files fail the checksum) and "
                                f"there is no network to download it again: copy a good {folder} here, or "
                                f"delete it and run `python common.py --data-dir DIR` on a machine with internet")
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


def make_synthetic(n_train, n_test, seed=0, num_classes=NUM_CLASSES, noise=0.3, family=0):
    """A learnable CIFAR-shaped set: each class is a fixed smooth, mirror-symmetric colour pattern;
    each image is that pattern, randomly shifted a little, plus pixel noise. Classes are balanced.
    Hard enough that a linear probe on a random tiny ViT stays well below 100%, so fine-tuning
    and federated runs have something left to learn. `family` picks another set of class patterns
    (family 0 is --dataset synthetic; the pretrained stand-in learns on family 1)."""
    g = torch.Generator().manual_seed(1234 + family)  # the class patterns do not depend on --seed
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

def draw_augmentation(n, gen):
    """Crop offsets (n×2, in 0..8) and flips (n) of `n` images from the CPU generator `gen`:
    the same numbers on any device. Draw a whole client's or epoch's worth at once, move them once."""
    return torch.randint(0, 9, (n, 2), generator=gen), torch.rand(n, generator=gen) < 0.5


def augment(x, off, flip):
    """Random crop (4-pixel zero padding) at offsets `off` and horizontal flip where `flip`,
    on a uint8 N×H×W×C batch (all three on one device)."""
    n, h, w, _ = x.shape
    xp = F.pad(x, (0, 0, 4, 4, 4, 4))  # pad H and W by 4 on each side
    rows = off[:, 0, None] + torch.arange(h, device=x.device)  # n×h
    cols = off[:, 1, None] + torch.arange(w, device=x.device)  # n×w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return xp[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


_NORMALIZE = {}  # device -> (mean, std): made once per device, not at every batch


def preprocess(x, img_size):
    """uint8 N×H×W×C -> normalized float N×C×img_size×img_size (bilinear resize)."""
    x = x.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    if x.device not in _NORMALIZE:
        _NORMALIZE[x.device] = (torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1),
                                torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1))
    mean, std = _NORMALIZE[x.device]
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


# Pretrained stand-ins for the DINO backbone, for tests and offline trials: test_vit pretrained on another
# family of synthetic classes than --dataset synthetic's, so its features transfer but were not learned on
# the set it is then used on. name -> (pretraining classes, AdamW steps). On the synthetic set (5000
# images, 32 px) the step-0 ridge head reaches about 85% (standin: few classes seen, room to learn) and
# 100% (standin-sharp: where a frozen head's logit scale matters most).
STANDINS = {"standin": (3, 150), "standin-sharp": (100, 200)}


def standin_weights(name, data_dir):
    """Path of the stand-in backbone `name` (see STANDINS), pretrained on first use (seconds on a CPU,
    deterministic) and cached in DATA_DIR/standin/ like the features."""
    path = os.path.join(data_dir, "standin", f"{name}.pt")
    if os.path.isfile(path):
        return path
    import timm
    classes, steps = STANDINS[name]
    x, y, _, _ = make_synthetic(4000, 1, seed=1, num_classes=classes, family=1)
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=classes, img_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    gen, batch, step = stream("standin", 0), 128, 0
    while step < steps:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch + 1, batch):
            off, flip = draw_augmentation(batch, gen)
            loss = F.cross_entropy(model(preprocess(augment(x[perm[i:i + batch]], off, flip), 32)),
                                   y[perm[i:i + batch]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    atomic_save({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, path)
    return path


def build_model(args, num_classes=NUM_CLASSES):
    """timm ViT with a fresh linear head of `num_classes`; backbone weights from --weights,
    the hub, or random (--no-pretrained). The head is initialized from --seed."""
    import timm
    from timm.models.vision_transformer import VisionTransformer
    if not timm.is_model(args.arch):
        raise UserError(f"--arch {args.arch}: timm has no such model (e.g. {DEFAULT_ARCH})")
    try:
        model = timm.create_model(args.arch, pretrained=False, num_classes=num_classes, img_size=args.img_size)
    except TypeError:  # a model that takes no img_size: not a ViT
        model = None
    except Exception as e:  # an image size the arch cannot take
        raise UserError(f"cannot build --arch {args.arch} at --img-size {args.img_size}: {e}")
    if not isinstance(model, VisionTransformer):
        raise UserError(f"--arch {args.arch} is not a timm VisionTransformer, which this code needs "
                        f"(its patch embedding, tokens and masked layers), e.g. {DEFAULT_ARCH}")
    patch = model.patch_embed.patch_size[0]
    if args.img_size % patch:
        raise UserError(f"--img-size {args.img_size} is not a multiple of {args.arch}'s patch size {patch}: "
                        f"use e.g. --img-size {max(patch, args.img_size // patch * patch)}")
    # Same head on every run with this seed, whatever the backbone weights
    # (a weights file saved by this code may bring its own head and replace it).
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        bound = 1 / math.sqrt(model.head.in_features)
        model.head.weight.copy_(torch.empty_like(model.head.weight).uniform_(-bound, bound, generator=g))
        model.head.bias.zero_()
    if args.weights in STANDINS:
        if args.arch != "test_vit":
            raise UserError(f"--weights {args.weights} is a pretrained test_vit: use it with --arch test_vit")
        load_backbone_weights(model, read_weights_file(standin_weights(args.weights, args.data_dir)), args.weights)
    elif args.weights:
        load_backbone_weights(model, read_weights_file(args.weights), args.weights)
    elif not args.no_pretrained:
        path = hub_weights(args.arch)
        load_backbone_weights(model, read_weights_file(path), path)
    return model


def backbone_params(model):
    """(name, param) of every weight except the classifier head: what sparse fine-tuning trains (the
    masked tensors through their masks, cls_token and pos_embed densely; see masked_params)."""
    return [(n, p) for n, p in model.named_parameters() if not n.startswith("head.")]


# ----------------------------------------------------------------------------- optimizer

def cache_sized_groups(tensors, size=256 * 1024):
    """Index lists of consecutive tensors of about `size` entries (1 MB of fp32) each. Multi-tensor ops
    applied group by group find their operands still in the CPU cache from the previous op; over all
    of a ViT-S at once every op streams 88 MB from memory (measured: 25% slower per pass on one core)."""
    groups, cur, n = [], [], 0
    for i, t in enumerate(tensors):
        cur.append(i)
        n += t.numel()
        if n >= size:
            groups.append(cur)
            cur, n = [], 0
    return groups + ([cur] if cur else [])


class SparseSGDM(torch.optim.Optimizer):
    """SGD with momentum, dampening, Nesterov and weight decay (same update as torch.optim.SGD)
    where each parameter has a mask: 1/True = may change, 0/False = frozen.

    A frozen entry never changes, whatever its gradient holds (inf and nan included): its gradient and
    weight-decay term are set to +0 *before* they reach the momentum buffer, so the buffer stays +0
    there and the update is exactly -0. `masks` is a list aligned with `params`; None means dense (no
    mask) for that tensor.

    step() runs multi-tensor (torch._foreach_*) ops over cache-sized groups of parameters, using p.grad
    as scratch space (afterwards it holds the decayed gradient, masked or not: zero_grad discards it).
    The mask is applied by selection, not arithmetic: each mask is kept as an integer of the
    parameter's width, all ones where kept and all zeros where frozen, and ANDed into the bits of the
    gradient (one pass, as fast as a multiply on the CPU). A multiply would turn an inf gradient at a
    frozen entry into nan (inf * 0) and move the frozen weight; the AND gives +0 there and leaves a
    kept entry's bits as they are, so the step is bit for bit torch.optim.SGD's on the kept entries."""

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
                bits = _SAME_WIDTH_INT[p.dtype]
                self.masks[p] = m.to(device=p.device, dtype=torch.bool).to(bits).neg_()  # True -> -1: all ones
        self.restarted = set()

    def restart(self):
        """Forget the momentum, as a new optimizer would (FedAvg: every client starts afresh), but keep
        the buffers' memory: the next step copies into them instead of allocating new ones (a fresh
        ViT-S-sized buffer per client costs ~5% of a CPU round in page faults)."""
        self.restarted = set(self.state)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for idx in cache_sized_groups(params):
                self._update(group, [params[i] for i in idx])
        return loss

    def _update(self, group, params):
        lr, mom, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        d = [p.grad for p in params]
        if wd != 0:
            torch._foreach_add_(d, params, alpha=wd)
        for p, g in zip(params, d):
            if p in self.masks:
                g.view(self.masks[p].dtype).bitwise_and_(self.masks[p])
        if mom != 0:
            bufs = [None if p in self.restarted else self.state[p].get("momentum_buffer") for p in params]
            old = [i for i, b in enumerate(bufs) if b is not None]
            _foreach(torch._foreach_mul_, [bufs[i] for i in old], mom)
            _foreach(torch._foreach_add_, [bufs[i] for i in old], [d[i] for i in old], alpha=1 - damp)
            for i, b in enumerate(bufs):
                if b is None and params[i] in self.restarted:  # first step after restart()
                    bufs[i] = self.state[params[i]]["momentum_buffer"].copy_(d[i])
                    self.restarted.discard(params[i])
                elif b is None:
                    bufs[i] = self.state[params[i]]["momentum_buffer"] = d[i].clone()
            if group["nesterov"]:
                torch._foreach_add_(d, bufs, alpha=mom)
            else:
                d = bufs
        torch._foreach_add_(params, d, alpha=-lr)


# The integer type of each float type's width: a mask of it selects a float's bits with one AND.
_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                   torch.float16: torch.int16, torch.bfloat16: torch.int16}


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


# ----------------------------------------------------------------------------- forward passes, steps, evaluation

def backbone_features(model, x, device, precision):
    """Pre-logit features of preprocessed images, the backbone in `precision`, returned in fp32."""
    with autocast(device, precision):
        f = model.forward_head(model.forward_features(x), pre_logits=True)
    return f.float()


def forward_logits(model, x, device, precision):
    """Logits of preprocessed images: the backbone in `precision`, the head in fp32 (outside autocast).
    Every accuracy of the study goes through an fp32 head, whether on images here or on cached
    features (evaluate_head): bf16 logits tie on a few percent of samples and would bias comparisons."""
    return model.head(backbone_features(model, x, device, precision))


def optimizer_step(opt, loss, scaler):
    """Backward and step, through the fp16 gradient scaler (a no-op in bf16/fp32)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


# A finite training loss above this many times chance's, ln(NUM_CLASSES), is worth a warning.
LOSS_WARN_FACTOR = 2
# fp16's gradient scaler halves its scale at each step whose gradients overflow and skips the step (normal
# now and then). Below this scale, 32 halvings under its start of 2^16, a gradient overflows fp16 only
# beyond 2^32: the gradients are not finite at any scale, and every step is skipped. That is divergence.
MIN_GRAD_SCALE = 2.0 ** -16


class LossWatch:
    """Watches one stage's training loss where the script reads it anyway (once per epoch or round: no
    extra host sync). check(): a loss that is not finite, or an fp16 scaler that backed off to
    MIN_GRAD_SCALE, stops the run (Diverged), naming the stage, when, the loss and `hint`.
    warn(): at an evaluation point, one warning line (once per stage) for a finite loss far above chance."""

    def __init__(self, stage, hint):
        self.stage, self.hint, self.warned = stage, hint, False

    def check(self, loss, when, scaler=None):
        if not math.isfinite(loss):
            raise Diverged(f"{self.stage}, {when}: the training loss is {loss}; stopped without a result: "
                           f"try {self.hint}")
        if scaler is not None and scaler.is_enabled() and scaler.get_scale() < MIN_GRAD_SCALE:
            raise Diverged(f"{self.stage}, {when}: the fp16 gradient scaler skipped every step down to a scale of "
                           f"{scaler.get_scale():.3g} (the gradients are not finite at any scale; training loss "
                           f"{loss:.4g}); stopped without a result: try {self.hint}")

    def warn(self, loss, when):
        chance = math.log(NUM_CLASSES)
        if not self.warned and loss > LOSS_WARN_FACTOR * chance:
            self.warned = True
            print(f"warning: {self.stage}, {when}: training loss {loss:.4g}, far above chance ({chance:.2f}); "
                  f"the run may be diverging: consider {self.hint}", file=sys.stderr)


@torch.no_grad()
def evaluate_logits_fn(fn, xs, ys, batch_size):
    """Mean cross-entropy and top-1 accuracy of fn(batch) -> fp32 logits over (xs, ys)."""
    loss = correct = 0
    for i in range(0, len(xs), batch_size):
        logits = fn(xs[i:i + batch_size])
        yb = ys[i:i + batch_size].to(logits.device)
        loss = loss + F.cross_entropy(logits, yb, reduction="sum")
        correct = correct + (logits.argmax(1) == yb).sum()
    return float(loss) / len(xs), int(correct) / len(xs)


def evaluate(model, x, y, args, device):
    """(loss, accuracy) of the whole model on uint8 images x, no augmentation, no gradients."""
    model.eval()
    return evaluate_logits_fn(lambda xb: forward_logits(model, preprocess(xb.to(device), args.img_size),
                                                        device, args.precision),
                              x, y, args.eval_batch_size)


def evaluate_head(head, feats, y, batch_size=4096):
    head.eval()
    return evaluate_logits_fn(head, feats, y, batch_size)


# ----------------------------------------------------------------------------- frozen-backbone features and heads

@torch.no_grad()
def extract_features(model, x, args, device, aug_gen=None, desc="features"):
    """Backbone features (pre-logits, fp32) of uint8 images x, batched; augmented views if aug_gen is given."""
    from tqdm import tqdm
    model.eval()
    out = []
    for i in tqdm(range(0, len(x), args.eval_batch_size), desc=desc, leave=False, disable=None):
        stop_here(f"feature extraction ({desc})")  # a split's features are saved whole or not at all
        xb = x[i:i + args.eval_batch_size].to(device)
        if aug_gen is not None:
            off, flip = draw_augmentation(len(xb), aug_gen)
            xb = augment(xb, off.to(device), flip.to(device))
        out.append(backbone_features(model, preprocess(xb, args.img_size), device, args.precision))
    return torch.cat(out)


def feature_cache_path(args, split, views):
    """Features depend on data, backbone, image size and the precision they were computed in (fp32 on a
    CPU and bf16 on a GPU differ slightly); cache them so grids and reruns skip the backbone."""
    w = os.path.basename(args.weights) if args.weights else ("random" if args.no_pretrained else "hub")
    src = f"{args.dataset}{args.synthetic_size if args.dataset == 'synthetic' else ''}"
    aug = f"_{views}views_seed{args.seed}" if views else ""  # augmented views depend on the seed
    precision = "fp32" if args.precision == "off" else args.precision
    name = f"{src}_{args.arch}_{w}_{args.img_size}px_{precision}_v{args.val_frac}_{split}{aug}.pt"
    return os.path.join(args.data_dir, "features", name.replace("/", "_"))


def cached_features(model, data, args, device, aug_views=0):
    """{split: (features, labels)} of the frozen backbone for 'train', 'val', 'test', on device.
    aug_views=0: features of the clean training images (N×D; exact: training without augmentation).
    aug_views=V: of V augmented copies of the training set (V×N×D), epoch e uses copy e % V (exact
    for that augmentation schedule). Features are cached on disk in --data-dir/features."""
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
                f = torch.stack([extract_features(model, x, args, device, stream("feature_view", args.seed, v),
                                                  desc=f"{split} view {v}").cpu() for v in range(views)])
            if not args.no_pretrained:  # random backbones differ by seed: never cache them
                atomic_save(f, path)
        out[split] = (f.to(device), y.to(device))
    return out


def train_head_epoch(head, opt, feats, y, batch_size, gen):
    """One epoch of the linear head on cached features (fp32); returns the mean training loss."""
    head.train()
    perm = torch.randperm(len(feats), generator=gen).to(feats.device)
    total = 0
    for i in range(0, len(feats), batch_size):
        idx = perm[i:i + batch_size]
        loss = F.cross_entropy(head(feats[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total = total + loss.detach() * len(idx)
    return float(total) / len(feats)


def train_head(head, feats, hp, epochs, patience, batch_size, seed, test=None, watch=None):
    """Train a linear head on cached features: SGD with momentum, the schedule hp['scheduler'], early
    stopping after `patience` epochs without a better validation accuracy. The head ends with its
    best-validation weights. feats: cached_features(...) (train features N×D, or V×N×D views);
    hp: dict(lr, momentum, wd, scheduler); watch: the LossWatch of the caller's stage (a loss that is
    not finite stops the run). A stop signal stops it between epochs (Stopped: an epoch takes seconds
    and is redone). Returns (history rows, best epoch)."""
    watch = watch or LossWatch("head training", f"a learning rate below {hp['lr']:g}")
    head.requires_grad_(True)
    opt = torch.optim.SGD(head.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["wd"])
    f_tr, y_tr = feats["train"]
    history, best_acc, best_epoch, best_head = [], -1.0, 0, None
    for ep in range(epochs):
        for g in opt.param_groups:
            g["lr"] = hp["lr"] * lr_factor(hp["scheduler"], ep, epochs)
        f = f_tr if f_tr.dim() == 2 else f_tr[ep % len(f_tr)]  # clean, or the epoch's augmented view
        tr_loss = train_head_epoch(head, opt, f, y_tr, batch_size, stream("head_epoch", seed, ep))
        watch.check(tr_loss, f"epoch {ep + 1}")
        va_loss, va_acc = evaluate_head(head, *feats["val"])
        watch.warn(tr_loss, f"epoch {ep + 1}")
        row = {"epoch": ep + 1, "lr": opt.param_groups[0]["lr"], "train_loss": tr_loss,
               "val_loss": va_loss, "val_acc": va_acc}
        if test is not None:
            row["test_loss"], row["test_acc"] = evaluate_head(head, *test)
        history.append(row)
        if va_acc > best_acc:
            best_acc, best_epoch = va_acc, ep + 1
            best_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
        elif ep + 1 - best_epoch >= patience:
            break
        stop_here(f"{watch.stage}, after epoch {ep + 1}")
    head.load_state_dict(best_head)
    return history, best_epoch


def ridge_stats(feats, y, num_classes=NUM_CLASSES):
    """Sufficient statistics of ridge regression from features to one-hot labels, in float64:
    (A = Σ φφᵀ, B = Σ φ onehot(y)ᵀ, n) with φ = [features, 1]. Statistics of disjoint sets add up,
    so the sum over clients is exactly the statistics of their union."""
    phi = torch.cat([feats.double(), torch.ones(len(feats), 1, dtype=torch.float64, device=feats.device)], 1)
    return phi.T @ phi, phi.T @ F.one_hot(y, num_classes).double(), len(y)


RIDGE_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # per sample: the penalty is lambda * n * ||W||²
RIDGE_TEMPERATURES = torch.logspace(0, 3, 31).tolist()  # 1 .. 1000
# The temperature minimizes a label-smoothed validation cross-entropy. Plain cross-entropy keeps falling
# as the temperature grows on a well-separated validation set, so it ran to the end of the grid (631-1000
# on the pretrained stand-in), and every image the head gets wrong while fine-tuning (augmented, or a
# client's) then sent the backbone gradients hundreds of times too large: the first round wrecked the
# features. With smoothing eps the best logit margin is finite, about ln((1 - eps) * K / eps) = 6.8.
RIDGE_LABEL_SMOOTHING = 0.1


@torch.no_grad()
def ridge_head(head, stats, val_feats, val_y, lambdas=RIDGE_LAMBDAS):
    """Set `head` to the ridge solution W = (A + λ·n·I)⁻¹ B (bias not penalized) for the λ with the best
    validation accuracy (first of equals), its logits then multiplied by the temperature with the lowest
    label-smoothed validation cross-entropy: regression outputs live near [0, 1], too flat a softmax for
    the cross-entropy fine-tuning that follows, while an unbounded temperature makes the frozen head
    wreck the backbone (see RIDGE_LABEL_SMOOTHING); scaling changes no prediction. Returns what was chosen."""
    A, B, n = stats
    penalty = torch.eye(len(A), dtype=A.dtype, device=A.device)
    penalty[-1, -1] = 0
    phi_val = torch.cat([val_feats.double(), torch.ones(len(val_feats), 1, dtype=torch.float64,
                                                        device=val_feats.device)], 1)
    best = None
    for lam in lambdas:
        stop_here("the ridge head")
        W = torch.linalg.solve(A + lam * n * penalty, B)
        acc = float((phi_val @ W).argmax(1).eq(val_y).double().mean())
        if best is None or acc > best[1]:
            best = (lam, acc, W)
    lam, acc, W = best
    logits = (phi_val @ W).float()
    losses = [float(F.cross_entropy(t * logits, val_y, label_smoothing=RIDGE_LABEL_SMOOTHING))
              for t in RIDGE_TEMPERATURES]
    t = RIDGE_TEMPERATURES[losses.index(min(losses))]
    head.weight.copy_((t * W[:-1]).T.to(head.weight))
    head.bias.copy_((t * W[-1]).to(head.bias))
    return {"ridge_lambda": lam, "ridge_temperature": t, "head_val_acc": acc}


def load_head_file(path, head):
    """A head.pt ({'weight', 'bias'} of the classifier, from centralized.py or an editing/FedAvg run)."""
    sd = load_tensor_file(path, "--head file", "use ridge, warmup or a head.pt of an earlier run")
    want = {k: v.shape for k, v in head.state_dict().items()}
    if not isinstance(sd, dict) or {k: getattr(v, "shape", None) for k, v in sd.items()} != want:
        raise UserError(f"--head {path} is not a head of this model (want weight {tuple(want['weight'])} "
                        f"and bias {tuple(want['bias'])})")
    return sd


# What a head's input features depend on: a head from a run that differed in these (another backbone of
# the same width) has the right shape but reads other features.
BACKBONE_FLAGS = ("arch", "weights", "no_pretrained", "img_size")


def check_head_source(path, args):
    """Refuse a head file whose run (the config.json next to it, when there is one) had another backbone."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")) as f:
            source = json.load(f)
    except (OSError, ValueError):
        return  # a head file from elsewhere: only its shape can be checked
    if not isinstance(source, dict):
        return
    def same(k):  # weights files by name, as the feature cache keys them (the same file, another path)
        a, b = source[k], getattr(args, k)
        return (os.path.basename(a) == os.path.basename(b)) if k == "weights" and a and b else a == b
    differ = [k for k in BACKBONE_FLAGS if k in source and not same(k)]
    if differ:
        k = differ[0]
        raise UserError(f"--head {path} was trained on another backbone (its run has --{k.replace('_', '-')} "
                        f"{source[k]}, this one {getattr(args, k)}); use a head of this backbone, or ridge")


def cpu_state(module):
    """A state dict on the CPU: files that load on any machine with a plain torch.load."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- Fisher scores and masks

MASK_RULES = ["least-sensitive", "most-sensitive", "lowest-magnitude", "highest-magnitude", "random"]
SCORES = ["logit", "loglik"]
CALIB_IMAGES = ["train-aug", "clean"]
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


def calibration_view(images, how, gen):
    """Calibration images as scored (--calib-images): `how` "train-aug" passes the uint8 batch through
    the training augmentation (augment, with offsets and flips from the CPU generator gen), "clean"
    returns it unchanged."""
    if how not in CALIB_IMAGES:
        raise ValueError(f"unknown calibration images {how}")
    if how == "clean":
        return images
    off, flip = draw_augmentation(len(images), gen)
    return augment(images, off.to(images.device), flip.to(images.device))


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
                stop_here("mask calibration")  # a round is redone whole on --resume
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
    """Entries kept after each calibration round r = 1..rounds, counted exactly as the TaLoS reference
    counts them (prune_finetune.py's round loop, Pruner._global_copy): int((1 - sparsity) ** (r / rounds)
    * total), truncated, with 1 - sparsity in floating point (1 - 0.95 = 0.050000000000000044), in every
    round including the last, which keeps int((1 - sparsity) * total); and at least one entry fewer than
    the round before (the reference's kthvalue index is capped at the kept count - 1; this only matters
    when consecutive rounds would keep the same count). A kept fraction of 1.0 keeps everything (the
    reference skips calibration then). Counts below 1 are refused earlier, by check_sparsity."""
    kept_frac = 1.0 - sparsity
    if kept_frac >= 1.0:
        return [total] * rounds
    ks = []
    for r in range(1, rounds + 1):
        ks.append(min(int(kept_frac ** (r / rounds) * total), (ks[-1] if ks else total) - 1))
    return ks


def calibrate_mask(model, score_fn, rule, sparsity, rounds, gen):
    """Multi-round calibration of a mask over masked_params(model): in round r, score with the current
    mask applied (score_fn(mask) -> {name: score}), then shrink the kept set to keep_schedule(...)[r]
    among the entries still kept. Returns (mask, per-round log)."""
    params = dict(masked_params(model))
    total = sum(p.numel() for p in params.values())
    mask, log = None, []
    for r, keep in enumerate(keep_schedule(total, sparsity, rounds)):
        stop_here(f"mask calibration, round {r + 1} of {rounds}")
        scores = score_fn(mask) if rule in ("least-sensitive", "most-sensitive") else None
        mask = select_mask(scores, rule, keep, current=mask, gen=gen, params=params)
        log.append({"round": r + 1, "kept": keep, "kept_frac": keep / total})
    return mask, log


def save_mask(mask, path):
    """A mask file is a plain dict {parameter name: bool tensor}, loadable with weights_only=True."""
    atomic_save({n: m.detach().cpu().bool() for n, m in mask.items()}, path)


def load_mask(path, model):
    """Read a mask file and check it fits masked_params(model) (every name, every shape)."""
    mask = load_tensor_file(path, "mask file", "make one with model_editing.py")
    params = dict(masked_params(model))
    if not isinstance(mask, dict):
        raise UserError(f"{path} is not a mask file (a dict of bool tensors by parameter name; it holds a "
                        f"{type(mask).__name__}): make one with model_editing.py")
    if {"cls_token", "pos_embed"} & set(mask):
        raise UserError(f"mask {path} was made by an older version (it masks cls_token/pos_embed); "
                        "recalibrate it: rerun model_editing.py")
    if set(mask) != set(params):
        extra, missing = sorted(set(mask) - set(params)), sorted(set(params) - set(mask))
        raise UserError(f"mask {path} does not fit --arch: missing {missing[:3]}, unknown {extra[:3]}")
    for n, p in params.items():
        if not isinstance(mask[n], torch.Tensor) or mask[n].shape != p.shape:
            raise UserError(f"mask {path} does not fit --arch: {n} should have shape {tuple(p.shape)}")
    mask = {n: m.bool() for n, m in mask.items()}
    if not any(bool(m.any()) for m in mask.values()):  # as --sparsity that keeps nothing (check_sparsity)
        raise UserError(f"mask {path} keeps no entry at all (every value False): it would train nothing")
    return mask


def mask_density(mask):
    return sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())


def check_sparsity(model, sparsity, rounds):
    """Refuse a --sparsity that keeps no entry at all after --calib-rounds (it would train nothing
    without a word; the reference's kthvalue fails there)."""
    total = sum(p.numel() for _, p in masked_params(model))
    if keep_schedule(total, sparsity, rounds)[-1] < 1:
        raise UserError(f"--sparsity {sparsity} keeps none of the {total} entries of the masked tensors "
                        f"after {rounds} calibration round(s): lower it")


def calibrate(model, draw, args, device):
    """Step 1 of model_editing.py and fedavg.py --sparse: calibrate_mask with --rule, --sparsity and
    --calib-rounds, round r scoring the images draw(r) -> (uint8 images, uniforms for their labels)
    with --score and --calib-damp. Prints the rounds; returns (mask, per-round log)."""
    rounds_done = 0

    def score(mask):
        nonlocal rounds_done
        rounds_done += 1
        images, u = draw(rounds_done)
        sums, n = fisher_sums(model, images, u, args.img_size, args.fisher_batch_size, device,
                              mask=mask, damp=args.calib_damp, score=args.score)
        return {k: v / n for k, v in sums.items()}

    t = time.time()
    mask, log = calibrate_mask(model, score, args.rule, args.sparsity, args.calib_rounds,
                               stream("mask_rule", args.seed))
    for row in log:
        print(f"  calibration round {row['round']}: keep {row['kept']} entries ({row['kept_frac']:.4%})")
    print(f"mask ({args.rule}, sparsity {args.sparsity}, score {args.score}, {args.calib_images} images) "
          f"calibrated in {time.time() - t:.1f}s")
    return mask, log


def changed_count(model, initial):
    """(entries of masked_params that differ from `initial` {name: tensor}, entries in all)."""
    params = masked_params(model)
    changed = sum(int((p.detach().cpu() != initial[n].cpu()).sum()) for n, p in params)
    return changed, sum(p.numel() for _, p in params)


# ----------------------------------------------------------------------------- files and run directories

def load_tensor_file(path, what, fix):
    """torch.load of a file the user names, on the CPU and weights_only (a crafted pickle cannot run
    code); a missing or unreadable file is one line saying `fix`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path} ({fix})")
    except Exception as e:
        raise UserError(f"cannot read {what} {path} ({type(e).__name__}): {fix}")


def atomic_write(path, write):
    """write(tmp_path) into a temporary file next to `path`, then rename it onto `path`: a reader (or a
    run killed mid-write) never sees half a file. The file gets the usual permissions (0666 minus the
    umask; mkstemp alone would make it 0600, unreadable to collaborators on a shared cluster). A write
    that fails (a full disk, a read-only folder) is one line: `path` keeps its earlier version, if any."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the device (or quota) to write {path}: it was not written and "
                            f"its earlier version, if any, is kept (a run keeps its last checkpoint); free "
                            f"some space, then run the same command again (with --resume for a run)")
        raise UserError(f"cannot write {path} ({e.strerror or e}); earlier files are kept")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    """torch.save through a file object: the record name inside the zip is then always 'archive' (given a
    path, torch names it after the temporary file), so identical runs write byte-identical files."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(path, write)


def atomic_write_text(text, path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(obj, path):
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def write_csv(rows, path):
    """Rows (dicts) to CSV, atomically; columns in first-seen order; None is an empty cell."""
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(buf.getvalue(), path)


# Flags that do not change a run's result: a run may be resumed with other values of these.
# (Not --eval-batch-size: the order in which evaluation sums its batches shows in the last digits.)
NON_RESULT_FLAGS = {"out", "results", "resume", "device", "data_dir"}


def run_config(args):
    return {k: v for k, v in sorted(vars(args).items()) if k not in NON_RESULT_FLAGS}


LOCK_FILE = ".lock"
_held_locks = {}  # run dir -> open lock file: held as long as the process lives (the OS drops it at exit)


def lock_run(out):
    """Take the exclusive lock of run directory `out` for the life of this process. A second process
    is refused, naming the PID that holds it; a lock of a dead process is gone (flock dies with it)."""
    os.makedirs(out, exist_ok=True)
    key = os.path.realpath(out)
    if key in _held_locks:  # this process opened the run before (tests call main() repeatedly)
        return
    try:
        f = open(os.path.join(out, LOCK_FILE), "a+")
    except OSError as e:  # a read-only folder, a .lock that is a directory
        raise UserError(f"cannot open {os.path.join(out, LOCK_FILE)} ({e.strerror}): the run directory must be "
                        f"writable and its {LOCK_FILE} a file; fix it or choose another --out")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise UserError(f"{out} is in use by another process (PID {pid}); wait for it to finish or stop it")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held_locks[key] = f


def is_temporary(name):
    """A temporary file of atomic_write (older versions also wrote NAME.tmp.png)."""
    return name.endswith(".tmp") or name.endswith(".tmp.png")


def remove_stale_temporaries(out):
    """Temporary files of atomic writes that a killed process left behind (we hold the lock: nobody
    else is writing here)."""
    for name in os.listdir(out):
        if is_temporary(name):
            os.remove(os.path.join(out, name))


def open_run(args):
    """Lock and prepare args.out. Returns the checkpoint to resume from (or None).
    Refuses a directory that holds a different run, or an unfinished one without --resume. An existing
    folder is checked before anything in it is touched (lock file, temporaries): only then is it known
    to be this run's; the check is repeated under the lock."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory")
    created = not os.path.exists(out)
    if not created:
        _check_run_dir(args, before_lock=True)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out} ({e.strerror}); choose another --out or --results")
    global _open_run
    try:
        lock_run(out)
        remove_stale_temporaries(out)
        ckpt = _check_run_dir(args)
        _open_run = out
        return ckpt
    except UserError:
        if created:  # leave nothing behind for a refused command
            import shutil
            shutil.rmtree(out, ignore_errors=True)
        raise


def read_result_json(out):
    """The result.json of run directory `out` as a dict, or None: a run is finished only when its
    result.json is a JSON object (an empty or truncated file marks nothing)."""
    try:
        with open(os.path.join(out, "result.json")) as f:
            r = json.load(f)
    except (OSError, ValueError):
        return None
    return r if isinstance(r, dict) else None


def _check_run_dir(args, before_lock=False):
    """Refuse args.out unless it is this run's: a new folder, or one whose config.json is this run's.
    before_lock: only look (nothing written). Else load the checkpoint to resume from (checked to be
    this run's) or write config.json, and return the checkpoint or None."""
    out = args.out
    names = {n: os.path.join(out, n) for n in ("config.json", "checkpoint.pt", "result.json")}
    for n, path in names.items():
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UserError(f"{path} is not a regular file; remove it or choose another --out")
    cfg_path, ckpt_path = names["config.json"], names["checkpoint.pt"]
    config = run_config(args)
    if not os.path.isfile(cfg_path):
        # a new run: the folder must be empty, but for what a run of ours killed before config.json
        # existed leaves (its lock file, and temporaries only next to that lock file)
        entries = os.listdir(out)
        stray = [n for n in entries if n != LOCK_FILE and not (LOCK_FILE in entries and is_temporary(n))]
        if stray:
            raise UserError(f"--out {out} is not empty and holds no run (it has {sorted(stray)[0]!r}); "
                            f"choose another --out")
        if not before_lock:
            write_json(config, cfg_path)
        return None
    try:
        with open(cfg_path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_path} is unreadable ({type(e).__name__}); delete {out} or choose another --out")
    if not isinstance(old, dict):
        raise UserError(f"{cfg_path} is not a run's config (not a JSON object); delete {out} or choose another --out")
    if old != config:
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise UserError(f"{out} holds a different run (differs in {', '.join(diff)}); "
                        f"choose another --out or delete it")
    if read_result_json(out) is not None and not args.resume:
        raise UserError(f"{out} already holds a finished run; choose another --out or delete it")
    if read_result_json(out) is None and not args.resume:
        raise UserError(f"{out} holds an interrupted run: add --resume to continue it, or choose another --out")
    if before_lock or not os.path.isfile(ckpt_path):
        return None  # --resume of a run killed before its first checkpoint: it starts over
    try:  # weights_only: a crafted checkpoint cannot run code
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {ckpt_path} ({type(e).__name__}); delete it to start over")
    if not isinstance(ckpt, dict) or ckpt.get("run") != config:
        raise UserError(f"{ckpt_path} is not this run's checkpoint (its run's flags differ, or it predates this "
                        f"check); delete it to start the run over")
    return ckpt


def prepare(args):
    """The start every script shares, before anything is written: (device, data, model, inputs), inputs
    being every file the flags name (--hparams, --mask, --head FILE), read and checked. Bad data,
    weights or input files thus leave no run directory. Raises Finished if --resume finds the run done."""
    if args.resume and finished(args):
        raise Finished(f"{args.out} is already finished")
    device = pick_device(args.device, args.deterministic)
    args.precision = resolve_amp(args.amp, device)
    print(f"device {device}, precision {'fp32' if args.precision == 'off' else args.precision} "
          f"(head and accuracies in fp32){', deterministic' if args.deterministic else ''}")
    seed_everything(args.seed)
    data = load_data(args)
    model = build_model(args).to(device)
    return device, data, model, read_inputs(args, model)


def read_inputs(args, model):
    """The input files named by the flags of any script, read and checked: {'hparams', 'mask', 'head'}
    (None where not given); also refuses a --sparsity that would keep nothing."""
    hparams, mask, head = (getattr(args, k, None) for k in ("hparams", "mask", "head"))
    inputs = {"hparams": hparams_from(hparams) if hparams else None,
              "mask": load_mask(mask, model) if mask else None,
              "head": None}
    if head not in (None, "ridge", "warmup"):
        check_head_source(head, args)
        inputs["head"] = load_head_file(head, model.head)
    if hasattr(args, "sparsity") and getattr(args, "sparse", True) and inputs["mask"] is None:
        check_sparsity(model, args.sparsity, args.calib_rounds)
    return inputs


def config_differences(out, config):
    """The keys in which the run in directory `out` (its config.json) differs from `config`, sorted, the
    precision left aside (it is only resolved once the device is known); None without a readable config."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict):
        return None
    return sorted(k for k in set(old) | set(config) if k != "precision" and old.get(k) != config.get(k))


def finished(args):
    """True if args.out holds a finished run (result.json) of the same flags (config.json)."""
    return config_differences(args.out, run_config(args)) == [] and read_result_json(args.out) is not None


def save_checkpoint(state, args):
    """The checkpoint carries its run's config: one copied from another run is refused (_check_run_dir)."""
    atomic_save(dict(state, run=run_config(args)), os.path.join(args.out, "checkpoint.pt"))


def finish_run(result, args):
    """Write result.json (the marker of a finished run) and drop the now useless checkpoint."""
    write_json(dict(result, amp=args.precision), os.path.join(args.out, "result.json"))
    ckpt = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(ckpt):
        os.remove(ckpt)


# ----------------------------------------------------------------------------- plots

def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display on a cluster node)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Write a figure as PNG atomically (atomic_write: umask respected, never half a file) and close it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    pyplot().close(fig)


def plot_lines(path, series, xlabel, ylabel, title, integer_x=True):
    """series: {label: (xs, ys) or (xs, ys, std)} -> one PNG line plot, std as error bars. Rounds and
    epochs (integer_x) get integer ticks only; a one-point series gets a marker big enough to see."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys, *std) in series.items():
        marker = "o" if len(xs) == 1 else "." if len(xs) < 40 else None
        ax.errorbar(xs, ys, yerr=std[0] if std else None, marker=marker, capsize=3, label=label)
    if integer_x:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True, min_n_ticks=1))  # 1: even for one point
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_bars(path, labels, values, ylabel, title, std=None):
    fig, ax = pyplot().subplots(figsize=(max(6, 0.35 * len(labels)), 4))
    ax.bar(range(len(values)), values, yerr=std, capsize=3)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- prefetch, and run_all.sh's questions

def prefetch(args, backbone=True):
    """Fetch and check, once, everything a stage script run with these flags needs from outside, before
    parallel runs or job-array tasks would all try at once (and all fail minutes later): CIFAR-100 (not
    for --dataset synthetic), and the backbone: --arch built at --img-size with its weights (--weights
    FILE, or timm's hub weights unless --no-pretrained) read and fitted. A missing piece is one line."""
    if args.dataset == "cifar100":
        load_cifar100(args.data_dir)
        print(f"CIFAR-100 is in {args.data_dir}")
    if not backbone:
        return
    build_model(args)
    source = (f"--weights {args.weights}" if args.weights else "random weights (--no-pretrained)"
              if args.no_pretrained else f"timm's hub weights ({hub_weights(args.arch)})")
    print(f"backbone {args.arch} at {args.img_size} px with {source}: ready")


# Images a run will push through the ViT, (forward+backward, forward only), from its parsed flags: an
# ESTIMATE for sizing a cluster request (run_all.sh --dry-run), not a measurement. It counts a run from
# scratch (cached features and a resumed run cost less) and ignores that a FedAvg client's batch never
# exceeds its shard. Work on cached features (linear heads, ridge statistics, head-only rounds) is not an
# image pass. Keep it next to the loops it describes when they change.

def split_sizes(a):
    """(train, val, test) image counts, as load_data splits them."""
    n, test = (50000, 10000) if a.dataset == "cifar100" else (a.synthetic_size, max(a.synthetic_size // 5, NUM_CLASSES))
    val = round(n * a.val_frac)
    return n - val, val, test


def centralized_images(a, train, val, test):
    # a linear probe: backbone features of every image once (--aug-views V: V views of the training set)
    return 0, train * max(1, a.aug_views) + val + test


def editing_images(a, train, val, test):
    # features once (the head), Fisher calibration (sensitivity rules only, per-sample gradients),
    # fine-tuning epochs, and val+test evaluation before editing and after every epoch
    calib = a.calib_rounds * a.fisher_batches * a.fisher_batch_size if not a.mask and "sensitive" in a.rule else 0
    return calib + a.epochs * train, train + val + test + (a.epochs + 1) * (val + test)


def fedavg_images(a, train, val, test):
    # features once (ridge head / head-only rounds); sampled clients x J local batches per main round;
    # federated calibration: every client scores ceil(fisher_batches * fisher_batch_size / k) images per
    # calibration round; validation every --eval-every rounds, test every --test-every, both at the end
    feats = train + val + test if a.head == "ridge" or a.warmup_rounds or a.train == "head" else 0
    if a.train == "head":  # every round and every evaluation on cached features
        return 0, feats
    import fedavg  # its own ceil(C*K), epsilon included
    clients = fedavg.clients_per_round(a)
    calib = 0
    if a.sparse and not a.mask and "sensitive" in a.rule:
        calib = a.calib_rounds * a.k * math.ceil(a.fisher_batches * a.fisher_batch_size / a.k)
    evals = (a.rounds // a.eval_every + 1) * val + (a.rounds // a.test_every + 1) * test
    return a.rounds * clients * a.j * a.batch_size + calib, feats + evals


IMAGE_PASSES = {"centralized": centralized_images, "model_editing": editing_images, "fedavg": fedavg_images}


def parse_run(line):
    """'SCRIPT ARG...' (shell-quoted) -> (script name without .py, its parsed flags), from the script's own
    get_args: the run directory and every default are named in exactly one place."""
    import contextlib
    import importlib
    import shlex
    line = line.strip()
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise UserError(f"cannot split {line!r}: {e}")
    script = os.path.basename(words[0]) if words else ""
    name = script[:-3] if script.endswith(".py") else script
    if name not in IMAGE_PASSES:
        raise UserError(f"{line!r}: the first word must be one of {', '.join(s + '.py' for s in IMAGE_PASSES)}")
    said = io.StringIO()
    try:  # argparse reports a bad flag by printing it and exiting: turn that into one line naming the script
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            args = importlib.import_module(name).get_args(words[1:])
    except SystemExit:
        raise UserError(f"{script}: {said.getvalue().strip().partition('error: ')[2] or 'not a run'}")
    if any(c in args.out for c in "\t\n"):
        raise UserError(f"{script}: run directory {args.out!r} holds a tab or a newline")
    return name, args


def run_state(args):
    """'todo', 'done' (args.out holds a finished run of these flags), or, when it holds a finished run of
    other flags, how it differs ('differs in lr, epochs'): run_all.sh neither counts such a run as done nor
    runs this one over it."""
    if not os.path.isfile(os.path.join(args.out, "result.json")):
        return "todo"
    diff = config_differences(args.out, run_config(args))
    if diff is None:
        return "has no readable config.json"
    return f"differs in {', '.join(diff)}" if diff else "done"


def describe_run(line):
    """'SCRIPT ARG...' -> (run directory, images forward+backward, images forward only, run_state, the
    run's config as one line of JSON)."""
    name, args = parse_run(line)
    return (args.out, *IMAGE_PASSES[name](args, *split_sizes(args)), run_state(args),
            json.dumps(run_config(args), sort_keys=True))


# ----------------------------------------------------------------------------- run_all.sh's estimate of the time

PROBE_SECONDS = 6  # at most, per kind of pass (forward+backward, forward only) in each probe process


def runs_per_gpu(sms, memory_gib):
    """run_all.sh's default --per-gpu: one run per 32 streaming multiprocessors, at most 4, and at most one
    per 8 GiB of GPU memory. One ViT-S/16 run at 224 px (batch 64, bf16) keeps an H200 (132 SMs) about 10%
    busy, 2 runs gave 1.78x its images/s, 4 runs 2.35x; a T4 (40 SMs, 15 GiB) is saturated by one."""
    return max(1, min(4, sms // 32, int(memory_gib // 8)))


def images_per_second(step, x, batch, seconds):
    """Images/s of step(images) on batches of random images like x[:1]: the batch grows from 1 to `batch`
    while a step stays short (on a CPU a step of the full batch may take a minute; its images/s is about
    that of a smaller batch), then steps of that size are timed for about a second, `seconds` at most.
    The steps while it grows are the warm-up (allocations, kernel selection)."""
    def timed(b):
        t = time.perf_counter()
        step(x[:b])
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t
    start, b = time.perf_counter(), 1
    while timed(b) < seconds / 8 and b < batch:
        b = min(batch, 2 * b)
    steps = spent = 0
    while steps < 2 or spent < min(1.0, seconds - (time.perf_counter() - start)):
        spent += timed(b)
        steps += 1
    return steps * b / spent


def probe(line):
    """One probe process (run_all.sh's estimate): the ViT of the run 'SCRIPT ARG...' on its device and
    precision, random weights (speed does not depend on them), random images. Prints a JSON line when
    ready (its device), waits for a line on stdin (so that the probes packed on one GPU measure at the
    same time), then prints the images/s of training steps (forward+backward and an optimizer step at the
    run's batch size) and of forward-only passes (at its evaluation batch size). Writes no file."""
    _, args = parse_run(line)
    device = pick_device(args.device, args.deterministic)
    precision = resolve_amp(args.amp, device)
    model = build_model(argparse.Namespace(**{**vars(args), "weights": None, "no_pretrained": True})).to(device)
    info = {"ready": time.time(), "device": device.type, "precision": precision, "batch": args.batch_size,
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    print(json.dumps(info), flush=True)
    sys.stdin.readline()
    x = torch.randint(0, 256, (max(args.batch_size, args.eval_batch_size), 32, 32, 3), dtype=torch.uint8,
                      device=device)
    y = torch.randint(0, NUM_CLASSES, (len(x),), device=device)
    opt, scaler = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9), grad_scaler(device, precision)

    def train(xb):
        model.train()
        logits = forward_logits(model, preprocess(xb, args.img_size), device, precision)
        optimizer_step(opt, F.cross_entropy(logits, y[:len(xb)]), scaler)

    @torch.no_grad()
    def forward(xb):
        model.eval()
        backbone_features(model, preprocess(xb, args.img_size), device, precision)
    try:
        rates = {"fwd_bwd": images_per_second(train, x, args.batch_size, PROBE_SECONDS),
                 "fwd": images_per_second(forward, x, args.eval_batch_size, PROBE_SECONDS / 2)}
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory at batch {args.batch_size} (evaluation: {args.eval_batch_size})")
    print(json.dumps(rates), flush=True)


def run_probes(line, n, threads):
    """Start n probe processes of the run `line` at once (each with `threads` CPU threads unless
    OMP_NUM_THREADS says otherwise, as run_all.sh gives its runs), release them together; returns
    (what the first said when ready, [their images/s], mean seconds until ready: a run's start-up)."""
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(threads)}
    t0 = time.time()
    errs = [tempfile.TemporaryFile("w+") for _ in range(n)]  # not a pipe: a chatty probe must not block
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--probe"], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err) for err in errs]
    try:
        for p in procs:
            p.stdin.write(line + "\n")
            p.stdin.flush()
        ready = [probe_answer(p, err, n) for p, err in zip(procs, errs)]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        rates = [probe_answer(p, err, n) for p, err in zip(procs, errs)]
    finally:
        for p, err in zip(procs, errs):
            p.kill()
            p.wait()
            err.close()
    return ready[0], rates, sum(r["ready"] - t0 for r in ready) / n


def probe_answer(p, err, n):
    """The next JSON line of probe process p, or a UserError with the last line it wrote to err."""
    said = p.stdout.readline()
    if not said:
        p.wait()
        err.seek(0)
        said = [s for s in err.read().splitlines() if s.strip()]
        why = said[-1].removeprefix("error: ") if said else f"exit status {p.returncode}"
        raise UserError(f"the speed probe ({n} at once) failed: {why}" + ("; lower --per-gpu" if n > 1 else ""))
    return json.loads(said)


def estimate(lines, gpus, per_gpu):
    """run_all.sh's estimate for the runs 'SCRIPT ARG...' still to do, with `gpus` GPUs (0: the default
    device) and `per_gpu` runs at once on each (None: the default, runs_per_gpu of the device): the probe
    runs on the device and with the model, image size, precision and batch size of the first FedAvg run
    (the client batch), packed as the runs will be. Returns (per_gpu, lines that say what was measured,
    [seconds each run takes in its slot: start-up + its images at the packed speed])."""
    t0 = time.time()
    described = [parse_run(line) for line in lines]
    line = next((x for x, (name, _) in zip(lines, described) if name == "fedavg"), lines[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = lambda n: max(1, cores // (max(gpus, 1) * n))  # as run_all.sh divides them among its runs
    alone = None
    if per_gpu is None:  # one probe alone tells the device, and so the default
        alone = run_probes(line, 1, threads(1))
        info = alone[0]
        per_gpu = runs_per_gpu(info["sms"], info["memory_gib"]) if info["device"] == "cuda" else 1
    info, rates, startup = alone if alone and per_gpu == 1 else run_probes(line, per_gpu, threads(per_gpu))
    fb, f = (sum(r[k] for r in rates) for k in ("fwd_bwd", "fwd"))  # all packed runs together
    costs = [startup + per_gpu * (fb_i / fb + f_i / f)
             for (name, a) in described for fb_i, f_i in [IMAGE_PASSES[name](a, *split_sizes(a))]]
    said = probe_report(time.time() - t0, info, per_gpu, fb, f, startup,
                        alone[1][0] if alone and per_gpu > 1 else None)
    return per_gpu, said, costs


def probe_report(seconds, info, per_gpu, fb, f, startup, alone=None):
    """What the probe measured, as lines for run_all.sh (and, on the CPU, that the full study is out of reach)."""
    per_s = lambda x: f"{x:.0f}" if x >= 10 else f"{x:.2g}"  # images/s: a CPU may do less than one
    where = (f"{info['name']} ({info['sms']} SMs, {info['memory_gib']:.0f} GiB)" if info["device"] == "cuda"
             else f"the CPU ({info['threads']} thread(s) per run)")
    precision = "fp32" if info["precision"] == "off" else info["precision"]
    said = [f"probe ({seconds:.0f} s): {per_gpu} run(s) at once on {where}, {precision}, batch {info['batch']}: "
            f"{per_s(fb)} images/s forward+backward and {per_s(f)} forward only, all together; {startup:.1f} s "
            f"to start a run"
            + (f" (one run alone: {per_s(alone['fwd_bwd'])} and {per_s(alone['fwd'])})" if alone else "")]
    if info["device"] == "cpu":
        said.append("no GPU: these runs go to the CPU, where the full study at the default size (ViT-S/16, 224 px) "
                    "takes months or more (see the total below). For a smoke check of the whole pipeline: "
                    "./run_all.sh --quick -- --dataset synthetic --arch test_vit --no-pretrained --img-size 32 "
                    "--device cpu; for the study: a GPU, or --slurm on a cluster")
    return said


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, None)
    p = Parser(description="Download CIFAR-100 and the DINO ViT-S/16 weights for later offline runs; "
                           "with --prefetch, --describe-runs or --estimate, answer run_all.sh.",
               epilog="e.g. python common.py --prefetch -- --dataset cifar100 --weights dino.pth")
    p.add_argument("--data-dir", type=path, default="./data", help="where CIFAR-100 goes")
    p.add_argument("--arch", default=DEFAULT_ARCH, help="timm ViT whose hub weights to download")
    p.add_argument("--data-only", action="store_true", help="only CIFAR-100 (you bring --weights FILE)")
    p.add_argument("--prefetch", action="store_true",
                   help="fetch and check what a stage script needs when run with the flags after -- (it "
                        "reads --dataset, --data-dir, --arch, --img-size, --weights, --no-pretrained and ignores "
                        "the rest)")
    p.add_argument("--describe-runs", action="store_true",
                   help="read lines 'SCRIPT ARG...' (shell-quoted) on stdin and print for each "
                        "'RUN_DIR<tab>IMAGES_FWD_BWD<tab>IMAGES_FWD<tab>STATE<tab>CONFIG': its run directory, an "
                        "estimate of the images it will process with forward+backward and forward-only passes, "
                        "todo/done/what differs from a finished run there, and its config.json as JSON")
    p.add_argument("--estimate", action="store_true",
                   help="read lines 'SCRIPT ARG...' on stdin (the runs to do), measure this machine and print "
                        "'per-gpu<tab>N', lines 'say<tab>TEXT' and, for each run, 'cost<tab>MILLISECONDS' "
                        "(its time in its slot)")
    p.add_argument("--gpus", type=nonneg_int, default=0, help="with --estimate: GPUs used (0: the default device)")
    p.add_argument("--per-gpu", default=None, type=lambda v: None if v == "auto" else positive_int(v),
                   help="with --estimate: runs at once on each GPU, or auto (runs_per_gpu of the GPU)")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # one probe process of --estimate
    a = p.parse_args(own)
    if flags is not None and not a.prefetch:
        p.error("flags after -- go with --prefetch")
    if a.prefetch and len(own) > 1:
        p.error("--prefetch takes the stage scripts' flags after --, not its own")
    if a.describe_runs:
        if len(own) > 1:
            p.error("--describe-runs takes no other flag")
        described = ["\t".join(map(str, describe_run(line))) for line in sys.stdin if line.strip()]
        print(*described, sep="\n") if described else None  # all or nothing: a bad line prints no row
    elif a.estimate:
        lines = [line.strip() for line in sys.stdin if line.strip()]
        if not lines:
            p.error("--estimate: no run on stdin")
        per_gpu, said, costs = estimate(lines, a.gpus, a.per_gpu)
        print(f"per-gpu\t{per_gpu}", *(f"say\t{x}" for x in said), *(f"cost\t{round(c * 1000)}" for c in costs),
              sep="\n")
    elif a.probe:
        probe(sys.stdin.readline())
    elif a.prefetch:
        script_flags = Parser(parents=[base_parser()], prog="common.py --prefetch --", add_help=False)
        prefetch(script_flags.parse_known_args(flags or [])[0])
    else:  # --data-only: the backbone comes from elsewhere (--weights FILE)
        prefetch(Parser(parents=[base_parser()]).parse_args(["--data-dir", a.data_dir, "--arch", a.arch]),
                 backbone=not a.data_only)


if __name__ == "__main__":
    run_main(main)

