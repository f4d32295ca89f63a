"""Fisher scores, mask rules and calibration (common.py) and model_editing.py end to end."""
import copy
import json

import pytest
import torch

import common
import model_editing
import plumbing
from conftest import TINY
from helpers import backbone_file, count_calls, masked_weights_moved, record_plots, run_as_script, tiny_model

FAST = TINY + ["--synthetic-size", "3000", "--batch-size", "64", "--warmup-lr", "0.1", "--fisher-batches", "2",
               "--fisher-batch-size", "16"]
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- rules on a hand-built example

SCORES = {"a": torch.tensor([[0.5, 0.1], [0.9, 0.3]]), "b": torch.tensor([0.2, 0.7, 0.1, 0.8])}
PARAMS = {"a": torch.tensor([[-3.0, 1.0], [0.5, -2.0]]), "b": torch.tensor([4.0, -0.1, 0.2, 6.0])}
# flat order: a = [0.5, 0.1, 0.9, 0.3], b = [0.2, 0.7, 0.1, 0.8]; |w|: a = [3, 1, .5, 2], b = [4, .1, .2, 6]


def kept(mask):
    return torch.cat([mask["a"].flatten(), mask["b"].flatten()]).nonzero().flatten().tolist()


@pytest.mark.parametrize("rule,keep,want", [
    ("least-sensitive", 3, [1, 4, 6]),     # scores 0.1 (a1), 0.2 (b0), 0.1 (b2); ties by position
    ("least-sensitive", 2, [1, 6]),
    ("most-sensitive", 3, [2, 5, 7]),      # 0.9, 0.7, 0.8  (0.5 is fourth)
    ("lowest-magnitude", 3, [2, 5, 6]),    # 0.5, 0.1, 0.2
    ("highest-magnitude", 2, [4, 7]),      # 4, 6
])
def test_rules_pick_exactly_the_right_entries(rule, keep, want):
    mask = common.select_mask(SCORES, rule, keep, params=PARAMS)
    assert kept(mask) == want
    assert mask["a"].dtype == torch.bool and mask["a"].shape == (2, 2) and mask["b"].shape == (4,)


def test_ties_are_broken_by_position():
    scores = {"w": torch.zeros(10)}
    assert common.select_mask(scores, "least-sensitive", 4)["w"].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert common.select_mask(scores, "most-sensitive", 4)["w"].nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_random_rule_is_seeded_and_exact():
    params = {"w": torch.zeros(1000), "v": torch.zeros(10, 10)}
    m1 = common.select_mask(None, "random", 123, gen=plumbing.make_generator(5), params=params)
    m2 = common.select_mask(None, "random", 123, gen=plumbing.make_generator(5), params=params)
    m3 = common.select_mask(None, "random", 123, gen=plumbing.make_generator(6), params=params)
    assert sum(int(m.sum()) for m in m1.values()) == 123
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert not all(torch.equal(m1[k], m3[k]) for k in m1)


@pytest.mark.parametrize("rule", common.MASK_RULES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.95, 0.99])
def test_every_rule_gives_the_exact_sparsity_on_a_vit(rule, sparsity):
    model = tiny_model()
    total = sum(p.numel() for _, p in common.masked_params(model))
    scores = {n: torch.rand(p.shape) for n, p in common.masked_params(model)}
    mask, log = common.calibrate_mask(model, lambda r, m: scores, rule, sparsity, 3, plumbing.make_generator(0))
    assert set(mask) == {n for n, _ in common.masked_params(model)}
    # the reference's final count: int((1 - S) * N), 1 - S in floating point (at 0.95 one fewer than rounding)
    assert sum(int(m.sum()) for m in mask.values()) == int((1 - sparsity) * total)


# ----------------------------------------------------------------------------- calibration rounds

