"""common.py: optimizer, split, transforms, weight files, synthetic data."""
import argparse
import io
import math
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common
import plumbing
from conftest import TINY


def tiny_args(*extra):
    p = argparse.ArgumentParser(parents=[plumbing.base_parser(common.DEFAULT_ARCH)])
    return p.parse_args(TINY + list(extra))


# ----------------------------------------------------------------------------- SparseSGDM

SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False),
    dict(momentum=0.95, dampening=0.0, weight_decay=5e-3, nesterov=True),
]


def quadratic_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(20, 8, generator=g)
    b = torch.randn(20, 3, generator=g)
    w0 = torch.randn(8, 3, generator=g)
    bias0 = torch.randn(3, generator=g)
    return a, b, w0, bias0


def run_steps(opt_factory, steps=50, seed=0):
    a, b, w0, bias0 = quadratic_problem(seed)
    w, bias = w0.clone().requires_grad_(), bias0.clone().requires_grad_()
    opt = opt_factory([w, bias])
    for _ in range(steps):
        loss = ((a @ w + bias - b) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), bias.detach(), w0, bias0


@pytest.mark.parametrize("cfg", SGD_CONFIGS)
def test_sparse_sgdm_all_ones_matches_torch_sgd(cfg):
    ref_w, ref_b, _, _ = run_steps(lambda ps: torch.optim.SGD(ps, lr=0.05, **cfg))
    ones = lambda ps: [torch.ones_like(p, dtype=torch.bool) for p in ps]
    w, b, w0, _ = run_steps(lambda ps: common.SparseSGDM(ps, ones(ps), lr=0.05, **cfg))
    assert not torch.allclose(w, w0)  # it did train
    assert torch.equal(bits(w), bits(ref_w)) and torch.equal(bits(b), bits(ref_b))  # bit for bit
    # None (dense) is the same as all ones
    w2, b2, _, _ = run_steps(lambda ps: common.SparseSGDM(ps, [None] * len(ps), lr=0.05, **cfg))
    assert torch.equal(bits(w2), bits(ref_w)) and torch.equal(bits(b2), bits(ref_b))


@pytest.mark.parametrize("cfg", SGD_CONFIGS)
def test_sparse_sgdm_never_changes_frozen_weights(cfg):
    g = torch.Generator().manual_seed(1)
    masks = []

    def factory(ps):
        masks.extend(torch.rand(p.shape, generator=g) < 0.5 for p in ps)
        return common.SparseSGDM(ps, masks, lr=0.05, **cfg)

    w, b, w0, b0 = run_steps(factory, steps=100)
    for new, old, m in ((w, w0, masks[0]), (b, b0, masks[1])):
        assert torch.equal(new[~m], old[~m]), "a masked-out weight changed"
        assert (new[m] != old[m]).all(), "every free weight of this problem should move"


def test_sparse_sgdm_frozen_weights_keep_their_bits():
    # -0.0, tiny and huge values survive exactly even with weight decay and large gradients
    p = torch.tensor([-0.0, 0.0, 1e-38, -3e38, 1.0], requires_grad=True)
    before = p.detach().clone()
    mask = torch.tensor([False, False, False, False, True])
    opt = common.SparseSGDM([p], [mask], lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    for _ in range(10):
        p.grad = torch.tensor([-5.0, 5.0, -1.0, 1.0, 1.0])
        opt.step()
    assert torch.equal(p.detach()[:4].view(torch.int32), before[:4].view(torch.int32))
    assert p.detach()[4] != before[4]


class PerTensorSparseSGDM(torch.optim.Optimizer):
    """SparseSGDM as it was before the multi-tensor step (one torch.where per tensor): the reference
    the current one must match bit for bit."""

    def __init__(self, params, masks, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        params = list(params)
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))
        self.masks = {p: m.to(device=p.device, dtype=torch.bool) for p, m in zip(params, masks) if m is not None}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mom, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                d_p = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                mask = self.masks.get(p)
                if mask is not None:
                    d_p = torch.where(mask, d_p, torch.zeros((), dtype=d_p.dtype, device=d_p.device))
                if mom != 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d_p.clone()
                    else:
                        buf.mul_(mom).add_(d_p, alpha=1 - damp)
                    d_p = d_p.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(d_p, alpha=-lr)


def bits(t):
    return t.detach().view(torch.int32)


