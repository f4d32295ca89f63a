"""A run's plumbing, shared by centralized.py, model_editing.py and fedavg.py: nothing here is science
(that is common.py), and nobody doing the assignment needs to edit it.

Read it top to bottom: errors and signals (run_main turns them into one line and an exit status), the
flag types and the flags the scripts share, device and precision, random streams, atomic files, the
run directory, plots. A script's life in three calls:
    ckpt = plumbing.open_run(args)           # lock --out, check it holds this run; the checkpoint or None
    plumbing.save_checkpoint(state, args)    # atomically, stamped with the run's flags
    plumbing.finish_run(result, args)        # result.json (the mark of a finished run), checkpoint gone
(common.prepare, called before open_run, reads the device, data, model and input files.)
"""
import argparse
import csv
import dataclasses
import errno
import fcntl
import io
import json
import math
import os
import re
import signal
import socket
import stat
import sys
import tempfile
import textwrap
import typing

import numpy as np
import torch


# ----------------------------------------------------------------------------- errors and signals

class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, no network): one line, exit 2."""


class Finished(Exception):
    """--resume found the run already finished: nothing to do (exit status 0)."""


class Stopped(Exception):
    """SIGTERM, SIGUSR1 (SLURM preemption or time limit) or Ctrl-C arrived: the run stopped during `phase`,
    right after saving a checkpoint if `saved`, else at a point with nothing new worth saving."""

    def __init__(self, phase, saved=False):
        super().__init__(phase)
        self.phase, self.saved = phase, saved


class Diverged(Exception):
    """The training loss is not finite (see LossWatch): the run stops without a result."""


DIVERGED_EXIT = 3  # exit status of a diverged run (2: bad input, 130/143: stopped by a signal)

_stop_signal = None
_open_run = None  # the run directory open_run prepared: where run_main looks for a checkpoint on a stop
_counting = False  # whether _count_stop_signals watches the stop signals (run_main starts it)
_stop_count = 0  # stop signals the _count_stop_signals thread has read: a second one stops at once


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
AT_ONCE_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a second of these stops at once (not SLURM's SIGUSR1,
# which task.sh also sends for a preemption's SIGTERM: a repeated request to checkpoint)


def _on_stop_signal(signum, frame):
    """Python's handler, in the main thread: the first stop signal sets the flag, so the main thread's next
    check sees it at once (the _count_stop_signals thread, which counts them, may read its pipe later)."""
    global _stop_signal
    if _stop_signal is None:
        _stop_signal = signum


def _count_stop_signals(fd):
    """Thread: each stop signal as it arrives (one byte each, written by Python's C-level handler into
    the wakeup fd), not when the main thread gets round to Python's handler: a long torch call delays
    that handler for seconds, and two signals that arrive meanwhile would run it once. The first asks
    for a stop at the next step boundary; a second SIGTERM or Ctrl-C stops at once."""
    global _stop_signal, _stop_count
    while True:
        for signum in os.read(fd, 64):
            if signum not in STOP_SIGNALS:
                continue
            _stop_count += 1  # counted here: the flag alone cannot tell, as Python's handler may have set it first
            if _stop_signal is None:
                _stop_signal = signum
            if _stop_count > 1 and signum in AT_ONCE_SIGNALS:
                _stop_at_once(signum)


def _stop_at_once(signum):
    """A second stop signal: exit now, whatever the main thread is doing (a round, a blocked read), with
    one line saying what is kept. Files are written whole (atomic_write), so the last checkpoint and
    the files before it are intact; a temporary file left behind is removed on the next start."""
    if _open_run and os.path.isfile(os.path.join(_open_run, "checkpoint.pt")):
        kept = "its last checkpoint is kept: continue with --resume"
    elif _open_run:
        kept = "no checkpoint yet: rerun with --resume to start it over"
    else:
        kept = "nothing written yet: rerun the same command to start it again"
    by = f"signal {signum}" + (" (Ctrl-C)" if signum == signal.SIGINT else "")
    os.write(2, f"stopped at once by a second {by}: {kept}\n".encode())  # not print: the main thread may hold stderr
    os._exit(130 if signum == signal.SIGINT else 143)


def count_stop_signals():
    """Start _count_stop_signals (once per process, from the main thread): Python's C-level handler
    writes each signal's number into a pipe that the thread reads."""
    global _counting
    if _counting:
        return
    import threading
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # the C-level handler must never block
    try:
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except ValueError:  # not the main thread (a test's): Python's handler alone sets the flag
        os.close(read_end)
        os.close(write_end)
        return
    threading.Thread(target=_count_stop_signals, args=(read_end,), daemon=True, name="stop_signals").start()
    _counting = True


def stop_requested():
    """True once SIGTERM/SIGUSR1/SIGINT (Ctrl-C) arrived: loops checkpoint at the next step boundary, then
    raise Stopped."""
    return _stop_signal is not None


def stop_here(phase):
    """Raise Stopped(phase) if a stop was requested: called between the batches of phases that keep no
    partial state (features, ridge, calibration, head epochs), which are redone on --resume."""
    if stop_requested():
        raise Stopped(phase)


def _what_was_kept(stopped):
    """What a stopped run left for later, truly: the checkpoint it just saved, the one it had, or none
    (once its folder holds config.json, only --resume reopens it: the run then starts over)."""
    if stopped.saved:
        return "checkpoint saved, continue with --resume"
    if _open_run and os.path.isfile(os.path.join(_open_run, "checkpoint.pt")):
        return "nothing new to save, its last checkpoint is kept: continue with --resume"
    if _open_run:
        return "no checkpoint yet and nothing needed saving: rerun with --resume to start it over"
    return "nothing written yet: rerun the same command to start it again"


