"""Tables and plots of a whole study: every finished run (result.json) under a results root.

    python summarize.py RESULTS_DIR [--target 0.9]      (run_all.sh runs it at the end)

Writes RESULTS_DIR/summary/:
  results.csv  one row per run: what defines it, accuracies, rounds to target, communication
  report.md    every table; each cell is the mean ± sample std over seeds and their number n; links to the
               centralized run's plots; other projects' published CIFAR-100 figures (docs/expected.md)
  tables.tex   the same tables in LaTeX, ready to \\input (needs \\usepackage{booktabs}), never scaled down:
               at 9 or 8 pt, a table wider than the text or longer than a page in parts (tex_table)
  *.png        heatmap, accuracy-vs-round curves, update agreement, editing plots
A run whose result.json (or its mask's editing result.json) is unreadable is left out with one
warning on stderr; a FedAvg run without a readable metrics.csv keeps its table cells but has no
curves and no rounds to target. In a root of run_all.sh (its run_all.plan), only the study's runs with
the planned flags count (any other finished run is left out with a warning) and report.md lists the
planned runs that have no result yet. A summary is all new or all old: written whole into a temporary
folder, then renamed file by file into summary/ (an error or a stop leaves the earlier one).
"""
import argparse
import collections
import contextlib
import csv
import fcntl
import functools
import io
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile

import numpy as np

import algorithms
import centralized
import common
import fedavg
import model_editing
import plumbing
import splits

STAGES = ["centralized", "model_editing", "fedavg"]
SCRIPTS = dict(zip(STAGES, (centralized, model_editing, fedavg)))
SMOOTH = 5  # rounds in the moving average of the agreement / update-norm curves


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- reading and checking runs

# The keys summarize.py reads from each stage's result.json (each script's main writes it) and their types;
# "?" marks a key that may be null or absent (runs written before it existed).
SCHEMA = {
    "all": dict(stage="str", dataset="str", seed="int", seconds="num", precision="str?"),
    "centralized": dict(best="dict", best_epoch="int", val_acc="num", test_acc="num", final_test_acc="num"),
    "model_editing": dict(rule="str?", sparsity="num?", calib_rounds="int?", mask_file="str?", head="str?", score="str?",
                    mask_kept_frac="num", changed_frac="num", head_test_acc="num", val_acc="num",
                    test_acc="num", best_val_acc="num", test_acc_at_best_val="num"),
    "fedavg": dict(k="int", c="num", j="int", rounds="int", warmup_rounds="int?", split="str?", iid="bool?", nc="int?",
                   train="str", sparse="bool", head="str?", score="str?", rule="str?", sparsity="num?",
                   calib_rounds="int?", mask_file="str?", val_acc="num", test_acc="num", best_val_acc="num",
                   test_acc_at_best_val="num?", comm_values_per_client_round="int?", comm_mb_total="num?",
                   algorithm="str?", label_skew="num?"),
    "best": dict(lr="num", momentum="num", wd="num", scheduler="str"),  # centralized "best"
}


def number_ok(v):
    """A number the tables can compute with: not a bool, finite as a float (a bare NaN or Infinity, which
    older runs wrote, or an integer of 400 digits, are not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def type_ok(v, t):
    if t.endswith("?"):
        return v is None or type_ok(v, t[:-1])
    if isinstance(v, bool):  # bool is an int to Python, never to us
        return t == "bool"
    if t in ("int", "num"):
        return number_ok(v) and (t == "num" or isinstance(v, int))
    return isinstance(v, {"str": str, "dict": dict, "bool": bool}[t])


def schema_problem(d, schema, not_finite=None):
    """What is wrong with dict d against schema (the first problem), or None. not_finite: the result's
    "not_finite" (plumbing.write_json): what a null was."""
    for key, t in schema.items():
        if key not in d and not t.endswith("?"):
            return f'no key "{key}"'
        if not type_ok(d.get(key), t):
            was = not_finite.get(key) if isinstance(not_finite, dict) else None
            return f'"{key}" is {json.dumps(d[key])[:40]}{f" (it was {was})" if was else ""}, not {t.rstrip("?")}'
    return None


def read_result(path):
    """(result.json as a dict, None), or (None, what is wrong with it)."""
    try:
        with plumbing.open_regular(path) as f:  # a FIFO would block the read
            r = json.load(f)
    except OSError as e:
        return None, e.strerror or "unreadable"
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
        return None, f"unreadable ({type(e).__name__})"
    if not isinstance(r, dict):
        return None, "not a JSON object"
    if r.get("stage") not in STAGES:
        return None, f'"stage" is not one of {", ".join(STAGES)}'
    problem = (schema_problem(r, SCHEMA["all"], r.get("not_finite")) or
               schema_problem(r, SCHEMA[r["stage"]], r.get("not_finite"))
               or (r["stage"] == "centralized" and schema_problem(r["best"], SCHEMA["best"]))
               or (r["stage"] == "fedavg" and split_problem(r)))
    return (None, problem) if problem else (r, None)


def split_problem(r):
    """Set a FedAvg result's "split" (splits.split_name) when it has none (result.json written before it
    had one: from its iid and nc); what is wrong with it, or None."""
    if r.get("split") is None:
        if not r.get("iid") and r.get("nc") is None:
            return 'no "split", and "nc" is null but not iid'
        r["split"] = splits.split_name(nc=r.get("nc"))
    try:
        splits.canonical(r["split"])  # a non-standard spelling (nc05) would be a second row of one split
    except ValueError as e:
        return f'"split": {e}'
    return None


def mask_of(r):
    """A sparse FedAvg run's mask as (rule, sparsity, calib_rounds, calibrated by): from the editing
    run that wrote mask_file when its result.json is there (the truth about that mask), else from the
    FedAvg run's own result.json (federated calibration: mask_file is null). Raises ValueError when the
    editing run's result.json is there but unreadable. Older result.json files may lack mask_file, rule,
    sparsity and calib_rounds (all optional in SCHEMA): what is not known is None."""
    own = r.get("rule"), r.get("sparsity"), r.get("calib_rounds")
    if not r.get("mask_file"):
        return (*own, "federated")
    path = os.path.join(os.path.dirname(r["mask_file"]), "result.json")
    if not os.path.isfile(path):
        return (*own, "central")
    e, problem = read_result(path)
    if problem or e["stage"] != "model_editing":
        raise ValueError(f"its mask's editing run {path} is {problem or 'not an editing run'}")
    return e["rule"], e["sparsity"], e["calib_rounds"], "central"


def read_metrics(d):
    """A FedAvg run's metrics.csv as {column: [float or None per round]}, or None (with a warning)."""
    path = os.path.join(d, "metrics.csv")
    try:
        with plumbing.open_regular(path, newline="") as f:  # a FIFO would block the read
            rows = list(csv.DictReader(f))
        if not rows or not {"round", "val_acc"} <= set(rows[0]):
            raise ValueError("no rows with round and val_acc")
        m = {k: [None if row.get(k) in (None, "") else float(row[k]) for row in rows]
             for k in ("round", "val_acc", "test_acc", "agreement", "update_norm")}
        if not all(x is not None and math.isfinite(x) for x in m["round"]):
            raise ValueError("a row whose round is not a number")
        return m
    except (OSError, ValueError, csv.Error) as e:
        warn(f"{path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}; this run has no curves and "
             f"no rounds to target")
        return None


def load_runs(root):
    """Every finished, readable run under root: its result.json plus 'dir', 'split', 'mask' and
    (FedAvg) 'metrics', sorted by stage and directory."""
    runs = []
    for d, subdirs, files in os.walk(root):  # links to folders are not followed
        subdirs[:] = sorted(s for s in subdirs if not (d == root and s == "summary"))
        if "result.json" not in files:
            continue
        plumbing.stop_here("reading the runs (the earlier summary is kept)")
        path = os.path.join(d, "result.json")
        r, problem = read_result(path)
        try:
            if r and r["stage"] == "fedavg":
                r.update(mask=mask_of(r) if r["sparse"] else None)
            elif r and r["stage"] == "model_editing":  # a given mask: its own run's settings
                r.update(zip(("rule", "sparsity", "calib_rounds"), mask_of(r)[:3]))
        except ValueError as e:
            problem = str(e)
        config, bad_flag = read_config(d, r["stage"]) if not problem else ({}, None)
        if bad_flag:
            path, problem = os.path.join(d, "config.json"), bad_flag
        if problem:
            warn(f"{path}: {problem}; run left out")
            continue
        r["dir"], r["config"], r["head"] = d, config, across_seeds(r.get("head"))
        if r["stage"] == "fedavg":
            r["metrics"] = read_metrics(d)
            r["algorithm"], r["algorithm_flags"] = algorithm_of(r)
        runs.append(r)
    return sorted(runs, key=lambda r: (STAGES.index(r["stage"]), r["dir"]))


@functools.cache
@functools.cache
def flag_defaults(stage):
    """{flag: default} of the stage script's flags, its parser's (parsed once: do not change it)."""
    return SCRIPTS[stage].get_args([]).defaults


def flag_problem(config, defaults):
    """What is wrong with a config.json's flag values (the first problem), or None: a flag whose default is
    a number must be a finite number, one whose default is a bool a bool (the tables compute with them; a
    string flag's type may turn it into a list, so strings are not checked)."""
    for k, v in config.items():
        d = defaults.get(k)
        if isinstance(d, bool) and not isinstance(v, bool):
            return f'"{k}" is {json.dumps(v)[:40]}, not a bool'
        if isinstance(d, (int, float)) and not isinstance(d, bool) and not number_ok(v):
            return f'"{k}" is {json.dumps(v)[:40]}, not a finite number'
    return None


def read_config(d, stage):
    """(A run's config.json (every flag that defines it, the seed included) as a dict, a flag it lacks (an
    older run's) at its default (plumbing.with_defaults), what is wrong with its values or None); {} if
    unreadable or empty (no run's)."""
    c = plumbing.read_json_object(os.path.join(d, "config.json"))
    if not c:
        return {}, None
    problem = flag_problem(c, flag_defaults(stage))
    return ({}, problem) if problem else (plumbing.with_defaults(c, flag_defaults(stage)), None)


def once_each(runs):
    """The runs without copies: a run directory whose config.json equals an earlier one's (same flags, same
    seed: a copied or moved run) is the same run, counted once, with one warning."""
    seen, out = {}, []
    for r in runs:
        key = json.dumps(r["config"], sort_keys=True) if r["config"] else None
        if key in seen:
            warn(f"{r['dir']} is the same run as {seen[key]} (same flags in config.json, seed included); counted once")
            continue
        if key:
            seen[key] = r["dir"]
        out.append(r)
    return out


