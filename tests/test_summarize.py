"""summarize.py on fake results roots (result.json, metrics.csv as the stage scripts write them; no script runs):
the tables over seeds, rounds to target, communication, LaTeX, plots, and bad runs left out."""
import csv
import json
import os
import re
import shutil
import statistics
import subprocess

import pytest

import common

import centralized
import fedavg
import splits
import summarize

# ----------------------------------------------------------------------------- a fake results root

BASE = {
    "centralized": dict(best=dict(lr=0.1, momentum=0.9, wd=0.0, scheduler="cosine"), best_epoch=5, epochs_run=10,
                        test_loss=1.0),
    "model_editing": dict(rule="least-sensitive", sparsity=0.9, calib_rounds=4, mask_file=None, head="ridge",
                    score="logit", mask_kept_frac=0.1, changed_frac=0.05, head_val_acc=0.4, head_test_acc=0.4,
                    best_epoch=3),
    "fedavg": dict(k=100, c=0.1, j=4, rounds=300, warmup_rounds=0, iid=False, nc=5, train="all", sparse=False,
                   head="ridge", score="logit", rule=None, sparsity=None, calib_rounds=None, mask_file=None,
                   test_loss=1.0, best_round=300, clients_per_round=10, comm_values_per_client_round=1000,
                   comm_mb_total=12.0),
}
ACC_KEYS = {"centralized": ["val_acc", "test_acc", "final_test_acc"],  # exactly the stage's accuracy keys
            "model_editing": ["val_acc", "test_acc", "best_val_acc", "test_acc_at_best_val"],
            "fedavg": ["val_acc", "test_acc", "best_val_acc"]}


def write_run(root, stage, name, seed, acc, curve=None, **fields):
    """A finished run: config.json, result.json (accuracy fields all `acc`) and, given curve
    {round: val_acc}, a FedAvg metrics.csv with one row per round (test_acc as val_acc where given)."""
    d = root / stage / name / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    result = dict(BASE[stage], stage=stage, dataset="cifar100", seed=seed, seconds=10.0, precision="bf16",
                  **dict.fromkeys(ACC_KEYS[stage], acc))
    result.update(fields)
    (d / "result.json").write_text(json.dumps(result))
    if curve:
        last = max(curve)
        with open(d / "metrics.csv", "w") as f:
            f.write("round,train_loss,update_norm,agreement,val_loss,val_acc,test_loss,test_acc\n")
            for x in range(min(1, min(curve)), last + 1):  # round 0 (the head) only where curve has it
                v = curve.get(x, "")
                f.write(f"{x},1.0,{0.5 + seed},{0.2 + 0.1 * seed},{'' if v == '' else 1},{v},,{v}\n")
    return d


def fed(root, split, j, seed, acc, mask=None, curve=None, **fields):
    """A FedAvg run; mask=(rule, sparsity, rounds) makes it sparse with the mask of that editing run."""
    nc = None if split == "iid" else int(split[2:])
    kind = "dense" if fields.get("train", "all") == "all" else f"train-{fields['train']}"
    if mask:
        rule, s, r = mask
        kind = f"sparse-{rule}_s{s}_r{r}"
        mask_file = root / "model_editing" / f"{rule}_s{s}_r{r}" / f"seed{seed}" / "mask.pt"
        fields = dict(dict(sparse=True, rule=rule, sparsity=s, calib_rounds=r, mask_file=str(mask_file)), **fields)
    return write_run(root, "fedavg", f"{split}_j{j}_{kind}", seed, acc, curve or {1: acc / 2, 2: acc}, j=j,
                     iid=split == "iid", nc=nc, **fields)


@pytest.fixture
def no_plots(monkeypatch):
    """Tables only: drawing PNGs takes most of summarize.py's time (test_plots_... draws them)."""
    monkeypatch.setattr(summarize, "fedavg_plots", lambda *a: ([], []))
    monkeypatch.setattr(summarize.plumbing, "plot_lines", lambda *a, **k: None)
    monkeypatch.setattr(summarize.plumbing, "plot_bars", lambda *a, **k: None)


def summarize_root(root, *flags):
    summarize.main([str(root), *flags])
    out = root / "summary"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, (out / "report.md").read_text(), (out / "tables.tex").read_text()


def md_tables(report):
    """{title: {first cell: [other cells]}} of every table in report.md."""
    tables, title = {}, None
    for line in report.splitlines():
        if line.startswith("### "):
            title = line[4:]
            tables[title] = {}
        elif line.startswith("| ") and title and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[title][cells[0]] = cells[1:]
    return tables


def table(report, start):
    found = [t for title, t in md_tables(report).items() if title.startswith(start)]
    assert len(found) == 1, (start, list(md_tables(report)))
    return found[0]


def pm(*accs):
    """A report cell of accuracies (fractions): mean ± std (n=...)."""
    m = f"{100 * statistics.mean(accs):.2f}"
    return m + (f" ± {100 * statistics.stdev(accs):.2f}" if len(accs) > 1 else "") + f" (n={len(accs)})"


# ----------------------------------------------------------------------------- tables over seeds

def test_summary_averages_over_seeds_and_says_what_is_missing(tmp_path):
    for seed, (e, f) in enumerate([(0.50, 0.30), (0.70, 0.40)]):
        write_run(tmp_path, "model_editing", "least-sensitive_s0.9_r4", seed, e)
        fed(tmp_path, "nc5", 8, seed, f, rounds=150)
    rows, report, _ = summarize_root(tmp_path)

    assert table(report, "Sparsity × calibration rounds in model editing")["0.9"] == [pm(0.5, 0.7)]
    assert table(report, "FedAvg, dense")["Nc=5"] == [pm(0.3, 0.4)]
    assert "| split | J=8 (150 rounds) |" in report
    assert "_No finished centralized run._" in report
    assert (tmp_path / "summary" / "fedavg_dense_j8.png").is_file()
    assert len(rows) == 4 and [r["seed"] for r in rows if r["stage"] == "fedavg"] == ["0", "1"]
    assert {r["split"] for r in rows if r["stage"] == "fedavg"} == {"nc5"}  # the split's name (splits.split_name)


def study(root):
    """Two seeds of a small study: centralized, editing (rules, sparsity), dense and sparse FedAvg over
    IID/Nc=5 × J=4/8, a second rule and a sparsity ablation inside FedAvg at Nc=5. Test accuracies
    are distinct per cell so that a table that picks the wrong runs shows other numbers."""
    for seed in (0, 1):
        d = 0.01 * seed
        write_run(root, "centralized", "grid_compare", seed, 0.80 + d)
        for rule, s, r, a in [("least-sensitive", 0.9, 4, 0.70), ("most-sensitive", 0.9, 4, 0.60),
                              ("least-sensitive", 0.5, 4, 0.72), ("least-sensitive", 0.9, 1, 0.68)]:
            write_run(root, "model_editing", f"{rule}_s{s}_r{r}", seed, a + d, rule=rule, sparsity=s, calib_rounds=r)
        for split, base in [("iid", 0.60), ("nc5", 0.40)]:
            for j, dj in [(4, 0.0), (8, 0.05)]:
                fed(root, split, j, seed, base + dj + d)
                fed(root, split, j, seed, base + dj + d + 0.02, mask=("least-sensitive", 0.9, 4),
                    comm_values_per_client_round=100, comm_mb_total=1.2)
            fed(root, split, 4, seed, base + d + 0.01, mask=("most-sensitive", 0.9, 4))
        fed(root, "nc5", 4, seed, 0.30 + d, mask=("least-sensitive", 0.5, 4))
        fed(root, "nc5", 4, seed, 0.31 + d, mask=("least-sensitive", 0.9, 1))


