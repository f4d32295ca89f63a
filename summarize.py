"""Tables and plots of a whole study: every finished run (result.json) under a results root.

    python summarize.py RESULTS_DIR          (run_all.sh runs it at the end)

Writes RESULTS_DIR/summary/: results.csv (one row per run), report.md (centralized grid search and
schedulers; editing: sparsity x calibration rounds and mask rules; FedAvg: data split x local steps J,
dense and sparse; mean ± std over seeds where there are several) and PNG plots. A stage without
finished runs gives no table, and the report says so. Every file is written atomically.
"""
import csv
import json
import os
import statistics

import common as C

STAGES = ["centralized", "editing", "fedavg"]
COLUMNS = ["stage", "run", "dataset", "seed", "lr", "momentum", "wd", "scheduler", "rule", "sparsity",
           "calib_rounds", "mask", "k", "c", "j", "rounds", "warmup_rounds", "split", "sparse", "train",
           "best_val_acc", "test_acc_at_best_val", "final_val_acc", "final_test_acc", "seconds"]


# ----------------------------------------------------------------------------- reading

def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_csv(path):
    """Rows (dicts of strings) of a CSV file; [] if there is none."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_runs(root):
    """Every finished run under root: its result.json plus 'dir', sorted by stage and directory."""
    runs = []
    for d, subdirs, files in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if not (d == root and s == "summary"))
        if "result.json" not in files:
            continue
        try:
            r = read_json(os.path.join(d, "result.json"))
        except ValueError:
            print(f"warning: {d}/result.json is not JSON; left out")
            continue
        if isinstance(r, dict) and r.get("stage") in STAGES:
            runs.append(dict(r, dir=d))
    return sorted(runs, key=lambda r: (STAGES.index(r["stage"]), r["dir"], r["seed"]))


def split_name(r):
    return "IID" if r["iid"] else f"Nc={r['nc']}"


def mask_name(r, root):
    """The mask of a sparse FedAvg run: the editing run that made it (read from its result.json),
    or the federated calibration's own rule and sparsity."""
    if not r.get("sparse"):
        return None
    if r.get("mask_file"):
        edit = os.path.join(os.path.dirname(r["mask_file"]), "result.json")
        if os.path.isfile(edit):
            e = read_json(edit)
            return f"{e['rule']} s={e['sparsity']:g} r={e['calib_rounds']}"
        return os.path.relpath(r["mask_file"], root)
    return f"{r['rule']} s={r['sparsity']:g} (federated)"


def csv_row(r, root):
    """One results.csv row: what defines the run, and its accuracies in the same columns for every
    stage: at the best validation epoch/round, and at the last one (centralized.py logs no final
    validation accuracy; the head it keeps is the best-validation one)."""
    row = dict.fromkeys(COLUMNS)
    row.update(stage=r["stage"], run=os.path.relpath(r["dir"], root), dataset=r["dataset"], seed=r["seed"],
               seconds=r["seconds"])
    if r["stage"] == "centralized":
        row.update({k: r["best"][k] for k in ("lr", "momentum", "wd", "scheduler")})
        row.update(best_val_acc=r["val_acc"], test_acc_at_best_val=r["test_acc"], final_test_acc=r["final_test_acc"])
        return row
    row.update(best_val_acc=r["best_val_acc"], test_acc_at_best_val=r["test_acc_at_best_val"],
               final_val_acc=r["val_acc"], final_test_acc=r["test_acc"])
    if r["stage"] == "editing":
        row.update({k: r[k] for k in ("rule", "sparsity", "calib_rounds")})
    else:
        row.update({k: r.get(k) for k in ("k", "c", "j", "rounds", "warmup_rounds", "sparse", "train")})
        row.update(split=split_name(r), mask=mask_name(r, root))
    return row


# ----------------------------------------------------------------------------- formatting

def cell(values, n_seeds):
    """Accuracy in percent: the mean ± std over seeds (n=... when some seeds are missing)."""
    if not values:
        return "–"
    s = f"{100 * statistics.mean(values):.2f}"
    if len(values) > 1:
        s += f" ± {100 * statistics.stdev(values):.2f}"
    if len(values) < n_seeds:
        s += f" (n={len(values)})"
    return s


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def group(runs, key):
    """{key(r): [runs]} in first-seen order."""
    out = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out


def mean_curve(runs, file, x, y):
    """(xs, mean of y over the runs) from each run's CSV, at the x values every run has."""
    by_x = {}
    for r in runs:
        for row in read_csv(os.path.join(r["dir"], file)):
            if row.get(y) not in (None, ""):
                by_x.setdefault(float(row[x]), []).append(float(row[y]))
    xs = sorted(v for v, ys in by_x.items() if len(ys) == len(runs))
    return xs, [statistics.mean(by_x[v]) for v in xs]


def mean(values):
    return statistics.mean(values) if values else float("nan")


# ----------------------------------------------------------------------------- the three stages