def shown_flags(stage):
    """The flags (config.json keys) a stage's tables show or group by already, read off what groups them:
    the seed and a FedAvg run's split, J, setup (Setup) and mask (its rule, sparsity, calibration rounds,
    or file); an editing run's mask and head (SCHEMA's keys that are flags); the centralized tables show the
    chosen hyperparameters, not flags. Any other flag that differs between runs of a stage (epochs, lr, mu,
    augmentation, ...) splits them into separate tables and cells, named in the titles (mark_flags)."""
    flags = set(flag_defaults(stage))
    if stage == "centralized":
        return {"seed"}
    if stage == "model_editing":
        return {"seed", "mask"} | (set(SCHEMA[stage]) & flags)
    return {"seed", "j", "sparse", "mask", *splits.SPLIT_FLAGS, *common.CALIBRATION_FLAGS[:3], *Setup._fields} & flags


def run_flags(r):
    """A run's flags that do something, for mark_flags and results.csv: its config.json without the flags its
    script refuses to take given the others (refused_flags: --lr of a --train head run, --head-lr of a dense
    one, the calibration flags with --mask or without --sparse, ...), and FedAvg's --rounds as given (with
    --scale-rounds config.json holds the rounds run, --rounds × 4 / J: the flag is then the same for every J
    of a study)."""
    c = dict(r["config"])
    if r["stage"] == "fedavg" and c.get("scale_rounds"):
        c["rounds"] = c["rounds"] * c["j"] // 4 if c["rounds"] * c["j"] % 4 == 0 else c["rounds"] * c["j"] / 4
    refused = refused_flags(r["stage"], json.dumps({k: v for k, v in c.items() if k != "seed"}, sort_keys=True)) \
        if c else ()  # the seed refuses nothing: asked once for all seeds
    return {k: v for k, v in c.items() if k not in refused}


@functools.cache
def refused_flags(stage, config):
    """The flags that a run of these flags (config, JSON) would refuse to take at another value: those its
    script's get_args hands to plumbing.refuse_ignored, as doing nothing given the others. Asked of the
    script itself, so no list here can drift from it; () when its flags do not parse today."""
    flags, defaults, refused = json.loads(config), flag_defaults(stage), []
    argv = []
    for k, v in flags.items():
        if k not in defaults or v == defaults[k] or v is None or v is False:  # a default needs no flag
            continue
        opt = "--" + k.replace("_", "-")
        argv += [opt] if v is True else [opt, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    real = plumbing.refuse_ignored
    plumbing.refuse_ignored = lambda p, args, names, why: refused.extend(names)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            SCRIPTS[stage].get_args(argv)
    except (SystemExit, Exception):  # a flag of an older version, a file no longer there
        return ()
    finally:
        plumbing.refuse_ignored = real
    return tuple(refused)


# A seed folder inside a file flag's value: RESULTS/STAGE/NAME/seedN/FILE, the project's layout.
SEED_FOLDER = re.compile(r"(?<![^/])seed\d+(?=/)")


def across_seeds(value):
    """A flag's value with any seed folder in it as seed*: a study that gives each seed its own file
    (--head .../seed1/head.pt, --hparams .../seed1/result.json) ran one setting, averaged over seeds."""
    return SEED_FOLDER.sub("seed*", value) if isinstance(value, str) else value


def mark_flags(runs, shown, flags_of):
    """Set each run's "flags": its (flag, JSON value) pairs, sorted, of the flags outside `shown` that take
    more than one value among these runs. A run with a config.json that does not take a flag (its script
    refuses it given the others: FedAvg's --mu) counts as one more value where another run takes it off its
    default, so FedProx's --mu 0.01 beside FedAvg is named; a run without a config.json counts as none. Runs of different "flags" are never in
    one cell; titles name them (flags_text)."""
    values, flags = {}, [flags_of(r) for r in runs]
    for f in flags:
        for k, v in f.items():
            if k not in shown:
                values.setdefault(k, set()).add(json.dumps(across_seeds(v), sort_keys=True))
    off_default = {k for r, f in zip(runs, flags) for k, v in f.items()
                   if v != flag_defaults(r["stage"]).get(k, v)}
    for f in flags:
        for k in (values.keys() & off_default) - f.keys() if f else ():
            values[k].add(None)  # not taken, beside a run that takes it off its default
    varying = {k for k, vs in values.items() if len(vs) > 1}
    for r in runs:
        r["flags"] = tuple(sorted((k, json.dumps(across_seeds(v), sort_keys=True)) for k, v in flags_of(r).items()
                                  if k in varying))


def flags_text(flags):
    """', epochs 2, lr 0.001': the flags (mark_flags) for a title."""
    return "".join(f", {k} {v}" for k, v in flags)


def flags_note(flags):
    """' (epochs 2, lr 0.001)', or '' without flags."""
    return f" ({flags_text(flags)[2:]})" if flags else ""


def uncalibrated(flags):
    """The flags without the calibration flags: those a dense FedAvg run would have (see run_flags)."""
    return tuple(kv for kv in flags if kv[0] not in common.CALIBRATION_FLAGS)


PLAN = "run_all.plan"  # run_all.sh's runs of the study: lines 'STAGE<tab>RUN DIR under the root<tab>CONFIG (JSON)'


def read_plan(root):
    """run_all.sh's plan of the study under root, {run directory relative to root: (stage, config)} in run
    order; {} without one (a root not made by run_all.sh: every finished run belongs) or when unreadable."""
    path = os.path.join(root, PLAN)
    if not os.path.lexists(path):
        return {}
    plan = {}
    try:
        with plumbing.open_regular(path) as f:
            for line in f:
                stage, rel, config = line.rstrip("\n").split("\t")
                plan[rel] = (stage, json.loads(config))
                if not isinstance(plan[rel][1], dict):
                    raise ValueError("a run's flags that are not a JSON object")
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not three fields, not JSON, not UTF-8
        warn(f"{path}: unreadable ({type(e).__name__}); every finished run is summarized, none marked as not run")
        return {}
    return plan


def planned_runs(runs, plan, root):
    """The runs of the planned study with the planned flags (config.json); every other finished run under
    root is left out with a warning, so that a run of other flags is never mixed into the study's cells."""
    if not plan:
        return runs
    kept, strangers = [], []
    for r in runs:
        rel = os.path.relpath(r["dir"], root)
        diff = plumbing.config_differences(r["dir"], plan[rel][1], flag_defaults(r["stage"])) if rel in plan else None
        if rel not in plan:
            strangers.append(rel)
        elif diff:
            warn(f"{r['dir']} holds a run with other flags than the study's (differs in {', '.join(diff)}); "
                 f"run left out")
        elif diff is None:
            warn(f"{r['dir']} has no readable config.json; run left out")
        else:
            kept.append(r)
    if strangers:
        warn(f"{len(strangers)} finished run(s) under {root} are not in the study that run_all.sh planned "
             f"({PLAN}), e.g. {strangers[0]}; left out")
    return kept


def not_run_doc(plan, runs, root):
    """The planned runs without a result in the tables, per stage: each run name with its seeds."""
    have = {os.path.relpath(r["dir"], root) for r in runs}
    missing = {}  # stage -> {run name: [seeds]}
    for rel, (stage, _) in plan.items():
        if rel not in have:
            name, _, seed = rel.rpartition("/")
            missing.setdefault(stage, {}).setdefault(name, []).append(seed.removeprefix("seed"))
    n = sum(len(seeds) for names in missing.values() for seeds in names.values())
    if not plan or not n:
        return [f"All {len(plan)} runs that run_all.sh planned have finished.", ""] if plan else []
    doc = ["## Not run yet", "", f"{n} of the {len(plan)} runs that run_all.sh planned have no result here "
                                 f"(not finished, or left out: see the warnings); the tables below lack them:", ""]
    for stage, names in missing.items():
        runs_of = [f"{name} (seed{'s' * (len(seeds) > 1)} {', '.join(seeds)})" for name, seeds in names.items()]
        doc.append(f"- {stage} ({sum(map(len, names.values()))}): {', '.join(runs_of)}")
    return doc + [""]


def read_table(path, columns):
    """Rows of a side CSV (grid.csv, schedulers.csv) with the given columns; [] with a warning if bad."""
    if not os.path.lexists(path):
        return []
    try:
        with plumbing.open_regular(path, newline="") as f:  # a FIFO would block the read
            rows = list(csv.DictReader(f))
        for row in rows:
            row.update({c: float(row[c]) if c.endswith("acc") else str(row[c]) for c in columns})
        return rows
    except (OSError, ValueError, TypeError, KeyError, csv.Error) as e:
        warn(f"{path}: malformed ({type(e).__name__}: {e}); left out")
        return []


# ----------------------------------------------------------------------------- derived per-run values

def add_rounds_to_target(runs, frac):
    """Each FedAvg run's target (frac × the centralized validation accuracy of its seed, or of the
    mean over seeds when its seed has none; main_central's runs) and the first round whose val_acc reaches it."""
    central = {}
    for r in main_central([r for r in runs if r["stage"] == "centralized"]):
        central.setdefault(r["seed"], []).append(r["val_acc"])
    every = [v for vs in central.values() for v in vs]
    for r in runs:
        if r["stage"] != "fedavg":
            continue
        base = central.get(r["seed"]) or every
        r["target"] = frac * statistics.mean(base) if base and r["metrics"] else None
        r["rounds_to_target"] = None
        if r["target"] is not None:
            m = r["metrics"]
            r["rounds_to_target"] = next((int(x) for x, v in zip(m["round"], m["val_acc"])
                                          if v is not None and v >= r["target"]), None)


Setup = collections.namedtuple("Setup", "train head k c warmup_rounds score mask flags algorithm")


def setup(r):
    """What defines a FedAvg experiment apart from split, J and seed (flags: mark_flags; the FL algorithm its
    flags make)."""
    return Setup(r["train"], r.get("head"), r["k"], r["c"], r.get("warmup_rounds") or 0,
                 r.get("score") if r["mask"] else None, r["mask"], r["flags"], r["algorithm"])


DEFAULT_ALGORITHM = "FedAvg"  # every algorithm flag at its default


def algorithm_of(r):
    """(name, {flag: value} of its own flags) of a FedAvg run's FL algorithm: result.json's "algorithm" where
    it has one, else its flags read by algorithms.identify (older runs); read from result.json's flags where
    config.json is empty."""
    name, own = algorithms.identify(r["config"] or r)
    return r.get("algorithm") or name, own


def mask_name(mask):
    """'least-sensitive s=0.9 r=4' (what is known of it)."""
    rule, s, n, by = mask
    return " ".join([rule or ("given mask" if by == "central" else "mask of unknown rule")] + ([f"s={s:g}"] if s is not None else []) +
                    ([f"r={n}"] if n is not None else []))


def setup_parts(key):
    """What a setup is, as (what it trains, [where its head came from and the other settings])."""
    train, head, k, c, warm, score, mask, flags, _ = key
    if mask:
        kind = f"sparse, {mask_name(mask)}, {mask[3]} calibration" + (f", {score} score" if score else "")
    else:
        kind = "dense" if train == "all" else "head only (frozen backbone)" if train == "head" else f"train {train}"
    return kind, [f"head {head}", f"K={k}", f"C={c:g}"] + ([f"{warm} head warm-up rounds"] if warm else []) + \
        [f"{f} {v}" for f, v in flags]


def setup_name(key):
    kind, rest = setup_parts(key)
    return f"{kind}; {', '.join(rest)}"


def short_names(keys):
    """({setup: a short row label}, what all of them share, for the title): a label names only what
    differs between the setups of one table (the algorithm too)."""
    parts = {k: [setup_parts(k)[0], k.algorithm] + setup_parts(k)[1] for k in keys}
    shared = [p for p in (next(iter(parts.values()), [])) if all(p in ps for ps in parts.values())]
    shared = shared if len(parts) > 1 else shared[1:]  # one setup: its kind is the label
    return {k: ", ".join(p for p in ps if p not in shared) for k, ps in parts.items()}, ", ".join(shared)


def rule_order(rule):
    return common.MASK_RULES.index(rule) if rule in common.MASK_RULES else len(common.MASK_RULES)


def group(runs, key):
    """{key(r): [runs]} in first-seen order."""
    out = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out


# ----------------------------------------------------------------------------- cells and tables

class Stat:
    """One table cell: values over seeds, shown as mean ± sample std (n=...). With `of` set (rounds to
    target), the values are the runs that reached the target and `of` the runs that had one."""

    def __init__(self, values, scale=100, digits=2, of=None):
        self.values, self.scale, self.digits, self.of = [v for v in values if v is not None], scale, digits, of

    def mean(self):
        return statistics.mean(self.values) if self.values else None

    def std(self):
        """Sample std over seeds; 0 for one seed (an error bar of nothing, as the curves' band)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def mean_text(self):
        """The mean as shown: `digits` decimals; a count (digits 0) whose mean is not whole gets one."""
        m = self.scale * self.mean()
        return f"{m:.{1 if self.digits == 0 and m != int(m) else self.digits}f}"

    def text(self, tex=False, bold=False, n_shown=True):
        """n_shown=False: without "(n=...)" (a table whose cells all have the same n says it once)."""
        if not self.values:
            return (f"{'--' if tex else '–'} (0/{self.of} reached)" if self.of else ("--" if tex else "–"))
        n = f"({len(self.values)}/{self.of} reached)" if self.of is not None else \
            f"(n={len(self.values)})" if n_shown else ""
        s = self.mean_text()
        s = rf"\textbf{{{s}}}" if bold else s
        if len(self.values) > 1:
            s += (r" $\pm$ " if tex else " ± ") + f"{self.scale * statistics.stdev(self.values):.{self.digits}f}"
        return f"{s} {n}".rstrip()


class Table:
    """A titled table of plain cells and Stat cells; best[i] is "max" or "min" for a column whose best
    mean is bold in LaTeX, None for no bold."""

    def __init__(self, title, header, rows, best=None, note=""):
        self.title, self.header, self.rows, self.note = title, header, rows, note
        self.best = best or [None] * len(header)

    def bold(self, i, c):
        """Whether cell c of column i is the column's one best mean as printed (a tie bolds none)."""
        cells = [row[i] for row in self.rows if isinstance(row[i], Stat) and row[i].values]
        if not self.best[i] or len(cells) < 2 or not isinstance(c, Stat) or not c.values:
            return False
        shown = [float(x.mean_text()) for x in cells]
        best = (max if self.best[i] == "max" else min)(shown)
        return shown.count(best) == 1 and float(c.mean_text()) == best


def md_table(t):
    cells = [[c.text() if isinstance(c, Stat) else str(c).replace("|", "\\|") for c in row] for row in t.rows]
    lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
       "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "×": r"$\times$", "±": r"$\pm$",
       "–": "--", "→": r"$\to$", "<": r"\textless{}", ">": r"\textgreater{}", "≥": r"$\geq$", "≤": r"$\leq$",
       "≈": r"$\approx$"}


