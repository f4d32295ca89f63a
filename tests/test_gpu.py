"""The stages on a CUDA GPU, in every precision it supports. Skipped without a GPU.

Run on a GPU box or in Colab:  python -m pytest -q tests/test_gpu.py
"""
import json
import warnings

import pytest
import torch

import centralized
import common
import fedavg
import model_editing
import plumbing
from helpers import count_calls, masked_weights_moved, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = ["--dataset", "synthetic", "--arch", "test_vit", "--no-pretrained", "--img-size", "32", "--device", "cuda",
       "--synthetic-size", "2000", "--batch-size", "32"]


def precisions():
    if not torch.cuda.is_available():
        return []
    return ["fp16", "off"] + (["bf16"] if torch.cuda.get_device_capability()[0] >= 8 else [])


def load_on_cpu(path):
    """A file a CPU-only machine can read: plain torch.load, no map_location."""
    sd = torch.load(path, weights_only=True)
    assert all(v.device.type == "cpu" for v in sd.values())
    return sd


@pytest.mark.parametrize("amp", precisions())
def test_every_stage_runs_on_the_gpu(tmp_path, amp):
    centralized.main(GPU + ["--amp", amp, "--epochs", "2", "--out", str(tmp_path / "c")])
    load_on_cpu(tmp_path / "c" / "head.pt")
    model_editing.main(GPU + ["--amp", amp, "--epochs", "1", "--fisher-batches", "1", "--out", str(tmp_path / "e")])
    load_on_cpu(tmp_path / "e" / "model.pt")
    for extra in ([], ["--sparse", "--fisher-batches", "1"]):
        out = tmp_path / f"f{len(extra)}"
        fedavg.main(GPU + ["--amp", amp, "--k", "10", "--c", "0.5", "--rounds", "2", "--out", str(out)] + extra)
        result = json.loads((out / "result.json").read_text())
        assert result["precision"] == {"off": "fp32"}.get(amp, amp) and result["test_acc"] >= 0
        load_on_cpu(out / "model.pt")


def test_auto_picks_what_the_gpu_supports(tmp_path):
    fedavg.main(GPU + ["--k", "10", "--c", "0.5", "--rounds", "1", "--out", str(tmp_path / "r")])
    want = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
    assert json.loads((tmp_path / "r" / "result.json").read_text())["precision"] == want


def test_sparse_fedavg_under_fp16_scaling_keeps_masked_entries_bit_identical(tmp_path):
    out = tmp_path / "r"
    fedavg.main(GPU + ["--amp", "fp16", "--k", "10", "--c", "0.5", "--rounds", "3", "--sparse", "--lr", "0.05",
                       "--fisher-batches", "1", "--out", str(out)])
    pre = tiny_model()
    mask = common.load_mask(str(out / "mask.pt"), pre)
    moved, free = masked_weights_moved(load_on_cpu(out / "model.pt"), pre, mask)
    assert 0 < moved <= free


