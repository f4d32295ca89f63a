"""Small utilities shared by the test files."""
import argparse
import os
import signal
import subprocess
import sys

import pytest
import torch

import common
import plumbing
import splits
from conftest import ROOT, TINY


def run_script(script, *argv, cwd=None):
    """Run a top-level script in a subprocess; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def assert_usage_error(proc):
    """Exit status 2 and exactly one line on stderr."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def make_shards(labels, args):
    """A FedAvg run's shards, as fedavg.main makes them from its flags."""
    return splits.make_shards(labels, splits.of_args(args), args.k, args.seed)


def tiny_model(seed=0):
    """The tests' tiny random ViT (with its head), as the scripts build it from TINY flags."""
    p = argparse.ArgumentParser(parents=[plumbing.base_parser(common.DEFAULT_ARCH)])
    torch.manual_seed(seed)
    return common.build_model(p.parse_args(TINY + ["--seed", str(seed)]))


def backbone_file(tmp_path, seed=0):
    """A tiny 'pre-trained' backbone in the official DINO file layout; returns (path, model)."""
    model = tiny_model(seed)
    path = tmp_path / "backbone.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, path)
    return str(path), model


def count_calls(monkeypatch, module, name, kill_at=None):
    """Count the calls of module.name (patched for this test): returns the count, {'n': calls so far}.
    With kill_at, its kill_at-th call raises KeyboardInterrupt instead (as if the process were killed
    during it); put it back with monkeypatch.undo() or monkeypatch.setattr(module, name, real)."""
    calls = {"n": 0}
    real = getattr(module, name)

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, counting)
    return calls


def stop_during_call(monkeypatch, module, name, n):
    """Make plumbing.stop_requested() answer True from the n-th call of module.name on (as if SIGTERM
    arrived during it)."""
    calls = count_calls(monkeypatch, module, name)
    monkeypatch.setattr(plumbing, "stop_requested", lambda: calls["n"] >= n)


def run_as_script(main, argv, capsys):
    """main(argv) through plumbing.run_main, as the script's __main__ runs it: returns (exit status, the
    non-empty lines it printed on stderr). The stop-signal handlers run_main installs are put back."""
    handlers = {s: signal.getsignal(s) for s in plumbing.STOP_SIGNALS}
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            plumbing.run_main(lambda: main(argv))
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return e.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def masked_weights_moved(final, pre, mask):
    """Assert every masked-out entry of state dict `final` equals the one of model `pre`;
    return (masked-in entries that moved, masked-in entries)."""
    moved = 0
    for n, p in common.masked_params(pre):
        assert torch.equal(final[n][~mask[n]], p[~mask[n]]), f"{n}: a masked-out weight changed"
        moved += int((final[n][mask[n]] != p[mask[n]]).sum())
    return moved, sum(int(m.sum()) for m in mask.values())


def parse_refused(get_args, argv, capsys):
    """Assert that a script's get_args refuses argv as a usage error: exit status 2 and one line on
    stderr, nothing else done; returns that line."""
    import pytest
    with pytest.raises(SystemExit) as e:
        get_args(argv)
    assert e.value.code == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def record_plots(monkeypatch):
    """{file name: (labels or series, ylabel, the other arguments)} of every plot_bars/plot_lines call
    from now on; the plots are still drawn."""
    calls = {}
    for name in ("plot_bars", "plot_lines"):
        def record(path, what, *rest, draw=getattr(plumbing, name), **kw):
            calls[os.path.basename(path)] = (what, rest[1], rest)  # rest: (xlabel or values, ylabel, title)
            draw(path, what, *rest, **kw)
        monkeypatch.setattr(plumbing, name, record)
    return calls