def tex_escape(s):
    """Text as LaTeX that pdflatex compiles: specials escaped, anything else non-ASCII as '?', and a hyphen
    before a hyphen kept apart (-{}-), or LaTeX prints a flag's -- as a dash."""
    s = str(s)
    return "".join("-{}" if ch == "-" and s[i + 1:i + 2] == "-" else TEX.get(ch, ch if ch.isascii() else "?")
                   for i, ch in enumerate(s))


# tables.tex is never scaled down (a \resizebox shrank a wide table to about 5 pt): a table is set in \small
# (9 pt), or \footnotesize (8 pt, the smallest) where that is too wide; one still wider than the text is cut
# into parts of its columns (each repeating the label columns), and one longer than a page into parts of its
# rows. Widths are estimated for article's 10 pt \textwidth (345 pt), the narrowest usual one.
TEXT_WIDTH_PT = 345
CHAR_PT = {"small": 4.5, "footnotesize": 4.0}  # a character of Computer Modern, digits 0.5 em, on the generous side
COLUMN_PAD_PT = 12  # \tabcolsep on both sides
WRAP_PT = 99.6  # a p{3.5cm} column of long labels
MAX_ROWS = 30  # rows per part: a page with a caption and headers


def tex_label(title, taken):
    """A table's label: its title's words, whole (cut at a word boundary near 60 characters), numbered
    when another table's is the same."""
    words = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    base = "tab:" + (words if len(words) <= 60 else words[:61].rsplit("-", 1)[0])
    label, i = base, 1
    while label in taken:
        i += 1
        label = f"{base}-{i}"
    return label


def tex_header_lines(h, width=12):
    """A column heading's lines of about `width` characters."""
    lines = []
    for word in h.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def tex_header(h):
    """A column heading in lines (tex_header_lines; a one-column tabular), so that long headings do not
    widen a table of short numbers."""
    lines = tex_header_lines(h)
    if len(lines) < 2:
        return tex_escape(h)
    return r"\begin{tabular}[b]{@{}c@{}}" + r" \\ ".join(map(tex_escape, lines)) + r"\end{tabular}"


def tex_table(t, label):
    """A Table as LaTeX table floats at 8 pt at the least: one, or parts of its columns and rows (see
    TEXT_WIDTH_PT), the caption on the first and "(continued)" on the others."""
    stat = [any(isinstance(row[i], Stat) for row in t.rows) for i in range(len(t.header))]
    ns = {len(c.values) for row in t.rows for c in row if isinstance(c, Stat) and c.values and c.of is None}
    one_n = len(ns) == 1  # every cell over the same seeds: n said once, in the caption
    wide = [not x and max((len(str(row[i])) for row in t.rows), default=0) > 24 for i, x in enumerate(stat)]
    spec = ["r" if x else r"p{3.5cm}" if w else "l" for x, w in zip(stat, wide)]  # long labels wrap
    cells = [[c.text(tex=True, bold=t.bold(i, c), n_shown=not one_n) if isinstance(c, Stat) else tex_escape(c)
              for i, c in enumerate(row)] for row in t.rows]
    shown = [[c.text(n_shown=not one_n) if isinstance(c, Stat) else str(c) for c in row] for row in t.rows]
    bold = any(t.bold(i, c) for row in t.rows for i, c in enumerate(row))
    n = min(ns, default=0)
    seeds = f"n={n} seed{'s' * (n > 1)} each" if one_n else "n: seeds"
    caption = f"{tex_escape(t.title)}. {tex_escape(t.note) + ' ' if t.note else ''}Mean $\\pm$ sample std " \
              f"over seeds ({seeds}){'; bold: the one best mean of a column' if bold else ''}."
    size, groups = column_parts(t.header, shown, wide, stat)
    rows = [list(range(i, min(i + MAX_ROWS, len(t.rows)))) for i in range(0, len(t.rows), MAX_ROWS)] or [[]]
    parts = [(cols, rs) for rs in rows for cols in groups]
    out = []
    for k, (cols, rs) in enumerate(parts):
        head = [rf"\caption{{{caption}}}", rf"\label{{{label}}}"] if k == 0 else \
            [rf"\textit{{{tex_escape(t.title)} (continued, part {k + 1} of {len(parts)}).}}\par\smallskip"]
        out += ([""] if k else []) + [r"\begin{table}[htbp]", r"\centering", rf"\{size}", *head,
                                      rf"\begin{{tabular}}{{{''.join(spec[i] for i in cols)}}}",
                                      r"\toprule", " & ".join(tex_header(t.header[i]) for i in cols) + r" \\",
                                      r"\midrule", *(" & ".join(cells[r][i] for i in cols) + r" \\" for r in rs),
                                      r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out)


def column_parts(header, shown, wide, stat):
    r"""(font size, [column indices of each part]): \small where the table fits the text width, else
    \footnotesize, in as few parts as fit; each part repeats the label columns (those before the first
    column of numbers)."""
    def width(i, size):
        chars = max([len(line) for line in tex_header_lines(header[i])] + [len(row[i]) for row in shown])
        return (WRAP_PT if wide[i] else chars * CHAR_PT[size]) + COLUMN_PAD_PT
    n = len(header)
    keys = list(range(next((i for i, x in enumerate(stat) if x), n) or 1))
    for size in ("small", "footnotesize"):
        if sum(width(i, size) for i in range(n)) <= TEXT_WIDTH_PT:
            return size, [list(range(n))]
    groups, used = [[]], sum(width(i, "footnotesize") for i in keys)
    for i in range(len(keys), n):
        w = width(i, "footnotesize")
        if groups[-1] and used + w > TEXT_WIDTH_PT:
            groups.append([])
            used = sum(width(k, "footnotesize") for k in keys)
        groups[-1].append(i)
        used += w
    return "footnotesize", [keys + g for g in groups]


