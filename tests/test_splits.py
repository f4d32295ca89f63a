"""The federated split's identity (--iid / --nc / --dirichlet), Dirichlet shards, and run names that
carry every flag that defines a run."""
import csv
import json

import pytest
import torch

import algorithms
import centralized
import fedavg
import model_editing
import plumbing
import splits
from conftest import TINY
from helpers import count_calls, parse_refused, run_as_script


def labels(n_per_class, classes=100, seed=0):
    y = torch.arange(n_per_class * classes) % classes
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


def dirichlet(y, k, alpha, min_shard=1, seed=0):
    return splits.Dirichlet(alpha, min_shard=min_shard).shards(y, k, plumbing.stream("shards", seed))


# ----------------------------------------------------------------------------- Dirichlet shards

@pytest.mark.parametrize("k,alpha", [(100, 0.1), (10, 1.0), (37, 1000.0)])
def test_dirichlet_shards_hold_every_sample_exactly_once(k, alpha):
    y = labels(50)
    shards = dirichlet(y, k, alpha)
    assert len(shards) == k
    every = torch.cat(shards)
    assert torch.equal(torch.sort(every).values, torch.arange(len(y)))


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_class_concentration_follows_alpha(alpha):
    """For Dir(alpha) proportions p over K clients, E[sum_k p_k^2] = (alpha + 1) / (K alpha + 1): 0.1 at
    alpha 0.1 (a class sits on ~10 clients), ~0.0101 at alpha 100 (spread evenly, as IID's 1/K). The
    mean over CIFAR-100's 100 classes of 450 samples each must be within 10% of it (a fixed seed)."""
    k, y = 100, labels(450)
    shards = dirichlet(y, k, alpha)
    counts = torch.stack([torch.bincount(y[s], minlength=100) for s in shards]).double()  # client x class
    share = counts / counts.sum(0)
    measured = float(share.square().sum(0).mean())
    expected = (alpha + 1) / (k * alpha + 1)
    assert measured == pytest.approx(expected, rel=0.1), (measured, expected)


def test_small_alpha_gives_clients_few_classes_and_large_alpha_near_iid():
    y = labels(450)
    rows = {a: splits.shard_rows(dirichlet(y, 100, a), y) for a in (0.1, 1000.0)}
    share = {a: sorted(r["largest_class_share"] for r in rs) for a, rs in rows.items()}
    classes = {a: sorted(r["classes"] for r in rs) for a, rs in rows.items()}
    # alpha 0.1, the median client: under half of the classes, a tenth or more of its samples from one
    # (measured: 35 classes, 0.165); alpha 1000: every client holds every class, none above 2% (IID: 1%)
    assert classes[0.1][50] < 50 and share[0.1][50] > 0.1
    assert classes[1000.0][0] == 100 and share[1000.0][-1] < 0.02


def test_min_shard_holds_by_drawing_again(monkeypatch):
    """Dir(0.3) over 100 clients of 2000 images: the first draw leaves some client below 11 samples (the
    smallest of a draw measured 7-12); the split drawn again (from the same stream: still seeded) has every
    client at 11 or more."""
    y = labels(20)
    first = min(map(len, dirichlet(y, 100, 0.3, min_shard=1)))
    assert first < 11
    draws = count_calls(monkeypatch, splits, "dirichlet_draw")
    shards = dirichlet(y, 100, 0.3, min_shard=11)
    assert min(map(len, shards)) >= 11 and draws["n"] > 1
    again = dirichlet(y, 100, 0.3, min_shard=11)
    assert all(torch.equal(a, b) for a, b in zip(shards, again))


def test_an_impossible_min_shard_is_one_error():
    y = labels(20)
    with pytest.raises(plumbing.UserError, match=r"none of 100 draws .* raise --dirichlet .*or lower --k or --min-shard"):
        dirichlet(y, 100, 0.01, min_shard=19)
    with pytest.raises(plumbing.UserError, match=r"--k 100 clients x --min-shard 21 > 2000"):
        dirichlet(y, 100, 10.0, min_shard=21)