def centralized_section(runs, n_seeds):
    if not runs:
        return ["## Centralized baseline", "", "_No finished centralized run._"]
    out = ["## Centralized baseline", "",
           "Chosen hyperparameters and test accuracy (%) of the head with the best validation accuracy.", "",
           md_table(["seed", "lr", "momentum", "wd", "scheduler", "best epoch", "val acc", "test acc"],
                    [[r["seed"], f"{r['best']['lr']:g}", f"{r['best']['momentum']:g}", f"{r['best']['wd']:g}",
                      r["best"]["scheduler"], r["best_epoch"], cell([r["val_acc"]], 1), cell([r["test_acc"]], 1)]
                     for r in runs])]
    if len(runs) > 1:
        out += ["", f"Test accuracy over seeds: **{cell([r['test_acc'] for r in runs], n_seeds)}**"]

    grid = group([row for r in runs for row in read_csv(os.path.join(r["dir"], "grid.csv"))],
                 lambda row: (row["lr"], row["momentum"], row["wd"], row["scheduler"]))
    if grid:
        rows = sorted(grid.items(), key=lambda kv: -mean([float(g["best_val_acc"]) for g in kv[1]]))
        out += ["", "### Grid search (validation accuracy, %, best epoch with early stopping)", "",
                md_table(["lr", "momentum", "wd", "scheduler", "val acc"],
                         [[*key, cell([float(g["best_val_acc"]) for g in rs], n_seeds)] for key, rs in rows])]
    scheds = group([row for r in runs for row in read_csv(os.path.join(r["dir"], "schedulers.csv"))],
                   lambda row: row["scheduler"])
    if scheds:
        rows = sorted(scheds.items(), key=lambda kv: -mean([float(s["best_val_acc"]) for s in kv[1]]))
        out += ["", "### Learning-rate schedulers (validation accuracy, %, with the chosen hyperparameters)", "",
                md_table(["scheduler", "val acc"],
                         [[name, cell([float(s["best_val_acc"]) for s in rs], n_seeds)] for name, rs in rows])]
    return out


def editing_section(runs, n_seeds, out_dir):
    if not runs:
        return ["## Model editing", "", "_No finished editing run._"], []
    warm = {r["seed"]: r["warmup_test_acc"] for r in runs}  # one warm-up per seed, shared by its runs
    out, plots = ["## Model editing", "",
                  "Test accuracy (%) after sparse fine-tuning (last epoch). Before editing (the warmed-up "
                  f"head, frozen backbone): {cell(list(warm.values()), n_seeds)}."], []

    least = [r for r in runs if r["rule"] == "least-sensitive"]
    if least:
        sparsities = sorted({r["sparsity"] for r in least})
        rounds = sorted({r["calib_rounds"] for r in least})
        cells = group(least, lambda r: (r["sparsity"], r["calib_rounds"]))
        out += ["", "### Sparsity × calibration rounds (least-sensitive mask), test accuracy (%)", "",
                md_table(["sparsity"] + [f"{n} round{'s' * (n > 1)}" for n in rounds],
                         [[f"{s:g}"] + [cell([r["test_acc"] for r in cells.get((s, n), [])], n_seeds)
                                        for n in rounds] for s in sparsities])]
        if len(sparsities) > 1:
            path = os.path.join(out_dir, "editing_sparsity.png")
            C.plot_lines(path, {f"{n} calibration round{'s' * (n > 1)}":
                                ([s for s in sparsities if (s, n) in cells],
                                 [mean([r["test_acc"] for r in cells[(s, n)]]) for s in sparsities if (s, n) in cells])
                                for n in rounds},
                         "sparsity (fraction of backbone weights frozen)", "test accuracy",
                         "Model editing: sparsity × calibration rounds")
            plots.append(path)

    # Mask rules: every (sparsity, rounds) setting that more than one rule was run at.
    settings = group(runs, lambda r: (r["sparsity"], r["calib_rounds"]))
    labels, values = [], []
    for (s, n), rs in settings.items():
        rules = group(sorted(rs, key=lambda r: C.MASK_RULES.index(r["rule"])), lambda r: r["rule"])
        if len(rules) < 2:
            continue
        out += ["", f"### Mask rules at sparsity {s:g}, {n} calibration round{'s' * (n > 1)}", "",
                md_table(["rule", "test acc", "best val acc", "kept %", "changed %"],
                         [[rule, cell([r["test_acc"] for r in x], n_seeds),
                           cell([r["best_val_acc"] for r in x], n_seeds),
                           f"{100 * mean([r['mask_kept_frac'] for r in x]):.2f}",
                           f"{100 * mean([r['changed_frac'] for r in x]):.2f}"] for rule, x in rules.items()])]
        suffix = f" (s={s:g}, r={n})" if len(settings) > 1 else ""
        labels += [rule + suffix for rule in rules]
        values += [mean([r["test_acc"] for r in x]) for x in rules.values()]
    if labels:
        path = os.path.join(out_dir, "editing_rules.png")
        C.plot_bars(path, labels, values, "test accuracy", "Model editing: mask rules")
        plots.append(path)
    return out, plots