def test_every_table_of_the_study_picks_its_runs(tmp_path, no_plots):
    study(tmp_path)
    rows, report, _ = summarize_root(tmp_path)
    assert len(rows) == 2 * (1 + 4 + 12)

    six = table(report, "The six models (head ridge)")  # both columns of a row from the ridge head
    assert six == {"model": ["without task arithmetic", "with task arithmetic"],
                   "step-0 head alone": [pm(0.40, 0.40), "–"],  # the editing runs' head_test_acc, per seed
                   "Centralized": [pm(0.40, 0.40), pm(0.70, 0.71)],  # the ridge head itself; editing s=0.9 r=4
                   "FedAvg IID": [pm(0.60, 0.61), pm(0.62, 0.63)],  # J=4, least-sensitive s=0.9 r=4
                   "FedAvg Nc=5": [pm(0.40, 0.41), pm(0.42, 0.43)]}

    rules = table(report, "Mask rules inside sparse FedAvg at sparsity 0.9, 4 calibration rounds (central, logit "
                          "score), J=4")
    assert rules == {"rule": ["IID", "Nc=5"], "least-sensitive": [pm(0.62, 0.63), pm(0.42, 0.43)],
                     "most-sensitive": [pm(0.61, 0.62), pm(0.41, 0.42)],
                     "dense (no mask)": [pm(0.60, 0.61), pm(0.40, 0.41)]}
    ablation = table(report, "Sparsity × calibration rounds inside sparse FedAvg (least-sensitive, central "
                             "calibration, logit score) at Nc=5, J=4")
    assert ablation == {"sparsity": ["1 round", "4 rounds"], "0.5": ["–", pm(0.30, 0.31)],
                        "0.9": [pm(0.31, 0.32), pm(0.42, 0.43)]}

    dense = table(report, "FedAvg, dense; head ridge")
    assert dense == {"split": ["J=4 (300 rounds)", "J=8 (300 rounds)"], "IID": [pm(0.60, 0.61), pm(0.65, 0.66)],
                     "Nc=5": [pm(0.40, 0.41), pm(0.45, 0.46)]}
    assert table(report, "FedAvg, sparse, least-sensitive s=0.9 r=4")["Nc=5"] == [pm(0.42, 0.43), pm(0.47, 0.48)]
    # a setup with one J that a table above already shows gets no split × J table of its own
    assert not [t for t in md_tables(report) if t.startswith("FedAvg, sparse, most-sensitive")]

    # one warm-up per seed, shared by that seed's four editing runs: n counts seeds
    assert "Before editing (head ridge, logit score: the step-0 head on the pre-trained backbone): 40.00 ± 0.00 (n=2)." \
        in report
    editing_rules = table(report, "Mask rules in model editing at sparsity 0.9, 4 calibration rounds")
    assert editing_rules["most-sensitive"][0] == pm(0.60, 0.61)
    assert table(report, "Centralized linear probe")["0.1"][-1] == pm(0.80, 0.81)

    csv_sparse = [r for r in rows if r["run"].startswith("fedavg/nc5_j4_sparse-least-sensitive_s0.9_r4")]
    assert [(r["rule"], r["sparsity"], r["calib_rounds"], r["head"], r["score"], r["precision"]) for r in csv_sparse] == \
        [("least-sensitive", "0.9", "4", "ridge", "logit", "bf16")] * 2
    assert csv_sparse[0]["mask"] == "model_editing/least-sensitive_s0.9_r4/seed0/mask.pt"


def test_the_mask_comes_from_its_editing_run_and_heads_are_never_mixed(tmp_path, no_plots):
    # the FedAvg result.json says nothing of the mask (mask_file given): the editing run tells
    write_run(tmp_path, "model_editing", "most-sensitive_s0.5_r2", 0, 0.5, rule="most-sensitive", sparsity=0.5,
              calib_rounds=2)
    fed(tmp_path, "nc5", 4, 0, 0.3, mask=("most-sensitive", 0.5, 2), rule=None, sparsity=None, calib_rounds=None)
    fed(tmp_path, "nc5", 4, 0, 0.2, head="warmup")  # dense, another head
    fed(tmp_path, "nc5", 4, 0, 0.25, mask=("least-sensitive", 0.9, 4), mask_file=None)  # federated calibration
    rows, report, _ = summarize_root(tmp_path)
    assert table(report, "FedAvg, sparse, most-sensitive s=0.5 r=2, central calibration")["Nc=5"] == [pm(0.3)]
    assert table(report, "FedAvg, sparse, least-sensitive s=0.9 r=4, federated calibration")["Nc=5"] == [pm(0.25)]
    # the dense run of head "warmup" is not the sparse runs' (ridge) reference
    assert table(report, "The six models (head ridge)")["FedAvg Nc=5"][0] == "–"
    assert table(report, "The six models (head warmup)")["FedAvg Nc=5"] == [pm(0.2), "–"]
    sparse = {r["mask"]: r for r in rows if r["stage"] == "fedavg" and r["sparse"] == "True"}
    assert sparse["federated"]["calib_rounds"] == "4"
    assert sparse["model_editing/most-sensitive_s0.5_r2/seed0/mask.pt"]["rule"] == "most-sensitive"


def test_the_six_models_take_the_editing_run_whose_mask_sparse_fedavg_used(tmp_path, no_plots):
    write_run(tmp_path, "model_editing", "least-sensitive_s0.9_r4", 0, 0.70)  # the usual default, not used here
    write_run(tmp_path, "model_editing", "least-sensitive_s0.5_r2", 0, 0.55, sparsity=0.5, calib_rounds=2)
    fed(tmp_path, "nc5", 4, 0, 0.4)
    fed(tmp_path, "nc5", 4, 0, 0.45, mask=("least-sensitive", 0.5, 2))
    _, report, _ = summarize_root(tmp_path)
    assert table(report, "The six models")["Centralized"] == [pm(0.40), pm(0.55)]  # the ridge head, editing from it
    assert table(report, "The six models")["FedAvg Nc=5"] == [pm(0.4), pm(0.45)]


# ----------------------------------------------------------------------------- rounds to target, communication

def test_rounds_to_target_per_seed_else_the_mean_and_not_reached(tmp_path, capsys, no_plots):
    write_run(tmp_path, "centralized", "grid_compare", 0, 0.80)
    write_run(tmp_path, "centralized", "grid_compare", 2, 0.60)
    curve = {20: 0.65, 40: 0.73, 60: 0.70}
    fed(tmp_path, "nc5", 4, 0, 0.7, curve=curve)  # target 0.9 × 0.80 = 0.72: round 40
    fed(tmp_path, "nc5", 4, 1, 0.7, curve=curve)  # no seed 1: 0.9 × mean(0.80, 0.60) = 0.63: round 20
    fed(tmp_path, "iid", 4, 0, 0.7, curve={20: 0.5, 40: 0.71})  # never 0.72: not reached
    broken = fed(tmp_path, "iid", 4, 1, 0.7)
    (broken / "metrics.csv").write_text("round,val_acc\n1,0.5\nx,0.7\n")
    rows, report, _ = summarize_root(tmp_path)

    got = {r["run"]: (r["target_val_acc"], r["rounds_to_target"]) for r in rows if r["stage"] == "fedavg"}
    assert got == {"fedavg/nc5_j4_dense/seed0": ("0.72", "40"), "fedavg/nc5_j4_dense/seed1": ("0.63", "20"),
                   "fedavg/iid_j4_dense/seed0": ("0.72", ""), "fedavg/iid_j4_dense/seed1": ("", "")}
    cost = table(report, "FedAvg cost: rounds to 0.9")  # one setup: its kind the label, the rest in the title
    assert "communication (FedAvg, head ridge, K=100, C=0.1)" in [t for t in md_tables(report) if t.startswith("FedAvg cost")][0]
    assert cost["dense"][5] == "30 ± 14 (2/2 reached)"
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and str(broken / "metrics.csv") in warnings[0]

    rows, report, _ = summarize_root(tmp_path, "--target", "0.5")  # 0.40 and 0.35: round 20 everywhere
    assert {r["rounds_to_target"] for r in rows if r["stage"] == "fedavg"} == {"20", ""}
    assert "| 20 ± 0 (2/2 reached) |" in report and "FedAvg cost: rounds to 0.5" in report


def test_without_a_centralized_run_rounds_to_target_is_not_computed(tmp_path, no_plots):
    fed(tmp_path, "nc5", 4, 0, 0.7)
    rows, report, _ = summarize_root(tmp_path)
    assert (rows[0]["target_val_acc"], rows[0]["rounds_to_target"]) == ("", "")
    cost = table(report, "FedAvg cost")  # no target: no column of rounds to target, and the note says why
    assert "rounds to target" not in report.split("### FedAvg cost")[1].split("\n| ")[1]
    assert "rounds to target is left out" in report and cost["dense"][3:5] == [pm(0.7), "–"]  # no round 0


def test_communication_is_read_from_result_json(tmp_path, no_plots):
    write_run(tmp_path, "model_editing", "least-sensitive_s0.9_r4", 0, 0.6)
    fed(tmp_path, "nc5", 4, 0, 0.5, comm_values_per_client_round=21_000_000, comm_mb_total=25200.0)
    fed(tmp_path, "nc5", 4, 0, 0.5, mask=("least-sensitive", 0.9, 4), comm_values_per_client_round=2_100_000,
        comm_mb_total=2520.0)
    rows, report, _ = summarize_root(tmp_path)
    assert sorted((r["comm_values_per_client_round"], r["comm_mb_total"]) for r in rows if r["stage"] == "fedavg") \
        == [("2100000", "2520"), ("21000000", "25200")]
    cost = [line for line in report.splitlines() if line.startswith("| dense |") or line.startswith("| sparse,")]
    assert cost[0].endswith("| 21.000 (n=1) | 25200.0 (n=1) |") and cost[1].endswith("| 2.100 (n=1) | 2520.0 (n=1) |")


# ----------------------------------------------------------------------------- LaTeX

