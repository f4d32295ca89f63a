"""Make the top-level scripts importable from tests, pin threads, and share the tiny-model flags."""
import os
import sys

# One thread per process, here and in every script a test starts (they inherit the environment):
# torch's default of one thread per core oversubscribes a busy 2-core machine and made the suite
# 10-15x slower (47 min instead of 3).
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A tiny random-init ViT on the synthetic CIFAR-shaped set: seconds on a laptop CPU.
TINY = ["--dataset", "synthetic", "--arch", "test_vit", "--no-pretrained", "--img-size", "32",
        "--device", "cpu"]

# The slow tests, left out of the fast lane (`python -m pytest -m "not slow"`, for the edit-test loop);
# the full suite runs them all. A file's name marks all of it, FILE::TEST one test (and its parameters).
# Chosen by measured duration (pytest --durations): the tests of several seconds or more that start
# whole runs, studies or benchmarks; each file's quick tests of the same behaviour stay in the fast lane.
SLOW = [
    "test_run_all.py",
    "test_dynamics.py",
    "test_benchmarks.py",
    "test_compile.py",
]


def slow_entry(nodeid):
    """The SLOW entry that names this test (tests/FILE.py::TEST[param]), or None."""
    path, _, test = nodeid.partition("::")
    name, test = os.path.basename(path), test.split("[")[0]
    return next((e for e in SLOW if e in (name, f"{name}::{test}")), None)


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect
def pytest_collection_modifyitems(config, items):
    modules = {}
    for item in items:
        modules[os.path.basename(item.nodeid.split("::")[0])] = getattr(item, "module", None)
        if slow_entry(item.nodeid):
            item.add_marker(pytest.mark.slow)
    # An entry naming a test its file no longer has would silently put that test back in the fast lane.
    stale = [e for e in SLOW if "::" in e and e.split("::")[0] in modules
             and not hasattr(modules[e.split("::")[0]], e.split("::")[1])]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names a test that does not exist: {', '.join(stale)}")
