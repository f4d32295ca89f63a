"""The science that centralized.py, model_editing.py and fedavg.py share.

Read it top to bottom, each part using only those above it: data and transforms, the ViT and its
weights (timm's hub, a file, or the project's pretrained stand-ins), SparseSGDM, learning-rate
schedules, forward passes and evaluation, frozen-backbone features and heads (SGD and ridge), Fisher
scores and masks (TaLoS steps 1-2), the flags of steps 0-2 (edit_parser), and last a run's start
(prepare).
A run's plumbing (errors, the flags the scripts share, device, random streams, files, run directories,
plots) is in plumbing.py; run_all.sh's planner (prefetch, image passes, time estimate) in plan.py.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import plumbing


NUM_CLASSES = 100

DEFAULT_ARCH = "vit_small_patch16_224.dino"
# The DINO backbone was pre-trained on ImageNet with these statistics, so its inputs
# must be normalized the same way (CIFAR-100's own statistics would shift every feature).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- data

def load_cifar100(data_dir, download=True):
    """CIFAR-100 as uint8 tensors: (x_train N×32×32×3, y_train, x_test, y_test); download=False: None
    where it would be downloaded (offline, the same error as with download=True)."""
    import torchvision
    sets = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR100(data_dir, train=train, download=False)
        except RuntimeError:  # not there yet (or its files fail torchvision's checksum): download it
            folder = os.path.join(data_dir, "cifar-100-python")
            if os.path.isdir(folder) and not plumbing.network_reachable("www.cs.toronto.edu"):
                raise plumbing.UserError(f"CIFAR-100 in {folder} is incomplete or corrupt (its files fail the "
                                         f"checksum) and there is no network to download it again: copy a good "
                                         f"{folder} here, or delete it and run `python plan.py --data-dir DIR` on a "
                                         f"machine with internet")
            if not plumbing.network_reachable("www.cs.toronto.edu"):
                raise plumbing.UserError(f"CIFAR-100 is not in {data_dir} and there is no network: run "
                                         f"`python plan.py --data-dir DIR` on a machine with internet, copy DIR here "
                                         f"and pass --data-dir DIR (or use --dataset synthetic)")
            if not download:
                return None
            try:
                ds = torchvision.datasets.CIFAR100(data_dir, train=train, download=True)
            except Exception as e:
                raise plumbing.UserError(f"could not download CIFAR-100 into {data_dir}: {e}")
        sets += [torch.from_numpy(ds.data), torch.tensor(ds.targets, dtype=torch.long)]
    return tuple(sets)


def make_synthetic(n_train, n_test, seed=0, num_classes=NUM_CLASSES, family=0):
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
        rolled = []
        for i, (img, s) in enumerate(zip(protos[y], shift)):
            if i % 1000 == 0:  # 200,000 images take seconds: a stop signal must not wait for them
                plumbing.stop_here("building the synthetic set")
            rolled.append(torch.roll(img, (int(s[0]), int(s[1])), dims=(1, 2)))
        x = torch.stack(rolled)
        x = x + 0.3 * torch.randn(x.shape, generator=gen)  # pixel noise
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
        raise plumbing.UserError(f"--val-frac {args.val_frac} leaves no validation image; raise it (or --synthetic-size)")
    if len(tr) == 0:  # checked here, before any run folder exists (each class's share is rounded)
        raise plumbing.UserError(f"--val-frac {args.val_frac} leaves no training image (it rounds each class's "
                                 f"{len(y_tr) // max(len(torch.unique(y_tr)), 1)} images to validation); lower it"
                                 f"{' (or raise --synthetic-size)' if args.dataset == 'synthetic' else ''}")
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
        raise plumbing.UserError(f"{source} does not fit --arch {model.default_cfg.get('architecture', '?')}: "
                                 f"{str(e).splitlines()[0][:200]}")
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise plumbing.UserError(f"{source} does not fit --arch {model.default_cfg.get('architecture', '?')}: "
                                 f"missing {missing[:3]}, unexpected {unexpected[:3]}")


# Pretrained stand-ins for the DINO backbone, for tests and offline trials: test_vit pretrained on another
# family of synthetic classes than --dataset synthetic's, so its features transfer but were not learned on
# the set it is then used on. name -> (pretraining classes, AdamW steps). On the synthetic set (5000
# images, 32 px) the step-0 ridge head reaches about 85% (standin: few classes seen, room to learn) and
# 100% (standin-sharp: where a frozen head's logit scale matters most).
STANDINS = {"standin": (3, 150), "standin-sharp": (100, 200)}


def standin_path(name, data_dir):
    """Where the stand-in backbone `name` is cached (made there by standin_weights on first use)."""
    return os.path.join(data_dir, "standin", f"{name}.pt")


def standin_weights(name, data_dir):
    """Path of the stand-in backbone `name` (see STANDINS), pretrained on first use (deterministic; about
    20 s on an idle 2-core CPU, minutes on a busy one: it says so, with a progress bar) and cached in
    DATA_DIR/standin/ like the features."""
    from tqdm import tqdm
    path = standin_path(name, data_dir)
    if os.path.isfile(path):
        return path
    import timm
    classes, steps = STANDINS[name]
    print(f"making the stand-in backbone {name}, once: pretraining a tiny ViT for {steps} steps (a minute or "
          f"more on a busy CPU), cached in {path}", flush=True)
    x, y, _, _ = make_synthetic(4000, 1, seed=1, num_classes=classes, family=1)
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=classes, img_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    gen, batch, step = plumbing.stream("standin", 0), 128, 0
    bar = tqdm(total=steps, desc=f"stand-in {name}", leave=False, disable=None)
    while step < steps:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch + 1, batch):
            plumbing.stop_here(f"pretraining the stand-in backbone {name} (step {step + 1} of {steps})")
            off, flip = draw_augmentation(batch, gen)
            loss = F.cross_entropy(model(preprocess(augment(x[perm[i:i + batch]], off, flip), 32)),
                                   y[perm[i:i + batch]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update()
            if step == steps:
                break
    bar.close()
    plumbing.atomic_save({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, path)
    return path


def build_model(args):
    """timm ViT with a fresh linear head of NUM_CLASSES; backbone weights from --weights,
    the hub, or random (--no-pretrained). The head is initialized from --seed."""
    import timm
    from timm.models.vision_transformer import VisionTransformer
    if not timm.is_model(args.arch):
        raise plumbing.UserError(f"--arch {args.arch}: timm has no such model (e.g. {DEFAULT_ARCH})")
    try:
        model = timm.create_model(args.arch, pretrained=False, num_classes=NUM_CLASSES, img_size=args.img_size)
    except TypeError:  # a model that takes no img_size: not a ViT
        model = None
    except Exception as e:  # an image size the arch cannot take
        raise plumbing.UserError(f"cannot build --arch {args.arch} at --img-size {args.img_size}: {e}")
    if not isinstance(model, VisionTransformer):
        raise plumbing.UserError(f"--arch {args.arch} is not a timm VisionTransformer, which this code needs "
                                 f"(its patch embedding, tokens and masked layers), e.g. {DEFAULT_ARCH}")
    patch = model.patch_embed.patch_size[0]
    if args.img_size % patch:
        raise plumbing.UserError(f"--img-size {args.img_size} is not a multiple of {args.arch}'s patch size {patch}: "
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
            raise plumbing.UserError(f"--weights {args.weights} is a pretrained test_vit: use it with --arch test_vit")
        load_backbone_weights(model, plumbing.read_weights_file(standin_weights(args.weights, args.data_dir)), args.weights)
    elif args.weights:
        load_backbone_weights(model, plumbing.read_weights_file(args.weights), args.weights)
    elif not args.no_pretrained:
        path = plumbing.hub_weights(args.arch)
        load_backbone_weights(model, plumbing.read_weights_file(path), path)
    return model


def backbone_params(model):
    """(name, param) of every weight except the classifier head: what sparse fine-tuning trains (the
    masked tensors through their masks, cls_token and pos_embed densely; see masked_params)."""
    return [(n, p) for n, p in model.named_parameters() if not n.startswith("head.")]


# ----------------------------------------------------------------------------- optimizer

def cache_sized_groups(tensors, device_type=None):
    """Index lists of consecutive tensors of about 256 K entries (1 MB of fp32) each, on the CPU (or
    device_type "cpu"). Multi-tensor ops applied group by group find their operands still in the CPU
    cache from the previous op; over all of a ViT-S at once every op streams 88 MB from memory
    (measured: 25% slower per pass on one core). On any other device, one group of all: there each
    multi-tensor op is a kernel launch per call, and ~86 groups of a ViT-S would cost 86 launches."""
    if (device_type or (tensors[0].device.type if tensors else "cpu")) != "cpu":
        return [list(range(len(tensors)))]
    groups, cur, n = [], [], 0
    for i, t in enumerate(tensors):
        cur.append(i)
        n += t.numel()
        if n >= 256 * 1024:
            groups.append(cur)
            cur, n = [], 0
    return groups + ([cur] if cur else [])


# The integer type of each float type's width: a 0/1 mask of it, multiplied into a float's bits viewed
# as this type, gives the bits of +0 or the bits unchanged.
_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                   torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _foreach(op, tensors, *args, **kwargs):
    """op(tensors, *args, **kwargs) unless the list is empty (torch._foreach_* ops refuse that)."""
    if tensors:
        op(tensors, *args, **kwargs)


class SparseSGDM(torch.optim.Optimizer):
    """SGD with momentum, dampening, Nesterov and weight decay (same update as torch.optim.SGD)
    where each parameter has a mask: 1/True = may change, 0/False = frozen.

    A frozen entry never changes, whatever its gradient holds (inf and nan included): its gradient and
    weight-decay term are set to +0 *before* they reach the momentum buffer, so the buffer stays +0
    there and the update is exactly -0. `masks` is a list aligned with `params`; None means dense (no
    mask) for that tensor.

    step() runs multi-tensor (torch._foreach_*) ops, over cache-sized groups of parameters on the CPU
    and over all of them at once on other devices (cache_sized_groups), using p.grad as scratch space
    (afterwards it holds the decayed gradient, masked or not: zero_grad discards it).
    The mask acts on the gradient's bits, not its value: each mask is kept as an integer of the
    parameter's width holding 1 where kept and 0 where frozen, and one multi-tensor integer multiply
    of the gradients' bits (viewed as that integer type) by the masks gives the bits of +0 where frozen
    and leaves a kept entry's bits as they are. A float multiply would turn an inf gradient at a frozen
    entry into nan (inf * 0) and move the frozen weight; the integer one cannot, so the step is bit for
    bit torch.optim.SGD's on the kept entries."""

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
                self.masks[p] = m.to(device=p.device, dtype=torch.bool).to(bits)  # True -> 1, False -> 0
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
        masked = [i for i, p in enumerate(params) if p in self.masks]
        # one multi-tensor op for all masks (a kernel per tensor would be ~50 launches on a GPU)
        _foreach(torch._foreach_mul_, [d[i].view(self.masks[params[i]].dtype) for i in masked],
                 [self.masks[params[i]] for i in masked])
        if mom != 0:
            bufs = [None if p in self.restarted else self.state[p].get("momentum_buffer") for p in params]
            old = [i for i, b in enumerate(bufs) if b is not None]
            _foreach(torch._foreach_mul_, [bufs[i] for i in old], mom)
            _foreach(torch._foreach_add_, [bufs[i] for i in old], [d[i] for i in old], alpha=1 - damp)
            reused = [i for i, p in enumerate(params) if p in self.restarted]  # first step after restart()
            for i in reused:
                bufs[i] = self.state[params[i]]["momentum_buffer"]
                self.restarted.discard(params[i])
            _foreach(torch._foreach_copy_, [bufs[i] for i in reused], [d[i] for i in reused])
            for i, b in enumerate(bufs):
                if b is None:
                    bufs[i] = self.state[params[i]]["momentum_buffer"] = d[i].clone()
            if group["nesterov"]:
                torch._foreach_add_(d, bufs, alpha=mom)
            else:
                d = bufs
        torch._foreach_add_(params, d, alpha=-lr)