def test_calibration_rounds_only_grow_the_masked_out_set():
    model = tiny_model()
    total = sum(p.numel() for _, p in common.masked_params(model))
    seen = []
    gen = torch.Generator().manual_seed(0)

    def fresh_scores(r, mask):  # new random scores each round: only the held-out rule keeps it monotone
        seen.append(None if mask is None else {k: v.clone() for k, v in mask.items()})
        return {n: torch.rand(p.shape, generator=gen) for n, p in common.masked_params(model)}

    mask, log = common.calibrate_mask(model, fresh_scores, "least-sensitive", 0.95, 4, plumbing.make_generator(0))
    masks = [m for m in seen[1:]] + [mask]
    for before, after in zip(masks, masks[1:]):
        for n in before:
            assert not (after[n] & ~before[n]).any(), "a masked-out weight came back"
    kept_counts = [r["kept"] for r in log]
    assert kept_counts == sorted(kept_counts, reverse=True) and len(set(kept_counts)) == 4
    assert kept_counts[-1] == int((1 - 0.95) * total)
    # exponential schedule: equal ratios between rounds (up to truncation)
    ratios = [b / a for a, b in zip([total] + kept_counts, kept_counts)]
    assert max(ratios) - min(ratios) < 1e-3


@pytest.mark.parametrize("flags,how", [([], "train-aug"), (["--calib-images", "train-aug"], "train-aug"),
                                       (["--calib-images", "clean"], "clean")])
def test_calibration_scores_the_images_calib_images_names(monkeypatch, flags, how):
    """Default: the drawn images through the training crop and flip, a fresh draw each round (as the TaLoS
    reference scores through its training preprocessing); clean: the drawn images as they are."""
    args = model_editing.get_args(FAST + ["--synthetic-size", "1000", "--calib-rounds", "2"] + flags)
    data = common.load_data(args)
    x = data["train"][0]
    seen = []

    def recording(model, images, *a, **k):
        seen.append(images.clone())
        return {n: torch.zeros_like(p) for n, p in common.masked_params(model)}, len(images)

    monkeypatch.setattr(common, "fisher_sums", recording)
    model_editing.make_mask(tiny_model(), x, common.Calibration.of(args), args.seed, 32, CPU)
    assert len(seen) == 2
    n = args.fisher_batches * args.fisher_batch_size
    for r, images in enumerate(seen, 1):
        idx, _ = common.draw_calibration(len(x), n, plumbing.stream("edit_calib", args.seed, r))
        off, flip = common.draw_augmentation(n, plumbing.stream("edit_calib_aug", args.seed, r))
        augmented = common.augment(x[idx], off, flip)
        assert not torch.equal(augmented, x[idx])
        assert torch.equal(images, augmented if how == "train-aug" else x[idx])


def test_scoring_state_gives_a_pass_its_model_and_puts_it_back_even_on_a_stop():
    """Inside: eval mode, gradients on, only grad_params require grad, masked-out entries times damp. After,
    also when the pass is stopped: every weight bit for bit, the requires_grad flags and the training mode."""
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    (name, first), *_ = common.masked_params(model)
    model.head.weight.requires_grad_(False)
    mask = random_mask(model)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        with common.scoring_state(model, mask, 0.1, grad_params=[first]):
            assert not model.training and torch.is_grad_enabled()
            assert [n for n, p in model.named_parameters() if p.requires_grad] == [name]
            m = mask[name]
            assert torch.equal(first[m], before[name][m]) and torch.equal(first[~m], before[name][~m] * 0.1)
            raise KeyboardInterrupt
    assert model.training and not model.head.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "head.weight")
    for n, p in model.named_parameters():
        assert torch.equal(p.view(torch.int32), before[n].view(torch.int32)), n


