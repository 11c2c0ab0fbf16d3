"""Shared pieces of the loopy benchmarks: workloads, the hand-written loop, the timing
harness (interleaved rounds, medians, paired ratios), fresh-process import timing, memory
readings and Markdown output. Not a public module; used by overhead.py, peers.py and gpu.py."""

import contextlib
import io
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # benchmark the working copy of loopy.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SEED = 1234
BATCH = 64
LR, MOMENTUM = 0.1, 0.9


# --- workloads -----------------------------------------------------------------------------

def mlp():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


class Workload:
    """Model, data and loaders of one benchmark workload, identical for every runner: the
    tensors on ``device``, and a DataLoader over them (pinned when the device is a GPU)."""

    def __init__(self, key, title, make_model, input_shape, steps, val_steps=0, metric=False,
                 epochs=1, batch=BATCH, device="cpu", precision=None):
        from torch.utils.data import DataLoader, TensorDataset
        self.key, self.title, self.make_model = key, title, make_model
        self.input_shape, self.metric, self.epochs = input_shape, metric, epochs
        self.steps, self.val_steps, self.batch = steps, val_steps, batch
        self.device, self.precision = torch.device(device), precision
        g = torch.Generator().manual_seed(SEED)
        n, nv = steps * batch, val_steps * batch
        X = torch.randn(n + nv, *input_shape, generator=g)
        y = (X.flatten(1) @ torch.randn(X[0].numel(), 10, generator=g)).argmax(1)  # learnable
        self.X, self.y = X[:n].to(self.device), y[:n].to(self.device)
        self.Xv, self.yv = X[n:].to(self.device), y[n:].to(self.device)
        pin = self.device.type == "cuda"
        self.loader = DataLoader(TensorDataset(X[:n], y[:n]), batch_size=batch, shuffle=True,
                                 pin_memory=pin)
        self.val_loader = (DataLoader(TensorDataset(X[n:], y[n:]), batch_size=batch,
                                      pin_memory=pin) if val_steps else None)
        # one context for every step, as nanoGPT does: no branch in the loop
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if precision == "bf16" else contextlib.nullcontext())

    @property
    def total_steps(self):
        return self.steps * self.epochs

    def build(self):
        """A fresh model (on the device) and optimizer, identically initialised every time."""
        torch.manual_seed(SEED)
        model = self.make_model().to(self.device)
        return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def workload_mlp(steps=256, epochs=1):
    return Workload("mlp", f"overhead-bound MLP 32-64-10, {steps} steps", mlp, (32,), steps,
                    epochs=epochs)


def workload_mlp_val(steps=256, val_steps=64, epochs=1):
    return Workload("mlp_val", f"MLP + accuracy + validation ({val_steps} val batches) per "
                    f"epoch, {steps} steps", mlp, (32,), steps, val_steps, metric=True,
                    epochs=epochs)


def accuracy(output, target):
    return (output.argmax(dim=1) == target).float().mean()


# --- the hand-written loop (the floor) -----------------------------------------------------

def hand_loop(model, optimizer, batches, epochs=1, val_batches=None, metric=False, *,
              device=None, autocast=contextlib.nullcontext(), backward=torch.Tensor.backward):
    """The hand-written loop that every runner is measured against: forward, loss, backward,
    step, zero_grad over ``batches`` (a DataLoader or :class:`Slices`, iterated once per epoch).

    With ``metric`` or ``val_batches`` it does the same work as loopy: the epoch's mean loss
    (and accuracy) kept on the device, no sync per step, then validation under no_grad/eval,
    and the numbers pulled once per epoch. ``device`` moves each batch there (non-blocking,
    for pinned memory); ``autocast`` wraps the forward pass and the loss; ``backward`` replaces
    ``loss.backward()`` for a framework that wraps it (Accelerate). Returns a row per epoch."""
    track = metric or val_batches is not None
    history = []
    for _ in range(epochs):
        model.train()
        if track:
            loss_sum, acc_sum, count = _zeros(model), _zeros(model), 0
        for x, y in batches:
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                output = model(x)
                loss = F.cross_entropy(output, y)
            backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            if track:
                n = y.shape[0]
                loss_sum += loss.detach() * n
                if metric:
                    acc_sum += accuracy(output.detach(), y) * n
                count += n
        if track:
            row = {"loss": float(loss_sum) / count}
            if metric:
                row["acc"] = float(acc_sum) / count
            if val_batches is not None:
                row.update(_validate(model, val_batches, metric, device))
            history.append(row)
    return history


