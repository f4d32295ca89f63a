"""Make the top-level scripts importable from tests, pin threads, and share the tiny-model flags."""
import os
import sys

# One thread per process, here and in every script a test starts (they inherit the environment):
# torch's default of one thread per core oversubscribes a busy 2-core machine and made the suite
# 10-15x slower (47 min instead of 3).
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A tiny random-init ViT on the synthetic CIFAR-shaped set: seconds on a laptop CPU.
TINY = ["--dataset", "synthetic", "--arch", "test_vit", "--no-pretrained", "--img-size", "32",
        "--device", "cpu"]
