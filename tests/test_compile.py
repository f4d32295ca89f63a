"""--compile: the backbone through torch.compile. On the CPU with the aot_eager backend (dynamo's graph
capture and AOT autograd, as inductor gets them): inductor's own C++ compile of even the tiny test ViT took
74 s for training and 20 s for evaluation on this project's busy development CPU, too slow for the suite.
tests/test_gpu.py's runs cover no inductor compile either; `--compile` on a GPU is unmeasured here."""
import pytest
import torch
from torch._dynamo.utils import counters

import common
import fedavg
from conftest import TINY
from helpers import count_calls

REAL_CLIENT_UPDATE = fedavg.client_update
RUN = TINY + ["--synthetic-size", "1000", "--k", "5", "--c", "0.4", "--j", "2", "--rounds", "3", "--ckpt-every", "1",
              "--batch-size", "16", "--sparse", "--fisher-batches", "1"]


@pytest.fixture
def compiled(monkeypatch):
    """--compile through aot_eager; counts the calls of the compiled backbone."""
    monkeypatch.setattr(common, "COMPILE_BACKEND", "aot_eager")
    calls, real = {"n": 0}, torch.compile

    def counting_compile(fn, **kw):
        fast = real(fn, **kw)

        def call(x):
            calls["n"] += 1
            return fast(x)
        return call
    monkeypatch.setattr(torch, "compile", counting_compile)
    torch._dynamo.reset()
    counters.clear()
    yield calls
    torch._dynamo.reset()


def model_of(run):
    return torch.load(run / "model.pt", weights_only=True)


def test_a_compiled_run_equals_the_eager_one_to_float_rounding_and_resumes_exactly(tmp_path, monkeypatch, compiled):
    fedavg.main(RUN + ["--compile", "--out", str(tmp_path / "compiled")])
    assert compiled["n"] > 0 and counters["stats"]["unique_graphs"] > 0  # dynamo captured graphs, which ran
    count_calls(monkeypatch, fedavg, "client_update", kill_at=5)  # 2 clients a round: inside round 3
    with pytest.raises(KeyboardInterrupt):
        fedavg.main(RUN + ["--compile", "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(fedavg, "client_update", REAL_CLIENT_UPDATE)
    fedavg.main(RUN + ["--compile", "--out", str(tmp_path / "cut"), "--resume"])
    calls = compiled["n"]
    fedavg.main(RUN + ["--out", str(tmp_path / "eager")])
    assert compiled["n"] == calls  # no --compile, no compiled call
    a, b, e = model_of(tmp_path / "compiled"), model_of(tmp_path / "cut"), model_of(tmp_path / "eager")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], e[k])