# ----------------------------------------------------------------------------- learning-rate schedules

SCHEDULERS = ["cosine", "step", "exponential", "constant", "warmup-cosine"]


WARMUP_EPOCHS = 2  # warmup-cosine: the rate climbs linearly over these, then follows the cosine


def lr_factor(name, epoch, epochs):
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
        if epoch < WARMUP_EPOCHS:
            return (epoch + 1) / (WARMUP_EPOCHS + 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - WARMUP_EPOCHS) / max(1, epochs - WARMUP_EPOCHS)))
    raise ValueError(f"unknown scheduler {name}")


# ----------------------------------------------------------------------------- forward passes, steps, evaluation

def pre_logits(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


# torch.compile's backend for --compile; the CPU tests set "aot_eager" (inductor's compile takes minutes there)
COMPILE_BACKEND = "inductor"


def compile_backbone(model):
    """--compile: pre_logits through torch.compile from now on, for training and evaluation (the head
    stays eager, in fp32). Fisher scoring calls model(x) and stays eager: its hooks on the layers."""
    model.compiled_pre_logits = torch.compile(lambda x: pre_logits(model, x), backend=COMPILE_BACKEND)


def backbone_features(model, x, device, precision):
    """Pre-logit features of preprocessed images, the backbone in `precision`, returned in fp32."""
    with plumbing.autocast(device, precision):
        f = model.compiled_pre_logits(x) if hasattr(model, "compiled_pre_logits") else pre_logits(model, x)
    return f.float()


def forward_logits(model, x, device, precision):
    """Logits of preprocessed images: the backbone in `precision`, the head in fp32 (outside autocast).
    Every accuracy of the study goes through an fp32 head, whether on images here or on cached
    features (evaluate_head): bf16 logits tie on a few percent of samples and would bias comparisons."""
    return model.head(backbone_features(model, x, device, precision))


def optimizer_step(opt, loss, scaler, grad_term=None):
    """Backward and step, through the fp16 gradient scaler (a no-op in bf16/fp32). grad_term(), if
    given, adds to the parameters' gradients once they are unscaled, before the step (a term of the
    objective known in closed form: FedProx's proximal term, SCAFFOLD's correction)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_term is not None:
        scaler.unscale_(opt)  # the term is in the loss's units; step() then does not unscale again
        grad_term()
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
            raise plumbing.Diverged(f"{self.stage}, {when}: the training loss is {loss}; stopped without a result: "
                                    f"try {self.hint}")
        if scaler is not None and scaler.is_enabled() and scaler.get_scale() < MIN_GRAD_SCALE:
            raise plumbing.Diverged(f"{self.stage}, {when}: the fp16 gradient scaler skipped every step down to a scale of "
                                    f"{scaler.get_scale():.3g} (the gradients are not finite at any scale; training loss "
                                    f"{loss:.4g}); stopped without a result: try {self.hint}")

    def check_step(self, tensors, evaluated, when, hint=None):
        """Stop the run (Diverged) if a step that no training loss read yet (FedAvg's server step, after the
        clients' losses; the last round's, which no later loss reads) left `tensors` (its weights) not
        finite, or losses of the model evaluated after it ({split: loss}, None where not evaluated) that
        are not finite."""
        bad = [f"the {split} loss is {v}" for split, v in evaluated.items() if v is not None and not math.isfinite(v)]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            bad.insert(0, "the weights are not finite")
        if bad:
            raise plumbing.Diverged(f"{self.stage}, {when}: {' and '.join(bad)} after the step (the training loss "
                                    f"was finite before it); stopped without a result: try {hint or self.hint}")

    def warn(self, loss, when):
        chance = math.log(NUM_CLASSES)
        if not self.warned and loss > LOSS_WARN_FACTOR * chance:
            self.warned = True
            print(f"warning: {self.stage}, {when}: training loss {loss:.4g}, far above chance ({chance:.2f}); "
                  f"the run may be diverging: consider {self.hint}", file=sys.stderr)


# What a healthy step-0 head reaches on CIFAR-100 with DINO ViT-S/16 (test accuracy): other projects' published
# linear probes of this assignment, 74.25% (AdamW) to 82.47% (SGD) (docs/expected.md). A head far below that
# range is a broken setup (weights not loaded, wrong preprocessing), not a weak probe: warn at once.
EXPECTED_PROBE_ACC = (0.74, 0.83)
HEAD_WARN_BELOW = 0.60


def check_head_accuracy(acc, args, what="the step-0 head"):
    """One warning line when a CIFAR-100 run of the default DINO backbone has a head (ridge, warm-up, a
    head.pt, the centralized probe) at validation accuracy `acc` far below the published linear-probe range;
    returns whether it warned. Other datasets and backbones (stand-ins, --no-pretrained) have no expected range."""
    if args.dataset != "cifar100" or args.arch != DEFAULT_ARCH or args.no_pretrained or acc >= HEAD_WARN_BELOW:
        return False
    lo, hi = EXPECTED_PROBE_ACC
    print(f"warning: {what} reaches {100 * acc:.2f}% validation accuracy, far below the {100 * lo:.0f}-"
          f"{100 * hi:.0f}% that published linear probes of DINO ViT-S/16 reach on CIFAR-100 (docs/expected.md): "
          f"check that the pre-trained weights loaded (--weights, the torch hub cache) and the preprocessing "
          f"(--img-size 224)", file=sys.stderr)
    return True


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


def evaluate_head(head, feats, y):
    """(loss, accuracy) of a linear head on cached features: a batch of 4096 features is small."""
    head.eval()
    return evaluate_logits_fn(head, feats, y, 4096)


# ----------------------------------------------------------------------------- frozen-backbone features and heads

@torch.no_grad()
def extract_features(model, x, args, device, aug_gen=None, desc="features"):
    """Backbone features (pre-logits, fp32) of uint8 images x, batched; augmented views if aug_gen is given."""
    from tqdm import tqdm
    model.eval()
    out = []
    for i in tqdm(range(0, len(x), args.eval_batch_size), desc=desc, leave=False, disable=None):
        plumbing.stop_here(f"feature extraction ({desc})")  # a split's features are saved whole or not at all
        xb = x[i:i + args.eval_batch_size].to(device)
        if aug_gen is not None:
            off, flip = draw_augmentation(len(xb), aug_gen)
            xb = augment(xb, off.to(device), flip.to(device))
        out.append(backbone_features(model, preprocess(xb, args.img_size), device, args.precision))
    return torch.cat(out)


def backbone_digest(model):
    """A hash of the backbone's weights (every tensor but the head's: names, dtypes, shapes, bytes): what
    its features depend on besides the images, whatever file they came from (every DINO training
    checkpoint is named checkpoint.pth; two files of one name must never share cached features).
    Hashed once per run, on the CPU (measured 2026-12-02 on the busy 2-core machine: 0.005 s for the
    tests' tiny ViT, 0.22 s for ViT-S/16's 22M weights)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith("head."):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def tensor_digest(t):
    """A short hash of a tensor's dtype, shape and bytes (CIFAR-100's training images: about 0.2 s)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def feature_cache_path(args, split, views, digest):
    """Features depend on data, backbone weights (`digest`: backbone_digest), image size and the precision
    they were computed in (fp32 on a CPU and bf16 on a GPU differ slightly); cache them so grids and
    reruns skip the backbone."""
    src = f"{args.dataset}{args.synthetic_size if args.dataset == 'synthetic' else ''}"
    aug = f"_{views}views_seed{args.seed}" if views else ""  # augmented views depend on the seed
    name = f"{src}_{args.arch}_w{digest}_{args.img_size}px_{args.precision}_v{args.val_frac}_{split}{aug}.pt"
    return os.path.join(args.data_dir, "features", name.replace("/", "_"))


def read_feature_cache(path, source, shape):
    """The features cached in `path` if the file holds what split_features wrote for `source` (the digests
    of the images and the backbone, the views, the seed, the size and precision) and `shape`, their own
    digest intact; else None, with a warning saying why (they are then recomputed): a file of another
    shape, another source, or altered contents is never used."""
    try:
        cache = plumbing.load_tensors(path)  # a regular file only, weights_only
    except Exception as e:
        why = f"unreadable ({type(e).__name__})"
    else:
        f = cache.get("features") if isinstance(cache, dict) else None
        if not isinstance(f, torch.Tensor):
            why = "not a feature cache of this version"
        elif cache.get("source") != source:
            why = "features of other images or another backbone"
        elif tuple(f.shape) != shape or f.dtype != torch.float32:
            why = f"features of shape {tuple(f.shape)} ({f.dtype}), not {shape} (float32)"
        elif cache.get("digest") != tensor_digest(f):
            why = "its features were altered"
        else:
            return f
    print(f"warning: cached features {path}: {why}; recomputed", file=sys.stderr)
    return None


def split_features(model, data, split, views, args, device, digest=None):
    """Features of one split on device: of its clean images (views=0, N×D) or of V augmented copies
    (views=V, V×N×D, copy v drawn from the stream feature_view(seed, v)); cached on disk in
    --data-dir/features, keyed by the backbone's weights (`digest`, backbone_digest: hashed here if not
    given), never by a file name, and checked when read (read_feature_cache); not for a random backbone
    (it differs by seed)."""
    x = data[split][0]
    shape = ((views,) if views else ()) + (len(x), model.head.in_features)
    path = source = f = None
    if not args.no_pretrained:
        digest = digest or backbone_digest(model)
        path = feature_cache_path(args, split, views, digest)
        source = {"images": tensor_digest(x), "backbone": digest, "views": views, "seed": args.seed if views else None,
                  "img_size": args.img_size, "precision": args.precision}
        if os.path.lexists(path):  # read_feature_cache refuses (with a warning) what is no regular file
            f = read_feature_cache(path, source, shape)
    if f is None:
        if views == 0:
            f = extract_features(model, x, args, device, desc=f"{split} features").cpu()
        else:
            f = torch.stack([extract_features(model, x, args, device, plumbing.stream("feature_view", args.seed, v),
                                              desc=f"{split} view {v}").cpu() for v in range(views)])
        if path:
            plumbing.atomic_save({"features": f, "digest": tensor_digest(f), "source": source}, path)
    return f.to(device)


def cached_features(model, data, args, device, aug_views=0):
    """{split: (features, labels)} of the frozen backbone for 'train', 'val', 'test', on device.
    aug_views=0: features of the clean training images (N×D; exact: training without augmentation).
    aug_views=V: of V augmented copies of the training set (V×N×D), epoch e uses copy e % V (exact
    for that augmentation schedule). Features are cached on disk in --data-dir/features (split_features)."""
    digest = None if args.no_pretrained else backbone_digest(model)  # hashed once for the three splits
    return {split: (split_features(model, data, split, aug_views if split == "train" else 0, args, device, digest),
                    data[split][1].to(device)) for split in ("train", "val", "test")}


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
        tr_loss = train_head_epoch(head, opt, f, y_tr, batch_size, plumbing.stream("head_epoch", seed, ep))
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
        plumbing.stop_here(f"{watch.stage}, after epoch {ep + 1}")
    head.load_state_dict(best_head)
    return history, best_epoch


def ridge_stats(feats, y, views=None):
    """Sufficient statistics of ridge regression from features to one-hot labels, in float64:
    (A = Σ φφᵀ, B = Σ φ onehot(y)ᵀ, n) with φ = [features, 1]. Statistics of disjoint sets add up,
    so the sum over clients is exactly the statistics of their union. views (V×N×D, augmented views of
    the same N images, --ridge-views): their rows are added too, each with its image's label, so the
    regression is on the (V+1)·N stacked rows."""
    onehot = F.one_hot(y, NUM_CLASSES).double()
    rows = [feats] + ([] if views is None else list(views))
    A = B = 0
    for f in rows:
        phi = torch.cat([f.double(), torch.ones(len(f), 1, dtype=torch.float64, device=f.device)], 1)
        A, B = A + phi.T @ phi, B + phi.T @ onehot
    return A, B, len(y) * len(rows)


RIDGE_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # per sample: the penalty is lambda * n * ||W||²
RIDGE_TEMPERATURES = torch.logspace(0, 3, 31).tolist()  # 1 .. 1000
# The temperature minimizes a label-smoothed validation cross-entropy. Plain cross-entropy keeps falling
# as the temperature grows on a well-separated validation set, so it ran to the end of the grid (631-1000
# on the pretrained stand-in), and every image the head gets wrong while fine-tuning (augmented, or a
# client's) then sent the backbone gradients hundreds of times too large: the first round wrecked the
# features. With smoothing eps the best logit margin is finite, about ln((1 - eps) * K / eps) = 6.8.
RIDGE_LABEL_SMOOTHING = 0.1


@torch.no_grad()
def ridge_head(head, stats, val_feats, val_y):
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
    for lam in RIDGE_LAMBDAS:
        plumbing.stop_here("the ridge head")
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


# --head: where the step-0 head comes from. ridge and warmup are fitted on the frozen backbone; zero and
# random are fresh heads (fedavg.py: trained from scratch by FedAvg); anything else names a head.pt file.
HEAD_SOURCES = ("ridge", "warmup", "zero", "random")
FRESH_HEADS = ("zero", "random")


@torch.no_grad()
def fresh_head(head, how):
    """--head zero: every weight and bias 0 (every class equally likely, the same start for every seed);
    --head random: left as build_model made it (uniform, seeded by --seed)."""
    if how == "zero":
        head.weight.zero_()
        head.bias.zero_()


# The augmentation gap of the step-0 head: its accuracy on a sample of training images, clean and through
# the training crop and flip. A head right on clean images but wrong on their crops gives fine-tuning with
# augmentation large gradients on most of its inputs, which can wreck the features in the first round
# (measured on the pretrained stand-ins: docs/heads.md). Above AUG_GAP_WARN the run warns.
AUG_GAP_IMAGES = 1000
AUG_GAP_WARN = 0.10


def augmentation_gap(model, x, y, args, device):
    """{'head_train_acc', 'head_train_aug_acc'}: the model's accuracy (its head as it is) on a seeded
    sample of AUG_GAP_IMAGES training images (uint8 x, CPU), clean and each through one training crop
    and flip (stream aug_gap). Costs 2 x AUG_GAP_IMAGES forward passes (aug_gap_passes)."""
    gen = plumbing.stream("aug_gap", args.seed)
    idx = torch.randperm(len(x), generator=gen)[:AUG_GAP_IMAGES]
    xs, ys = x[idx], y[idx].to(device)
    off, flip = draw_augmentation(len(xs), gen)
    out = {}
    for key, images in (("head_train_acc", xs), ("head_train_aug_acc", augment(xs, off, flip))):
        out[key] = evaluate_head(model.head, extract_features(model, images, args, device, desc=key), ys)[1]
    return out


def aug_gap_passes(train):
    """Forward passes of augmentation_gap on a training set of `train` images (for plan.py's estimate)."""
    return 2 * min(AUG_GAP_IMAGES, train)


def warn_augmentation_gap(gap, lr_flag="--lr"):
    """One warning line when the step-0 head's accuracy falls by more than AUG_GAP_WARN from clean to
    augmented training images, naming the remedies. Returns whether it warned."""
    clean, aug = gap["head_train_acc"], gap["head_train_aug_acc"]
    if clean - aug <= AUG_GAP_WARN:
        return False
    print(f"warning: the step-0 head classifies {clean:.1%} of a sample of training images but {aug:.1%} of "
          f"their training crops/flips: fine-tuning with augmentation may first undo it; remedies: --no-aug, "
          f"--head ridge --ridge-views 4 (a head fitted on augmented views too), or a lower {lr_flag}",
          file=sys.stderr)
    return True


def load_head_file(path, head):
    """A head.pt ({'weight', 'bias'} of the classifier, from centralized.py or an editing/FedAvg run)."""
    sd = plumbing.load_tensor_file(path, "--head file", "use ridge, warmup or a head.pt of an earlier run")
    want = {k: v.shape for k, v in head.state_dict().items()}
    if not isinstance(sd, dict) or {k: getattr(v, "shape", None) for k, v in sd.items()} != want:
        raise plumbing.UserError(f"--head {path} is not a head of this model (want weight {tuple(want['weight'])} "
                                 f"and bias {tuple(want['bias'])})")
    return sd


# What a head's input features depend on: a head from a run that differed in these (another backbone of
# the same width) has the right shape but reads other features.
BACKBONE_FLAGS = ("arch", "weights", "no_pretrained", "img_size")


def check_head_source(path, args):
    """Refuse a head file whose run (the config.json next to it, when there is one) had another backbone."""
    source = plumbing.read_json_object(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"))
    if source is None:
        return  # a head file from elsewhere: only its shape can be checked
    def same(k):  # weights files by name: a copy of the file at another path is the same backbone
        a, b = source[k], getattr(args, k)
        return (os.path.basename(a) == os.path.basename(b)) if k == "weights" and a and b else a == b
    differ = [k for k in BACKBONE_FLAGS if k in source and not same(k)]
    if differ:
        k = differ[0]
        raise plumbing.UserError(f"--head {path} was trained on another backbone (its run has --{k.replace('_', '-')} "
                                 f"{source[k]}, this one {getattr(args, k)}); use a head of this backbone, or ridge")


# ----------------------------------------------------------------------------- Fisher scores and masks

SCORES = ["logit", "loglik"]
CALIB_IMAGES = ["train-aug", "clean"]
# The layers whose weight and bias TaLoS masks (its layers.mask_pretrained_vit wraps exactly these).
MASKED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)


# ----------------------------------------------------------------------------- the flags of steps 0-2

# --ridge-views' bound: each view is one more forward pass over the training set, and split_features holds
# every view's features at once on the device (N x D floats a view: 69 MB for CIFAR-100 on ViT-S/16, so
# 2.2 GB at 32). 10^8 views were accepted, months of passes and terabytes.
MAX_RIDGE_VIEWS = 32


def ridge_views(s):
    v = plumbing.nonneg_int(s)
    if v > MAX_RIDGE_VIEWS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_RIDGE_VIEWS}, got {s}")
    return v