def test_a_rule_declares_its_own_scoring_pass_on_the_calibration_draw(monkeypatch):
    """A MaskRule subclass is a rule: calibration runs its `score` pass, and no other, on the images and label
    uniforms the Fisher rules score (the same draw each round), with the current mask, and keeps its key's
    smallest. The probe's pass scores |w|: its mask is lowest-magnitude's."""
    x = torch.randint(0, 256, (3, 8, 32, 32, 3), dtype=torch.uint8)
    us = torch.rand(3, 8, dtype=torch.float64)
    draw = lambda r: (x[r - 1], us[r - 1])  # round r's images and label uniforms
    calls = {"probe": [], "fisher": []}

    def fisher(model, images, u, *a, mask=None, **k):
        calls["fisher"].append((images.clone(), u.clone()))
        return {n: torch.rand(p.shape) for n, p in common.masked_params(model)}, len(images)

    monkeypatch.setattr(common, "fisher_sums", fisher)
    monkeypatch.setattr(common, "RULES", dict(common.RULES))  # the probe registers in this copy only

    class Probe(common.MaskRule):
        name = "probe"

        @staticmethod
        def score(model, images, u, img_size, device, mask, calib):
            calls["probe"].append((images.clone(), u.clone(), mask))
            return {n: p.detach().abs() * len(images) for n, p in common.masked_params(model)}, len(images)

        @staticmethod
        def key(names, scores, params, gen):
            return torch.cat([scores[n].flatten() for n in names])

    model = tiny_model()
    make = lambda rule: common.calibrate(model, draw, common.Calibration(rule, 0.9, 3, "logit", 1, 8, 0.1, "clean"),
                                         0, 32, CPU)[0]
    mask = make("probe")
    assert calls["fisher"] == [] and len(calls["probe"]) == 3
    assert calls["probe"][0][2] is None and all(m is not None for *_, m in calls["probe"][1:])
    assert all(m.dtype == torch.bool for m in calls["probe"][1][2].values())
    make("least-sensitive")
    for r, ((images, u, _), (f_images, f_u)) in enumerate(zip(calls["probe"], calls["fisher"], strict=True), 1):
        assert torch.equal(images, f_images) and torch.equal(u, f_u) and torch.equal(images, x[r - 1])
    want = make("lowest-magnitude")
    assert all(torch.equal(mask[n], want[n]) for n in want)
    assert len(calls["fisher"]) == 3  # lowest-magnitude scores nothing


def test_a_sparsity_that_keeps_nothing_after_the_rounds_is_refused():
    """The last round keeps int((1 - S) * N) entries: where that is none (the reference's kthvalue fails
    there), the run is refused."""
    model = tiny_model()
    total = sum(p.numel() for _, p in common.masked_params(model))
    common.check_sparsity(model, 1 - 1.5 / total, 4)  # keeps int(1.5) = 1 entry
    with pytest.raises(plumbing.UserError, match="keeps none of the .* after 4 calibration round"):
        common.check_sparsity(model, 1 - 0.5 / total, 4)  # int(0.5) = 0


def images_and_uniforms(n=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 32, 32, 3), generator=gen, dtype=torch.uint8),
            torch.rand(n, generator=gen, dtype=torch.float64))


def random_mask(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in common.masked_params(model)}


def per_sample_loop(model, images, u, score, mask=None, damp=0.1):
    """One forward and one backward per image into .grad of a copy of the model whose masked-out
    entries are damped; objective: the sampled class's logit or log-probability."""
    model = copy.deepcopy(model).eval()
    params = common.masked_params(model)
    with torch.no_grad():
        for n, p in params:
            if mask is not None:
                p.copy_(torch.where(mask[n], p, p * damp))
    sums = {n: torch.zeros_like(p) for n, p in params}
    x = common.preprocess(images, 32).to(params[0][1].dtype)
    for i in range(len(x)):
        model.zero_grad()
        logits = model(x[i:i + 1])
        out = logits if score == "logit" else torch.log_softmax(logits, dim=1)
        out[0, common.sample_labels(logits, u[i:i + 1])[0]].backward()
        for n, p in params:
            sums[n] += p.grad ** 2
    return sums


@pytest.mark.parametrize("score", common.SCORES)
@pytest.mark.parametrize("masked", [False, True])
def test_fisher_sums_equal_a_per_sample_loop_for_any_batch_size(score, masked):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, u = images_and_uniforms()
    mask = random_mask(model) if masked else None
    want = per_sample_loop(model, images, u, score, mask)
    for batch in (3, 7):
        sums, n = common.fisher_sums(model, images, u, 32, batch, CPU, mask=mask, damp=0.1, score=score)
        assert n == 7 and list(sums) == [k for k, _ in common.masked_params(model)]
        for k in want:
            torch.testing.assert_close(sums[k], want[k], rtol=1e-4, atol=1e-12)
    assert all(v.abs().sum() > 0 for v in want.values())
    # the model comes back bit for bit, trainable, in training mode and without any .grad
    for n, p in model.named_parameters():
        assert torch.equal(p.view(torch.int32), before[n].view(torch.int32)) and p.requires_grad and p.grad is None
    assert model.training