def _parent_of(pid):
    """The parent PID of process `pid` (Linux /proc), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[1])  # after the name, which may hold ') '
    except (OSError, ValueError, IndexError):
        return None


def _has_ancestor(pid):
    """Whether process `pid` is this process's parent, grandparent, ... (a process a wrapper started)."""
    here = os.getpid()
    for _ in range(4096):  # a chain of parents ends at PID 1 (or 0); the bound guards a corrupt /proc
        here = _parent_of(here)
        if here == pid:
            return True
        if not here or here == 1:
            return False
    return False


def _watch_ancestor(pid):
    """Thread: SIGTERM to this process once `pid` is no longer among its ancestors (it died, even by
    SIGKILL, and whatever stood between was reparented)."""
    import time
    while _has_ancestor(pid):
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent():
    """Under run_all.sh (which sets RUN_ALL_PID), get SIGTERM when run_all.sh dies, even by SIGKILL:
    an orphaned run would otherwise go on writing while a rerun of run_all.sh starts it again.
    run_all.sh is the parent, or an ancestor when $PYTHON is a wrapper that does not exec (a bash script,
    `conda run`, `uv run`, a container launcher): then a thread watches it (every 0.5 s)."""
    parent = os.environ.get("RUN_ALL_PID", "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    parent = int(parent)
    if os.getppid() == parent:
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # run_all.sh died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    elif _has_ancestor(parent):
        import threading
        threading.Thread(target=_watch_ancestor, args=(parent,), daemon=True, name="die_with_run_all").start()
    else:  # run_all.sh died before this run started
        os.kill(os.getpid(), signal.SIGTERM)


def stop_status():
    """The exit status of a run stopped by a signal: 130 for Ctrl-C (as a shell reports it), else 143 (what
    run_all.sh's SLURM task requeues on, SIGUSR1 included)."""
    return 130 if _stop_signal == signal.SIGINT else 143


def resuming(args, where):
    """Say where a resumed run continues from (its round, epoch or trial)."""
    print(f"resuming {args.out} from {where}")


def run_main(main):
    """Call main(): a UserError is one line on stderr and exit status 2; a diverged run (Diverged) one
    line and DIVERGED_EXIT; SIGTERM/SIGUSR1 and Ctrl-C (SIGINT) make the run stop within seconds
    (checkpointing at its next step boundary where it has new state), ready for --resume, with status
    stop_status(); a second SIGTERM or Ctrl-C stops at once (_stop_at_once), saving nothing new."""
    for s in STOP_SIGNALS:
        # an ignored SIGINT stays ignored (a background run of run_all.sh: the study stops it by SIGTERM)
        if not (s == signal.SIGINT and signal.getsignal(s) == signal.SIG_IGN):
            signal.signal(s, _on_stop_signal)
    count_stop_signals()
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
        # Stopped, its checkpoint saved: a further stop signal changes nothing. Ignored from here, as Python's
        # shutdown would otherwise put back the default handler and a second Ctrl-C there would kill the
        # process by the signal (exit -2) instead of its stop status
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        by = f"signal {_stop_signal}" + (" (Ctrl-C)" if _stop_signal == signal.SIGINT else "")
        print(f"stopped by {by} during {e.phase}: {_what_was_kept(e)}", file=sys.stderr)
        sys.exit(stop_status())
    except KeyboardInterrupt:
        print("interrupted: continue later with --resume", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- flags: the parser and value types

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with every default the code has, as the flag takes it: a list as commas (the --grid-*
    flags), nothing for an off switch or an unset value (its help says what unset means); a flag whose
    type has a `range` (plumbing.rate) says it; the description and the example epilog keep their line
    breaks."""

    def _get_help_string(self, action):
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS  # `is`: 0 is a default
        text = action.help
        if text and getattr(action.type, "range", None):
            text += f" ({action.type.range})"
        if text and "%(default)" not in text and not unset and action.option_strings:
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
            return f"{text} (default: {shown.replace('%', '%%')})"
        return text

    def _split_lines(self, text, width):  # never "least-" / "sensitive" across two lines
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse that prints every default in --help (so help cannot drift from the code), a short usage
    line, an example at the end (example=...), takes a flag only by its full name, and a bad flag as one
    line (no usage dump) with exit status 2."""

    def __init__(self, example=None, **kw):
        if example:
            kw["epilog"] = "example:\n  " + example
        # No abbreviations: `--resul` must not pass for --results (run_all.sh refuses --results after --).
        super().__init__(**{"formatter_class": HelpFormatter, "allow_abbrev": False, **kw})

    def format_usage(self):
        return self.format_help().split("\n\n")[0] + "\n"

    def format_help(self):
        if self.usage is None:  # the flags are listed below: one usage line, not a page of them
            self.usage = " ".join(["%(prog)s [flags]"] + [a.metavar or a.dest for a in self._get_positional_actions()])
        return super().format_help()

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        """The flags, carrying their defaults (Flags.defaults) for comparing with older runs' configs, and
        their values as given (Flags.given), before get_args derives anything from them (run_name)."""
        flags = super().parse_args(args, Flags() if namespace is None else namespace)
        flags.defaults = {a.dest: self.get_default(a.dest) for a in self._actions if a.default is not argparse.SUPPRESS}
        flags.given = {k: getattr(flags, k) for k in flags.defaults}
        return flags


class Flags(argparse.Namespace):
    """Parsed flags, plus `defaults`: {flag: its default} and `given`: {flag: its value as parsed}. Slots,
    not attributes: vars() (and so config.json, run_config) leaves them out."""
    __slots__ = ("defaults", "given")


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


def positive_float(s):
    v = float(s)
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


# The largest learning rate or weight decay a flag takes. The weights are float32 (largest 3.4e38), and torch
# casts a rate into their type at every step: a larger one was a traceback mid-run ("value cannot be converted
# to type float without overflow"), with the run folder half-written. 1e38 still lets a test drive a run to
# divergence on purpose (docs/safety.md).
MAX_RATE = 1e38


def rate(s):
    """A learning rate or weight decay: a number in [0, MAX_RATE]."""
    v = float(s)
    if not 0 <= v <= MAX_RATE:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_RATE:g}] (the weights are float32), got {s}")
    return v


