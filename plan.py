"""run_all.sh's planner: it imports the stage scripts (never the other way round) and answers

    python plan.py --prefetch -- FLAGS    fetch and check what a run with FLAGS needs from outside
    python plan.py --describe-runs        each run's directory, image passes, state and config
    python plan.py --estimate             a probe of this machine: runs per GPU and each run's time
    python plan.py --runs [--quick | --grid FILE] [--extensions] --seeds 0,1 --results R -- FLAGS
                                          the study's runs, one a line (the study itself: families below)
    python plan.py --grid-table           README.md's table of the study's runs

Run it with --data-dir alone to download CIFAR-100 and the DINO weights for offline use:
    python plan.py --data-dir ./data
"""
import argparse
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

import algorithms
import centralized
import common
import fedavg
import model_editing
import plumbing
import splits


# ----------------------------------------------------------------------------- prefetch

def prefetch(args, backbone=True, download=True):
    """Fetch and check, once, everything a stage script run with these flags needs from outside, before
    parallel runs or job-array tasks would all try at once (and all fail minutes later): CIFAR-100 (not
    for --dataset synthetic), and the backbone: --arch built at --img-size with its weights (--weights
    FILE, or timm's hub weights unless --no-pretrained) read and fitted. A missing piece is one line.
    download=False (run_all.sh --dry-run) fetches and writes nothing: what is not here yet is said, and
    is an error only where there is no network to fetch it later."""
    if args.dataset == "cifar100":
        here = common.load_cifar100(args.data_dir, download)
        print(f"CIFAR-100 is in {args.data_dir}" if here else
              f"CIFAR-100 is not in {args.data_dir} yet: the study downloads it first "
              f"(`python plan.py --data-dir {args.data_dir}` does it now)")
    if not backbone:
        return
    if args.weights:  # a stand-in not made yet: the prefetch makes it (standin_weights says so), a dry run says so
        later = not download and args.weights in common.STANDINS and not os.path.isfile(
            common.standin_path(args.weights, args.data_dir))
        source = f"--weights {args.weights}" + (" (made once: pretraining a tiny ViT, a minute or more on a busy "
                                                "CPU)" if later else "")
    elif args.no_pretrained:
        source, later = "random weights (--no-pretrained)", False
    else:
        hub = plumbing.hub_weights(args.arch, download)
        source, later = f"timm's hub weights ({hub or 'not cached here'})", hub is None
    # weights the study downloads or makes (a stand-in) first are not read now: the model alone is checked
    common.build_model(argparse.Namespace(**{**vars(args), "weights": None, "no_pretrained": True}) if later else args)
    print(f"backbone {args.arch} at {args.img_size} px with {source}: "
          + ("the study fetches or makes them first" if later else "ready"))


# ----------------------------------------------------------------------------- each run's directory, images, state

# The stages run_all.sh runs, by script name. Each states its image passes next to its loop
# (image_passes: images it will push through the ViT, forward+backward and forward only, from its parsed
# flags): an ESTIMATE for sizing a cluster request (run_all.sh --dry-run), not a measurement. It counts a
# run from scratch (cached features and a resumed run cost less). Work on cached features (linear heads,
# ridge statistics, head-only rounds) is not an image pass.
STAGES = {"centralized": centralized, "model_editing": model_editing, "fedavg": fedavg}


