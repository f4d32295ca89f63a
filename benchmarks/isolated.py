"""Run each benchmark configuration in a fresh subprocess, so that every peak memory is its own.

A benchmark script calls run_isolated(__file__, cfgs, label) from its main(); the child is the same
script with `--one JSON`, which calls measure(cfg) and prints its result as JSON (see one_config)."""
import json
import subprocess
import sys


def run_isolated(script, cfgs, label):
    """[measure(cfg) of every cfg that ran], each from `python script --one JSON`; a failed
    configuration prints label(cfg) and its last error line. Exits 1 if none ran."""
    rows = []
    for cfg in cfgs:
        out = subprocess.run([sys.executable, script, "--one", json.dumps(cfg)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{label(cfg)}: failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if not rows:
        sys.exit(1)
    return rows