def _validate(model, batches, metric, device):
    model.eval()
    loss_sum, acc_sum, count = _zeros(model), _zeros(model), 0
    with torch.no_grad():
        for x, y in batches:
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            output = model(x)
            n = y.shape[0]
            loss_sum += F.cross_entropy(output, y) * n
            if metric:
                acc_sum += accuracy(output, y) * n
            count += n
    model.train()
    row = {"val_loss": float(loss_sum) / count}
    if metric:
        row["val_acc"] = float(acc_sum) / count
    return row


def _zeros(model):
    return torch.zeros((), device=next(model.parameters()).device)


class Slices:
    """In-memory tensors cut into batches as a hand-written loop cuts them, without a
    DataLoader: each epoch a new ``torch.randperm`` order (``shuffle=False``: in order), then
    fancy indexing."""

    def __init__(self, X, y, batch_size=BATCH, shuffle=True):
        self.X, self.y, self.batch_size, self.shuffle = X, y, batch_size, shuffle

    def __iter__(self):
        n, size = self.X.shape[0], self.batch_size
        order = torch.randperm(n).to(self.X.device) if self.shuffle else None
        for start in range(0, n, size):
            if order is None:
                yield self.X[start:start + size], self.y[start:start + size]
            else:
                index = order[start:start + size]
                yield self.X[index], self.y[index]


# --- output suppression --------------------------------------------------------------------

class _FakeTTY(io.TextIOWrapper):
    def isatty(self):
        return True


@contextlib.contextmanager
def quiet(tty=False):
    """Send stdout/stderr of a timed run to /dev/null (a real file, so writes cost what they
    cost in a log file). With ``tty``, stderr claims to be a terminal, so that progress bars
    (tqdm) take their interactive path."""
    null = open(os.devnull, "w")
    err = _FakeTTY(open(os.devnull, "wb"), write_through=True) if tty else null
    try:
        with contextlib.redirect_stdout(null), contextlib.redirect_stderr(err):
            yield
    finally:
        null.close()
        if tty:
            err.close()


# --- timing harness ------------------------------------------------------------------------

class Runner:
    def __init__(self, key, name, fn, baseline=None, tty=False, note=""):
        self.key, self.name, self.fn, self.baseline = key, name, fn, baseline
        self.tty, self.note = tty, note


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_WORDS = {"wall": "wall-clock time", "cpu": "process CPU time"}


def time_runners(runners, workload, rounds, warmup=1, threads=1, clock="wall",
                 synchronize=lambda: None):
    """Interleaved rounds: every round runs every runner once, in a new random order,
    each on a freshly built, identically seeded model. Returns per-runner lists of seconds per
    training step (rounds after the warm-up) and the final weights of the first timed round.

    No gc.collect() before a timed run: a full collection walks every object of torch and
    leaves the caches cold, which added ~0.6 ms to the next call here (more to the runner
    that touches more code), an artifact of the harness rather than a cost of the loop.
    ``clock="cpu"`` times with process_time, which a busy machine disturbs less. With
    ``threads=None`` torch keeps its thread count; ``synchronize`` brackets each timed run (on
    a GPU, so that a run is charged for the work it queued and for none queued before it)."""
    timer = CLOCKS[clock]
    times = {r.key: [] for r in runners}
    weights = {}
    order = random.Random(SEED)
    for round_index in range(warmup + rounds):
        # a new order each round: a rotation would give each runner the same predecessor every
        # time, and what ran just before (caches, the garbage it left) shows on a small model
        for runner in order.sample(runners, len(runners)):
            model, optimizer = workload.build()
            if threads is not None:
                torch.set_num_threads(threads)
            torch.manual_seed(SEED + 1)  # the same shuffle order for every runner
            with quiet(runner.tty):
                synchronize()
                start = timer()
                runner.fn(model, optimizer, workload)
                synchronize()
                elapsed = timer() - start
            if round_index >= warmup:
                times[runner.key].append(elapsed / workload.total_steps)
                if runner.key not in weights:
                    weights[runner.key] = [p.detach().clone() for p in model.parameters()]
    return times, weights