rate.range = f"0 to {MAX_RATE:g}"  # said in --help (HelpFormatter): the bound is the type's, not a second copy


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


def positive_unit_float(s):
    """A fraction in (0, 1]."""
    v = float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def changed_flags(p, args, names):
    """The flags among `names` (dest names) whose value differs from their default: given on purpose."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) != p.get_default(n)]


def refuse_ignored(p, args, names, why):
    """p.error if a flag among `names` was changed from its default although `why` makes it do nothing."""
    given = changed_flags(p, args, names)
    if given:
        p.error(f"{' '.join(given)} would be ignored: {why}; drop {'it' if len(given) == 1 else 'them'}")


def hparams_from(path):
    """lr / momentum / weight decay chosen by a centralized run (its result.json), checked as the flags
    --lr, --momentum and --wd are."""
    try:
        with open_regular(path) as f:
            best = json.load(f)["best"]
        hp = float(best["lr"]), float(best["momentum"]), float(best["wd"])
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): point --hparams at a finished centralized "
                        f"run's result.json")
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a centralized result.json with a 'best' entry")
    for name, v, check in zip(("lr", "momentum", "wd"), hp, (rate, unit_float, rate)):
        try:
            check(v)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"--hparams {path}: its {name} {e}")
    return hp


# ----------------------------------------------------------------------------- the flags the scripts share

def check_base_flags(p, args):
    """Contradictions among base_parser's flags (every script's get_args calls this)."""
    if args.weights and args.no_pretrained:  # said, not refused: the tests' tiny flags carry --no-pretrained
        print(f"note: --no-pretrained is ignored: --weights {args.weights} gives the backbone")


def base_parser(default_arch):
    """Flags every script spells the same way (an argparse parent); default_arch: common.DEFAULT_ARCH."""
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
    g.add_argument("--arch", default=default_arch, help="timm ViT name (tests use test_vit)")
    g.add_argument("--weights", type=path, default=None,
                   help="a DINO checkpoint (dino_deitsmall16_pretrain.pth) or timm state dict (.pth/.safetensors); "
                        "unset: timm's hub weights; standin / standin-sharp (with --arch test_vit): a tiny "
                        "pretrained stand-in for offline trials, made and cached in DATA_DIR/standin/")
    g.add_argument("--no-pretrained", action="store_true",
                   help="random backbone weights (for tests and smoke runs only)")
    g.add_argument("--img-size", type=positive_int, default=224,
                   help="images are resized to this many pixels before the ViT (a multiple of its patch size)")
    g.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    g.add_argument("--eval-batch-size", type=positive_int, default=256, help="evaluation batch size")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="random seed of everything but the validation split and the synthetic images")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (none: cuda if available, else cpu)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="the backbone's precision: auto = bf16 on GPUs with compute capability >= 8.0, fp16 "
                        "(gradient scaler) on older GPUs, fp32 on the CPU; head and accuracies are always fp32")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels and math attention: bit-identical reruns and resumes on a "
                        "GPU, slower (docs/precision.md)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone: faster steps after a one-off compile; results equal to "
                        "float rounding, not bit for bit (docs/precision.md)")
    g.add_argument("--results", type=path, default="runs", help="root of the default run directories")
    g.add_argument("--out", type=path, default=None,
                   help="run directory (none: RESULTS/STAGE/NAME/seedSEED, NAME from the main flags)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (starts fresh if there is none)")
    g.add_argument("--tensorboard", action=TensorBoardFlag,
                   help="also log every metrics row (round, epoch) to RUN/tb/ as it is written, for a live view: "
                        "tensorboard --logdir RESULTS (needs the optional tensorboard package)")
    return p


def tensorboard_missing():
    """None if torch.utils.tensorboard can be imported, else the one line that says what to do."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return "--tensorboard needs the tensorboard package: pip install tensorboard (or leave --tensorboard out)"
    return None