def edit_parser():
    """The flags of the science above, shared by model_editing.py and fedavg.py (an argparse parent): the
    step-0 head, and the mask (fedavg.py: only with --sparse)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("step 0: the classifier head (frozen from then on, except in dense FedAvg)")
    g.add_argument("--head", type=plumbing.path, default="ridge", metavar="{ridge,warmup,zero,random,FILE}",
                   help="ridge: closed-form ridge regression on frozen-backbone features, lambda chosen on "
                        "the validation split (fedavg.py: from the clients' sufficient statistics, one "
                        "round); warmup: SGD on the frozen backbone (fedavg.py: --warmup-rounds head-only "
                        "rounds); zero / random (fedavg.py without --sparse only): a fresh head, all zeros or "
                        "seeded by --seed, that FedAvg trains from scratch; FILE: a head.pt saved by an "
                        "earlier run (e.g. the centralized baseline)")
    g.add_argument("--ridge-views", type=ridge_views, default=0,
                   help="with --head ridge: fit it on the clean training images plus this many augmented views "
                        "(training crop/flip) of each (fedavg.py: each client's statistics of its own views); "
                        f"0: clean images only; at most {MAX_RIDGE_VIEWS}: each view is another pass over "
                        f"the training set, and all views' features are held at once")
    g = p.add_argument_group("steps 1-2: gradient mask (model_editing.py, fedavg.py --sparse)")
    g.add_argument("--rule", choices=MASK_RULES, default="least-sensitive",
                   help="which backbone weights may be updated (TaLoS: least-sensitive)")
    g.add_argument("--sparsity", type=plumbing.unit_float, default=0.9,
                   help="fraction of the masked tensors' N entries that are FROZEN: int((1 - sparsity) * N) "
                        "stay updatable (TaLoS's count)")
    g.add_argument("--calib-rounds", type=plumbing.positive_int, default=4,
                   help="mask calibration rounds; round r keeps int((1 - sparsity) ** (r / rounds) * N) entries")
    g.add_argument("--score", choices=SCORES, default="logit",
                   help="sensitivity: squared per-sample gradient of the sampled class's raw logit (TaLoS's "
                        "code) or of its log-probability (the textbook Fisher)")
    g.add_argument("--fisher-batches", type=plumbing.positive_int, default=8,
                   help="batches of --fisher-batch-size images scored per calibration round")
    g.add_argument("--fisher-batch-size", type=plumbing.positive_int, default=32,
                   help="images per Fisher batch; memory grows with it (one layer's per-sample gradients)")
    g.add_argument("--calib-damp", type=plumbing.damping, default=0.1,
                   help="while calibrating, weights already masked out are scaled by this (TaLoS: 0.1)")
    g.add_argument("--calib-images", choices=CALIB_IMAGES, default="train-aug",
                   help="calibration images scored through the training augmentation, a fresh random crop "
                        "and flip each round (train-aug: TaLoS scores through its training preprocessing) "
                        "or as they are (clean); independent of --no-aug")
    return p


def check_head_flags(p, args):
    """edit_parser's head flags, as both scripts refuse them: --ridge-views only fits a ridge head."""
    if args.head != "ridge":
        plumbing.refuse_ignored(p, args, ["ridge_views"], f"it fits --head ridge, and this run's head is {args.head}")