def summarize(runners, times, weights=None, reference="hand"):
    """Median time per step, and the median over rounds of the paired ratio to the runner's
    baseline (runner time in round r / baseline time in round r)."""
    rows = []
    for runner in runners:
        t = times[runner.key]
        row = {"key": runner.key, "runner": runner.name, "ms_per_step": 1e3 * median(t),
               "ms_spread": [1e3 * min(t), 1e3 * max(t)], "rounds": len(t)}
        if runner.baseline is not None:
            base = times[runner.baseline]
            row["baseline"] = runner.baseline
            row["ratio"] = median([a / b for a, b in zip(t, base)])
        if weights is not None and reference in weights and runner.key in weights:
            row.update(compare_weights(weights[runner.key], weights[reference]))
        if runner.note:
            row["note"] = runner.note
        rows.append(row)
    return rows


def parser(doc):
    """The options both benchmark scripts take: --json, --save, --quick and --clock."""
    import argparse
    options = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    options.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    options.add_argument("--save", metavar="PATH", help="also write the JSON to PATH")
    options.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    options.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                         help="wall time (default) or process CPU time (steadier on a busy box)")
    return options


def report(result, args, render):
    """Write the JSON to ``--save``, then print it (``--json``) or the Markdown tables."""
    if args.save:
        with open(args.save, "w") as file:
            json.dump(result, file, indent=2)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return result


def compare_weights(a, b):
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return {"bit_identical": False, "max_abs_diff": None}
    return {"bit_identical": all(torch.equal(x, y) for x, y in zip(a, b)),
            "max_abs_diff": max(float((x - y).abs().max()) for x, y in zip(a, b))}


def median(values):
    return statistics.median(values)


# --- fresh processes -----------------------------------------------------------------------

IMPORT_PROBE = """
import json, os, sys, time
sys.path.insert(0, {root!r})
{setup}
t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
{stmt}
t2 = time.perf_counter()
print("IMPORT-TIMES", json.dumps([t1 - t0, t2 - t1]))
"""


def import_cost(stmt, repeats, setup="", env=None):
    """Median over fresh processes of the time of ``stmt`` (an import) right after
    ``import torch`` in the same process, i.e. its cost beyond torch. One unrecorded warm-up
    process first (it writes the .pyc files, so the figure is that of an installed package).
    Returns (median beyond torch, median torch)."""
    code = IMPORT_PROBE.format(root=ROOT, setup=setup, stmt=stmt)
    # as installed: with cached bytecode (pip compiles .pyc files at install time)
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    environment.update(env or {})
    beyond, base = [], []
    for i in range(repeats + 1):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=ROOT, env=environment, check=True).stdout
        t_torch, t_stmt = json.loads(out.split("IMPORT-TIMES", 1)[1])
        if i:
            base.append(t_torch)
            beyond.append(t_stmt)
    return median(beyond), median(base)


def rss_kib():
    """Current and peak resident set size of this process, KiB (Linux /proc)."""
    status = open("/proc/self/status").read()
    get = lambda key: int(re.search(key + r":\s+(\d+)", status).group(1))  # noqa: E731
    return get("VmRSS"), get("VmHWM")


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


# --- reporting -----------------------------------------------------------------------------

def machine():
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "threads": 1,
            "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def weights_cell(row):
    if "bit_identical" not in row:
        return "—"
    if row["bit_identical"]:
        return "bit-identical"
    diff = row["max_abs_diff"]
    return "shape differs" if diff is None else f"max diff {diff:.2e}"