def test_scores_depend_on_the_damping_and_labels_on_the_uniforms():
    model = tiny_model()
    images, u = images_and_uniforms()
    mask = random_mask(model)
    s0, _ = common.fisher_sums(model, images, u, 32, 7, CPU)
    s1, _ = common.fisher_sums(model, images, u, 32, 7, CPU, mask=mask, damp=0.1)
    assert not all(torch.equal(s0[k], s1[k]) for k in s0)  # the damped weights change the model
    s2, _ = common.fisher_sums(model, images, u, 32, 7, CPU, mask=mask, damp=1.0)
    assert all(torch.equal(s0[k], s2[k]) for k in s0)  # damp=1 is no damping
    s3, _ = common.fisher_sums(model, images, 1 - u, 32, 7, CPU)
    assert not all(torch.equal(s0[k], s3[k]) for k in s0)  # other uniforms, other labels


def textbook_fisher(model, x, y):
    """The previous implementation's quantity: torch.func per-sample gradients of log p(y|x) at the
    given labels, squared and summed, on the masked tensors."""
    from torch.func import functional_call, grad, vmap
    names = [n for n, _ in common.masked_params(model)]
    params = {n: p.detach() for n, p in model.named_parameters()}
    for m in model.modules():  # timm's fused attention kernel has no vmap rule (slow fallback)
        if hasattr(m, "fused_attn"):
            m.fused_attn = False

    def log_lik(masked, xi, yi):
        out = functional_call(model, {**params, **masked}, (xi[None],))
        return torch.log_softmax(out, dim=1).gather(1, yi.view(1, 1)).sum()

    g = vmap(grad(log_lik), in_dims=(None, 0, 0))({n: params[n] for n in names}, x, y)
    return {n: g[n].pow(2).sum(0) for n in names}


def test_loglik_score_is_the_textbook_fisher_and_gives_its_mask():
    model = tiny_model().double().eval()  # float64: the two masks must agree entry for entry
    images, u = images_and_uniforms(9)
    x = common.preprocess(images, 32).double()
    with torch.no_grad():
        y = common.sample_labels(model(x), u)
    want = textbook_fisher(model, x, y)
    sums, _ = common.fisher_sums(model, images, u, 32, 4, CPU, score="loglik")
    for k in want:
        torch.testing.assert_close(sums[k], want[k], rtol=1e-9, atol=1e-20)
    keep = sum(v.numel() for v in want.values()) // 10
    got, ref = common.select_mask(sums, "least-sensitive", keep), common.select_mask(want, "least-sensitive", keep)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("layer,shape", [
    (torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (5, 4, 11, 9)),
    (torch.nn.Conv2d(3, 8, 4, stride=4), (5, 3, 8, 8)),            # patch embedding: stride = kernel
    (torch.nn.Linear(6, 4), (5, 6)),                                # no token dimension
    (torch.nn.Linear(6, 4, bias=False), (5, 3, 2, 6)),              # several token dimensions, few tokens
    (torch.nn.Linear(6, 4), (5, 20, 6)),                            # more than GRAM_MAX_TOKENS tokens
    (torch.nn.LayerNorm((3, 6), eps=1e-3), (5, 7, 3, 6)),           # normalized over two dimensions
])
def test_per_sample_gradients_of_each_layer_kind(layer, shape):
    torch.manual_seed(0)
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn_like(layer(x))
    got = common._per_sample_grads(layer, x, g)
    squares = common._squared_sums(layer, x, g)
    want = [None if p is None else torch.zeros_like(p) for p in (layer.weight, layer.bias)]
    for i in range(len(x)):
        layer.zero_grad()
        (layer(x[i:i + 1]) * g[i:i + 1]).sum().backward()
        for k, p in enumerate((layer.weight, layer.bias)):
            if p is not None:
                torch.testing.assert_close(got[k][i], p.grad)
                want[k] += p.grad ** 2
    torch.testing.assert_close(squares[0], want[0])
    if layer.bias is not None:
        torch.testing.assert_close(squares[1], want[1])