class TensorBoardFlag(argparse.Action):
    """--tensorboard, refused as one line (exit status 2) when the package is missing: checked as the flags
    are parsed, before anything is written (and by run_all.sh's planner before the first run starts), not
    a study of hours that turns out to have no live view."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=False, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        missing = tensorboard_missing()
        if missing:
            parser.error(missing)
        setattr(namespace, self.dest, True)


# ----------------------------------------------------------------------------- device, precision, determinism

def pick_device(name, deterministic=False):
    """torch.device from --device, checked; also sets TF32 off and, with --deterministic on a GPU, the
    deterministic kernels, attention included (before any CUDA work, as cuBLAS needs)."""
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
        fused_attention_off()  # attention by the math kernel
    if dev.type == "cpu":
        # Denormal floats are many times slower on CPUs: a one-class FedAvg client, whose gradients
        # quickly become tiny, ran ~15x slower. Flushing them to zero changes no accuracy we report.
        torch.set_flush_denormal(True)
    return dev


FUSED_ATTENTION = ("cudnn", "flash", "mem_efficient")  # scaled_dot_product_attention's fused CUDA kernels


def fused_attention_off(kernels=FUSED_ATTENTION):
    """Attention (scaled_dot_product_attention) without these fused kernels; without all three, by its math
    kernel only, as --deterministic on a GPU asks.
    Under warn_only=True each fused kernel keeps its non-deterministic backward and only warns (PyTorch's
    attention_backward.cu: cuDNN's, which ViT-S/16 at 224 px gets on an H200, and equally flash's and
    memory-efficient's, which would take its place). On an H200 a client step ran at 2336 img/s with the
    default kernels, 1601 with the math kernel only (PyTorch 2.11, bf16, batch 64, 224 px)."""
    for kernel in kernels:
        switch = getattr(torch.backends.cuda, f"enable_{kernel}_sdp", None)
        if switch is not None:  # an older PyTorch may lack a kernel (cuDNN attention came in 2.2) and its switch
            switch(False)


def resolve_amp(amp, device):
    """The precision actually used, one word everywhere (console, config.json, result.json, the feature
    cache): 'fp32', 'bf16' or 'fp16', from --amp (whose 'off' is fp32) and the device."""
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            raise UserError(f"--amp {amp} needs a CUDA GPU; on the CPU use --amp off (or auto)")
        return "fp32"
    if amp != "auto":
        return "fp32" if amp == "off" else amp
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
    "aug_gap": 83,         # the augmentation gap's sample of training images and their crops/flips
}


def stream(name, seed, *keys):
    """The generator of random stream `name` for (seed, *keys)."""
    return make_generator(seed, *keys, STREAMS[name])


# ----------------------------------------------------------------------------- files: downloads, inputs, atomic writes

def network_reachable(host, port=443, timeout=3.0):
    """Whether `host` answers within `timeout` seconds: offline, a download fails in seconds."""
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
    """The backbone state dict in a --weights file (a .pth/.pt checkpoint or .safetensors), unwrapped."""
    if not os.path.lexists(path):
        raise UserError(f"weights file not found: {path} (download dino_deitsmall16_pretrain.pth or drop --weights)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load
            with open_regular(path, binary=True) as f:
                sd = load(f.read())
        else:
            sd = load_tensors(path)
        return _unwrap_state_dict(sd)
    except OSError as e:
        raise UserError(f"cannot read weights file {path} ({e.strerror or type(e).__name__}): give a .pth or "
                        f".safetensors file")
    except Exception as e:
        raise UserError(f"cannot read weights file {path} ({type(e).__name__}); re-download it")


def hub_weights(arch, download=True):
    """Path of the timm hub weights for `arch`: from the local cache, else downloaded (download=False:
    None, to be downloaded later). Offline without a cache this fails in seconds instead of retrying for
    a minute."""
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
        raise UserError(f"no network and no cached weights for {arch}: run `python plan.py` where there is "
                        f"internet (fills ~/.cache/huggingface), or pass --weights dino_deitsmall16_pretrain.pth")
    if not download:
        return None
    try:
        return hf_hub_download(cfg.hf_hub_id, "model.safetensors")
    except Exception as e:
        raise UserError(f"could not download weights for {arch} ({type(e).__name__}); pass --weights FILE")


def load_tensor_file(path, what, fix):
    """torch.load of a file the user names, on the CPU and weights_only (a crafted pickle cannot run
    code); a missing or unreadable file is one line saying `fix`."""
    try:
        return load_tensors(path)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path} ({fix})")
    except OSError as e:
        raise UserError(f"cannot read {what} {path} ({e.strerror or type(e).__name__}): {fix}")
    except Exception as e:
        raise UserError(f"cannot read {what} {path} ({type(e).__name__}): {fix}")


def host_memory_available():
    """Bytes of host memory available to a new allocation (Linux's MemAvailable; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cpu_state(module):
    """A state dict on the CPU: files that load on any machine with a plain torch.load."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


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
    """Text, in UTF-8 whatever the locale (a report's ± under LC_ALL=C)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def finite_or_null(obj, found, at=""):
    """obj with every float that is not finite replaced by None; found[where] = what it was ('nan', 'inf',
    '-inf'), where being the key path ('test_loss', 'best.lr', 'rows[2]')."""
    if isinstance(obj, float) and not math.isfinite(obj):
        found[at] = str(obj)
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v, found, f"{at}.{k}" if at else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v, found, f"{at}[{i}]") for i, v in enumerate(obj)]
    return obj


def write_json(obj, path):
    """A dict as JSON, atomically. JSON has no NaN or Infinity (json.dumps would write them bare, and strict
    readers refuse the file): a number that is not finite (say the test loss of a model whose logits
    overflow; flags never are, their types refuse them) is written as null, the file's "not_finite" entry
    says what each was ({"test_loss": "inf"}) and a warning line says so."""
    found = {}
    obj = finite_or_null(obj, found)
    if found:
        obj["not_finite"] = found
        print(f"warning: {path}: {', '.join(f'{k} is {v}' for k, v in found.items())}, which JSON cannot hold: "
              f"written as null (its \"not_finite\" says what it was)", file=sys.stderr)
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", path)


_live_logs = {}  # RUN/tb or RUN/tb/PART -> its open SummaryWriter (--tensorboard), one per process


def live_log(args, step, row, part=None):
    """--tensorboard (else nothing): the metrics row `row` (dict) at `step` (its round or epoch) into the
    run's TensorBoard log RUN/tb/ (RUN/tb/PART/ for a part of a run with steps of its own, a centralized
    trial), every number a scalar named by its column, flushed at once: `tensorboard --logdir RESULTS`
    shows a study while it runs. A log opens at the first row this process logs, with purge_step = that
    step: TensorBoard hides what an interrupted session wrote from that step on, so a resumed run, which
    logs again from its checkpoint, neither duplicates a step nor keeps one the resume recomputed."""
    if not getattr(args, "tensorboard", False):
        return
    where = os.path.join(args.out, "tb", *([name_value(part)] if part else []))
    writer = _live_logs.get(where)
    if writer is None:
        from torch.utils.tensorboard import SummaryWriter
        refuse_links(where, args.out)  # RUN/tb linked elsewhere would steer the log's writes out of the root
        writer = _live_logs[where] = SummaryWriter(where, purge_step=step)
    for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            writer.add_scalar(k, v, step)
    writer.flush()


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


# ----------------------------------------------------------------------------- the run directory

# Flags that do not change a run's result: a run may be resumed with other values of these.
# (Not --eval-batch-size: the order in which evaluation sums its batches shows in the last digits.)
NON_RESULT_FLAGS = {"out", "results", "resume", "device", "data_dir", "tensorboard"}


def file_tag(path):
    """A run name for an input file: its last two folders and its name without the extension, e.g.
    runs/model_editing/random_s0.5_r1/seed0/mask.pt -> random_s0.5_r1-seed0-mask. In the project's layout
    (RESULTS/STAGE/NAME/seedN/FILE) two files never share one; the folder alone (seedN) would."""
    folders, name = os.path.split(os.path.abspath(path))
    return "-".join([os.path.basename(os.path.dirname(folders)), os.path.basename(folders),
                     os.path.splitext(name)[0]])


# Flags that say where a run lives or how it computes, not what: a run's name leaves them out. --amp,
# --deterministic, --compile and --eval-batch-size change a result in its last digits at most; config.json
# still records them (a run is resumed only with the same ones), and run_all.sh gives --deterministic to
# every run of the study.
UNNAMED_FLAGS = NON_RESULT_FLAGS | {"seed", "amp", "deterministic", "compile", "eval_batch_size"}

# Short forms of flags in run names. A flag not listed here is named by itself (--server-lr 0.5 ->
# server-lr0.5), so a new flag needs no entry; "" names a flag by its value alone (synthetic, test-vit).
SHORT_FLAGS = {"dataset": "", "synthetic_size": "n", "val_frac": "val", "arch": "", "weights": "",
               "no_pretrained": "random", "img_size": "px", "batch_size": "b",
               "fisher_batches": "fb", "fisher_batch_size": "fbs", "calib_damp": "damp", "calib_images": "ci",
               "min_shard": "ms", "eval_every": "ev", "test_every": "te", "ckpt_every": "ck",
               "head_lr": "hlr", "momentum": "m", "warmup_rounds": "wr", "no_aug": "noaug",
               "warmup_lr": "wlr", "warmup_momentum": "wm", "warmup_wd": "wwd", "warmup_epochs": "wep",
               "patience": "pat", "epochs": "ep", "scheduler": "sch", "grid_lr": "glr", "grid_momentum": "gm",
               "grid_wd": "gwd", "schedulers": "scheds", "aug_views": "views"}


def name_value(v):
    """A flag's value in a run name: numbers as short as they stay exact (1e-05, 0.1000001: two values
    never share a name), lists comma-joined, a path by its file_tag, nothing but [A-Za-z0-9.,+-]."""
    if isinstance(v, (list, tuple)):
        return ",".join(name_value(x) for x in v)
    if isinstance(v, float):
        short = f"{v:g}"
        return short if float(short) == v else repr(v)
    v = str(v)
    if "/" in v or os.sep in v:
        v = file_tag(v)
    return re.sub(r"[^A-Za-z0-9.,+-]+", "-", v)


def name_part(flag, value):
    """One flag in a run name: 'lr0.001', 'noaug' (a switch), 'head-warmup', 'synthetic'."""
    short = SHORT_FLAGS.get(flag, flag.replace("_", "-"))
    if isinstance(value, bool):
        return short if value else f"no-{short}"
    text = name_value(value)
    if not short:
        return text
    numbers = value if isinstance(value, (list, tuple)) else [value]
    return f"{short}{text}" if all(isinstance(x, (int, float)) for x in numbers) else f"{short}-{text}"


def run_name(args, stage, core, named):
    """The default run directory, RESULTS/STAGE/CORE[_FLAG...]/seedSEED: the stage's readable core (made of
    the flags in `named`), then every other flag that defines the run and differs from its default, in
    short form (name_part), in the parser's order. So two runs that differ in any such flag (or a flag
    added later: nothing to register) never share a directory, and at the defaults the name is the core."""
    parts = [core] + [name_part(k, v) for k, v in args.given.items()
                      if k not in UNNAMED_FLAGS and k not in named and v != args.defaults[k]]
    out = f"{args.results}/{stage}/{'_'.join(parts)}/seed{args.seed}"
    refuse_long_names(out, "shorten the flag values that name the run (or run it alone with --out DIR)")
    return out


NAME_MAX = 255  # bytes in one file or folder name on Linux's filesystems (ext4, xfs, btrfs, tmpfs, NFS)


def refuse_long_names(path, fix):
    """A UserError saying `fix` if a file or folder name in `path` is longer than NAME_MAX: refused before
    anything is created (makedirs would leave the folders above it behind)."""
    too_long = [part for part in path.split(os.sep) if len(os.fsencode(part)) > NAME_MAX]
    if too_long:
        raise UserError(f"the folder name {too_long[0][:40]}... is {len(os.fsencode(too_long[0]))} bytes, more than "
                        f"the {NAME_MAX} a name may have: {fix}")


# Values get_args derives from flags that config.json holds already (fedavg's split: --iid/--nc/--dirichlet)
DERIVED_KEYS = {"split"}


def run_config(args):
    return {k: v for k, v in sorted(vars(args).items()) if k not in NON_RESULT_FLAGS | DERIVED_KEYS}


def plot_title(what, args, named=()):
    """A per-run plot's title: `what`, then every flag of the run that differs from its default (the seed
    included), wrapped: two runs of a study always differ in one of them, so no two runs share a title.
    named: flags `what` already says."""
    import textwrap
    d = args.defaults
    flags = ", ".join(f"{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in run_config(args).items()
                      if k not in named and k in d and v != d[k])
    return "\n".join([what] + textwrap.wrap(flags or "default flags", 90))


LOCK_FILE = ".lock"
_held_locks = {}  # run dir -> open lock file: held as long as the process lives (the OS drops it at exit)


def refuse_links(path, root):
    """Refuse `path` if it, or a folder between the results root `root` and it, is a symbolic link: a results
    root is shared data, and a link in it (R/fedavg -> ~/projects) would steer the run's writes (and a
    refused run's clean-up) outside it. The root itself may be a link (the user chose it); a path outside
    the root is checked only for itself being a link."""
    path, root = os.path.abspath(path), os.path.abspath(root)
    inside = path != root and os.path.commonpath([path, root]) == root
    parts = os.path.relpath(path, root).split(os.sep) if inside else [os.path.basename(path)]
    at = root if inside else os.path.dirname(path)
    for part in parts:
        at = os.path.join(at, part)
        if os.path.islink(at):
            raise UserError(f"{at} is a symbolic link (to {os.readlink(at)}); a results folder must hold real "
                            f"folders: remove the link or choose another --out")


def _open_lock_file(path):
    """The lock file, opened for reading and writing without following a link (a .lock linked to a file
    elsewhere would be truncated to our PID) and created if absent."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:  # a link (ELOOP), a read-only folder, a .lock that is a directory
        what = "a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise UserError(f"cannot open {path} ({what}): the run directory must be writable and its {LOCK_FILE} "
                        f"a file; fix it or choose another --out")
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device
        os.close(fd)
        raise UserError(f"{path} is not a regular file; remove it or choose another --out")
    return os.fdopen(fd, "r+")


def lock_run(out):
    """Take the exclusive lock of run directory `out` (which exists) for the life of this process. A
    second process is refused, naming the PID that holds it, and touches nothing; a lock of a dead
    process is gone (flock dies with it). The lock is on the file that `out/.lock` names when it is
    taken: a lock on a file since unlinked (a refused run's clean-up) is retried on the new one."""
    key = os.path.realpath(out)
    if key in _held_locks:  # this process opened the run before (tests call main() repeatedly)
        return
    path = os.path.join(out, LOCK_FILE)
    for _ in range(10):
        f = _open_lock_file(path)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = f.read().strip() or "?"
            f.close()
            raise UserError(f"{out} is in use by another process (PID {pid}); wait for it to finish or stop it")
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.lstat(path))
        except OSError:
            same = False
        if same:
            break
        f.close()
    else:
        raise UserError(f"{path} keeps being replaced by another process; stop it or choose another --out")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held_locks[key] = f


def unlock_new_run(out):
    """Undo a refused start in the folder it created and locked: its lock file, then the folder if it
    is empty. Nothing else is deleted (a folder holds only what its lock holder wrote, and the refused
    command wrote nothing else)."""
    f = _held_locks.pop(os.path.realpath(out), None)
    if f is None:
        return
    try:
        os.remove(os.path.join(out, LOCK_FILE))
        os.rmdir(out)
    except OSError:  # another start's lock file appeared meanwhile: the folder is theirs now
        pass
    f.close()


def is_temporary(name):
    """A temporary file of atomic_write (older versions also wrote NAME.tmp.png)."""
    return name.endswith(".tmp") or name.endswith(".tmp.png")


def remove_stale_temporaries(out):
    """Temporary files of atomic writes that a killed process left behind (we hold the lock: nobody
    else is writing here)."""
    for name in os.listdir(out):
        if is_temporary(name):
            try:
                os.remove(os.path.join(out, name))
            except OSError as e:  # a read-only run directory
                raise UserError(f"cannot remove {os.path.join(out, name)}, a temporary file of an earlier run "
                                f"({e.strerror}): the run directory must be writable; nothing was changed")


def open_regular(path, binary=False, **kw):
    """open(path, encoding="utf-8", **kw) for reading (binary: open(path, "rb")), of a regular file only: a
    FIFO (whose open and read would block forever), a folder, a device or a socket raises OSError
    ("not a regular file") without being opened, or (replaced meanwhile) without blocking. Every file
    a user names goes through here. Text files are UTF-8 whatever the locale."""
    not_regular = OSError(errno.EINVAL, "not a regular file", path)
    if not stat.S_ISREG(os.stat(path).st_mode):  # a device is never opened (opening some has effects)
        raise not_regular
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO put there since: no blocking open
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise not_regular
    return open(fd, "rb") if binary else open(fd, encoding="utf-8", **kw)


def load_tensors(path):
    """torch.load of a regular file (open_regular), on the CPU and weights_only: a crafted pickle cannot run
    code. Raises what open_regular and torch.load raise."""
    with open_regular(path, binary=True) as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def read_json_object(path):
    """The JSON object (dict) in file `path`, or None: no regular file (a FIFO would block the read), not
    readable, not JSON (empty, truncated, not UTF-8, nested too deep), or not an object."""
    try:
        with open_regular(path) as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def read_result_json(out):
    """The result.json of run directory `out` as a dict, or None: a run is finished only when its
    result.json is a JSON object (an empty or truncated file marks nothing)."""
    return read_json_object(os.path.join(out, "result.json"))


def in_current_words(stored):
    """A stored run config or result in today's words: the precision once called 'off' is 'fp32'."""
    return {**stored, "precision": "fp32"} if stored.get("precision") == "off" else stored


def with_defaults(stored, defaults):
    """A stored run config (config.json, a checkpoint's "run") completed with the flags' defaults for
    the flags it lacks: a run written before a flag existed ran with what is now its default (a new flag's
    default keeps the older behaviour), so it is not another run for lacking the key. `defaults`:
    {flag: default}, a parser's (Flags.defaults); flags that do not change a result are left out."""
    return {**{k: v for k, v in defaults.items() if k not in NON_RESULT_FLAGS}, **in_current_words(stored)}


def differing_keys(stored, config, defaults):
    """The keys in which a stored run config differs from `config`, sorted (a key `config` has and
    `stored` lacks: see with_defaults)."""
    stored = with_defaults(stored, {k: v for k, v in defaults.items() if k in config})
    return sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))