def ridge_views_tag(args):
    """Run-name suffix of a ridge head fitted on augmented views ('_ridge4views'; '' for the clean one,
    whose runs keep their names): another head, so another run."""
    return f"_ridge{args.ridge_views}views" if args.head == "ridge" and args.ridge_views else ""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """How step 1 calibrates a mask: the values of edit_parser's mask flags, one field each (calibrate)."""
    rule: str
    sparsity: float
    calib_rounds: int
    score: str
    fisher_batches: int
    fisher_batch_size: int
    calib_damp: float
    calib_images: str

    @classmethod
    def of(cls, args):
        return cls(**{k: getattr(args, k) for k in CALIBRATION_FLAGS})


# edit_parser's flags that make a mask: they do nothing without one to make (no --sparse, or --mask FILE)
CALIBRATION_FLAGS = tuple(f.name for f in dataclasses.fields(Calibration))


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
    try:
        with scoring_state(model, mask, damp):
            for i in range(0, len(images), batch_size):
                plumbing.stop_here("mask calibration")  # --resume redoes the calibration from its first round
                x = preprocess(images[i:i + batch_size].to(device), img_size).to(dtype).requires_grad_()
                logits = model(x)
                y = sample_labels(logits, u[i:i + batch_size])
                out = logits if score == "logit" else F.log_softmax(logits, dim=1)
                torch.autograd.grad(out.gather(1, y[:, None]).sum(), x)
    finally:
        for h in hooks:
            h.remove()
    return sums, len(images)


