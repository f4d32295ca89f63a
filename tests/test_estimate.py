"""run_all.sh's time estimate (plan.py): the probe's arithmetic on scripted timings (a fake clock that each
step advances), not on this machine's speed. What the probe measured on a busy machine: docs/speed.md."""
import pytest
import torch

import plan


class Machine:
    """A scripted machine: step(images) advances the clock by cost(batch, call number) seconds."""

    def __init__(self, cost):
        self.cost, self.now, self.calls = cost, 0.0, []

    def clock(self):
        return self.now

    def step(self, xb):
        self.now += self.cost(len(xb), len(self.calls))
        self.calls.append(len(xb))


X = torch.zeros(64, 1)  # the probe's images: only their number matters here


def steady(b):
    """A step of b images: 10 ms fixed plus 1 ms an image (64 images: 74 ms, 865 images/s)."""
    return 0.01 + 0.001 * b


def test_warm_up_is_never_timed_and_the_windows_time_the_full_batch():
    """The first call (lazy initialisation: a minute here) and the first step at each batch size (its
    allocations: a second) are never timed, and do not stop the batch from growing: every window times
    steps of all 64 images at the steady speed."""
    def cost(b, n):
        return 60.0 if n == 0 else steady(b) + (1.0 if b not in m.calls else 0.0)
    m = Machine(cost)
    rates = plan.images_per_second(m.step, X, 64, seconds=2.5, windows=5, clock=m.clock)
    assert len(rates) == 5 and rates == pytest.approx([64 / steady(64)] * 5)
    assert m.calls[0] == 1 and m.calls[-1] == 64


def test_one_stalled_step_does_not_stop_the_batch_at_a_few_images():
    """A busy machine stalls one step at batch 2 for 5 s: the faster of the two steps decides, so the
    batch still grows to 64 (timed at batch 2, the speed would be 13x too low)."""
    m = Machine(lambda b, n: 5.0 if (b, n) == (2, 2) else steady(b))
    rates = plan.images_per_second(m.step, X, 64, seconds=2.5, windows=5, clock=m.clock)
    assert m.calls[2] == 2 and rates == pytest.approx([64 / steady(64)] * 5)


def test_a_step_too_long_for_the_budget_stops_the_batch_and_slow_windows_stop_at_three():
    """Steps of 1/8 s an image: the batch grows while the next size's step stays within a quarter of the
    budget (batch 2: 1/4 s; batch 4 would take 1/2 s > 1.25 s / 4). Windows of one step each until the
    budget is spent; however slow the steps, three windows."""
    m = Machine(lambda b, n: 0.125 * b)
    rates = plan.images_per_second(m.step, X, 64, seconds=1.25, windows=5, clock=m.clock)
    assert set(m.calls[1:]) == {1, 2} and rates == [8.0] * 5
    m = Machine(lambda b, n: 0.125 * b)
    rates = plan.images_per_second(m.step, X, 64, seconds=0.2, windows=5, clock=m.clock)
    assert set(m.calls) == {1} and rates == [8.0] * 3  # each window overruns the budget: three all the same


def test_the_batch_is_sized_on_one_thread_and_timed_on_the_runs_threads():
    """On a busy machine a multi-threaded step's fixed wait would stop the batch at a few images: sizing
    runs on one thread; the warm-up and the windows on the runs' threads, which are put back after."""
    threads, seen = torch.get_num_threads(), []
    m = Machine(lambda b, n: seen.append((b, torch.get_num_threads())) or steady(b))
    try:
        torch.set_num_threads(2)
        plan.images_per_second(m.step, X, 64, seconds=2.5, windows=5, clock=m.clock)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert {t for b, t in seen if b < 64} == {1} and {t for b, t in seen if b == 64} == {2}


def test_windows_that_differ_give_their_median_and_spread():
    """Each window's speed is its own: a machine that slows down half-way shows in the spread."""
    m = Machine(lambda b, n: steady(b) * (1 if n < 30 else 4))
    rates = plan.images_per_second(m.step, X, 64, seconds=2.5, windows=5, clock=m.clock)
    fast, slow = 64 / steady(64), 64 / (4 * steady(64))
    assert min(rates) == pytest.approx(slow) and max(rates) == pytest.approx(fast)
    assert plan.speed(rates) == (sorted(rates)[2], min(rates), max(rates))


def test_speed_is_the_median_of_the_windows_with_the_slowest_and_fastest():
    assert plan.speed([30, 10, 50, 20, 40]) == (30, 10, 50)
    assert plan.speed([4, 1, 3, 2]) == (2.5, 1, 4)  # an even count: the mean of the middle two
    assert plan.speed([1.3, 400, 420, 423, 410]) == (410, 1.3, 423)  # one stalled window moves the median little


