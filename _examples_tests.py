# Tests for examples/ and README.md (issue 4), to be merged into test_loopy.py.
# They need: import importlib.util, inspect, os, re, subprocess, sys; import pytest; import loopy.

import importlib.util
import inspect
import os
import re
import subprocess
import sys

import pytest

import loopy

ROOT = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(ROOT, "README.md")


# --- examples/: each runs (shortened) as a script and reaches its accuracy ---

def _run_script(path, *args, cwd=None):
    """Run a Python script in a fresh process with loopy importable; return its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    # the examples' networks are tiny: one thread is fastest, and immune to a busy machine
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run([sys.executable, path, *args], cwd=cwd or ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{path} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _run_example(script, *args, plot=""):
    return _run_script(os.path.join(ROOT, "examples", script), *args, "--plot", str(plot))


def _final_metrics(stdout):
    """The numbers of the example's last line 'final validation: loss=0.0980 acc=0.9750'."""
    lines = [line for line in stdout.splitlines() if line.startswith("final validation:")]
    assert lines, f"no 'final validation:' line in:\n{stdout[-2000:]}"
    return {name: float(value) for name, value in re.findall(r"(\w+)=([-\d.e]+)", lines[-1])}


@pytest.mark.slow
@pytest.mark.parametrize("script, epochs, threshold", [
    ("fc_digits.py", 10, 0.95),
    ("cnn_digits.py", 10, 0.97),
    ("rnn_digits.py", 10, 0.95),
])
def test_example_reaches_its_accuracy(script, epochs, threshold, tmp_path):
    plot = tmp_path / "curves.png"
    stdout = _run_example(script, "--epochs", str(epochs), plot=plot)
    assert _final_metrics(stdout)["acc"] >= threshold, stdout[-2000:]
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.stat().st_size > 1000  # the training curves were saved


@pytest.mark.slow
def test_example_custom_step_learns():
    stdout = _run_example("custom_step_digits.py", "--epochs", "10")
    before, after = map(float, re.search(r"reconstruction error \(validation\): ([\d.]+) before "
                                         r"training, ([\d.]+) after", stdout).groups())
    assert after < before / 4, stdout[-2000:]
    assert _final_metrics(stdout)["acc"] >= 0.93, stdout[-2000:]


@pytest.mark.slow
def test_example_checkpoint_resume_equals_the_straight_run():
    stdout = _run_example("checkpoint_resume.py", "--epochs", "10")
    assert "simulated crash after step" in stdout
    assert "resumed run == straight run: weights True, history True" in stdout, stdout[-2000:]
    assert _final_metrics(stdout)["acc"] >= 0.95, stdout[-2000:]


@pytest.mark.slow
def test_example_early_stopping_stops_and_restores_the_best_epoch():
    stdout = _run_example("early_stopping.py", "--epochs", "60")
    assert "early stopping: val_loss did not improve for 5 epochs" in stdout, stdout[-2000:]
    best = float(re.search(r"the best was epoch \d+ \(val_loss ([\d.]+)\)", stdout).group(1))
    final = _final_metrics(stdout)
    assert final["loss"] == pytest.approx(best, abs=1e-4)  # the best epoch's weights are back
    assert final["acc"] >= 0.95, stdout[-2000:]


# --- README.md: its code runs, its commands match CI, its API reference is complete ---

def _readme():
    with open(README, encoding="utf-8") as file:
        return file.read()


def _fenced_blocks(text, language):
    """(first line number, code, skipped) for each ```language block; a block is skipped when
    the line before it (blank lines aside) is a <!-- skip-test: why --> comment."""
    blocks, lines, previous, i = [], text.splitlines(), "", 0
    while i < len(lines):
        if lines[i].strip() == "```" + language:
            start = i + 1
            while lines[i + 1].strip() != "```":
                i += 1
            blocks.append((start + 1, "\n".join(lines[start:i + 1]),
                           previous.startswith("<!-- skip-test")))
            i, previous = i + 1, "```"
        elif lines[i].strip():
            previous = lines[i].strip()
        i += 1
    return blocks


def test_readme_python_blocks_run(tmp_path):
    """The README's ```python blocks run in order in one namespace, like a notebook, in a
    fresh process; tracebacks point at README.md's line numbers."""
    blocks = _fenced_blocks(_readme(), "python")
    runnable = [(line, code) for line, code, skipped in blocks if not skipped]
    assert len(runnable) >= 15 and len(blocks) - len(runnable) <= 3  # skip markers stay rare
    driver = ["namespace = {'__name__': '__main__'}"]
    for line, code in runnable:
        source = "\n" * (line - 1) + code  # so that line numbers are the README's
        driver.append(f"exec(compile({source!r}, 'README.md', 'exec'), namespace)")
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n".join(driver))
    _run_script(str(script), cwd=tmp_path)


def test_readme_setup_commands_match_ci():
    text = _readme()
    commands = [code for _, code, _ in _fenced_blocks(text, "bash")]
    assert len(commands) == 2, "the README has exactly two setup commands"
    assert text.index("```bash") < text.index("\n## ")  # near the top, before the first section
    assert "examples/fc_digits.py" in commands[0] and os.path.exists(
        os.path.join(ROOT, "examples", "fc_digits.py"))
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as file:
        ci_test_command = [line for line in file.read().splitlines() if line.strip()][-1]
    assert commands[1].rstrip().endswith(ci_test_command.strip())


def _api_reference():
    text = _readme()
    start = text.index("\n## API reference")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


@pytest.mark.parametrize("name", loopy.__all__)
def test_readme_api_reference_documents(name):
    section = _api_reference()
    assert f"\n### loopy.{name}\n" in section, f"README's API reference has no '### loopy.{name}'"
    value = getattr(loopy, name)
    if inspect.isfunction(value):  # the documented signature is the code's, spaces aside
        squash = lambda text: re.sub(r"\s+", "", text)
        assert squash(f"{name}{inspect.signature(value)}") in squash(section), \
            f"README's signature of loopy.{name} differs from {name}{inspect.signature(value)}"


def test_readme_shows_the_plot():
    assert "](docs/fc_digits.png)" in _readme()
    assert os.path.getsize(os.path.join(ROOT, "docs", "fc_digits.png")) < 200_000