@contextlib.contextmanager
def scoring_state(model, mask, damp, grad_params=()):
    """The model as a scoring pass needs it, and put back bit for bit after (also on a stop): eval mode,
    gradients enabled, no parameter requiring grad but `grad_params`, and with `mask` its masked-out
    entries multiplied by `damp` (TaLoS's re-scoring)."""
    flags, training, saved = [(p, p.requires_grad) for p in model.parameters()], model.training, {}
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for p in grad_params:
            p.requires_grad_(True)
        if mask is not None:
            saved = _damp(model, mask, damp)
        with torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


RULES = {}  # --rule NAME -> its MaskRule class, in the order defined: --rule's choices, the study's rules


class MaskRule:
    """A mask rule (--rule NAME): how it ranks the entries and the scoring pass that ranking needs.
    Subclassing registers it in RULES (so in --rule and in the study). A rule declares:

    name   its --rule value
    key(names, scores, params, gen)   one float per entry of the tensors `names`, flattened in that
           order; select_mask keeps the `keep` smallest (ties: the lower flat index). `scores` are the
           scoring pass's {name: tensor} (None for a rule without one), `params` {name: weight},
           `gen` the run's "mask_rule" stream (a CPU generator)
    score(model, images, u, img_size, device, mask, calib)   its scoring pass, run once per calibration
           round on that round's images (uint8 N x H x W x C) with the uniforms `u` for their sampled
           labels (sample_labels), the current `mask` (None in round 1) and the run's Calibration;
           returns ({name: sum over the images}, N), the sums of fisher_sums' kind. None: the rule
           needs no pass (magnitudes, random), and calibration scores nothing. A pass runs inside
           scoring_state, which damps by calib.calib_damp and puts the model back as it found it."""
    name = None
    score = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        RULES[cls.name] = cls

    @staticmethod
    def key(names, scores, params, gen):
        raise NotImplementedError