def config_differences(out, config, defaults):
    """The keys in which the run in directory `out` (its config.json) differs from `config` (of flags with
    `defaults`, see with_defaults), sorted, the precision left aside (it is only resolved once the device
    is known); None without a readable config."""
    old = read_json_object(os.path.join(out, "config.json"))
    return None if old is None else [k for k in differing_keys(old, config, defaults) if k != "precision"]


def refuse_other_runs(args, config):
    """Refuse args.out unless it is this run's, looking only (nothing is written): a new folder (empty
    but for what a run of ours killed before config.json existed leaves), or one whose config.json is
    `config`, finished only with --resume (then there is nothing to do), interrupted only with --resume."""
    out = args.out
    for n in ("config.json", "checkpoint.pt", "result.json"):
        if os.path.lexists(os.path.join(out, n)) and not os.path.isfile(os.path.join(out, n)):
            raise UserError(f"{os.path.join(out, n)} is not a regular file; remove it or choose another --out")
    cfg_path = os.path.join(out, "config.json")
    if not os.path.isfile(cfg_path):
        try:
            entries = os.listdir(out)  # its lock file, and temporaries only next to that lock file
        except FileNotFoundError:  # removed by a refused start that had created it: a new folder again
            return
        stray = [n for n in entries if n != LOCK_FILE and not (LOCK_FILE in entries and is_temporary(n))]
        if stray:
            raise UserError(f"--out {out} is not empty and holds no run (it has {sorted(stray)[0]!r}); "
                            f"choose another --out")
        return
    old = read_json_object(cfg_path)
    if old is None:
        raise UserError(f"{cfg_path} is not a run's config (unreadable, or not a JSON object); delete {out} or "
                        f"choose another --out")
    diff = differing_keys(old, config, args.defaults)
    if diff:
        raise UserError(f"{out} holds a different run (differs in {', '.join(diff)}); "
                        f"choose another --out or delete it")
    if not args.resume:
        raise UserError(f"{out} already holds a finished run; choose another --out or delete it"
                        if read_result_json(out) is not None else
                        f"{out} holds an interrupted run: add --resume to continue it, or choose another --out")