def render(doc):
    """doc: a list of Markdown lines and Tables -> (report.md text, tables.tex text)."""
    md, tex, labels = [], [r"% summarize.py: every table of report.md; needs \usepackage{booktabs}"], set()
    for block in doc:
        if isinstance(block, Table):
            md += [f"### {block.title}", ""] + ([block.note, ""] if block.note else []) + [md_table(block), ""]
            label = tex_label(block.title, labels)
            labels.add(label)
            floats = sum(line.count(r"\end{table}") for line in tex)
            table = tex_table(block, label)
            tex += ["", table]
            if (floats + table.count(r"\end{table}")) // TEX_FLUSH > floats // TEX_FLUSH:
                tex.append(r"\clearpage")
        else:
            md.append(block)
    return "\n".join(md).rstrip() + "\n", "\n".join(tex) + "\n"


# Tables between two \clearpage in tables.tex: LaTeX holds at most 18 unplaced floats, and a study's 100+
# tables in a row stopped pdflatex ("Output loop---100 consecutive dead cycles" after 51 tables, 2026-12-08)
TEX_FLUSH = 10


def acc(runs, key="test_acc"):
    return Stat([r[key] for r in runs])


# ----------------------------------------------------------------------------- centralized and editing

CENTRAL_PLOTS = ["accuracy.png", "loss.png", "grid.png", "schedulers.png"]  # what centralized.py draws per run


def centralized_doc(runs, out_dir):
    doc = ["## Centralized baseline", ""]
    if not runs:
        return doc + ["_No finished centralized run._", ""]
    for flags, rs in group(runs, lambda r: r["flags"]).items():  # runs of other flags: tables of their own
        doc += centralized_tables(rs, flags_note(flags))
        first = min(rs, key=lambda r: r["seed"])  # one seed's plots stand for the others'
        links = [f"[{name[:-4]}]({os.path.relpath(os.path.join(first['dir'], name), out_dir)})"
                 for name in CENTRAL_PLOTS if os.path.isfile(os.path.join(first["dir"], name))]
        if links:
            doc += [f"Plots of the centralized run{flags_note(flags)}, seed {first['seed']}: {', '.join(links)}.", ""]
    return doc


def main_central(central):
    """The centralized runs that the FedAvg tables compare with (baseline, six models, rounds to target):
    those of the flags that most runs share (all of them where they share every flag)."""
    return max(group(central, lambda r: r["flags"]).values(), key=len, default=[])


def centralized_tables(runs, on):
    """The tables of centralized runs of the same flags, named in `on`."""
    doc = []
    chosen = group(runs, lambda r: tuple(r["best"][k] for k in ("lr", "momentum", "wd", "scheduler")))
    doc.append(Table("Centralized linear probe: chosen hyperparameters, accuracy (%) of the best-validation head" + on,
                     ["lr", "momentum", "wd", "scheduler", "best epoch", "val acc", "test acc"],
                     [[f"{lr:g}", f"{m:g}", f"{wd:g}", s, Stat([r["best_epoch"] for r in rs], 1, 0),
                       acc(rs, "val_acc"), acc(rs)] for (lr, m, wd, s), rs in chosen.items()],
                     [None] * 5 + ["max", "max"]))
    for file, cols, title in [("grid.csv", ["lr", "momentum", "wd", "scheduler"],
                               "Grid search (centralized): validation accuracy (%), best epoch with early stopping"),
                              ("schedulers.csv", ["scheduler"],
                               "Learning-rate schedulers (centralized): validation accuracy (%) at the chosen "
                               "hyperparameters")]:
        rows = group([row for r in runs for row in read_table(os.path.join(r["dir"], file), cols + ["best_val_acc"])],
                     lambda row: tuple(row[c] for c in cols))
        rows = sorted(rows.items(), key=lambda kv: -statistics.mean(row["best_val_acc"] for row in kv[1]))
        if rows:
            doc.append(Table(title + on, cols + ["val acc"], [[*key, Stat([g["best_val_acc"] for g in rs])]
                                                         for key, rs in rows], [None] * len(cols) + ["max"]))
    return doc


def editing_doc(runs, out_dir):
    doc, plots = ["## Model editing", ""], []
    if not runs:
        return doc + ["_No finished editing run._", ""], plots
    doc += ["Test accuracy (%) after sparse fine-tuning (last epoch).", ""]
    heads = group(runs, lambda r: (r.get("head"), r.get("score"), r["flags"]))
    for i, ((head, score, flags), hr) in enumerate(heads.items()):  # plots: the first head only
        on = f"head {head}, {score} score" + flags_text(flags)
        warm = {r["seed"]: r["head_test_acc"] for r in hr}  # one warm-up per seed, shared by its runs
        doc += [f"Before editing ({on}: the step-0 head on the pre-trained backbone): "
                f"{Stat(warm.values()).text()}.", ""]
        least = group([r for r in hr if r["rule"] == "least-sensitive"], lambda r: (r["sparsity"], r["calib_rounds"]))
        sparsities, rounds = sorted({s for s, _ in least}), sorted({n for _, n in least})
        if least:
            doc.append(sparsity_table(f"Sparsity × calibration rounds in model editing (least-sensitive mask; {on})",
                                      least))
        if len(sparsities) > 1 and i == 0:
            path = os.path.join(out_dir, "editing_sparsity.png")
            cells = {n: [acc(least[(s, n)]) for s in sparsities if (s, n) in least] for n in rounds}
            plumbing.plot_lines(path, {f"{n} calibration round{'s' * (n != 1)}":
                                       ([s for s in sparsities if (s, n) in least], [100 * c.mean() for c in cells[n]],
                                        [100 * c.std() for c in cells[n]]) for n in rounds},
                                "sparsity (fraction of backbone weights frozen)", "test accuracy (%)",
                                "Model editing: sparsity × calibration rounds\n(mean over seeds ± std)",
                                integer_x=False, ymax=100)
            plots.append(path)
        labels, values = [], []
        settings = group(hr, lambda r: (r["sparsity"], r["calib_rounds"]))
        for (s, n), rs in settings.items():  # mask rules: every setting more than one rule ran at
            rules = group(sorted(rs, key=lambda r: rule_order(r["rule"])), lambda r: r["rule"])
            if len(rules) < 2:
                continue
            doc.append(Table(f"Mask rules in model editing at sparsity {s:g}, "
                             f"{n} calibration round{'s' * (n != 1)} ({on})",
                             ["rule", "test acc (%)", "best val acc (%)", "kept (%)", "changed (%)"],
                             [[rule, acc(x), acc(x, "best_val_acc"), acc(x, "mask_kept_frac"), acc(x, "changed_frac")]
                              for rule, x in rules.items()], [None, "max", "max", None, None]))
            labels += [rule + (f" (s={s:g}, r={n})" if len(settings) > 1 else "") for rule in rules]
            values += [acc(x) for x in rules.values()]
        if labels and i == 0:
            path = os.path.join(out_dir, "editing_rules.png")
            plumbing.plot_bars(path, labels, [100 * v.mean() for v in values], "test accuracy (%)",
                               f"Model editing: mask rules ({on})\nmean over seeds ± std",
                               [100 * v.std() for v in values], zoom=True, ymax=100)
            plots.append(path)
    return doc, plots


# ----------------------------------------------------------------------------- FedAvg tables

def fedavg_doc(runs, central, editing, frac):
    """The FedAvg tables."""
    doc = ["## FedAvg", ""]
    if not runs:
        return doc + ["_No finished FedAvg run._", ""]
    doc += ["Test accuracy (%) of the final global model. Splits: IID, Nc classes per client, or Dir(α) (each "
            "class spread over the clients in proportions drawn from Dirichlet(α)). Dense and sparse runs are "
            "compared only with the same head source (named in each title).", ""]
    if central:
        base = main_central(central)
        doc += [f"Centralized baseline for reference: {acc(base).text()}{flags_note(base[0]['flags'])}.", ""]
    covered = set()
    doc += rules_tables(runs, covered) + sparsity_tables(runs, covered)
    for key, rs in group(runs, setup).items():
        js = sorted({r["j"] for r in rs})
        if len(js) == 1 and key in covered:  # already in a table above
            continue
        split_names = sorted({r["split"] for r in rs}, key=splits.split_order)
        cells = group(rs, lambda r: (r["split"], r["j"]))
        rounds = {j: "/".join(str(n) for n in sorted({r["rounds"] for r in rs if r["j"] == j})) for j in js}
        skew = [SKEW] if any(r.get("label_skew") is not None for r in rs) else []
        doc.append(Table(f"{key.algorithm}, {setup_name(key)}: test accuracy (%)",
                         ["split"] + [f"J={j} ({rounds[j]} rounds)" for j in js] + skew,
                         [[splits.split_label(s)] + [acc(cells.get((s, j), [])) for j in js] +
                          [skew_stat([r for r in rs if r["split"] == s])] * len(skew) for s in split_names],
                         [None] + ["max"] * len(js) + [None] * len(skew)))
    doc += algorithm_tables(runs)
    doc += six_models_tables(runs, central, editing)
    doc.append(cost_table(runs, frac))
    return doc


SKEW = "label skew"  # the column of result.json's label_skew: mean over clients of the TV distance to the global labels


def skew_stat(runs):
    """The label skew of a split's runs (one per seed: the shards are the seed's), mean ± std, 3 decimals."""
    return Stat([r.get("label_skew") for r in runs], 1, 3)


# ----------------------------------------------------------------------------- the algorithms compared

def comparison_base(r):
    """What an algorithm comparison holds fixed: the setup without its flags and algorithm, the split, J."""
    return setup(r)._replace(flags=(), algorithm=""), r["split"], r["j"]


def selected_settings(runs):
    """{(comparison_base, algorithm): (the runs of the setting picked, [every setting's runs])}: for each
    algorithm in each comparison, its setting (its runs' flags) of the best mean final validation accuracy
    over seeds; a tie goes to the setting with the fewest flags off their defaults."""
    out = {}
    for (base, algo), rs in group(runs, lambda r: (comparison_base(r), r["algorithm"])).items():
        settings = list(group(rs, lambda r: r["flags"]).values())
        best = min(settings, key=lambda x: (-statistics.mean(r["val_acc"] for r in x), off_default(x[0]["flags"])))
        out[base, algo] = best, settings
    return out