class LeastSensitive(MaskRule):
    """TaLoS: keep the entries of lowest Fisher sensitivity (fisher_sums, with --score and --calib-damp)."""
    name = "least-sensitive"

    @staticmethod
    def score(model, images, u, img_size, device, mask, calib):
        return fisher_sums(model, images, u, img_size, calib.fisher_batch_size, device,
                           mask=mask, damp=calib.calib_damp, score=calib.score)

    @staticmethod
    def key(names, scores, params, gen):
        return torch.cat([scores[n].flatten().float() for n in names])


class MostSensitive(LeastSensitive):
    """The opposite: keep the entries of highest Fisher sensitivity."""
    name = "most-sensitive"

    @staticmethod
    def key(names, scores, params, gen):
        return -LeastSensitive.key(names, scores, params, gen)


class LowestMagnitude(MaskRule):
    """Keep the entries of smallest |weight|."""
    name = "lowest-magnitude"

    @staticmethod
    def key(names, scores, params, gen):
        return torch.cat([params[n].detach().flatten().abs().float() for n in names])


class HighestMagnitude(MaskRule):
    """Keep the entries of largest |weight|."""
    name = "highest-magnitude"

    @staticmethod
    def key(names, scores, params, gen):
        return -LowestMagnitude.key(names, scores, params, gen)