def check_latex(tex):
    """A LaTeX-free check: environments balanced, every tabular row has its spec's column count,
    booktabs rules, unique labels, ASCII only, no unescaped specials in cells."""
    assert tex.isascii()
    stack, cols, labels = [], None, []
    for line in tex.splitlines():
        if line.startswith("%"):
            continue
        assert "resizebox" not in line and "scalebox" not in line  # a table is never shrunk below its font
        for kind, env in re.findall(r"\\(begin|end)\{(\w+)\}", line):
            if kind == "begin":
                stack.append(env)
            else:
                assert stack.pop() == env, line
        m = re.match(r"\\begin\{tabular\}\{((?:[lrc]|p\{[^}]*\})+)\}$", line)
        if m:
            cols = len(re.findall(r"[lrc]|p\{[^}]*\}", m.group(1)))
            rules = []
        elif line in (r"\toprule", r"\midrule", r"\bottomrule"):
            rules.append(line)
        elif line == r"\end{tabular}":
            assert rules == [r"\toprule", r"\midrule", r"\bottomrule"]
            cols = None
        elif cols:
            assert line.endswith(r" \\") and len(re.split(r"(?<!\\)&", line)) == cols, line
        else:
            assert not re.search(r"(?<!\\)&", line), line
        assert not re.search(r"(?<!\\)[_%#]", line), line
        labels += re.findall(r"\\label\{([^}]*)\}", line)
    assert not stack and len(labels) == len(set(labels)) > 0
    parts = tex.count(r"(continued, part ")  # a table's parts after its first: no caption or label of their own
    assert tex.count(r"\begin{table}") - parts == len(labels) == tex.count(r"\caption{")
    assert re.findall(r"^\\(small|footnotesize)$", tex, re.M) and not re.search(r"\\(scriptsize|tiny)\b", tex)


def test_tables_tex_is_well_formed_escaped_and_bolds_the_best(tmp_path, no_plots):
    study(tmp_path)
    fed(tmp_path, "nc5", 4, 5, 0.2, head="runs/my_head%#&.pt")  # a head FILE with LaTeX specials
    fed(tmp_path, "iid", 8, 5, 0.2, mask=("most-sensitive", 0.9, 4))  # a 2nd rules table, title as J=4's
    _, report, tex = summarize_root(tmp_path)
    check_latex(tex)
    assert tex.count(r"\label{") == len(md_tables(report))
    assert r"my\_head\%\#\&.pt" in tex
    dense = tex.split(r"\caption{FedAvg, dense; head ridge")[1].split(r"\end{table}")[0]
    assert r"IID & \textbf{60.50} $\pm$ 0.71 & \textbf{65.50} $\pm$ 0.71 \\" in dense  # n=2 everywhere:
    assert r"Nc=5 & 40.50 $\pm$ 0.71 & 45.50 $\pm$ 0.71 \\" in dense and "(n=2 seeds each)" in dense  # said once
    cost = tex.split(r"\caption{FedAvg cost")[1].split(r"\caption{")[0]  # with its parts
    assert r"-- (0/2 reached)" in cost  # as "30 (1/2 reached)"; nothing to bold; communication has no "best"
    assert cost.count(r"\textbf") == 1 and r"\textbf{67.50}" in cost  # test acc: IID, J=8, sparse



def test_tables_tex_compiles_if_a_tex_engine_is_here(tmp_path, no_plots):
    engine = next((e for e in ("pdflatex", "lualatex", "tectonic") if shutil.which(e)), None)
    if engine is None:
        pytest.skip("no TeX engine on this machine (the LaTeX-free check above still runs)")
    study(tmp_path)
    fed(tmp_path, "nc5", 4, 5, 0.2, head="runs/my_head%#&.pt")
    summarize_root(tmp_path)
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs,graphicx}\n\\begin{document}\n"
                   f"\\input{{{tmp_path / 'summary' / 'tables.tex'}}}\n\\end{{document}}\n")
    cmd = [engine, doc.name] if engine == "tectonic" else [engine, "-interaction=nonstopmode", "-halt-on-error",
                                                           doc.name]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    warnings = [w for w in re.findall(r"(Overfull \\hbox.*|\w*\s?Warning.*)", proc.stdout)
                if "Label(s) may have changed" not in w]  # a first run's: no \ref here
    assert not warnings, proc.stdout[-3000:]  # a table off the page, a float taller than the page


def test_the_latex_checker_catches_what_it_checks():
    good = "\\begin{table}\n\\small\n\\caption{x}\n\\label{tab:a}\n\\begin{tabular}{lr}\n" \
           "\\toprule\na & b \\\\\n\\midrule\nc & d \\\\\n\\bottomrule\n\\end{tabular}\n\\end{table}"
    check_latex(good)
    for bad in (good.replace("c & d", "c & d & e"), good.replace("\\end{table}", ""), good.replace("c & d", "c_1 & d"),
                good + "\n" + good, good.replace("\\midrule\n", ""), good.replace("a & b", "a × b"),
                good.replace("\\small", "\\scriptsize"), good.replace("\\begin{tabular}", "\\resizebox{!}{!}{\\begin{tabular}")):
        with pytest.raises(AssertionError):
            check_latex(bad)


# ----------------------------------------------------------------------------- plots

def test_plots_heatmap_curves_and_agreement(tmp_path):
    study(tmp_path)
    (tmp_path / "summary").mkdir()
    (tmp_path / "summary" / "fedavg_dense_j16.png").write_bytes(b"\x89PNG")  # an earlier summary's, with more runs
    old = os.umask(0o022)
    try:
        summarize_root(tmp_path)
    finally:
        os.umask(old)
    out = tmp_path / "summary"
    pngs = {p.name for p in out.iterdir() if p.suffix == ".png"}
    assert all((out / p).stat().st_mode & 0o777 == 0o644 for p in pngs)  # readable by collaborators
    assert {"fedavg_heatmap.png", "fedavg_agreement_j4.png", "fedavg_agreement_j8.png", "fedavg_dense_j4.png",
            "fedavg_sparse-mask-least-sensitive_s0.9_r4_j8.png", "editing_rules.png"} <= pngs
    assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == ["report.md", "results.csv", "tables.tex"]
    report = (out / "report.md").read_text()
    assert all(f"({p})" in report for p in pngs)  # every PNG there is this summary's (the stale one is gone)
    assert "fedavg_dense_j16.png" not in pngs