def test_sampled_labels_invert_the_cdf():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]])).expand(6, 3)
    u = torch.tensor([0.0, 0.1999, 0.2001, 0.4999, 0.5001, 1 - 2 ** -53], dtype=torch.float64)
    assert common.sample_labels(logits, u).tolist() == [0, 0, 1, 1, 2, 2]
    # a cdf that ends below u by rounding (0.9999999999999993 here) still gives a valid class, the last
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(2))
    assert common.sample_labels(logits, torch.tensor([1 - 2 ** -53], dtype=torch.float64)).tolist() == [99]


def test_draw_calibration_is_seeded():
    idx, u = common.draw_calibration(50, 8, plumbing.make_generator(1))
    idx2, u2 = common.draw_calibration(50, 8, plumbing.make_generator(1))
    assert torch.equal(idx, idx2) and torch.equal(u, u2) and u.dtype == torch.float64
    assert len(set(idx.tolist())) == 8 and len(common.draw_calibration(5, 8, plumbing.make_generator(1))[0]) == 5


# ----------------------------------------------------------------------------- mask files

def test_mask_file_round_trip_and_bad_masks(tmp_path):
    model = tiny_model()
    mask = common.select_mask({n: torch.rand(p.shape) for n, p in common.masked_params(model)}, "least-sensitive", 500)
    common.save_mask(mask, str(tmp_path / "mask.pt"))
    raw = torch.load(tmp_path / "mask.pt", weights_only=True)  # plain dict of bool tensors
    assert all(v.dtype == torch.bool for v in raw.values())
    back = common.load_mask(str(tmp_path / "mask.pt"), model)
    assert all(torch.equal(back[k], mask[k]) for k in mask)

    old = dict(raw, cls_token=torch.ones(1, 1, 64, dtype=torch.bool), pos_embed=torch.ones(1, 5, 64, dtype=torch.bool))
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(plumbing.UserError, match="older version.*recalibrate") as err:
        common.load_mask(str(tmp_path / "old.pt"), model)
    assert "\n" not in str(err.value)
    missing = dict(raw)
    missing.pop("norm.bias")
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(plumbing.UserError, match="missing"):
        common.load_mask(str(tmp_path / "missing.pt"), model)
    shaped = dict(raw, **{"norm.bias": torch.ones(3, dtype=torch.bool)})
    torch.save(shaped, tmp_path / "shape.pt")
    with pytest.raises(plumbing.UserError, match="shape"):
        common.load_mask(str(tmp_path / "shape.pt"), model)
    with pytest.raises(plumbing.UserError, match="not found"):
        common.load_mask(str(tmp_path / "nope.pt"), model)


# ----------------------------------------------------------------------------- model_editing.py

@pytest.mark.parametrize("rule", common.MASK_RULES)
def test_sparse_fine_tuning_touches_exactly_the_masked_in_weights(tmp_path, rule):
    weights, pre = backbone_file(tmp_path)
    out = tmp_path / rule
    model_editing.main(FAST + ["--weights", weights, "--rule", rule, "--sparsity", "0.8", "--calib-rounds", "2",
                               "--epochs", "1", "--fisher-batches", "1", "--synthetic-size", "1000",
                               "--out", str(out)])
    mask = common.load_mask(str(out / "mask.pt"), pre)
    final = torch.load(out / "model.pt", weights_only=True)
    moved, free = masked_weights_moved(final, pre, mask)
    # Nearly every masked-in weight moves; a handful may not, when their update is below float32
    # resolution (least-sensitive picks weights with near-zero gradients by design).
    assert 0.999 * free <= moved <= free
    head = torch.load(out / "head.pt", weights_only=True)  # step 0's head, frozen through step 2
    assert torch.equal(final["head.weight"], head["weight"]) and torch.equal(final["head.bias"], head["bias"])
    result = json.loads((out / "result.json").read_text())
    total = sum(p.numel() for _, p in common.masked_params(pre))
    assert result["mask_kept_frac"] == int((1 - 0.8) * total) / total  # the reference's count
    assert result["changed_frac"] == moved / total