class Random(MaskRule):
    """Keep a uniformly random subset, drawn from `gen`."""
    name = "random"

    @staticmethod
    def key(names, scores, params, gen):
        return torch.rand(sum(params[n].numel() for n in names), generator=gen).to(params[names[0]].device)


MASK_RULES = list(RULES)
# The rules that run a scoring pass while calibrating (the others' calibration costs no images)
SCORED_RULES = tuple(name for name, rule in RULES.items() if rule.score is not None)


def rule_of(name):
    """The MaskRule class named `name` (--rule), or a ValueError."""
    if name not in RULES:
        raise ValueError(f"unknown rule {name}")
    return RULES[name]


def select_mask(scores, rule, keep, current=None, gen=None, params=None):
    """Binary mask {name: bool} keeping (True = may be updated) exactly `keep` entries overall: the `keep`
    smallest keys of `rule` (RULES), a single global threshold over all tensors (as TaLoS). `scores`: the
    rule's scoring pass's (None for a rule without one), `params` {name: weight}, `gen` the random stream.
    Entries already masked out in `current` stay out. Ties go to the lower flat index."""
    names = list(scores if scores is not None else params)
    key = rule_of(rule).key(names, scores, params, gen)
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
    """Multi-round calibration of a mask over masked_params(model): in round r = 1..rounds, score with
    the current mask applied (score_fn(r, mask) -> {name: score}), then shrink the kept set to round r's
    count of keep_schedule among the entries still kept. Returns (mask, per-round log)."""
    params = dict(masked_params(model))
    total = sum(p.numel() for p in params.values())
    mask, log = None, []
    for r, keep in enumerate(keep_schedule(total, sparsity, rounds), start=1):
        plumbing.stop_here(f"mask calibration, round {r} of {rounds}")
        scores = score_fn(r, mask) if rule_of(rule).score is not None else None
        mask = select_mask(scores, rule, keep, current=mask, gen=gen, params=params)
        log.append({"round": r, "kept": keep, "kept_frac": keep / total})
    return mask, log


def save_mask(mask, path):
    """A mask file is a plain dict {parameter name: bool tensor}, loadable with weights_only=True."""
    plumbing.atomic_save({n: m.detach().cpu().bool() for n, m in mask.items()}, path)


def load_mask(path, model):
    """Read a mask file and check it fits masked_params(model) (every name, every shape)."""
    return checked_mask(plumbing.load_tensor_file(path, "mask file", "make one with model_editing.py"), path, model)


def checked_mask(mask, where, model):
    """`mask` (read from `where`: a mask file, a checkpoint) as {name: bool tensor}, if it fits
    masked_params(model) (every name, every shape) and keeps something; else a UserError naming `where`."""
    params = dict(masked_params(model))
    if not isinstance(mask, dict):
        raise plumbing.UserError(f"{where} is not a mask file (a dict of bool tensors by parameter name; it holds a "
                                 f"{type(mask).__name__}): make one with model_editing.py")
    if {"cls_token", "pos_embed"} & set(mask):
        raise plumbing.UserError(f"mask {where} was made by an older version (it masks cls_token/pos_embed); "
                                 "recalibrate it: rerun model_editing.py")
    if set(mask) != set(params):
        extra, missing = sorted(set(mask) - set(params)), sorted(set(params) - set(mask))
        raise plumbing.UserError(f"mask {where} does not fit --arch: missing {missing[:3]}, unknown {extra[:3]}")
    for n, p in params.items():
        if not isinstance(mask[n], torch.Tensor) or mask[n].shape != p.shape:
            raise plumbing.UserError(f"mask {where} does not fit --arch: {n} should have shape {tuple(p.shape)}")
    mask = {n: m.bool() for n, m in mask.items()}
    if not any(bool(m.any()) for m in mask.values()):  # as --sparsity that keeps nothing (check_sparsity)
        raise plumbing.UserError(f"mask {where} keeps no entry at all (every value False): it would train nothing")
    return mask