def fedavg_section(runs, n_seeds, out_dir, root, central):
    if not runs:
        return ["## FedAvg", "", "_No finished FedAvg run._"], []
    out, plots = ["## FedAvg", "", "Test accuracy (%) of the final global model. Rows: how the training set is "
                                   "split over the clients; columns: local steps J per round."], []
    if central:
        out += ["", f"Centralized baseline for reference: {cell([r['test_acc'] for r in central], n_seeds)}."]

    def order(name):  # IID first, then Nc from many classes per client to one
        return (0, 0) if name == "IID" else (1, -int(name.split("=")[1]))

    setups = group(runs, lambda r: (r["sparse"], mask_name(r, root), r["k"], r["c"], r["train"],
                                    r.get("warmup_rounds") or 0))
    for (sparse, mask, k, c, train, warm), rs in setups.items():
        title = f"{'sparse' if sparse else 'dense'}" + (f" (mask: {mask})" if mask else "") + \
                f", K={k}, C={c:g}, train {train}" + (f", {warm} head warm-up rounds" if warm else "")
        js = sorted({r["j"] for r in rs})
        rounds = {j: sorted({r["rounds"] for r in rs if r["j"] == j}) for j in js}
        splits = sorted({split_name(r) for r in rs}, key=order)
        cells = group(rs, lambda r: (split_name(r), r["j"]))
        out += ["", f"### FedAvg, {title}", "",
                md_table(["split"] + [f"J={j} ({'/'.join(map(str, rounds[j]))} rounds)" for j in js],
                         [[name] + [cell([r["test_acc"] for r in cells.get((name, j), [])], n_seeds) for j in js]
                          for name in splits])]
        tag = "sparse" if sparse else "dense"
        if sum(1 for key in setups if key[0] == sparse) > 1:  # several setups of one kind: tell them apart
            tag += f"_{list(setups).index((sparse, mask, k, c, train, warm))}"
        for j in js:
            series = {name: mean_curve(cells[(name, j)], "metrics.csv", "round", "test_acc")
                      for name in splits if (name, j) in cells}
            path = os.path.join(out_dir, f"fedavg_{tag}_j{j}.png")
            C.plot_lines(path, series, "round", "test accuracy",
                         f"FedAvg, {'sparse' if sparse else 'dense'}, J={j}: global model")
            plots.append(path)
    return out, plots


# ----------------------------------------------------------------------------- main

def summarize(root):
    runs = load_runs(root)
    out_dir = os.path.join(root, "summary")
    os.makedirs(out_dir, exist_ok=True)
    rows = [csv_row(r, root) for r in runs]
    if rows:
        C.write_csv(rows, os.path.join(out_dir, "results.csv"))
    else:
        C.atomic_write_text(",".join(COLUMNS) + "\n", os.path.join(out_dir, "results.csv"))

    by_stage = {s: [r for r in runs if r["stage"] == s] for s in STAGES}
    seeds = sorted({r["seed"] for r in runs})
    datasets = sorted({r["dataset"] for r in runs})
    hours = sum(r["seconds"] for r in runs) / 3600
    report = ["# Results", "",
              f"{len(runs)} finished runs under `{root}` ({', '.join(f'{s}: {len(by_stage[s])}' for s in STAGES)}), "
              f"seeds {', '.join(map(str, seeds)) or '–'}, dataset {', '.join(datasets) or '–'}, "
              f"{hours:.2f} h of run time."]
    if len(seeds) > 1:
        report += ["", f"Cells are mean ± sample std over the {len(seeds)} seeds; (n=...) marks a cell "
                       "with fewer finished seeds."]
    if "synthetic" in datasets:
        report += ["", "**Synthetic data: these numbers say nothing about CIFAR-100.**"]
    report += ["", "Every run, with best-validation and final accuracies and wall time: `results.csv`."]

    report += [""] + centralized_section(by_stage["centralized"], len(seeds))
    section, plots = editing_section(by_stage["editing"], len(seeds), out_dir)
    report += [""] + section
    section, more = fedavg_section(by_stage["fedavg"], len(seeds), out_dir, root, by_stage["centralized"])
    report += [""] + section
    plots += more
    if plots:
        report += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    C.atomic_write_text("\n".join(report) + "\n", os.path.join(out_dir, "report.md"))
    print(f"{len(runs)} runs summarized: {out_dir}/report.md, results.csv and {len(plots)} plots")


def main(argv=None):
    p = C.Parser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="results root, e.g. run_all.sh's $RESULTS (default there: ./runs)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.root):
        raise C.UserError(f"{args.root} is not a directory")
    summarize(args.root)


if __name__ == "__main__":
    C.run_main(main)
