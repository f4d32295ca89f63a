"""colab.ipynb: a valid notebook whose commands are the README's (README.md, section Colab), which stops at its
first cell until the user sets the repository to clone."""
import json
import os
import re
import subprocess
import sys

from conftest import ROOT


def notebook():
    with open(os.path.join(ROOT, "colab.ipynb")) as f:
        return json.load(f)


def shell_lines(nb):
    """The notebook's shell commands (`!...` lines of code cells), without the `!`."""
    return [line.strip()[1:] for c in nb["cells"] if c["cell_type"] == "code"
            for line in "".join(c["source"]).splitlines() if line.strip().startswith("!")]


def test_the_notebook_is_nbformat_4_without_outputs():
    nb = notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["metadata"], dict) and nb["cells"]
    for c in nb["cells"]:
        assert c["cell_type"] in ("code", "markdown") and isinstance(c["metadata"], dict)
        assert all(isinstance(line, str) for line in c["source"])
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None  # committed clean
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert re.match(r'REPO_URL = ""', first["source"][0])  # the one line a user edits, committed unset


def first_cell(repo_url):
    """Run the notebook's first code cell, REPO_URL set to repo_url, as a script: the finished process."""
    source = "".join(next(c for c in notebook()["cells"] if c["cell_type"] == "code")["source"])
    source = source.replace('REPO_URL = ""', f"REPO_URL = {repo_url!r}", 1)
    return subprocess.run([sys.executable, "-c", source + "\nprint(os.environ['REPO_URL'], os.environ['RESULTS'])"],
                          capture_output=True, text=True)


def test_the_first_cell_stops_with_one_line_until_the_repository_is_set():
    unset = first_cell("")
    assert unset.returncode != 0 and unset.stdout == ""  # Colab's "Run all" stops at a raised SystemExit
    assert unset.stderr.strip().splitlines() == ["set REPO_URL in this cell to the repository's git URL, "
                                                 "then run the cells again"]
    ok = first_cell("https://example.org/me/repo.git")
    assert ok.returncode == 0 and ok.stdout.split()[0] == "https://example.org/me/repo.git"
    assert ok.stdout.split()[1].startswith("/content/drive/")  # results on Drive survive a disconnect


def test_no_placeholder_left_for_the_user_to_find():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "OWNER/REPO" not in readme and "OWNER/REPO" not in json.dumps(notebook())


def test_the_notebook_runs_the_readme_commands_on_drive():
    lines = shell_lines(notebook())
    project = [line for line in lines if re.search(r"\b[\w]+\.py\b|run_all\.sh|requirements\.txt", line)]
    scripts = {m for line in project for m in re.findall(r"\b(\w+\.py|run_all\.sh)\b", line)}
    assert {"fedavg.py", "run_all.sh", "summarize.py"} <= scripts
    assert all(os.path.isfile(os.path.join(ROOT, s)) for s in scripts)
    assert all("--resume" in line for line in project if re.search(r"(centralized|model_editing|fedavg)\.py", line))
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    missing = [line for line in project if line not in readme]
    assert not missing, f"not in README.md: {missing}"
    badge = r"\[!\[Open In Colab\]\([^)]*\)\]\(https://colab\.research\.google\.com/?[^)]*\)"
    assert re.search(badge, readme) and "colab.ipynb" in readme, "no Open In Colab line in README.md"
