"""Benchmark: what each FL algorithm of fedavg.py does to final accuracy and to update agreement, on a
pretrained stand-in (tiny ViT, synthetic CIFAR-shaped data), dense and --sparse, over seeds. Runs are
seconds each (small set, few rounds) and run one after another in this process; prints one Markdown
table: test accuracy at the end (mean ± std over seeds, in %), and the mean agreement over the rounds.

    OMP_NUM_THREADS=1 python benchmarks/bench_algorithms.py                         # the default grid
    python benchmarks/bench_algorithms.py --weights standin --splits iid --seeds 0 --rounds 5
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ALGORITHMS = {  # name: fedavg.py flags (hyperparameters are single, untuned guesses: see docs/extending.md)
    "FedAvg": [],
    "FedProx mu=0.1": ["--mu", "0.1"],
    "FedAvgM 0.9, lr 0.1": ["--server-momentum", "0.9", "--server-lr", "0.1"],
    "FedAdam lr 1e-2": ["--server-opt", "adam", "--server-lr", "1e-2"],
    "FedYogi lr 1e-2": ["--server-opt", "yogi", "--server-lr", "1e-2"],
    "SCAFFOLD": ["--scaffold"],
    "TIES keep 0.2": ["--aggregate", "ties"],
    "FedDyn alpha 0.01": ["--feddyn-alpha", "0.01"],
    "Median": ["--aggregate", "median"],
    "FedGMA tau 0.4": ["--aggregate", "gma"],
    "FisherMerge": ["--aggregate", "fisher"],
}
# Dir(0.1) with --min-shard 5: at 2000 synthetic images no draw gives each of 100 clients the default 10
SPLITS = {"iid": ["--iid"], "nc1": ["--nc", "1"], "dir0.1": ["--dirichlet", "0.1", "--min-shard", "5"]}


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", nargs="+", default=["standin@1e-4", "standin-sharp@1e-3"],
                   help="stand-ins as NAME@LR, LR the client learning rate of its runs (at 1e-4 FedAvg keeps "
                        "standin-sharp's accuracy everywhere: nothing to compare)")
    p.add_argument("--splits", nargs="+", default=["iid", "nc1"], choices=list(SPLITS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--data-dir", default=None, help="where the stand-ins are cached (default: a temporary folder)")
    return p.parse_args()


def run(flags):
    """fedavg.main on flags in a fresh folder, quietly: (test accuracy, mean agreement over the rounds,
    test accuracy at round 0)."""
    import fedavg
    import plumbing
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        try:
            fedavg.main(flags + ["--out", out])
        except (SystemExit, plumbing.UserError) as e:
            raise RuntimeError(f"fedavg.py {' '.join(flags)} refused: {e}") from e
        result = json.load(open(os.path.join(out, "result.json")))
        rows = open(os.path.join(out, "metrics.csv")).read().splitlines()
    head = rows[0].split(",")
    agreement = [float(r.split(",")[head.index("agreement")]) for r in rows[2:]]
    start = float(rows[1].split(",")[head.index("test_acc")])  # round 0: the ridge head, before any round
    return result["test_acc"], sum(agreement) / len(agreement), start


def main():
    a = get_args()
    data_dir = a.data_dir or tempfile.mkdtemp()
    base = ["--dataset", "synthetic", "--arch", "test_vit", "--img-size", "32", "--device", "cpu",
            "--synthetic-size", "2000", "--k", "100", "--c", "0.05", "--j", "4", "--batch-size", "16",
            "--rounds", str(a.rounds), "--eval-every", str(a.rounds), "--no-aug",
            "--data-dir", data_dir]
    print(f"{a.rounds} rounds, K=100, 5 clients a round, J=4, batch 16, synthetic 2000, no augmentation, "
          f"seeds {a.seeds}; test accuracy % (mean ± std; 'start': the ridge head at round 0), agreement (mean over rounds and seeds)\n")
    print("| weights @ client lr | split | algorithm | start | dense acc | dense agreement | sparse acc | sparse agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in a.weights:
        weights, lr = spec.split("@")
        for split in a.splits:
            for name in a.algorithms:
                cells, start = [], None
                for sparse in ([], ["--sparse", "--calib-rounds", "1", "--fisher-batches", "2"]):
                    runs = [run(base + ["--weights", weights, "--lr", lr, "--seed", str(s), *SPLITS[split], *sparse,
                                        *ALGORITHMS[name]]) for s in a.seeds]
                    acc = [100 * r[0] for r in runs]
                    start = statistics.mean(100 * r[2] for r in runs)
                    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
                    cells += [f"{statistics.mean(acc):.1f} ± {sd:.1f}", f"{statistics.mean(r[1] for r in runs):.3f}"]
                print(f"| {spec} | {split} | {name} | {start:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