def make_run_dir(out):
    """Create run directory `out` (and its parents); True if this process created it. Of several starts
    at once only one creates it (os.mkdir is atomic), and only that one may remove it again."""
    refuse_long_names(out, "choose a shorter --out or --results")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        try:
            os.mkdir(out)
            return True
        except FileExistsError:
            if os.path.isdir(out):
                return False
            raise
    except OSError as e:
        raise UserError(f"cannot create --out {out} ({e.strerror}); choose another --out or --results")


def open_run(args):
    """Open run directory args.out for this process: the checkpoint to resume from, or None to start.

    How a run resumes: its folder is checked to be this run's before anything in it is touched
    (refuse_other_runs), then locked and checked again under the lock; a new run writes config.json, an
    interrupted one (--resume) gets its checkpoint.pt back, refused unless stamped with this run's flags
    (save_checkpoint stamps them). The script restores its state from that dict (each script documents
    its dict where it makes it). A run killed before its first checkpoint starts over.
    Of several starts at once, one takes the lock and the others are refused without touching anything;
    a folder (or .lock) that is a link is refused (refuse_links)."""
    out, config = args.out, run_config(args)
    stop_here("the run's start")  # a signal during the data, the model or the stand-in: nothing written after it
    refuse_links(out, args.results)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory")
    if os.path.isdir(out):
        refuse_other_runs(args, config)  # looking only: no lock file in a folder that is not a run's
    created = make_run_dir(out)
    lock_run(out)  # a refused start stops here, having changed nothing
    global _open_run
    try:
        refuse_links(out, args.results)  # again under the lock: a folder swapped for a link meanwhile
        refuse_other_runs(args, config)
        remove_stale_temporaries(out)
        cfg_path, ckpt_path, ckpt = os.path.join(out, "config.json"), os.path.join(out, "checkpoint.pt"), None
        if not os.path.isfile(cfg_path):  # a new run
            write_json(config, cfg_path)
        elif os.path.isfile(ckpt_path):  # --resume of an interrupted run (without a checkpoint: it starts over)
            try:  # weights_only: a crafted checkpoint cannot run code
                ckpt = load_tensors(ckpt_path)
            except Exception as e:
                raise UserError(f"cannot read {ckpt_path} ({type(e).__name__}); delete it to start over")
            if not isinstance(ckpt, dict) or not isinstance(ckpt.get("run"), dict) or \
                    differing_keys(ckpt["run"], config, args.defaults):
                raise UserError(f"{ckpt_path} is not this run's checkpoint (its run's flags differ, or it predates "
                                f"this check); delete it to start the run over")
        _open_run = out
        return ckpt
    except UserError:
        if created:  # leave nothing behind for a refused command: the folder it made, if still empty
            unlock_new_run(out)
        raise