def setting_text(picked, settings):
    """The picked setting in words: the algorithm's own flags off their defaults or differing among the
    settings tried, then any other flag its settings differ in."""
    at_default = algorithms.defaults()
    own = {k: v for k, v in picked[0]["algorithm_flags"].items()
           if v != at_default.get(k) or len({x[0]["algorithm_flags"].get(k) for x in settings}) > 1}
    varying = {k for x in settings for k, v in x[0]["flags"] if len({dict(y[0]["flags"]).get(k) for y in settings}) > 1}
    words = [f"{k} {plumbing.name_value(v)}" for k, v in own.items()] + \
        [f"{k} {v}" for k, v in picked[0]["flags"] if k in varying and k not in own]
    return ", ".join(words) or "–"


def gap_text(runs, ref):
    """Test accuracy of `runs` minus that of the FedAvg runs `ref`, paired by seed (a seed's runs share its
    shards): mean ± std of the per-seed differences in points, '≈' where |mean| ≤ std (within the seeds'
    spread); over one common seed the spread is unknown."""
    a, b = ({r["seed"]: r["test_acc"] for r in x} for x in (runs, ref))
    d = [100 * (a[s] - b[s]) for s in sorted(set(a) & set(b))]
    if not d:
        return "no common seed"
    if len(d) == 1:
        return f"{d[0]:+.2f} (n=1, spread unknown)"
    m, sd = statistics.mean(d), statistics.stdev(d)
    return f"{m:+.2f} ± {sd:.2f} (n={len(d)})" + (" ≈" if abs(m) <= sd else "")


def algorithm_tables(runs):
    """For each comparison (comparison_base: same start head, what trains, mask, K, C; per J) that holds
    more than one algorithm: each algorithm at its selected setting (selected_settings) per split, test
    accuracy beside FedAvg's."""
    picks, out = selected_settings(runs), []
    for (key, j), cells in group(picks.items(), lambda kv: (kv[0][0][0], kv[0][0][2])).items():
        algos = sorted({algo for (_, algo), _ in cells}, key=lambda a: (a != DEFAULT_ALGORITHM, a))
        if len(algos) < 2:
            continue
        cells = dict(cells)
        rows = []
        for split in sorted({base[1] for base, _ in cells}, key=splits.split_order):
            base = (key, split, j)
            ref = cells.get((base, DEFAULT_ALGORITHM), (None,))[0]
            for algo in algos:
                if (base, algo) not in cells:
                    continue
                picked, settings = cells[base, algo]
                rows.append([splits.split_label(split), algo, setting_text(picked, settings), len(settings),
                             acc(picked, "val_acc"), acc(picked),
                             "–" if algo == DEFAULT_ALGORITHM else gap_text(picked, ref) if ref else "no FedAvg run"])
        start = "fresh head" if key.head in common.FRESH_HEADS else "step-0 head"
        kind, rest = setup_parts(key)
        out.append(Table(f"Algorithms at their selected settings, {kind}, from the {start} ({', '.join(rest)}), "
                         f"J={j}: test accuracy (%)",
                         ["split", "algorithm", "selected setting", "settings tried", "val acc (%)", "test acc (%)",
                          "vs FedAvg (points)"], rows, [None] * 5 + ["max", None],
                         "Each algorithm's setting is picked on the mean final validation accuracy over seeds among "
                         "the settings it ran (a tie: the fewest flags off their defaults); test accuracy is then "
                         "reported at that setting. vs FedAvg: test accuracy minus FedAvg's at its own selected "
                         "setting, per seed (a seed's runs share its shards), mean ± std over the common seeds; "
                         "≈ marks a gap within the seeds' spread (|mean| ≤ std of the per-seed differences)."))
    return out


def rules_tables(runs, covered):
    """Mask rules inside sparse FedAvg: rule × split at each J, with the dense runs of the same head."""
    out = []
    sparse = group([r for r in runs if r["mask"] and None not in r["mask"]],
                   lambda r: (setup(r)._replace(mask=None), r["mask"][1:], r["j"]))
    for (base, (s, n, by), j), rs in sparse.items():
        rules = group(sorted(rs, key=lambda r: rule_order(r["mask"][0])), lambda r: r["mask"][0])
        if len(rules) < 2:
            continue
        covered.update(setup(r) for r in rs)
        dense = [r for r in runs if not r["mask"] and setup(r)[:5] == base[:5] and r["flags"] == uncalibrated(base.flags)
                 and r["j"] == j]
        split_names = sorted({r["split"] for r in rs}, key=splits.split_order)
        rows = [[rule] + [acc([r for r in x if r["split"] == sp]) for sp in split_names] for rule, x in rules.items()]
        if dense:
            rows.append(["dense (no mask)"] + [acc([r for r in dense if r["split"] == sp]) for sp in split_names])
        out.append(Table(f"Mask rules inside sparse FedAvg at sparsity {s:g}, {n} calibration rounds ({by}, "
                         f"{base.score} score), J={j}; head {base.head}, K={base.k}, C={base.c:g}"
                         f"{flags_text(base.flags)}: test accuracy (%)",
                         ["rule"] + [splits.split_label(sp) for sp in split_names], rows, [None] + ["max"] * len(split_names)))
    return out


def sparsity_tables(runs, covered):
    """Sparsity × calibration rounds inside sparse FedAvg, at each non-IID split and J that has several."""
    out = []
    sparse = group([r for r in runs if r["mask"] and None not in r["mask"] and r["split"] != "iid"],
                   lambda r: (setup(r)._replace(mask=None), r["mask"][0], r["mask"][3], r["split"], r["j"]))
    for (base, rule, by, split, j), rs in sparse.items():
        cells = group(rs, lambda r: r["mask"][1:3])
        if len(cells) < 2:
            continue
        covered.update(setup(r) for r in rs)
        out.append(sparsity_table(f"Sparsity × calibration rounds inside sparse FedAvg ({rule}, {by} calibration, "
                                  f"{base.score} score) at {splits.split_label(split)}, J={j}; head {base.head}, K={base.k}, C={base.c:g}"
                                  f"{flags_text(base.flags)}",
                                  cells))
    return out


def sparsity_table(title, cells):
    """Test accuracy over sparsity (rows) × calibration rounds (columns); cells: {(sparsity, rounds): runs}."""
    sparsities, rounds = sorted({s for s, _ in cells}), sorted({n for _, n in cells})
    return Table(title + ": test accuracy (%)", ["sparsity"] + [f"{n} round{'s' * (n != 1)}" for n in rounds],
                 [[f"{s:g}"] + [acc(cells.get((s, n), [])) for n in rounds] for s in sparsities],
                 [None] + ["max"] * len(rounds), "Rows: fraction of backbone weights frozen.")


def main_setups(runs, head):
    """The dense (train all) and sparse setups of one head with the most (split, J) cells: the ones the
    six-models table, the heatmap and the agreement plot use."""
    def best(rs):  # most cells, most runs; where setups tie, FedAvg, then the fewest flags off their defaults
        cells = group(rs, setup)
        ranked = sorted(cells, key=lambda k: (-len({(r["split"], r["j"]) for r in cells[k]}), -len(cells[k]),
                                              k.algorithm != DEFAULT_ALGORITHM, off_default(k.flags), setup_name(k)))
        return ranked[0] if ranked else None
    mine = [r for r in runs if r.get("head") == head]
    dense = best([r for r in mine if not r["mask"] and r["train"] == "all"])
    sparse = [r for r in mine if r["mask"] and r["mask"][0] in ("least-sensitive", None)] or \
             [r for r in mine if r["mask"]]
    if dense:  # of the dense setup's flags where some are
        sparse = [r for r in sparse if uncalibrated(r["flags"]) == dense.flags] or sparse
    return dense, best(sparse)


def off_default(flags):
    """How many of a setup's flags (mark_flags) are off their defaults."""
    return sum(json.loads(v) != flag_defaults("fedavg").get(k) for k, v in flags)


def six_models_tables(runs, central, editing):
    """Centralized / FedAvg IID / FedAvg non-IID, each without and with task arithmetic (sparse fine-tuning)."""
    out = []
    for head in group(runs, lambda r: r.get("head")):
        dense, sparse = main_setups(runs, head)
        js = sorted({r["j"] for r in runs if setup(r) in (dense, sparse)})
        if not js:  # only head-only runs
            continue
        j = 4 if 4 in js else js[0]
        mask = sparse.mask if sparse else None
        edits = group([r for r in editing if r.get("head") == head and r["rule"] == "least-sensitive"],
                      lambda r: (r["rule"], r["sparsity"], r["calib_rounds"], r["flags"]))
        prefer = [k for k in edits if mask and k[:3] == mask[:3]] or [k for k in edits if k[:3] == ("least-sensitive", 0.9, 4)] \
            or list(edits)  # the mask sparse FedAvg used, else the default one, else the most seeds
        edit = max(prefer, key=lambda k: len(edits[k]), default=None)
        probe = probe_of(head, central)
        start = step0_head(head, editing, runs)
        fed = [r for r in runs if setup(r) in (dense, sparse) and r["j"] == j]
        split_names = sorted({r["split"] for r in fed}, key=splits.split_order)
        rows = [[f"step-0 head alone", start, "–"], ["Centralized", acc(probe) if probe else start,
                                                        acc(edits.get(edit, []))]]
        rows += [[f"FedAvg {splits.split_label(s)}", acc([r for r in fed if r["split"] == s and setup(r) == dense]),
                  acc([r for r in fed if r["split"] == s and setup(r) == sparse])] for s in split_names]
        what = lambda m, flags: (mask_name(m) if m else "–") + flags_text(flags)
        out.append(Table(f"The six models (head {head}): test accuracy (%) without and with task arithmetic, "
                         f"each pair from this head",
                         ["model", "without task arithmetic", "with task arithmetic"], rows, [None, "max", "max"],
                         f"Step-0 head alone: the head every run of the table starts from, on the pre-trained "
                         f"backbone, before any training. Without: centralized, "
                         + (f"the centralized linear probe that saved this head{flags_note(probe[0]['flags'])}"
                            if probe else "the step-0 head itself (fitted centrally)")
                         + f"; FedAvg rows, {'the dense setup ' + algorithm_setup(dense) if dense else 'none'}. With: "
                         f"sparse fine-tuning from the same head, centralized model editing "
                         f"({what(edit and (*edit[:3], 'central'), edit[3] if edit else ())}) and for the FedAvg "
                         f"rows {'the sparse setup ' + algorithm_setup(sparse) if sparse else 'none'}. FedAvg rows "
                         f"at J={j}; where setups have as many runs, the default algorithm ({DEFAULT_ALGORITHM})."))
    return out


def algorithm_setup(key):
    """'FedAvg, dense; head ridge, K=100, C=0.1, lr 0.001': the setup a row of the six models is."""
    return f"{key.algorithm}, {setup_name(key)}"