def test_short_edit_improves_validation_accuracy_over_the_frozen_head(tmp_path, monkeypatch):
    plots = record_plots(monkeypatch)
    checked = []  # the step-0 head's check (common.check_head_accuracy): its validation accuracy, once
    monkeypatch.setattr(common, "check_head_accuracy", lambda acc, args, *a: checked.append(acc))
    out = tmp_path / "edit"
    model_editing.main(FAST + ["--sparsity", "0.5", "--epochs", "3", "--lr", "0.001", "--no-aug",
                               "--fisher-batches", "1", "--out", str(out)])
    result = json.loads((out / "result.json").read_text())
    assert result["head"] == "ridge" and result["score"] == "logit"
    assert result["val_acc"] > result["head_val_acc"] + 0.05
    assert checked == [result["head_val_acc"]]
    for f in ("mask.pt", "head.pt", "metrics.csv", "calibration.csv", "accuracy.png", "config.json"):
        assert (out / f).is_file(), f
    train = plots["loss.png"][0]["train"]  # the training curve beside val and test, from epoch 1
    assert train[0] == [1, 2, 3] and all(v > 0 for v in train[1])
    series, ylabel, _ = plots["accuracy.png"]
    xs, ys = series["val"]  # from epoch 0, the frozen head, in %
    assert "(%)" in ylabel and xs == [0, 1, 2, 3]
    assert (ys[0], ys[-1]) == (100 * result["head_val_acc"], 100 * result["val_acc"])