def test_packed_probes_add_up_their_speeds():
    """Probes packed on one GPU run at the same time: their medians (and slowest, fastest) add up."""
    rates = [{"fwd": [1, 2, 3], "fwd_bwd": [5]}, {"fwd": [30, 10, 20], "fwd_bwd": [7]}]
    assert plan.packed_speed(rates, "fwd") == (22, 11, 33)
    assert plan.packed_speed(rates, "fwd_bwd") == (12, 12, 12)


def test_a_runs_time_is_its_start_up_plus_its_images_at_the_median_fastest_and_slowest_speed():
    """(seconds, least, most): 1000 images forward+backward at (100, 50, 200) images/s and 10000 forward
    at (1000, 500, 2000), 2 s to start; two runs sharing the device each take twice as long."""
    fb, f = (100, 50, 200), (1000, 500, 2000)
    assert plan.run_times([(1000, 10000), (0, 0)], 2.0, 1, fb, f) == [(22.0, 12.0, 42.0), (2.0, 2.0, 2.0)]
    assert plan.run_times([(1000, 10000)], 2.0, 2, fb, f) == [(42.0, 22.0, 82.0)]


def test_the_probe_report_states_the_median_and_the_spread():
    info = {"device": "cpu", "threads": 2, "precision": "off", "batch": 64}
    said = plan.probe_report(9.0, info, 1, (600, 420, 650), (1500, 900, 1600), 3.7)
    assert ("600 (420-650) images/s forward+backward and 1500 (900-1600) forward only, all together (the "
            "median of its timed windows, their slowest-fastest in brackets); 3.7 s to start a run") in said[0]


def test_a_fedavg_client_steps_at_its_shard_when_that_is_smaller_than_its_batch():
    """1600 training images over 100 clients: 16 each, so a client's batch of 64 is 16 images (what the
    probe times, and what the estimate counts); over 10 clients (160 each) it stays 64."""
    import fedavg
    from conftest import TINY
    flags = TINY + ["--rounds", "4", "--c", "0.1", "--j", "4", "--batch-size", "64", "--no-aug"]
    small, big = (fedavg.get_args(flags + ["--k", k]) for k in ("100", "10"))
    assert fedavg.client_batch(small, 1600) == 16 and fedavg.client_batch(big, 1600) == 64
    assert fedavg.image_passes(small, 1600, 200, 400)[0] == 4 * 10 * 4 * 16
    assert fedavg.image_passes(big, 1600, 200, 400)[0] == 4 * 1 * 4 * 64


def test_making_a_stand_in_says_so_once(tmp_path, monkeypatch, capsys):
    """The first command that needs a stand-in pretrains it (minutes on a busy CPU): one line says so
    (with tqdm's bar where there is a terminal); the next finds it cached and says nothing."""
    import common
    monkeypatch.setitem(common.STANDINS, "standin-test", (3, 2))  # 2 steps: the same code, in a second
    path = common.standin_weights("standin-test", str(tmp_path))
    said = capsys.readouterr().out.splitlines()
    assert said == [f"making the stand-in backbone standin-test, once: pretraining a tiny ViT for 2 steps (a "
                    f"minute or more on a busy CPU), cached in {path}"]
    assert common.standin_weights("standin-test", str(tmp_path)) == path and capsys.readouterr().out == ""


def test_the_runs_get_one_thread_where_the_probe_measured_the_study_faster_with_it():
    """On a busy CPU a run's threads wait for each other: where the probe's one-thread windows make the
    study's estimate shorter, the runs get one thread and the estimate is at that speed; where they make
    it longer, the runs keep their threads; without them (OMP_NUM_THREADS set, a GPU) nothing is said."""
    passes = [(1000, 10000)]
    busy = {"fwd_bwd": [10, 10, 10], "fwd": [100, 100, 100],
            "one_thread": {"fwd_bwd": [100, 50, 200], "fwd": [1000, 500, 2000]}}
    n, fb, f, costs, why = plan.choose_threads([busy], passes, 2.0, 1, 2)
    assert (n, fb, f, costs) == (1, (100, 50, 200), (1000, 500, 2000), [(22.0, 12.0, 42.0)])
    assert why == ["one thread per run measured faster than 2 (the study about 9.2x faster: a busy CPU's threads "
                   "wait for each other): the runs get one (OMP_NUM_THREADS=1; set OMP_NUM_THREADS to choose)"]
    idle = {**busy, "fwd_bwd": [1000] * 3, "fwd": [10000] * 3}
    n, fb, f, costs, why = plan.choose_threads([idle], passes, 2.0, 1, 2)
    assert (n, fb, costs) == (2, (1000, 1000, 1000), [(4.0, 4.0, 4.0)]) and "the runs get 2" in why[0]
    alone = {k: v for k, v in busy.items() if k != "one_thread"}
    assert plan.choose_threads([alone], passes, 2.0, 1, 2)[::4] == (2, [])