def finished(args):
    """True if args.out holds a finished run (result.json) of the same flags (config.json)."""
    return config_differences(args.out, run_config(args), args.defaults) == [] and read_result_json(args.out) is not None


def state_misfit(sd, module):
    """What keeps state dict `sd` (from a checkpoint) from loading into `module` as it is, or None: another
    set of names, a value that is no tensor, another shape or dtype."""
    if not isinstance(sd, dict):
        return f"a {type(sd).__name__}, not a state dict"
    want = module.state_dict()
    if set(sd) != set(want):
        missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want), key=str)
        return f"missing {missing[:3]}, unknown {extra[:3]}"
    for k, t in want.items():
        if not isinstance(sd[k], torch.Tensor) or sd[k].shape != t.shape or sd[k].dtype != t.dtype:
            return f"{k} is not a {t.dtype} tensor of shape {tuple(t.shape)}"
    return None


def type_ok(value, kind):
    """Whether `value` has type `kind`, a class or Optional[...] of classes (None then fits); a bool is no
    number, an int fits a float."""
    kinds = typing.get_args(kind) or (kind,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds + ((int,) if float in kinds else ()))


class CheckpointState:
    """A script's run state, all of it, which is its checkpoint: a subclass is a dataclass whose fields (their
    names and types) are the checkpoint's schema. to_checkpoint() is what save_checkpoint stores;
    from_checkpoint() takes back only a checkpoint of that schema that fits this run (the subclass's misfit),
    else one line naming the file: a crafted checkpoint with the right run stamp is never a traceback, and
    never a run that goes on short of its state."""
    MAY_LACK = ()  # fields a checkpoint may lack: their default holds (written before they had a value)
    DROPPED = ()   # keys of older versions that are no state any more: ignored

    def to_checkpoint(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_checkpoint(cls, ckpt, args, *context):
        """The state in checkpoint dict `ckpt` (open_run's) of run `args`; context: what misfit compares with."""
        ckpt = {k: v for k, v in ckpt.items() if k != "run" and k not in cls.DROPPED}
        state, problem = None, cls.schema_problem(ckpt)
        if problem is None:
            state = cls(**ckpt)
            problem = state.misfit(args, *context)
        if problem:
            raise UserError(f"{os.path.join(args.out, 'checkpoint.pt')} is not a checkpoint this run can continue "
                            f"({problem}); delete it to start the run over")
        return state

    @classmethod
    def schema_problem(cls, ckpt):
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        missing = sorted(set(fields) - set(ckpt) - set(cls.MAY_LACK))
        unknown = sorted(set(ckpt) - set(fields), key=str)
        if missing or unknown:
            return f"missing {missing[:3]}, unknown {unknown[:3]}"
        wrong = [name for name, value in ckpt.items() if not type_ok(value, fields[name])]
        return f"its {wrong[0]} is a {type(ckpt[wrong[0]]).__name__}" if wrong else None

    def misfit(self, args, *context):
        """What makes this state, of the right schema, not one of this run's, or None (a subclass's checks)."""
        return None


def save_checkpoint(state, args):
    """The checkpoint carries its run's config: one copied from another run is refused (open_run)."""
    atomic_save(dict(state, run=run_config(args)), os.path.join(args.out, "checkpoint.pt"))


def finish_run(result, args):
    """Write result.json (the marker of a finished run) and drop the now useless checkpoint."""
    write_json(dict(result, precision=args.precision), os.path.join(args.out, "result.json"))
    ckpt = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(ckpt):
        os.remove(ckpt)


# ----------------------------------------------------------------------------- plots

def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display on a cluster node)."""
    import matplotlib
    matplotlib.use("Agg")
    if "text.parse_math" in matplotlib.rcParams:  # text is text: '$' in a run's name is no formula (matplotlib >= 3.5)
        matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Write a figure as PNG atomically (atomic_write: umask respected, never half a file) and close it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    pyplot().close(fig)


def marker(xs):
    """A curve's marker: a dot per point while they are few, a big one for a lone point (a line of one
    point draws nothing)."""
    return "o" if len(xs) == 1 else "." if len(xs) < 40 else None


def sparse_points(xs):
    """Whether integer-stepped points (rounds, epochs) skip steps: measured every few rounds, a line between
    two of them would draw values nobody measured."""
    return len(xs) > 1 and max(b - a for a, b in zip(xs, xs[1:])) > 1


MARKERS, LINESTYLES = "osD^v<>p", ["-", "--", ":", "-."]  # one per series: a series under another stays visible


def marker_size(i):
    """Series i's marker size: each smaller than the one before, so equal points show as nested markers."""
    return 9 - 2 * (i % 3)