def test_head_sources_warmup_and_file(tmp_path):
    weights, _ = backbone_file(tmp_path)
    shared = FAST + ["--weights", weights, "--epochs", "0", "--rule", "random", "--synthetic-size", "1000"]
    model_editing.main(shared + ["--head", "warmup", "--warmup-epochs", "2", "--out", str(tmp_path / "w")])
    warm = json.loads((tmp_path / "w" / "result.json").read_text())
    assert warm["head_val_acc"] > 0.05 and warm["warmup_epoch"] >= 1  # the SGD warm-up learned something
    model_editing.main(shared + ["--head", str(tmp_path / "w" / "head.pt"), "--out", str(tmp_path / "f")])
    a = torch.load(tmp_path / "w" / "head.pt", weights_only=True)
    b = torch.load(tmp_path / "f" / "head.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "f" / "result.json").read_text())["head_val_acc"] == warm["head_val_acc"]


def test_editing_reuses_a_saved_mask_and_rejects_a_bad_one(tmp_path, capsys):
    weights, _ = backbone_file(tmp_path)
    first = tmp_path / "first"
    no_calibration = FAST[:FAST.index("--fisher-batches")]  # --mask: nothing to calibrate, no such flag
    shared = no_calibration + ["--weights", weights, "--epochs", "1", "--synthetic-size", "1000"]
    model_editing.main(shared + ["--rule", "random", "--out", str(first)])
    second = tmp_path / "second"
    model_editing.main(shared + ["--mask", str(first / "mask.pt"), "--out", str(second)])
    a = torch.load(first / "mask.pt", weights_only=True)
    b = torch.load(second / "mask.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)

    old = dict(a, cls_token=torch.ones(1, 1, 64, dtype=torch.bool))  # a mask made before cls/pos left it
    torch.save(old, tmp_path / "old.pt")
    # main() as the script's __main__ runs it, in this process (its own process: test_safety.py's signal tests)
    status, err = run_as_script(model_editing.main, shared + ["--mask", str(tmp_path / "old.pt"),
                                                              "--out", str(tmp_path / "third")], capsys)
    assert status == 2 and len(err) == 1 and "recalibrate" in err[0], err
    assert not (tmp_path / "third").exists()


@pytest.mark.parametrize("bad", [["--sparsity", "1.0"], ["--sparsity", "-0.1"], ["--rule", "largest"],
                                 ["--calib-rounds", "0"], ["--score", "grad"], ["--hparams", "r.json"]])
def test_bad_mask_flags_are_one_line_errors(capsys, bad):
    with pytest.raises(SystemExit) as e:
        model_editing.get_args(FAST + bad)
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_interrupted_edit_resumes_to_the_same_weights(tmp_path, monkeypatch):
    argv = FAST + ["--epochs", "2", "--synthetic-size", "1000", "--sparsity", "0.7", "--fisher-batches", "1"]
    model_editing.main(argv + ["--out", str(tmp_path / "full")])

    real_step = model_editing.train_step
    count_calls(monkeypatch, model_editing, "train_step", kill_at=20)  # mid second epoch (15 steps per epoch)
    with pytest.raises(KeyboardInterrupt):
        model_editing.main(argv + ["--out", str(tmp_path / "cut")])
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 1  # cut mid-run
    monkeypatch.setattr(model_editing, "train_step", real_step)
    model_editing.main(argv + ["--out", str(tmp_path / "cut"), "--resume"])

    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "metrics.csv").read_text() == (tmp_path / "cut" / "metrics.csv").read_text()


# ----------------------------------------------------------------------------- the run's state is its checkpoint

EDIT = FAST + ["--epochs", "2", "--synthetic-size", "1000", "--sparsity", "0.7", "--fisher-batches", "1", "--no-aug"]


def test_an_edit_resumes_with_the_checkpoints_mask_and_refuses_a_crafted_checkpoint(tmp_path, monkeypatch, capsys):
    """As fedavg.py (issues 35.1 and 35.8): the mask comes from the checkpoint, never the run folder's mask.pt
    (a planted link is replaced, nothing written through it); a checkpoint of the right run stamp but wrong
    in any way is one line naming it."""
    from helpers import run_as_script, stop_during_call
    model_editing.main(EDIT + ["--out", str(tmp_path / "full")])
    cut = tmp_path / "cut"
    stop_during_call(monkeypatch, model_editing, "train_step", 20)  # mid second epoch (15 steps per epoch)
    with pytest.raises(plumbing.Stopped):
        model_editing.main(EDIT + ["--out", str(cut)])
    monkeypatch.undo()
    real = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert (real["epoch"], real["step"]) == (1, 5)
    model = dict(real["model"], **{"blocks.0.norm1.weight": torch.zeros(3)})
    crafted = {"no mask": {k: v for k, v in real.items() if k != "mask"}, "an unknown key": dict(real, extra=1),
               "epoch 10^30": dict(real, epoch=10**30), "a step past the epoch": dict(real, step=16),
               "no rows": dict(real, rows=[]), "a model of other shapes": dict(real, model=model),
               "a model without its optimizer": dict(real, opt=None), "a mask of other names": dict(real, mask={}),
               "a loss that is text": dict(real, loss_sum="0")}
    for what, ckpt in crafted.items():
        torch.save(ckpt, cut / "checkpoint.pt")
        status, lines = run_as_script(model_editing.main, EDIT + ["--out", str(cut), "--resume"], capsys)
        assert status == 2 and len(lines) == 1, (what, lines)
        assert str(cut / "checkpoint.pt") in lines[0] and "delete it to start the run over" in lines[0], (what, lines)
        assert not (cut / "result.json").exists(), what
    torch.save(real, cut / "checkpoint.pt")
    everything = {n: torch.ones_like(m) for n, m in common.load_mask(str(cut / "mask.pt"), tiny_model()).items()}
    common.save_mask(everything, str(tmp_path / "all.pt"))
    (cut / "mask.pt").unlink()
    (cut / "mask.pt").symlink_to(tmp_path / "all.pt")
    model_editing.main(EDIT + ["--out", str(cut), "--resume"])
    target = torch.load(tmp_path / "all.pt", weights_only=True)  # nothing written through the link
    assert not (cut / "mask.pt").is_symlink() and all(torch.equal(target[n], m) for n, m in everything.items())
    for f in ("model.pt", "mask.pt", "head.pt", "metrics.csv"):
        assert (tmp_path / "full" / f).read_bytes() == (cut / f).read_bytes(), f