def probe_of(head, central):
    """The centralized runs whose head.pt is `head` (a FILE head, seed folders as seed*), or []."""
    tail = lambda d: across_seeds("/".join(d.split(os.sep)[-3:]) + "/head.pt")
    return [r for r in central if isinstance(head, str) and head.endswith(tail(r["dir"]))]


def step0_head(head, editing, fedruns):
    """The test accuracy of the step-0 head over seeds: the editing runs' (head_test_acc, one per seed),
    else the FedAvg runs' round 0 (one per seed: the same head in every split of a seed)."""
    per_seed = {r["seed"]: r["head_test_acc"] for r in editing if r.get("head") == head}
    if not per_seed:
        per_seed = {r["seed"]: round0(r, "test_acc") for r in fedruns if r.get("head") == head
                    and round0(r, "test_acc") is not None}
    return Stat(per_seed.values())


def round0(r, col):
    """A FedAvg run's round-0 value of a metrics.csv column (the step-0 head, before any round), or None."""
    m = r["metrics"]
    return next((v for x, v in zip(m["round"], m[col]) if x == 0), None) if m else None


def best_round(r):
    """The first round of a run's best validation accuracy (metrics.csv, else result.json), or None."""
    m = r["metrics"]
    done = [(v, -x) for x, v in zip(m["round"], m["val_acc"]) if v is not None] if m else []
    return int(-max(done)[1]) if done else r.get("best_round")


def starts_below(r):
    """Whether a run's step-0 head is below its target (unknown round 0: counted as below)."""
    v = round0(r, "val_acc")
    return r["target"] is not None and (v is None or v < r["target"])


def cost_table(runs, frac):
    """What reaching an accuracy costs, with no column constant by construction: rounds to target only for
    runs whose head starts below it (a solved head reaches it at round 0); for every run the gain over its
    round-0 head and the round of its best validation accuracy; the upload."""
    names, shared = short_names(list(group(runs, setup)))
    rows = []
    for key, rs in sorted(group(runs, setup).items(), key=lambda kv: (kv[0].mask is not None, names[kv[0]])):
        for (split, j), x in sorted(group(rs, lambda r: (r["split"], r["j"])).items(),
                                    key=lambda kv: (splits.split_order(kv[0][0]), kv[0][1])):
            below = [r for r in x if starts_below(r)]
            rows.append([names[key], splits.split_label(split), j, "/".join(str(n) for n in sorted({r["rounds"] for r in x})),
                         acc(x), Stat([round0(r, "test_acc") for r in x]),
                         Stat([r["rounds_to_target"] for r in below], 1, 0, of=len(below)),
                         Stat([r["test_acc"] - round0(r, "test_acc") for r in x if round0(r, "test_acc") is not None]),
                         Stat([best_round(r) for r in x], 1, 0),
                         Stat([r.get("comm_values_per_client_round") for r in x], 1e-6, 3),
                         Stat([r.get("comm_mb_total") for r in x], 1, 1)])
    header = ["run", "split", "J", "rounds", "test acc (%)", "round-0 test acc (%)", "rounds to target",
              "gain over round 0 (points)", "best round", "M values / client / round", "MB uploaded / run"]
    best = [None] * 4 + ["max", None, "min", "max", None, None, None]
    note = (f"Round 0: the step-0 head, before any round. Rounds to target: for the runs whose round-0 validation "
            f"accuracy is below the target ({frac:g} × the centralized validation accuracy of the seed), the first "
            f"round (head warm-up rounds included) that reaches it; validation runs every --eval-every rounds. "
            f"Gain: final minus round-0 test accuracy. Best round: the round of the best validation accuracy "
            f"(mean over seeds). Communication: values one client uploads per round (sparse: masked-in entries "
            f"only) and the run's total at 4 bytes each.")
    if not any(isinstance(row[6], Stat) and row[6].of for row in rows):  # every head starts at the target
        header, best, rows = header[:6] + header[7:], best[:6] + best[7:], [row[:6] + row[7:] for row in rows]
        note += " No run starts below the target (its head already reaches it at round 0, or no centralized " \
                "run sets one): rounds to target is left out."
    return Table(f"FedAvg cost: rounds to {frac:g} × the centralized validation accuracy, gain over the step-0 head, "
                 f"communication" + (f" ({shared})" if shared else ""), header, rows, best, note)


# ----------------------------------------------------------------------------- plots

def curve(runs, col):
    """(rounds, mean, sample std) of a metrics.csv column over runs, at the rounds every run has a value at."""
    per = [{x: y for x, y in zip(r["metrics"]["round"], r["metrics"][col]) if y is not None}
           for r in runs if r["metrics"]]
    if not per:
        return np.array([]), np.array([]), np.array([])
    xs = sorted(set.intersection(*map(set, per)))
    ys = np.array([[p[x] for x in xs] for p in per]).reshape(len(per), len(xs))
    return np.array(xs), ys.mean(0), ys.std(0, ddof=1) if len(per) > 1 else np.zeros(len(xs))


