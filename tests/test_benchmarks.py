"""The benchmark scripts still run against today's code (they import its functions; nothing else calls
them): each on the tiny ViT for a few steps, printing its table. No figure is checked: speed is measured by
running them, not in tests."""
import re

from helpers import run_script


def table_rows(stdout):
    """{first cell: [other cells]} of the markdown table rows in stdout (header and rule lines left out)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) > 1 and not re.fullmatch(r"-+", cells[0]):
            rows[cells[0]] = cells[1:]
    return rows


def test_bench_step_times_each_setting_it_is_asked_for():
    proc = run_script("benchmarks/bench_step.py", "--arch", "test_vit", "--img-size", "32", "--batch", "4",
                      "--steps", "2", "--warmup", "0", "--device", "cpu", "--settings", "default,strict-det")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert list(rows) == ["setting", "default", "strict-det"]
    assert rows["default"][1] == "1.000" and all(float(rows[s][0]) > 0 for s in ("default", "strict-det"))


def test_bench_step_refuses_an_unknown_setting():
    proc = run_script("benchmarks/bench_step.py", "--settings", "default,fastest")
    assert proc.returncode == 2 and "--settings" in proc.stderr


def test_bench_fisher_scores_with_this_codes_method():
    proc = run_script("benchmarks/bench_fisher.py", "--arch", "test_vit", "--img-size", "32", "--samples", "4",
                      "--batch", "2", "--methods", "layerwise")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert float(rows["layerwise"][0]) > 0