def cap_y(ax, lowest, ymax):
    """End the y axis at ymax (100 for a percentage) where autoscaling went past it, its bottom a margin
    under the lowest value drawn; markers on the edge are drawn whole."""
    if ymax is None or ax.get_ylim()[1] <= ymax:
        return
    bottom = lowest - max(0.5, 0.1 * (ymax - lowest))
    ax.set_ylim(max(bottom, 0) if lowest >= 0 else bottom, ymax)  # an accuracy axis not below 0 either
    for artist in ax.lines:
        artist.set_clip_on(False)


def integer_ticks(axis):
    """Rounds or epochs on an axis: integer ticks only (no round 1.5), one at least (a lone point's range is < 1)."""
    axis.set_major_locator(pyplot().MaxNLocator(integer=True, min_n_ticks=1))


def plot_lines(path, series, xlabel, ylabel, title, integer_x=True, ymax=None):
    """series: {label: (xs, ys) or (xs, ys, std)} -> one PNG line plot, std as error bars. Rounds and
    epochs (integer_x) get integer ticks only, and where they skip steps (evaluated every few rounds) markers
    without lines; a one-point series gets a marker big enough to see. Each series has its own open marker
    and dash, so one that lies on another still shows. ymax: the y axis ends there at most (100 for %)."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for i, (label, (xs, ys, *std)) in enumerate(series.items()):
        only_points = integer_x and sparse_points(list(xs))
        ax.errorbar(xs, ys, yerr=std[0] if std else None, capsize=3, label=label,
                    marker=MARKERS[i % len(MARKERS)] if len(xs) < 40 or only_points else None, fillstyle="none",
                    markersize=marker_size(i), linestyle="none" if only_points else LINESTYLES[i % len(LINESTYLES)])
    if integer_x:
        integer_ticks(ax.xaxis)
    cap_y(ax, min((y - (std[0][k] if std else 0) for _, (xs, ys, *std) in series.items() for k, y in enumerate(ys)),
                  default=0), ymax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_bars(path, labels, values, ylabel, title, std=None, zoom=False, ymax=None):
    """Bars with their values written on them. zoom: the y axis spans the values (± std) with a margin
    instead of starting at 0, where the bars differ by a few points of a large value (the label says so).
    ymax: the y axis ends there at most (100 for %)."""
    fig, ax = pyplot().subplots(figsize=(max(6, 0.35 * len(labels)), 4))
    ax.bar(range(len(values)), values, yerr=std, capsize=3)
    for i, (v, s) in enumerate(zip(values, std or [0] * len(values))):  # above its error bar
        ax.annotate(f"{v:.2f}", (i, v + s), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=7)
    if zoom and values:
        lo = min(v - s for v, s in zip(values, std or [0] * len(values)))
        hi = max(v + s for v, s in zip(values, std or [0] * len(values)))
        pad = max(0.5, 0.2 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), hi + pad if ymax is None else min(hi + pad, ymax))
        ylabel += " (axis not from 0)"
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