def test_sparse_sgdm_on_the_gpu_is_torch_sgd_on_kept_entries_and_keeps_frozen_bits(monkeypatch):
    """The CUDA path: one group of all tensors, the masks as one integer multi-tensor multiply, the
    restart copy as one multi-tensor copy. Kept entries take torch.optim.SGD(foreach=True)'s step (a fresh
    one after restart()) bit for bit, inf and nan included; frozen entries keep their bits."""
    real, groups = common.cache_sized_groups, []
    monkeypatch.setattr(common, "cache_sized_groups", lambda ts: groups.append(real(ts)) or groups[-1])
    g = torch.Generator().manual_seed(0)
    shapes = [(512, 300), (300,), (512, 300), (400, 400), (64,), (300, 512), (5, 5)]  # 3 groups on a CPU
    start = [torch.randn(s, generator=g) for s in shapes]
    masks = [None if i in (1, 4) else torch.rand(s, generator=g) < 0.3 for i, s in enumerate(shapes)]
    cfg = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    ours, ref = ([t.cuda().requires_grad_() for t in start] for _ in range(2))
    opt = common.SparseSGDM(ours, masks, **cfg)
    for step in range(5):
        if step in (0, 3):
            opt.restart()
            sgd = torch.optim.SGD(ref, foreach=True, **cfg)
        for a, b in zip(ours, ref):
            grad = torch.randn(a.shape, generator=g)
            grad.view(-1)[step:step + 3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
            a.grad, b.grad = grad.cuda(), grad.cuda()
        opt.step()
        sgd.step()
    assert groups and all(gr == [list(range(len(shapes)))] for gr in groups)
    for a, b, t, m in zip(ours, ref, start, masks):
        a, b, t = (x.detach().cpu().view(torch.int32) for x in (a, b, t))
        m = torch.ones_like(a, dtype=torch.bool) if m is None else m
        assert torch.equal(a[~m], t[~m]), "a frozen entry changed"
        assert torch.equal(a[m], b[m]), "a kept entry differs from torch.optim.SGD"


def test_deterministic_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    argv = GPU + ["--deterministic", "--k", "10", "--c", "0.5", "--rounds", "4", "--ckpt-every", "1", "--sparse",
                  "--fisher-batches", "1"]
    fedavg.main(argv + ["--out", str(tmp_path / "full")])
    count_calls(monkeypatch, fedavg, "client_update", kill_at=13)  # inside round 3
    with pytest.raises(KeyboardInterrupt):
        fedavg.main(argv + ["--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    fedavg.main(argv + ["--out", str(tmp_path / "cut"), "--resume"])
    a, b = load_on_cpu(tmp_path / "full" / "model.pt"), load_on_cpu(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("amp", precisions())
def test_a_diverging_run_stops_in_every_precision(tmp_path, amp):
    """--lr 1e8 makes the loss nan (or, in fp16, may leave the scaler skipping every step): the run stops
    with Diverged and writes no result, in every precision."""
    out = tmp_path / "r"
    with pytest.raises(plumbing.Diverged):
        fedavg.main(GPU + ["--amp", amp, "--k", "10", "--c", "0.5", "--rounds", "20", "--lr", "1e8", "--sparse",
                           "--fisher-batches", "1", "--out", str(out)])
    assert not (out / "result.json").exists()


# The real model at the real size: ViT-S/16 at 224 px, where the GPU picks fused attention kernels the tiny
# ViT never reaches (random weights, synthetic images: nothing to download)
REAL_SIZE = ["--dataset", "synthetic", "--arch", "vit_small_patch16_224", "--no-pretrained", "--img-size", "224",
             "--device", "cuda", "--synthetic-size", "1000", "--batch-size", "64", "--deterministic",
             "--k", "10", "--c", "0.2", "--j", "2", "--rounds", "3", "--ckpt-every", "1", "--sparse",
             "--fisher-batches", "1"]


def test_deterministic_at_the_real_size_reruns_and_resumes_bit_identically(tmp_path, monkeypatch):
    """--deterministic with ViT-S/16 at 224 px: two runs give the same model.pt bit for bit, a run killed
    in round 3 and resumed gives it too, and PyTorch warned of no non-deterministic kernel on the way
    (a warning PyTorch gives once per process; the bit-equality is the test that always holds)."""
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for name in ("a", "b"):
            fedavg.main(REAL_SIZE + ["--out", str(tmp_path / name)])
        count_calls(monkeypatch, fedavg, "client_update", kill_at=5)  # 2 clients a round: inside round 3
        with pytest.raises(KeyboardInterrupt):
            fedavg.main(REAL_SIZE + ["--out", str(tmp_path / "cut")])
        monkeypatch.undo()
        fedavg.main(REAL_SIZE + ["--out", str(tmp_path / "cut"), "--resume"])
    assert not [str(w.message) for w in warned if "deterministic" in str(w.message)]
    a = load_on_cpu(tmp_path / "a" / "model.pt")
    for other in ("b", "cut"):
        b = load_on_cpu(tmp_path / other / "model.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), other


def test_compile_on_the_gpu_equals_eager_to_float_rounding_and_resumes_exactly(tmp_path, monkeypatch):
    """--compile with inductor (the CPU tests use aot_eager): fp32, so that only the kernels differ."""
    argv = GPU + ["--amp", "off", "--deterministic", "--k", "10", "--c", "0.2", "--rounds", "3", "--ckpt-every", "1"]
    fedavg.main(argv + ["--compile", "--out", str(tmp_path / "compiled")])
    count_calls(monkeypatch, fedavg, "client_update", kill_at=5)  # 2 clients a round: inside round 3
    with pytest.raises(KeyboardInterrupt):
        fedavg.main(argv + ["--compile", "--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    fedavg.main(argv + ["--compile", "--out", str(tmp_path / "cut"), "--resume"])
    fedavg.main(argv + ["--out", str(tmp_path / "eager")])
    a, b, e = (load_on_cpu(tmp_path / r / "model.pt") for r in ("compiled", "cut", "eager"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], e[k], rtol=1e-3, atol=1e-4)  # fused kernels round differently