@pytest.mark.parametrize("bad,says", [(["--dirichlet", "0.5", "--nc", "5"], "--nc and --dirichlet exclude"),
                                      (["--iid", "--dirichlet", "0.5"], "--iid and --dirichlet exclude"),
                                      (["--min-shard", "5"], "--min-shard would be ignored"),
                                      (["--dirichlet", "0"], "must be a finite number > 0"),
                                      (["--dirichlet", "nan"], "must be a finite number > 0"),
                                      (["--dirichlet", "inf"], "must be a finite number > 0"),
                                      (["--dirichlet", "1", "--min-shard", "0"], "must be >= 1")])
def test_bad_split_flags_are_refused(bad, says, capsys):
    assert says in parse_refused(fedavg.get_args, bad, capsys)


def test_a_dirichlet_run_names_its_split_everywhere(tmp_path, capsys):
    argv = TINY + ["--synthetic-size", "1000", "--k", "10", "--c", "0.5", "--rounds", "1", "--batch-size", "8",
                   "--dirichlet", "0.5", "--results", str(tmp_path)]
    fedavg.main(argv)
    out = tmp_path / "fedavg" / "dir0.5_j4_dense_R1_synthetic_n1000_test-vit_random_px32_b8_k10_c0.5" / "seed0"
    said = capsys.readouterr().out
    assert "10 clients (Dir(0.5), " in said
    result = json.loads((out / "result.json").read_text())
    assert result["split"] == "dir0.5" and result["iid"] is False and result["nc"] is None
    with open(out / "shards.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and sum(int(r["samples"]) for r in rows) == 900  # 1000 minus the 10% validation
    assert min(int(r["samples"]) for r in rows) >= splits.Dirichlet.MIN_SHARD
    assert all(0 < float(r["largest_class_share"]) <= 1 for r in rows)
    # the label skew: the mean of the clients' label_tv, in result.json and in the start-up line
    assert 0.1 < result["label_skew"] < 0.9
    assert result["label_skew"] == pytest.approx(sum(float(r["label_tv"]) for r in rows) / 10, abs=1e-5)
    assert f"label skew {result['label_skew']:.3f})" in said


def test_an_impossible_dirichlet_split_writes_nothing(tmp_path, capsys):
    argv = TINY + ["--synthetic-size", "1000", "--k", "10", "--dirichlet", "0.01", "--min-shard", "80",
                   "--out", str(tmp_path / "run")]
    status, err = run_as_script(fedavg.main, argv, capsys)
    assert status == 2 and len(err) == 1 and "raise --dirichlet" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_huge_alpha_is_refused_and_a_failed_draw_at_a_large_one_does_not_advise_raising_it(capsys):
    """--dirichlet 1.7e308 made numpy's proportions all 0 (every sample on the last client), and the draws'
    failure advised "raise --dirichlet". It is refused as a flag now, and at an alpha where a larger one no
    longer evens the shards out, the failure names what does help."""
    said = parse_refused(fedavg.get_args, ["--dirichlet", "1.7e308"], capsys)
    assert "--dirichlet must be at most 1e+06" in said and "raise" not in said
    assert fedavg.get_args(["--dirichlet", "1e6"]).split == "dir1e+06"  # the bound itself is a split
    # 45 samples of each of 10 classes over 25 clients: near-even proportions cut every class at the same
    # places (1.8 a client: 1 or 2), so the same clients get 10 samples at every large alpha, never 18
    y = labels(45, classes=10)
    with pytest.raises(plumbing.UserError) as e:
        dirichlet(y, 25, 1000.0, min_shard=18)
    assert "raise --dirichlet" not in str(e.value) and "lower --k or --min-shard" in str(e.value)
    with pytest.raises(plumbing.UserError, match="raise --dirichlet"):  # where a larger alpha is worth a try
        dirichlet(y, 25, 0.01, min_shard=18)


def test_split_names_are_exact():
    """Two alphas never share a split name (nor a run name): :g would round 0.1000001 to 0.1."""
    assert splits.split_name(dirichlet=0.1000001) != splits.split_name(dirichlet=0.1) == "dir0.1"
    assert splits.parse_split(splits.split_name(dirichlet=0.1000001)) == splits.Dirichlet(0.1000001)
    assert fedavg.get_args(splits.split_flags("dir0.1000001")).split == "dir0.1000001"
    assert splits.split_label("dir0.1000001") == "Dir(0.1000001)" != splits.split_label("dir0.1")


# ----------------------------------------------------------------------------- the split kinds: names, flags

NAMES = ["iid", "nc1", "nc5", "nc100", "dir0.1", "dir1e-05", "dir0.1000001", "dir1e+06", "dir1000"]


def test_every_name_is_its_split_and_back():
    """Name -> split -> name, flags -> split -> name, for every kind (and every kind's example); labels and
    sort keys tell names apart."""
    for name in NAMES + [kind.example for kind in splits.KINDS]:
        split = splits.parse_split(name)
        assert splits.canonical(name) == split.name == name
        args = fedavg.get_args(splits.split_flags(name) + (["--k", "100"] if name.startswith("nc") else []))
        assert args.split == name and splits.of_args(args) == split
        assert splits.split_name(**{type(split).dest(): split.value}) == name
    assert len({splits.split_label(n) for n in NAMES}) == len({splits.split_order(n) for n in NAMES}) == len(NAMES)
    assert sorted(NAMES, key=splits.split_order) == ["iid", "dir1e+06", "dir1000", "dir0.1000001", "dir0.1",
                                                     "dir1e-05", "nc100", "nc5", "nc1"]
    assert [splits.split_label(n) for n in ("iid", "nc5", "dir0.1")] == ["IID", "Nc=5", "Dir(0.1)"]


@pytest.mark.parametrize("name", ["nc05", "nc 7", "nc1_0", "nc+5", "dir0.10", "dir1e-5", "dir.1", "nc\u0665",
                                  "dir\uff10.1", "nc0", "nc101", "dir0", "dir-1", "dirnan", "dirinf", "dir2e6",
                                  "iid0", "IID", "nc", "dir", "", "x5"])
def test_a_non_standard_or_impossible_name_is_refused(name):
    """Only a split's one standard spelling is a name: nc05 or a non-ASCII digit (Arabic-Indic five, a
    full-width zero) read as a number would make a second table row, labelled Nc=5 like the first."""
    with pytest.raises(ValueError):
        splits.canonical(name)
    with pytest.raises(ValueError):
        splits.split_label(name)


def test_the_kinds_names_never_overlap_and_their_flags_come_from_the_registry(capsys):
    """No kind's prefix starts another's (a name has one reading); every kind's flags are in fedavg.py's
    parser, in config.json, and in SPLIT_FLAGS; NAME_FLAGS are those the run name's core holds."""
    prefixes = [k.prefix for k in splits.KINDS]
    assert not [(a, b) for a in prefixes for b in prefixes if a != b and b.startswith(a)]
    config = plumbing.run_config(fedavg.get_args([]))
    assert set(splits.SPLIT_FLAGS) <= set(config) and set(splits.NAME_FLAGS) <= set(splits.SPLIT_FLAGS)
    assert {"iid", "nc", "dirichlet", "min_shard"} <= set(splits.SPLIT_FLAGS)
    helps = " ".join(parse_help(capsys))
    others = " or ".join(k.flag for k in splits.KINDS if k is not splits.IID)
    assert f"IID shards (what a run without {others} gets)" in helps and "--nc or --dirichlet" in others
    assert all(f"{kind.flag} " in helps for kind in splits.KINDS)


def parse_help(capsys):
    with pytest.raises(SystemExit):
        fedavg.get_args(["--help"])
    return capsys.readouterr().out.split()


def test_a_split_read_back_from_config_json_is_the_run_s():
    """SPLIT_FLAGS are what config.json must hold to give the run's split (with --seed, its shards)."""
    for flags in ([], ["--nc", "5"], ["--dirichlet", "0.3", "--min-shard", "3"]):
        args = fedavg.get_args(flags)
        config = {k: v for k, v in plumbing.run_config(args).items() if k in splits.SPLIT_FLAGS}
        assert splits.of_config(config) == splits.of_args(args)
    assert splits.of_config({"dirichlet": 0.3, "min_shard": 3}).min_shard == 3
    assert splits.of_config({"dirichlet": 0.3}).min_shard == splits.Dirichlet.MIN_SHARD  # an older config


def test_python_fedavg_nc5_j8_sparse_keeps_its_flags_and_name():
    args = fedavg.get_args(["--nc", "5", "--j", "8", "--sparse", "--results", "R"])
    assert (args.nc, args.split, args.iid) == (5, "nc5", False)
    assert args.out == "R/fedavg/nc5_j8_sparse-least-sensitive_s0.9_r4_R300/seed0"  # as before splits.py


# ----------------------------------------------------------------------------- label skew

def test_label_skew_of_hand_made_shards():
    """TV_i = 1/2 sum_c |p_i(c) - q(c)|, q the labels of all the clients' samples together."""
    y = torch.tensor([0, 0, 1, 1])
    assert splits.label_skew([torch.tensor([0, 1]), torch.tensor([2, 3])], y) == 0.5  # one class each: 1 - 1/2
    assert splits.label_skew([torch.tensor([0, 2]), torch.tensor([1, 3])], y) == 0.0  # each as the whole
    y = torch.tensor([0, 0, 0, 1])  # q = (3/4, 1/4); client 0 (1, 0): TV 1/4; client 1 (2/3, 1/3): TV 1/12
    shards = [torch.tensor([0]), torch.tensor([1, 2, 3])]
    assert splits.client_tv(shards, y).tolist() == pytest.approx([1 / 4, 1 / 12], abs=1e-15)
    assert splits.label_skew(shards, y) == pytest.approx(1 / 6, abs=1e-15)  # each client counts once
    y = torch.arange(12) % 4  # 4 balanced classes, two per client: 1 - 2/4
    shards = [torch.nonzero((y == a) | (y == b)).flatten() for a, b in ((0, 1), (2, 3), (0, 2), (1, 3))]
    assert splits.label_skew(shards, y) == pytest.approx(0.5, abs=1e-15)
    rows = splits.shard_rows(shards, y)
    assert [r["label_tv"] for r in rows] == pytest.approx([0.5] * 4)


def test_label_skew_orders_the_splits_on_one_axis():
    """On balanced labels (as --dataset synthetic's and CIFAR-100's training set, K = 100): Nc=N is exactly
    1 - N/100, IID is near 0 (each client's 4 or 5 samples of a class against the 4.5 of the whole), and
    Dirichlet falls with alpha, between them."""
    y = labels(450)
    skew = {f: splits.label_skew(splits.make_shards(y, splits.parse_split(f), 100, 0), y)
            for f in ("iid", "nc1", "nc5", "dir0.1", "dir10")}
    assert skew["nc1"] == pytest.approx(0.99) and skew["nc5"] == pytest.approx(0.95)
    assert skew["nc1"] > skew["nc5"] > skew["dir0.1"] > skew["dir10"] > skew["iid"]
    assert skew["iid"] == pytest.approx(0.5 * 100 * (0.5 / 450), rel=1e-9)  # |4/450 - 1/100| = |5/450 - 1/100|


# ----------------------------------------------------------------------------- run names

SCRIPTS = {"fedavg": fedavg, "centralized": centralized, "model_editing": model_editing}
# Flags some other flags need (--min-shard needs --dirichlet, --warmup-rounds --head warmup, ...)
CONTEXTS = {"fedavg": [[], ["--j", "8"], ["--sparse"], ["--head", "warmup"], ["--train", "head"],
                       *(splits.split_flags(kind.example) for kind in splits.KINDS if kind.more_flags),
                       *(c.example for c in algorithms.REGISTRY.values())],
            "centralized": [[], ["--grid"]],
            "model_editing": [[], ["--head", "warmup"]]}
HOW_FLAGS = {"amp", "deterministic", "compile", "eval_batch_size"}  # how a run computes, not what
SAME_RUN = {"iid"}  # --iid is what a run without --nc or --dirichlet gets: it never changes config.json


def parser_of(script, argv, monkeypatch):
    """The script's parser (argparse), caught as get_args parses."""
    caught = []
    real = plumbing.Parser.parse_args
    monkeypatch.setattr(plumbing.Parser, "parse_args", lambda self, *a, **k: caught.append(self) or real(self, *a, **k))
    SCRIPTS[script].get_args(argv)
    monkeypatch.undo()
    return caught[0]


def other_values(action):
    """Values to try for a flag other than its default: any other choice, or the switch, or a few numbers,
    a path, part of a comma list; the parser (and get_args) decide which are valid."""
    if action.nargs == 0:
        return [None]
    if action.choices:
        return [c for c in action.choices if c != action.default]
    values = ["3", "0.5", "0.05", "10", "x/y/f.pt"]
    if isinstance(action.default, str) and "," in action.default:
        values.append(action.default.split(",")[0])
    return values


def parsed(script, argv, capsys):
    try:
        return SCRIPTS[script].get_args(argv)
    except SystemExit:
        capsys.readouterr()
        return None


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_that_defines_a_run_names_its_directory(script, monkeypatch, capsys):
    """For every flag config.json records, in every context: a value that changes the run's config.json
    changes its directory, so no two runs ever need --out to live side by side. The flags that say how a
    run computes (HOW_FLAGS) leave the name as it is. A flag added later is checked without an entry here."""
    actions = {a.dest: a for a in parser_of(script, [], monkeypatch)._actions}
    recorded = set(plumbing.run_config(SCRIPTS[script].get_args([])))
    named = set()
    for context in CONTEXTS[script]:
        base = SCRIPTS[script].get_args(context)
        for flag in sorted(recorded):
            option = actions[flag].option_strings[0]
            for value in other_values(actions[flag]):
                a = parsed(script, context + [option] + ([] if value is None else [value]), capsys)
                if a is None or plumbing.run_config(a) == plumbing.run_config(base):
                    continue
                differ = {k for k, v in plumbing.run_config(a).items() if plumbing.run_config(base)[k] != v}
                if flag in HOW_FLAGS:
                    assert a.out == base.out, (flag, value, a.out)
                elif differ == {"scale_rounds"}:  # at J=4 it runs the same rounds: the same run
                    assert a.out == base.out and a.rounds == base.rounds
                else:
                    assert a.out != base.out, (context, flag, value, a.out)
                    named.add(flag)
    assert named == recorded - HOW_FLAGS - SAME_RUN, recorded - HOW_FLAGS - SAME_RUN - named  # all tried for real


@pytest.mark.parametrize("script,argv,name", [
    ("fedavg", [], "fedavg/iid_j4_dense/seed0"),
    ("fedavg", ["--nc", "5", "--sparse", "--scale-rounds", "--j", "8", "--deterministic"],
     "fedavg/nc5_j8_sparse-least-sensitive_s0.9_r4/seed0"),  # the study's runs keep their names
    ("fedavg", ["--j", "8"], "fedavg/iid_j8_dense_R300/seed0"),  # 300 rounds, not the 150 of --scale-rounds
    ("fedavg", ["--iid", "--lr", "0.001", "--seed", "2"], "fedavg/iid_j4_dense_lr0.001/seed2"),
    ("fedavg", ["--dirichlet", "0.1", "--min-shard", "2", "--no-aug"], "fedavg/dir0.1_j4_dense_ms2_noaug/seed0"),
    ("fedavg", TINY + ["--weights", "standin-sharp", "--rounds", "4", "--scale-rounds", "--j", "8",
                       "--eval-every", "2", "--test-every", "2"],
     "fedavg/iid_j8_dense_R2_synthetic_test-vit_standin-sharp_random_px32_ev2_te2/seed0"),
    ("centralized", ["--grid", "--compare-schedulers"], "centralized/grid_compare/seed0"),
    ("centralized", [], "centralized/lr0.01_m0.9_wd0.0_cosine/seed0"),
    ("centralized", ["--grid", "--grid-lr", "0.1,0.01", "--schedulers", "cosine,constant"],
     "centralized/grid_cosine_glr0.1,0.01_scheds-cosine,constant/seed0"),
    ("model_editing", [], "model_editing/least-sensitive_s0.9_r4/seed0"),
    ("model_editing", ["--rule", "random", "--epochs", "1", "--fisher-batches", "1"],
     "model_editing/random_s0.9_r4_fb1_ep1/seed0"),
])
def test_run_names_are_short_and_readable(script, argv, name):
    assert SCRIPTS[script].get_args(argv + ["--results", "R"]).out == "R/" + name


def test_a_flag_no_table_knows_is_named_by_itself():
    """A flag another stage adds later needs no entry: its own name, its value."""
    args = fedavg.get_args([])
    args.given = dict(args.given, server_lr=0.5, ties=True)
    args.defaults = dict(args.defaults, server_lr=1.0, ties=False)
    assert plumbing.run_name(args, "fedavg", "core", set()) == "runs/fedavg/core_server-lr0.5_ties/seed0"


@pytest.mark.parametrize("flag", ["--grid-lr", "--grid-momentum", "--grid-wd"])
def test_grid_values_one_trial_would_merge_are_refused(flag, capsys):
    """0.1 and 0.1000001 (or 0.1 twice) would be one trial name and two identical grid.csv rows."""
    for values in ("0.1,0.1000001", "0.5,0.5"):
        assert "give distinct values" in parse_refused(centralized.get_args, ["--grid", flag, values], capsys)
    a = centralized.get_args(["--grid", flag, "0.1,0.1001"])
    base = dict(lr=0.1, momentum=0.9, wd=0.0, scheduler="cosine")
    hps = [dict(base, **{flag[7:]: v}) for v in getattr(a, flag[2:].replace("-", "_"))]
    assert len({centralized.trial_key(hp) for hp in hps}) == 2


# ----------------------------------------------------------------------------- the summary

def test_summary_orders_and_labels_splits_and_names_the_plots_of_a_sweep(tmp_path):
    """A Dirichlet run sits between IID and Nc in the tables, labelled Dir(0.1); its split comes from
    result.json's "split" (an older result.json without one: from iid/nc). Setups apart only in --lr get
    curve plots named by it, not by a counter."""
    from test_summarize import real_config, summarize_root, table, with_config, write_run
    for split, acc in (("iid", 0.6), ("nc5", 0.4), ("dir0.1", 0.5)):
        kind = dict(split=split) if split.startswith("dir") else {}  # the older runs: no "split" key
        with_config(write_run(tmp_path, "fedavg", f"{split}_j4_dense", 0, acc, {2: acc}, iid=split == "iid",
                              nc=5 if split == "nc5" else None, **kind),
                    real_config(fedavg, *splits.split_flags(split)))
    for lr in ("0.001", "0.0003"):
        with_config(write_run(tmp_path, "fedavg", f"nc5_j4_dense_lr{lr}", 0, 0.1, {2: 0.1}, nc=5),
                    real_config(fedavg, "--nc", "5", "--lr", lr))
    rows, report, _ = summarize_root(tmp_path)
    assert list(table(report, "FedAvg, dense; head ridge, K=100, C=0.1, lr 0.0001")) == \
        ["split", "IID", "Dir(0.1)", "Nc=5"]
    assert {r["split"] for r in rows} == {"iid", "nc5", "dir0.1"}
    pngs = {p.name for p in (tmp_path / "summary").glob("fedavg_*_j4.png")} - {"fedavg_agreement_j4.png"}
    assert {"fedavg_dense_j4.png", "fedavg_dense_lr0.001_j4.png", "fedavg_dense_lr0.0003_j4.png"} == pngs


def test_the_summary_leaves_out_a_run_whose_split_name_is_not_standard(tmp_path, capsys):
    """A result.json with "split": "nc05" (hand-edited, or written by another tool) would be a second
    Nc=5 row in every table: the run is left out with a warning naming the standard spelling."""
    import summarize
    from test_summarize import write_run
    for name in ("nc5", "nc05", "nc\u0665", "dir0.10", "iid"):
        write_run(tmp_path / name, "fedavg", "run", 0, 0.5, {1: 0.5}, iid=name == "iid",
                  nc=5 if name.startswith("nc") else None, split=name)
    runs = [r for name in ("nc5", "nc05", "nc\u0665", "dir0.10", "iid") for r in summarize.load_runs(tmp_path / name)]
    assert sorted(r["split"] for r in runs) == ["iid", "nc5"]
    err = capsys.readouterr().err
    assert "'nc05' is not the standard spelling of the split 'nc5': write nc5" in err and "write dir0.1" in err
    assert err.count("run left out") == 3