def test_a_copied_run_counts_once_and_editing_runs_of_other_flags_are_not_mixed(tmp_path, capsys, no_plots):
    config = {"seed": 0, "rule": "least-sensitive", "sparsity": 0.9, "calib_rounds": 4, "epochs": 1, "lr": 0.001}
    a = write_run(tmp_path, "model_editing", "least-sensitive_s0.9_r4", 0, 0.6)
    (a / "config.json").write_text(json.dumps(config))
    shutil.copytree(a, tmp_path / "copy" / "seed0")  # the same run, copied
    b = write_run(tmp_path, "model_editing", "least-sensitive_s0.9_r4_long", 0, 0.2)
    (b / "config.json").write_text(json.dumps(dict(config, epochs=2)))  # another run: more epochs
    rows, report, _ = summarize_root(tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "same run as" in err[0] and str(tmp_path / "copy" / "seed0") in err[0]
    assert len(rows) == 2
    one = table(report, "Sparsity × calibration rounds in model editing (least-sensitive mask; head ridge, logit "
                        "score, epochs 1)")
    two = table(report, "Sparsity × calibration rounds in model editing (least-sensitive mask; head ridge, logit "
                        "score, epochs 2)")
    assert one["0.9"] == [pm(0.6)] and two["0.9"] == [pm(0.2)]


def real_config(script, *flags):
    """config.json of a run of `script` with these flags, as the script writes it."""
    return dict(summarize.plumbing.run_config(script.get_args(list(flags))), precision="bf16")


def with_config(d, config):
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_fedavg_and_centralized_runs_of_other_flags_are_never_in_one_cell(tmp_path, no_plots):
    for seed in (0, 1):
        s, d = ["--seed", str(seed)], 0.01 * seed
        with_config(write_run(tmp_path, "centralized", "grid_compare", seed, 0.80 + d), real_config(centralized, *s))
        for j, rounds, a in ((4, 300, 0.40), (8, 150, 0.50)):  # --scale-rounds: the same flags at every J
            with_config(fed(tmp_path, "nc5", j, seed, a + d, rounds=rounds),
                        real_config(fedavg, "--nc", "5", "--j", str(j), "--scale-rounds", *s))
        mask = tmp_path / "model_editing" / "least-sensitive_s0.9_r4" / f"seed{seed}" / "mask.pt"  # a file per seed
        with_config(fed(tmp_path, "nc5", 4, seed, 0.45 + d, mask=("least-sensitive", 0.9, 4)),
                    real_config(fedavg, "--nc", "5", "--sparse", "--mask", str(mask), "--scale-rounds", *s))
    # seed 0 again, each with one flag changed: more epochs, another client learning rate, more rounds
    with_config(write_run(tmp_path, "centralized", "long", 0, 0.20), real_config(centralized, "--epochs", "60"))
    with_config(write_run(tmp_path, "fedavg", "fast", 0, 0.10, {2: 0.1}, j=4, iid=False, nc=5),
                real_config(fedavg, "--nc", "5", "--scale-rounds", "--lr", "0.001"))
    with_config(write_run(tmp_path, "fedavg", "longer", 0, 0.30, {2: 0.3}, j=4, iid=False, nc=5, rounds=600),
                real_config(fedavg, "--nc", "5", "--scale-rounds", "--rounds", "600"))
    rows, report, _ = summarize_root(tmp_path)

    dense = table(report, "FedAvg, dense; head ridge, K=100, C=0.1, lr 0.0001, rounds 300")
    assert dense == {"split": ["J=4 (300 rounds)", "J=8 (150 rounds)"], "Nc=5": [pm(0.40, 0.41), pm(0.50, 0.51)]}
    assert table(report, "FedAvg, dense; head ridge, K=100, C=0.1, lr 0.001, rounds 300")["Nc=5"] == [pm(0.10)]
    assert table(report, "FedAvg, dense; head ridge, K=100, C=0.1, lr 0.0001, rounds 600")["Nc=5"] == [pm(0.30)]
    assert table(report, "FedAvg, sparse, least-sensitive s=0.9 r=4, central calibration, logit score; head "
                         "ridge, K=100, C=0.1, lr 0.0001, rounds 300")["Nc=5"] == [pm(0.45, 0.46)]  # two mask files
    assert table(report, "Centralized linear probe: chosen hyperparameters, accuracy (%) of the best-validation "
                         "head (epochs 30)")["0.1"][-1] == pm(0.80, 0.81)
    assert table(report, "Centralized linear probe: chosen hyperparameters, accuracy (%) of the best-validation "
                         "head (epochs 60)")["0.1"][-1] == pm(0.20)
    six = table(report, "The six models")  # the runs most seeds share, named in the note
    assert six["FedAvg Nc=5"] == [pm(0.40, 0.41), pm(0.45, 0.46)]
    assert six["Centralized"][0] == "–"  # ridge head, no editing run, no round 0: not the SGD probe of another head
    assert "Centralized baseline for reference: 80.50 ± 0.71 (n=2) (epochs 30)." in report
    cost = table(report, "FedAvg cost")
    assert cost["dense, lr 0.001, rounds 300"][3] == pm(0.10)  # what the setups share is in the title
    assert {r["target_val_acc"] for r in rows if r["stage"] == "fedavg"} == {"0.72", "0.729"}  # not the 60 epochs'


def test_a_run_written_before_a_flag_existed_is_one_of_that_flags_default(tmp_path, no_plots, capsys):
    configs = [real_config(fedavg, "--nc", "5", "--seed", str(seed)) for seed in (0, 1)]
    del configs[0]["compile"]  # seed 0 ran before --compile existed
    dirs = [with_config(fed(tmp_path, "nc5", 4, seed, 0.4 + 0.01 * seed), c) for seed, c in enumerate(configs)]
    shutil.copytree(dirs[1], tmp_path / "copy")
    with_config(tmp_path / "copy", {k: v for k, v in configs[1].items() if k != "compile"})  # the same run
    plan = "".join(f"fedavg dense\tfedavg/nc5_j4_dense/seed{seed}\t{json.dumps(real_config(fedavg, '--nc', '5', '--seed', str(seed)))}\n"
                   for seed in (0, 1))
    rows, report, _ = summarize_root(tmp_path)
    assert table(report, "FedAvg, dense; head ridge, K=100, C=0.1:")["Nc=5"] == [pm(0.40, 0.41)]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "same run as" in err and str(tmp_path / "copy") in err
    (tmp_path / "run_all.plan").write_text(plan)  # planned with today's flags: the older run is the planned one
    rows, report, _ = summarize_root(tmp_path)
    assert len(rows) == 2 and "All 2 runs that run_all.sh planned have finished." in report


def test_curves_average_over_the_rounds_every_seed_has():
    runs = [{"metrics": {"round": [1, 2, 3], "val_acc": [0.2, None, 0.4]}},
            {"metrics": {"round": [1, 2, 3], "val_acc": [0.4, 0.5, 0.8]}}, {"metrics": None}]
    xs, mean, std = summarize.curve(runs, "val_acc")
    assert list(xs) == [1, 3] and list(mean) == pytest.approx([0.3, 0.6])
    assert list(std) == pytest.approx([statistics.stdev([0.2, 0.4]), statistics.stdev([0.4, 0.8])])  # as the tables


# ----------------------------------------------------------------------------- bad input

def test_bad_runs_are_left_out_with_one_warning_each(tmp_path, capsys):
    write_run(tmp_path, "centralized", "grid_compare", 0, 0.8)
    fed(tmp_path, "nc5", 4, 0, 0.5)
    bad = {"not_json": "{", "list": "[1]", "binary": b"\xff\xfe\x00", "deep": "[" * 10 ** 5 + "]" * 10 ** 5,
           "unknown_stage": dict(stage="other"), "missing_key": dict(drop="test_acc"),
           "wrong_type": dict(test_acc="0.5"), "bool_seed": dict(seed=True), "nc_null": dict(nc=None),
           "best_not_dict": dict(stage="centralized", best=[0.1])}
    paths = {}
    for name, content in bad.items():
        d = fed(tmp_path, "nc10", 4, 0, 0.4, curve={1: 0.4}, head=name)
        d = d.rename(d.parent.parent / name)
        if isinstance(content, dict):
            r = json.loads((d / "result.json").read_text())
            r.pop(content.pop("drop", None), None)
            r.update(content)
            content = json.dumps(r)
        (d / "result.json").write_bytes(content if isinstance(content, bytes) else content.encode())
        paths[name] = d / "result.json"
    editing = write_run(tmp_path, "model_editing", "least-sensitive_s0.9_r4", 0, 0.6)
    fed(tmp_path, "iid", 4, 0, 0.5, mask=("least-sensitive", 0.9, 4))
    (editing / "result.json").write_text('{"stage": "model_editing"}')  # corrupt: the editing run and the
    paths["model_editing"] = editing / "result.json"                    # sparse run on its mask are left out
    no_metrics = fed(tmp_path, "nc5", 8, 0, 0.45)
    (no_metrics / "metrics.csv").unlink()  # kept, without curves: one warning
    paths["metrics"] = no_metrics / "metrics.csv"

    rows, report, _ = summarize_root(tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert all(line.startswith("warning: ") for line in err) and "Traceback" not in "".join(err)
    assert len(err) == len(paths) + 1, err
    for name, path in paths.items():  # the editing run's also in the warning of the sparse run on its mask
        assert sum(str(path) in line for line in err) == 1 + (name == "model_editing"), (name, err)
    assert sum("fedavg/iid_j4_sparse" in line and str(paths["model_editing"]) in line for line in err) == 1
    assert sorted(r["run"] for r in rows) == ["centralized/grid_compare/seed0", "fedavg/nc5_j4_dense/seed0",
                                              "fedavg/nc5_j8_dense/seed0"]
    assert table(report, "FedAvg, dense")["Nc=5"] == [pm(0.5), pm(0.45)]


def test_a_metric_that_is_not_finite_leaves_its_run_out_saying_what_it_was(tmp_path, capsys, no_plots):
    fed(tmp_path, "nc5", 4, 0, 0.5)
    d = fed(tmp_path, "nc5", 4, 1, 0.6)  # finite accuracies, an infinite test loss: kept, the loss null
    r = json.loads((d / "result.json").read_text())
    summarize.plumbing.write_json(dict(r, test_loss=float("inf")), str(d / "result.json"))
    d = fed(tmp_path, "nc5", 4, 2, 0.7)  # written by plumbing.write_json: null, "not_finite" says nan
    summarize.plumbing.write_json(dict(r, seed=2, test_acc=float("nan")), str(d / "result.json"))
    legacy = fed(tmp_path, "nc5", 4, 3, 0.7)  # a bare NaN, as older code wrote it (not JSON)
    (legacy / "result.json").write_text(json.dumps(dict(r, seed=3, test_acc=float("nan"))))
    capsys.readouterr()
    rows, report, _ = summarize_root(tmp_path)
    assert table(report, "FedAvg, dense")["Nc=5"] == [pm(0.5, 0.6)]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.endswith("; run left out") for line in err), err
    assert f'{d / "result.json"}: "test_acc" is null (it was nan), not num' in err[0]
    assert f'{legacy / "result.json"}: "test_acc" is NaN, not num' in err[1]


def test_summarize_refuses_a_missing_root(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # what `python summarize.py ROOT` runs, in-process (3 s less)
        summarize.plumbing.run_main(lambda: summarize.main([str(tmp_path / "nope")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "not a directory" in err


def test_target_flag_help_and_bad_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        summarize.main(["--help"])
    assert e.value.code == 0 and "(default: 0.9)" in capsys.readouterr().out
    for bad in ("0", "-1", "x", "inf"):
        with pytest.raises(SystemExit) as e:
            summarize.main([str(tmp_path), "--target", bad])
        assert e.value.code == 2
    assert not (tmp_path / "summary").exists()


def test_a_planned_study_counts_only_its_runs_and_lists_what_has_not_run(tmp_path, no_plots, capsys):
    """run_all.plan: the study's runs with the planned flags count; a run of other flags in a planned
    directory and a run the study never planned (an example run) are left out with a warning; the report
    lists per stage the planned runs without a result."""
    write_run(tmp_path, "centralized", "grid_compare", 0, 0.8)
    fed(tmp_path, "iid", 4, 0, 0.7)
    fed(tmp_path, "nc5", 4, 0, 0.1)  # finished, but with other flags than planned
    write_run(tmp_path, "model_editing", "random_s0.5_r4", 0, 0.05)  # never planned
    plan = [("centralized", "centralized/grid_compare/seed0", {}), ("fedavg dense", "fedavg/iid_j4_dense/seed0", {}),
            ("fedavg dense", "fedavg/nc5_j4_dense/seed0", {"epochs": 2})]
    plan += [("fedavg sparse", f"fedavg/iid_j4_sparse-least-sensitive_s0.9_r4/seed{s}", {}) for s in (0, 1)]
    (tmp_path / "run_all.plan").write_text("".join(f"{st}\t{d}\t{json.dumps(c)}\n" for st, d, c in plan))
    rows, report, _ = summarize_root(tmp_path)
    assert sorted(r["run"] for r in rows) == ["centralized/grid_compare/seed0", "fedavg/iid_j4_dense/seed0"]
    err = capsys.readouterr().err
    assert f"{tmp_path}/fedavg/nc5_j4_dense/seed0 holds a run with other flags than the study's (differs in " \
           f"epochs); run left out" in err
    assert "1 finished run(s) under" in err and "e.g. model_editing/random_s0.5_r4/seed0; left out" in err
    section = report.split("## Not run yet")[1].split("\n## ")[0]
    assert "3 of the 5 runs that run_all.sh planned have no result here" in section
    assert "- fedavg dense (1): fedavg/nc5_j4_dense (seed 0)\n" in section
    assert "- fedavg sparse (2): fedavg/iid_j4_sparse-least-sensitive_s0.9_r4 (seeds 0, 1)" in section
    assert "centralized (" not in section

    (tmp_path / "run_all.plan").unlink()  # without a plan, every finished run counts, as before
    rows, report, _ = summarize_root(tmp_path)
    assert len(rows) == 4 and "Not run yet" not in report


# ----------------------------------------------------------------------------- what each plot shows

@pytest.fixture
def figures(monkeypatch):
    """{file name: figure} of every PNG written meanwhile, drawn (tick labels placed) before it is saved."""
    figs, save = {}, summarize.plumbing.save_figure

    def keep(fig, path):
        fig.canvas.draw()
        figs[os.path.basename(path)] = fig
        save(fig, path)
    monkeypatch.setattr(summarize.plumbing, "save_figure", keep)
    return figs


def integer_ticks(ax):
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    return bool(ticks) and all(t == int(t) for t in ticks)


def visible(line):
    """Whether a line's marker is drawn at least 5 points wide (a "." is 3: lost on its own)."""
    from matplotlib.markers import MarkerStyle
    m = MarkerStyle(line.get_marker())
    return m.get_path().transformed(m.get_transform()).get_extents().width * line.get_markersize() >= 5


def test_plot_lines_gives_integer_rounds_a_visible_lone_point_and_error_bars(tmp_path, figures):
    summarize.plumbing.plot_lines(tmp_path / "a.png", {"curve": ([0, 1, 2, 3], [50.0, 60.0, 65.0, 70.0]),
                                                     "lone": ([2], [55.0])}, "round", "accuracy (%)", "t")
    ax = figures["a.png"].axes[0]
    assert integer_ticks(ax)  # not 0.5, 1.5
    lone = [line for line in ax.lines if len(line.get_xdata()) == 1]
    assert len(lone) == 1 and visible(lone[0])
    summarize.plumbing.plot_lines(tmp_path / "c.png", {"lone": ([3], [55.0])}, "round", "accuracy (%)", "t")
    ax = figures["c.png"].axes[0]
    assert integer_ticks(ax) and visible(ax.lines[0])  # its x range is under one round
    summarize.plumbing.plot_lines(tmp_path / "b.png", {"s": ([0.5, 0.9], [70.0, 60.0], [1.0, 2.0])},
                                "sparsity", "accuracy (%)", "t", integer_x=False)
    ax = figures["b.png"].axes[0]
    assert not integer_ticks(ax)  # a fraction axis keeps its fractions
    assert [c.has_yerr for c in ax.containers] == [True]
    bars = ax.containers[0].lines[2][0].get_segments()  # one vertical segment per point: mean ± std
    assert [(s[0][1], s[1][1]) for s in bars] == [(69.0, 71.0), (58.0, 62.0)]


def test_summary_plots_in_percent_with_integer_rounds_error_bars_and_two_decimals(tmp_path, figures):
    study(tmp_path)
    fed(tmp_path, "iid", 16, 0, 0.5, curve={3: 0.5})  # validated once: a curve of one point,
    fed(tmp_path, "iid", 16, 1, 0.02, curve={3: 0.02})  # whose seeds differ so much that mean - std < 0
    summarize_root(tmp_path)
    lone = figures["fedavg_dense_j16.png"].axes[0]
    assert len(lone.lines[0].get_xdata()) == 1
    band = lone.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == 0 and band.max() < 100  # an accuracy band stays within 0-100%
    for name, fig in figures.items():
        for ax in fig.axes:
            if "accuracy" in ax.get_ylabel():
                assert "(%)" in ax.get_ylabel(), name
                assert all(v > 1 for line in ax.lines for v in line.get_ydata()), name  # no fraction left
            if ax.get_xlabel().startswith("round"):
                assert integer_ticks(ax), name
            assert all(visible(line) for line in ax.lines if len(line.get_xdata()) == 1), name
    sparsity = figures["editing_sparsity.png"].axes[0]
    assert sparsity.containers and all(c.has_yerr for c in sparsity.containers)
    rules = figures["editing_rules.png"].axes[0]
    assert any(getattr(c, "errorbar", None) is not None for c in rules.containers)  # bars with error bars
    cells = [t.get_text() for ax in figures["fedavg_heatmap.png"].axes for t in ax.texts]
    assert cells and all(re.fullmatch(r"\d+\.\d\d", c) for c in cells)
    assert "60.50" in cells  # IID J=4 dense: 60% and 61% over the two seeds


def test_a_file_per_seed_is_one_setting_averaged_over_seeds(tmp_path, no_plots):
    """--hparams and --head FILE naming each seed's own file (RESULTS/STAGE/NAME/seedN/FILE) are one setting."""
    import model_editing
    for seed in (0, 1):
        hp = f"runs/centralized/grid_compare/seed{seed}/result.json"
        with_config(write_run(tmp_path, "model_editing", "warm", seed, 0.5 + 0.1 * seed, head="warmup"),
                    real_config(model_editing, "--head", "warmup", "--hparams", hp, "--seed", str(seed)))
        head = f"runs/centralized/grid_compare/seed{seed}/head.pt"
        with_config(write_run(tmp_path, "model_editing", "file", seed, 0.3 + 0.1 * seed, head=head),
                    real_config(model_editing, "--head", head, "--seed", str(seed)))
    _, report, _ = summarize_root(tmp_path)
    start = "Sparsity × calibration rounds in model editing (least-sensitive mask; head "
    assert table(report, start + "warmup, logit score")["0.9"] == [pm(0.5, 0.6)]
    assert table(report, start + "runs/centralized/grid_compare/seed*/head.pt, logit score")["0.9"] == [pm(0.3, 0.4)]


# ----------------------------------------------------------------------------- the report does not mislead

def test_the_cost_table_discriminates_a_head_learnt_from_zero_from_a_solved_head(tmp_path, no_plots):
    """Rounds to target for the runs starting below it (FedAvg learning a zero head); for a run starting at a
    solved head no round count (it would be 0 by construction) but its gain over round 0 and its best round."""
    write_run(tmp_path, "centralized", "grid_compare", 0, 0.80)  # target 0.72
    fed(tmp_path, "iid", 4, 0, 0.76, curve={0: 0.01, 2: 0.50, 4: 0.75, 6: 0.76}, train="head", head="zero")
    fed(tmp_path, "nc1", 4, 0, 0.40, curve={0: 0.01, 2: 0.20, 4: 0.40, 6: 0.38}, train="head", head="zero")
    fed(tmp_path, "iid", 4, 0, 0.78, curve={0: 0.75, 2: 0.79, 4: 0.78})  # the ridge head: solved at round 0
    _, report, _ = summarize_root(tmp_path)
    cost = table(report, "FedAvg cost")
    assert cost["run"][3:8] == ["test acc (%)", "round-0 test acc (%)", "rounds to target", "gain over round 0 "
                                "(points)", "best round"]
    zero = "head only (frozen backbone), head zero"
    row = lambda split: [line for line in report.splitlines() if line.startswith(f"| {zero} | {split} |")][0]
    assert row("IID").split(" | ")[1:9] == ["IID", "4", "300", pm(0.76), pm(0.01), "4 (1/1 reached)", pm(0.75),
                                            "6 (n=1)"]
    assert row("Nc=1").split(" | ")[6:9] == ["– (0/1 reached)", pm(0.39), "4 (n=1)"]
    assert cost["dense, head ridge"][3:8] == [pm(0.78), pm(0.75), "–", pm(0.03), "2 (n=1)"]
    assert "K=100, C=0.1" in [t for t in md_tables(report) if t.startswith("FedAvg cost")][0]  # shared: title


def test_the_zero_head_family_and_new_keys_are_read(tmp_path):
    """FedAvg training the head from a zero head (another engineer's baseline) is a family of its own in the
    split × J tables and curves, labelled with what it trains and its head; result.json and metrics.csv keys
    this summary does not know (augmentation gap, FL algorithm flags) are tolerated."""
    new = dict(head_aug_acc=0.5, aug_acc=0.4, mu=0.1, scaffold=False, aggregate="mean", server_lr=1.0)
    for split, j, a in [("iid", 4, 0.7), ("iid", 8, 0.68), ("nc1", 4, 0.5), ("nc1", 8, 0.4)]:
        d = fed(tmp_path, split, j, 0, a, curve={0: 0.01, 1: a / 2, 2: a}, train="head", head="zero", **new)
        text = (d / "metrics.csv").read_text().splitlines()
        (d / "metrics.csv").write_text("\n".join([text[0] + ",aug_acc"] + [row + ",0.3" for row in text[1:]]) + "\n")
    fed(tmp_path, "iid", 4, 0, 0.75)  # the dense ridge family beside it
    _, report, _ = summarize_root(tmp_path)
    zero = table(report, "FedProx, head only (frozen backbone); head zero, K=100, C=0.1:")  # mu 0.1: FedProx
    assert zero == {"split": ["J=4 (300 rounds)", "J=8 (300 rounds)"], "IID": [pm(0.7), pm(0.68)],
                    "Nc=1": [pm(0.5), pm(0.4)]}
    assert table(report, "FedAvg, dense; head ridge")["IID"] == [pm(0.75)]
    assert not [t for t in md_tables(report) if t.startswith("The six models (head zero)")]  # nothing sparse there
    out = tmp_path / "summary"
    assert {"fedavg_head_from-zero_j4.png", "fedavg_head_from-zero_j8.png", "fedavg_dense_j4.png"} <= \
        {p.name for p in out.iterdir()}  # named as its runs are (nc1_j4_head_from-zero): head-only, from zero


def test_the_six_models_pair_the_sgd_probe_with_editing_from_its_head(tmp_path, no_plots):
    """A head.pt of the centralized probe: "without" is that probe, "with" editing from that very head; the
    ridge head's table pairs the ridge head with editing from it; never the SGD probe beside ridge editing."""
    for seed, d in ((0, 0.0), (1, 0.01)):
        write_run(tmp_path, "centralized", "grid_compare", seed, 0.16 + d)  # the SGD probe, a poor one
        head = f"runs/centralized/grid_compare/seed{seed}/head.pt"
        write_run(tmp_path, "model_editing", "least-sensitive_s0.9_r4", seed, 0.83 + d, head_test_acc=0.765 + d)
        write_run(tmp_path, "model_editing", "probe_head", seed, 0.30 + d, head=head, head_test_acc=0.16 + d)
        fed(tmp_path, "iid", 4, seed, 0.70 + d)
        fed(tmp_path, "iid", 4, seed, 0.72 + d, mask=("least-sensitive", 0.9, 4))
        fed(tmp_path, "nc5", 4, seed, 0.20 + d, head=head)
    _, report, _ = summarize_root(tmp_path)
    ridge = table(report, "The six models (head ridge)")
    assert ridge["step-0 head alone"] == [pm(0.765, 0.775), "–"]
    assert ridge["Centralized"] == [pm(0.765, 0.775), pm(0.83, 0.84)]  # not the SGD probe's 16%
    probe = table(report, "The six models (head runs/centralized/grid_compare/seed*/head.pt)")
    assert probe["Centralized"] == [pm(0.16, 0.17), pm(0.30, 0.31)] and probe["FedAvg Nc=5"][0] == pm(0.20, 0.21)
    assert "the centralized linear probe that saved this head" in report


def test_latex_labels_whole_and_unique_captions_escaped_and_only_a_unique_best_bold():
    title = "FedAvg cost: rounds to 0.9 × the centralized validation accuracy, gain over the step-0 head"
    tie = summarize.Table(title, ["run", "a", "b"], [["x", summarize.Stat([0.5]), summarize.Stat([0.7])],
                                                      ["y", summarize.Stat([0.5]), summarize.Stat([0.6])]],
                          [None, "max", "max"], "validation every --eval-every rounds, <target>")
    md, tex = summarize.render([tie, tie])
    check_latex(tex)
    labels = re.findall(r"\\label\{([^}]*)\}", tex)
    words = "tab:" + re.sub(r"[^a-z0-9]+", "-", title.lower())
    assert labels[1] == labels[0] + "-2" and words.startswith(labels[0]) and words[len(labels[0])] == "-"
    assert r"\texttt" not in tex and r"-{}-eval-every" in tex and "--eval" not in tex  # not an en dash
    assert r"\textless{}target\textgreater{}" in tex
    assert tex.count(r"\textbf{70.00}") == 2 and r"\textbf{50.00}" not in tex  # the tie: no bold
    assert "bold: the one best mean of a column" in tex and "(n=1 seed each)" in tex and "(n=1)" not in tex
    assert summarize.Stat([2], 1, 0).text() == "2 (n=1)" and summarize.Stat([2, 3], 1, 0).text() == "2.5 ± 1 (n=2)"


def test_heatmap_of_equal_cells_has_a_scale_and_readable_text(tmp_path, figures):
    for split in ("iid", "nc5"):
        fed(tmp_path, split, 4, 0, 0.9975)
        fed(tmp_path, split, 4, 0, 0.9975, mask=("least-sensitive", 0.9, 4))
    summarize_root(tmp_path)
    fig = figures["fedavg_heatmap.png"]
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 2 and len({(im.norm.vmin, im.norm.vmax) for im in images}) == 1  # one scale
    lo, hi = images[0].norm.vmin, images[0].norm.vmax
    assert lo < 99.75 < hi and hi - lo <= 2  # a range around the value, not 90-110
    from matplotlib.colors import to_rgb
    for ax, im in zip([ax for ax in fig.axes if ax.images], images):
        for t in ax.texts:
            background = im.cmap(im.norm(float(t.get_text())))
            assert summarize.contrast(background, to_rgb(t.get_color())) >= 4.5, t.get_text()


def test_agreement_plot_tells_dense_from_sparse_outside_the_data_with_a_1_over_n_line(tmp_path, figures):
    for split in ("iid", "nc5"):
        curve = {x: 0.5 for x in range(1, 9)}
        fed(tmp_path, split, 4, 0, 0.5, curve=curve)
        fed(tmp_path, split, 4, 0, 0.5, curve=curve, mask=("least-sensitive", 0.9, 4))
    summarize_root(tmp_path)
    fig = figures["fedavg_agreement_j4.png"]
    assert not any(ax.get_legend() for ax in fig.axes) and len(fig.legends) == 1  # beside the panels
    handles = {t.get_text(): h for t, h in zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles)}
    for split in ("IID", "Nc=5"):
        d, s = handles[f"{split}, dense"], handles[f"{split}, sparse"]
        assert d.get_color() != s.get_color() and d.get_linestyle() != s.get_linestyle()
        assert d.get_marker() != s.get_marker()
    ref = [line for line in fig.axes[0].lines if "1/n" in line.get_label()]
    assert len(ref) == 1 and list(ref[0].get_ydata()) == [0.1, 0.1]  # BASE: 10 clients per round
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] != titles[1] and "moving average over 5 rounds" in fig._suptitle.get_text()  # said once


def test_sparse_evaluations_are_points_and_editing_plots_show_differences(tmp_path, figures):
    summarize.plumbing.plot_lines(tmp_path / "a.png", {"val": ([0, 6], [50.0, 60.0]), "train": ([1, 2, 3], [1, 2, 3])},
                                  "round", "accuracy (%)", "t")
    val, train = figures["a.png"].axes[0].lines[:2]
    assert val.get_linestyle() == "None" and visible(val)  # no line drawn between rounds 0 and 6
    assert train.get_linestyle() != "None" and train.get_marker() != val.get_marker()
    summarize.plumbing.plot_lines(tmp_path / "b.png", {"a": ([0.5, 0.9], [99.9, 99.9]), "b": ([0.5, 0.9], [99.9, 99.9])},
                                  "sparsity", "accuracy (%)", "t", integer_x=False, ymax=100)
    ax = figures["b.png"].axes[0]
    assert ax.get_ylim()[1] == 100 and ax.get_ylim()[0] > 95  # not past 100%, and the values not squashed
    a, b = (c.lines[0] for c in ax.containers)
    assert a.get_markersize() > b.get_markersize() and a.get_linestyle() != b.get_linestyle()  # both show
    study(tmp_path)
    summarize_root(tmp_path)
    rules = figures["editing_rules.png"].axes[0]
    values = sorted(float(t.get_text()) for t in rules.texts)
    assert values == [60.5, 70.5]  # written on the bars: least- and most-sensitive at s=0.9, r=4
    assert 0 < rules.get_ylim()[0] < 60 and rules.get_ylim()[1] < 80  # the axis shows a 10-point gap
    sparsity = figures["editing_sparsity.png"].axes[0]
    assert sparsity.get_ylim()[1] <= 100
    markers = [c.lines[0].get_marker() for c in sparsity.containers]  # each series' data line
    assert len(markers) == len(set(markers)) >= 1


def test_per_run_titles_carry_every_flag_that_differs(tmp_path, monkeypatch):
    titles = {}
    monkeypatch.setattr(fedavg.plumbing, "plot_lines", lambda path, s, x, y, title, **k: titles.setdefault(title, 0))
    rows = [{"round": 0, "train_loss": None, "val_acc": 0.5, "val_loss": 1.0, "test_acc": 0.5, "test_loss": 1.0}]
    for rule in ("least-sensitive", "random"):
        for sparsity in ("0.9", "0.5"):
            args = fedavg.get_args(["--nc", "5", "--sparse", "--rule", rule, "--sparsity", sparsity,
                                    "--out", str(tmp_path / rule / sparsity)])
            fedavg.write_outputs(rows, args)
    assert len(titles) == 4  # one per run (accuracy and loss share it)
    assert all("Nc=5, J=4, sparse" in t for t in titles) and any("rule random" in t and "sparsity 0.5" in t
                                                                 for t in titles)


def test_a_cifar100_head_far_below_the_published_probes_warns(capsys):
    import argparse
    args = argparse.Namespace(dataset="cifar100", arch=common.DEFAULT_ARCH, no_pretrained=False)
    assert common.check_head_accuracy(0.05, args) and not common.check_head_accuracy(0.78, args)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the step-0 head reaches 5.00%") and "--weights" in err[0]
    for other in (dict(dataset="synthetic"), dict(arch="test_vit"), dict(no_pretrained=True)):
        assert not common.check_head_accuracy(0.05, argparse.Namespace(**{**vars(args), **other}))
    assert capsys.readouterr().err == ""


def test_report_links_the_centralized_plots_and_cites_published_figures_as_others(tmp_path, no_plots):
    d = write_run(tmp_path, "centralized", "grid_compare", 0, 0.8, best_epoch=2)
    (d / "accuracy.png").write_bytes(b"\x89PNG")
    _, report, _ = summarize_root(tmp_path)
    assert "[accuracy](../centralized/grid_compare/seed0/accuracy.png)" in report and "[loss]" not in report
    assert table(report, "Centralized linear probe")["0.1"][3] == "2 (n=1)"  # best epoch: an integer
    section = report.split("## What to expect on CIFAR-100")[1]
    assert "published figures (not ours)" in section and "| SolarFlareZ/aml-project |" in section


# ----------------------------------------------------------------------------- older and odd result.json files

def test_a_sparse_run_of_an_older_version_without_mask_keys_is_summarized(tmp_path, no_plots, capsys):
    """result.json of older versions: no "mask_file" at all, or a null one and no "rule" (both optional)."""
    for seed, drop in ((0, ("mask_file",)), (1, ("rule",))):
        d = fed(tmp_path, "nc5", 4, seed, 0.4 + 0.1 * seed, mask=("least-sensitive", 0.9, 4), mask_file=None)
        r = json.loads((d / "result.json").read_text())
        (d / "result.json").write_text(json.dumps({k: v for k, v in r.items() if k not in drop}))
    rows, report, _ = summarize_root(tmp_path)
    assert "warning" not in capsys.readouterr().err and len(rows) == 2
    assert table(report, "FedAvg, sparse, least-sensitive s=0.9 r=4, federated")["Nc=5"] == [pm(0.4)]
    assert table(report, "FedAvg, sparse, mask of unknown rule s=0.9 r=4, federated")["Nc=5"] == [pm(0.5)]
    assert {r["mask"] for r in rows} == {"federated"}


@pytest.mark.parametrize("name", ["nc05", "nc 7", "nc1_0", "dir0.10", "nc\u0665"])
def test_a_split_name_not_written_as_fedavg_writes_it_is_refused_naming_the_file(tmp_path, no_plots, capsys, name):
    fed(tmp_path, "nc5", 4, 0, 0.4)
    odd = fed(tmp_path, "nc5", 4, 1, 0.5)
    r = json.loads((odd / "result.json").read_text())
    (odd / "result.json").write_text(json.dumps(dict(r, split=name)))
    rows, report, _ = summarize_root(tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(odd / "result.json") in err[0] and err[0].endswith("run left out"), err
    assert len(rows) == 1 and table(report, "FedAvg, dense")["Nc=5"] == [pm(0.4)]  # one row, not two "Nc=5"


# ----------------------------------------------------------------------------- every swept flag, from config.json

def sweep(root):
    """A new user's root: dense FedAvg at two --lr, FedProx, head-only runs at two --head-lr (no --lr: they
    refuse it), each with the config.json fedavg.py writes."""
    runs = {("--lr", "0.001"): 0.30, ("--lr", "0.0001"): 0.40, ("--mu", "0.01"): 0.45}
    def run(name, a, *flags, **fields):
        with_config(write_run(root, "fedavg", name, 0, a, {1: a / 2, 2: a}, j=4, iid=False, nc=5, **fields),
                    real_config(fedavg, "--nc", "5", *flags))
    for flags, a in runs.items():
        run(f"dense{flags[1]}{flags[0]}", a, *flags, mu=float(flags[1]) if flags[0] == "--mu" else 0.0)
    for hlr, a in (("0.1", 0.6), ("0.05", 0.55)):
        run(f"head{hlr}", a, "--train", "head", "--head", "zero", "--head-lr", hlr, train="head", head="zero")


def test_results_csv_carries_every_swept_flag_and_only_where_the_run_takes_it(tmp_path, no_plots):
    sweep(tmp_path)
    rows, report, _ = summarize_root(tmp_path)
    got = {(r["train"], r["lr"], r["mu"], r["head_lr"], r["algorithm"]) for r in rows}
    assert {r["score"] for r in rows} == {""}  # a calibration flag: no dense run takes it
    assert got == {("all", "0.001", "", "", "FedAvg"), ("all", "0.0001", "", "", "FedAvg"),  # FedAvg takes no --mu
                   ("all", "0.0001", "0.01", "", "FedProx"),  # dense runs take no --head-lr
                   ("head", "", "", "0.1", "FedAvg"), ("head", "", "", "0.05", "FedAvg")}  # nor these --lr
    heads = [t for t in md_tables(report) if t.startswith("FedAvg, head only")]
    assert len(heads) == 2 and all("head_lr" in t and "lr 0.0001" not in t for t in heads), heads
    assert table(report, "FedProx, dense; head ridge, K=100, C=0.1, lr 0.0001, mu 0.01")["Nc=5"] == [pm(0.45)]


def test_the_six_models_take_fedavg_where_setups_tie_and_say_which_setup(tmp_path, no_plots):
    sweep(tmp_path)
    _, report, _ = summarize_root(tmp_path)
    assert table(report, "The six models (head ridge)")["FedAvg Nc=5"][0] == pm(0.40)  # FedAvg at the default lr
    note = report.split("### The six models (head ridge)")[1].split("\n\n")[1]
    assert "FedAvg rows, the dense setup FedAvg, dense; head ridge, K=100, C=0.1, lr 0.0001." in note


@pytest.fixture
def plot_names(monkeypatch):
    """The plots are named (in report.md) but not drawn: a test of names, in a fraction of the time."""
    for name in ("plot_curves", "plot_heatmap", "plot_agreement", "plot_skew"):
        if hasattr(summarize, name):
            monkeypatch.setattr(summarize, name, lambda path, *a, **k: open(path, "wb").close())


def test_plots_are_named_as_their_runs_are_with_every_flag_that_tells_them_apart(tmp_path, plot_names):
    """docs/splits-and-names.md: what trains, the head where not the default, each setting that tells the
    setups apart off its default, in run-name short form; the default setup keeps the plain name."""
    sweep(tmp_path)
    _, report, _ = summarize_root(tmp_path)
    pngs = set(re.findall(r"!\[(fedavg_[^\]]*_j4\.png)\]", report))
    assert pngs == {"fedavg_dense_j4.png", "fedavg_dense_lr0.001_j4.png", "fedavg_dense_mu0.01_j4.png",
                    "fedavg_head_from-zero_j4.png", "fedavg_head_from-zero_hlr0.05_j4.png", "fedavg_agreement_j4.png"}
    note = [line for line in report.splitlines() if line.startswith("- The heatmap and agreement plots of head ridge")]
    assert len(note) == 1 and "FedProx, dense; head ridge, K=100, C=0.1, lr 0.0001, mu 0.01" in note[0]
    assert "FedAvg, dense; head ridge, K=100, C=0.1, lr 0.001" in note[0] and "mu 0;" not in note[0]  # the two dense runs not drawn


# ----------------------------------------------------------------------------- algorithms compared, label skew

def algo_run(root, split, seed, val, test, *flags, skew=None, **fields):
    """A FedAvg-family run with fedavg.py's config.json for these flags; final val/test accuracies apart."""
    name = "_".join([split, "j4", "dense"] + [f.strip("-") for f in flags]) or "fedavg"
    extra = {} if skew is None else dict(label_skew=skew)
    d = write_run(root, "fedavg", name, seed, test, {1: val / 2, 2: val}, j=4, iid=split == "iid",
                  nc=None if split == "iid" else int(split[2:]), val_acc=val, **extra, **fields)
    return with_config(d, real_config(fedavg, *splits.split_flags(split), *flags, "--seed", str(seed)))


def algorithms_root(root):
    for seed in (0, 1):
        for split, fedavg_test, prox in (("nc5", 0.41 + 0.02 * seed, 0.40 + 0.04 * seed), ("iid", 0.60 + 0.01 * seed,
                                                                                         0.70 + 0.02 * seed)):
            skew = 0.0 if split == "iid" else 0.9
            algo_run(root, split, seed, 0.5, fedavg_test, skew=skew)
            algo_run(root, split, seed, 0.6, prox, "--mu", "0.1", skew=skew, mu=0.1)  # the best on validation,
            algo_run(root, split, seed, 0.55, 0.9, "--mu", "0.01", skew=skew, mu=0.01)  # not on test


def test_each_algorithm_at_its_setting_picked_on_validation_beside_fedavg(tmp_path, no_plots):
    algorithms_root(tmp_path)
    _, report, tex = summarize_root(tmp_path)
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")[2:]]
            for line in report.split("### Algorithms at their selected settings, dense, from the step-0 head")[1]
            .split("###")[0].splitlines() if line.startswith("| ") and not line.startswith("| split")}
    assert rows[("IID", "FedAvg")] == ["–", "1", pm(0.5, 0.5), pm(0.60, 0.61), "–"]
    assert rows[("IID", "FedProx")] == ["mu 0.1", "2", pm(0.6, 0.6), pm(0.70, 0.72), "+10.50 ± 0.71 (n=2)"]
    assert rows[("Nc=5", "FedProx")][:2] == ["mu 0.1", "2"]  # picked on validation, not mu 0.01's 90% on test
    assert rows[("Nc=5", "FedProx")][4] == "+0.00 ± 1.41 (n=2) ≈"  # -1 and +1 points: within the spread
    assert r"$\approx$" in tex


def test_label_skew_is_a_column_of_the_split_tables(tmp_path, no_plots):
    algorithms_root(tmp_path)
    _, report, _ = summarize_root(tmp_path)
    t = table(report, "FedAvg, dense; head ridge")
    assert t["split"][-1] == "label skew" and t["IID"][-1] == "0.000 ± 0.000 (n=2)" and t["Nc=5"][-1] == "0.900 ± 0.000 (n=2)"


def test_accuracy_and_agreement_against_label_skew_one_line_per_algorithm(tmp_path, figures, monkeypatch):
    for other in ("plot_curves", "plot_agreement"):  # not looked at here: not drawn (seconds)
        monkeypatch.setattr(summarize, other, lambda path, *a: open(path, "wb").close())
    algorithms_root(tmp_path)
    old = fed(tmp_path, "nc1", 4, 0, 0.1)  # an older run: no label_skew
    _, report, _ = summarize_root(tmp_path)
    fig = figures["fedavg_label-skew_j4.png"]
    top = fig.axes[0]
    lines = {c.get_label(): c.lines[0] for c in top.containers}  # errorbar: its data line
    assert set(lines) == {"FedAvg", "FedProx"}
    assert list(lines["FedProx"].get_xdata()) == [0.0, 0.9]  # IID, then Nc=5: at its label skew
    assert list(lines["FedProx"].get_ydata()) == pytest.approx([71.0, 42.0])  # mu 0.1, picked on validation
    assert 0 <= top.get_ylim()[0] and top.get_ylim()[1] <= 100
    assert fig.legends and [t.get_text() for t in fig.legends[0].get_texts()] == ["FedAvg", "FedProx"]
    note = [line for line in report.splitlines() if line.startswith("- Left off the label-skew plots")]
    assert len(note) == 1 and str(old) in note[0]


def test_no_figure_overlaps_cuts_or_leaves_a_line_unlabelled_and_accuracy_stays_within_0_100(tmp_path, figures):
    """Every figure of a summary of mixed setups, algorithms, label skews and runs at 100%: no two titles or
    legends overlap, every title lies whole inside its figure, every drawn line is named in a legend, an
    accuracy axis or colour bar stays within 0-100 and a marker at 100% is drawn whole (not clipped)."""
    algorithms_root(tmp_path)
    for seed in (0, 1):  # at 100% from round 5 on, every seed: equal heatmap cells at the top of the scale
        for split in ("iid", "nc5"):
            fed(tmp_path, split, 16, seed, 1.0, curve={x: min(1.0, 0.9 + 0.02 * x) for x in range(9)})
            fed(tmp_path, split, 16, seed, 1.0, mask=("least-sensitive", 0.9, 4), curve={x: 1.0 for x in range(9)})
    summarize_root(tmp_path)
    assert {"fedavg_heatmap.png", "fedavg_agreement_j16.png", "fedavg_label-skew_j4.png"} <= set(figures)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    for name, fig in figures.items():
        canvas = FigureCanvasAgg(fig)  # the figure was closed when saved
        canvas.draw()
        renderer = canvas.get_renderer()
        box = fig.bbox
        texts = [t for t in [fig._suptitle] + [ax.title for ax in fig.axes] if t is not None and t.get_text()]
        boxes = [t.get_window_extent(renderer) for t in texts] + [lg.get_window_extent(renderer) for lg in fig.legends]
        for i, a in enumerate(boxes):
            assert box.x0 - 1 <= a.x0 and a.x1 <= box.x1 + 1 and a.y1 <= box.y1 + 1, (name, a)  # whole
            assert not any(a.overlaps(b) for b in boxes[i + 1:]), name
        for ax in fig.axes:
            in_containers = {id(x): c.get_label() for c in ax.containers
                             for x in [c.lines[0], *c.lines[1], *c.lines[2]] if x is not None}
            for line in ax.lines:
                label = in_containers.get(id(line), line.get_label())
                assert not label.startswith("_"), (name, label)  # named in a legend
                if "accuracy" in ax.get_ylabel() and 100 in list(line.get_ydata()):
                    assert not line.get_clip_on(), name  # drawn whole at the top edge
            if "accuracy" in ax.get_ylabel():
                assert 0 <= ax.get_ylim()[0] and ax.get_ylim()[1] <= 100, (name, ax.get_ylim())
            for im in ax.images:
                assert 0 <= im.norm.vmin and im.norm.vmax <= 100, name


def test_a_wide_or_long_table_is_cut_into_parts_at_8_pt_never_shrunk():
    """The cost table of many columns (once \\resizebox'ed to about 5 pt): parts of its columns, each with the
    label columns, each within the text width as estimated, in \\footnotesize (8 pt); 70 rows: 3 parts."""
    header = ["run", "split"] + [f"measure {i} (%)" for i in range(9)]
    rows = [[f"setup {r}, a label of some length", "Nc=5"] + [summarize.Stat([0.5, 0.6])] * 9 for r in range(70)]
    md, tex = summarize.render([summarize.Table("Wide", header, rows, [None] * 11)])
    check_latex(tex)
    tables = tex.split(r"\begin{table}")[1:]
    assert all("\\footnotesize\n" in t for t in tables) and r"\label{tab:wide}" in tables[0]
    heads = [re.search(r"\\toprule\n(.*) \\\\\n", t).group(1) for t in tables]
    per_rows = len(set(heads))  # the column parts, repeated for each part of the rows
    assert per_rows > 1 and len(tables) == 3 * per_rows
    cols = [h.split(" & ") for h in heads[:per_rows]]
    assert all(c[:2] == ["run", "split"] for c in cols)  # the labels in every part
    assert sum(len(c) - 2 for c in cols) == 9  # every measure once
    shown = [[c.text() if isinstance(c, summarize.Stat) else c for c in row] for row in rows]
    size, groups = summarize.column_parts(header, shown, [True, False] + [False] * 9, [False, False] + [True] * 9)
    width = lambda i: max(len(s[i]) for s in shown) * summarize.CHAR_PT[size] + summarize.COLUMN_PAD_PT
    assert all(sum(summarize.WRAP_PT + 12 if i == 0 else width(i) for i in g) <= summarize.TEXT_WIDTH_PT
               for g in groups)
    assert md.count("| setup") == 70  # report.md keeps the table whole


def test_tables_tex_flushes_its_floats_every_few_tables():
    """A study's 100+ tables in a row overflowed LaTeX's queue of unplaced floats (pdflatex stopped after 51):
    a \\clearpage follows every TEX_FLUSH tables, so none waits behind more than that."""
    doc = [summarize.Table(f"table {i}", ["a", "b"], [["x", "1"]]) for i in range(3 * summarize.TEX_FLUSH + 2)]
    _, tex = summarize.render(doc)
    runs = [chunk.count(r"\end{table}") for chunk in tex.split(r"\clearpage")]
    assert runs == [summarize.TEX_FLUSH] * 3 + [2], runs