class EditedModelState:
    """What a checkpoint state of fedavg.py (RunState) and model_editing.py (EditState) shares: its `head`,
    `model` (the weights, None before the first save) and `mask` (None before step 1), checked against the
    run's model and written out as head.pt and mask.pt."""

    def model_misfit(self, model, saved=True):
        """What keeps the head, the weights (when `saved`) and the mask from fitting `model`, or None; the
        mask is kept as checked_mask reads it."""
        parts = [("head", self.head, model.head)] + ([("model", self.model, model)] if saved else [])
        for what, sd, module in parts:
            problem = plumbing.state_misfit(sd, module)
            if problem:
                return f"its {what} does not fit --arch: {problem}"
        if self.mask is not None:
            try:
                self.mask = checked_mask(self.mask, "in it", model)
            except plumbing.UserError as e:
                return str(e)
        return None

    def write_files(self, out):
        """head.pt and, once made, mask.pt, from the state: on resume too, so a file damaged, replaced or
        linked elsewhere meanwhile does not survive (atomic_save replaces a link, never writes through it)."""
        plumbing.atomic_save(self.head, os.path.join(out, "head.pt"))
        if self.mask is not None:
            save_mask(self.mask, os.path.join(out, "mask.pt"))


def mask_kept_frac(mask):
    return sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())


def check_sparsity(model, sparsity, rounds):
    """Refuse a --sparsity, or a --calib-rounds, that keeps no entry at all after the last round (it would train nothing
    without a word; the reference's kthvalue fails there)."""
    total = sum(p.numel() for _, p in masked_params(model))
    if keep_schedule(total, sparsity, rounds)[-1] >= 1:
        return
    if keep_schedule(total, sparsity, 1)[-1] >= 1:  # the sparsity alone keeps some: too many rounds
        raise plumbing.UserError(f"--calib-rounds {rounds} is too many for the {total} entries of the masked tensors: "
                                 f"each round drops at least one entry, and none would be left at --sparsity "
                                 f"{sparsity}; use far fewer rounds (the default is 4)")
    raise plumbing.UserError(f"--sparsity {sparsity} keeps none of the {total} entries of the masked tensors "
                             f"after {rounds} calibration round(s): lower it")


def calibrate(model, draw, calib, seed, img_size, device):
    """Step 1 of model_editing.py and fedavg.py --sparse: calibrate_mask with `calib`'s (a Calibration) rule,
    sparsity and rounds, round r scoring the images draw(r) -> (uint8 images, uniforms for their labels),
    resized to img_size, with the rule's own scoring pass (MaskRule.score: Fisher sums at --score and
    --calib-damp for the sensitivity rules, none for magnitudes and random); the random rule draws from
    --seed's stream. Prints the rounds; returns (mask, per-round log)."""
    def score(r, mask):  # the rule's scoring pass over round r's images, per image
        images, u = draw(r)
        sums, n = rule_of(calib.rule).score(model, images, u, img_size, device, mask, calib)
        return {k: v / n for k, v in sums.items()}

    t = time.time()
    mask, log = calibrate_mask(model, score, calib.rule, calib.sparsity, calib.calib_rounds,
                               plumbing.stream("mask_rule", seed))
    for row in log:
        print(f"  calibration round {row['round']}: keep {row['kept']} entries ({row['kept_frac']:.4%})")
    print(f"mask ({calib.rule}, sparsity {calib.sparsity}, score {calib.score}, {calib.calib_images} images) "
          f"calibrated in {time.time() - t:.1f}s")
    return mask, log


def changed_count(model, pretrained):
    """(entries of masked_params that differ from `pretrained` {name: tensor}, entries in all)."""
    params = masked_params(model)
    changed = sum(int((p.detach().cpu() != pretrained[n].cpu()).sum()) for n, p in params)
    return changed, sum(p.numel() for _, p in params)


# ----------------------------------------------------------------------------- a run's start

def read_inputs(args, model):
    """The input files named by the flags of any script, read and checked: {'hparams', 'mask', 'head'}
    (None where not given); also refuses a --sparsity that would keep nothing."""
    hparams, mask, head = (getattr(args, k, None) for k in ("hparams", "mask", "head"))
    inputs = {"hparams": plumbing.hparams_from(hparams) if hparams else None,
              "mask": load_mask(mask, model) if mask else None,
              "head": None}
    if head is not None and head not in HEAD_SOURCES:
        check_head_source(head, args)
        inputs["head"] = load_head_file(head, model.head)
    if hasattr(args, "sparsity") and getattr(args, "sparse", True) and inputs["mask"] is None:
        check_sparsity(model, args.sparsity, args.calib_rounds)
    return inputs


def prepare(args):
    """The start every script shares, before anything is written: (device, data, model, inputs), inputs
    being every file the flags name (--hparams, --mask, --head FILE), read and checked. Bad data,
    weights or input files thus leave no run directory. Raises Finished if --resume finds the run done."""
    if args.resume and plumbing.finished(args):
        raise plumbing.Finished(f"{args.out} is already finished")
    device = plumbing.pick_device(args.device, args.deterministic)
    args.precision = plumbing.resolve_amp(args.amp, device)
    print(f"device {device}, precision {args.precision} "
          f"(head and accuracies in fp32){', deterministic' if args.deterministic else ''}")
    plumbing.seed_everything(args.seed)
    data = load_data(args)
    model = build_model(args).to(device)
    if args.compile:
        compile_backbone(model)
    return device, data, model, read_inputs(args, model)