def plot_curves(path, by_split, title):
    fig, ax = plumbing.pyplot().subplots(figsize=(7, 4))
    sparse, lowest, highest = False, 100.0, 0.0
    for i, (split, rs) in enumerate(by_split.items()):
        xs, mean, std = curve(rs, "val_acc")
        lo, hi = np.clip(100 * (mean - std), 0, None), np.clip(100 * (mean + std), None, 100)  # within 0-100%
        style = dict(marker=plumbing.MARKERS[i % len(plumbing.MARKERS)], fillstyle="none",
                     markersize=plumbing.marker_size(i), label=f"{splits.split_label(split)} (n={len(rs)})")
        lowest, highest = min([lowest, *lo]), max([highest, *hi])
        if plumbing.sparse_points(list(xs)):  # validated every few rounds: the points measured, no line between
            sparse = True
            ax.errorbar(xs, 100 * mean, yerr=[100 * mean - lo, hi - 100 * mean], linestyle="none", capsize=3, **style)
        elif len(xs):
            ax.plot(xs, 100 * mean, linestyle=plumbing.LINESTYLES[i % len(plumbing.LINESTYLES)],
                    markevery=max(1, len(xs) // 20), **style)
            ax.fill_between(xs, lo, hi, alpha=0.2)
    ax.set(xlabel="round (0 = the head, before any round)", ylabel="validation accuracy (%)")
    plumbing.integer_ticks(ax.xaxis)
    percent_axis(ax, [lowest, highest])
    ax.set_title(title + "\n" + ("markers: mean over seeds where validated, bars: ± std" if sparse else
                                 "line: mean over seeds, band: ± std"), fontsize=8)
    ax.grid(alpha=0.3)
    if ax.lines:  # beside the axes: a curve that climbs to 100% never runs under it
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    plumbing.save_figure(fig, path)


def luminance(rgb):
    """Relative luminance of an sRGB colour (WCAG 2)."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a, b):
    """WCAG contrast ratio of two colours (1 to 21)."""
    la, lb = sorted((luminance(a), luminance(b)))
    return (lb + 0.05) / (la + 0.05)


def text_color(background):
    """Black or white, whichever reads better on `background` (at least 4.5:1 on any colour)."""
    return "k" if contrast(background, (0, 0, 0)) >= contrast(background, (1, 1, 1)) else "w"


def plot_heatmap(path, dense, sparse, title):
    """Final test accuracy over split × J, dense and sparse side by side on one color scale."""
    split_names = sorted({r["split"] for r in dense + sparse}, key=splits.split_order)
    js = sorted({r["j"] for r in dense + sparse})
    means = [[[acc([r for r in rs if r["split"] == s and r["j"] == j]).mean() for j in js] for s in split_names]
             for rs in (dense, sparse)]
    grids = [100 * np.array(m, dtype=float) for m in means]  # None (no run) -> nan
    lo, hi = np.nanmin(grids), np.nanmax(grids)
    if hi - lo < 1:  # equal cells: one point around them, not a colour scale of nothing
        lo, hi = (lo + hi) / 2 - 0.5, (lo + hi) / 2 + 0.5
        lo, hi = lo - max(hi - 100, 0) + max(-lo, 0), min(hi, 100) + max(-lo, 0)  # within 0-100%
    plt = plumbing.pyplot()
    cmap, norm = plt.get_cmap("viridis"), plt.Normalize(lo, hi)
    fig, axes = plumbing.pyplot().subplots(1, 2, figsize=(3 + 2.4 * len(js), 1.4 + 0.6 * len(split_names)),
                                           squeeze=False, layout="constrained")
    for ax, g, name in zip(axes[0], grids, ("dense", "sparse")):
        im = ax.imshow(g, norm=norm, cmap=cmap, aspect="auto")
        ax.set(xticks=range(len(js)), xticklabels=[f"J={j}" for j in js], yticks=range(len(split_names)),
               yticklabels=[splits.split_label(s) for s in split_names], title=name)
        for (i, k), v in np.ndenumerate(g):
            if not math.isnan(v):
                ax.text(k, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=text_color(cmap(norm(v))))
    fig.colorbar(im, ax=axes[0].tolist(), label="test accuracy (%)")
    fig.suptitle(wrap(title, fig), fontsize=9)
    plumbing.save_figure(fig, path)


def smooth(xs, ys):
    """Moving average over SMOOTH rounds (the curves are noisy round to round); as is when shorter."""
    if len(ys) < SMOOTH:
        return xs, ys
    return xs[SMOOTH - 1:], np.convolve(ys, np.ones(SMOOTH) / SMOOTH, mode="valid")


def plot_agreement(path, dense, sparse, title):
    """Update agreement and update norm per round, one line per (split, dense/sparse), mean over seeds:
    a split's hue, dark and solid with circles for dense, light and dashed with squares for sparse; the
    legend beside the panels; on agreement, 1/n: what n orthogonal client updates of equal norm give."""
    plt = plumbing.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    split_names = sorted({r["split"] for r in dense + sparse}, key=splits.split_order)
    smoothed = set()  # whether curves were smoothed (True) or drawn per round (False)
    for kind, rs, style, shade, mark in (("dense", dense, "-", 0, "o"), ("sparse", sparse, "--", 1, "s")):
        for split, x in sorted(group(rs, lambda r: r["split"]).items(), key=lambda kv: splits.split_order(kv[0])):
            color = plt.get_cmap("tab20")(2 * (split_names.index(split) % 10) + shade)
            for ax, col in zip(axes, ("agreement", "update_norm")):
                xs, mean, _ = curve(x, col)
                if len(xs):
                    smoothed.add(len(xs) >= SMOOTH)
                    xs, mean = smooth(xs, mean)
                    ax.plot(xs, mean, style, marker=mark, markevery=max(1, len(xs) // 15), fillstyle="none",
                            color=color, label=f"{splits.split_label(split)}, {kind}")
    for n in sorted({r.get("clients_per_round") for r in dense + sparse} - {None}):
        axes[0].axhline(1 / n, color="0.4", linestyle=":", label=f"1/n, n={n} clients per round")
    axes[0].set(ylabel="agreement ‖Σ wᵢΔᵢ‖² / Σ wᵢ‖Δᵢ‖²")
    axes[1].set(ylabel="mean client update norm ‖Δᵢ‖")
    how = {frozenset({True}): f"moving average over {SMOOTH} rounds", frozenset({False}): "per round",
           frozenset({True, False}): f"moving average over {SMOOTH} rounds (runs shorter than that: per round)"}
    for ax, name in zip(axes, ("update agreement", "update norm")):
        ax.set(xlabel="round", title=name)
        plumbing.integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize=7, handlelength=4, ncols=min(len(labels), 4))
    fig.suptitle(wrap(f"{title}\nmean over seeds, {how.get(frozenset(smoothed), 'no data')}; dense: solid, "
                      f"circles; sparse: dashed, squares", fig), fontsize=9)
    plumbing.save_figure(fig, path)


def plot_name(key, keys):
    """A setup's part of a plot's file name, made as run names are (docs/splits-and-names.md): what it trains
    (dense, head, sparse-RULE_sS_rN for a mask calibrated federatedly, sparse-mask-RULE_sS_rN for a mask
    file), its head source where not the default (from-zero as in run names, head-warmup, head-FILE TAG),
    then, in run-name short form, each setting that tells the setups `keys` apart and is off its default
    (K, C, warm-up rounds, score, then the swept flags: lr0.001, mu0.01, ...)."""
    defaults = flag_defaults("fedavg")
    if key.mask:
        rule, s, n, by = key.mask
        kind = "sparse-" + ("mask-" if by == "central" else "") + \
            "_".join([rule or "mask"] + [f"{c}{plumbing.name_value(v)}" for c, v in (("s", s), ("r", n)) if v is not None])
    else:
        kind = "dense" if key.train == "all" else key.train
    parts = [kind.replace("mask-mask", "mask")] + ([head_part(key.head)] if head_part(key.head) else [])
    for field in ("k", "c", "warmup_rounds", "score"):
        v = getattr(key, field)
        if len({getattr(k, field) for k in keys}) > 1 and v not in (None, defaults[field]):
            parts.append(plumbing.name_part(field, v))
    parts += [plumbing.name_part(f, json.loads(v)) for f, v in key.flags if json.loads(v) != defaults.get(f)]
    return "_".join(parts)


def head_part(head):
    """A plot name's part for a head source: '' for the default (ridge), from-zero as run names say it,
    head-warmup, head-FILE TAG (plumbing.name_part)."""
    if head in common.FRESH_HEADS:
        return f"from-{head}"
    return "" if head == flag_defaults("fedavg")["head"] else plumbing.name_part("head", head)


def plot_names(keys):
    """{setup: plot_name}, distinct: a name two setups would share (a run without config.json, whose flags
    are not known) gets _2, _3, ... in the order of the setups."""
    names, seen = {}, collections.Counter()
    for key in keys:
        name = plot_name(key, keys)
        seen[name] += 1
        names[key] = name + (f"_{seen[name]}" if seen[name] > 1 else "")
    return names


def fedavg_plots(runs, out_dir):
    """Curves for every setup at every J (fedavg_SETUP_jJ.png); heatmap and agreement for each head's main
    setups (fedavg_heatmap[_HEAD].png, fedavg_agreement[_HEAD]_jJ.png). Returns (the plots, report lines
    saying which runs a plot leaves out)."""
    paths, notes = [], []
    keys = list(group(runs, setup))
    names = plot_names(keys)
    for key in keys:
        rs = [r for r in runs if setup(r) == key]
        for j in sorted({r["j"] for r in rs if r["metrics"]}):
            paths.append(os.path.join(out_dir, f"fedavg_{names[key]}_j{j}.png"))
            by_split = group(sorted([r for r in rs if r["j"] == j and r["metrics"]],
                                    key=lambda r: splits.split_order(r["split"])), lambda r: r["split"])
            plot_curves(paths[-1], by_split, f"{key.algorithm} J={j}, " + setup_name(key).replace("; ", "\n"))
    no_curves = [r for r in runs if not r["metrics"]]
    if no_curves:
        notes.append(f"No curves (no readable metrics.csv): {', '.join(r['dir'] for r in no_curves)}.")
    for head in group(runs, lambda r: r.get("head")):
        mains = main_setups(runs, head)
        dense, sparse = ([r for r in runs if setup(r) == k] for k in mains)
        suffix = f"_{head_part(head)}" if head_part(head) else ""
        others = [k for k in keys if k.head == head and k not in mains]
        drawn = "\n".join(f"{what} {algorithm_setup(k)}" for what, k in zip(("dense:", "sparse:"), mains) if k)
        if dense and sparse:
            paths.append(os.path.join(out_dir, f"fedavg_heatmap{suffix}.png"))
            plot_heatmap(paths[-1], dense, sparse, f"Final test accuracy (%), head {head}\n{drawn}")
        for j in sorted({r["j"] for r in dense + sparse}):
            at = lambda rs: [r for r in rs if r["j"] == j and r["metrics"] and any(
                v is not None for v in r["metrics"]["agreement"])]
            if at(dense) or at(sparse):
                paths.append(os.path.join(out_dir, f"fedavg_agreement{suffix}_j{j}.png"))
                plot_agreement(paths[-1], at(dense), at(sparse), f"Update agreement and norm, J={j}, head {head}\n"
                                                                 f"{drawn}")
        if others and (dense or sparse):
            notes.append(f"The heatmap and agreement plots of head {head} draw only its main setups "
                         f"({drawn.replace(chr(10), '; ')}); "
                         f"not drawn there: {'; '.join(algorithm_setup(k) for k in others)} (each has its curves).")
    return paths, notes


def mean_agreement(r):
    """A run's update agreement averaged over its rounds (metrics.csv), or None."""
    vs = [v for v in (r["metrics"] or {}).get("agreement", []) if v is not None]
    return statistics.mean(vs) if vs else None


def skew_plots(runs, out_dir):
    """Final test accuracy and mean update agreement against the label skew (result.json), one line per
    algorithm at its selected settings (selected_settings), a panel per setup (dense, sparse, head only
    apart), one figure per head source and J: fedavg_label-skew[_HEAD]_jJ.png. Returns (the plots, report
    lines naming the runs left off: those without a label skew, older runs)."""
    paths, notes = [], []
    old = [r for r in runs if r.get("label_skew") is None]
    if old:
        notes.append(f"Left off the label-skew plots (their result.json has no label_skew, written before it was "
                     f"measured): {', '.join(r['dir'] for r in old)}.")
    picks = selected_settings([r for r in runs if r.get("label_skew") is not None])
    if any(len(settings) > 1 for _, settings in picks.values()):
        notes.append("The label-skew plots draw each algorithm at its selected setting only (the algorithm "
                     "tables name it); the runs of its other settings are in the tables.")
    by_figure = group(picks.items(), lambda kv: (kv[0][0][0].head, kv[0][0][2]))  # head, J
    for (head, j), cells in by_figure.items():
        panels = {}
        for ((key, split, _), algo), (picked, _) in cells:
            points = panels.setdefault(key, {}).setdefault(algo, [])
            points.append((statistics.mean(r["label_skew"] for r in picked), split, acc(picked),
                           Stat([mean_agreement(r) for r in picked], 1)))
        suffix = f"_{head_part(head)}" if head_part(head) else ""
        paths.append(os.path.join(out_dir, f"fedavg_label-skew{suffix}_j{j}.png"))
        plot_skew(paths[-1], panels, f"Final test accuracy and update agreement vs label skew, head {head}, J={j}; "
                                     f"each algorithm at its setting selected on validation")
    return paths, notes


def plot_skew(path, panels, title):
    """panels: {setup: {algorithm: [(label skew, split, test acc Stat, agreement Stat)]}} -> a column per
    setup, test accuracy above, mean update agreement below; the splits named on the top axis."""
    plt = plumbing.pyplot()
    fig, axes = plt.subplots(2, len(panels), figsize=(2.5 + 4.2 * len(panels), 7), squeeze=False,
                             layout="constrained")
    algos = sorted({a for p in panels.values() for a in p}, key=lambda a: (a != DEFAULT_ALGORITHM, a))
    for col, (key, lines) in enumerate(panels.items()):
        top, bottom = axes[0][col], axes[1][col]
        values = []
        for algo, points in lines.items():
            i = algos.index(algo)
            points.sort(key=lambda p: p[0])
            style = dict(marker=plumbing.MARKERS[i % len(plumbing.MARKERS)], fillstyle="none", capsize=3,
                         markersize=plumbing.marker_size(i), linestyle=plumbing.LINESTYLES[i % len(plumbing.LINESTYLES)],
                         color=plt.get_cmap("tab10")(i % 10), label=algo)
            xs = [p[0] for p in points]
            ys, es = [100 * p[2].mean() for p in points], [100 * p[2].std() for p in points]
            top.errorbar(xs, ys, yerr=es, **style)
            values += [y - e for y, e in zip(ys, es)] + [y + e for y, e in zip(ys, es)]
            agree = [(x, p[3]) for x, p in zip(xs, points) if p[3].values]
            if agree:
                bottom.errorbar([x for x, _ in agree], [a.mean() for _, a in agree], yerr=[a.std() for _, a in agree],
                                **style)
        percent_axis(top, values)
        kind, rest = setup_parts(key)
        top.set(ylabel="final test accuracy (%)", title=kind)
        bottom.set(xlabel="label skew (mean TV distance of a client's labels to the global ones)",
                   ylabel="mean update agreement")
        split_names = {}
        for points in lines.values():
            for x, split, *_ in points:
                split_names.setdefault(split, []).append(x)
        ticks = top.secondary_xaxis("top")
        ticks.set_xticks([statistics.mean(v) for v in split_names.values()],
                         [splits.split_label(s) for s in split_names], fontsize=7, rotation=30)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=8, title="algorithm (mean over seeds ± std)",
               ncols=min(len(labels), 5))
    fig.suptitle(wrap(title, fig), fontsize=9)
    plumbing.save_figure(fig, path)


def wrap(title, fig, fontsize=9):
    """A figure title in lines that fit its width (a title wider than the figure is cut at both ends)."""
    import textwrap
    chars = int(fig.get_figwidth() * 72 / (0.6 * fontsize))  # about 0.6 em per character
    return "\n".join(textwrap.fill(line, chars) for line in title.split("\n"))


def percent_axis(ax, values):
    """An accuracy axis within 0-100 around `values` (%), with a margin, never past 100 or below 0; its
    markers drawn whole on the edge (not clipped in half at 100%)."""
    lo, hi = min(values, default=0), max(values, default=100)
    pad = max(1.0, 0.08 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    for artist in ax.lines:
        artist.set_clip_on(False)


# ----------------------------------------------------------------------------- results.csv and main

# results.csv's measured columns, the same for every stage (csv_row), after the columns that define a run
MEASURES = ["best_val_acc", "test_acc_at_best_val", "final_val_acc", "final_test_acc", "target_val_acc",
            "rounds_to_target", "comm_values_per_client_round", "comm_mb_total", "label_skew", "precision", "seconds"]


def defining_keys(stage):
    """The result.json keys (SCHEMA) of a stage that are its flags, the split's aside (the split column
    names it): what its tables group by."""
    return [k for k in SCHEMA[stage] if k in flag_defaults(stage) and k not in splits.SPLIT_FLAGS]


def csv_columns(runs):
    """results.csv's columns: the run, its split and algorithm, what each stage's tables group by (SCHEMA;
    the centralized run's chosen hyperparameters), every other flag that differs among the runs of a stage
    (mark_flags: lr, mu, head_lr, ...; taken from config.json), every flag any run takes (so a new flag has
    its column with no edit here), then the measurements."""
    cols = ["stage", "run", "dataset", "seed", "split", "algorithm"]
    for stage in STAGES:
        cols += defining_keys(stage) + (list(SCHEMA["best"]) if stage == "centralized" else []) + ["mask"]
    cols += [k for r in runs for k, _ in r["flags"]]
    cols += [k for r in runs for k in run_flags(r) if k != "mask"]  # every other flag a run takes: a new flag too
    return list(dict.fromkeys(cols + MEASURES))


def csv_row(r, root, columns):
    """One results.csv row: what defines the run, and its accuracies in the same columns for every
    stage: at the best validation epoch/round, and at the last one (centralized.py logs no final
    validation accuracy; the head it keeps is the best-validation one). A flag the run refused (run_flags)
    or does not have is an empty cell."""
    row = dict.fromkeys(columns)
    takes = run_flags(r)
    row.update({k: v for k, v in takes.items() if k in row and k != "mask"})
    row.update({k: json.loads(v) for k, v in r["flags"]})
    refused = set(r["config"]) - set(takes)
    row.update({k: r.get(k) for k in ("stage", "dataset", "seed", "algorithm", *defining_keys(r["stage"]), *MEASURES)
                if k not in refused}, run=os.path.relpath(r["dir"], root))
    if r["stage"] == "centralized":
        row.update({k: r["best"][k] for k in SCHEMA["best"]})
        row.update(best_val_acc=r["val_acc"], test_acc_at_best_val=r["test_acc"], final_test_acc=r["final_test_acc"])
        return row
    row.update(best_val_acc=r["best_val_acc"], test_acc_at_best_val=r.get("test_acc_at_best_val"),
               final_val_acc=r["val_acc"], final_test_acc=r["test_acc"])
    if r["stage"] == "model_editing" and r.get("mask_file"):  # a given mask: its editing run's settings (mask_of)
        row.update({k: r.get(k) for k in ("rule", "sparsity", "calib_rounds")})
    if r["stage"] == "fedavg":
        row.update({k: r.get(k) for k in ("split", "rounds_to_target")}, target_val_acc=r["target"])
        if r["mask"]:
            row.update(zip(("rule", "sparsity", "calib_rounds"), r["mask"][:3]),
                       mask=os.path.relpath(r["mask_file"], root) if r.get("mask_file") else "federated")
    return row


def summarize(root, target=0.9):
    plan = read_plan(root)
    runs = once_each(planned_runs(load_runs(root), plan, root))  # a planned run, not its copy, is kept
    for stage in STAGES:  # before anything groups them
        mark_flags([r for r in runs if r["stage"] == stage], shown_flags(stage), run_flags)
    add_rounds_to_target(runs, target)
    out_dir = open_summary(root)
    new = tempfile.mkdtemp(prefix=NEW, dir=out_dir)
    try:
        write_summary(root, plan, runs, target, new, out_dir)
        plumbing.stop_here("writing the summary (the earlier one is kept)")
        replace_summary(new, out_dir)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    print(f"{len(runs)} runs summarized: {out_dir}/report.md, tables.tex, results.csv and "
          f"{sum(n.endswith('.png') for n in os.listdir(out_dir))} plots")


NEW = ".new-"  # a summary being written: ROOT/summary/.new-XXXX/, renamed file by file into summary/ at the end


_held_summaries = {}  # summary folder -> its open descriptor, flock'ed for the life of this process


def lock_summary(out_dir):
    """Lock folder out_dir itself (flock on the folder: no lock file among the summary's files) for this
    process: one summary written at a time. Opened without following a link."""
    key = os.path.realpath(out_dir)
    if key in _held_summaries:  # this process summarized here before (tests call main() repeatedly)
        return
    fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise plumbing.UserError(f"another summarize.py is writing {out_dir}; wait for it to finish")
    _held_summaries[key] = fd


def open_summary(root):
    """ROOT/summary, locked for this process (lock_summary) and cleaned of what a killed summary left;
    refused if it is a link (refuse_links: it would steer the writes, and the removal of old plots,
    elsewhere)."""
    out_dir = os.path.join(root, "summary")
    plumbing.refuse_links(out_dir, root)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise plumbing.UserError(f"{out_dir} is not a folder; move it away to write the summary there")
    os.makedirs(out_dir, exist_ok=True)
    lock_summary(out_dir)
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name.startswith(NEW) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
    return out_dir


def replace_summary(new, out_dir):
    """Move the summary written in folder `new` into out_dir, replacing the earlier one, whose plots this
    one did not draw are removed: all the computing is done, so no error leaves a mix of both."""
    names = sorted(os.listdir(new), key=lambda n: n in ("results.csv", "report.md"))  # the report last
    for name in os.listdir(out_dir):
        if name.endswith(".png") and name not in names:
            os.remove(os.path.join(out_dir, name))
    for name in names:
        os.replace(os.path.join(new, name), os.path.join(out_dir, name))


def write_summary(root, plan, runs, target, out_dir, final_dir):
    """results.csv, report.md, tables.tex and the plots of `runs` into the empty folder out_dir; report.md's
    links are relative to final_dir, where they will be."""
    columns, path = csv_columns(runs), os.path.join(out_dir, "results.csv")
    if runs:
        plumbing.write_csv([csv_row(r, root, columns) for r in runs], path)
    else:  # write_csv takes its header from the rows
        plumbing.atomic_write_text(",".join(columns) + "\n", path)

    by_stage = {s: [r for r in runs if r["stage"] == s] for s in STAGES}
    seeds = sorted({r["seed"] for r in runs})
    datasets = sorted({r["dataset"] for r in runs})
    doc = ["# Results", "",
           f"{len(runs)} finished runs under `{root}` ({', '.join(f'{s}: {len(by_stage[s])}' for s in STAGES)}), "
           f"seeds {', '.join(map(str, seeds)) or '–'}, dataset {', '.join(datasets) or '–'}, "
           f"{sum(r['seconds'] for r in runs) / 3600:.2f} h of run time. Cells: mean ± sample std over seeds, "
           "(n=...) the number of seeds. Every run, with best-validation and final accuracies, rounds to target "
           "and communication: `results.csv`; these tables in LaTeX: `tables.tex`.", ""]
    if "synthetic" in datasets:
        doc += ["**Synthetic data: these numbers say nothing about CIFAR-100.**", ""]
    doc += not_run_doc(plan, runs, root)
    doc += centralized_doc(by_stage["centralized"], final_dir)
    section, plots = editing_doc(by_stage["model_editing"], out_dir)
    section2 = fedavg_doc(by_stage["fedavg"], by_stage["centralized"], by_stage["model_editing"], target)
    fed_plots, notes = fedavg_plots(by_stage["fedavg"], out_dir)
    skew, skew_notes = skew_plots(by_stage["fedavg"], out_dir)
    plots, notes = plots + fed_plots + skew, notes + skew_notes
    doc += section + section2
    doc += expected_doc()
    if plots:
        doc += ["## Plots", ""] + [f"- {n}" for n in notes] + [""] * bool(notes) + \
            [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    md, tex = render(doc)
    plumbing.atomic_write_text(md, os.path.join(out_dir, "report.md"))
    plumbing.atomic_write_text(tex, os.path.join(out_dir, "tables.tex"))


EXPECTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "expected.md")


def expected_doc():
    """Other projects' published CIFAR-100 figures (docs/expected.md, between its report markers), as a
    section of report.md; [] when the file is not there."""
    try:
        with open(EXPECTED, encoding="utf-8") as f:  # whatever the locale
            text = f.read()
        part = text.split("<!-- report:begin -->\n", 1)[1].split("<!-- report:end -->", 1)[0]
    except (OSError, IndexError):
        return []
    return ["## What to expect on CIFAR-100: other projects' published figures (not ours)", "",
            "DINO ViT-S/16, CIFAR-100 test accuracy (%), one seed each, each with its own settings "
            "(docs/expected.md):", "", part.strip(), ""]


def fraction(s):
    v = float(s)
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {s}")
    return v


def main(argv=None):
    p = plumbing.Parser(description=__doc__.split("\n")[0], example="python summarize.py runs   # writes runs/summary/")
    p.add_argument("root", type=plumbing.path, help="results root, e.g. run_all.sh's $RESULTS (default there: ./runs)")
    p.add_argument("--target", type=fraction, default=0.9,
                   help="rounds to target: the first FedAvg round whose validation accuracy reaches this fraction "
                        "of the centralized validation accuracy of the same seed (of the mean over the centralized "
                        "runs when that seed has none)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.root):
        raise plumbing.UserError(f"{args.root} is not a directory")
    try:
        summarize(args.root, args.target)
    except OSError as e:  # e.g. a read-only results root
        raise plumbing.UserError(f"cannot write the summary: {e}")


if __name__ == "__main__":
    plumbing.run_main(main)