@pytest.mark.parametrize("cfg", SGD_CONFIGS + [dict(momentum=0.5, dampening=0.5, weight_decay=0.0, nesterov=False)])
def test_sparse_sgdm_is_bit_identical_to_the_per_tensor_form(cfg):
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 2, 4), (6,)]
    start = [torch.randn(s, generator=g) for s in shapes]
    start[0][0, :3] = torch.tensor([-0.0, 0.0, -0.0])  # signed zeros, masked in and out below
    masks = [torch.rand(s, generator=g) < 0.3 for s in shapes]
    masks[0][0, :3] = torch.tensor([True, False, False])
    masks[2] = None  # dense tensors among masked ones
    ours, ref = [[t.clone().requires_grad_() for t in start] for _ in range(2)]
    opts = [common.SparseSGDM(ours, masks, lr=0.1, **cfg), PerTensorSparseSGDM(ref, masks, lr=0.1, **cfg)]
    for step in range(6):
        grads = [torch.randn(s, generator=g) * 10 ** step for s in shapes]
        grads[0][0, :3] = torch.tensor([-0.0, -5.0, -3.0])
        for ps, opt in zip((ours, ref), opts):
            for p, gr in zip(ps, grads):
                p.grad = None if (step == 0 and p is ps[3]) else gr.clone()  # a late first gradient
            opt.step()
        for a, b in zip(ours, ref):
            assert torch.equal(bits(a), bits(b))
            assert set(opts[0].state[a]) == set(opts[1].state[b])
            if opts[1].state[b]:
                assert torch.equal(bits(opts[0].state[a]["momentum_buffer"]), bits(opts[1].state[b]["momentum_buffer"]))
    assert not torch.equal(ours[0], start[0]) and torch.equal(bits(ours[0][0, 1:3]), bits(start[0][0, 1:3]))
    # masks are configuration: the state dict holds momentum buffers only, and loads back
    sd = opts[0].state_dict()
    assert all(set(s) <= {"momentum_buffer"} for s in sd["state"].values())
    opts[0].load_state_dict(sd)


@pytest.mark.parametrize("cfg", SGD_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_non_finite_gradients_leave_frozen_entries_bit_identical(cfg, dtype):
    """A diverging run's inf/nan gradients (inf * 0 = nan in a multiplied mask) never reach a frozen
    entry; kept entries take exactly torch.optim.SGD's step, inf and nan included."""
    g = torch.Generator().manual_seed(3)
    start = torch.randn(4, 6, generator=g).to(dtype)
    mask = torch.rand(4, 6, generator=g) < 0.5
    ours, ref = start.clone().requires_grad_(), start.clone().requires_grad_()
    opts = [common.SparseSGDM([ours], [mask], lr=0.1, **cfg), torch.optim.SGD([ref], lr=0.1, foreach=True, **cfg)]
    for step in range(3):
        grad = torch.randn(4, 6, generator=g).to(dtype)
        grad[:, step] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0])
        for p, opt in zip((ours, ref), opts):
            p.grad = grad.clone()
            opt.step()
    same_width = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[dtype]
    as_int = lambda t: t.detach().view(same_width)
    assert torch.equal(as_int(ours)[~mask], as_int(start)[~mask]), "a frozen entry changed"
    assert torch.equal(as_int(ours)[mask], as_int(ref)[mask]), "a kept entry differs from torch.optim.SGD"
    assert not torch.isfinite(ours[mask]).all()  # the test did feed non-finite steps to kept entries
    if cfg["momentum"]:
        buf = as_int(opts[0].state[ours]["momentum_buffer"])
        assert (buf[~mask] == 0).all(), "the momentum buffer of a frozen entry is not +0"


def test_sparse_sgdm_rejects_wrong_mask_shape():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError):
        common.SparseSGDM([p], [torch.ones(4, dtype=torch.bool)], lr=0.1)


# 3 cache-sized groups on the CPU: [0, 1, 2], [3, 4, 5], [6]; masked and dense tensors in each
GROUPED_SHAPES = [(512, 300), (300,), (512, 300), (400, 400), (64,), (300, 512), (5, 5)]


def test_cache_sized_groups_splits_on_the_cpu_only():
    cpu = [torch.empty(s) for s in GROUPED_SHAPES]
    assert common.cache_sized_groups(cpu) == [[0, 1, 2], [3, 4, 5], [6]]
    one = [list(range(len(cpu)))]
    assert common.cache_sized_groups(cpu, device_type="cuda") == one
    on_meta = [torch.empty(s, device="meta") for s in GROUPED_SHAPES]
    assert common.cache_sized_groups(on_meta) == one  # the choice follows the tensors' device


