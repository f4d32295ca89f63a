"""Precision and device decisions, tested on the CPU (tests/test_gpu.py runs them on a GPU)."""
import pytest
import torch

import common
import fedavg
import plumbing
from conftest import TINY
from helpers import tiny_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("capability,want", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16")])
def test_auto_precision_follows_the_gpu_capability(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert plumbing.resolve_amp("auto", torch.device("cuda")) == want  # T4 is 7.5, V100 7.0, A100 8.0, H100 9.0
    assert plumbing.resolve_amp("off", torch.device("cuda")) == "fp32"
    assert plumbing.resolve_amp("fp16", torch.device("cuda")) == "fp16"


def test_the_cpu_runs_fp32_and_refuses_gpu_precisions():
    assert plumbing.resolve_amp("auto", CPU) == "fp32"
    for amp in ("bf16", "fp16"):
        with pytest.raises(plumbing.UserError, match="needs a CUDA GPU"):
            plumbing.resolve_amp(amp, CPU)


def test_feature_cache_is_keyed_by_the_precision_computed_in():
    args = fedavg.get_args(TINY)
    paths = set()
    for precision in ("fp32", "bf16", "fp16"):
        args.precision = precision
        paths.add(common.feature_cache_path(args, "train", 0, "digest"))
    assert len(paths) == 3


@pytest.mark.parametrize("name,says", [("bogus", "not a device"), ("cuda:1", "only 1 GPU"), ("mps", "only cpu and cuda")])
def test_bad_devices_are_refused(monkeypatch, name, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(plumbing.UserError, match=says):
        plumbing.pick_device(name)


@pytest.fixture
def a_mocked_gpu(monkeypatch):
    """A CUDA device that pick_device accepts on a CPU-only machine; the process-wide kernel settings
    pick_device changes are put back afterwards."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    algorithms = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    for kernel in plumbing.FUSED_ATTENTION:
        getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(True)
    yield
    for kernel in plumbing.FUSED_ATTENTION:
        getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(True)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags
    torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])


def fused_attention_enabled():
    return [getattr(torch.backends.cuda, f"{kernel}_sdp_enabled")() for kernel in plumbing.FUSED_ATTENTION]


@pytest.mark.parametrize("device,deterministic", [("cuda", True), ("cuda", False), ("cpu", True)])
def test_deterministic_on_a_gpu_leaves_attention_to_the_math_kernel(a_mocked_gpu, device, deterministic):
    """Under warn_only=True the fused attention kernels (cuDNN, flash, memory-efficient) keep their
    non-deterministic backward: --deterministic on a GPU turns all three off; without it, or on the CPU
    (deterministic already), they stay on."""
    plumbing.pick_device(device, deterministic)
    on_a_gpu = deterministic and device == "cuda"
    assert fused_attention_enabled() == [not on_a_gpu] * 3
    assert torch.backends.cuda.math_sdp_enabled()
    assert torch.are_deterministic_algorithms_enabled() == on_a_gpu


def test_the_head_and_its_argmax_are_fp32_under_mixed_precision():
    """bf16 autocast (available on the CPU too): logits come out fp32 and equal the fp32 head applied
    to the backbone's features, so an accuracy on images equals one on cached features."""
    model = tiny_model().eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        logits = common.forward_logits(model, x, CPU, "bf16")
        feats = common.backbone_features(model, x, CPU, "bf16")
    assert logits.dtype == torch.float32 and feats.dtype == torch.float32
    assert torch.equal(logits, model.head(feats))
    with torch.no_grad(), plumbing.autocast(CPU, "bf16"):
        assert model(x).dtype == torch.bfloat16  # what evaluating the whole model under autocast would give


def test_sparse_sgdm_frozen_entries_hold_under_the_gradient_scaler_and_skipped_steps():
    torch.manual_seed(0)
    w = torch.randn(6, 4, requires_grad=True)
    start = w.detach().clone()
    mask = torch.rand(6, 4) < 0.5
    opt = common.SparseSGDM([w], [mask], lr=0.1, momentum=0.9, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(4):
        loss = (w ** 2).sum() * (float("inf") if step == 1 else 1.0)  # step 1 overflows: skipped
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert torch.equal(w.detach()[~mask], start[~mask])  # bit for bit
    assert (w.detach()[mask] != start[mask]).all()
    assert scaler.get_scale() < 2.0 ** 10  # the overflow was seen and the step skipped