def split_sizes(a):
    """(train, val, test) image counts, as load_data splits them."""
    n, test = (50000, 10000) if a.dataset == "cifar100" else (a.synthetic_size,
                                                        max(a.synthetic_size // 5, common.NUM_CLASSES))
    val = round(n * a.val_frac)
    return n - val, val, test


def parse_run(line):
    """'SCRIPT ARG...' (shell-quoted) -> (script name without .py, its parsed flags), from the script's own
    get_args: the run directory and every default are named in exactly one place."""
    import contextlib
    line = line.strip()
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise plumbing.UserError(f"cannot split {line!r}: {e}")
    script = words[0] if words else ""
    name = script[:-3] if script.endswith(".py") else script
    if name not in STAGES:  # by its name alone: run_all.sh runs the project's own (../fedavg.py would not be it)
        raise plumbing.UserError(f"{line!r}: the first word must be one of {', '.join(s + '.py' for s in STAGES)}, "
                                 f"by name alone (run_all.sh runs the project's own scripts)")
    said = io.StringIO()
    try:  # argparse reports a bad flag by printing it and exiting: turn that into one line naming the script
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            args = STAGES[name].get_args(words[1:])
    except SystemExit:
        raise plumbing.UserError(f"{script}: {said.getvalue().strip().partition('error: ')[2] or 'not a run'}")
    if any(c in args.out for c in "\t\n"):
        raise plumbing.UserError(f"{script}: run directory {args.out!r} holds a tab or a newline")
    return name, args


def stage_of(name, args):
    """run_all.sh's stage of a run of script name with these parsed flags (its counts and estimate)."""
    if name != "fedavg":
        return name
    return "fedavg " + ("sparse" if args.sparse else "head" if args.train == "head" else "dense")


def run_state(args):
    """'todo', 'done' (args.out holds a finished run of these flags), or, when it holds a finished run of
    other flags, how it differs ('differs in lr, epochs'): run_all.sh neither counts such a run as done nor
    runs this one over it."""
    if plumbing.read_result_json(args.out) is None:  # none, or empty or truncated: marks nothing finished
        return "todo"
    diff = plumbing.config_differences(args.out, plumbing.run_config(args), args.defaults)
    if diff is None:
        return "has no readable config.json"
    return f"differs in {', '.join(diff)}" if diff else "done"


def describe_run(line):
    """'SCRIPT ARG...' -> (run directory, images forward+backward, images forward only, run_state, the
    run's config as one line of JSON)."""
    name, args = parse_run(line)
    return (args.out, *STAGES[name].image_passes(args, *split_sizes(args)), run_state(args),
            json.dumps(plumbing.run_config(args), sort_keys=True))


# ----------------------------------------------------------------------------- the study's runs, as data

# The study (run_all.sh) is families of runs over a few lists; a family's runs are (script, grid flags).
# run_all.sh, --dry-run, the tests and README.md's grid table all read it from here, so adding a mask rule
# (a common.MaskRule, listed in common.MASK_RULES) or a split name to SPLITS changes the study in this one place.

# The federated splits, by name (splits.split_flags gives fedavg.py's flags: iid, ncN, dirA).
SPLITS = ["iid", "nc1", "nc5", "nc10", "nc50"]

FULL = dict(  # the study's lists and sizes
    central=["--grid", "--compare-schedulers"],  # 3 lr x 3 momentum x 2 wd, then all 5 schedulers
    edit=[], fed=["--k", "100", "--c", "0.1", "--scale-rounds"], mask=[],
    rules=common.MASK_RULES, sparsity=0.9, calib=4,
    edit_sparsities=[0.5, 0.75, 0.9, 0.95, 0.99], edit_calibs=[1, 2, 4, 8],
    splits=SPLITS, js=[4, 8, 16],
    # Sparsity x calibration rounds inside FedAvg at ONE non-IID setting: Nc=10 is heterogeneous, yet
    # FedAvg still learns well there (published results); at Nc=1 it collapses, which would hide any
    # effect of the mask. Nc=5 and Nc=10 also carry the mask-rule comparison.
    rule_splits=["iid", "nc5", "nc10"], ablation_split="nc10",
    fed_sparsities=[0.5, 0.75, 0.9, 0.95, 0.99], fed_calibs=[1, 4, 8],
    # --extensions: every FL algorithm at every setting of its grid (extension_settings: the first N of
    # each grid, None: all), from both starts, dense and sparse, on an IID, an Nc and a Dirichlet split
    extension_splits=["iid", "nc5", "dir0.1"], extension_j=4, extension_settings=None, extension_split_flags={})
QUICK = dict(  # every kind of run of the full study, each as small as it gets (a smoke check)
    FULL, central=["--grid", "--compare-schedulers", "--epochs", "2", "--grid-lr", "0.1,0.01", "--grid-momentum",
                   "0.9", "--grid-wd", "0", "--schedulers", "cosine,constant"],
    edit=["--epochs", "1", "--fisher-batches", "1"],
    fed=["--k", "100", "--c", "0.1", "--scale-rounds", "--rounds", "4", "--eval-every", "2", "--test-every", "2"],
    mask=["--fisher-batches", "1"], rules=["least-sensitive", "random"], calib=2,
    edit_sparsities=[0.5, 0.9], edit_calibs=[1, 2], splits=["iid", "nc5"], js=[4, 8],
    rule_splits=["iid", "nc5"], ablation_split="nc5", fed_sparsities=[0.5, 0.9], fed_calibs=[2],
    # every algorithm, two settings of it, both starts, dense and sparse, on a CPU in minutes; one split, the
    # kind the default study lacks (IID and Nc=5 are in it). Its clients may hold 5 images: at the README's
    # --synthetic-size 2000 no Dir(0.1) draw gave each of 100 clients the default 10 (seeds 0-5 give 5+)
    extension_splits=["dir0.1"], extension_settings=2, extension_split_flags={"dir0.1": ["--min-shard", "5"]})

# The FL algorithms of the extensions group (run_all.sh --extensions): name -> its grid, the fedavg.py flag
# lists of its own hyperparameters to select from on validation accuracy, the first its default guess.
# Each algorithm declares its grid in algorithms.py (algorithms.REGISTRY); the study reads it from there.
ALGORITHMS = {name: [list(flags) for flags in cls.grid] for name, cls in algorithms.REGISTRY.items()}
GROUPS = ["extensions"]  # opt-in groups of families: run_all.sh --NAME adds them to the study


class Family(NamedTuple):
    name: str  # what it is, for the grid table
    stage: str  # run_all.sh's stage: centralized, model_editing, fedavg dense, fedavg sparse, fedavg head
    runs: list  # [(script, grid flags)], in run order
    group: str = None  # None: the default study; else the opt-in group (GROUPS) it belongs to


def families(s):
    """The study's families for the sizes s (FULL or QUICK), in run order within a seed: the assignment's
    core first (centralized, the default editing run, dense and sparse FedAvg at J=4 on every split), so
    that a study stopped after a few hours (a Colab session) already fills the core tables."""
    edit = lambda rule, sparsity, calib: ("model_editing.py", [*s["edit"], "--rule", rule, "--sparsity",
                                                               str(sparsity), "--calib-rounds", str(calib)])
    dense = lambda split, j, *more: ("fedavg.py", [*s["fed"], *splits.split_flags(split), "--j", str(j), *more])
    sparse = lambda split, j, rule, sparsity, calib, *more: dense(
        split, j, "--sparse", "--rule", rule, "--sparsity", str(sparsity), "--calib-rounds", str(calib),
        *s["mask"], *more)
    default = ("least-sensitive", s["sparsity"], s["calib"])
    grid = [(split, j) for split in s["splits"] for j in s["js"]]
    # --extensions: each algorithm's settings (its grid, or the first extension_settings of it) x splits
    ext = [(split, [*s["extension_split_flags"].get(split, []), *flags]) for split in s["extension_splits"]
           for settings in ALGORITHMS.values() for flags in settings[:s["extension_settings"]]]
    fresh = ("--train", "head", "--head", "zero")  # the fresh head: FedAvg itself learns it
    each = lambda xs: "{" + ", ".join(map(str, xs)) + "}"
    labels = lambda names: each(map(splits.split_label, names))
    mask = f"{default[0]}, sparsity {default[1]}, {default[2]} calibration rounds"
    return [
        Family(f"centralized: `{shlex.join(s['central'])}`", "centralized", [("centralized.py", s["central"])]),
        Family(f"editing: the default mask ({mask})", "model_editing", [edit(*default)]),
        Family(f"FedAvg dense, J=4, splits {labels(s['splits'])}", "fedavg dense",
               [dense(split, 4) for split in s["splits"]]),
        Family("FedAvg sparse, the default mask, J=4, every split", "fedavg sparse",
               [sparse(split, 4, *default) for split in s["splits"]]),
        Family(f"editing: the mask rules {each(s['rules'])}", "model_editing",
               [edit(r, *default[1:]) for r in s["rules"]]),
        Family(f"editing: {default[0]} at sparsity {each(s['edit_sparsities'])} x calibration rounds "
               f"{each(s['edit_calibs'])}", "model_editing",
               [edit(default[0], sp, r) for sp in s["edit_sparsities"] for r in s["edit_calibs"]]),
        Family(f"FedAvg dense: every split x J {each(s['js'])}", "fedavg dense", [dense(sp, j) for sp, j in grid]),
        Family("FedAvg sparse, the default mask: every split x J", "fedavg sparse",
               [sparse(sp, j, *default) for sp, j in grid]),
        Family(f"FedAvg sparse: the mask rules x splits {labels(s['rule_splits'])}, J=4", "fedavg sparse",
               [sparse(split, 4, r, *default[1:]) for split in s["rule_splits"] for r in s["rules"]]),
        Family(f"FedAvg sparse: sparsity {each(s['fed_sparsities'])} x calibration rounds {each(s['fed_calibs'])} "
               f"at {splits.split_label(s['ablation_split'])}, J=4", "fedavg sparse",
               [sparse(s["ablation_split"], 4, default[0], sp, r)
                for sp in s["fed_sparsities"] for r in s["fed_calibs"]]),
        Family(f"FedAvg head only from a zero head (`{shlex.join(fresh)}`): every split x J", "fedavg head",
               [dense(sp, j, *fresh) for sp, j in grid]),
        Family(f"extensions: each FL algorithm at each setting of its grid (settings: "
               f"{each(f'{a} {len(settings)}' for a, settings in ALGORITHMS.items())}) x splits "
               f"{labels(s['extension_splits'])}, J={s['extension_j']}, from a zero head (`{shlex.join(fresh)}`)",
               "fedavg head", [dense(split, s["extension_j"], *fresh, *flags) for split, flags in ext],
               group="extensions"),
        Family("extensions: the same, dense from the step-0 head", "fedavg dense",
               [dense(split, s["extension_j"], *flags) for split, flags in ext], group="extensions"),
        Family("extensions: the same, sparse (the default mask)", "fedavg sparse",
               [sparse(split, s["extension_j"], *default, *flags) for split, flags in ext], group="extensions"),
    ]


def study_families(quick=False, groups=()):
    """The families of the full (or quick) study that run: the default ones and those of the opt-in groups
    asked for."""
    return [f for f in families(QUICK if quick else FULL) if f.group is None or f.group in groups]


def new_runs(fams):
    """[(family, [(script, grid flags) it adds])]: one seed's runs in run order, a run that two families
    both name (e.g. least-sensitive at the default sparsity) listed once, under the first."""
    seen, out = set(), []
    for f in fams:
        mine = [(script, flags) for script, flags in f.runs if (script, tuple(flags)) not in seen]
        seen |= {(script, tuple(flags)) for script, flags in mine}
        out.append((f, mine))
    return out


# run_all.sh sets these for every run: a grid file's line may not
RUN_ALL_FLAGS = ("--out", "--seed", "--resume", "--results")


def flag_names(words):
    """The flags among words ('--lr 0.1' and '--lr=0.1' both: --lr). The scripts take no abbreviation."""
    return [w.partition("=")[0] for w in words if w.startswith("--")]


def read_grid(path, results, extra):
    """A student's grid file: one run 'SCRIPT FLAGS' a line (shell-quoted), # comments, blank lines ->
    [(stage, script, grid flags)]. Each line is parsed by its script's own flags, with the results root and
    the flags of every run (extra) added; a bad line, a line that sets a flag of extra (which would
    silently win), or two lines that would share a run directory, is one UserError naming the file and
    the line. Lines end at a line feed only (str.splitlines also breaks at \v, \f, U+2028, ..., which
    would end a comment early and run what follows it)."""
    try:
        with plumbing.open_regular(path, newline="") as f:  # a FIFO would block the read; a \r is no line end
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise plumbing.UserError(f"--grid {path}: cannot read it ({getattr(e, 'strerror', None) or e})")
    runs, dirs, everywhere = [], {}, set(flag_names(extra))
    for n, line in enumerate(lines, 1):
        try:
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if any(c in w for w in words for c in "\t\n\0"):  # bash drops a NUL byte: --data-dir da\0ta would be data
                raise plumbing.UserError("a quoted word holds a tab, a line break or a NUL byte (run_all.sh reads one "
                                         "run a line, tab-separated)")
            taken = [w for w in words[1:] if w.partition("=")[0] in RUN_ALL_FLAGS]
            if taken:
                raise plumbing.UserError(f"{taken[0]} is set by run_all.sh itself (use --seeds and RESULTS=)")
            twice = [f for f in flag_names(words[1:]) if f in everywhere]
            if twice:
                raise plumbing.UserError(f"{twice[0]} is set both on this line and after -- (which would win "
                                         f"silently): set it in one place")
            name, args = parse_run(shlex.join([*words, "--results", results, *extra]))
        except (ValueError, plumbing.UserError) as e:
            raise plumbing.UserError(f"--grid {path}, line {n}: {e}")
        if args.out in dirs:
            raise plumbing.UserError(f"--grid {path}, line {n}: the same run directory as line {dirs[args.out]} "
                                     f"({args.out}); give the two runs flags that their run names tell apart")
        dirs[args.out] = n
        runs.append((stage_of(name, args), f"{name}.py", words[1:]))
    if not runs:
        raise plumbing.UserError(f"--grid {path}: no run in it (one a line, e.g. 'fedavg.py --nc 5 --j 4')")
    return runs


def plan_runs(seeds, results, extra, quick=False, groups=(), grid=None):
    """run_all.sh's study: (its name for run_all.settings, [(stage, script, ARGS, group)]), ARGS shell-quoted
    with what run_all.sh gives every run, group the opt-in group that adds the run ('-': the study itself;
    run_all.sh says what a group adds). Seed by seed, so that a study stopped early has whole seeds to
    summarize. The name leaves out the opt-in groups: their runs only add run directories of their own,
    so a root may gain them later."""
    if grid is not None:
        runs = [(*run, "-") for run in read_grid(grid, results, extra)]
        name = "file: " + "; ".join(shlex.join([script, *flags]) for _, script, flags, _ in runs)
    else:
        runs = [(f.stage, script, flags, f.group or "-") for f, mine in new_runs(study_families(quick, groups))
                for script, flags in mine]
        name = "quick" if quick else "full"
    if any(c in w for w in (results, *extra) for c in "\t\n"):  # run_all.sh reads one run a line, tab-separated
        raise plumbing.UserError("the results root or a flag after -- holds a tab or a newline")
    return name, [(stage, script, shlex.join([*flags, "--results", results, "--seed", str(seed), "--resume",
                                              "--deterministic", *extra]), group)
                  for seed in seeds for stage, script, flags, group in runs]


def grid_table():
    """README.md's grid table: per family its runs per seed (a run listed by an earlier family counted
    there), in the full and the quick study, and the totals; then the opt-in groups, each with the runs
    it adds."""
    full, quick = (new_runs(families(s)) for s in (FULL, QUICK))
    rows = ["| family | stage | runs per seed | --quick |", "|---|---|---|---|"]
    for group in (None, *GROUPS):
        mine = [(f, len(a), len(b)) for (f, a), (_, b) in zip(full, quick) if f.group == group]
        if group is not None and mine:
            rows.append(f"| *with --{group}:* | | | |")
        rows += [f"| {f.name} | {f.stage} | {n} | {q} |" for f, n, q in mine]
        n, q = sum(x[1] for x in mine), sum(x[2] for x in mine)
        if group is None:
            rows.append(f"| **total** | | **{n}** ({3 * n} with 3 seeds) | **{q}** |")
        elif mine:
            rows.append(f"| **--{group} adds** | | **{n}** ({3 * n} with 3 seeds) | **{q}** |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- run_all.sh's estimate of the time

PROBE_SECONDS = 2.5  # timed, per kind of pass (forward+backward, forward only) in each probe process
PROBE_WINDOWS = 5  # timed windows per kind: their median is the speed, their lowest and highest its spread


def runs_per_gpu(sms, memory_gib):
    """run_all.sh's default --per-gpu: one run per 32 streaming multiprocessors, at most 4, and at most one
    per 8 GiB of GPU memory. One ViT-S/16 run at 224 px (batch 64, bf16) keeps an H200 (132 SMs) about 10%
    busy, 2 runs gave 1.78x its images/s, 4 runs 2.35x; a T4 (40 SMs, 15 GiB) is saturated by one."""
    return max(1, min(4, sms // 32, int(memory_gib // 8)))


def images_per_second(step, x, batch, seconds, windows=PROBE_WINDOWS, clock=time.perf_counter):
    """[images/s of each timed window] of step(images) on batches of random images like x:
    - the batch doubles from 1 towards `batch` while the next size's step (at most twice this one's)
      stays within a quarter of `seconds` (on a CPU a step of the full batch may take a minute; its
      images/s is about that of a smaller batch). Judged by the faster of two steps: the first call's
      lazy initialisation, allocations and kernel selection (seconds on a busy CPU, which once stopped
      the batch at 1 and made a quick study look like 3 days) and a busy machine's stalls only ever slow
      a step. On one CPU thread: on a busy machine a step's threads wait for each other at every
      operation, a fixed cost per step that would stop the batch at a few images, whose speed is many
      times below the runs' (the windows below time that wait, at the runs' batch);
    - then, after an untimed step (warm-up at this batch and thread count), each window times whole
      steps for `seconds / windows` (at least one step), until `windows` windows or `seconds` are done,
      3 windows at least: a run's speed is their median, a window stalled by a busy machine part of its
      spread (speed)."""
    def timed(b):
        t = clock()
        step(x[:b])
        if x.is_cuda:
            torch.cuda.synchronize()
        return clock() - t
    b, threads = 1, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        while b < batch and 2 * min(timed(b), timed(b)) <= seconds / 4:
            b = min(batch, 2 * b)
    finally:
        torch.set_num_threads(threads)
    timed(b)  # warm-up at the batch and threads the windows time
    rates, spent = [], 0.0
    while len(rates) < windows and (len(rates) < 3 or spent < seconds):  # 3 windows at least, however slow
        steps, took = 0, 0.0
        while steps == 0 or took < seconds / windows:
            took += timed(b)
            steps += 1
        rates.append(steps * b / max(took, 1e-9))
        spent += took
    return rates


def speed(windows):
    """(median, lowest, highest) images/s of the timed windows [images/s]: the median is the speed a run
    is estimated at (robust to a window that a busy machine stalled), the others its spread."""
    s = sorted(windows)
    mid = len(s) // 2
    return (s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2), s[0], s[-1]


def probe(line):
    """One probe process (run_all.sh's estimate): the ViT of the run 'SCRIPT ARG...' on its device and
    precision, random weights (speed does not depend on them), random images. Prints a JSON line when
    ready (its device), waits for a line on stdin (so that the probes packed on one GPU measure at the
    same time), then prints the images/s of training steps (forward+backward and an optimizer step at the
    run's batch size; a FedAvg client's, fedavg.client_batch) and of forward-only passes (at its evaluation
    batch size), each a list over timed windows (images_per_second); told 'go one-thread-too', on a CPU with
    more threads, also both on one thread ("one_thread"). Writes no file."""
    name, args = parse_run(line)
    batch = fedavg.client_batch(args, split_sizes(args)[0]) if name == "fedavg" else args.batch_size
    device = plumbing.pick_device(args.device, args.deterministic)
    precision = plumbing.resolve_amp(args.amp, device)
    model = common.build_model(argparse.Namespace(**{**vars(args), "weights": None, "no_pretrained": True})).to(device)
    info = {"ready": time.time(), "device": device.type, "precision": precision, "batch": batch,
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    print(json.dumps(info), flush=True)
    one_thread_too = sys.stdin.readline().split() == ["go", "one-thread-too"]
    x = torch.randint(0, 256, (max(batch, args.eval_batch_size), 32, 32, 3), dtype=torch.uint8,
                      device=device)
    y = torch.randint(0, common.NUM_CLASSES, (len(x),), device=device)
    opt, scaler = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9), plumbing.grad_scaler(device, precision)

    def train(xb):
        model.train()
        logits = common.forward_logits(model, common.preprocess(xb, args.img_size), device, precision)
        common.optimizer_step(opt, F.cross_entropy(logits, y[:len(xb)]), scaler)

    @torch.no_grad()
    def forward(xb):
        model.eval()
        common.backbone_features(model, common.preprocess(xb, args.img_size), device, precision)
    measure = lambda: {"fwd_bwd": images_per_second(train, x, batch, PROBE_SECONDS),
                       "fwd": images_per_second(forward, x, args.eval_batch_size, PROBE_SECONDS)}
    try:
        rates = measure()
    except torch.cuda.OutOfMemoryError:
        raise plumbing.UserError(f"out of GPU memory at batch {batch} (evaluation: {args.eval_batch_size})")
    if one_thread_too and device.type == "cpu" and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        rates["one_thread"] = measure()
    print(json.dumps(rates), flush=True)


def probe_answer(p, err, n):
    """The next JSON line of probe process p, or a UserError with the last line it wrote to err."""
    said = p.stdout.readline()
    if not said:
        p.wait()
        err.seek(0)
        said = [s for s in err.read().splitlines() if s.strip()]
        why = said[-1].removeprefix("error: ") if said else f"exit status {p.returncode}"
        raise plumbing.UserError(f"the speed probe ({n} at once) failed: {why}" + ("; lower --per-gpu" if n > 1 else ""))
    return json.loads(said)


PROBES = []  # the probe processes running now, for quiet_on_stop


def run_probes(line, n, threads, one_thread_too=False):
    """Start n probe processes of the run `line` at once (each with `threads` CPU threads unless
    OMP_NUM_THREADS says otherwise, as run_all.sh gives its runs), release them together (asking each to
    measure on one thread too, if one_thread_too); returns (what the first said when ready, [their
    images/s], mean seconds until ready: a run's start-up)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(threads)}
    t0 = time.time()
    errs = [tempfile.TemporaryFile("w+") for _ in range(n)]  # not a pipe: a chatty probe must not block
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--probe"], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err) for err in errs]
    PROBES[:] = procs
    try:
        for p in procs:
            p.stdin.write(line + "\n")
            p.stdin.flush()
        ready = [probe_answer(p, err, n) for p, err in zip(procs, errs)]
        for p in procs:
            p.stdin.write("go one-thread-too\n" if one_thread_too else "go\n")
            p.stdin.flush()
        rates = [probe_answer(p, err, n) for p, err in zip(procs, errs)]
    finally:
        for p, err in zip(procs, errs):
            p.kill()
            p.wait()
            err.close()
        PROBES.clear()
    return ready[0], rates, sum(r["ready"] - t0 for r in ready) / n


def probe_report(seconds, info, per_gpu, fb, f, startup, alone=None):
    """What the probe measured, as lines for run_all.sh (and, on the CPU, that the full study is out of
    reach); fb and f are speed()'s (median, lowest, highest) images/s, alone a probe's own windows."""
    per_s = lambda x: f"{x:.0f}" if x >= 10 else f"{x:.2g}"  # images/s: a CPU may do less than one
    spread = lambda s: f"{per_s(s[0])} ({per_s(s[1])}-{per_s(s[2])})"
    where = (f"{info['name']} ({info['sms']} SMs, {info['memory_gib']:.0f} GiB)" if info["device"] == "cuda"
             else f"the CPU ({info['threads']} thread(s) per run)")
    precision = "fp32" if info["precision"] == "off" else info["precision"]
    said = [f"probe ({seconds:.0f} s): {per_gpu} run(s) at once on {where}, {precision}, batch {info['batch']}: "
            f"{spread(fb)} images/s forward+backward and {spread(f)} forward only, all together (the median "
            f"of its timed windows, their slowest-fastest in brackets); {startup:.1f} s to start a run"
            + (f" (one run alone: {per_s(speed(alone['fwd_bwd'])[0])} and {per_s(speed(alone['fwd'])[0])})"
               if alone else "")]
    if info["device"] == "cpu":
        said.append("no GPU: these runs go to the CPU, where the full study at the default size (ViT-S/16, 224 px) "
                    "takes months or more (see the total below). For a smoke check of the whole pipeline: "
                    "./run_all.sh --quick -- --dataset synthetic --arch test_vit --weights standin-sharp --img-size 32 "
                    "--device cpu; for the study: a GPU, or --slurm on a cluster")
    return said


def packed_speed(rates, kind):
    """(median, lowest, highest) images/s of all probes packed on a GPU together, from each probe's windows
    of this kind of pass (rates: [{kind: [images/s per window]}]): they ran at the same time, so their
    speeds add up."""
    return tuple(sum(x) for x in zip(*(speed(r[kind]) for r in rates)))


def run_times(passes, startup, per_gpu, fb, f):
    """[(seconds, least, most)] each run takes in its slot, for its image passes [(forward+backward,
    forward only)]: start-up plus its images at the packed speeds fb and f ((median, lowest, highest)
    images/s, shared by per_gpu runs) - at the median speed, at the fastest window's and at the slowest's."""
    at = lambda n_fb, n_f, i: startup + per_gpu * (n_fb / fb[i] + n_f / f[i])
    return [(at(n_fb, n_f, 0), at(n_fb, n_f, 2), at(n_fb, n_f, 1)) for n_fb, n_f in passes]


def estimate(lines, gpus, per_gpu):
    """run_all.sh's estimate for the runs 'SCRIPT ARG...' still to do, with `gpus` GPUs (0: the default
    device) and `per_gpu` runs at once on each (None: the default, runs_per_gpu of the device): the probe
    runs on the device and with the model, image size, precision and batch size of the first FedAvg run
    (the client batch), packed as the runs will be. On a CPU with more than one thread per run and no
    OMP_NUM_THREADS set, the probe also measures one thread per run, and the runs get whichever makes the
    study faster (choose_threads). Returns (per_gpu, lines that say what was measured, run_times:
    [(seconds, least, most) each run takes in its slot], the runs' CPU threads or None: as they are)."""
    t0 = time.time()
    described = [parse_run(line) for line in lines]
    line = next((x for x, (name, _) in zip(lines, described) if name == "fedavg"), lines[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = lambda n: max(1, cores // (max(gpus, 1) * n))  # as run_all.sh divides them among its runs
    one_too = not os.environ.get("OMP_NUM_THREADS")  # else the user chose the threads
    alone = None
    if per_gpu is None:  # one probe alone tells the device, and so the default
        alone = run_probes(line, 1, threads(1), one_too)
        info = alone[0]
        per_gpu = runs_per_gpu(info["sms"], info["memory_gib"]) if info["device"] == "cuda" else 1
    info, rates, startup = alone if alone and per_gpu == 1 else run_probes(line, per_gpu, threads(per_gpu), one_too)
    passes = [STAGES[name].image_passes(a, *split_sizes(a)) for name, a in described]
    n, fb, f, costs, why = choose_threads(rates, passes, startup, per_gpu, info["threads"])
    said = probe_report(time.time() - t0, {**info, "threads": n}, per_gpu, fb, f, startup,
                        alone[1][0] if alone and per_gpu > 1 else None)
    return per_gpu, said + why, costs, n if why else None


def choose_threads(rates, passes, startup, per_gpu, threads):
    """(CPU threads per run, fb, f, run_times, [a line saying why]): the probes' `threads`, or one thread where
    the probes measured that too ("one_thread") and the study's estimate is shorter with it. On a busy
    CPU a step's threads wait for each other at every operation: on 2 cores at load 11, 2 threads per run
    made a FedAvg run of the quick study 14 times slower than one thread (docs/speed.md)."""
    fb, f = (packed_speed(rates, k) for k in ("fwd_bwd", "fwd"))
    costs = run_times(passes, startup, per_gpu, fb, f)
    if not all("one_thread" in r for r in rates):
        return threads, fb, f, costs, []
    fb1, f1 = (packed_speed([r["one_thread"] for r in rates], k) for k in ("fwd_bwd", "fwd"))
    costs1 = run_times(passes, startup, per_gpu, fb1, f1)
    ratio = sum(c[0] for c in costs) / sum(c[0] for c in costs1)
    if ratio > 1:
        return 1, fb1, f1, costs1, [f"one thread per run measured faster than {threads} (the study about {ratio:.1f}x "
                                    f"faster: a busy CPU's threads wait for each other): the runs get one "
                                    f"(OMP_NUM_THREADS=1; set OMP_NUM_THREADS to choose)"]
    return threads, fb, f, costs, [f"{threads} threads per run measured faster than one (the study about "
                                   f"{1 / ratio:.1f}x faster): the runs get {threads} (set OMP_NUM_THREADS to choose)"]


# ----------------------------------------------------------------------------- the command line

def quiet_on_stop():
    """run_all.sh stopped (SIGTERM, also from die_with_parent) or gone (a closed pipe): the planner has
    nothing to save, so it ends at once, its probes with it, without a traceback (os._exit: a signal
    that arrives while Python is already exiting must not raise in its atexit callbacks)."""
    def stop(signum, frame):
        for p in PROBES:
            p.kill()
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def tsv_field(value):
    """One field of a tab-separated answer line: a tab or a line break in it (a crafted config.json's key
    in a run's state) would split the line, so they are written as escapes. Backslashes stay as they are:
    a run directory (which holds no tab or line break, parse_run) must reach run_all.sh unchanged."""
    return str(value).replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, None)
    p = plumbing.Parser(description="Download CIFAR-100 and the DINO ViT-S/16 weights for later offline runs; "
                        "with --prefetch, --describe-runs or --estimate, answer run_all.sh.",
                        example="python plan.py --data-dir ./data   # before going offline")
    p.add_argument("--data-dir", type=plumbing.path, default="./data", help="where CIFAR-100 goes")
    p.add_argument("--arch", default=common.DEFAULT_ARCH, help="timm ViT whose hub weights to download")
    p.add_argument("--data-only", action="store_true", help="only CIFAR-100 (you bring --weights FILE)")
    p.add_argument("--prefetch", action="store_true",
                   help="fetch and check what a stage script needs when run with the flags after -- (it "
                        "reads --dataset, --data-dir, --arch, --img-size, --weights, --no-pretrained and ignores "
                        "the rest)")
    p.add_argument("--no-download", action="store_true",
                   help="with --prefetch: only look (run_all.sh --dry-run): say what is not here yet, download "
                        "and write nothing; an error only where there is no network to get it")
    p.add_argument("--describe-runs", action="store_true",
                   help="read lines 'SCRIPT ARG...' (shell-quoted) on stdin and print for each "
                        "'RUN_DIR<tab>IMAGES_FWD_BWD<tab>IMAGES_FWD<tab>STATE<tab>CONFIG': its run directory, an "
                        "estimate of the images it will process with forward+backward and forward-only passes, "
                        "todo/done/what differs from a finished run there, and its config.json as JSON")
    p.add_argument("--estimate", action="store_true",
                   help="read lines 'SCRIPT ARG...' on stdin (the runs to do), measure this machine and print "
                        "'per-gpu<tab>N', 'threads<tab>T' (the runs' CPU threads, when the probe chose them), "
                        "lines 'say<tab>TEXT' and, for each run, 'cost<tab>MS<tab>LEAST<tab>MOST' (its time in its "
                        "slot in milliseconds: the estimate and its spread)")
    p.add_argument("--gpus", type=plumbing.nonneg_int, default=0, help="with --estimate: GPUs used (0: the default device)")
    p.add_argument("--per-gpu", default=None, type=lambda v: None if v == "auto" else plumbing.positive_int(v),
                   help="with --estimate: runs at once on each GPU, or auto (runs_per_gpu of the GPU)")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # one probe process of --estimate
    g = p.add_argument_group("the study (run_all.sh)")
    g.add_argument("--runs", action="store_true",
                   help="print the study's name for run_all.settings (full, quick, or the grid file's runs), "
                        "then one line per run 'STAGE<tab>SCRIPT<tab>ARGS<tab>GROUP' (ARGS shell-quoted, ending in "
                        "--results R --seed S --resume --deterministic and the flags after --; GROUP the opt-in "
                        "group that adds it, or -), seed by seed; with "
                        "--describe-runs, each line goes on with that run's description")
    g.add_argument("--quick", action="store_true", help="with --runs: the quick study")
    g.add_argument("--grid", metavar="FILE", type=plumbing.path, default=None,
                   help="with --runs: the runs of FILE (one 'SCRIPT FLAGS' a line, # comments) instead of the study")
    for group in GROUPS:
        g.add_argument(f"--{group}", action="store_true", help=f"with --runs: add the {group} group of runs")
    g.add_argument("--seeds", type=lambda v: [plumbing.nonneg_int(x) for x in v.split(",")], default=[0],
                   help="with --runs: comma-separated seeds (default: 0)")
    g.add_argument("--results", default="./runs", help="with --runs: the results root (default: ./runs)")
    g.add_argument("--grid-table", action="store_true", help="print README.md's grid table (Markdown)")
    quiet_on_stop()
    a = p.parse_args(own)
    shared = plumbing.base_parser(common.DEFAULT_ARCH)  # the stage scripts' shared flags, for --prefetch
    if a.no_download and not a.prefetch:
        p.error("--no-download goes with --prefetch")
    if flags is not None and not (a.prefetch or a.runs):
        p.error("flags after -- go with --prefetch or --runs")
    study = ["--quick", "--grid", "--seeds", "--results", *(f"--{g}" for g in GROUPS)]
    given = [f for f in study if any(w == f or w.startswith(f + "=") for w in own)]
    if given and not a.runs:
        p.error(f"{given[0]} goes with --runs")
    if a.grid and (a.quick or any(getattr(a, g) for g in GROUPS)):
        p.error("--grid FILE is the whole study: it excludes --quick and the groups")
    if a.prefetch and len(own) > 1 + a.no_download:
        p.error("--prefetch takes the stage scripts' flags after --, not its own")
    if a.runs:  # with --describe-runs, each run's description follows it: run_all.sh's one call
        name, runs = plan_runs(a.seeds, a.results, flags or [], a.quick, [g for g in GROUPS if getattr(a, g)], a.grid)
        if a.describe_runs:
            runs = [(*run, *map(tsv_field, describe_run(f"{run[1]} {run[2]}"))) for run in runs]
        print(name, *("\t".join(run) for run in runs), sep="\n")
    elif a.describe_runs:
        if len(own) > 1:
            p.error("--describe-runs takes no other flag")
        described = ["\t".join(map(tsv_field, describe_run(line))) for line in sys.stdin if line.strip()]
        print(*described, sep="\n") if described else None  # all or nothing: a bad line prints no row
    elif a.estimate:
        lines = [line.strip() for line in sys.stdin if line.strip()]
        if not lines:
            p.error("--estimate: no run on stdin")
        per_gpu, said, costs, threads = estimate(lines, a.gpus, a.per_gpu)
        print(f"per-gpu\t{per_gpu}", *([f"threads\t{threads}"] if threads else []), *(f"say\t{x}" for x in said),
              *("cost\t" + "\t".join(str(round(t * 1000)) for t in c) for c in costs), sep="\n")
    elif a.probe:
        probe(sys.stdin.readline())
    elif a.grid_table:
        print(grid_table())
    elif a.prefetch:
        script_flags = plumbing.Parser(parents=[shared], prog="plan.py --prefetch --", add_help=False)
        prefetch(script_flags.parse_known_args(flags or [])[0], download=not a.no_download)
    else:  # --data-only: the backbone comes from elsewhere (--weights FILE)
        prefetch(plumbing.Parser(parents=[shared]).parse_args(["--data-dir", a.data_dir, "--arch", a.arch]),
                 backbone=not a.data_only)


if __name__ == "__main__":
    plumbing.run_main(main)