def run_grouped_problem(cfg, steps=6):
    """SparseSGDM on GROUPED_SHAPES through inf/nan gradients (kept and frozen entries), a late first
    gradient and a restart(): the parameters' and momentum buffers' bits at the end."""
    g = torch.Generator().manual_seed(5)
    ps = [torch.randn(s, generator=g).requires_grad_() for s in GROUPED_SHAPES]
    masks = [None if i in (1, 4) else torch.rand(s, generator=g) < 0.3 for i, s in enumerate(GROUPED_SHAPES)]
    opt = common.SparseSGDM(ps, masks, lr=0.1, **cfg)
    for step in range(steps):
        if step == 3:
            opt.restart()
        for i, p in enumerate(ps):
            grad = torch.randn(p.shape, generator=g)
            grad.view(-1)[step:step + 3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
            p.grad = None if (step == 0 and i == 3) else grad
        opt.step()
    return [bits(p) for p in ps] + [bits(s["momentum_buffer"]) for s in opt.state.values()]


def group_as_on_a_gpu(monkeypatch):
    """SparseSGDM groups its tensors as on a GPU from now on (this test); returns the sizes of the lists it groups."""
    real, seen = common.cache_sized_groups, []
    monkeypatch.setattr(common, "cache_sized_groups", lambda ts: seen.append(len(ts)) or real(ts, device_type="cuda"))
    return seen


@pytest.mark.parametrize("cfg", SGD_CONFIGS)
def test_sparse_sgdm_in_one_group_as_on_a_gpu_equals_the_cpu_groups_bit_for_bit(cfg, monkeypatch):
    grouped = run_grouped_problem(cfg)
    seen = group_as_on_a_gpu(monkeypatch)
    one_group = run_grouped_problem(cfg)
    assert seen and seen[-1] == len(GROUPED_SHAPES)  # the one-group path did run, over all tensors
    assert len(grouped) == len(one_group) == len(GROUPED_SHAPES) * (2 if cfg["momentum"] else 1)
    assert all(torch.equal(a, b) for a, b in zip(grouped, one_group))


class RecordOps(TorchDispatchMode):
    """The aten ops run inside it, by name (a multi-tensor op counts once: what a GPU launches per call)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_sparse_sgdm_in_one_group_steps_in_a_few_multi_tensor_ops_however_many_tensors(monkeypatch):
    """What a GPU launches per step: a fixed handful of multi-tensor kernels (weight decay, the masks,
    momentum, Nesterov, the update; after restart() one copy into the buffers), none per tensor."""
    group_as_on_a_gpu(monkeypatch)
    ps = [torch.zeros(s, requires_grad=True) for s in GROUPED_SHAPES]
    masks = [None if i in (1, 4) else torch.ones(s, dtype=torch.bool) for i, s in enumerate(GROUPED_SHAPES)]
    opt = common.SparseSGDM(ps, masks, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    launched = []
    for step in range(3):
        if step == 2:
            opt.restart()
        for p in ps:
            p.grad = torch.ones_like(p)
        with RecordOps() as rec:
            opt.step()
        launched.append([op for op in rec.ops if op not in ("view", "detach") and not op.startswith("_record_function")])
    # step 0 makes the momentum buffers (one clone each, once per optimizer, as torch.optim.SGD does)
    assert launched[1] == ["_foreach_add_", "_foreach_mul_", "_foreach_mul_", "_foreach_add_", "_foreach_add_",
                           "_foreach_add_"]
    assert launched[2] == ["_foreach_add_", "_foreach_mul_", "_foreach_copy_", "_foreach_add_", "_foreach_add_"]


@pytest.mark.parametrize("cfg", SGD_CONFIGS)
def test_sparse_sgdm_resumed_from_its_state_dict_equals_the_uninterrupted_run(cfg):
    g = torch.Generator().manual_seed(6)
    start = [torch.randn(s, generator=g) for s in [(6, 5), (5,)]]
    masks = [torch.rand(6, 5, generator=g) < 0.5, None]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(6)]

    def steps(opt, ps, gs):
        for grad in gs:
            for p, gr in zip(ps, grad):
                p.grad = gr.clone()
            opt.step()

    ours = [t.clone().requires_grad_() for t in start]
    opt = common.SparseSGDM(ours, masks, lr=0.1, **cfg)
    steps(opt, ours, grads[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed = [p.detach().clone().requires_grad_() for p in ours]
    opt2 = common.SparseSGDM(resumed, masks, lr=0.1, **cfg)
    opt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    steps(opt, ours, grads[3:])
    steps(opt2, resumed, grads[3:])
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ours, resumed))
    assert not torch.equal(ours[0], start[0])


# ----------------------------------------------------------------------------- split and data

def test_stratified_split_is_stratified_disjoint_and_seeded():
    labels = torch.arange(100).repeat_interleave(50)  # 50 per class
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    tr, va = common.stratified_split(labels, 0.1, seed=0)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0
    assert sorted(tr.tolist() + va.tolist()) == list(range(len(labels)))
    assert torch.equal(torch.bincount(labels[va], minlength=100), torch.full((100,), 5))
    tr2, va2 = common.stratified_split(labels, 0.1, seed=0)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    _, va3 = common.stratified_split(labels, 0.1, seed=1)
    assert not torch.equal(va, va3)


def test_synthetic_data_is_balanced_cifar_shaped_and_seeded():
    x, y, xt, yt = common.make_synthetic(1000, 200, seed=0)
    assert x.shape == (1000, 32, 32, 3) and x.dtype == torch.uint8
    assert xt.shape == (200, 32, 32, 3)
    assert torch.equal(torch.bincount(y, minlength=100), torch.full((100,), 10))
    x2, y2, _, _ = common.make_synthetic(1000, 200, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _, _, _ = common.make_synthetic(1000, 200, seed=1)
    assert not torch.equal(x, x3)


def test_load_data_splits_train_into_train_and_val():
    data = common.load_data(tiny_args("--synthetic-size", "1000"))
    assert len(data["train"][0]) == 900 and len(data["val"][0]) == 100 and len(data["test"][0]) == 200
    assert torch.equal(torch.bincount(data["val"][1], minlength=100), torch.ones(100, dtype=torch.long))


# ----------------------------------------------------------------------------- transforms

def test_augment_keeps_shape_and_takes_pixels_from_padded_shifted_image():
    x, _, _, _ = common.make_synthetic(100, 100, seed=0)
    x = x[:16]
    a = common.augment(x, *common.draw_augmentation(len(x), plumbing.make_generator(0)))
    assert a.shape == x.shape and a.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (0, 0, 4, 4, 4, 4))
    for i in range(len(x)):  # each output is some 32x32 window of the padded image, maybe flipped
        found = any(torch.equal(a[i], win) or torch.equal(a[i], win.flip(1))
                    for dy in range(9) for dx in range(9)
                    for win in [padded[i, dy:dy + 32, dx:dx + 32]])
        assert found
    assert torch.equal(a, common.augment(x, *common.draw_augmentation(len(x), plumbing.make_generator(0))))  # seeded
    assert not torch.equal(a, common.augment(x, *common.draw_augmentation(len(x), plumbing.make_generator(1))))


def test_preprocess_shape_and_range():
    x = torch.tensor([0, 255], dtype=torch.uint8).repeat(2 * 32 * 16 * 3)[:2 * 32 * 32 * 3].view(2, 32, 32, 3)
    out = common.preprocess(x, 64)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    mean = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()
    assert torch.allclose(out.amin(dim=(0, 2, 3)), lo.flatten(), atol=1e-5)
    assert torch.allclose(out.amax(dim=(0, 2, 3)), hi.flatten(), atol=1e-5)


# ----------------------------------------------------------------------------- weights

def backbone_out(model, x):
    model.eval()
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def test_dino_and_timm_weight_files_load_and_agree(tmp_path):
    src = common.build_model(tiny_args("--seed", "5"))
    backbone = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    dino_plain = tmp_path / "dino_deitsmall16_pretrain.pth"  # official release: backbone only
    torch.save(backbone, dino_plain)
    dino_train = tmp_path / "checkpoint.pth"  # DINO training checkpoint: teacher/student, prefixes, DINO head
    wrapped = {f"module.backbone.{k}": v for k, v in backbone.items()}
    wrapped["module.head.mlp.0.weight"] = torch.randn(7, 64)
    torch.save({"teacher": wrapped, "student": wrapped, "epoch": 3}, dino_train)
    timm_file = tmp_path / "timm.pth"  # timm state dict (with a 100-class head)
    torch.save(src.state_dict(), timm_file)

    x = torch.randn(2, 3, 32, 32)
    want = backbone_out(src, x)
    for f in (dino_plain, dino_train, timm_file):
        m = common.build_model(tiny_args("--weights", str(f)))
        torch.testing.assert_close(backbone_out(m, x), want, rtol=0, atol=0)
    # the timm file carries our head; DINO files do not, so the head comes from --seed
    m = common.build_model(tiny_args("--weights", str(timm_file)))
    assert torch.equal(m.head.weight, src.head.weight)


def test_weights_are_resized_to_another_image_size(tmp_path):
    src = common.build_model(tiny_args())
    f = tmp_path / "w.pth"
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("head.")}, f)
    m = common.build_model(tiny_args("--weights", str(f), "--img-size", "64"))
    assert m.pos_embed.shape[1] == 1 + (64 // 16) ** 2
    assert torch.equal(m.patch_embed.proj.weight, src.patch_embed.proj.weight)


def test_bad_weight_files_are_user_errors(tmp_path):
    with pytest.raises(plumbing.UserError, match="not found"):
        common.build_model(tiny_args("--weights", str(tmp_path / "missing.pth")))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(plumbing.UserError, match="cannot read"):
        common.build_model(tiny_args("--weights", str(corrupt)))
    wrong = tmp_path / "wrong.pth"
    torch.save({"blocks.0.norm1.weight": torch.ones(3)}, wrong)
    with pytest.raises(plumbing.UserError, match="does not fit"):
        common.build_model(tiny_args("--weights", str(wrong)))


def test_offline_without_cached_weights_fails_fast(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(plumbing, "network_reachable", lambda *a, **k: False)
    args = tiny_args()
    args.no_pretrained, args.arch = False, "vit_small_patch16_224.dino"
    t = time.time()
    with pytest.raises(plumbing.UserError, match="--weights"):
        common.build_model(args)
    assert time.time() - t < 10


def test_head_init_depends_on_seed_only():
    a = common.build_model(tiny_args("--seed", "1"))
    b = common.build_model(tiny_args("--seed", "1"))
    c = common.build_model(tiny_args("--seed", "2"))
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)


# ----------------------------------------------------------------------------- schedules

# The documented values of every schedule (common.lr_factor's comments), over 9 epochs.
DOCUMENTED = {
    "constant": [1.0] * 9,
    "cosine": [0.5 * (1 + math.cos(math.pi * e / 9)) for e in range(9)],
    "step": [1.0] * 3 + [0.1] * 3 + [0.01] * 3,  # /10 at one third and at two thirds
    "exponential": [0.01 ** (e / 8) for e in range(9)],  # 1 at the start, 1% at the last epoch
    "warmup-cosine": [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * e / 7)) for e in range(7)],
}


@pytest.mark.parametrize("name", common.SCHEDULERS)
def test_lr_schedules_take_their_documented_values(name):
    assert [common.lr_factor(name, e, 9) for e in range(9)] == pytest.approx(DOCUMENTED[name], rel=1e-12)


def test_random_streams_are_distinct_and_replayable():
    assert len(set(plumbing.STREAMS.values())) == len(plumbing.STREAMS)
    a = torch.rand(5, generator=plumbing.stream("clients", 0, 3))
    assert torch.equal(a, torch.rand(5, generator=plumbing.stream("clients", 0, 3)))
    assert torch.equal(a, torch.rand(5, generator=plumbing.make_generator(0, 3, plumbing.STREAMS["clients"])))
    assert not torch.equal(a, torch.rand(5, generator=plumbing.stream("client_batches", 0, 3)))


@pytest.mark.parametrize("cfg", SGD_CONFIGS)
def test_sparse_sgdm_restart_is_a_fresh_optimizer_bit_for_bit(cfg):
    """FedAvg restarts one optimizer per client instead of making a new one: same numbers."""
    a, b, w0, bias0 = quadratic_problem()
    mask = torch.rand(w0.shape, generator=torch.Generator().manual_seed(1)) < 0.5

    def steps(opt, w, bias, n=4):
        for _ in range(n):
            loss = ((a @ w + bias - b) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    w1, bias1 = w0.clone().requires_grad_(), bias0.clone().requires_grad_()
    reused = common.SparseSGDM([w1, bias1], [mask, None], lr=0.05, **cfg)
    steps(reused, w1, bias1)
    w2, bias2 = w1.detach().clone().requires_grad_(), bias1.detach().clone().requires_grad_()
    reused.restart()
    steps(reused, w1, bias1)
    steps(common.SparseSGDM([w2, bias2], [mask, None], lr=0.05, **cfg), w2, bias2)
    assert torch.equal(w1, w2) and torch.equal(bias1, bias2)
