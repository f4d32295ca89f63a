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
    "test_centralized.py::test_missing_and_corrupt_weights_are_one_line_errors",
    "test_editing.py::test_editing_reuses_a_saved_mask_and_rejects_a_bad_one",
    "test_editing.py::test_short_edit_improves_validation_accuracy_over_the_frozen_head",
    "test_editing.py::test_interrupted_edit_resumes_to_the_same_weights",
    "test_fedavg.py::test_iid_learns_and_one_class_per_client_learns_less",
    "test_fedavg.py::test_interrupted_run_resumes_to_the_same_files",
    "test_fedavg.py::test_a_stop_signal_checkpoints_at_the_round_boundary_and_resumes",
    "test_fedavg.py::test_a_kill_between_the_mask_and_the_checkpoint_recalibrates",
    "test_fedavg.py::test_sparse_fedavg_keeps_the_head_and_the_masked_out_entries_bit_identical",
    "test_fedavg.py::test_bad_flag_end_to_end_is_one_line_and_exit_2",
    "test_fedavg.py::test_sparse_fedavg_reuses_a_mask_file",
]


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """With pytest-xdist installed (requirements.txt), the suite runs one worker per CPU core unless -n
    says otherwise (-n 0: in this process): its tests are mostly single-threaded script runs, so two
    cores take about half the time. Without pytest-xdist it runs in this process, as always."""
    xdist = config.pluginmanager.hasplugin("xdist")
    if xdist and config.option.numprocesses is None and not config.option.collectonly \
            and not os.environ.get("PYTEST_XDIST_WORKER"):
        config.option.numprocesses = "auto"


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
