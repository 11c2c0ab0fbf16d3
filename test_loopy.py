"""Tests for loopy. The oracle is the hand-written PyTorch loop: same seed, bit-identical weights.

Most tests train through ``train(**overrides)``: a small MLP, SGD, one epoch, no progress
output, each argument overridable. ``python -m pytest -m "not slow"`` skips the subprocess
runs (torchrun, examples, benchmarks) for a quick loop; CI runs everything. The subprocesses
are few and shared, and start before the first test, beside the in-process tests: see
``launches`` (one torchrun launch runs every multi-process scenario) and ``spawner`` (which
imports torch once and forks each single-process script)."""
import collections
import copy
import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import loopy

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")


# --- CUDA: only the tests marked cuda see a GPU ---

@pytest.fixture(autouse=True)
def cuda_only_where_marked(request, monkeypatch):
    """Tests not marked ``cuda`` see no CUDA, as on CI, also on a GPU machine: there
    ``device="auto"`` would pick the GPU, and the oracles they compare with run on the CPU.
    Tests marked ``cuda`` see the GPU, or are skipped without one."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        yield
        return
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False here)")
    yield
    torch.cuda.set_sync_debug_mode(0)  # a failed sync check must not leak into the next test


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests' networks are tiny: one thread is the fastest for them (as the examples and
    the child processes below run too), and on a busy machine a second thread that spins
    waiting for the first made the in-process tests four times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cpu_env(**variables):
    """The environment for a child process, which the fixture above cannot reach: ours, but
    with no GPU visible, so that it trains on the CPU as on CI (its results are compared with
    CPU ones, and torchrun's two processes must not share one GPU), plus ``variables``."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", **variables}


def command(processes=None):
    """How a test starts a script: ``python``, or ``torchrun`` with ``processes`` processes."""
    if not processes:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}"]


def finished(process, timeout=300):
    """Wait for a started process; return its exit code, stdout and stderr. One still running
    after ``timeout`` seconds is stopped (SIGTERM, which torchrun passes on to its workers)."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        stdout, stderr = process.communicate()
        stderr += f"\n(stopped after {timeout} s)"
    return process.returncode, stdout, stderr


# --- helpers: small data and models, the hand-written loop, train() ---

def make_data(n=200, features=8, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, features, generator=generator)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return X, y % classes


def make_mlp(seed=0, dropout=0.0):
    """(This seeds torch's global generator: seed a run after building its model.)"""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(16, 3))


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 3))


def image_data(n=96):
    X, y = make_data(n, features=64)
    return X.reshape(n, 1, 8, 8), y


def hand_loop(model, optimizer, loader, epochs, val_loader=None, metric=None):
    """The loop that loopy replaces, written out, with the epoch means computed by hand."""
    history = collections.defaultdict(list)
    for _ in range(epochs):
        model.train()
        total = correct = count = 0.0
        for x, y in loader:
            output = model(x)
            loss = F.cross_entropy(output, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item() * len(y)
            correct += metric(output, y).item() * len(y) if metric else 0
            count += len(y)
        history["loss"].append(total / count)
        if metric:
            history["acc"].append(correct / count)
        if val_loader is not None:
            model.eval()
            total = count = correct = 0.0
            with torch.no_grad():
                for x, y in val_loader:
                    output = model(x)
                    total += F.cross_entropy(output, y).item() * len(y)
                    correct += (output.argmax(1) == y).float().mean().item() * len(y)
                    count += len(y)
            history["val_loss"].append(total / count)
            history["val_acc"].append(correct / count)
    return history


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def tensor_loader(X, y, batch_size=32, shuffle=False):
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=shuffle)


def train(*, model=None, optimizer=torch.optim.SGD, lr=0.1, loss_fn=F.cross_entropy,
          loader=None, n=64, **options):
    """``loopy.fit`` with this file's usual run, which any argument overrides: ``make_mlp()``
    trained by ``optimizer(model.parameters(), lr=lr)`` (a class; an optimizer object is used
    as given) on ``make_data(n)`` with cross-entropy, for one epoch, without progress output.
    Returns the loop: ``loop.model`` and ``loop.optimizer`` are the model and the optimizer."""
    model = make_mlp() if model is None else model
    if isinstance(optimizer, type):
        optimizer = optimizer(model.parameters(), lr=lr)
    loader = make_data(n) if loader is None else loader
    return loopy.fit(model, loss_fn, optimizer, loader, **{"progress": False, **options})


def fit_error(error, **overrides):
    """The message of the ``error`` that ``train(**overrides)`` raises."""
    with pytest.raises(error) as raised:
        train(**overrides)
    return str(raised.value)


def recorder(log, name="hook"):
    """A hook that logs its setup, every event, and its teardown."""
    try:
        log.append((name, "setup"))
        while True:
            loop = yield
            log.append((name, loop.event))
    finally:
        log.append((name, "closed"))


def listener(events="step", seen=None):
    """A hook that waits for ``events`` and, given a list ``seen``, notes (event, step) there."""
    while True:
        loop = yield events
        if seen is not None:
            seen.append((loop.event, loop.step))


def count_steps(steps):
    """A hook that appends ``loop.step`` at every "step" to ``steps``."""
    while True:
        steps.append((yield "step").step)


def stop_when(step):
    while True:
        loop = yield "step"
        if loop.step == step:
            loop.stop("test stop")


# --- launches: the slow tests' subprocesses, shared, started before the first test ---

SCENARIOS_SCRIPT = """
import contextlib, json, os, runpy, sys, time, torch
import loopy
scenarios, out = json.loads(sys.argv[1]), sys.argv[2]
rank, seed, attributes = os.environ.get("RANK", "0"), torch.initial_seed(), dict(vars(loopy))
for name, script, arguments, env in scenarios:
    print(f"--- scenario {name} starts at {time.time()}", file=sys.stderr, flush=True)
    os.environ.update(env)
    torch.manual_seed(seed)  # each starts from the random state of a fresh process
    sys.argv, sys.path[0] = [script, *arguments], os.path.dirname(script)
    with open(os.path.join(out, f"{name}.rank{rank}.stdout"), "w") as stdout, \\
            contextlib.redirect_stdout(stdout):
        runpy.run_path(script, run_name="__main__")
    vars(loopy).update(attributes)  # what a scenario patched in loopy ends with it
    open(os.path.join(out, f"{name}.rank{rank}.done"), "w").close()
"""


def free_port():
    import socket
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def _launch_scenarios(spawn, folder, processes, scenarios, scripts):
    """Start SCENARIOS_SCRIPT in ``processes`` processes (under torchrun when more than one,
    else through ``spawn``). It runs ``scenarios``, [(name, script, arguments[, environment])],
    one after another in the same processes (and process group), each as a fresh script:
    ``__main__``, its own arguments and folder ``folder / name`` (for "{out}" in its
    arguments), the random state of a fresh process."""
    runs = []
    for name, script, arguments, *env in scenarios:
        (folder / name).mkdir(parents=True)
        runs.append((name, str(scripts[script]),
                     [a.replace("{out}", str(folder / name)) for a in arguments],
                     env[0] if env else {}))
    arguments = [str(scripts["runner"]), json.dumps(runs), str(folder)]
    if processes == 1:
        return spawn(*arguments)
    return subprocess.Popen(command(processes) + arguments,
                            env=cpu_env(PYTHONPATH=HERE, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def in_background(function, *args):
    """Call ``function(*args)`` in a thread; returns a function that waits for it and returns
    its result (or raises its error)."""
    result = {}

    def call():
        try:
            result["value"] = function(*args)
        except BaseException as error:
            result["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()

    def wait():
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    return wait


def ended(process):
    """finished(process), and the time it ended. (In a thread, see in_background, it also
    reads the process's pipes, which would stop it when full.)"""
    return (*finished(process), time.time())


SPAWNER_SCRIPT = """
import json, os, runpy, select, sys, traceback, torch, loopy
torch.set_num_threads(1)
torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # (torch imports its compiler here, once)
seed, requests, running = torch.initial_seed(), b"", {}


def run(script, arguments, streams, cwd, env):  # in the child, as a fresh process would
    for fd, path in enumerate(streams):  # stdin, stdout, stderr
        flags = os.O_RDWR if path.startswith("/dev/") else os.O_WRONLY if fd else os.O_RDONLY
        os.dup2(os.open(path, flags), fd)
    sys.stdin = sys.__stdin__ = os.fdopen(0, closefd=False)
    sys.stdout = sys.__stdout__ = os.fdopen(1, "w", buffering=1 if os.isatty(1) else -1,
                                            closefd=False)
    sys.stderr = sys.__stderr__ = os.fdopen(2, "w", buffering=1, errors="backslashreplace",
                                            closefd=False)
    os.chdir(cwd)
    for name, value in env.items():
        os.environ.pop(name, None) if value is None else os.environ.update({name: value})
    torch.manual_seed(seed)
    sys.argv, sys.path[0] = [script, *arguments], os.path.dirname(script)
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as exit:
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)
        return exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


while True:  # one thread: a fork copies only the thread that forks, and no lock it holds
    if select.select([0], [], [], 0.02)[0]:
        data = os.read(0, 65536)
        if not data:
            break
        requests += data
    while b"\\n" in requests:
        line, requests = requests.split(b"\\n", 1)
        base, *request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run(*request)
            finally:
                os._exit(code)
        running[pid] = base
        print(pid, flush=True)
    for pid, base in list(running.items()):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            with open(base + ".exit-", "w") as file:
                file.write(str(os.waitstatus_to_exitcode(status)))
            os.rename(base + ".exit-", base + ".exit")  # (whole, or not there)
            del running[pid]
"""


class Spawned:
    """A script that the spawner runs, with what the tests use of subprocess.Popen: its
    stdout line by line or what is left of it, its stderr, signals, its exit code (-N for a
    signal N)."""

    def __init__(self, base, pid):
        self.base, self.pid, self.returncode, self._rest = base, pid, None, ""
        self._stdout, self.stderr = open(f"{base}.stdout"), open(f"{base}.stderr")
        self.stdout = self._lines()

    def poll(self):
        if self.returncode is None and os.path.exists(f"{self.base}.exit"):
            with open(f"{self.base}.exit") as file:
                self.returncode = int(file.read())
        return self.returncode

    def wait(self, timeout=None):
        deadline = time.monotonic() + (timeout or 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"spawned {self.base}", timeout)
            time.sleep(0.01)
        return self.returncode

    def _lines(self):
        while True:
            ended = self.poll() is not None  # (before reading: then nothing written is missed)
            self._rest += self._stdout.read()
            while "\n" in self._rest:
                line, self._rest = self._rest.split("\n", 1)
                yield line + "\n"
            if ended:
                return
            time.sleep(0.01)

    def communicate(self, timeout=None):
        self.wait(timeout)
        rest, self._rest = self._rest + self._stdout.read(), ""
        return rest, self.stderr.read()

    def send_signal(self, signum):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


@pytest.fixture(scope="session")
def spawner(tmp_path_factory):
    """``spawn(script, *arguments, stdin=, stdout=, stderr=, cwd=, env=)`` runs a script as a
    fresh process would (``__main__``, its arguments, the random state of a fresh process)
    but without paying again for ``import torch`` and the compiler that torch.optim imports
    (about 3-4 s of CPU each): a spawner process imports them once, then forks a child for
    each script. Returns a Spawned; stdin, stdout and stderr are paths (by default /dev/null
    and files), ``env`` changes the environment (None removes a variable)."""
    folder = tmp_path_factory.mktemp("spawned")
    (folder / "spawner.py").write_text(SPAWNER_SCRIPT)
    with open(folder / "spawner.stderr", "w") as errors:
        process = subprocess.Popen([sys.executable, str(folder / "spawner.py")], cwd=HERE,
                                   env=cpu_env(PYTHONPATH=HERE), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=errors, text=True)
    count = itertools.count()

    def spawn(script, *arguments, stdin=os.devnull, stdout=None, stderr=None, cwd=HERE,
              env=None):
        base = str(folder / str(next(count)))
        for name in ("stdout", "stderr"):
            open(f"{base}.{name}", "w").close()
        streams = [str(stdin), str(stdout or f"{base}.stdout"), str(stderr or f"{base}.stderr")]
        process.stdin.write(json.dumps([base, str(script), [str(a) for a in arguments],
                                        streams, str(cwd), env or {}]) + "\n")
        process.stdin.flush()
        pid = process.stdout.readline()
        assert pid, f"the spawner ended:\n{(folder / 'spawner.stderr').read_text()[-3000:]}"
        return Spawned(base, int(pid))

    yield spawn
    process.stdin.close()
    process.wait(timeout=60)


@pytest.fixture(scope="session")
def launches(spawner, tmp_path_factory):
    """The multi-process scenarios and the benchmark smoke runs, run once, in three launches
    started together (a launch costs seconds of start-up alone): torchrun's two processes run
    the multi-process scenarios one after another in one process group, ending with "crash",
    which fails the launch on purpose; one plain process runs the one-process runs that they
    are compared with and the benchmark scripts; and a second torchrun launch hangs a rank
    ("hang": the process group's timeout must be set when the group starts). Returns a
    function that waits for a launch (2, 1 or "hang") and returns its folder, exit code,
    stderr and end time; ``scenario()`` gives a scenario's folder once it finished."""
    tmp_path = tmp_path_factory.mktemp("launches")
    texts = {"runner": SCENARIOS_SCRIPT, "ddp": DISTRIBUTED_SCRIPT,
             "torchrun13": TORCHRUN_13_SCRIPT, "log_to": LOG_TO_SCRIPT,
             "numpy": TORCHRUN_16_SCRIPT, "ema": EMA_DISTRIBUTED_SCRIPT,
             "gan": GAN_DISTRIBUTED_SCRIPT, "sliced": SLICED_DISTRIBUTED_SCRIPT,
             "empty": ISSUE_16_SCRIPT, "train": TORCHRUN_TRAINING_SCRIPT}
    scripts = {name: tmp_path / f"{name}_script.py" for name in texts}  # (not to hide modules)
    for name, text in texts.items():
        scripts[name].write_text(text)
    scripts.update({"ddp_digits": os.path.join(HERE, "examples", "ddp_digits.py"),
                    **{name: os.path.join(BENCHMARKS, f"{name}.py")
                       for name in ("overhead", "peers", "gpu")}})
    out = "{out}"
    quick = ["--quick", "--rounds", "1", "--save", out + "/result.json"]
    runs = {2: [("world-2", "ddp", ["plain,accumulate,stop", out, "8"]),
                ("split", "torchrun13", ["split", out]), ("fsdp", "torchrun13", ["fsdp", out]),
                ("log_to", "log_to", [out]), ("numpy", "numpy", [out, "16"]),
                ("ema", "ema", [out, "8"]), ("gan", "gan", ["gan", out, "8"]),
                ("sliced", "sliced", [out, "0"]), ("sliced-drop_last", "sliced", [out, "1"]),
                ("ddp_digits", "ddp_digits", ["--epochs", "8", "--plot", ""]),
                ("straight", "train", ["-", "2", "fresh", out + "/straight.pt", "0"]),
                ("empty", "empty", [out]), ("crash", "ddp", ["crash", out, "8"])],
            1: [("world-1", "ddp", ["plain,accumulate", out, "16"]),
                ("split", "torchrun13", ["split", out]), ("numpy", "numpy", [out, "32"]),
                ("ema", "ema", [out, "16"]), ("gan", "gan", ["gan", out, "16"]),
                ("overhead", "overhead", quick + ["--steps", "4", "--import-repeats", "1"]),
                ("peers", "peers", quick + ["--runners", "sliced,loopy_tensors", "--workloads",
                                            "mlp_val", "--steps", "4"]),
                ("gpu", "gpu", quick + ["--device", "cpu"]),
                ("fsdp", "torchrun13", ["fsdp", out], {  # as torchrun starts one process
                    "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})],
            "hang": [("hang", "torchrun13", ["hang", out])]}
    started = {launch: _launch_scenarios(spawner, tmp_path / str(launch),
                                         1 if launch == 1 else 2, scenarios, scripts)
               for launch, scenarios in runs.items()}
    waits = {launch: in_background(ended, process) for launch, process in started.items()}

    def results(launch):
        code, _, stderr, end = waits[launch]()
        return tmp_path / str(launch), code, stderr, end

    yield results
    for process in started.values():
        process.kill()  # (a no-op once it has ended)


def scenario(launches, processes, name):
    """The folder of scenario ``name`` of the launch of ``processes`` processes, checked to
    have finished on each of them."""
    folder, code, stderr, _ = launches(processes)
    assert all((folder / f"{name}.rank{rank}.done").exists() for rank in range(processes)), \
        f"scenario {name!r} did not finish on {processes} process(es) (exit code {code}):\n" \
        f"{stderr[-3000:]}"
    return folder / name


def rank_results(launches, processes, name, mode=""):
    """What each process of scenario ``name`` saved (in its folder ``mode``)."""
    folder = scenario(launches, processes, name) / mode
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True)
            for rank in range(processes)]


@pytest.fixture(autouse=True, scope="session")
def start_launches_first(request):
    """The subprocesses that the selected tests need start before the first test, and run on
    the second core beside the in-process tests until a test asks for their results."""
    for name in ("launches", "examples", "straight_training", "sigterm_to_torchrun",
                 "fresh_interpreters", "notebook_outputs"):
        if any(name in item.fixturenames for item in request.session.items):
            request.getfixturevalue(name)


# --- oracle parity ---

@pytest.mark.parametrize("make_model, data", [(make_mlp, make_data), (make_cnn, image_data)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_fit_is_bit_identical_to_the_hand_written_loop(make_model, data, shuffle):
    X, y = data()
    Xv, yv = data(48)
    by_hand = make_model()
    optimizer = torch.optim.Adam(by_hand.parameters(), lr=0.01)
    torch.manual_seed(1)
    expected = hand_loop(by_hand, optimizer, tensor_loader(X, y, shuffle=shuffle), 3,
                         tensor_loader(Xv, yv), metric=loopy.accuracy)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(1)
    loop = train(model=model, optimizer=optimizer, loader=tensor_loader(X, y, shuffle=shuffle),
                 epochs=3, val_loader=tensor_loader(Xv, yv), metrics={"acc": loopy.accuracy})
    assert same_weights(model, by_hand)
    for name in ("loss", "acc", "val_loss", "val_acc"):
        assert loop.history[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-7)
    assert loop.model is model and loop.optimizer is optimizer


@pytest.mark.parametrize("shuffle", [False, True])
def test_in_memory_tensors_give_the_same_batches_as_a_dataloader(shuffle):
    X, y = make_data(203)  # a partial last batch
    runs = []
    for loader, options in ((tensor_loader(X, y, batch_size=16, shuffle=shuffle), {}),
                            ((X, y), dict(batch_size=16, shuffle=shuffle))):
        batches = []

        def keep_batches():
            while True:
                batches.append([t.clone() for t in (yield "batch").batch])

        model = make_mlp()
        torch.manual_seed(3)
        train(model=model, loader=loader, hooks=[keep_batches()], **options)
        runs.append((batches, torch.get_rng_state()))
    (expected, after_dataloader), (got, after_tensors) = runs
    assert len(got) == len(expected) == 13
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, expected))
    assert torch.equal(after_tensors, after_dataloader)  # the next draws are the same too


@pytest.mark.parametrize("shuffle", [False, True])
def test_fit_on_tensors_equals_the_dataloader_loop(shuffle):
    X, y = make_data(203)
    by_hand, model = make_mlp(dropout=0.2), make_mlp(dropout=0.2)
    torch.manual_seed(5)
    hand_loop(by_hand, torch.optim.SGD(by_hand.parameters(), lr=0.1),
              tensor_loader(X, y, batch_size=16, shuffle=shuffle), 2)
    torch.manual_seed(5)
    train(model=model, loader=(X, y), batch_size=16, shuffle=shuffle, epochs=2)
    assert same_weights(model, by_hand)


def test_history_is_plain_json_floats_named_like_keras():
    X, y = make_data()
    loop = train(loader=(X, y), val_loader=(X, y), epochs=2, metrics={"acc": loopy.accuracy})
    assert set(loop.history) == {"loss", "acc", "val_loss", "val_acc", "lr"}
    assert all(type(v) is float and len(values) == 2 for values in loop.history.values()
               for v in values)
    assert json.loads(json.dumps(loop.history)) == loop.history
    assert loop.metrics == {name: values[-1] for name, values in loop.history.items()}


def test_history_weights_the_mean_by_batch_size():
    X, y = make_data(70)  # batches of 32, 32, 6
    loop = train(loader=(X, y), lr=0.0, metrics={"acc": loopy.accuracy})
    before = make_mlp()
    with torch.no_grad():
        output = before(X)
    assert loop.history["loss"][0] == pytest.approx(F.cross_entropy(output, y).item(), rel=1e-6)
    assert loop.history["acc"][0] == pytest.approx((output.argmax(1) == y).float().mean().item())


def test_meter_folds_the_same_whenever_it_is_read(monkeypatch):
    monkeypatch.setattr(loopy._Meter, "FOLD", 16)  # so that 150 values fold 9 times
    values = [torch.tensor(float(i) / 7) for i in range(150)]
    read_often, read_once = loopy._Meter(), loopy._Meter()
    for value in values:
        read_often.add(value, 3)
        read_often.mean()
        read_once.add(value, 3)
    assert read_often.mean() == read_once.mean() == pytest.approx(sum(range(150)) / 7 / 150)


# --- events and hooks ---

def test_event_sequence_for_two_epochs_of_three_batches():
    log = []
    train(n=96, hooks=[recorder(log)], epochs=2)
    events = [event for _, event in log]
    per_batch = ["batch", "backward", "step"]
    assert events == ["setup", "start", *per_batch * 3, "epoch", *per_batch * 3, "epoch", "end",
                      "closed"]


def test_a_finished_loop_is_freed_by_reference_counting_alone():
    """No cycle keeps a run (its model, its loader's worker processes) until the garbage
    collector's next pass once the caller lets go of the loop."""
    import gc
    import weakref
    gc.collect()
    gc.disable()
    try:
        loop = train(hooks=[loopy.ema(), loopy.early_stopping("loss"), recorder([])], epochs=2,
                     metrics={"acc": loopy.accuracy}, progress="epoch")
        freed = weakref.ref(loop)
        del loop
        assert freed() is None
    finally:
        gc.enable()


def test_hooks_run_in_order_and_close_in_reverse():
    log = []
    train(n=32, hooks=[recorder(log, "a"), recorder(log, "b")])
    assert [n for n, e in log if e == "start"] == ["a", "b"]
    assert [n for n, e in log if e == "step"] == ["a", "b"]
    assert [n for n, e in log if e == "closed"] == ["b", "a"]


def test_a_hook_waits_for_what_it_yields_and_sees_the_live_loop():
    seen = []

    def hook():
        loop = yield "start"
        seen.append((loop.event, loop.epoch, loop.step))
        while True:
            loop = yield ("step", "epoch")
            seen.append((loop.event, loop.epoch, loop.step))
            if loop.event == "step":
                assert loop.loss.requires_grad is False and loop.output.shape == (32, 3)
                assert loop.batch[0].shape == (32, 8)

    train(n=96, hooks=[hook()], epochs=2)
    assert seen == [("start", 0, 0), ("step", 0, 1), ("step", 0, 2), ("step", 0, 3),
                    ("epoch", 0, 3), ("step", 1, 4), ("step", 1, 5), ("step", 1, 6),
                    ("epoch", 1, 6)]


def test_a_batch_hook_may_replace_the_batch():
    outputs = []

    def zero_inputs():
        while True:
            loop = yield "batch"
            loop.batch = (torch.zeros_like(loop.batch[0]), loop.batch[1])
            loop = yield "step"
            outputs.append(loop.output)

    train(lr=0.0, hooks=[zero_inputs()])
    assert len(outputs) == 2 and all(torch.equal(o[0], o[1]) for o in outputs)


def test_stop_ends_training_delivers_end_and_keeps_the_reason():
    log = []

    def stop_after_first_epoch():
        loop = yield "epoch"
        loop.stop("enough")
        loop = yield "end"
        log.append(loop.stop_reason)

    loop = train(n=96, hooks=[stop_after_first_epoch()], epochs=5)
    assert loop.stop_reason == "enough" and log == ["enough"]
    assert len(loop.history["loss"]) == 1 and loop.step == 3


def test_stop_mid_epoch_discards_the_partial_epoch():
    loop = train(n=96, hooks=[stop_when(4)], epochs=5)
    assert loop.step == 4 and loop.epoch == 1 and len(loop.history["loss"]) == 1


def test_a_hook_that_returns_is_dropped():
    calls = []

    def once():
        loop = yield "step"
        calls.append(loop.step)

    train(hooks=[once()], epochs=2)
    assert calls == [1]


def test_a_hook_that_returns_before_its_first_yield_runs_its_setup_and_is_dropped():
    setup = []

    def setup_only():
        setup.append("ran")
        return
        yield  # a generator that never waits for an event

    loop = train(hooks=[setup_only(), recorder([])], epochs=2)
    assert setup == ["ran"] and loop.step == 4


@pytest.mark.parametrize("error", [ValueError("model broke"), KeyboardInterrupt()])
def test_hooks_are_closed_in_reverse_and_the_error_propagates_unchanged(error):
    log = []

    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = make_mlp(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise error
            return self.inner(x)

    with pytest.raises(type(error)) as raised:
        train(model=Failing(), hooks=[recorder(log, "a"), recorder(log, "b")])
    assert raised.value is error
    assert log[-2:] == [("b", "closed"), ("a", "closed")]
    assert ("a", "end") not in log


def test_a_hook_failing_to_close_after_an_error_is_noted_on_that_error():
    def broken_teardown():
        try:
            while True:
                yield "step"
        finally:
            raise OSError("could not flush")

    def failing_loss(output, target):
        raise ValueError("loss broke")

    with pytest.raises(ValueError, match="loss broke") as raised:
        train(loss_fn=failing_loss, hooks=[broken_teardown()])
    if sys.version_info >= (3, 11):
        assert "while closing the hooks after this error: OSError('could not flush')" in \
            raised.value.__notes__


def test_an_error_inside_a_hook_propagates_and_the_others_are_closed():
    log = []

    def broken():
        yield "step"
        raise LookupError("hook bug")

    with pytest.raises(LookupError, match="hook bug"):
        train(hooks=[recorder(log), broken()])
    assert log[-1] == ("hook", "closed")


def test_a_hook_cannot_swallow_the_models_error():
    def swallower():
        try:
            while True:
                yield
        except BaseException:
            return

    with pytest.raises(FloatingPointError):
        train(n=32, loss_fn=lambda output, target: torch.tensor(math.nan, requires_grad=True),
              hooks=[swallower()])


# --- hooks that only listen change nothing ---

def custom_step(model, batch):
    output = model(batch[0])
    return F.cross_entropy(output, batch[1]), output, batch[1]


@pytest.mark.parametrize("option", [
    {}, dict(metrics=None), dict(accumulate=2), dict(clip_grad=0.5), dict(nonfinite="skip"),
    dict(loss_fn=None, step=custom_step), dict(precision="bf16"), dict(precision="fp16"),
    dict(scheduler="per step")],
    ids=["defaults", "no metrics", "accumulate", "clip_grad", "nonfinite=skip", "step=",
         "bf16", "fp16", "scheduler per step"])
def test_hooks_that_listen_to_every_event_change_nothing(option):
    """With metrics, validation, dropout and shuffling, as a plain run does them: listening for
    every step, or for every event, changes neither the weights nor the history, bit for bit."""
    X, y = make_data(203)  # a partial last batch
    runs = []
    for events in (None, "step", ("batch", "backward", "step", "epoch")):
        seen = []
        model = make_mlp(dropout=0.2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        options = dict(option)
        if options.get("scheduler") == "per step":
            options.update(scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 5, gamma=0.5),
                           scheduler_interval="step")
        options = {"metrics": {"acc": loopy.accuracy}, **options}
        loop = train(model=model, optimizer=optimizer, loader=(X, y), epochs=3, shuffle=True,
                     seed=3, val_loader=(X[:50], y[:50]),
                     hooks=[] if events is None else [listener(events, seen)], **options)
        runs.append((model, loop, seen))
    (plain, plain_loop, _), *listened = runs
    steps = 3 * math.ceil(7 / option.get("accumulate", 1))  # 7 batches an epoch
    for model, loop, seen in listened:
        assert same_weights(model, plain)
        assert loop.history == plain_loop.history and loop.step == plain_loop.step == steps
        assert torch.equal(loop.loss, plain_loop.loss) and not loop.loss.requires_grad
        assert torch.equal(loop.output, plain_loop.output)
        assert all(torch.equal(a, b) for a, b in zip(loop.batch, plain_loop.batch))
    (_, _, steps_seen), (_, _, events_seen) = listened[0], listened[1]
    assert steps_seen == [("step", step) for step in range(1, steps + 1)]
    assert [event for event, _ in events_seen].count("batch") == 3 * 7
    assert [event for event, _ in events_seen].count("epoch") == 3


def test_a_hook_that_starts_waiting_for_steps_mid_run_gets_them_from_then_on():
    X, y = make_data(96)  # 3 batches per epoch
    steps = []

    def late_watcher():
        loop = yield "epoch"
        while True:
            loop = yield ("step", "epoch")
            if loop.event == "step":
                steps.append((loop.epoch, loop.step, loop.batch_index))

    def mid_epoch_watcher():
        loop = yield "batch"
        loop = yield "batch"  # the second batch, then every step from there
        while True:
            loop = yield "step"
            steps.append((loop.epoch, loop.step, loop.batch_index))

    loop = train(loader=(X, y), hooks=[late_watcher()], epochs=3)
    assert steps == [(1, 4, 0), (1, 5, 1), (1, 6, 2), (2, 7, 0), (2, 8, 1), (2, 9, 2)]
    assert same_weights(loop.model, train(loader=(X, y), epochs=3).model)
    steps.clear()
    train(loader=(X, y), hooks=[mid_epoch_watcher()], epochs=2)
    assert steps == [(0, 2, 1), (0, 3, 2), (1, 4, 0), (1, 5, 1), (1, 6, 2)]


def test_loss_errors_read_the_same_with_and_without_a_step_hook():
    for loss_fn, error in ((lambda o, t: F.cross_entropy(o, t, reduction="none"), TypeError),
                           (lambda o, t: F.cross_entropy(o.detach(), t), ValueError),
                           (lambda o, t: F.cross_entropy(o, t).item(), TypeError)):
        assert fit_error(error, loss_fn=loss_fn) == \
            fit_error(error, loss_fn=loss_fn, hooks=[listener()])
    message = fit_error(TypeError, loader=[torch.zeros(4, 8)])
    assert message == fit_error(TypeError, loader=[torch.zeros(4, 8)], hooks=[listener()])
    assert "(inputs, target) pairs" in message


@pytest.mark.parametrize("listening", [False, True], ids=["no hook", "a step hook"])
def test_ctrl_c_and_max_steps_stop_after_the_step(listening):
    def hooks():
        return [listener()] if listening else []

    loop = train(n=96, epochs=5, max_steps=4, hooks=hooks())
    assert loop.step == 4 and loop.batch_index == 0 and loop.epoch == 1
    assert "max_steps=4" in loop.stop_reason and len(loop.history["loss"]) == 1
    calls = []

    def ctrl_c_in_the_fifth_loss(output, target):  # as if Ctrl+C came during step 5
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGINT)
        return F.cross_entropy(output, target)

    with pytest.warns(UserWarning, match="interrupted by Ctrl[+]C in epoch 2, after step 5"):
        loop = train(n=96, epochs=5, loss_fn=ctrl_c_in_the_fifth_loss, hooks=hooks())
    assert loop.step == 5 and loop.batch_index == 1 and loop.epoch == 1
    assert loop.stop_reason == "interrupted by Ctrl+C" and len(loop.history["loss"]) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- hook protocol errors ---

def test_passing_the_generator_function_says_call_it():
    message = fit_error(TypeError, hooks=[loopy.early_stopping])
    assert "hooks[0]" in message and "'early_stopping'" in message
    assert "call it, hooks=[early_stopping()]" in message


def test_a_non_generator_hook_is_rejected():
    def not_a_generator():
        return 1

    message = fit_error(TypeError, hooks=[not_a_generator])
    assert "hooks[0]" in message and "without yield" in message and "hooks=[my_hook()]" in message
    message = fit_error(TypeError, hooks=[42])
    assert "hooks[0]" in message and "not a generator" in message


def test_a_reused_hook_is_rejected():
    hook = recorder([])
    train(n=32, hooks=[hook])
    message = fit_error(loopy.HookError, hooks=[hook])
    assert "hook 'recorder'" in message and "test_loopy.py:" in message
    assert "already used" in message and "create a new one" in message


def test_an_unknown_event_lists_the_valid_ones():
    def typo():
        yield "epochs"

    message = fit_error(loopy.HookError, hooks=[typo()])
    assert "hook 'typo'" in message and "'epochs'" in message
    assert all(repr(event) in message for event in loopy.EVENTS)


def test_a_hook_with_a_bad_first_yield_is_closed_before_the_error():
    closed = []

    def bad():
        try:
            yield "epochs"
        finally:
            closed.append(True)

    fit_error(loopy.HookError, hooks=[bad()])
    assert closed == [True]


def test_a_hook_that_ignores_generator_exit_is_named():
    def stubborn():
        ignored = False
        while True:
            try:
                yield "step"
            except GeneratorExit:
                if ignored:  # the second close() (by gc) ends it quietly
                    return
                ignored = True

    message = fit_error(loopy.HookError, hooks=[stubborn()])
    assert "hook 'stubborn'" in message and "ignored GeneratorExit" in message
    assert "finally" in message


def test_raising_stop_iteration_in_a_hook_says_use_return():
    def stops():
        yield "step"
        raise StopIteration

    message = fit_error(loopy.HookError, hooks=[stops()])
    assert "hook 'stops'" in message and "use return" in message


# --- bad input ---

def test_bad_arguments_name_the_argument_and_the_fix():
    message = fit_error(TypeError, model=lambda x: x,
                        optimizer=torch.optim.SGD(make_mlp().parameters(), lr=0.1))
    assert "model must be a torch.nn.Module" in message and "function" in message
    message = fit_error(TypeError, optimizer="adam")
    assert "optimizer must be a torch.optim.Optimizer" in message and "'adam'" in message
    message = fit_error(ValueError, optimizer=torch.optim.SGD(make_mlp().parameters(), lr=0.1))
    assert "optimizer holds none of the model's parameters" in message
    assert "model.parameters()" in message
    message = fit_error(TypeError, loader=42)
    assert "loader must be an iterable of batches" in message and "42" in message
    message = fit_error(TypeError, loader=TensorDataset(*make_data(10)))
    assert "TensorDataset" in message and "DataLoader(dataset, batch_size=32" in message
    message = fit_error(ValueError, loader=[])
    assert "loader is empty" in message and "batch_size" in message
    message = fit_error(ValueError, loader=DataLoader(TensorDataset(*make_data(10)),
                                                      batch_size=32, drop_last=True))
    assert "loader is empty" in message and "drop_last" in message
    message = fit_error(ValueError, epochs=0)
    assert "epochs must be an int >= 1" in message and "0" in message
    message = fit_error(ValueError, device="gpu")
    assert "device='gpu'" in message and "'cuda'" in message
    message = fit_error(TypeError, loss_fn=None)
    assert "loss_fn must be callable" in message and "step=" in message
    message = fit_error(TypeError, metrics={"acc": 0.5})
    assert "metrics['acc']" in message and "update/compute/reset" in message
    message = fit_error(TypeError, metrics=[loopy.accuracy])
    assert "metrics must be a dict" in message
    message = fit_error(ValueError, metrics={"val_acc": loopy.accuracy})
    assert "'val_acc'" in message
    message = fit_error(ValueError, precision="fp8")
    assert "precision='fp8'" in message and "'bf16'" in message
    message = fit_error(TypeError, hooks=42)
    assert "hooks must be a list" in message
    message = fit_error(TypeError, seed="1")  # (was numpy's "not all arguments converted ...")
    assert "seed must be an int" in message and "'1' (type str)" in message
    message = fit_error(ValueError, clip_grad=-1.0)  # torch would flip the gradients' sign
    assert "clip_grad must be a number > 0" in message and "-1.0" in message and "None" in message


def test_asking_for_cuda_without_cuda_says_so():  # (the fixture hides a GPU)
    message = fit_error(ValueError, device="cuda:1")
    assert "device='cuda:1'" in message and "not available" in message and "'cpu'" in message


def test_errors_come_before_any_hook_or_training_runs():
    model = make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = []
    with pytest.raises(ValueError):
        train(model=model, hooks=[recorder(log)], epochs=0, progress=True)
    assert log == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_batch_that_cannot_be_unpacked_points_to_step():
    X, y = make_data(64)
    message = fit_error(TypeError, loader=[(X[:8], y[:8], y[:8])])
    assert "cannot unpack this batch" in message and "tuple of (a tensor of shape (8, 8)" in message
    assert "step=" in message


def test_a_loss_that_is_not_a_scalar_or_has_no_grad_is_explained():
    message = fit_error(TypeError, loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"))
    assert "the loss must be a scalar tensor" in message and "(32,)" in message
    assert "reduction" in message
    message = fit_error(ValueError, loss_fn=lambda o, t: F.cross_entropy(o.detach(), t))
    assert "does not require grad" in message and "torch.no_grad()" in message
    message = fit_error(TypeError, loss_fn=lambda o, t: F.cross_entropy(o, t).item())
    assert "the loss must be a scalar tensor" in message and "float" in message


def test_a_nonfinite_loss_names_the_epoch_and_the_first_bad_step():
    calls = []

    def loss_fn(output, target):
        calls.append(1)
        loss = F.cross_entropy(output, target)
        return loss * math.inf if len(calls) == 5 else loss

    message = fit_error(FloatingPointError, loss_fn=loss_fn, n=96, epochs=3)
    assert "epoch 2" in message and "batch 2 of the epoch" in message
    assert "optimizer step 5" in message and "nonfinite='skip'" in message


def test_nonfinite_skip_counts_the_skipped_batches():
    calls = []

    def loss_fn(output, target):
        calls.append(1)
        loss = F.cross_entropy(output, target)
        return loss * math.nan if len(calls) == 2 else loss

    loop = train(n=96, loss_fn=loss_fn, epochs=2, nonfinite="skip")
    assert loop.history["skipped"] == [1.0, 0.0]
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())
    assert all(math.isfinite(v) for v in loop.history["loss"])


def test_skipping_a_whole_group_makes_no_step_also_under_fp16():
    calls = []

    def nan_first_batch(output, target):
        calls.append(1)
        loss = F.cross_entropy(output, target)
        return loss * math.nan if len(calls) % 2 == 1 else loss

    for precision in (None, "fp16"):  # 2 batches an epoch
        steps = []
        loop = train(loss_fn=nan_first_batch, epochs=2, nonfinite="skip", precision=precision,
                     hooks=[count_steps(steps)])
        assert loop.step == 2 and steps == [1, 2] and loop.history["skipped"] == [1.0, 1.0]


def test_classes_instead_of_instances_say_to_create_one():
    torchmetrics = pytest.importorskip("torchmetrics")
    message = fit_error(TypeError, loss_fn=torch.nn.CrossEntropyLoss)
    assert "loss_fn is the class torch.nn.modules.loss.CrossEntropyLoss" in message
    assert "loss_fn=CrossEntropyLoss(...)" in message
    model = make_mlp()  # (not through train(), which builds an optimizer given as a class)
    with pytest.raises(TypeError) as raised:
        loopy.fit(model, F.cross_entropy, torch.optim.Adam, make_data(), progress=False)
    assert "optimizer is the class" in str(raised.value)
    assert "optimizer=Adam(...)" in str(raised.value)
    with pytest.raises(TypeError) as raised:
        loopy.fit(torch.nn.Linear, F.cross_entropy, torch.optim.SGD(model.parameters()),
                  make_data(), progress=False)
    assert "model is the class" in str(raised.value) and "model=Linear(...)" in str(raised.value)
    message = fit_error(TypeError, scheduler=torch.optim.lr_scheduler.StepLR)
    assert "scheduler is the class" in message and "scheduler=StepLR(...)" in message
    metric = torchmetrics.classification.MulticlassAccuracy
    message = fit_error(TypeError, metrics={"acc": metric})
    assert "metrics['acc'] is the class" in message and "MulticlassAccuracy(...)" in message
    with pytest.raises(TypeError, match="loss_fn is the class"):
        loopy.evaluate(make_mlp(), make_data(8), torch.nn.CrossEntropyLoss)


def test_in_memory_data_in_a_list_instead_of_a_tuple_says_so():
    X, y = make_data(64)
    message = fit_error(TypeError, loader=[X, y])  # a list is batches; a tuple is (X, y)
    assert "cannot unpack this batch" in message and "as the tuple (X, y)" in message


@pytest.mark.filterwarnings("ignore:Using a target size")  # torch's own warning, before ours
def test_a_loss_whose_output_and_target_broadcast_is_an_error_at_the_first_step():
    X = torch.randn(64, 8)
    y = X.sum(dim=1)  # (N,): the model's output is (N, 1)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    before = copy_of(model)
    with pytest.raises(ValueError) as raised:
        loopy.fit(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                  progress=False)
    message = str(raised.value)
    assert "output of shape (32, 1)" in message and "target of shape (32,)" in message
    assert "(32, 32)" in message and "squeeze" in message
    assert same_weights(model, before)  # raised before the first optimizer step
    with pytest.raises(ValueError, match="output of shape"):
        loopy.evaluate(model, (X, y), F.mse_loss)
    # what is fine: equal shapes, and class scores (N, C) with (N,) indices even when C == N
    loopy.fit(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1), (X, y[:, None]),
              progress=False)
    X3, y3 = make_data(30)
    model = make_mlp()
    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X3, y3),
              batch_size=3, progress=False)


def test_evaluate_checks_its_loss_fn_and_speaks_for_itself():
    model, (X, y) = make_mlp(), make_data(32)
    with pytest.raises(TypeError) as raised:
        loopy.evaluate(model, (X, y), {"acc": loopy.accuracy})
    assert "loss_fn must be callable" in str(raised.value) and "metrics=" in str(raised.value)
    with pytest.raises(TypeError) as raised:
        loopy.evaluate(model, X, metrics={"acc": loopy.accuracy})
    assert "fit expects" not in str(raised.value) and "(inputs, target)" in str(raised.value)
    with pytest.raises(ValueError, match=r"evaluate has nothing to compute.*F\.cross_entropy"):
        loopy.evaluate(model, (X, y))  # (was {}, after a pass over the data)


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(8, 3), torch.nn.Linear(2, 3)

    def forward(self, x, z):
        return self.a(x) + self.b(z)


def test_nested_in_memory_inputs_are_refused_with_a_dataloader_that_works():
    (X, y), Z = make_data(64), torch.randn(64, 2)
    for data, where in ((((X, Z), y), "loader"), (({"x": X}, y), "loader")):
        message = fit_error(TypeError, model=TwoInputs(), loader=data)
        assert message.startswith(f"{where}: in-memory data is flat tensors")
    message = fit_error(TypeError, model=TwoInputs(), loader=DataLoader(list(zip(zip(X, Z), y))),
                        val_loader=((X, Z), y))
    assert message.startswith("val_loader: in-memory data is flat tensors")
    model = TwoInputs()  # the message's fix trains as the hand-written loop does
    loop = train(model=model, loader=DataLoader(list(zip(zip(X, Z), y)), batch_size=32))
    expected = TwoInputs()
    optimizer = torch.optim.SGD(expected.parameters(), lr=0.1)
    for rows in (slice(0, 32), slice(32, 64)):
        F.cross_entropy(expected(X[rows], Z[rows]), y[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert same_weights(model, expected) and loop.step == 2
    with pytest.raises(TypeError) as raised:
        loopy.predict(model, (X, Z))
    assert "DataLoader(list(zip(zip(X, Z)))" in "".join(raised.value.__notes__)
    predicted = loopy.predict(model, DataLoader(list(zip(zip(X, Z))), batch_size=32))
    assert torch.allclose(predicted, model(X, Z))


class EmptyIterable:
    """Re-iterable, without len(), yielding nothing (an exhausted source, a filter too strict)."""
    def __iter__(self):
        return iter(())


def test_an_evaluation_pass_without_batches_is_an_error_naming_the_argument():
    X, y = make_data(64)
    message = fit_error(ValueError, val_loader=EmptyIterable(), epochs=2)
    assert "val_loader yielded no batches" in message and "DataLoader" in message
    message = fit_error(ValueError, val_loader=iter([]))  # one pass, but an empty one
    assert "val_loader yielded no batches" in message
    with pytest.raises(ValueError, match="loader yielded no batches"):
        loopy.evaluate(make_mlp(), iter([]), F.cross_entropy)
    with pytest.raises(ValueError, match="loader yielded no batches"):
        loopy.evaluate(make_mlp(), EmptyIterable(), metrics={"acc": loopy.accuracy})


@pytest.mark.parametrize("argument", ["loader", "val_loader"])
def test_a_one_shot_iterator_for_several_passes_is_refused_before_training(argument):
    X, y = make_data(64)
    batches = list(tensor_loader(X, y))
    log = []
    message = fit_error(ValueError, epochs=2, hooks=[recorder(log)],
                        **{argument: (batch for batch in batches)})
    assert f"{argument} is a one-shot iterator" in message and "epochs=2" in message
    assert "DataLoader" in message and log == []


def test_a_one_shot_iterator_for_one_pass_trains_like_a_list():
    X, y = make_data(64)
    batches = list(tensor_loader(X, y, batch_size=16))
    runs = []
    for wrap in (list, iter):
        model = make_mlp()
        loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                         wrap(batches), val_loader=wrap(batches), progress=False)
        runs.append((model, loop.history))
    assert same_weights(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert math.isfinite(runs[1][1]["val_loss"][0])


def test_batch_size_and_shuffle_given_for_a_dataloader_are_errors():
    X, y = make_data(64)
    loader = tensor_loader(X, y)
    message = fit_error(ValueError, loader=loader, shuffle=True, batch_size=128)
    assert "batch_size=128 applies to in-memory tensors" in message
    assert "DataLoader(..., batch_size=128)" in message
    message = fit_error(ValueError, loader=loader, shuffle=False)
    assert "shuffle=False" in message and "in-memory tensors" in message
    for call in (lambda: loopy.evaluate(make_mlp(), loader, F.cross_entropy, batch_size=8),
                 lambda: loopy.predict(make_mlp(), loader, batch_size=8),
                 lambda: loopy.lr_find(make_mlp(), F.cross_entropy, torch.optim.SGD(
                     make_mlp().parameters(), lr=0.1), loader, batch_size=8)):
        with pytest.raises(ValueError, match="batch_size=8 applies to in-memory tensors"):
            call()


def test_batch_size_applies_to_in_memory_validation_data_beside_a_dataloader():
    X, y = make_data(64)
    model = make_mlp()
    sizes = {"n": lambda output, target: torch.tensor(float(len(target)))}
    loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                     tensor_loader(X, y), val_loader=(X, y), batch_size=20, metrics=sizes,
                     progress=False)
    assert loop.history["n"] == [32.0]  # the DataLoader's own batches
    assert loop.history["val_n"] == [(20 * 20 * 3 + 4 * 4) / 64]  # batches of 20, 20, 20, 4


def test_every_other_option_that_would_be_ignored_is_an_error():
    X, y = make_data(64)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = lambda m, b: F.cross_entropy(m(b[0]), b[1])
    message = fit_error(ValueError, step=step)  # loss_fn=F.cross_entropy as well
    assert "loss_fn=" in message and "would be ignored" in message and "step=" in message
    message = fit_error(ValueError, scheduler_interval="step")
    assert "scheduler_interval='step'" in message and "no scheduler=" in message
    message = fit_error(ValueError, model=model, optimizer=optimizer, scheduler_monitor="loss",
                        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1))
    assert "scheduler_monitor='loss'" in message and "ReduceLROnPlateau" in message
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    message = fit_error(ValueError, model=model, optimizer=optimizer, scheduler=plateau,
                        scheduler_monitor="val_loss")  # (no val_loader: was the training loss)
    assert "scheduler_monitor='val_loss'" in message and "val_loader" in message
    with pytest.raises(ValueError, match=r"checkpoint\(mode='max'\) would be ignored.*monitor="):
        next(loopy.checkpoint("run.pt", mode="max"))
    with pytest.raises(ValueError, match=r"checkpoint\(keep=3\) would be ignored.*\{epoch\}"):
        next(loopy.checkpoint("run.pt", keep=3))
    with pytest.raises(ValueError, match=r"every=5, monitor='val_loss'.*every='epoch'"):
        next(loopy.checkpoint("run-{step}.pt", every=5, monitor="val_loss"))
    with pytest.raises(ValueError, match=r"checkpoint\(every=0\): use 'epoch'"):
        next(loopy.checkpoint(None, every=0))  # (before the path's TypeError, as it was)
    with pytest.raises(TypeError, match=r"checkpoint\(path=None \(type NoneType\)\): pass a file"):
        next(loopy.checkpoint(None))  # (was os.fspath's "expected str, bytes or os.PathLike")


# --- batches, devices, custom steps ---

Pair = collections.namedtuple("Pair", "inputs target")


@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    label: torch.Tensor
    name: str = "x"


def test_batches_move_recursively_and_keep_their_types():
    batch = {"a": (torch.ones(2), [torch.zeros(3)]), "b": Pair(torch.ones(1), torch.ones(1)),
             "c": Sample(torch.ones(2), torch.zeros(2)), "d": "text"}
    moved = loopy._to_device(batch, torch.device("meta"), False)
    assert moved["a"][0].is_meta and moved["a"][1][0].is_meta and isinstance(moved["a"][1], list)
    assert isinstance(moved["b"], Pair) and moved["b"].target.is_meta
    assert isinstance(moved["c"], Sample) and moved["c"].image.is_meta and moved["c"].name == "x"
    assert moved["d"] == "text" and not batch["a"][0].is_meta


def test_dataclass_and_mapping_batches_move_without_side_effects():
    @dataclasses.dataclass
    class Scaled:
        image: torch.Tensor
        calls: list = dataclasses.field(default_factory=list)

        def __post_init__(self):
            self.calls.append("post_init")

    batch = Scaled(torch.ones(2))
    moved = loopy._to_device(batch, torch.device("meta"), False)
    assert moved.image.is_meta and batch.calls == ["post_init"] and not batch.image.is_meta
    user_dict = loopy._to_device(collections.UserDict({"x": torch.ones(2)}),
                                 torch.device("meta"), False)
    assert isinstance(user_dict, collections.UserDict) and user_dict["x"].is_meta


def test_in_memory_batches_are_copies_as_a_dataloaders_are():
    X, y = make_data(64)
    before = X.clone()

    def halve_inputs():
        while True:
            loop = yield "batch"
            loop.batch[0].mul_(0.5)

    train(loader=(X, y), hooks=[halve_inputs()], epochs=2)
    assert torch.equal(X, before)


def test_inputs_as_tuple_or_dict_are_spread_into_the_model():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 3)

        def forward(self, left, right):
            return self.linear(left + right)

    X, y = make_data(64)
    for inputs in ((X, X), {"left": X, "right": X}):
        loop = train(model=TwoInputs(), loader=[(inputs, y)])
        assert loop.step == 1 and loop.output.shape == (64, 3)


def test_a_custom_step_with_several_losses_matches_the_hand_loop():
    X, y = make_data(96)

    class AutoEncoderClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.encode, self.decode = torch.nn.Linear(8, 4), torch.nn.Linear(4, 8)
            self.classify = torch.nn.Linear(4, 3)

    def step(model, batch):
        x, target = batch
        code = model.encode(x)
        output = model.classify(code)
        loss = F.mse_loss(model.decode(code), x) + F.cross_entropy(output, target)
        return loss, output, target

    by_hand = AutoEncoderClassifier()
    optimizer = torch.optim.Adam(by_hand.parameters(), lr=0.01)
    for _ in range(2):
        for batch in tensor_loader(X, y):
            step(by_hand, batch)[0].backward()
            optimizer.step()
            optimizer.zero_grad()
    model = AutoEncoderClassifier()
    loop = train(model=model, loss_fn=None, optimizer=torch.optim.Adam, lr=0.01,
                 loader=tensor_loader(X, y), step=step, epochs=2, val_loader=(X, y),
                 metrics={"acc": loopy.accuracy})
    assert same_weights(model, by_hand)
    assert {"loss", "acc", "val_loss", "val_acc"} <= set(loop.history)


def test_a_step_returning_only_the_loss_works_without_metrics():
    X, y = make_data(64)
    loop = train(loss_fn=None, loader=[{"x": X, "y": y}],
                 step=lambda m, b: F.cross_entropy(m(b["x"]), b["y"]))
    assert loop.history["loss"][0] > 0
    message = fit_error(TypeError, loader=[{"x": X, "y": y}], metrics={"acc": loopy.accuracy},
                        loss_fn=None, step=lambda m, b: F.cross_entropy(m(b["x"]), b["y"]))
    assert "return (loss, output, target)" in message


def test_torchmetrics_objects_work_as_metrics():
    torchmetrics = pytest.importorskip("torchmetrics")
    X, y = make_data(150)
    results = []
    for metric in (loopy.accuracy, torchmetrics.classification.MulticlassAccuracy(3, average="micro")):
        loop = train(loader=(X, y), val_loader=(X, y), epochs=2, metrics={"acc": metric})
        results.append((loop.history["acc"], loop.history["val_acc"]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], abs=1e-6)


def test_accuracy_matches_by_hand_for_classes_and_binary_logits():
    scores = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert loopy.accuracy(scores, torch.tensor([0, 1, 1])).item() == pytest.approx(2 / 3)
    logits = torch.tensor([[0.5], [-1.0], [2.0], [-0.1]])
    assert loopy.accuracy(logits, torch.tensor([1.0, 0.0, 0.0, 0.0])).item() == 0.75
    assert loopy.accuracy(logits.squeeze(1), torch.tensor([1, 0, 1, 1])).item() == 0.75


def test_binary_accuracy_of_probabilities_thresholds_at_one_half_as_torchmetrics_does():
    torchmetrics = pytest.importorskip("torchmetrics")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=generator)
    labels = torch.randint(0, 2, (50,), generator=generator)
    oracle = torchmetrics.classification.BinaryAccuracy()
    for output in (logits, logits.sigmoid(), (logits + 3).sigmoid()):  # (all above 0)
        assert loopy.accuracy(output, labels) == oracle(output, labels)
        assert loopy.accuracy(output[:, None], labels.float()) == oracle(output, labels)
    # a model ending in a sigmoid, trained with BCELoss: not the fraction of positives
    X, y = make_data(96)
    target = (y % 2).float()
    model = torch.nn.Sequential(make_mlp(), torch.nn.Linear(3, 1), torch.nn.Flatten(0),
                                torch.nn.Sigmoid())
    loop = train(model=model, loss_fn=F.binary_cross_entropy, loader=(X, target), lr=0.0,
                 metrics={"acc": loopy.accuracy})
    with torch.no_grad():
        expected = ((model(X) > 0.5) == (target > 0.5)).float().mean().item()
    assert loop.history["acc"][0] == pytest.approx(expected)


def test_evaluate_and_predict_match_by_hand_values():
    X, y = make_data(100)
    model = make_mlp(dropout=0.5)
    model.train()
    results = loopy.evaluate(model, tensor_loader(X, y, batch_size=30), F.cross_entropy,
                             {"acc": loopy.accuracy})
    assert model.training
    model.eval()
    with torch.no_grad():
        output = model(X)
    assert results["loss"] == pytest.approx(F.cross_entropy(output, y).item(), rel=1e-6)
    assert results["acc"] == pytest.approx((output.argmax(1) == y).float().mean().item())
    assert torch.allclose(loopy.predict(model, tensor_loader(X, y, batch_size=30)), output)
    assert torch.allclose(loopy.predict(model, X, batch_size=7), output)
    assert loopy.evaluate(model, (X, y), metrics={"acc": loopy.accuracy}).keys() == {"acc"}


def test_predict_takes_a_list_of_input_batches():
    X, _ = make_data(40)
    model = make_mlp()
    with torch.no_grad():
        expected = model.eval()(X)
    assert torch.allclose(loopy.predict(model, [X[:20], X[20:]]), expected)


def test_accuracy_with_probability_or_one_hot_targets_compares_argmaxes():
    generator = torch.Generator().manual_seed(0)
    output = torch.randn(50, 10, generator=generator)
    probabilities = torch.randn(50, 10, generator=generator).softmax(dim=1)
    one_hot = F.one_hot(torch.randint(0, 10, (50,), generator=generator), 10).float()
    for target in (probabilities, one_hot):
        expected = (output.argmax(1) == target.argmax(1)).float().mean()
        assert torch.equal(loopy.accuracy(output, target), expected)
    # a model that predicts nothing (every logit very negative) is not 90% right
    nothing = torch.full((50, 10), -5.0)
    assert loopy.accuracy(nothing, one_hot) == (one_hot.argmax(1) == 0).float().mean()
    # binary outputs, (N,) or (N, 1), against 0/1 targets of either shape, as before
    logits = torch.randn(50, generator=generator)
    labels = torch.randint(0, 2, (50,), generator=generator)
    expected = ((logits > 0) == (labels > 0.5)).float().mean()
    for out, target in ((logits, labels), (logits[:, None], labels), (logits[:, None],
                                                                      labels[:, None].float())):
        assert torch.equal(loopy.accuracy(out, target), expected)


def test_fit_with_one_hot_targets_records_the_true_accuracy():
    X, y = make_data(96)
    model = make_mlp()
    loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                     (X, F.one_hot(y, 3).float()), metrics={"acc": loopy.accuracy}, epochs=2,
                     progress=False)
    oracle = make_mlp()
    history = hand_loop(oracle, torch.optim.SGD(oracle.parameters(), lr=0.1),
                        tensor_loader(X, y), 2, metric=loopy.accuracy)
    assert loop.history["acc"] == pytest.approx(history["acc"], abs=1e-6)


def test_a_metric_returning_a_number_is_recorded_and_a_tensor_of_many_values_is_an_error():
    numpy = pytest.importorskip("numpy")
    X, y = make_data(96)

    def run(metric):
        model = make_mlp()
        return loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                         (X, y), metrics={"acc": metric}, epochs=2, progress=False,
                         val_loader=(X, y)).history

    expected = run(loopy.accuracy)
    as_python = run(lambda output, target: loopy.accuracy(output, target).item())
    as_numpy = run(lambda output, target: numpy.mean(
        output.argmax(1).numpy() == target.numpy()))  # a scikit-learn-style metric
    for history in (as_python, as_numpy):
        for name in ("acc", "val_acc"):
            assert history[name] == pytest.approx(expected[name], abs=1e-6)
    with pytest.raises(TypeError) as raised:
        run(lambda output, target: (output.argmax(1) == target).float())  # no .mean()
    message = str(raised.value)
    assert "metrics['acc'] returned a tensor of shape (32,)" in message and ".mean()" in message


def test_numpy_arrays_train_as_tensors_of_the_default_dtype_and_int64():
    numpy = pytest.importorskip("numpy")
    X, y = make_data(100)
    X64, y32 = X.double().numpy(), y.numpy().astype(numpy.int32)  # what scikit-learn hands out

    def run(train, val):
        model = make_mlp()
        loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                         train, val_loader=val, epochs=2, batch_size=16, shuffle=True, seed=0,
                         metrics={"acc": loopy.accuracy}, progress=False)
        return model, loop.history

    model, history = run((X64, y32), (X64, y32))
    oracle, expected = run((X64.astype(numpy.float32), y32.astype(numpy.int64)), (X, y))
    assert same_weights(model, oracle) and history == expected
    # the float64 arrays became float32 exactly as torch rounds them
    reference = make_mlp()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    torch.manual_seed(0)
    hand_loop(reference, optimizer, tensor_loader(torch.from_numpy(X64).float(),
                                                  torch.from_numpy(y32).long(), 16, True), 2,
              val_loader=tensor_loader(X, y, 16))  # (which draws a DataLoader's seed too)
    assert same_weights(model, reference)
    assert loopy.evaluate(model, (X64, y32), F.cross_entropy) == \
        loopy.evaluate(model, (X, y), F.cross_entropy)
    assert torch.equal(loopy.predict(model, X64[::-1]), loopy.predict(model, X.flip(0)))


def test_a_loss_module_moves_with_the_model_and_its_parameters_must_be_optimized():
    X, y = make_data(64)
    model = make_mlp()
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))
    loopy._prepare(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                   device="meta", distributed=False)  # meta stands in for a GPU
    assert loss_fn.weight.is_meta and next(model.parameters()).is_meta

    class Weighted(torch.nn.Module):  # a learnable multi-task loss (uncertainty weighting)
        def __init__(self):
            super().__init__()
            self.log_var = torch.nn.Parameter(torch.zeros(()))

        def forward(self, output, target):
            return F.cross_entropy(output, target) * torch.exp(-self.log_var) + self.log_var

    model = make_mlp()
    message = fit_error(ValueError, model=model, loss_fn=Weighted(),
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert "loss_fn has learnable parameters that the optimizer does not hold (log_var)" in message
    assert "*loss_fn.parameters()" in message
    model, loss_fn = make_mlp(), Weighted()
    loopy.fit(model, loss_fn, torch.optim.SGD([*model.parameters(), *loss_fn.parameters()],
                                              lr=0.1), (X, y), progress=False)
    oracle, oracle_loss = make_mlp(), Weighted()
    optimizer = torch.optim.SGD([*oracle.parameters(), *oracle_loss.parameters()], lr=0.1)
    for x_batch, y_batch in tensor_loader(X, y):
        oracle_loss(oracle(x_batch), y_batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert same_weights(model, oracle) and torch.equal(loss_fn.log_var, oracle_loss.log_var)


class RecordsMoves:
    """A batch class with its own .to(), as graph data objects have."""

    def __init__(self, x, y, calls):
        self.x, self.y, self.calls = x, y, calls

    def to(self, device, non_blocking=False):
        self.calls.append(device)
        return RecordsMoves(self.x.to(device), self.y.to(device), self.calls)


def test_a_batch_with_its_own_to_method_is_moved_by_it():
    calls = []
    moved = loopy._to_device(RecordsMoves(torch.ones(2), torch.ones(2), calls),
                             torch.device("meta"), False)
    assert calls == [torch.device("meta")] and moved.x.is_meta and moved.y.is_meta
    # in fit, each batch is moved by its .to() and reaches step= as it returned it
    X, y = make_data(64)
    model = make_mlp()
    loopy.fit(model, None, torch.optim.SGD(model.parameters(), lr=0.1),
              [RecordsMoves(X[:32], y[:32], calls), RecordsMoves(X[32:], y[32:], calls)],
              step=lambda m, b: F.cross_entropy(m(b.x), b.y), progress=False)
    assert calls == [torch.device("meta")] + [torch.device("cpu")] * 2
    oracle = make_mlp()
    hand_loop(oracle, torch.optim.SGD(oracle.parameters(), lr=0.1), tensor_loader(X, y), 1)
    assert same_weights(model, oracle)


def test_a_packed_sequence_keeps_its_batch_sizes_on_the_cpu():
    packed = torch.nn.utils.rnn.pack_sequence([torch.ones(3, 2), torch.ones(2, 2)])
    moved = loopy._to_device((packed, torch.zeros(2)), torch.device("meta"), False)
    assert isinstance(moved[0], torch.nn.utils.rnn.PackedSequence)
    assert moved[0].data.is_meta and moved[0].batch_sizes.device.type == "cpu"
    assert moved[1].is_meta


def test_an_object_holding_tensors_that_cannot_be_moved_is_warned_about():
    class Opaque:
        def __init__(self):
            self.x = torch.ones(2)

    with pytest.warns(UserWarning, match="cannot move a batch of type .*Opaque.* no .to()"):
        batch = loopy._to_device([Opaque(), torch.ones(2)], torch.device("meta"), False)
    assert batch[1].is_meta
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already there: nothing to say
        loopy._to_device([Opaque(), torch.ones(2)], torch.device("cpu"), False)


class Detector(torch.nn.Module):
    """Returns one dict per sample, as torchvision's detection models do."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x):
        return [{"boxes": box.view(1, 4), "scores": box.sum().view(1)} for box in self.linear(x)]


def test_predict_joins_per_sample_outputs_as_one_list():
    X, _ = make_data(10)
    torch.manual_seed(0)
    model = Detector()
    outputs = loopy.predict(model, X, batch_size=4)  # batches of 4, 4 and a short 2
    with torch.no_grad():
        expected = [model(X[i:i + 1])[0] for i in range(10)]
    assert len(outputs) == 10
    for output, truth in zip(outputs, expected):
        assert torch.allclose(output["boxes"], truth["boxes"])
        assert torch.allclose(output["scores"], truth["scores"])
    # batch-first outputs are joined as before, also in a list of several outputs
    model = make_mlp()
    features, logits = loopy.predict(torch.nn.Sequential(model, TwoOutputs()), X, batch_size=4)
    with torch.no_grad():
        assert torch.allclose(logits, model.eval()(X)) and torch.allclose(features, logits * 2)


class TwoOutputs(torch.nn.Module):
    def forward(self, x):
        return [x * 2, x]


def test_predict_outputs_that_cannot_be_joined_are_a_clear_error():
    class VariableLength(torch.nn.Module):
        def forward(self, x):
            return x[:, :int(x.shape[0])]  # (batch, batch): the width varies with the batch

    X, _ = make_data(10)
    with pytest.raises(TypeError) as raised:
        loopy.predict(VariableLength(), X, batch_size=4)
    message = str(raised.value)
    assert "predict cannot join the model's outputs" in message and "(4, 4)" in message
    assert "batch-first tensors" in message and "one item per sample" in message


def make_gan(seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({
        "generator": torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
                                         torch.nn.Linear(16, 8)),
        "discriminator": torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LeakyReLU(0.2),
                                             torch.nn.Linear(16, 1))})


def gan_optimizers(gan):
    return {name: torch.optim.Adam(gan[name].parameters(), lr=0.01, betas=(0.5, 0.999))
            for name in ("discriminator", "generator")}


def gan_losses(gan, real, noise):
    """The discriminator's loss (real against generated points), then the generator's."""
    fake = gan["generator"](noise)
    labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(real), 1)])
    loss_d = F.binary_cross_entropy_with_logits(
        gan["discriminator"](torch.cat([real, fake.detach()])), labels)
    yield loss_d
    yield F.binary_cross_entropy_with_logits(gan["discriminator"](fake), torch.ones(len(real), 1))


def gan_step(model, batch, loop):
    real, _ = batch
    losses = gan_losses(model, real, torch.randn(len(real), 4))
    loss_d = next(losses)
    loop.backward(loss_d)
    loop.step_optimizer("discriminator")
    loss_g = next(losses)  # after the discriminator's step, as in the hand-written loop
    loop.backward(loss_g, "generator")  # the discriminator's gradients stay untouched
    loop.step_optimizer("generator")
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}


def hand_gan(gan, optimizers, loader, epochs, val_loader=None, precision=None, accumulate=1):
    """The GAN loop that a manual step replaces, written out (precision and accumulation too)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    history = collections.defaultdict(list)
    for _ in range(epochs):
        gan.train()
        sums, count = collections.Counter(), 0
        for i, (real, _) in enumerate(loader):
            last = (i + 1) % accumulate == 0
            with autocast:
                losses = gan_losses(gan, real, torch.randn(len(real), 4))
                loss_d = next(losses)
            scaler.scale(loss_d / accumulate if accumulate > 1 else loss_d).backward()
            if last:
                scaler.step(optimizers["discriminator"])
                optimizers["discriminator"].zero_grad()
            with autocast:
                loss_g = next(losses)
            scaler.scale(loss_g / accumulate if accumulate > 1 else loss_g).backward(
                inputs=list(gan["generator"].parameters()))
            if last:
                scaler.step(optimizers["generator"])
                optimizers["generator"].zero_grad()
                scaler.update()
            sums.update(loss_d=loss_d.item() * len(real), loss_g=loss_g.item() * len(real))
            count += len(real)
        for name, total in sums.items():
            history[name].append(total / count)
        if val_loader is not None:
            gan.eval()
            sums, count = collections.Counter(), 0
            with torch.no_grad():
                for real, _ in val_loader:
                    with autocast:
                        loss_d, loss_g = gan_losses(gan, real, torch.randn(len(real), 4))
                    sums.update(val_loss_d=loss_d.item() * len(real),
                                val_loss_g=loss_g.item() * len(real))
                    count += len(real)
            for name, total in sums.items():
                history[name].append(total / count)
    return history


def gan_data(n=128):
    X, y = make_data(n)
    return X * 0.5 + 1.0, y  # the "real" points: a shifted, squeezed Gaussian


def same_states(a, b):
    """Two state_dicts (of optimizers, schedulers) hold equal tensors and values."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_states(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_gan_step_with_two_optimizers_is_bit_identical_to_the_hand_written_loop(shuffle):
    X, y = gan_data()
    expected_gan = make_gan()
    torch.manual_seed(7)
    expected = hand_gan(expected_gan, gan_optimizers(expected_gan),
                        tensor_loader(X, y, 16, shuffle), 3,
                        val_loader=tensor_loader(X[:40], y[:40], 16))
    gan = make_gan()
    loop = loopy.fit(gan, None, gan_optimizers(gan), (X, y), batch_size=16, shuffle=shuffle,
                     epochs=3, step=gan_step, val_loader=(X[:40], y[:40]), seed=7, progress=False)
    assert same_weights(gan, expected_gan)
    assert loop.step == 3 * 8  # a manual step's steps count batches
    assert sorted(loop.history) == ["loss_d", "loss_g", "lr", "val_loss_d", "val_loss_g"]
    for name, values in expected.items():
        assert loop.history[name] == pytest.approx(values, rel=1e-6)
    results = loopy.evaluate(gan, (X[:40], y[:40]), step=gan_step)  # validation's no-op helpers
    assert sorted(results) == ["loss_d", "loss_g"]


def gan_run(path=None, stop_at_step=None, resume=None, epochs=3, seed=0):
    """A GAN with shuffling, per-step schedulers for both optimizers and a checkpoint."""
    X, y = gan_data(120)  # 8 batches of 16 a epoch, the last one of 8
    gan = make_gan(seed)
    optimizers = gan_optimizers(gan)
    schedulers = [torch.optim.lr_scheduler.StepLR(optimizers["discriminator"], 3, gamma=0.8),
                  torch.optim.lr_scheduler.ExponentialLR(optimizers["generator"], gamma=0.97)]
    hooks = [loopy.checkpoint(path, every=1)] if path else []
    if stop_at_step:
        hooks.insert(0, stop_when(stop_at_step))
    loop = loopy.fit(gan, None, optimizers, (X, y), hooks, batch_size=16, shuffle=True,
                     epochs=epochs, step=gan_step, scheduler=schedulers,
                     scheduler_interval="step", val_loader=(X[:30], y[:30]),
                     seed=None if resume else 123, resume=resume, progress=False)
    return gan, optimizers, schedulers, loop


def test_a_gan_resumed_mid_epoch_equals_the_straight_run_with_both_optimizers(tmp_path):
    straight, optimizers, schedulers, straight_loop = gan_run()
    path = tmp_path / "gan.pt"
    _, _, _, stopped = gan_run(path, stop_at_step=11)  # the 3rd batch of the 2nd epoch
    assert stopped.step == 11 and len(stopped.history["loss_d"]) == 1
    saved = torch.load(path, weights_only=True)
    assert len(saved["optimizers"]) == len(saved["schedulers"]) == 2
    torch.manual_seed(999)  # the resumed run must not depend on the global RNG
    resumed, resumed_optimizers, resumed_schedulers, resumed_loop = gan_run(path, resume=path,
                                                                            seed=5)
    assert same_weights(resumed, straight) and resumed_loop.step == 3 * 8
    assert resumed_loop.history == straight_loop.history
    for name in optimizers:
        assert same_states(resumed_optimizers[name].state_dict(), optimizers[name].state_dict())
    for resumed_scheduler, scheduler in zip(resumed_schedulers, schedulers):
        assert resumed_scheduler.state_dict() == scheduler.state_dict()


@pytest.mark.parametrize("precision, accumulate", [("bf16", 1), ("fp16", 1), (None, 2),
                                                    ("fp16", 2)])
def test_gan_precision_and_accumulation_through_the_helpers_equal_the_hand_loop(precision,
                                                                                 accumulate):
    X, y = gan_data()  # 8 batches: whole groups of 2
    expected_gan = make_gan()
    torch.manual_seed(7)
    expected = hand_gan(expected_gan, gan_optimizers(expected_gan), tensor_loader(X, y, 16), 2,
                        precision=precision, accumulate=accumulate)
    gan = make_gan()
    loop = loopy.fit(gan, None, gan_optimizers(gan), (X, y), batch_size=16, epochs=2,
                     step=gan_step, precision=precision, accumulate=accumulate, seed=7,
                     device="cpu", progress=False)
    # the same operations in the same order: equal bit for bit, fp16's scaler included
    assert same_weights(gan, expected_gan)
    assert loop.step == 2 * 8 // accumulate
    if precision == "fp16":
        assert loop.scaler.get_scale() == 2.0 ** 16  # it stepped (no inf), updated once a step
    for name, values in expected.items():
        assert loop.history[name] == pytest.approx(values, rel=1e-6)


def test_a_manual_step_sends_backward_per_optimizer_step_and_step_per_batch():
    X, y = gan_data(64)
    events = []

    def watch():
        while True:
            loop = yield ("backward", "step")
            events.append((loop.event, loop.step, loop.grad_norm is not None))

    gan = make_gan()
    loop = loopy.fit(gan, None, gan_optimizers(gan), (X, y), [watch()], batch_size=16, epochs=2,
                     step=gan_step, clip_grad=1.0, max_steps=3, progress=False)
    # "backward": before each optimizer's step, gradients clipped; "step": after each batch
    assert events == [("backward", 0, True), ("backward", 0, True), ("step", 1, True),
                      ("backward", 1, True), ("backward", 1, True), ("step", 2, True),
                      ("backward", 2, True), ("backward", 2, True), ("step", 3, True)]
    assert loop.stop_reason == "reached max_steps=3"


def test_manual_step_errors_name_the_cause_and_the_fix():
    X, y = gan_data(64)
    gan = make_gan()

    def fit(**options):
        arguments = dict(model=gan, loss_fn=None, optimizer=gan_optimizers(gan),
                         loader=(X, y), step=gan_step, progress=False)
        arguments.update(options)
        return loopy.fit(**arguments)

    def with_graph(model, batch, loop):
        return {"loss": model["discriminator"](batch[0]).mean()}
    with pytest.raises(TypeError, match=r"'loss'.* with a graph: .*loss.detach\(\).*"
                                        r"step\(model, batch\)"):
        fit(step=with_graph)
    with pytest.raises(TypeError, match=r"must return a dict of the numbers to record"):
        fit(step=lambda model, batch, loop: model["discriminator"](batch[0]).mean().detach())
    with pytest.raises(ValueError, match=r"optimizer is 2 optimizers.*step=fn\(model, batch, "
                                         r"loop\).*loop.step_optimizer\(name\)"):
        fit(step=lambda model, batch: model["discriminator"](batch[0]).mean())
    other = torch.nn.Linear(8, 1)
    with pytest.raises(ValueError, match=r"optimizer\['critic'\] holds none of the model's "
                                         r"parameters.*ModuleDict"):
        fit(optimizer={**gan_optimizers(gan), "critic": torch.optim.SGD(other.parameters())})
    with pytest.raises(TypeError, match=r"(?s)model must be a torch.nn.Module; got \{.*"
                                        r"ModuleDict"):
        fit(model={"generator": gan["generator"]})
    with pytest.raises(ValueError, match=r"nonfinite='skip' cannot undo a manual step"):
        fit(nonfinite="skip")
    with pytest.raises(ValueError, match=r"accumulate=2 with a manual step needs a loader with "
                                         r"a len\(\)"):
        fit(loader=iter([(X, y)]), accumulate=2)

    def misnamed(model, batch, loop):
        loop.step_optimizer("gen")
    with pytest.raises(ValueError, match=r"no optimizer is named 'gen': this run's are "
                                         r"'discriminator', 'generator'"):
        fit(step=misnamed)


def test_a_manual_step_with_one_optimizer_equals_the_automatic_step():
    """The helpers do what loopy's own step does: clipping, accumulation with a last partial
    group, metrics from (numbers, output, target), validation; bit for bit."""
    X, y = make_data()  # 7 batches of 32: groups of 2, 2, 2 and 1

    def manual(model, batch, loop):
        x, target = batch
        output = model(x)
        loss = F.cross_entropy(output, target)
        loop.backward(loss)
        loop.step_optimizer(0)
        return {"loss": loss.detach()}, output, target

    runs = []
    for step in (None, manual):
        model = make_mlp()
        loss_fn = None if step else F.cross_entropy  # (a loss_fn beside step= is an error)
        loop = loopy.fit(model, loss_fn, torch.optim.Adam(model.parameters(), lr=0.01),
                         (X, y), epochs=2, step=step, accumulate=2, clip_grad=0.5,
                         val_loader=(X[:50], y[:50]), metrics={"acc": loopy.accuracy},
                         seed=3, progress=False)
        runs.append((model, loop))
    (automatic, auto_loop), (manual_model, manual_loop) = runs
    assert same_weights(manual_model, automatic)
    assert manual_loop.history == auto_loop.history and manual_loop.step == auto_loop.step == 8


def test_per_sample_lists_of_target_dicts_weigh_the_epoch_mean_by_sample_count():
    images = [torch.full((3, 4, 4), float(i)) for i in range(5)]
    targets = [{"boxes": torch.zeros(k, 4)} for k in (7, 1, 2, 9, 1)]
    batches = [(images[0:2], targets[0:2]), (images[2:4], targets[2:4]), (images[4:], targets[4:])]
    model = torch.nn.Linear(1, 1)

    def step(model, batch):
        means = torch.stack([image.mean() for image in batch[0]])
        return means.mean() + 0 * model.weight.sum(), means, batch[1]

    for each in (step, lambda model, batch: step(model, batch)[0]):
        loop = loopy.fit(model, None, torch.optim.SGD(model.parameters(), lr=0.0), batches,
                         step=each, progress=False)
        assert loop.history["loss"] == [pytest.approx((0 + 1 + 2 + 3 + 4) / 5)]  # per sample


def test_numpy_bool_labels_become_floats_for_a_bce_loss():
    X, y = make_data(64)
    labels = (y > 0).numpy()

    def bce(output, target):
        return F.binary_cross_entropy_with_logits(output[:, 0], target)

    got = train(loader=(X.numpy(), labels), loss_fn=bce)
    expected = train(loader=(X, torch.from_numpy(labels).float()), loss_fn=bce)
    assert same_weights(got.model, expected.model)
    assert got.history["loss"] == expected.history["loss"]


# --- sliced DataLoaders: a DataLoader over a TensorDataset trains bit-identically ---

def issue17_loaders():
    """Loader factories (a fresh generator each call, so every run starts from the same one)."""
    def with_generator(**options):
        return lambda data: DataLoader(data, 32, generator=torch.Generator().manual_seed(7),
                                       **options)

    def with_sampler(replacement, num_samples, seeded=False):
        return lambda data: DataLoader(data, 32, sampler=torch.utils.data.RandomSampler(
            data, replacement, num_samples,
            torch.Generator().manual_seed(3) if seeded else None))
    return {
        "no shuffle, partial last batch": lambda data: DataLoader(data, 32),
        "shuffle": lambda data: DataLoader(data, 32, shuffle=True),
        "shuffle, the loader's own generator": with_generator(shuffle=True),
        "drop_last": lambda data: DataLoader(data, 32, shuffle=True, drop_last=True),
        "drop_last, own generator": with_generator(shuffle=True, drop_last=True),
        "with replacement": with_sampler(True, 150),
        "with replacement, own generator": with_sampler(True, 64, seeded=True),
        "more samples than data, own generator": with_sampler(False, 250, seeded=True),
    }


def getitem_calls(monkeypatch, dataset_class=TensorDataset):
    """Count the calls of dataset_class.__getitem__: none when loopy slices the tensors."""
    calls = []
    original = dataset_class.__getitem__

    def counted(self, index):
        calls.append(index)
        return original(self, index)
    monkeypatch.setattr(dataset_class, "__getitem__", counted)
    return calls


def generator_state(loader):
    generator = loader.generator or getattr(loader.sampler, "generator", None)
    return None if generator is None else generator.get_state()


@pytest.mark.parametrize("name", list(issue17_loaders()))
def test_a_sliced_dataloader_trains_bit_identically_to_the_hand_loop_on_it(monkeypatch, name):
    make_loader = issue17_loaders()[name]
    X, y = make_data(203)  # 6 full batches of 32 and one of 11
    Xv, yv = make_data(45, seed=1)

    def run(by_hand):
        model = make_mlp(dropout=0.3)  # dropout: the global RNG after the shuffle matters too
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loader, val_loader = make_loader(TensorDataset(X, y)), DataLoader(TensorDataset(Xv, yv), 7)
        torch.manual_seed(1)
        if by_hand:
            history = hand_loop(model, optimizer, loader, 3, val_loader, metric=loopy.accuracy)
        else:
            loop = loopy.fit(model, F.cross_entropy, optimizer, loader, epochs=3,
                             val_loader=val_loader, metrics={"acc": loopy.accuracy},
                             progress=False)
            assert loop.loader is loader and loop.val_loader is val_loader
            history = loop.history
        return model, history, torch.get_rng_state(), generator_state(loader)

    expected = run(by_hand=True)
    calls = getitem_calls(monkeypatch)
    sliced = run(by_hand=False)
    assert calls == []  # it sliced: no sample was fetched one by one
    monkeypatch.setattr(loopy, "_sliced", lambda loader: loader)  # the DataLoader path
    iterated = run(by_hand=False)
    assert calls  # (the counter works)
    assert same_weights(sliced[0], expected[0]) and same_weights(iterated[0], expected[0])
    assert sliced[1] == iterated[1]  # the history, bit for bit
    for metric in ("loss", "acc", "val_loss", "val_acc"):
        assert sliced[1][metric] == pytest.approx(expected[1][metric], rel=1e-6, abs=1e-7)
    assert torch.equal(sliced[2], expected[2])  # the global RNG after training
    assert (sliced[3] is None) == (expected[3] is None)  # the loader's generator after it
    assert sliced[3] is None or torch.equal(sliced[3], expected[3])


def issue17_samplers():
    sampler, distributed = torch.utils.data.RandomSampler, torch.utils.data.DistributedSampler
    return {
        "sequential": lambda data, g: DataLoader(data, 7),
        "sequential, drop_last": lambda data, g: DataLoader(data, 8, drop_last=True),
        "one batch, larger than the data": lambda data, g: DataLoader(data, 40),
        "shuffle": lambda data, g: DataLoader(data, 7, shuffle=True),
        "shuffle, drop_last": lambda data, g: DataLoader(data, 9, shuffle=True, drop_last=True),
        "shuffle, generator": lambda data, g: DataLoader(data, 8, shuffle=True, generator=g),
        "replacement": lambda data, g: DataLoader(data, 6, sampler=sampler(data, True, 70)),
        "replacement, generator": lambda data, g: DataLoader(data, 32,
                                                             sampler=sampler(data, True, 64, g)),
        "generator, more than the data": lambda data, g: DataLoader(
            data, 6, sampler=sampler(data, False, 45, g)),
        "generator, twice the data": lambda data, g: DataLoader(
            data, 10, sampler=sampler(data, False, 60, g)),
        "a range": lambda data, g: DataLoader(data, 4, sampler=range(2, 30, 3)),
        "distributed": lambda data, g: DataLoader(
            data, 4, sampler=distributed(data, 4, 1, shuffle=True, seed=2)),
        "distributed, drop_last": lambda data, g: DataLoader(
            data, 3, sampler=distributed(data, 4, 3, shuffle=False, drop_last=True)),
    }


@pytest.mark.parametrize("name", list(issue17_samplers()))
@pytest.mark.parametrize("stop_after", [None, 1, 2, 3, 4])
def test_sliced_batches_and_random_draws_equal_the_dataloaders(name, stop_after):
    """PyTorch as the oracle: the same batches, and the global RNG and the generator in the
    same state after a full pass or a pass cut short (random numbers drawn between batches)."""
    X, y = make_data(30)
    results = []
    for sliced in (False, True):
        generator = torch.Generator().manual_seed(11)
        loader = issue17_samplers()[name](TensorDataset(X, y), generator)
        batches = loopy._sliced(loader) if sliced else loader
        assert (batches is not loader) == sliced and len(batches) == len(loader)
        torch.manual_seed(0)
        got = []
        for batch in batches:
            got.append(batch)
            if len(got) == stop_after:
                break
            torch.rand(1)
        results.append((got, torch.get_rng_state(), generator.get_state()))
    (expected, rng, generator), (got, sliced_rng, sliced_generator) = results
    assert len(got) == len(expected) and all(
        type(a) is type(b) and len(a) == len(b) and all(torch.equal(s, t) and s.dtype == t.dtype
                                                        for s, t in zip(a, b))
        for a, b in zip(got, expected))
    assert torch.equal(sliced_rng, rng) and torch.equal(sliced_generator, generator)


def test_a_mid_epoch_resume_on_a_sliced_dataloader_equals_the_straight_run(monkeypatch, tmp_path):
    X, y = make_data(150)

    def run(path=None, stop_at_step=None, resume=None, epochs=3):
        model = make_mlp(dropout=0.2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        hooks = [stop_when(stop_at_step)] if stop_at_step else []
        loop = loopy.fit(model, F.cross_entropy, optimizer,
                         DataLoader(TensorDataset(X, y), 16, shuffle=True),
                         hooks + ([loopy.checkpoint(path)] if path else []), epochs=epochs,
                         seed=None if resume else 123, resume=resume, progress=False)
        return model, loop

    straight, straight_loop = run()
    by_hand = make_mlp(dropout=0.2)
    optimizer = torch.optim.Adam(by_hand.parameters(), lr=0.01)
    torch.manual_seed(123)
    hand_loop(by_hand, optimizer, DataLoader(TensorDataset(X, y), 16, shuffle=True), 3)
    assert same_weights(straight, by_hand)
    _, stopped = run(tmp_path / "sliced.pt", stop_at_step=14)  # batch 4 of epoch 2
    with monkeypatch.context() as patch:
        patch.setattr(loopy, "_sliced", lambda loader: loader)
        run(tmp_path / "iterated.pt", stop_at_step=14)
    saved = [torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("sliced", "iterated")]
    assert saved[0]["position"]["batches"] == 4 and saved[0]["step"] == 14
    assert torch.equal(saved[0]["rng"]["torch"], saved[1]["rng"]["torch"])
    assert torch.equal(saved[0]["position"]["epoch_rng"], saved[1]["position"]["epoch_rng"])
    assert all(torch.equal(a, b) for a, b in zip(saved[0]["model"].values(),
                                                 saved[1]["model"].values()))
    torch.manual_seed(999)  # the resumed run must not depend on the global RNG
    resumed, resumed_loop = run(resume=tmp_path / "sliced.pt")
    assert same_weights(resumed, straight) and resumed_loop.history == straight_loop.history


def test_evaluate_predict_and_lr_find_on_a_sliced_dataloader_equal_the_dataloader_path(
        monkeypatch):
    X, y = make_data(100)
    model = make_mlp()

    def run():
        loader = DataLoader(TensorDataset(X, y), 16, shuffle=True,
                            generator=torch.Generator().manual_seed(5))
        results = loopy.evaluate(model, DataLoader(TensorDataset(X, y), 24), F.cross_entropy,
                                 {"acc": loopy.accuracy})
        outputs = loopy.predict(model, DataLoader(TensorDataset(X), 24))
        found = loopy.lr_find(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                              loader, num_steps=10)  # stops inside the second epoch
        return results, outputs, found, loader.generator.get_state()

    calls = getitem_calls(monkeypatch)
    sliced = run()
    assert calls == []
    monkeypatch.setattr(loopy, "_sliced", lambda loader: loader)
    iterated = run()
    assert sliced[0] == iterated[0] and torch.equal(sliced[1], iterated[1])
    assert sliced[2] == iterated[2] and torch.equal(sliced[3], iterated[3])
    with torch.no_grad():
        assert torch.equal(sliced[1], torch.cat([model(X[i:i + 24]) for i in range(0, 100, 24)]))


class TensorDatasetSubclass(TensorDataset):
    pass


@pytest.mark.parametrize("fallback", ["a TensorDataset subclass", "a custom collate_fn",
                                      "workers", "a DataLoader subclass", "a weighted sampler"])
def test_dataloaders_loopy_cannot_reproduce_are_iterated_as_they_are(monkeypatch, fallback):
    X, y = make_data(70)
    collated = []

    def collate(samples):
        collated.append(len(samples))
        return torch.utils.data.default_collate(samples)

    def make_loader():
        data = (TensorDatasetSubclass if fallback == "a TensorDataset subclass" else TensorDataset)(X, y)
        options = {"a custom collate_fn": dict(collate_fn=collate),
                   "workers": dict(num_workers=2),
                   "a weighted sampler": dict(sampler=torch.utils.data.WeightedRandomSampler(
                       torch.ones(70), 70))}.get(fallback, dict(shuffle=True))
        loader_class = type("Loader", (DataLoader,), {}) if fallback == "a DataLoader subclass" \
            else DataLoader
        return loader_class(data, 16, **options)

    calls = getitem_calls(monkeypatch, TensorDatasetSubclass)
    assert type(loopy._sliced(make_loader())) is not loopy._TensorBatches
    by_hand = make_mlp()
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.1)
    torch.manual_seed(1)
    hand_loop(by_hand, optimizer, make_loader(), 2)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    collated.clear(), calls.clear()
    loopy.fit(model, F.cross_entropy, optimizer, make_loader(), epochs=2, progress=False)
    assert same_weights(model, by_hand)
    if fallback == "a TensorDataset subclass":
        assert len(calls) == 2 * 70  # its own __getitem__ fetched every sample
    if fallback == "a custom collate_fn":
        assert collated == [16, 16, 16, 16, 6] * 2


# --- progress ---

def test_progress_prints_one_plain_line_per_epoch_when_not_a_terminal(capsys):
    train(epochs=3, metrics={"acc": loopy.accuracy}, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3: loss ") and " - acc " in lines[0]


def test_progress_shows_a_tqdm_bar_on_a_terminal(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    train(epochs=2, progress=True)
    captured = capsys.readouterr()  # the bar on stderr, and a line per epoch on stdout
    assert captured.out.count("\n") == 2 and "epoch 2/2" in captured.err and "2/2" in captured.err
    X, y = make_data(64)  # without len(), tqdm.set_description gave "epoch 1/1: : 1batch"
    train(loader=((X[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)), progress=True)
    assert "epoch 1/1: 1batch" in capsys.readouterr().err


def test_a_warning_under_a_live_bar_starts_a_line_of_its_own(monkeypatch, capsys):
    import warnings
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(warnings, "showwarning",  # as Python's own shows one, on stderr
                        lambda message, *args, **kwargs: sys.stderr.write(f"W: {message}\n"))

    def warns():
        while True:
            if (yield "step").step == 2:
                warnings.warn("careful")

    train(hooks=[warns()], progress=True)
    assert re.search(r"[\r\n]W: careful", capsys.readouterr().err)  # (was "loss=1.1]W: careful")


@pytest.fixture(scope="session")
def fresh_interpreters(tmp_path_factory):
    """A function that returns (exit code, stdout, stderr) of "copied alone" (loopy.py copied
    into a folder of its own, without tqdm, trained) or "imports" (which modules ``import
    loopy`` adds), each run by a fresh interpreter: no spawner, no loopy imported before. They
    start at once (see start_launches_first)."""
    tmp_path = tmp_path_factory.mktemp("copied")
    shutil.copy(os.path.join(HERE, "loopy.py"), tmp_path)
    copied = textwrap.dedent("""
        import sys
        sys.modules["tqdm"] = None  # as if tqdm were not installed
        sys.stderr.isatty = lambda: True
        import torch, loopy
        assert loopy.__file__.startswith(sys.argv[1])
        X, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        model = torch.nn.Linear(4, 2)
        loop = loopy.fit(model, torch.nn.functional.cross_entropy,
                         torch.optim.SGD(model.parameters(), lr=0.1), (X, y), epochs=2)
        print("trained", loop.step)
    """)
    imports = "import torch, sys; before = set(sys.modules); import loopy; print(sorted(set(sys.modules) - before))"
    started = {"copied alone": subprocess.Popen(
                   [sys.executable, "-c", copied, str(tmp_path)], cwd=tmp_path,
                   env=cpu_env(PYTHONPATH=""), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   text=True),
               "imports": subprocess.Popen(
                   [sys.executable, "-c", imports], cwd=HERE, env=cpu_env(),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
    waits = {name: in_background(finished, process, 120) for name, process in started.items()}
    yield lambda name: waits[name]()
    for process in started.values():
        process.kill()  # (a no-op once it has ended)


def test_loopy_copied_alone_trains_without_tqdm(fresh_interpreters):
    returncode, stdout, stderr = fresh_interpreters("copied alone")
    assert returncode == 0, stderr
    assert stdout.splitlines()[-1] == "trained 4"
    assert stdout.startswith("epoch 1/2: loss ")


def _epoch_line(history, epoch, epochs):
    """What the progress hook prints for ``epoch`` (1-based), up to the epoch's time."""
    values = " - ".join(f"{name} {values[epoch - 1]:.4g}" for name, values in history.items())
    return f"epoch {epoch}/{epochs}: {values} ("


def _small_fit(epochs=2, **options):
    X, y = make_data(64)
    model = make_mlp()
    return loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                     batch_size=16, epochs=epochs, val_loader=(X[:32], y[:32]),
                     metrics={"acc": loopy.accuracy}, **options)


@pytest.mark.parametrize("progress, bar, lines", [(True, True, True), ("bar", True, True),
                                                  ("epoch", False, True), (False, False, False)])
def test_progress_levels_a_bar_where_a_person_watches_a_line_per_epoch_or_nothing(
        monkeypatch, capsys, progress, bar, lines):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    loop = _small_fit(progress=progress)
    captured = capsys.readouterr()
    expected = [_epoch_line(loop.history, epoch, 2) for epoch in (1, 2)] if lines else []
    assert [line[:len(start)] for line, start in zip(captured.out.splitlines(), expected)] \
        == expected and captured.out.count("\n") == len(expected)
    assert ("epoch 1/2" in captured.err and "batch" in captured.err) == bar
    assert bar or captured.err == ""


def test_progress_rejects_an_unknown_level_before_training():
    with pytest.raises(ValueError, match=r"progress='loud': use True or 'bar' .* 'epoch' .* False"):
        _small_fit(progress="loud", hooks=[recorder(log := [])])
    assert log == []


def test_loop_repr_is_one_line_of_epochs_steps_stop_reason_and_metrics():
    loop = _small_fit(epochs=3, max_steps=9, progress=False)  # 4 steps per epoch: 2 epochs done
    values = " - ".join(f"{name} {values[-1]:.4g}" for name, values in loop.history.items())
    assert repr(loop) == f"<Loop epoch 2/3, step 9, stopped: reached max_steps=9; {values}>"
    assert repr(_small_fit(epochs=1, progress=False)).startswith("<Loop epoch 1/1, step 4; loss ")


def test_loop_print_prints_on_rank_0_only(capsys):
    loop = _small_fit(progress=False)
    loop.print("a", 1, sep="-")
    loop.rank = 1
    loop.print("b")
    assert capsys.readouterr().out == "a-1\n"


TERMINAL_SCRIPT = """
import json, sys, torch, loopy
import torch.nn.functional as F
torch.set_num_threads(1)
torch.manual_seed(0)
X, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

def printer():
    while True:
        loop = yield ("step", "epoch")
        if loop.event == "epoch":
            print(f"hook: epoch {loop.epoch + 1} done")    # a plain print at "epoch"
        elif loop.step % 8 == 3:
            loop.print(f"hook: step {loop.step}")         # mid-epoch, the bar on the screen

loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                 epochs=3, val_loader=(X[:64], y[:64]), metrics={"acc": loopy.accuracy},
                 hooks=[printer()] if "--printer" in sys.argv else [])
print("history", json.dumps(loop.history))
"""


def _run_in_terminal(spawn, tmp_path, *args, stdout=None):
    """Run TERMINAL_SCRIPT with stderr (and stdout, unless given) on a pseudo-terminal of 80
    columns; return all that was written to the terminal."""
    pty, fcntl, termios, struct = (pytest.importorskip(name) for name in
                                   ("pty", "fcntl", "termios", "struct"))
    script = tmp_path / "train.py"
    script.write_text(TERMINAL_SCRIPT)
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    tty = os.ttyname(terminal)
    process = spawn(script, *args, stdin=tty, stdout=stdout.name if stdout else tty, stderr=tty,
                    env={"COLUMNS": None, "LINES": None})
    chunks, ended = [], False
    while not ended:  # (our end of the terminal stays open: it would close before the child's)
        ended = process.poll() is not None
        while select.select([main], [], [], 0 if ended else 0.05)[0]:
            chunks.append(os.read(main, 65536))
    os.close(terminal)
    os.close(main)
    assert process.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode()


def _screen(text):
    """The lines a terminal shows for ``text``: a carriage return goes back to column 0, and
    what follows overwrites what was there."""
    lines = []
    for raw in text.split("\n"):
        line, column = [], 0
        for char in raw:
            if char == "\r":
                column = 0
                continue
            line[column:column + 1] = [char]
            column += 1
        lines.append("".join(line).rstrip())
    return lines


def _history(lines):
    return json.loads(next(line for line in lines if line.startswith("history "))[8:])


@pytest.mark.slow
def test_an_80_column_terminal_shows_every_epochs_validation_metrics(spawner, tmp_path):
    screen = _screen(_run_in_terminal(spawner, tmp_path))
    history = _history(screen)
    assert set(history) == {"loss", "acc", "val_loss", "val_acc", "lr"}
    for epoch in (1, 2, 3):  # every metric of every epoch, whatever the bar could fit
        assert sum(line.startswith(_epoch_line(history, epoch, 3)) for line in screen) == 1


@pytest.mark.slow
def test_stdout_to_a_file_while_stderr_is_a_terminal_gets_one_line_per_epoch(spawner,
                                                                              tmp_path):
    with open(tmp_path / "train.log", "w") as log:
        terminal = _run_in_terminal(spawner, tmp_path, stdout=log)
    lines = (tmp_path / "train.log").read_text().splitlines()
    history = _history(lines)
    assert len(lines) == 4 and all(lines[epoch - 1].startswith(_epoch_line(history, epoch, 3))
                                   for epoch in (1, 2, 3))
    assert "epoch 3/3:" in terminal and "batch/s" in terminal  # the bar was there


@pytest.mark.slow
def test_a_hook_printing_under_a_terminal_starts_its_line_at_column_0(spawner, tmp_path):
    screen = _screen(_run_in_terminal(spawner, tmp_path, "--printer"))
    for epoch in (1, 2, 3):
        assert f"hook: step {8 * epoch - 5}" in screen  # loop.print, with the bar live
        assert f"hook: epoch {epoch} done" in screen  # print at "epoch"
        assert any(line.startswith(_epoch_line(_history(screen), epoch, 3)) for line in screen)


NOTEBOOK_CELL = """
import json, sys
sys.path.insert(0, {here!r})
import torch, loopy
import torch.nn.functional as F
torch.manual_seed(0)
X, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                 epochs=3, val_loader=(X[:64], y[:64]), metrics={{"acc": loopy.accuracy}})
print("history", json.dumps(loop.history))
loop
"""


@pytest.fixture(scope="session")
def notebook_outputs(tmp_path_factory):
    """A function that returns the outputs of NOTEBOOK_CELL run by a Jupyter kernel, as a
    notebook saved and read again holds them. It runs in a thread from the start (see
    start_launches_first); without nbformat, nbclient or ipykernel, it returns None."""
    tmp_path = tmp_path_factory.mktemp("notebook")

    def run():
        if not all(importlib.util.find_spec(name) for name in ("nbformat", "nbclient",
                                                               "ipykernel")):
            return None
        import nbclient
        import nbformat
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
            NOTEBOOK_CELL.format(here=HERE))])
        nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute(
            env=cpu_env())  # (no GPU)
        nbformat.write(notebook, tmp_path / "saved.ipynb")  # what a reopened notebook holds
        return nbformat.read(tmp_path / "saved.ipynb", as_version=4).cells[0].outputs

    return in_background(run)


@pytest.mark.slow
def test_a_notebook_keeps_each_epochs_metrics_as_text_and_shows_the_loop(notebook_outputs):
    pytest.importorskip("nbformat"), pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    outputs = notebook_outputs()
    stdout = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    history = _history(stdout.splitlines())
    lines = stdout.splitlines()
    assert all(lines[epoch - 1].startswith(_epoch_line(history, epoch, 3)) for epoch in (1, 2, 3))
    (result,) = [o for o in outputs if o.output_type == "execute_result"]
    values = " - ".join(f"{name} {values[-1]:.4g}" for name, values in history.items())
    assert result.data["text/plain"] == f"<Loop epoch 3/3, step 24; {values}>"
    assert "IProgress" not in json.dumps([dict(o) for o in outputs])  # no tqdm warning
    assert sum(o.output_type == "display_data" for o in outputs) <= 1  # one widget bar at most


def test_a_progress_hook_of_your_own_replaces_fits(capsys):
    train(epochs=2, progress=True, hooks=[loopy.progress(bar=False)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]


# --- packaging ---

def test_version_is_a_literal_that_setup_cfg_reads():
    import ast
    with open(os.path.join(HERE, "loopy.py")) as file:
        tree = ast.parse(file.read())
    literals = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and node.targets[0].id == "__version__"]
    assert literals == [loopy.__version__]
    with open(os.path.join(HERE, "setup.cfg")) as file:
        setup = file.read()
    assert "version = attr: loopy.__version__" in setup and "name = torch-loopy" in setup


def test_importing_loopy_has_no_side_effects(fresh_interpreters):
    returncode, stdout, stderr = fresh_interpreters("imports")  # (see fresh_interpreters)
    assert returncode == 0 and stderr == ""
    assert eval(stdout) == ["loopy"]


# --- training options ---

def test_scheduler_per_epoch_matches_the_hand_loop_and_records_the_lr():
    X, y = make_data(96)
    by_hand, model = make_mlp(), make_mlp()
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        hand_loop(by_hand, optimizer, tensor_loader(X, y), 1)
        scheduler.step()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = train(model=model, optimizer=optimizer, loader=(X, y), epochs=3,
                 scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5))
    assert same_weights(model, by_hand)
    assert loop.history["lr"] == [0.1, 0.05, 0.025]


def test_scheduler_per_step_matches_the_hand_loop():
    X, y = make_data(96)
    by_hand, model = make_mlp(), make_mlp()
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=6)
    for _ in range(2):
        for x, target in tensor_loader(X, y):
            F.cross_entropy(by_hand(x), target).backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=6)
    train(model=model, optimizer=optimizer, loader=(X, y), epochs=2, scheduler=scheduler,
          scheduler_interval="step")
    assert same_weights(model, by_hand)


def test_a_one_cycle_schedule_that_does_not_fit_the_run_is_an_error_before_training():
    X, y = make_data(96)  # batches of 32: 3 optimizer steps per epoch, 6 in 2 epochs

    def one_cycle(total_steps, **options):
        model = make_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.5, total_steps=total_steps)
        return train(model=model, optimizer=optimizer, scheduler=scheduler, loader=(X, y),
                     epochs=2, **options)

    # torch would raise "Tried to step 6 times" at the run's last step
    with pytest.raises(ValueError, match=r"OneCycleLR\(total_steps=5\) has 5 steps left, but "
                                         r"scheduler_interval='step' steps it 6 times .* build "
                                         r"it with total_steps=6"):
        one_cycle(5, scheduler_interval="step")
    # counted in optimizer steps, stepped per epoch: the warm-up would never end
    with pytest.raises(ValueError, match=r"counts this run's optimizer steps \(3 per epoch\), "
                                         r"but .* pass scheduler_interval='step'"):
        one_cycle(6)
    # 2 groups per epoch (the last one short): 4 steps, no more (torch would raise) and no less
    with pytest.raises(ValueError, match=r"steps it 4 times .* total_steps=4"):
        one_cycle(3, scheduler_interval="step", accumulate=2)
    assert one_cycle(4, scheduler_interval="step", accumulate=2).step == 4
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    by_hand = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.5, total_steps=2)
    lrs = [optimizer.param_groups[0]["lr"]]
    optimizer.step()
    by_hand.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    assert one_cycle(2).history["lr"] == lrs  # built per epoch, stepped per epoch: it fits
    one_cycle(6, scheduler_interval="step", max_steps=4)  # ends early: fits


def test_reduce_lr_on_plateau_gets_the_monitored_metric():
    X, y = make_data(64)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-12)  # so the loss stays flat
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=0)
    loop = train(model=model, optimizer=optimizer, loader=(X, y), val_loader=(X, y), epochs=3,
                 scheduler=scheduler)
    assert loop.history["lr"] == pytest.approx([1e-12, 1e-13, 1e-14])
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters())
    message = fit_error(ValueError, model=model, optimizer=optimizer, scheduler_monitor="val_f1",
                        scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer))
    assert "scheduler_monitor='val_f1'" in message and "'loss'" in message


def test_reduce_lr_on_plateau_cannot_run_per_step():
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    message = fit_error(ValueError, model=model, optimizer=optimizer, scheduler_interval="step",
                        scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer))
    assert "scheduler_interval='step'" in message and "scheduler_interval='epoch'" in message


def test_accumulation_equals_one_larger_batch_including_the_last_partial_group():
    X, y = make_data(80)  # batches of 16: groups of 2, 2 and a last group of 1
    big, small = make_mlp(), make_mlp()
    hand_loop(big, torch.optim.SGD(big.parameters(), lr=0.5),
              [(X[:32], y[:32]), (X[32:64], y[32:64]), (X[64:], y[64:])], 2)
    steps = []
    train(model=small, lr=0.5, loader=(X, y), batch_size=16, accumulate=2, epochs=2,
          hooks=[count_steps(steps)])
    assert steps == [1, 2, 3, 4, 5, 6]
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clip_grad_matches_the_hand_loop_and_shows_the_norm():
    X, y = make_data(96)
    by_hand, model = make_mlp(), make_mlp()
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.5)
    norms = []
    for x, target in tensor_loader(X, y):
        F.cross_entropy(by_hand(x), target).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(by_hand.parameters(), 0.1))
        optimizer.step()
        optimizer.zero_grad()
    seen = []

    def norm_logger():
        while True:
            loop = yield "backward"
            seen.append(loop.grad_norm)
            assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in
                                                         loop.model.parameters()])) <= 0.1 + 1e-6

    train(model=model, lr=0.5, loader=(X, y), clip_grad=0.1, hooks=[norm_logger()])
    assert same_weights(model, by_hand)
    assert torch.equal(torch.stack(seen), torch.stack(norms))


def first_grad_norm(norms):
    """A hook that appends the gradients' global norm at the first "backward" to ``norms``."""
    loop = yield "backward"
    norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm()
                                                       for p in loop.model.parameters()])))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_full_precision(precision):
    results, first_norms = {}, {}
    for mode in (None, precision):
        norms = []
        loop = train(n=128, epochs=3, precision=mode, hooks=[first_grad_norm(norms)])
        results[mode], first_norms[mode] = loop.history["loss"], norms[0]
        assert (loop.scaler is not None) == (mode == "fp16")
    assert results[precision] == pytest.approx(results[None], rel=0.05)
    # the "backward" hooks see unscaled gradients, also under the fp16 GradScaler
    assert first_norms[precision].item() == pytest.approx(first_norms[None].item(), rel=0.05)


def test_seed_makes_runs_reproducible_and_is_left_alone_when_not_given():
    runs = {}
    for seed in (7, None):
        models = []
        for global_seed in (1, 2):
            model = make_mlp(dropout=0.3)
            torch.manual_seed(global_seed)  # after make_mlp, which seeds with 0
            train(model=model, n=96, shuffle=True, seed=seed, epochs=2)
            models.append(model)
        runs[seed] = same_weights(*models)
    assert runs == {7: True, None: False}  # the seed, not the global generator, decided
    torch.manual_seed(11)
    model = make_mlp()
    torch.manual_seed(11)
    train(model=model)
    assert torch.initial_seed() == 11


@pytest.mark.parametrize("max_steps, epochs_recorded", [(5, 1), (6, 2)])
def test_max_steps_stops_like_stop_and_records_only_finished_epochs(max_steps, epochs_recorded):
    X, y = make_data(96)  # 3 batches per epoch
    loop = train(loader=(X, y), epochs=10, max_steps=max_steps, val_loader=(X, y))
    assert loop.step == max_steps and len(loop.history["val_loss"]) == epochs_recorded
    assert loop.stop_reason == f"reached max_steps={max_steps}"


def test_max_steps_also_counts_the_last_partial_accumulation_group():
    # 6 batches of 16: a group of 4 and a partial group of 2 per epoch
    loop = train(n=96, batch_size=16, accumulate=4, max_steps=2, epochs=3)
    assert loop.step == 2 and loop.stop_reason == "reached max_steps=2"
    assert len(loop.history["loss"]) == 1


def test_dry_run_runs_two_batches_of_train_and_validation_and_writes_nothing(tmp_path):
    X, y = make_data(320)
    val_batches = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return 320

        def __getitem__(self, index):
            val_batches.append(index)
            return X[index], y[index]

    loop = train(loader=(X, y), epochs=5, val_loader=DataLoader(Counting(), batch_size=32),
                 dry_run=True, hooks=[loopy.checkpoint(tmp_path / "run.pt")])
    assert loop.step == 2 and len(loop.history["loss"]) == 1 and len(val_batches) == 64
    assert not os.listdir(tmp_path)


def test_a_stop_on_the_last_batch_of_a_loader_without_len_resumes_to_the_straight_run(tmp_path):
    X, y = make_data(96)

    class Batches:  # re-iterable, with no len(): the epoch's end is known only when it comes
        def __iter__(self):
            return iter([(X[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)])

    straight = train(loader=Batches(), epochs=3)
    path = tmp_path / "run.pt"
    stopped = train(loader=Batches(), epochs=3, max_steps=3,  # the epoch's last batch
                    hooks=[loopy.checkpoint(path)])
    assert stopped.step == 3 and stopped.history == {}  # not known to be complete yet
    resumed = train(loader=Batches(), epochs=3, resume=path)
    assert same_weights(resumed.model, straight.model) and resumed.history == straight.history


def copy_of(model):
    import copy
    return copy.deepcopy(model)


def frozen_bn_cnn(trainable=True):
    model = make_cnn()
    model[1].eval()  # a frozen BatchNorm: its running statistics must not change
    model[1].requires_grad_(trainable)
    return model


def test_evaluate_predict_and_lr_find_restore_every_submodule_mode():
    X, y = image_data(32)
    for call in (lambda m: loopy.evaluate(m, (X, y), F.cross_entropy),
                 lambda m: loopy.predict(m, X),
                 lambda m: loopy.lr_find(m, F.cross_entropy, torch.optim.SGD(m.parameters(),
                                                                             lr=0.1), (X, y),
                                         num_steps=3)):
        model = frozen_bn_cnn(trainable=False)
        modes = [m.training for m in model.modules()]
        call(model)
        assert [m.training for m in model.modules()] == modes and not model[1].training


def test_a_submodule_in_eval_mode_stays_in_eval_mode_during_fit():
    X, y = image_data(96)
    model = frozen_bn_cnn()
    stats = {name: buffer.clone() for name, buffer in model[1].named_buffers()}
    # its affine parameters still train: said, since from_pretrained models come in eval mode
    with pytest.warns(UserWarning, match=r"submodules of the model are in eval mode \(1\).*"
                                         r"model.train\(\) before fit"):
        loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                  epochs=2, val_loader=(X[:32], y[:32]), progress=False)
    oracle = frozen_bn_cnn()
    optimizer = torch.optim.SGD(oracle.parameters(), lr=0.1)
    for _ in range(2):  # the hand loop re-applies .eval() to the frozen submodule each epoch
        oracle.train()
        oracle[1].eval()
        for x_batch, y_batch in tensor_loader(X, y):
            F.cross_entropy(oracle(x_batch), y_batch).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert same_weights(model, oracle)
    assert all(torch.equal(buffer, stats[name]) for name, buffer in model[1].named_buffers())
    assert model.training and not model[1].training
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a frozen submodule without trainable parameters: quiet
        model = frozen_bn_cnn(trainable=False)
        loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                  progress=False)
    assert all(torch.equal(buffer, stats[name]) for name, buffer in model[1].named_buffers())
    # a model that is entirely in eval mode (left so by the user) trains in train mode, as before
    model = make_cnn().eval()
    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
              progress=False)
    assert not torch.equal(model[1].running_mean, torch.zeros(4))


def test_drop_last_for_in_memory_tensors_gives_the_dataloader_batches():
    X, y = make_data(100)
    sizes = []

    def batch_sizes():
        while True:
            sizes.append(len((yield "batch").batch[1]))

    model = make_mlp()
    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
              epochs=2, batch_size=32, shuffle=True, drop_last=True, seed=0,
              hooks=[batch_sizes()], progress=False)
    oracle = make_mlp()
    torch.manual_seed(0)
    hand_loop(oracle, torch.optim.SGD(oracle.parameters(), lr=0.1), DataLoader(
        TensorDataset(X, y), batch_size=32, shuffle=True, drop_last=True), 2)
    assert same_weights(model, oracle) and sizes == [32] * 6
    message = fit_error(ValueError, loader=make_data(20), drop_last=True)
    assert "loader is empty" in message and "drop_last=True" in message
    message = fit_error(ValueError, loader=tensor_loader(X, y), drop_last=True)
    assert "drop_last=True applies to in-memory tensors" in message
    assert "DataLoader(..., drop_last=True)" in message
    message = fit_error(ValueError, drop_last="yes")
    assert "drop_last='yes'" in message


def test_val_batch_size_batches_in_memory_validation_data():
    X, y = make_data(100)
    sizes = []

    def size_of_each_batch(output, target):
        sizes.append(len(target))
        return loopy.accuracy(output, target)

    model = make_mlp()
    loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                     (X[:64], y[:64]), val_loader=(X, y), val_batch_size=40,
                     metrics={"acc": size_of_each_batch}, progress=False)
    assert sizes == [32, 32, 40, 40, 20]
    oracle = make_mlp()
    history = hand_loop(oracle, torch.optim.SGD(oracle.parameters(), lr=0.1),
                        tensor_loader(X[:64], y[:64]), 1, val_loader=tensor_loader(X, y, 40))
    assert loop.history["val_loss"] == pytest.approx(history["val_loss"], abs=1e-6)
    sizes.clear()  # None: batch_size, as before
    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
              (X[:64], y[:64]), val_loader=(X, y), metrics={"acc": size_of_each_batch},
              progress=False)
    assert sizes == [32, 32, 32, 32, 32, 4]
    message = fit_error(ValueError, val_batch_size=0, val_loader=(X, y))
    assert "val_batch_size must be an int >= 1" in message
    message = fit_error(ValueError, val_batch_size=64, val_loader=tensor_loader(X, y))
    assert "val_batch_size=64 applies to in-memory tensors" in message
    assert "DataLoader(..., batch_size=64)" in message


def test_epochs_default_is_one_but_unbounded_with_max_steps():
    X, y = make_data(64)
    assert train(loader=(X, y)).step == 2  # two batches of 32: one epoch
    loop = train(loader=(X, y), max_steps=5)
    model = make_mlp()  # the hand-written loop: 5 steps over the batches in order
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        rows = slice(step % 2 * 32, step % 2 * 32 + 32)
        F.cross_entropy(model(X[rows]), y[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loop.step == 5 and loop.stop_reason == "reached max_steps=5" and loop.epochs is None
    assert same_weights(loop.model, model) and len(loop.history["loss"]) == 2  # epoch 3 cut short
    assert "epoch 2, step 5" in repr(loop)


def test_a_scheduler_must_be_a_scheduler_of_one_of_the_runs_optimizers():
    model = make_mlp()
    other = torch.optim.SGD(make_mlp().parameters(), lr=0.1)
    message = fit_error(ValueError, model=model, scheduler=torch.optim.lr_scheduler.StepLR(other, 1))
    assert "scheduler was built for another optimizer" in message and "StepLR(optimizer" in message
    message = fit_error(TypeError, scheduler="cosine")
    assert "scheduler must be a learning-rate scheduler" in message and "'cosine'" in message
    model = torch.nn.ModuleDict({"a": make_mlp(), "b": make_mlp()})
    optimizers = {name: torch.optim.SGD(model[name].parameters(), lr=0.1) for name in "ab"}
    schedulers = {"a": torch.optim.lr_scheduler.StepLR(optimizers["a"], 1),
                  "b": torch.optim.lr_scheduler.StepLR(other, 1)}
    message = fit_error(ValueError, model=model, optimizer=optimizers, scheduler=schedulers,
                        step=lambda model, batch, loop: {})
    assert "scheduler['b'] was built for another optimizer" in message


def test_reduce_lr_on_plateau_counts_a_nan_as_no_improvement_as_torch_does():
    X, y = make_data(64)
    model = make_mlp()
    nan_epochs = {1, 2}

    def loss_fn(output, target):  # NaN in validation at epochs 2 and 3; training stays finite
        loss = F.cross_entropy(output, target)
        return loss * math.nan if not output.requires_grad and len(epochs) in nan_epochs else loss

    epochs = []

    def count_epochs():
        while True:
            yield "epoch"
            epochs.append(0)

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
    loop = loopy.fit(model, loss_fn, optimizer, (X, y), val_loader=(X, y), epochs=5,
                     scheduler=scheduler, hooks=[count_epochs()], progress=False)
    # the oracle: torch's own scheduler fed the same values by hand
    by_hand = torch.optim.SGD(make_mlp().parameters(), lr=1e-6)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(by_hand, factor=0.5, patience=1)
    lrs = []
    for value in loop.history["val_loss"]:
        lrs.append(by_hand.param_groups[0]["lr"])
        reference.step(value)
    assert [math.isnan(v) for v in loop.history["val_loss"]] == [False, True, True, False, False]
    assert loop.history["lr"] == lrs and scheduler.best == reference.best
    assert math.isfinite(scheduler.best) and lrs[3] == 0.5e-6  # two NaN epochs: one reduction


# --- built-in hooks ---

def scripted_score(scores):
    """A hook that adds a made-up metric 'score' to each epoch's metrics and history."""
    loop = yield "start"
    loop.metric_names.append("score")  # declared, so that monitors can check it before training
    while True:
        loop = yield "epoch"
        loop.metrics["score"] = scores[loop.epoch]
        loop.history.setdefault("score", []).append(scores[loop.epoch])


def test_early_stopping_stops_after_patience_and_restores_the_best_weights():
    snapshots = []

    def snapshot():
        while True:
            loop = yield "epoch"
            snapshots.append({k: v.clone() for k, v in loop.model.state_dict().items()})

    loop = train(lr=0.5, epochs=10,
                 hooks=[scripted_score([0.5, 0.9, 0.7, 0.6, 0.8]), snapshot(),
                        loopy.early_stopping("score", patience=2, mode="max", restore_best=True)])
    assert len(snapshots) == 4 and "score did not improve for 2 epochs" in loop.stop_reason
    assert all(torch.equal(snapshots[1][k], v) for k, v in loop.model.state_dict().items())
    assert not all(torch.equal(snapshots[3][k], v) for k, v in loop.model.state_dict().items())


def test_early_stopping_after_a_resume_stops_where_the_straight_run_stopped(tmp_path):
    scores = [0.5, 0.9, 0.7, 0.6, 0.8, 0.95]

    def run(epochs, resume=None):
        return train(lr=0.5, epochs=epochs, resume=resume,
                     hooks=[scripted_score(scores), loopy.checkpoint(tmp_path / "run.pt"),
                            loopy.early_stopping("score", patience=2, mode="max")])

    straight = run(6)
    assert len(straight.history["loss"]) == 4  # 0.9 at epoch 2, then two epochs without gain
    run(3)
    resumed = run(6, resume=tmp_path / "run.pt")
    assert resumed.history == straight.history and resumed.stop_reason == straight.stop_reason


def test_early_stopping_on_a_missing_metric_names_the_available_ones():
    message = fit_error(ValueError, lr=0.5, hooks=[loopy.early_stopping("val_acc")])
    assert "early_stopping(monitor='val_acc')" in message and "'loss'" in message
    assert "val_loader" in message
    with pytest.raises(ValueError, match="mode='best'"):
        next(loopy.early_stopping(mode="best"))


def test_checkpoint_keeps_the_best_files_when_monitoring(tmp_path):
    train(lr=0.5, epochs=5,
          hooks=[scripted_score([0.5, 0.9, 0.7, 0.95, 0.8]),
                 loopy.checkpoint(tmp_path / "best-{epoch}.pt", monitor="score", mode="max",
                                  keep=2)])
    assert sorted(os.listdir(tmp_path)) == ["best-2.pt", "best-4.pt"]
    state = torch.load(tmp_path / "best-4.pt", weights_only=True)
    assert state["epoch"] == 4 and state["history"]["loss"][-1] > 0


def test_checkpoint_with_monitor_remembers_the_best_across_a_resume(tmp_path):
    path = tmp_path / "best.pt"

    def run(epochs, resume=None):
        return train(epochs=epochs, resume=resume,
                     hooks=[scripted_score([0.9, 0.5, 0.8]),
                            loopy.checkpoint(path, monitor="score", mode="max"),
                            loopy.checkpoint(tmp_path / "last.pt")])

    run(2)
    run(3, resume=tmp_path / "last.pt")
    assert torch.load(path, weights_only=True)["epoch"] == 1  # 0.9 is still the best


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    model = make_mlp()
    path = tmp_path / "run.pt"
    train(model=model, lr=0.5, hooks=[loopy.checkpoint(path)])
    good = path.read_bytes()
    real_save = torch.save

    def crash_midway(obj, file):
        real_save(obj, file)
        file.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        train(model=model, lr=0.5, hooks=[loopy.checkpoint(path)])
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["run.pt"]


def test_csv_logger_writes_one_row_per_epoch(tmp_path):
    import csv
    X, y = make_data(64)
    loop = train(lr=0.5, loader=(X, y), epochs=3, val_loader=(X, y),
                 hooks=[loopy.csv_logger(tmp_path / "log.csv")])
    with open(tmp_path / "log.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert [float(row["val_loss"]) for row in rows] == loop.history["val_loss"]


def test_tensorboard_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train(lr=0.5, hooks=[loopy.tensorboard("runs")])


def test_tensorboard_logs_step_and_epoch_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    loop = train(lr=0.5, epochs=3, hooks=[loopy.tensorboard(tmp_path, every=2)])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("step/loss")] == [2, 4, 6]
    assert [e.value for e in events.Scalars("epoch/loss")] == pytest.approx(loop.history["loss"])
    assert [e.step for e in events.Scalars("epoch/lr")] == [1, 2, 3]


def test_a_hooks_path_or_refresh_of_the_wrong_kind_is_an_error_before_training():
    for hook, like in ((loopy.csv_logger(None), "csv_logger('log.csv')"),
                       (loopy.live_plot(3), "live_plot('history.png')")):
        with pytest.raises(TypeError, match=rf"path=.* \(type (NoneType|int)\)\): pass a file "
                                            rf"path, like {re.escape(like)}"):
            train(hooks=[hook])
    for refresh in (-1, "1", None):
        with pytest.raises(ValueError, match=r"progress\(refresh=.*\): use a number of seconds "
                                             r">= 0"):
            train(hooks=[loopy.progress(refresh=refresh)])


def test_tensorboard_every_must_be_a_count_of_steps():
    with pytest.raises(ValueError, match=r"tensorboard\(every=\.\.\.\) must be an int >= 1; got 0"):
        train(hooks=[loopy.tensorboard("runs", every=0)])  # (it divided by zero at step 1)


def test_lr_find_suggests_a_rate_and_leaves_model_optimizer_and_rng_as_they_were():
    X, y = make_data(256)
    model = make_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model=model, optimizer=optimizer, loader=(X, y))  # so Adam has state
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()}
    rng = torch.get_rng_state()
    found = loopy.lr_find(model, F.cross_entropy, optimizer, (X, y), num_steps=30, batch_size=16)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()
    assert all(torch.equal(state[k][n], t) for k, s in after["state"].items() for n, t in s.items())
    assert after["param_groups"][0]["lr"] == 1e-3 and torch.equal(rng, torch.get_rng_state())
    assert 2 <= len(found["lr"]) <= 30 and found["lr"] == sorted(found["lr"])
    assert found["suggestion"] in found["lr"] and len(found["loss"]) == len(found["lr"])


def test_lr_find_restores_the_train_or_eval_mode():
    X, y = make_data(64)
    model = make_mlp().eval()
    loopy.lr_find(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                  num_steps=5)
    assert not model.training


def test_lr_find_over_a_dataloader_leaves_the_rng_as_it_was():
    model = make_mlp()  # (its iterator draws a seed from the global RNG: restored too)
    rng = torch.get_rng_state()
    loopy.lr_find(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                  tensor_loader(*make_data(64), batch_size=16, shuffle=True), num_steps=5)
    assert torch.equal(rng, torch.get_rng_state())


def _recording(records):
    return lambda metrics, step: records.append((step, metrics))


def test_log_to_logs_every_epoch_and_the_running_means_every_n_steps():
    X, y = make_data(64)  # 4 batches of 16 per epoch
    records, batches = [], []

    def per_batch():  # the oracle: each batch's loss and accuracy, averaged by hand
        while True:
            loop = yield "step"
            batches.append((float(loop.loss), float(loopy.accuracy(loop.output, loop.batch[1]))))

    model = make_mlp()
    loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                     batch_size=16, epochs=2, val_loader=(X, y), metrics={"acc": loopy.accuracy},
                     hooks=[per_batch(), loopy.log_to(_recording(records), every=3)],
                     progress=False)

    def means(first, last):
        chosen = batches[first:last]
        return {"loss": pytest.approx(sum(b[0] for b in chosen) / len(chosen), rel=1e-6),
                "acc": pytest.approx(sum(b[1] for b in chosen) / len(chosen), rel=1e-6)}

    def epoch(index):
        return {**{name: values[index] for name, values in loop.history.items()},
                "epoch": index + 1}

    assert records == [(3, means(0, 3)), (4, epoch(0)), (6, means(4, 6)), (8, epoch(1))]
    assert list(records[1][1]) == [*loop.history, "epoch"]


def test_log_to_continues_the_steps_across_a_resume(tmp_path):
    X, y = make_data(150)  # 10 batches of 16 per epoch

    def run(path, epochs, stop_at_step=None, resume=None):
        records = []
        model = make_mlp(dropout=0.2)
        hooks = [loopy.checkpoint(path), loopy.log_to(_recording(records), every=4)]
        loopy.fit(model, F.cross_entropy, torch.optim.Adam(model.parameters(), lr=0.01), (X, y),
                  batch_size=16, shuffle=True, epochs=epochs, val_loader=(X[:50], y[:50]),
                  seed=None if resume else 7, resume=resume, progress=False,
                  hooks=hooks + ([stop_when(stop_at_step)] if stop_at_step else []))
        return records

    straight = run(tmp_path / "straight.pt", epochs=3)
    before = run(tmp_path / "run.pt", epochs=3, stop_at_step=14)  # in the middle of epoch 2
    after = run(tmp_path / "run.pt", epochs=3, resume=tmp_path / "run.pt")
    assert [step for step, _ in straight] == [4, 8, 10, 12, 16, 20, 20, 24, 28, 30]
    assert before + after == straight


def test_log_to_logs_on_rank_0_only_and_checks_its_arguments():
    records = []
    hook = loopy.log_to(_recording(records))
    assert next(hook) == "epoch"
    with pytest.raises(StopIteration):  # another process: the hook ends, having logged nothing
        hook.send(types.SimpleNamespace(rank=1, event="epoch", metrics={"loss": 1.0}, epoch=0,
                                        step=4))
    assert records == []
    with pytest.raises(TypeError, match=r"log_to\(log='wandb' .*\): pass a function log\("
                                        r"metrics, step\), like wandb.log"):
        _small_fit(hooks=[loopy.log_to("wandb")], progress=False)
    with pytest.raises(ValueError, match=r"log_to\(every=0\): use None .* or a number of steps"):
        _small_fit(hooks=[loopy.log_to(print, every=0)], progress=False)


@pytest.fixture
def agg():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")  # no window


def test_plot_history_draws_training_against_validation_and_writes_a_png(tmp_path, agg):
    loop = _small_fit(epochs=3, progress=False)
    figure = loopy.plot_history(loop, tmp_path / "curves.png")
    assert [axis.get_title() for axis in figure.axes] == ["loss", "acc"]  # no lr panel
    for axis, name in zip(figure.axes, ("loss", "acc")):
        curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                  for line in axis.lines}
        assert curves == {"training": ([1, 2, 3], loop.history[name]),
                          "validation": ([1, 2, 3], loop.history["val_" + name])}
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(loopy.plot_history(loop.history).axes) == 2  # the history alone, no file
    with pytest.raises(ValueError, match=r"plot_history needs a Loop, its history or lr_find's"):
        loopy.plot_history({})


def test_plot_history_draws_lr_finds_loss_against_a_log_scale_learning_rate(agg):
    X, y = make_data(64)
    model = make_mlp()
    found = loopy.lr_find(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                          (X, y), num_steps=20)
    (axis,) = loopy.plot_history(found).axes
    curve, suggestion = axis.lines
    assert axis.get_xscale() == "log" and list(curve.get_xdata()) == found["lr"]
    assert list(curve.get_ydata()) == found["loss"]
    assert list(suggestion.get_xdata()) == [found["suggestion"]] * 2


def test_live_plot_in_a_notebook_displays_one_figure_and_updates_it_in_place(monkeypatch, agg):
    display = pytest.importorskip("IPython.display")
    calls = []

    class Handle:
        def update(self, figure):
            calls.append(("update", figure))

    def record_display(figure, display_id=False):
        calls.append(("display", figure, display_id))
        return Handle()

    monkeypatch.setattr(display, "display", record_display)
    monkeypatch.setattr(display, "clear_output", lambda *args, **kwargs: calls.append("clear"))
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))  # a notebook
    loop = _small_fit(epochs=3, hooks=[loopy.live_plot()], progress=False)
    assert [call[0] for call in calls] == ["display", "update", "update"] and calls[0][2] is True
    last = calls[-1][1].axes[0].lines[0]  # the figure of the last epoch holds the whole history
    assert list(last.get_ydata()) == loop.history["loss"]


def test_live_plot_elsewhere_writes_a_png_given_a_path_or_does_nothing(tmp_path, agg):
    _small_fit(hooks=[loopy.live_plot(tmp_path / "live.png"), loopy.live_plot()], progress=False)
    assert (tmp_path / "live.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["live.png"]


def hand_ema(make_model, data, decay, epochs, formula=False):
    """The hand-written loop with an EMA kept by hand: torch.lerp, as torch.optim.swa_utils
    does, or the formula ``decay * average + (1 - decay) * parameter`` in float64."""
    X, y = data
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dtype = torch.float64 if formula else torch.float32
    average = [p.detach().clone().to(dtype) for p in model.parameters()]
    for _ in range(epochs):
        model.train()
        for x, target in tensor_loader(X, y, batch_size=16):
            F.cross_entropy(model(x), target).backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                for a, p in zip(average, model.parameters()):
                    if formula:
                        a.copy_(decay * a + (1 - decay) * p.double())
                    else:
                        a.lerp_(p, 1 - decay)
    return model, average


@pytest.mark.parametrize("make_model, data", [(make_mlp, make_data), (make_cnn, image_data)])
def test_ema_equals_the_hand_computed_average(make_model, data):
    X, y = data()
    decay = 0.9
    models = []
    for apply_at_end in (True, False):
        models.append(make_model())
        loopy.fit(models[-1], F.cross_entropy, torch.optim.SGD(models[-1].parameters(), lr=0.1),
                  (X, y), batch_size=16, epochs=2, progress=False,
                  hooks=[loopy.ema(decay=decay, apply_at_end=apply_at_end)])
    averaged, raw = models
    hand_model, hand_average = hand_ema(make_model, (X, y), decay, epochs=2)
    _, formula_average = hand_ema(make_model, (X, y), decay, epochs=2, formula=True)
    assert same_weights(raw, hand_model)  # apply_at_end=False: the trained weights
    for a, hand, formula in zip(averaged.parameters(), hand_average, formula_average):
        assert torch.equal(a, hand)  # the same lerp, in the same order: bit for bit
        # the formula in float64: lerp rounds differently in float32, by about 1e-7 per step
        torch.testing.assert_close(a.double(), formula, rtol=0, atol=1e-6)
    for name, buffer in averaged.named_buffers():  # buffers: the model's own, not averaged
        assert torch.equal(buffer, dict(hand_model.named_buffers())[name])


@pytest.mark.parametrize("checkpoint_first", [False, True])  # the hooks' order does not matter
@pytest.mark.parametrize("make_model", [make_mlp, make_cnn])
def test_ema_stopped_mid_epoch_and_resumed_equals_the_straight_run(tmp_path, checkpoint_first,
                                                                    make_model):
    train = shuffled_run(make_model, hooks=lambda: [loopy.ema(decay=0.9)], every=9,
                         checkpoint_first=checkpoint_first)  # saved at "step", not at "end"
    (straight, straight_loop), (resumed, resumed_loop) = resumed_pair(tmp_path, train, 9)
    assert same_weights(resumed, straight) and resumed_loop.history == straight_loop.history
    assert same_weights(resumed_loop.val_model, straight_loop.val_model)


def test_an_average_older_than_the_checkpoints_weights_starts_over(tmp_path):
    path = tmp_path / "run.pt"
    train = shuffled_run(epochs=1, hooks=lambda: [loopy.ema(decay=0.9)])
    train(path, None, [])  # the average is saved at step 10 ...
    shuffled_run(epochs=2)(path, path, [])  # ... kept, stale, by a resumed run without ema
    model, loop = shuffled_run(epochs=2, hooks=lambda: [loopy.ema(apply_at_end=False)])(
        path, path, [])  # nothing left to train: the average is the weights at step 20
    assert loop.step == 20 and same_weights(loop.val_model, model)
    assert not same_weights(loop.val_model, make_mlp())


def test_validation_runs_with_the_averaged_weights():
    X, y = make_data(150)
    val = tensor_loader(X[:50], y[:50], batch_size=16)
    for apply_at_end in (True, False):
        model = make_mlp()
        loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.5),
                         (X, y), val_loader=val, epochs=2, progress=False,
                         hooks=[loopy.ema(decay=0.8, apply_at_end=apply_at_end)])
        averaged = loopy.evaluate(loop.val_model, val, F.cross_entropy)["loss"]
        assert loop.history["val_loss"][-1] == averaged
        assert (loopy.evaluate(model, val, F.cross_entropy)["loss"] == averaged) == apply_at_end


def test_ema_with_a_bad_decay_says_what_to_use():
    X, y = make_data()
    model = make_mlp()
    for decay in (1.5, -0.1, "0.9", None, 1.0):  # 1.0: the average would stay the initial weights
        with pytest.raises(ValueError, match=r"ema\(decay=.*\): use a number between 0 and 1"):
            loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                      (X, y), hooks=[loopy.ema(decay=decay)], progress=False)


def test_ctrl_c_in_lr_find_restores_the_model_and_raises_keyboard_interrupt(recwarn):
    model, (X, y) = make_mlp(), make_data(64)
    before = copy.deepcopy(model.state_dict())
    calls = []

    def interrupted_loss(output, target):  # Ctrl+C at the third step
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return F.cross_entropy(output, target)

    with pytest.raises(KeyboardInterrupt):
        loopy.lr_find(model, interrupted_loss, torch.optim.SGD(model.parameters(), lr=0.1),
                      (X, y), num_steps=20)  # (was: a suggestion from 3 steps, two warnings)
    assert [str(w.message) for w in recwarn] == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lr_find_warns_when_the_loss_never_falls_and_explains_a_short_generator():
    model, (X, y) = make_mlp(), make_data(64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"lr_find found no descent.*lower min_lr"):
        found = loopy.lr_find(model, F.cross_entropy, optimizer, (X, y), min_lr=100.0,
                              max_lr=1e4, num_steps=20)
    assert found["suggestion"] == 100.0
    batches = ((X[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16))
    with pytest.raises(ValueError, match=r"ran out after 4 of num_steps=20 batches.*DataLoader"):
        loopy.lr_find(model, F.cross_entropy, optimizer, batches, num_steps=20)
    batches = [(X[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    found = loopy.lr_find(model, F.cross_entropy, optimizer, iter(batches * 3), num_steps=10)
    assert len(found["lr"]) == 10


def weights_at_epochs(weights):
    """A hook that copies the model's weights at every "epoch" into the list ``weights``."""
    while True:
        loop = yield "epoch"
        weights.append({k: v.clone() for k, v in loop.model.state_dict().items()})


@pytest.mark.parametrize("early_stopping_first", [True, False])
def test_restore_best_comes_after_every_hooks_end_so_checkpoints_hold_the_trained_weights(
        tmp_path, early_stopping_first):
    path = tmp_path / "run.pt"

    def run(weights, restore_best=True, **options):
        hooks = [loopy.early_stopping(patience=5, restore_best=restore_best),
                 loopy.checkpoint(path)]
        return train(model=make_mlp(), n=128, lr=2.0, epochs=3, shuffle=True, seed=0,
                     val_loader=make_data(64, seed=1), **options,
                     hooks=(hooks if early_stopping_first else hooks[::-1]) +
                     [weights_at_epochs(weights)])

    trained = []
    straight = run(trained)
    best = min(range(3), key=straight.history["val_loss"].__getitem__)
    assert best != 2  # (else restoring the best changes nothing)
    assert all(torch.equal(v, trained[best][k]) for k, v in straight.model.state_dict().items())
    saved = torch.load(path, weights_only=True)["model"]  # at "end": the trained weights
    assert all(torch.equal(v, trained[-1][k]) for k, v in saved.items())

    stopped = run([], max_steps=6)  # stops in epoch 2; its best (epoch 1) is restored at the end
    assert torch.load(path, weights_only=True)["step"] == 6
    resumed_weights = []
    resumed = run(resumed_weights, restore_best=False, resume=path)
    assert resumed.history == straight.history and stopped.step == 6
    assert all(torch.equal(v, trained[-1][k]) for k, v in resumed.model.state_dict().items())


def test_an_ema_checkpoint_holds_the_trained_weights_and_the_average_it_judged(tmp_path):
    trained = []
    X_val, y_val = make_data(64, seed=1)
    loop = train(lr=0.5, epochs=3, val_loader=(X_val, y_val), val_batch_size=64,
                 hooks=[loopy.ema(decay=0.9), weights_at_epochs(trained),
                        loopy.checkpoint(tmp_path / "best.pt", monitor="val_loss")])
    best = min(range(3), key=loop.history["val_loss"].__getitem__)
    state = torch.load(tmp_path / "best.pt", weights_only=True)
    assert all(torch.equal(v, trained[best][k]) for k, v in state["model"].items())
    model = make_mlp().eval()
    model.load_state_dict(state["hook_state"]["ema"]["average"], strict=False)
    with torch.no_grad():
        judged = F.cross_entropy(model(X_val), y_val).item()  # by hand
    assert judged == pytest.approx(loop.history["val_loss"][best], rel=1e-6)


def test_epoch_cannot_name_a_metric_as_csv_logger_and_log_to_add_it():
    message = fit_error(ValueError, metrics={"epoch": loopy.accuracy})
    assert message.startswith("metrics: 'epoch' cannot name a metric") and "pick another" in message


@pytest.mark.parametrize("ema_first", [True, False])
def test_of_ema_and_restore_best_the_hook_listed_first_applies_its_weights_last(ema_first):
    trained, averaged = [], []

    def average_at_end():  # ema's average, as validation used it, read before any teardown
        loop = yield "end"
        averaged.append({k: v.clone() for k, v in loop.val_model.state_dict().items()})
        yield "end"

    hooks = [loopy.ema(decay=0.9), loopy.early_stopping(patience=5, restore_best=True)]
    loop = train(lr=2.0, n=128, epochs=3, shuffle=True, seed=0, val_loader=make_data(64, seed=1),
                 hooks=(hooks if ema_first else hooks[::-1]) + [weights_at_epochs(trained),
                                                                 average_at_end()])
    best = min(range(3), key=loop.history["val_loss"].__getitem__)
    expected = averaged[0] if ema_first else trained[best]
    assert all(torch.equal(v, expected[k]) for k, v in loop.model.state_dict().items())
    assert not all(torch.equal(v, trained[best][k]) for k, v in averaged[0].items())


def scripted(name, values):
    """A hook adding a made-up metric ``name`` (declared at "start") with scripted values."""
    loop = yield "start"
    loop.metric_names.append(name)
    while True:
        loop = yield "epoch"
        loop.metrics[name] = values[loop.epoch]
        loop.history.setdefault(name, []).append(values[loop.epoch])


@pytest.mark.parametrize("name, values, stop_after, best", [
    ("top1_acc", [0.5, 0.9, 0.7, 0.6, 0.8], 4, 1),  # a score: higher is better
    ("map_50", [0.5, 0.9, 0.7, 0.6, 0.8], 4, 1),
    ("val_dice_loss", [0.5, 0.3, 0.4, 0.45, 0.1], 4, 1),  # the last known word decides
    ("error", [0.5, 0.3, 0.4, 0.45, 0.1], 4, 1),
    ("f1", [math.nan, 0.5, 0.6, math.nan, 0.55, 0.9], 5, 2),  # a NaN is never the best
])
def test_early_stopping_auto_mode_and_nan(name, values, stop_after, best):
    X, y = make_data(64)
    model = make_mlp()
    snapshots = []

    def snapshot():
        while True:
            loop = yield "epoch"
            snapshots.append(copy.deepcopy(loop.model.state_dict()))

    loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.5), (X, y),
                     epochs=len(values), progress=False,
                     hooks=[scripted(name, values), snapshot(),
                            loopy.early_stopping(name, patience=2, restore_best=True)])
    assert len(loop.history["loss"]) == stop_after
    assert f"(best {values[best]:.6g})" in loop.stop_reason
    assert all(torch.equal(snapshots[best][k], v) for k, v in model.state_dict().items())


def test_checkpoint_keeps_the_best_file_by_auto_mode_never_a_nan(tmp_path):
    X, y = make_data(64)
    model = make_mlp()
    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.5), (X, y),
              epochs=5, progress=False,
              hooks=[scripted("val_iou", [math.nan, 0.4, 0.7, 0.5, math.nan]),
                     scripted("val_rmse", [math.nan, 3.0, 2.0, 2.5, math.nan]),
                     loopy.checkpoint(tmp_path / "iou-{epoch}.pt", monitor="val_iou"),
                     loopy.checkpoint(tmp_path / "rmse-{epoch}.pt", monitor="val_rmse")])
    assert sorted(os.listdir(tmp_path)) == ["iou-3.pt", "rmse-3.pt"]


def test_checkpoint_on_a_real_accuracy_keeps_its_highest_epoch(tmp_path):
    X, y = make_data(96)
    model = make_mlp()
    loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.05),
                     (X, y), val_loader=(X[:48], y[:48]), epochs=6, progress=False,
                     metrics={"acc": loopy.accuracy},
                     hooks=[loopy.checkpoint(tmp_path / "best-{epoch}.pt", monitor="val_acc")])
    accuracies = loop.history["val_acc"]
    best = accuracies.index(max(accuracies))  # the first epoch with the highest accuracy
    assert accuracies.index(min(accuracies)) != best  # (the old mode="min" would keep that one)
    assert os.listdir(tmp_path) == [f"best-{best + 1}.pt"]


def test_a_monitor_that_cannot_exist_or_be_classified_fails_before_training():
    X, y = make_data(64)
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    log = []
    for hook, words in ((loopy.early_stopping("val_acc"), ["'val_acc'", "val_loader", "'lr'"]),
                        (loopy.checkpoint("x.pt", monitor="acc"), ["'acc'", "metric_names"]),
                        (loopy.early_stopping("lr"), ["mode='auto' cannot tell", "mode='max'"]),
                        (loopy.early_stopping("val_accc"), ["check its spelling"]),
                        (loopy.early_stopping(min_delta=-0.05), ["min_delta=-0.05", ">= 0"]),
                        (loopy.early_stopping(min_delta=math.nan), ["min_delta=nan"]),
                        (loopy.early_stopping(min_delta="0.1"), ["min_delta='0.1'"]),
                        (loopy.early_stopping(patience="3"), ["patience='3'", "int >= 0"]),
                        (loopy.early_stopping("val_loss", mode="best"), ["mode='best'"])):
        message = fit_error(ValueError, model=model, hooks=[recorder(log), hook],
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        assert all(word in message for word in words), message
    assert "batch" not in [event for _, event, *_ in log]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_metric_names_are_known_at_start_and_equal_the_epochs_metrics():
    torchmetrics = pytest.importorskip("torchmetrics")
    X, y = make_data(64)
    model = make_mlp()
    seen = []

    def names():
        seen.append(list((yield "start").metric_names))
        seen.append(list((yield "epoch").metrics))

    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
              val_loader=(X, y), nonfinite="skip", hooks=[names()], progress=False,
              metrics={"micro": torchmetrics.classification.MulticlassAccuracy(3),
                       "acc": loopy.accuracy})
    assert seen[0] == seen[1]


# --- checkpoint and resume: the same run, bit for bit ---

def resumable_run(path=None, epochs=4, stop_at_step=None, resume=None, seed=0, max_steps=None,
                  dropout=0.2, device="auto"):
    """A run that uses the RNG everywhere: shuffling, dropout, a per-epoch scheduler."""
    X, y = make_data(150)
    model = make_mlp(seed=seed, dropout=dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    hooks = [loopy.checkpoint(path)] if path else []
    if stop_at_step:
        hooks.insert(0, stop_when(stop_at_step))
    loop = train(model=model, optimizer=optimizer, loader=(X, y), batch_size=16, shuffle=True,
                 val_loader=(X[:50], y[:50]), metrics={"acc": loopy.accuracy}, epochs=epochs,
                 scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.7),
                 seed=None if resume else 123, hooks=hooks, resume=resume,
                 max_steps=max_steps, device=device)
    return model, loop


@pytest.mark.parametrize("stop_at_step", [20, 27, 36])  # an epoch boundary, mid-epoch, mid-epoch
def test_a_resumed_run_equals_the_straight_run_bit_for_bit(tmp_path, stop_at_step):
    straight, straight_loop = resumable_run()
    path = tmp_path / "run.pt"
    _, stopped = resumable_run(path, stop_at_step=stop_at_step)
    assert stopped.step == stop_at_step and stopped.stop_reason == "test stop"
    torch.manual_seed(999)  # the resumed run must not depend on the global RNG
    resumed, resumed_loop = resumable_run(path, resume=path, seed=5)
    assert same_weights(resumed, straight)
    assert resumed_loop.history == straight_loop.history and resumed_loop.step == 40


def test_a_run_stopped_by_max_steps_resumes_to_the_straight_run(tmp_path):
    straight, straight_loop = resumable_run()
    path = tmp_path / "run.pt"
    _, stopped = resumable_run(path, max_steps=13)
    assert stopped.step == 13 and len(stopped.history["loss"]) == 1
    resumed, resumed_loop = resumable_run(path, resume=path)
    assert same_weights(resumed, straight) and resumed_loop.history == straight_loop.history


def test_resuming_twice_from_the_final_checkpoint_trains_nothing_more(tmp_path):
    path = tmp_path / "run.pt"
    model, loop = resumable_run(path, epochs=2)
    again, loop_again = resumable_run(path, epochs=2, resume=path, seed=3)
    assert same_weights(model, again) and loop_again.history == loop.history


def test_resume_errors_name_the_file_and_the_mismatch(tmp_path):
    message = fit_error(FileNotFoundError, resume=tmp_path / "missing.pt")
    assert "missing.pt" in message and "no such file" in message
    message = fit_error(IsADirectoryError, resume=tmp_path)  # (the folder checkpoints go in)
    assert f"resume={str(tmp_path)!r} is a directory" in message and "like" in message
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    message = fit_error(ValueError, resume=tmp_path / "junk.pt")
    assert "junk.pt" in message and "corrupt" in message
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    message = fit_error(ValueError, resume=tmp_path / "other.pt")
    assert "not a loopy checkpoint" in message
    assert "model.load_state_dict(torch.load(" in message  # plain weights: load before fit
    path = tmp_path / "run.pt"
    resumable_run(path, epochs=1)
    wider = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    message = fit_error(ValueError, model=wider, resume=path)
    assert "different model" in message and "missing keys ['2.bias', '2.weight']" in message
    assert "unexpected keys ['3.bias', '3.weight']" in message
    assert "0.weight: (16, 8) in the file, (32, 8) in the model" in message


def test_a_malicious_checkpoint_cannot_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    torch.save({"format": "loopy-checkpoint/1", "model": Exploit()}, tmp_path / "evil.pt")
    message = fit_error(ValueError, resume=tmp_path / "evil.pt")
    assert "cannot be loaded" in message and not (tmp_path / "owned").exists()


@pytest.mark.slow
def test_torch_compile_trains_and_checkpoints_under_the_original_names(tmp_path):
    path = tmp_path / "compiled.pt"
    train(model=torch.compile(make_mlp()), hooks=[loopy.checkpoint(path)])
    state = torch.load(path, weights_only=True)
    assert set(state["model"]) == set(make_mlp().state_dict())
    loop = train(model=make_mlp(seed=3), epochs=2, resume=path, hooks=[loopy.checkpoint(path)])
    assert loop.step == 4
    compiled_again = torch.compile(make_mlp(seed=4))  # and a plain run's checkpoint resumes compiled
    loop = train(model=compiled_again, epochs=3, resume=path)
    assert loop.step == 6 and not same_weights(compiled_again._orig_mod, make_mlp(seed=4))


def resumed_pair(tmp_path, train, stop_at_step):
    """(straight, resumed): ``train(path, resume, hooks)`` run straight through, and run with a
    checkpoint, stopped at ``stop_at_step``, then resumed from that checkpoint."""
    straight = train(None, None, [])
    path = tmp_path / "run.pt"
    train(path, None, [stop_when(stop_at_step)])
    torch.manual_seed(999)  # the resumed run must not depend on the global RNG
    return straight, train(path, path, [])


def shuffled_run(make_model=make_mlp, metrics=None, epochs=3, **options):
    """A function (path, resume, hooks) -> (model, loop): shuffled, with validation, checkpoints
    when given a path (``options["every"]``), and ``options["hooks"]()`` (new for each run)."""
    def train(path, resume, hooks):
        X, y = make_data(96, features=64) if make_model is make_cnn else make_data(150)
        X = X.reshape(-1, 1, 8, 8) if make_model is make_cnn else X
        model = make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        own = options["hooks"]() if "hooks" in options else []
        checkpoint = [loopy.checkpoint(path, options.get("every", "epoch"))] if path else []
        hooks = hooks + (checkpoint + own if options.get("checkpoint_first") else own + checkpoint)
        loop = loopy.fit(model, F.cross_entropy, optimizer, (X, y), batch_size=16, shuffle=True,
                         val_loader=(X[:48], y[:48]), metrics=metrics() if metrics else None,
                         epochs=epochs, seed=None if resume else 123, hooks=hooks, resume=resume,
                         progress=False)
        return model, loop
    return train


def test_a_hooks_state_goes_through_a_mid_epoch_checkpoint_and_back(tmp_path):
    seen = []

    def loss_sum():  # the README's pattern: read your state at your first event
        loop = yield "start"
        state = loop.hook_state.setdefault("loss_sum", {"total": torch.zeros(()), "steps": []})
        seen.append(len(state["steps"]))
        while True:
            loop = yield "step"
            state["total"] += loop.loss
            state["steps"].append(loop.step)

    train = shuffled_run(hooks=lambda: [loss_sum()])
    (_, straight), (_, resumed) = resumed_pair(tmp_path, train, stop_at_step=14)  # mid-epoch 2
    assert seen == [0, 0, 14]  # the resumed hook found the 14 steps at "start"
    assert resumed.hook_state["loss_sum"]["steps"] == list(range(1, 31))
    assert torch.equal(resumed.hook_state["loss_sum"]["total"],
                       straight.hook_state["loss_sum"]["total"])
    saved = torch.load(tmp_path / "run.pt", weights_only=True)  # plain data
    assert saved["hook_state"]["loss_sum"]["steps"] == list(range(1, 31))


@pytest.mark.parametrize("name", ["MulticlassAccuracy", "MulticlassAUROC"])  # tensor, list states
def test_a_torchmetrics_metric_across_a_mid_epoch_resume_equals_the_straight_run(tmp_path, name):
    torchmetrics = pytest.importorskip("torchmetrics")
    options = {"thresholds": None} if name == "MulticlassAUROC" else {}
    metric = lambda: {"m": getattr(torchmetrics.classification, name)(3, **options)}
    train = shuffled_run(metrics=metric)
    (_, straight), (_, resumed) = resumed_pair(tmp_path, train, stop_at_step=14)
    assert resumed.history == straight.history  # the oracle: the run that never stopped
    assert resumed.history["m"][1] != straight.history["m"][0]  # (a real epoch-2 value)


class CountCorrect:
    """An update/compute/reset metric of loopy's own shape, with or without a state_dict."""
    def __init__(self):
        self.reset()

    def update(self, output, target):
        self.correct += int((output.argmax(1) == target).sum())
        self.count += len(target)

    def compute(self):
        return self.correct / self.count

    def reset(self):
        self.correct = self.count = 0


class CountCorrectWithState(CountCorrect):
    def state_dict(self):
        return {"correct": self.correct, "count": self.count}

    def load_state_dict(self, state):
        self.correct, self.count = state["correct"], state["count"]


def test_a_metric_object_with_a_state_dict_resumes_and_one_without_warns_at_the_save(tmp_path):
    metrics = lambda: {"with": CountCorrectWithState(), "without": CountCorrect()}
    train = shuffled_run(metrics=metrics)
    with pytest.warns(UserWarning) as warned:
        (_, straight), (_, resumed) = resumed_pair(tmp_path, train, stop_at_step=14)
    assert resumed.history["with"] == straight.history["with"]
    assert resumed.history["without"][1] != straight.history["without"][1]  # the documented loss
    messages = {str(w.message) for w in warned}
    assert messages == {"metrics['without'] (CountCorrect) has no state_dict(), so a checkpoint "
                        "in the middle of an epoch cannot hold its state: a run resumed from it "
                        "counts only the rest of that epoch; give it state_dict() and "
                        "load_state_dict()"}


def test_resuming_with_another_number_of_optimizers_is_refused(tmp_path):
    path = tmp_path / "gan.pt"
    gan_run(path, epochs=1)
    gan = make_gan()
    with pytest.raises(ValueError, match=r"holds the state of 2 optimizer\(s\), and this run has "
                                         r"1: resume with the optimizers"):
        loopy.fit(gan, None, torch.optim.SGD(gan.parameters()), gan_data(), step=gan_step,
                  resume=path)


def preemptible(loader=None, hooks=(), epochs=3, **options):
    """A run that draws random numbers everywhere (shuffling, dropout): 6 batches per epoch."""
    X, y = make_data(96)
    model = make_mlp(dropout=0.2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    in_memory = dict(batch_size=16, shuffle=True) if loader is None else {}  # (else an error)
    loop = loopy.fit(model, F.cross_entropy, optimizer, (X, y) if loader is None else loader,
                     list(hooks), epochs=epochs, seed=123, progress=False, **in_memory, **options)
    return model, loop


def same_saved(expected, got):
    return all(torch.equal(expected["model"][k], v) for k, v in got["model"].items()) and \
        expected["history"] == got["history"]


def test_resume_missing_ok_starts_afresh_and_resumes_once_the_file_exists(tmp_path):
    straight, straight_loop = preemptible()
    path = tmp_path / "run.pt"
    launch = dict(resume=path, resume_missing_ok=True)  # one command line for every launch
    _, first = preemptible(hooks=[stop_when(8), loopy.checkpoint(path)], **launch)
    assert first.step == 8 and path.exists()
    resumed, resumed_loop = preemptible(hooks=[loopy.checkpoint(path)], **launch)
    assert same_weights(resumed, straight) and resumed_loop.history == straight_loop.history
    message = fit_error(FileNotFoundError, resume=tmp_path / "missing.pt")  # without it: an error
    assert "missing.pt" in message and "resume_missing_ok=True" in message


@pytest.mark.parametrize("how", ["epochs", "early_stopping", "max_steps"])
def test_relaunching_a_finished_run_trains_nothing_and_rewrites_nothing(tmp_path, how):
    path = tmp_path / "run.pt"

    def launch():
        hooks = [loopy.checkpoint(path)]
        if how == "early_stopping":  # no epoch after the first improves by 10: stops after 3
            hooks.insert(0, loopy.early_stopping("loss", patience=2, min_delta=10.0))
        return preemptible(hooks=hooks, epochs=2 if how == "epochs" else 10, resume=path,
                           resume_missing_ok=True, max_steps=5 if how == "max_steps" else None)

    model, loop = launch()
    reason = {"epochs": "all epochs done", "max_steps": "reached max_steps=5",
              "early_stopping": "early stopping: loss did not improve for 2 epochs"}[how]
    assert torch.load(path, weights_only=True)["finished"].startswith(reason)
    content, modified = path.read_bytes(), os.stat(path).st_mtime_ns
    for _ in range(3):
        again, loop_again = launch()
        assert path.read_bytes() == content and os.stat(path).st_mtime_ns == modified
        assert same_weights(again, model) and loop_again.history == loop.history
        assert loop_again.step == loop.step == {"epochs": 12, "max_steps": 5,
                                                 "early_stopping": 18}[how]
    position = torch.load(path, weights_only=True)["position"]  # kept: 5 of epoch 1's batches
    assert (position and position["batches"]) == (5 if how == "max_steps" else None)


@pytest.mark.parametrize("event", ["batch", "backward"])
def test_save_from_a_batch_or_backward_hook_resumes_exactly(tmp_path, event):
    straight, straight_loop = preemptible(accumulate=2)  # 3 steps of 2 batches per epoch
    path = tmp_path / "run.pt"

    def save_and_stop():
        while True:
            loop = yield event
            if loop.step == 4:  # the batches of step 5 are in flight
                loop.save(path)
                loop.stop("saved")

    preemptible(hooks=[save_and_stop()], accumulate=2)
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 5 and saved["position"]["batches"] == 4  # written after its step
    resumed, resumed_loop = preemptible(accumulate=2, resume=path)
    assert same_weights(resumed, straight) and resumed_loop.history == straight_loop.history


@pytest.mark.parametrize("stop_at", [6, 8])  # an epoch boundary, mid-epoch
@pytest.mark.parametrize("owner", ["loader", "sampler"])
def test_a_loaders_or_samplers_own_generator_is_saved_and_restored(tmp_path, stop_at, owner):
    X, y = make_data(96)
    dataset = TensorDataset(X, y)

    def loader(seed):
        generator = torch.Generator().manual_seed(seed)
        if owner == "loader":
            return DataLoader(dataset, 16, shuffle=True, generator=generator)
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        return DataLoader(dataset, 16, sampler=sampler)

    straight, straight_loop = preemptible(loader(7))
    path = tmp_path / "run.pt"
    preemptible(loader(7), hooks=[stop_when(stop_at), loopy.checkpoint(path)])
    resumed, resumed_loop = preemptible(loader(999), resume=path)  # another seed: restored
    assert same_weights(resumed, straight) and resumed_loop.history == straight_loop.history


class EpochSeededSampler(torch.utils.data.RandomSampler):
    """Reseeds its own generator in set_epoch (a sampler's other per-epoch shuffle)."""
    def set_epoch(self, epoch):
        self.generator.manual_seed(100 + epoch)


def test_a_samplers_set_epoch_sees_its_restored_generator_after_a_mid_epoch_resume(tmp_path):
    X, y = make_data(96)
    loader = lambda seed: DataLoader(TensorDataset(X, y), 16, sampler=EpochSeededSampler(
        TensorDataset(X, y), generator=torch.Generator().manual_seed(seed)))
    straight, straight_loop = preemptible(loader(7))
    path = tmp_path / "run.pt"
    preemptible(loader(7), hooks=[stop_when(8), loopy.checkpoint(path)])  # mid-epoch 2
    resumed, resumed_loop = preemptible(loader(999), resume=path)
    assert same_weights(resumed, straight) and resumed_loop.history == straight_loop.history


class StatefulBatches:
    """A loader that saves its own position, as torchdata's StatefulDataLoader does."""

    def __init__(self, X, y, batch_size=16):
        self.X, self.y, self.batch_size = X, y, batch_size
        self.next = self.yielded = 0

    def __len__(self):
        return -(-len(self.X) // self.batch_size)

    def __iter__(self):
        start, self.next = self.next, 0  # a loaded state continues there, once
        for index in range(start, len(self)):
            self.next, self.yielded = index + 1, self.yielded + 1
            rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
            yield self.X[rows], self.y[rows]
        self.next = 0

    def state_dict(self):
        return {"next": self.next}

    def load_state_dict(self, state):
        self.next = state["next"]


def test_a_stateful_loader_is_saved_and_restored_through_its_own_state_dict(tmp_path):
    X, y = make_data(96)
    straight, straight_loop = preemptible(StatefulBatches(X, y))
    path = tmp_path / "run.pt"
    preemptible(StatefulBatches(X, y), hooks=[stop_when(8), loopy.checkpoint(path)])
    assert torch.load(path, weights_only=True)["loader"] == {"next": 2}
    loader = StatefulBatches(X, y)
    resumed, resumed_loop = preemptible(loader, resume=path)
    assert loader.yielded == 4 + 6  # the rest of epoch 2, then epoch 3: nothing replayed
    assert same_weights(resumed, straight) and resumed_loop.history == straight_loop.history


@pytest.mark.parametrize("stop_at", [6, 8])  # an epoch boundary, mid-epoch
def test_persistent_workers_resume_exactly_and_warn_about_their_random_state(tmp_path, stop_at):
    X, y = make_data(96)
    loaders = []

    def loader():
        loaders.append(DataLoader(TensorDataset(X, y), 16, shuffle=True, num_workers=1,
                                  persistent_workers=True))
        return loaders[-1]

    straight, straight_loop = preemptible(loader())
    path = tmp_path / "run.pt"
    preemptible(loader(), hooks=[stop_when(stop_at), loopy.checkpoint(path)])
    with pytest.warns(UserWarning, match="persistent_workers=True.*random augmentation in them"):
        resumed, resumed_loop = preemptible(loader(), resume=path)
    assert same_weights(resumed, straight) and resumed_loop.history == straight_loop.history
    for each in loaders:  # their workers end now: ended by the garbage collector (fit's loop
        each._iterator._shutdown_workers()  # holds them in reference cycles), 5 s each


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, X, y):
        self.X, self.y, self.loaded = X, y, 0

    def __len__(self):
        return len(self.X)

    def __getitem__(self, index):
        self.loaded += 1
        return self.X[index], self.y[index]


def test_a_resume_at_90_percent_of_an_epoch_loads_only_the_last_10_percent(tmp_path):
    X, y = make_data(100)
    straight, straight_loop = preemptible(DataLoader(CountingDataset(X, y), 10, shuffle=True),
                                          epochs=1)
    path = tmp_path / "run.pt"
    preemptible(DataLoader(CountingDataset(X, y), 10, shuffle=True), epochs=1,
                hooks=[stop_when(9), loopy.checkpoint(path)])
    dataset = CountingDataset(X, y)
    resumed, resumed_loop = preemptible(DataLoader(dataset, 10, shuffle=True), epochs=1,
                                        resume=path)
    assert dataset.loaded == 10  # (a replay of the epoch loaded all 100)
    assert same_weights(resumed, straight) and resumed_loop.history == straight_loop.history


def test_checkpoint_temporary_files_are_unique_short_and_a_dead_saves_are_removed(tmp_path,
                                                                                 monkeypatch):
    import fcntl
    (tmp_path / ".loopy-killed.tmp").write_bytes(b"half a checkpoint")  # a save killed mid-way
    live = open(tmp_path / ".loopy-live.tmp", "wb")  # another process's save, in progress
    fcntl.flock(live, fcntl.LOCK_EX)
    names, save = [], torch.save
    monkeypatch.setattr(torch, "save", lambda state, file: names.append(
        os.readlink(f"/proc/self/fd/{file.fileno()}")) or save(state, file))
    path = tmp_path / ("x" * 245 + ".pt")  # a legal 248-character name
    preemptible(hooks=[loopy.checkpoint(path)], epochs=2)
    live.close()
    assert sorted(os.listdir(tmp_path)) == [".loopy-live.tmp", path.name]
    assert len(set(names)) == len(names) == 3  # 2 epochs and "end"
    assert all(os.path.dirname(name) == str(tmp_path) and
               re.fullmatch(r"\.loopy-\w{8}\.tmp", os.path.basename(name)) for name in names)


def test_only_epoch_and_step_are_path_fields_and_keep_holds_across_a_resume(tmp_path):
    path = tmp_path / "runs{a}" / "ckpt-{epoch}-{epcoh}.pt"  # other braces are literal
    preemptible(hooks=[loopy.checkpoint(path, keep=2)])
    directory = tmp_path / "runs{a}"
    assert sorted(os.listdir(directory)) == ["ckpt-2-{epcoh}.pt", "ckpt-3-{epcoh}.pt"]
    (directory / "ckpt-best.pt").write_bytes(b"")  # not one of the template's files
    preemptible(hooks=[loopy.checkpoint(path, keep=2)], epochs=5, resume=directory /
                "ckpt-3-{epcoh}.pt")
    assert sorted(os.listdir(directory)) == ["ckpt-4-{epcoh}.pt", "ckpt-5-{epcoh}.pt",
                                             "ckpt-best.pt"]


def test_a_full_disk_names_the_path_and_the_space_and_keeps_the_previous_file(tmp_path,
                                                                             monkeypatch):
    import errno
    path = tmp_path / "run.pt"
    save = torch.save

    def full_disk_after_the_first(state, file):
        if path.exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        save(state, file)

    monkeypatch.setattr(torch, "save", full_disk_after_the_first)
    with pytest.raises(OSError) as raised:
        preemptible(hooks=[loopy.checkpoint(path)])
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC and str(path) in message
    assert re.search(r"needs about [\d,]+ bytes, and [\d,]+ bytes are free", message)
    assert "previous file is intact" in message and os.listdir(tmp_path) == ["run.pt"]
    assert torch.load(path, weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("where", ["under a file", "a directory", "a name too long"])
def test_an_unwritable_or_invalid_checkpoint_path_fails_before_training(tmp_path, where):
    (tmp_path / "file").write_text("")
    (tmp_path / "directory").mkdir()
    path = {"under a file": tmp_path / "file" / "run.pt", "a directory": tmp_path / "directory",
            "a name too long": tmp_path / ("x" * 300 + ".pt")}[where]
    steps = []

    def count():
        while True:
            steps.append((yield "step").step)

    with pytest.raises(ValueError) as raised:
        preemptible(hooks=[count(), loopy.checkpoint(path)])
    message = str(raised.value)
    assert f"checkpoint(path={str(path)!r}) cannot be written" in message
    assert "writable directory" in message and steps == []


def test_resuming_into_another_optimizer_or_scheduler_or_a_partial_file_says_what_differs(
        tmp_path):
    path = tmp_path / "run.pt"
    preemptible(hooks=[loopy.checkpoint(path)], epochs=1)  # Adam, no scheduler
    message = fit_error(ValueError, resume=path)  # into SGD
    assert "holds the state of optimizer Adam, but fit got optimizer=SGD" in message
    assert "resume with the optimizer the run was saved with" in message
    X, y = make_data(96)
    model = make_mlp()
    optimizer = torch.optim.Adam(model.parameters())
    message = fit_error(ValueError, model=model, optimizer=optimizer, resume=path,
                        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1))
    assert "holds the state of 0 scheduler(s), but fit got scheduler=" in message
    assert "StepLR" in message and "resume with the scheduler the run was saved with" in message
    state = torch.load(path, weights_only=True)
    del state["rng"], state["history"]
    torch.save(state, tmp_path / "partial.pt")
    message = fit_error(ValueError, model=model, optimizer=optimizer,
                        resume=tmp_path / "partial.pt")
    assert "lacks the entries ['history', 'rng']" in message and "another checkpoint" in message


@pytest.mark.parametrize("change", ["batch_size", "fewer batches", "no shuffle", "processes"])
def test_a_mid_epoch_position_that_no_longer_fits_the_data_is_refused(tmp_path, change):
    X, y = make_data(96)
    path = tmp_path / "run.pt"
    preemptible(hooks=[stop_when(8), loopy.checkpoint(path)])
    if change == "processes":  # as if saved by 2 processes
        state = torch.load(path, weights_only=True)
        state["position"]["data"]["processes"] = 2
        torch.save(state, path)
    loader = {"batch_size": DataLoader(TensorDataset(X, y), 32, shuffle=True),
              "fewer batches": DataLoader(TensorDataset(X[:64], y[:64]), 16, shuffle=True),
              "no shuffle": DataLoader(TensorDataset(X, y), 16),
              "processes": (X, y)}[change]
    with pytest.raises(ValueError) as raised:
        preemptible(loader, resume=path)
    message = str(raised.value)
    assert f"resume={str(path)!r} stopped in the middle of epoch 2, after 2 batches" in message
    assert {"batch_size": "batch_size 16 then, 32 now", "fewer batches": "batches 6 then, 4 now",
            "no shuffle": "shuffle True then, False now",
            "processes": "processes 2 then, 1 now"}[change] in message
    assert "same loader and number of processes" in message and "between epochs" in message


def test_at_an_epoch_boundary_a_new_batch_size_and_more_epochs_keep_working(tmp_path):
    X, y = make_data(96)
    path = tmp_path / "run.pt"
    preemptible(hooks=[loopy.checkpoint(path)], epochs=2)
    _, loop = preemptible(DataLoader(TensorDataset(X, y), 32, shuffle=True), epochs=4,
                          resume=path)
    assert loop.step == 12 + 3 + 3 and len(loop.history["loss"]) == 4


def test_fp16_steps_that_the_grad_scaler_skips_are_not_steps(tmp_path):
    X, y = make_data(96)  # 6 batches per epoch, 2 epochs; batches 2 and 7 get inf gradients
    batches = [(X[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)]
    poisoned = {2, 7}

    def build():
        model = make_mlp()
        calls = []
        model[0].weight.register_hook(lambda grad: grad * math.inf
                                      if len(calls) in poisoned else grad)
        model.register_forward_hook(lambda *_: calls.append(1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 3, gamma=0.5)

    # the oracle: the hand-written fp16 loop, stepping the scheduler after applied steps only
    model, optimizer, scheduler = build()
    scaler, applied = torch.amp.GradScaler("cpu"), 0
    for _ in range(2):
        for x, target in batches:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), target)
            scaler.scale(loss).backward()
            before = optimizer.state_dict()["state"], scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            if scaler.get_scale() >= before[1]:  # the scale drops exactly when a step is skipped
                applied += 1
                scheduler.step()
    assert applied == 10

    got, optimizer, scheduler = build()
    steps = []

    def count():
        while True:
            steps.append((yield "step").step)

    import warnings
    path = tmp_path / "ckpt-{step}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a scheduler steps before the optimizer
        loop = loopy.fit(got, F.cross_entropy, optimizer, batches, [count(),
                         loopy.checkpoint(path, every=4, keep=5)], epochs=2, precision="fp16",
                         scheduler=scheduler, scheduler_interval="step", progress=False)
    assert same_weights(got, model) and loop.step == 10 and steps == list(range(1, 11))
    assert scheduler.last_epoch == 10 and optimizer.param_groups[0]["lr"] == 0.1 * 0.5 ** 3
    assert sorted(os.listdir(tmp_path)) == ["ckpt-10.pt", "ckpt-4.pt", "ckpt-5.pt", "ckpt-8.pt"]
    model, optimizer, scheduler = build()
    loop = loopy.fit(model, F.cross_entropy, optimizer, batches, epochs=2, precision="fp16",
                     max_steps=4, progress=False)
    assert loop.step == 4 and loop.batch_index == 4  # batches 0-4: one of them was skipped


def test_hook_state_that_a_resume_cannot_read_is_refused_at_the_save(tmp_path):
    import numpy as np

    def keep(value):
        loop = yield "start"
        loop.hook_state["mine"] = {"best": value}
        while True:
            yield "epoch"

    for value, shown in [(np.float64(0.5), "(type float64)"), (lambda: 1, "function")]:
        with pytest.raises(TypeError) as raised:
            train(hooks=[keep(value), loopy.checkpoint(tmp_path / "bad.pt")])
        message = str(raised.value)
        assert message.startswith("loop.hook_state['mine']['best'] is ") and shown in message
        assert "float(x)" in message and not os.path.exists(tmp_path / "bad.pt")

    # what torch.load(weights_only=True) reads back passes, and comes back equal
    fine = {"t": (1, 2.5, True, None, "s"), "n": [torch.ones(2)], 3: make_mlp().state_dict()}
    train(hooks=[keep(fine), loopy.checkpoint(tmp_path / "ok.pt")])
    back = torch.load(tmp_path / "ok.pt", weights_only=True)["hook_state"]["mine"]["best"]
    assert back["t"] == fine["t"] and torch.equal(back["n"][0], fine["n"][0])
    assert all(torch.equal(v, fine[3][k]) for k, v in back[3].items())


def test_a_hook_listed_before_checkpoint_has_its_state_resumed_exactly(tmp_path):
    """The README's count_steps, before checkpoint(every=n) as the README says to list it."""
    def count_steps():
        loop = yield "start"
        state = loop.hook_state.setdefault("count_steps", {"steps": 0})
        while True:
            loop = yield "step"
            state["steps"] += 1

    def crash_at(step):
        while True:
            if (yield "step").step == step:
                raise RuntimeError("simulated crash")

    path = tmp_path / "run.pt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(epochs=3, hooks=[count_steps(), loopy.checkpoint(path, every=5), crash_at(12)],
              n=128)
    loop = train(epochs=3, hooks=[count_steps(), loopy.checkpoint(path, every=5)], n=128,
                 resume=path)
    assert loop.step == 12 and loop.hook_state["count_steps"]["steps"] == 12  # 3 epochs of 4
    assert "before `loopy.checkpoint`" in open(README).read()


def test_a_nonfinite_loss_never_reaches_a_checkpoint_file(tmp_path):
    X, y = make_data(96)  # batches of 8: 12 steps an epoch; the loss is NaN at step 7
    calls = []

    def loss_fn(output, target):
        calls.append(1)
        loss = F.cross_entropy(output, target)
        return loss * math.nan if len(calls) == 7 else loss

    model = make_mlp()
    with pytest.raises(FloatingPointError, match="optimizer step 7"):
        loopy.fit(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                  batch_size=8, hooks=[loopy.checkpoint(tmp_path / "run.pt", every=2)],
                  progress=False)
    by_hand = make_mlp()  # the oracle: six steps by hand, the last save before the NaN
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.1)
    for _, (x, target) in zip(range(6), tensor_loader(X, y, batch_size=8)):
        F.cross_entropy(by_hand(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    assert saved["step"] == 6
    assert all(torch.equal(saved["model"][k], v) for k, v in by_hand.state_dict().items())


def test_a_nonfinite_loss_before_a_stop_is_raised_at_the_save_at_end(tmp_path):
    X, y = make_data(96)
    calls = []

    def loss_fn(output, target):
        calls.append(1)
        loss = F.cross_entropy(output, target)
        return loss * math.nan if len(calls) == 3 else loss

    def stop_soon():
        while True:
            loop = yield "step"
            if loop.step == 5:
                loop.stop("enough")

    model = make_mlp()
    with pytest.raises(FloatingPointError, match="optimizer step 3"):
        loopy.fit(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                  batch_size=8, hooks=[stop_soon(), loopy.checkpoint(tmp_path / "run.pt")],
                  progress=False)
    assert os.listdir(tmp_path) == []


def test_history_stays_a_table_when_a_resume_adds_or_drops_metrics(tmp_path):
    X, y = make_data(64)
    extra = dict(metrics={"acc": loopy.accuracy}, val_loader=(X, y))

    def run(epochs, resume=None, **options):
        model = make_mlp()
        return loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                         (X, y), epochs=epochs, resume=resume, progress=False,
                         hooks=[loopy.checkpoint(tmp_path / f"{epochs}.pt")], **options)

    straight = run(4, **extra).history  # the oracle: metrics and validation change no weights
    run(2)
    added = run(4, resume=tmp_path / "2.pt", **extra).history  # adds acc and val_*
    dropped = run(6, resume=tmp_path / "4.pt").history  # drops them again
    for history in (added, dropped):
        assert len({len(values) for values in history.values()}) == 1, history
    assert set(added) == set(straight) and added["loss"] == straight["loss"]
    for name in ("acc", "val_loss", "val_acc"):
        assert all(math.isnan(v) for v in added[name][:2] + dropped[name][4:])
        assert added[name][2:] == straight[name][2:] == dropped[name][2:4]


def test_a_resume_matches_several_optimizers_by_name_not_by_position(tmp_path):
    X, y = gan_data(96)

    def run(optimizers_of, resume=None, hooks=()):
        gan = make_gan()
        optimizers = optimizers_of(gan)
        loop = loopy.fit(gan, None, optimizers, (X, y), list(hooks), batch_size=16, epochs=2,
                         step=gan_step, seed=None if resume else 3, resume=resume,
                         progress=False)
        return gan, optimizers, loop

    straight, _, _ = run(gan_optimizers)
    path = tmp_path / "gan.pt"
    run(gan_optimizers, hooks=[stop_when(4), loopy.checkpoint(path, every=1)])
    # the same names in the other order: each Adam gets its own moments back
    reordered = lambda gan: dict(reversed(list(gan_optimizers(gan).items())))
    resumed, optimizers, _ = run(reordered, resume=path)
    assert list(optimizers) == ["generator", "discriminator"]
    assert same_weights(resumed, straight)
    # other names, or a list of them in another order: refused before training
    renamed = lambda gan: {"G": gan_optimizers(gan)["generator"],
                           "D": gan_optimizers(gan)["discriminator"]}
    with pytest.raises(ValueError) as raised:
        run(renamed, resume=path)
    assert "holds optimizers named ['discriminator', 'generator'], but fit got ['G', 'D']" \
        in str(raised.value)
    swapped = lambda gan: [gan_optimizers(gan)["generator"], gan_optimizers(gan)["discriminator"]]
    torch.save(dict(torch.load(path, weights_only=True), optimizer_names=[0, 1]), path)
    with pytest.raises(ValueError) as raised:
        run(swapped, resume=path)
    assert "the saved state of optimizer 0 is for parameters of shape" in str(raised.value)
    assert "give the optimizers in the order (or with the names) they had" in str(raised.value)


# --- a training process killed or interrupted (Ctrl+C) resumes to the straight run ---

TRAINING_SCRIPT = """
import sys, time, torch, loopy
torch.set_num_threads(1)
path, epochs, resume, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume", sys.argv[4]
pause = float(sys.argv[5])  # seconds after each step, so that a signal lands inside the epoch
torch.manual_seed(0)
X, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                            torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

def slow_and_chatty():
    while True:
        loop = yield "step"
        print("step", loop.step, flush=True)
        time.sleep(pause)

hooks = ([loopy.checkpoint(path, every=3)] if path != "-" else []) + [slow_and_chatty()]
loop = loopy.fit(model, torch.nn.functional.cross_entropy, optimizer, (X, y), batch_size=32,
                 shuffle=True, epochs=epochs, seed=1, hooks=hooks, progress=False,
                 resume=path if resume and path != "-" else None)
torch.save({"model": model.state_dict(), "history": loop.history}, out)
print("stop_reason", loop.stop_reason, flush=True)
"""


def run_training(spawn, tmp_path, path, epochs, resume, out, pause=0.02):
    """TRAINING_SCRIPT, started in a fresh process by ``spawn`` (see spawner)."""
    script = tmp_path / "train.py"
    script.write_text(TRAINING_SCRIPT)
    return spawn(script, path, epochs, "resume" if resume else "fresh", out, pause)


def wait_for_step(process, step):
    for line in process.stdout:
        if line.startswith("step") and int(line.split()[1]) >= step:
            return


@pytest.fixture(scope="session")
def straight_training(spawner, tmp_path_factory):
    """A function that returns the weights and history of TRAINING_SCRIPT run straight through
    its 2 epochs. The run starts at once and goes on beside the test (on a second core) until
    the test asks for its result."""
    tmp_path = tmp_path_factory.mktemp("straight")
    process = run_training(spawner, tmp_path, "-", 2, False, tmp_path / "straight.pt", pause=0)

    @functools.cache
    def result():
        _, errors = process.communicate(timeout=300)
        assert process.returncode == 0, errors
        return torch.load(tmp_path / "straight.pt", weights_only=True)

    yield result
    process.kill()  # (a no-op once it has ended)
    process.communicate()


@pytest.mark.slow
def test_a_run_killed_at_random_moments_resumes_to_the_same_weights(spawner, tmp_path,
                                                                   straight_training):
    import random
    path = tmp_path / "run.pt"
    chooser = random.Random()
    for attempt in range(3):
        process = run_training(spawner, tmp_path, path, 2, attempt > 0, tmp_path / "killed.pt")
        wait_for_step(process, 3 * attempt + 3)  # a checkpoint exists, then a random moment
        time.sleep(chooser.uniform(0.0, 0.3))
        process.kill()
        process.wait()
        assert torch.load(path, weights_only=True)["format"] == "loopy-checkpoint/1"
    process = run_training(spawner, tmp_path, path, 2, True, tmp_path / "resumed.pt", pause=0)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    expected = straight_training()
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert all(torch.equal(expected["model"][k], v) for k, v in got["model"].items())
    assert got["history"] == expected["history"]


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_says_how_to_resume(spawner, tmp_path,
                                                              straight_training):
    path = tmp_path / "run.pt"
    process = run_training(spawner, tmp_path, path, 2, False, tmp_path / "interrupted.pt")
    wait_for_step(process, 5)
    process.send_signal(signal.SIGINT)
    output, errors = process.communicate(timeout=300)
    assert process.returncode == 0, errors
    assert "stop_reason interrupted by Ctrl+C" in output
    assert "training interrupted by Ctrl+C" in errors and f"resume={str(path)!r}" in errors
    interrupted = torch.load(tmp_path / "interrupted.pt", weights_only=True)
    assert interrupted["history"] == {}  # stopped inside the first epoch, which is not recorded
    assert torch.load(path, weights_only=True)["position"]["batches"] < 16
    process = run_training(spawner, tmp_path, path, 2, True, tmp_path / "resumed.pt", pause=0)
    assert process.wait(timeout=300) == 0
    expected = straight_training()
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert all(torch.equal(expected["model"][k], v) for k, v in got["model"].items())


def test_ctrl_c_in_a_manual_step_stops_after_its_updates_and_resumes_exactly(tmp_path):
    X, y = gan_data(64)
    straight = make_gan()
    loopy.fit(straight, None, gan_optimizers(straight), (X, y), batch_size=16, shuffle=True,
              epochs=2, step=gan_step, seed=1, progress=False)

    def interrupted_step(model, batch, loop):
        numbers = gan_step(model, batch, loop)
        if loop.step == 2 and not (tmp_path / "run.pt").exists():
            os.kill(os.getpid(), signal.SIGINT)  # during the 3rd batch: it finishes first
        return numbers

    gan = make_gan()
    with pytest.warns(UserWarning, match=r"interrupted by Ctrl\+C in epoch 1, after step 3; "
                                         r"resume with"):
        loop = loopy.fit(gan, None, gan_optimizers(gan), (X, y),
                         [loopy.checkpoint(tmp_path / "run.pt")], batch_size=16, shuffle=True,
                         epochs=2, step=interrupted_step, seed=1, progress=False)
    assert loop.step == 3 and loop.history == {}
    gan = make_gan(seed=5)
    loopy.fit(gan, None, gan_optimizers(gan), (X, y), batch_size=16, shuffle=True, epochs=2,
              step=gan_step, resume=tmp_path / "run.pt", progress=False)
    assert same_weights(gan, straight)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preemption_signal_saves_at_that_step_exits_128_plus_it_and_resumes_exactly(
        spawner, tmp_path, signum, straight_training):
    path = tmp_path / "run.pt"
    process = run_training(spawner, tmp_path, path, 2, False, tmp_path / "interrupted.pt")
    wait_for_step(process, 5)
    process.send_signal(signum)
    output, errors = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, errors  # 143 for SIGTERM, 138 for SIGUSR1
    assert f"training interrupted by {signal.Signals(signum).name}" in errors
    assert "stop_reason" not in output  # the process ended inside fit
    last_step = max([5] + [int(line.split()[1]) for line in output.splitlines()
                           if line[:4] == "step"])  # (wait_for_step read up to step 5)
    saved = torch.load(path, weights_only=True)  # taken at "end", not at an every=3 step
    assert saved["step"] == last_step == saved["position"]["batches"] and last_step < 16
    assert saved["finished"] is None
    process = run_training(spawner, tmp_path, path, 2, True, tmp_path / "resumed.pt", pause=0)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    assert same_saved(straight_training(), torch.load(tmp_path / "resumed.pt", weights_only=True))


# rank 0 writes the result; the straight run is a scenario of launches
TORCHRUN_TRAINING_SCRIPT = TRAINING_SCRIPT.replace("torch.save({",
                                                   "if loop.rank == 0: torch.save({")


def run_torchrun(tmp_path, path, resume, out, pause):
    """TORCHRUN_TRAINING_SCRIPT under torchrun with 2 processes."""
    script = tmp_path / "train_ddp.py"
    script.write_text(TORCHRUN_TRAINING_SCRIPT)
    return subprocess.Popen(command(2) + [str(script), str(path), "2",
                             "resume" if resume else "fresh", str(out), str(pause)], cwd=HERE,
                            env=cpu_env(PYTHONPATH=HERE, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def sigterm_to_torchrun(tmp_path_factory):
    """A function that returns what TORCHRUN_TRAINING_SCRIPT left when torchrun got a SIGTERM
    after step 3 (its exit code, the files in its folder, the checkpoint) and what its resumed
    run returned (exit code, stdout, stderr, and the file of its result). It all runs in a
    thread that starts at once (see start_launches_first)."""
    tmp_path = tmp_path_factory.mktemp("sigterm")
    path = tmp_path / "run.pt"

    def interrupt_and_resume():
        # (a pause of 0.3 s after each step: on a busy machine too, the signal that torchrun
        # forwards lands inside the first epoch)
        process = run_torchrun(tmp_path, path, False, tmp_path / "interrupted.pt", pause=0.3)
        wait_for_step(process, 3)
        process.send_signal(signal.SIGTERM)  # torchrun forwards it to both processes
        process.communicate(timeout=120)  # no hang
        files, saved = sorted(os.listdir(tmp_path)), torch.load(path, weights_only=True)
        resumed = run_torchrun(tmp_path, path, True, tmp_path / "resumed.pt", pause=0)
        return process.returncode, files, saved, finished(resumed), tmp_path / "resumed.pt"

    return in_background(interrupt_and_resume)


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_once_with_every_ranks_sums_and_resumes_exactly(
        sigterm_to_torchrun, launches):
    code, files, saved, (resumed_code, _, errors), resumed = sigterm_to_torchrun()
    assert code != 0 and "interrupted.pt" not in files
    assert files == ["run.pt", "train_ddp.py"]
    position = saved["position"]  # inside the first epoch of 8 batches per process
    assert 3 <= saved["step"] == position["batches"] < 8 and position["data"]["processes"] == 2
    sums = [meters["loss"]["values"] for meters in position["meters"]]  # each process's own
    assert len(sums) == 2 and not all(torch.equal(a, b) for a, b in zip(*sums))
    assert resumed_code == 0, errors[-3000:]
    expected = torch.load(scenario(launches, 2, "straight") / "straight.pt",
                          weights_only=True)
    assert same_saved(expected, torch.load(resumed, weights_only=True))


@pytest.mark.parametrize("exit_on_signal", [True, False])
def test_sigterm_in_process_stops_after_the_step_then_exits_or_returns(exit_on_signal):
    def terminate_at_step_3():
        while True:
            loop = yield "step"
            if loop.step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
    with pytest.warns(UserWarning, match="interrupted by SIGTERM in epoch 1, after step 3"):
        if exit_on_signal:
            with pytest.raises(SystemExit) as raised:
                preemptible(hooks=[terminate_at_step_3()], exit_on_signal=True)
            assert raised.value.code == 143
        else:
            _, loop = preemptible(hooks=[terminate_at_step_3()], exit_on_signal=False)
            assert loop.step == 3 and loop.stop_reason == "interrupted by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


# --- torchrun: multi-process training on torch.distributed (gloo on CPU) ---

DISTRIBUTED_SCRIPT = """
import os, sys, torch, loopy
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.set_num_threads(1)
modes, out = sys.argv[1].split(","), sys.argv[2]
batch_size = int(sys.argv[3]) if len(sys.argv) > 3 else 8
generator = torch.Generator().manual_seed(0)
X = torch.randn(96, 8, generator=generator)
y = (X[:, 0] > 0).long()
rank = int(os.environ.get("RANK", 0))

def stop_on_rank_1():
    while True:
        loop = yield "step"
        if loop.rank == 1 and loop.step == 5:
            loop.stop("rank 1 had enough")

def crash_on_rank_1():
    loop = yield "step"
    if loop.rank == 1:
        raise RuntimeError("rank 1 crashed")

for mode in modes:  # one fit after another in the same processes and process group
    os.makedirs(os.path.join(out, mode), exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = []
    if mode == "stop":
        hooks = [stop_on_rank_1(), loopy.checkpoint(os.path.join(out, mode, "run.pt"))]
    if mode == "crash":
        hooks = [crash_on_rank_1()]
    loop = loopy.fit(model, F.cross_entropy, optimizer, DataLoader(TensorDataset(X, y), batch_size),
                     val_loader=DataLoader(TensorDataset(X[:30], y[:30]), 7), epochs=3,
                     accumulate=2 if mode == "accumulate" else 1,
                     metrics={"acc": loopy.accuracy}, hooks=hooks, progress=False)
    results = loopy.evaluate(model, (X, y), F.cross_entropy, {"acc": loopy.accuracy})
    torch.save({"model": model.state_dict(), "history": loop.history, "step": loop.step,
                "stop_reason": loop.stop_reason, "evaluate": results,
                "world_size": loop.world_size}, os.path.join(out, mode, f"rank{rank}.pt"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "accumulate"])
def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(launches, mode):
    rank0, rank1 = rank_results(launches, 2, "world-2", mode)
    (single,) = rank_results(launches, 1, "world-1", mode)
    assert rank0["world_size"] == 2 and single["world_size"] == 1
    assert rank0["history"] == rank1["history"] and rank0["evaluate"] == rank1["evaluate"]
    for name, weights in single["model"].items():  # tolerance: float sums in another order
        torch.testing.assert_close(rank0["model"][name], weights, rtol=1e-5, atol=1e-6)
        assert torch.equal(rank0["model"][name], rank1["model"][name])
    for name in ("loss", "acc", "val_loss", "val_acc"):
        assert rank0["history"][name] == pytest.approx(single["history"][name], rel=1e-5)
    assert rank0["evaluate"] == pytest.approx(single["evaluate"], rel=1e-5)


@pytest.mark.slow
def test_a_stop_on_one_rank_stops_both_and_its_mid_epoch_checkpoint_needs_two_processes(
        launches):
    rank0, rank1 = rank_results(launches, 2, "world-2", "stop")
    out = scenario(launches, 2, "world-2") / "stop"
    assert rank0["step"] == rank1["step"] == 5
    assert rank0["stop_reason"] == "stopped by another process"
    assert rank1["stop_reason"] == "rank 1 had enough"
    assert sorted(os.listdir(out)) == ["rank0.pt", "rank1.pt", "run.pt"]
    saved = torch.load(out / "run.pt", weights_only=True)
    assert all(torch.equal(rank0["model"][k], v) for k, v in saved["model"].items())
    assert saved["position"]["batches"] == 5  # 5 of the 6 batches of each rank's first epoch
    X = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with pytest.raises(ValueError, match="processes 2 then, 1 now"):  # (issue 12: refused)
        train(model=model, loader=(X, (X[:, 0] > 0).long()), batch_size=16, epochs=2,
              resume=out / "run.pt")


@pytest.mark.slow
def test_an_error_on_one_rank_ends_the_whole_run_instead_of_hanging(launches):
    _, code, stderr, ended = launches(2)
    assert code != 0 and "rank 1 crashed" in stderr, stderr[-3000:]
    started = float(re.search(r"--- scenario crash starts at ([\d.]+)", stderr).group(1))
    assert ended - started < 120  # torchrun stopped the other process


TORCHRUN_13_SCRIPT = """import os, sys, torch, loopy
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset, SubsetRandomSampler
torch.set_num_threads(1)
mode, out = sys.argv[1], sys.argv[2]
rank = int(os.environ.get("RANK", 0))
X = torch.randn(41, 8, generator=torch.Generator().manual_seed(0))
y = (X[:, 0] > 0).long()
data = TensorDataset(X, y)
result = {}


class Errors:  # a plain update/compute/reset metric object
    def reset(self):
        self.count = 0

    def update(self, output, target):
        self.count += int((output.argmax(1) != target).sum())

    def compute(self):
        return self.count


class Seen(torch.nn.Module):  # an MLP that remembers which rows it saw, and an unused layer
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 2))
        self.unused = torch.nn.Linear(8, 2)
        self.rows = {True: [], False: []}

    def forward(self, x):
        self.rows[self.training] += x[:, 0].tolist()
        return self.net(x)


def rows_to_indices(rows):
    return sorted(int((X[:, 0] == value).nonzero()) for value in rows)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


if mode == "split":
    train_idx = [i for i in range(40) if i % 4 != 3]  # 30 samples: 15 on each process
    val_idx = [i for i in range(41) if i % 4 == 3 or i == 40]  # 11: 6 and 5
    torch.manual_seed(0)
    model = Seen()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loop = loopy.fit(model, F.cross_entropy, optimizer,
                     DataLoader(data, 4, sampler=SubsetRandomSampler(train_idx)),
                     val_loader=DataLoader(data, 4, sampler=SubsetRandomSampler(val_idx)),
                     metrics={"errors": Errors()}, epochs=2, progress=False,
                     ddp_options={"find_unused_parameters": True})
    result.update(history=loop.history, train_rows=rows_to_indices(model.rows[True]),
                  val_rows=rows_to_indices(model.rows[False]), train_idx=train_idx,
                  val_idx=val_idx)
if mode == "split" and torch.distributed.is_initialized():
    # a model the user wrapped in DDP, with its own options
    wrapped = torch.nn.parallel.DistributedDataParallel(Seen(), find_unused_parameters=True)
    loop = loopy.fit(wrapped, F.cross_entropy, torch.optim.SGD(wrapped.parameters(), lr=0.1),
                     DataLoader(data, 4, shuffle=True), epochs=1, progress=False)
    result["wrapped"] = {k: v.clone() for k, v in wrapped.module.state_dict().items()}
    result["wrapped_step"] = loop.step
    try:
        loopy.fit(wrapped, F.cross_entropy, torch.optim.SGD(wrapped.parameters(), lr=0.1),
                  DataLoader(data, 4), ddp_options={"static_graph": True}, progress=False)
    except ValueError as error:
        result["options_refused"] = str(error)

    # a stop at "start" on rank 1 only
    def stop_at_start():
        loop = yield "start"
        if loop.rank == 1:
            loop.stop("rank 1 stops at start")
        yield
    model = mlp()
    loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                     DataLoader(data, 4), epochs=2, hooks=[stop_at_start()], progress=False)
    result.update(stop_step=loop.step, stop_reason=loop.stop_reason)

    # a sampler without len() cannot be sharded
    class Endless(torch.utils.data.Sampler):
        def __iter__(self):
            return iter(range(41))
    try:
        model = mlp()
        loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                  DataLoader(data, 4, sampler=Endless()), progress=False)
    except ValueError as error:
        result["refused"] = str(error)

if mode == "fsdp":  # under torchrun, 1 or 2 processes
    from torch.distributed.fsdp import fully_shard
    val = DataLoader(TensorDataset(X[:33], y[:33]), 4)  # uneven: 17 and 16 samples

    def sharded(seed=0):
        model = mlp(seed)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        return fully_shard(model)

    def run(model, **options):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loop = loopy.fit(model, F.cross_entropy, optimizer, DataLoader(data, 4), epochs=2,
                         val_loader=val, metrics={"acc": loopy.accuracy}, accumulate=2,
                         clip_grad=1.0, progress=False, **options)
        return loop

    world = int(os.environ["WORLD_SIZE"])
    if world == 2:  # loopy's own DDP, the reference
        loop = run(mlp())
        result["ddp"] = {k: v.clone() for k, v in loop.model.state_dict().items()}
        result["ddp_history"] = loop.history
    model = sharded()
    loop = run(model)
    result["grad_norm_type"] = type(loop.grad_norm).__name__
    result["history"] = loop.history
    final = loop.state_dict()  # (every process gathers; rank 0 holds the whole state)
    result["fsdp"] = final["model"] if rank == 0 else None

    def stop_at(step):
        while True:
            loop = yield "step"
            if loop.step == step:
                loop.stop("preempted")
    stopped = run(sharded(), hooks=[stop_at(2), loopy.checkpoint(os.path.join(out, "run.pt"))])
    resumed = run(sharded(), resume=os.path.join(out, "run.pt"))
    state = resumed.state_dict()
    result["resumed"] = state["model"] if rank == 0 else None
    result["resumed_history"] = resumed.history
    try:  # an optimizer built before fully_shard holds none of the model's parameters
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        loopy.fit(model, F.cross_entropy, optimizer, DataLoader(data, 4), progress=False)
    except ValueError as error:
        result["early_optimizer"] = str(error)

if mode == "hang":  # rank 1 hangs in a hook; rank 0 waits for it no longer than the timeout
    import signal

    def hang_on_rank_1():
        loop = yield "step"
        if loop.rank == 1:  # until torchrun stops it, which it does once rank 0 has failed
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
            signal.sigtimedwait([signal.SIGTERM], 60)
            os._exit(128 + signal.SIGTERM)
        yield
    model = mlp()
    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
              DataLoader(data, 4), hooks=[hang_on_rank_1()], progress=False,
              process_group_timeout=10)  # (it also bounds the start, on a busy machine)

torch.save(result, os.path.join(out, f"rank{rank}.pt"))
"""


@pytest.fixture(scope="session")
def split_runs(launches):
    return rank_results(launches, 2, "split"), rank_results(launches, 1, "split")[0]


@pytest.mark.slow
def test_torchrun_shards_the_users_samplers_instead_of_replacing_them(split_runs):
    (rank0, rank1), _ = split_runs
    epochs = 2
    for rows, split in (("train_rows", "train_idx"), ("val_rows", "val_idx")):
        assert set(rank0[rows]) <= set(rank0[split]) and set(rank1[rows]) <= set(rank0[split])
        # together the ranks see each sample of the split once per epoch
        assert sorted(rank0[rows] + rank1[rows]) == sorted(rank0[split] * epochs)
    assert len(rank0["val_rows"]) == 6 * epochs and len(rank1["val_rows"]) == 5 * epochs


@pytest.mark.slow
def test_torchrun_metric_objects_are_global_and_equal_one_process(split_runs):
    (rank0, rank1), single = split_runs
    assert rank0["history"] == rank1["history"]
    # a plain update/compute/reset object sees every rank's outputs: the one-process count
    assert rank0["history"]["errors"] == single["history"]["errors"]
    assert rank0["history"]["val_errors"] == single["history"]["val_errors"]
    for name in ("loss", "val_loss"):  # (float sums in another order)
        assert rank0["history"][name] == pytest.approx(single["history"][name], rel=1e-6)


@pytest.mark.slow
def test_torchrun_takes_ddp_options_and_a_model_the_user_wrapped(split_runs):
    (rank0, rank1), _ = split_runs
    # find_unused_parameters=True through ddp_options made the split run possible at all (its
    # model has an unused layer); the user's own DDP wrapper trained as given
    assert rank0["wrapped_step"] == rank1["wrapped_step"] == 6
    assert all(torch.equal(rank0["wrapped"][k], rank1["wrapped"][k]) for k in rank0["wrapped"])
    assert rank0["options_refused"] == (
        "ddp_options={'static_graph': True}, but the model is already wrapped "
        "(DistributedDataParallel): pass the options where you wrap it")


@pytest.mark.slow
def test_torchrun_a_stop_at_start_on_one_rank_stops_every_rank(split_runs):
    (rank0, rank1), _ = split_runs
    assert rank0["stop_step"] == rank1["stop_step"] == 0
    assert rank1["stop_reason"] == "rank 1 stops at start"
    assert rank0["stop_reason"] == "stopped by another process"


@pytest.mark.slow
def test_torchrun_a_sampler_without_len_is_refused_with_the_fix(split_runs):
    (rank0, _), _ = split_runs
    assert "has none: give it __len__, or build the DataLoader on a " \
           "torch.utils.data.DistributedSampler yourself" in rank0["refused"]


@pytest.fixture(scope="session")
def fsdp_runs(launches):
    return [(scenario(launches, processes, "fsdp"),
             rank_results(launches, processes, "fsdp")) for processes in (2, 1)]


@pytest.mark.slow
def test_fsdp2_on_two_processes_equals_loopys_ddp_and_resumes_exactly(fsdp_runs):
    (out, (rank0, rank1)), _ = fsdp_runs
    assert rank0["history"] == rank1["history"] == rank0["ddp_history"]  # uneven validation ran
    # the interrupted epoch's means too: every rank's running sums were saved and restored
    assert rank0["resumed_history"] == rank1["resumed_history"] == rank0["history"]
    for name, weights in rank0["ddp"].items():  # bit-identical with torch 2.13 on CPU
        assert torch.equal(rank0["fsdp"][name], weights)
        assert torch.equal(rank0["resumed"][name], weights)  # a mid-epoch stop, then resume
    assert rank0["grad_norm_type"] == "Tensor"  # not a DTensor
    # the file is loopy's usual one: it loads into a plain module with weights_only=True
    saved = torch.load(out / "run.pt", weights_only=True)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    plain.load_state_dict(saved["model"])
    assert saved["position"] is not None  # it was a mid-epoch checkpoint
    assert "before fully_shard replaced its parameters" in rank0["early_optimizer"]


@pytest.mark.slow
def test_fsdp2_on_one_process_is_bit_identical_to_the_plain_loop(fsdp_runs):
    _, (_, (single,)) = fsdp_runs
    X = torch.randn(41, 8, generator=torch.Generator().manual_seed(0))
    y = (X[:, 0] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loop = loopy.fit(model, F.cross_entropy, optimizer,
                     torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), 4),
                     epochs=2, val_loader=torch.utils.data.DataLoader(
                         torch.utils.data.TensorDataset(X[:33], y[:33]), 4),
                     metrics={"acc": loopy.accuracy}, accumulate=2, clip_grad=1.0,
                     progress=False)
    assert single["history"] == single["resumed_history"] == loop.history
    for name, weights in model.state_dict().items():
        assert torch.equal(single["fsdp"][name], weights)
        assert torch.equal(single["resumed"][name], weights)


@pytest.mark.slow
def test_torchrun_a_hung_rank_fails_the_others_after_process_group_timeout(launches):
    _, code, stderr, ended = launches("hang")
    assert code != 0 and "Timed out waiting 10000ms" in stderr, stderr[-3000:]
    started = float(re.search(r"--- scenario hang starts at ([\d.]+)", stderr).group(1))
    assert ended - started < 90


LOG_TO_SCRIPT = """
import json, os, sys, torch, loopy
import torch.nn.functional as F
torch.manual_seed(0)
X, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
model = torch.nn.Linear(8, 2)
records = []
loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                 batch_size=8, epochs=2, progress=False,
                 hooks=[loopy.log_to(lambda metrics, step: records.append([step, metrics]))])
with open(os.path.join(sys.argv[1], f"rank{loop.rank}.json"), "w") as file:
    json.dump({"records": records, "history": loop.history}, file)
"""


@pytest.mark.slow
def test_log_to_under_torchrun_logs_on_rank_0_only(launches):
    tmp_path = scenario(launches, 2, "log_to")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    history = rank0["history"]  # each process takes 4 of the 8 batches: 4 steps per epoch
    assert rank0["records"] == [[4 * (e + 1), {**{k: v[e] for k, v in history.items()},
                                                "epoch": e + 1}] for e in (0, 1)]
    assert rank1["records"] == [] and rank1["history"] == history


TORCHRUN_16_SCRIPT = """import os, sys, torch, loopy
import torch.nn.functional as F
torch.set_num_threads(1)
out, batch_size = sys.argv[1], int(sys.argv[2])
X = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
y = (X[:, 0] > 0).long()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
sizes = []

def accuracy_as_a_number(output, target):
    sizes.append(len(target))
    return loopy.accuracy(output, target).item()

loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                 (X.numpy(), y.numpy()), batch_size=batch_size, drop_last=True, epochs=2,
                 val_loader=(X[:30], y[:30]), val_batch_size=7,
                 metrics={"acc": accuracy_as_a_number}, progress=False)
torch.save({"model": model.state_dict(), "history": loop.history, "sizes": sizes},
           os.path.join(out, f"rank{os.environ.get('RANK', 0)}.pt"))
"""


@pytest.mark.slow
def test_torchrun_numpy_data_with_drop_last_and_a_number_metric_equal_one_process(
        launches):
    # batches of 16 on each of 2 processes, of 32 on one: of 100 samples the last 4 are dropped
    (rank0, rank1), (single,) = (rank_results(launches, p, "numpy") for p in (2, 1))
    assert single["sizes"] == [32, 32, 32, 7, 7, 7, 7, 2] * 2
    assert rank0["sizes"][:3] == rank1["sizes"][:3] == [16, 16, 16]
    for name, weights in single["model"].items():  # tolerance: float sums in another order
        torch.testing.assert_close(rank0["model"][name], weights, rtol=1e-5, atol=1e-6)
    assert rank0["history"] == rank1["history"]
    for name in ("loss", "acc", "val_loss", "val_acc"):
        assert rank0["history"][name] == pytest.approx(single["history"][name], rel=1e-5)


EMA_DISTRIBUTED_SCRIPT = """
import os, sys, torch, loopy
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.set_num_threads(1)
X = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
y = (X[:, 0] > 0).long()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                 DataLoader(TensorDataset(X, y), int(sys.argv[2])), epochs=3, progress=False,
                 val_loader=DataLoader(TensorDataset(X[:30], y[:30]), 7), hooks=[loopy.ema(0.8)])
result = {"model": model.state_dict(), "history": loop.history}
if torch.distributed.is_initialized():  # FSDP2 cannot be copied: a clear error
    from torch.distributed.fsdp import fully_shard
    sharded = fully_shard(torch.nn.Linear(8, 2))
    try:
        loopy.fit(sharded, F.cross_entropy, torch.optim.SGD(sharded.parameters(), lr=0.1),
                  (X, y), hooks=[loopy.ema()], progress=False)
    except ValueError as error:
        result["fsdp"] = str(error)
torch.save(result, os.path.join(sys.argv[1], f"rank{os.environ.get('RANK', 0)}.pt"))
"""


@pytest.mark.slow
def test_ema_under_torchrun_is_the_same_on_both_ranks_and_matches_one_process(launches):
    # batches of 8 on each of 2 processes, of 16 on one
    (rank0, rank1), (single,) = (rank_results(launches, p, "ema") for p in (2, 1))
    assert rank0["history"] == rank1["history"]
    for name, weights in single["model"].items():  # tolerance: float sums in another order
        assert torch.equal(rank0["model"][name], rank1["model"][name])
        torch.testing.assert_close(rank0["model"][name], weights, rtol=1e-5, atol=1e-6)
    assert rank0["history"]["val_loss"] == pytest.approx(single["history"]["val_loss"], rel=1e-5)
    assert rank0["fsdp"].startswith("loopy.ema() cannot average a model sharded with FSDP2")


GAN_DISTRIBUTED_SCRIPT = """
import os, sys, torch, loopy
import torch.nn.functional as F
torch.set_num_threads(1)
out, batch_size = sys.argv[2], int(sys.argv[3])
generator = torch.Generator().manual_seed(0)
X = torch.randn(96, 8, generator=generator) * 0.5 + 1.0
Z = torch.randn(96, 4, generator=generator)  # the noise comes with the data, so that two
                                             # processes of batch B see one's batch of 2B
rank = int(os.environ.get("RANK", 0))
torch.manual_seed(rank)  # rank 1's weights differ: the run starts from rank 0's
gan = torch.nn.ModuleDict({
    "generator": torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
                                     torch.nn.Linear(16, 8)),
    "discriminator": torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LeakyReLU(0.2),
                                         torch.nn.Linear(16, 1))})
optimizers = {name: torch.optim.Adam(gan[name].parameters(), lr=0.01, betas=(0.5, 0.999))
              for name in ("discriminator", "generator")}

def step(model, batch, loop):
    real, noise = batch
    fake = model["generator"](noise)
    labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(real), 1)])
    loss_d = F.binary_cross_entropy_with_logits(
        model["discriminator"](torch.cat([real, fake.detach()])), labels)
    loop.backward(loss_d)
    loop.step_optimizer("discriminator")
    loss_g = F.binary_cross_entropy_with_logits(model["discriminator"](fake),
                                                torch.ones(len(real), 1))
    loop.backward(loss_g, "generator")
    loop.step_optimizer("generator")
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}

loop = loopy.fit(gan, None, optimizers, (X, Z), batch_size=batch_size, epochs=3, step=step,
                 val_loader=(X[:30], Z[:30]), progress=False)
os.makedirs(out, exist_ok=True)
torch.save({"model": gan.state_dict(), "history": loop.history, "step": loop.step,
            "world_size": loop.world_size}, os.path.join(out, f"rank{rank}.pt"))
"""


@pytest.mark.slow
def test_a_gan_on_two_processes_of_batch_b_equals_one_process_of_batch_2b(launches):
    # batches of 8 on each of 2 processes, of 16 on one
    (rank0, rank1), (single,) = (rank_results(launches, p, "gan") for p in (2, 1))
    assert rank0["world_size"] == 2 and rank0["step"] == single["step"] == 3 * 6
    assert rank0["history"] == rank1["history"]
    for name, weights in single["model"].items():  # tolerance: float sums in another order
        torch.testing.assert_close(rank0["model"][name], weights, rtol=1e-5, atol=1e-6)
        assert torch.equal(rank0["model"][name], rank1["model"][name])
    for name in ("loss_d", "loss_g", "val_loss_d", "val_loss_g"):
        assert rank0["history"][name] == pytest.approx(single["history"][name], rel=1e-5)


SLICED_DISTRIBUTED_SCRIPT = """
import os, sys, torch, loopy
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.set_num_threads(1)
calls, getitem = [], TensorDataset.__getitem__
TensorDataset.__getitem__ = lambda self, index: calls.append(index) or getitem(self, index)
results = {}
for path in ("sliced", "iterated"):
    if path == "iterated":
        loopy._sliced = lambda loader: loader
    X = torch.randn(90, 8, generator=torch.Generator().manual_seed(0))
    y = (X[:, 0] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 2))
    loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                     DataLoader(TensorDataset(X, y), 8, shuffle=True, drop_last=sys.argv[2] == "1"),
                     val_loader=DataLoader(TensorDataset(X[:31], y[:31]), 4), epochs=3,
                     progress=False)
    results[path] = {"model": model.state_dict(), "history": loop.history, "calls": len(calls),
                     "rng": torch.get_rng_state()}
    calls.clear()
TensorDataset.__getitem__ = getitem
torch.save(results, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("drop_last", [False, True])
def test_torchrun_sliced_shards_equal_the_distributed_samplers(launches, drop_last):
    for runs in rank_results(launches, 2, "sliced-drop_last" if drop_last else "sliced"):
        sliced, iterated = runs["sliced"], runs["iterated"]
        assert sliced["calls"] == 0 and iterated["calls"] > 0
        assert all(torch.equal(sliced["model"][k], v) for k, v in iterated["model"].items())
        assert sliced["history"] == iterated["history"]
        assert torch.equal(sliced["rng"], iterated["rng"])


ISSUE_16_SCRIPT = """
import os, sys, torch, loopy
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.set_num_threads(1)
X = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
y = (X[:, 0] > 0).long()
torch.manual_seed(0)
model = torch.nn.Linear(8, 2)

class EmptyIterable:
    def __iter__(self):
        return iter(())

results = {}
try:
    results["empty"] = loopy.evaluate(model, EmptyIterable(), F.cross_entropy)
except ValueError as error:
    results["empty"] = str(error)
results["all"] = loopy.evaluate(model, DataLoader(TensorDataset(X, y), 4), F.cross_entropy)
calls = []

def nan_on_rank_1(output, target):  # rank 1's third batch: DDP spreads it to both ranks
    calls.append(1)
    loss = F.cross_entropy(output, target)
    return loss * float("nan") if os.environ["RANK"] == "1" and len(calls) == 3 else loss

torch.manual_seed(0)
model = torch.nn.Linear(8, 2)
try:
    loopy.fit(model, nan_on_rank_1, torch.optim.SGD(model.parameters(), lr=0.1),
              DataLoader(TensorDataset(X, y), 2), progress=False,
              hooks=[loopy.checkpoint(os.path.join(sys.argv[1], "nan.pt"), every=1)])
except FloatingPointError as error:
    results["nan"] = str(error)
torch.save(results, os.path.join(sys.argv[1], f"rank{os.environ.get('RANK', 0)}.pt"))
"""


@pytest.mark.slow
def test_under_torchrun_an_evaluation_without_batches_is_an_error(launches):
    tmp_path = scenario(launches, 2, "empty")
    X = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    expected = F.cross_entropy(model(X), (X[:, 0] > 0).long()).item()
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert "loader yielded no batches on any process" in results["empty"]
        assert results["all"]["loss"] == pytest.approx(expected, rel=1e-6)  # (and it goes on)
    # a non-finite loss on rank 1 alone: neither process saves step 3, whose weights it spoiled
    assert "not finite on another process (this is rank 0)" in \
        torch.load(tmp_path / "rank0.pt", weights_only=True)["nan"]
    assert "the loss is not finite" in torch.load(tmp_path / "rank1.pt", weights_only=True)["nan"]
    saved = torch.load(tmp_path / "nan.pt", weights_only=True)
    assert saved["step"] == 2 and all(v.isfinite().all() for v in saved["model"].values())


# --- examples/: each runs (shortened) as a script and reaches its accuracy ---

def _python(spawn, script, cwd=HERE):
    """Run ``script`` in a fresh process (see spawner) with loopy importable (and no GPU
    visible); return its stdout."""
    code, stdout, stderr = finished(spawn(script, cwd=cwd))
    assert code == 0, f"python {script} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout


def _final_metrics(stdout):
    """The numbers of the example's last line 'final validation: loss=0.0980 acc=0.9750'."""
    lines = [line for line in stdout.splitlines() if line.startswith("final validation:")]
    assert lines, f"no 'final validation:' line in:\n{stdout[-2000:]}"
    return {name: float(value) for name, value in re.findall(r"(\w+)=([-\d.e]+)", lines[-1])}


EXAMPLES_SCRIPT = """
import contextlib, io, json, os, runpy, sys, traceback
examples, runs, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
sys.path.insert(0, examples)
outputs = {}
for name, (script, arguments, hidden) in runs.items():
    sys.modules.update(dict.fromkeys(hidden))  # as if not installed (only the last run hides any)
    sys.argv = [script, *arguments]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        try:
            runpy.run_path(os.path.join(examples, script), run_name="__main__")
        except BaseException:
            print(traceback.format_exc())
            print("EXAMPLE FAILED")
    outputs[name] = stdout.getvalue()
with open(out, "w") as file:
    json.dump(outputs, file)
"""


@pytest.fixture(scope="session")
def examples(spawner, tmp_path_factory):
    """A function that returns the standard output of each example and its plot file: all run
    as ``__main__`` one after another in one fresh process, so that torch and scikit-learn are
    imported once; it starts at once (see start_launches_first). (The ddp example runs under
    torchrun as a scenario of launches.)"""
    tmp_path = tmp_path_factory.mktemp("examples")
    runs = {}
    for name, script, epochs, plot, hidden in [
            ("fc", "fc_digits.py", 10, True, []), ("cnn", "cnn_digits.py", 10, True, []),
            ("rnn", "rnn_digits.py", 10, True, []),
            ("custom_step", "custom_step_digits.py", 10, False, []),
            ("checkpoint_resume", "checkpoint_resume.py", 10, False, []),
            ("early_stopping", "early_stopping.py", 60, False, []),
            ("ddp", "ddp_digits.py", 8, False, []), ("gan", "gan_digits.py", 10, True, []),
            ("fc_without_matplotlib", "fc_digits.py", 2, True, ["matplotlib"])]:  # the last
        plot = str(tmp_path / f"{name}.png") if plot else ""
        runs[name] = (script, ["--epochs", str(epochs), "--plot", plot], hidden)
    out = tmp_path / "outputs.json"
    (tmp_path / "examples.py").write_text(EXAMPLES_SCRIPT)
    process = spawner(tmp_path / "examples.py", os.path.join(HERE, "examples"), json.dumps(runs),
                      out)
    wait = in_background(ended, process)

    @functools.cache
    def outputs():
        code, stdout, stderr, _ = wait()
        assert code == 0, f"the examples failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        with open(out) as file:
            outputs = json.load(file)
        return {name: (outputs[name], tmp_path / f"{name}.png") for name in runs}

    yield outputs
    process.kill()  # (a no-op once it has ended)


def example_output(examples, name):
    stdout, plot = examples()[name]
    assert "EXAMPLE FAILED" not in stdout, stdout[-3000:]
    return stdout, plot


@pytest.mark.slow
@pytest.mark.parametrize("name, threshold", [("fc", 0.95), ("cnn", 0.97), ("rnn", 0.95)])
def test_example_reaches_its_accuracy(examples, name, threshold):
    stdout, plot = example_output(examples, name)
    assert _final_metrics(stdout)["acc"] >= threshold, stdout[-2000:]
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.stat().st_size > 1000  # the training curves were saved


@pytest.mark.slow
def test_example_custom_step_learns(examples):
    stdout, _ = example_output(examples, "custom_step")
    before, after = map(float, re.search(r"reconstruction error \(validation\): ([\d.]+) before "
                                         r"training, ([\d.]+) after", stdout).groups())
    assert after < before / 4, stdout[-2000:]
    assert _final_metrics(stdout)["acc"] >= 0.93, stdout[-2000:]


@pytest.mark.slow
def test_example_checkpoint_resume_equals_the_straight_run(examples):
    stdout, _ = example_output(examples, "checkpoint_resume")
    assert "simulated crash after step" in stdout
    assert "resumed run == straight run: weights True, history True" in stdout, stdout[-2000:]
    assert _final_metrics(stdout)["acc"] >= 0.95, stdout[-2000:]


@pytest.mark.slow
def test_example_early_stopping_stops_and_restores_the_best_epoch(examples):
    stdout, _ = example_output(examples, "early_stopping")
    assert "early stopping: val_loss did not improve for 5 epochs" in stdout, stdout[-2000:]
    best = float(re.search(r"the best was epoch \d+ \(val_loss ([\d.]+)\)", stdout).group(1))
    final = _final_metrics(stdout)
    assert final["loss"] == pytest.approx(best, abs=1e-4)  # the best epoch's weights are back
    assert final["acc"] >= 0.95, stdout[-2000:]


@pytest.mark.slow
def test_example_without_matplotlib_skips_the_plot(examples):
    stdout, plot = example_output(examples, "fc_without_matplotlib")
    assert "matplotlib is not installed: no plot" in stdout and not plot.exists()
    assert "final validation:" in stdout


@pytest.mark.slow
def test_the_ddp_example_runs_alone_and_under_torchrun_to_the_same_accuracy(examples,
                                                                            launches):
    alone, _ = example_output(examples, "ddp")
    folder = scenario(launches, 2, "ddp_digits").parent  # (each process's stdout)
    stdout = "".join((folder / f"ddp_digits.rank{rank}.stdout").read_text() for rank in (0, 1))
    accuracies = []
    for output in (alone, stdout):
        assert output.count("final validation:") == 1  # only rank 0 reports
        accuracies.append(_final_metrics(output)["acc"])
    assert "on 2 process(es)" in stdout and min(accuracies) >= 0.95


@pytest.mark.slow
def test_example_gan_draws_digits_near_real_ones(examples):
    stdout, plot = example_output(examples, "gan")
    generated, real, untrained = map(float, re.search(
        r"generated ([\d.]+), real \(validation\) ([\d.]+), untrained generator ([\d.]+)",
        stdout).groups())
    assert generated < (real + untrained) / 2, stdout[-2000:]  # nearer real digits than at start
    final = _final_metrics(stdout)
    assert final["d_acc"] <= 0.85, stdout[-2000:]  # the discriminator does not win outright
    assert final["classes"] == 10, stdout[-2000:]  # every digit drawn: no collapse to a few
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.stat().st_size > 1000  # the generated digits were saved


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


@pytest.mark.parametrize("document, at_least",
                         [("README.md", 8), ("docs/guide.md", 18), ("docs/migrating.md", 3)])
def test_readme_python_blocks_run(document, at_least, tmp_path, spawner):
    """The ```python blocks of the README and of docs/ run in order in one namespace,
    like a notebook, in a fresh process; tracebacks point at the document's line numbers."""
    with open(os.path.join(HERE, document), encoding="utf-8") as file:
        blocks = _fenced_blocks(file.read(), "python")
    runnable = [(line, code) for line, code, skipped in blocks if not skipped]
    assert len(runnable) >= at_least and len(blocks) - len(runnable) <= 3  # skips stay rare
    driver = ["import torch",
              "torch.set_num_threads(1)  # the fastest for networks this small, even on a busy machine",
              "namespace = {'__name__': '__main__'}"]
    for line, code in runnable:
        source = "\n" * (line - 1) + code  # so that line numbers are the document's
        driver.append(f"exec(compile({source!r}, {document!r}, 'exec'), namespace)")
    script = tmp_path / "document_blocks.py"
    script.write_text("\n".join(driver))
    _python(spawner, script, cwd=tmp_path)


def test_readme_setup_commands_match_ci():
    text = _readme()
    commands = [code for _, code, _ in _fenced_blocks(text, "bash")]
    assert len(commands) == 2, "the README has exactly two setup commands"
    assert text.index("```bash") < text.index("\n## ")  # near the top, before the first section
    assert "examples/fc_digits.py" in commands[0] and os.path.exists(
        os.path.join(HERE, "examples", "fc_digits.py"))
    with open(os.path.join(HERE, ".ci", "run"), encoding="utf-8") as file:
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
    assert os.path.getsize(os.path.join(HERE, "docs", "fc_digits.png")) < 200_000


# --- benchmarks/: smoke runs (no timing is asserted; timings belong to the benchmark runs) ---

BENCHMARKS = os.path.join(HERE, "benchmarks")


def benchmark_output(launches, name):
    """What benchmark ``name``'s smoke run printed and saved (a scenario of launches)."""
    folder = scenario(launches, 1, name)
    return ((folder.parent / f"{name}.rank0.stdout").read_text(),
            json.loads((folder / "result.json").read_text()))


@pytest.mark.slow
def test_overhead_smoke_run(launches):  # --quick --steps 4 --rounds 1 --import-repeats 1
    out, result = benchmark_output(launches, "overhead")
    assert "| runner | ms/step | ratio | target | weights vs hand loop |" in out
    assert "`import loopy` beyond `import torch`" in out
    assert "epoch 1/1" not in out  # fit's own progress lines stay out of the table
    rows = {row["key"]: row for row in result["rows"]}
    assert {"hand", "loopy_dataloader", "loopy_lean", "loopy_defaults", "hand_work",
            "loopy_defaults_work", "loopy_lean_work", "loopy_tty_work"} == set(rows)
    for key, row in rows.items():
        assert row["bit_identical"], f"{key}: weights differ from the hand-written loop"
        assert row["ms_per_step"] > 0 and isinstance(row.get("meets_target", False), bool)
    assert result["steps_per_epoch"] == 4 and result["import"]["loopy_beyond_torch_ms"] >= 0


@pytest.mark.slow
def test_peers_smoke_run(launches):  # --runners sliced,loopy_tensors --workloads mlp_val ...
    out, result = benchmark_output(launches, "peers")
    assert "| runner | ms/step | x hand | weights vs hand |" in out
    assert "loopy tensor path / hand-sliced loop" in out
    assert "| runner | import beyond torch (ms) |" in out
    workload = result["workloads"]["mlp_val"]
    rows = {row["key"]: row for row in workload["rows"]}
    assert rows["loopy_tensors"]["bit_identical"], "the tensor path differs from the hand loop"
    assert workload["imports_changed_nothing"]
    for key, row in result["processes"].items():  # fresh processes: import, train, memory
        assert "error" not in row["mlp"], f"{key}: {row['mlp']}"
        assert row["mlp"]["process_peak_mib"] > 0 and row["mlp"]["e2e_s"] > 0


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_on_the_cpu(launches):  # --device cpu --quick --rounds 1
    out, result = benchmark_output(launches, "gpu")
    assert "| runner | ms/step | ratio | weights vs hand loop over the DataLoader |" in out
    assert "epoch 1/1" not in out  # fit's own progress lines stay out of the tables
    assert set(result["workloads"]) == {"mlp", "resnet"}
    for name, workload in result["workloads"].items():
        assert workload["hand_repeat"]["bit_identical"]
        for row in workload["rows"]:
            if row["key"] != "hand":  # the DataLoader's batches: the hand loop's weights
                assert row["bit_identical"], f"{name}/{row['key']}: weights differ"


# --- CUDA (run on a GPU machine; skipped elsewhere) ---

class OnGPU:
    """The hand-written loop's ``x, y = x.cuda(), y.cuda()``, around a loader of CPU batches."""

    def __init__(self, loader, non_blocking=False):
        self.loader, self.non_blocking = loader, non_blocking

    def __iter__(self):
        for x, y in self.loader:
            yield x.cuda(non_blocking=self.non_blocking), y.cuda(non_blocking=self.non_blocking)


@pytest.mark.cuda
def test_cuda_device_auto_picks_the_gpu_and_nested_batches_arrive_there():
    X, y = make_data(64)
    batches = [{"inputs": (X[i:i + 32], [torch.zeros(32, 8)]), "name": "digits",
                "pair": Pair(X[i:i + 32], y[i:i + 32]), "sample": Sample(X[i:i + 32], y[i:i + 32])}
               for i in (0, 32)]
    seen = []

    def step(model, batch):
        x, [zeros] = batch["inputs"]
        seen.append({t.device.type for t in (x, zeros, *batch["pair"], batch["sample"].image,
                                             batch["sample"].label)})
        assert isinstance(batch["pair"], Pair) and isinstance(batch["sample"], Sample)
        assert isinstance(batch["inputs"][1], list) and batch["name"] == "digits"
        output = model(x + zeros)
        return F.cross_entropy(output, batch["pair"].target), output, batch["sample"].label

    model = make_mlp()
    loop = train(model=model, loss_fn=None, loader=batches, step=step, val_loader=batches,
                 epochs=2, metrics={"acc": loopy.accuracy})
    assert loop.device.type == "cuda" and all(p.is_cuda for p in model.parameters())
    assert seen == [{"cuda"}] * 8  # 2 epochs of 2 training and 2 validation batches
    assert loop.loss.is_cuda and loop.output.is_cuda and loop.step == 4
    assert all(type(v) is float for values in loop.history.values() for v in values)
    assert not batches[0]["pair"].inputs.is_cuda  # the loader's own batches stay where they are
    count = torch.cuda.device_count()
    message = fit_error(ValueError, device=f"cuda:{count}")
    assert f"device='cuda:{count}'" in message and f"only {count} CUDA device(s)" in message


@pytest.mark.cuda
@pytest.mark.parametrize("source", ["DataLoader", "GPU tensors"])
@pytest.mark.parametrize("make_model, data", [(make_mlp, make_data), (make_cnn, image_data)])
def test_cuda_fit_is_bit_identical_to_the_hand_written_loop_on_the_gpu(make_model, data, source,
                                                                       monkeypatch):
    # the same kernels on the same GPU give the same bits: cuBLAS is deterministic on one
    # stream, and cuDNN is held to deterministic convolution algorithms, for both loops alike
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    X, y = data()
    Xv, yv = data(48)
    by_hand = make_model().cuda()
    optimizer = torch.optim.Adam(by_hand.parameters(), lr=0.01)
    torch.manual_seed(1)
    expected = hand_loop(by_hand, optimizer, OnGPU(tensor_loader(X, y, shuffle=True)), 3,
                         OnGPU(tensor_loader(Xv, yv)), metric=loopy.accuracy)
    model = make_model()  # on the CPU, and its optimizer too: fit moves it, as users expect
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    if source == "DataLoader":
        loader, val_loader = tensor_loader(X, y, shuffle=True), tensor_loader(Xv, yv)
    else:  # sliced on the GPU, in the DataLoader's order
        loader, val_loader = (X.cuda(), y.cuda()), (Xv.cuda(), yv.cuda())
    torch.manual_seed(1)
    loop = train(model=model, optimizer=optimizer, loader=loader, epochs=3,
                 val_loader=val_loader, shuffle=True, metrics={"acc": loopy.accuracy})
    assert next(model.parameters()).is_cuda and same_weights(model, by_hand)
    for name in ("loss", "acc", "val_loss", "val_acc"):
        assert loop.history[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-7)


def record_copies_to_the_gpu(monkeypatch):
    """Note ``(shape, non_blocking)`` of every ``Tensor.to`` from the CPU to a GPU."""
    copies, to = [], torch.Tensor.to

    def recorded(tensor, *args, **kwargs):
        moved = to(tensor, *args, **kwargs)
        if not tensor.is_cuda and moved.is_cuda:
            non_blocking = kwargs.get("non_blocking", any(a is True for a in args))
            copies.append((tuple(tensor.shape), non_blocking))
        return moved

    monkeypatch.setattr(torch.Tensor, "to", recorded)
    return copies


@pytest.mark.cuda
def test_cuda_a_pinned_loader_is_copied_without_blocking_and_trains_like_the_hand_loop(
        monkeypatch):
    X, y = make_data(224)  # 7 batches of 32
    loader = DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True, pin_memory=True)
    assert next(iter(loader))[0].is_pinned()
    by_hand, model = make_mlp().cuda(), make_mlp()
    torch.manual_seed(2)
    hand_loop(by_hand, torch.optim.SGD(by_hand.parameters(), lr=0.1),
              OnGPU(loader, non_blocking=True), 2)
    copies = record_copies_to_the_gpu(monkeypatch)
    torch.manual_seed(2)
    loop = train(model=model, loader=loader, epochs=2)
    batch_copies = [non_blocking for shape, non_blocking in copies if shape[:1] == (32,)]
    assert batch_copies and all(batch_copies)
    assert loop.batch[0].is_cuda and loop.batch[1].is_cuda
    assert same_weights(model, by_hand)
    copies.clear()
    train(model=model, loader=tensor_loader(X, y))
    batch_copies = [non_blocking for shape, non_blocking in copies if shape[:1] == (32,)]
    assert batch_copies and not any(batch_copies)  # pageable memory: plain copies


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains_close_to_full_precision(precision):
    """bf16 keeps 8 significant bits, fp16 11: each matmul's inputs are rounded by up to 0.4%
    (0.05%). Over 48 SGD steps the CPU's autocast moves the weights 0.7% (bf16) and 0.1% (fp16)
    of their travel away from the float32 path, and the epoch losses by 0.02% and 0.0005%.
    The bounds below (1% of the losses, 5% of the travel) leave room for the GPU's kernels and
    still catch autocast or the scaler going wrong: an unscaled fp16 step is 65536x too large."""
    runs = {}
    for mode in (None, precision):
        model = make_mlp()
        start = [p.detach().clone() for p in model.parameters()]
        norms = []
        loop = train(model=model, n=512, epochs=3, precision=mode, hooks=[first_grad_norm(norms)])
        assert loop.device.type == "cuda"
        dtype = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        assert loop.output.dtype == dtype  # autocast ran the model in that precision
        assert (loop.scaler is not None) == (mode == "fp16")
        if mode == "fp16":
            assert isinstance(loop.scaler, torch.amp.GradScaler) and loop.scaler.is_enabled()
            assert loop.scaler.get_scale() > 1  # the loss was scaled up before backward
        weights = [p.detach().cpu() for p in model.parameters()]
        runs[mode] = loop.history["loss"], start, weights, norms[0].item()
    full, start, weights, norm = runs[None]
    mixed, _, mixed_weights, mixed_norm = runs[precision]
    assert mixed[-1] < mixed[0] and mixed == pytest.approx(full, rel=0.01)
    travel = torch.cat([(w - s).flatten() for w, s in zip(weights, start)]).norm()
    drift = torch.cat([(m - w).flatten() for m, w in zip(mixed_weights, weights)]).norm()
    assert drift.item() < 0.05 * travel.item()
    assert mixed_norm == pytest.approx(norm, rel=0.05)  # "backward" hooks see unscaled gradients


@pytest.mark.cuda
def test_cuda_bf16_on_a_gpu_without_it_says_use_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    message = fit_error(ValueError, precision="bf16")
    assert torch.cuda.get_device_name() in message and "precision='fp16'" in message


@pytest.mark.cuda
def test_cuda_a_run_resumed_on_the_gpu_equals_the_straight_run_bit_for_bit(tmp_path):
    straight, straight_loop = resumable_run()  # its dropout masks come from the GPU's generator
    assert straight_loop.device.type == "cuda"
    path = tmp_path / "run.pt"
    _, stopped = resumable_run(path, stop_at_step=27)  # mid-epoch
    assert stopped.step == 27 and "cuda" in torch.load(path, weights_only=True)["rng"]
    torch.manual_seed(999)  # (the GPU's generator too) the resumed run must not depend on it
    resumed, resumed_loop = resumable_run(path, resume=path, seed=5)
    assert same_weights(resumed, straight)
    assert resumed_loop.history == straight_loop.history and resumed_loop.step == 40


@pytest.mark.cuda
@pytest.mark.parametrize("saved_on, resumed_on", [("cuda", "cpu"), ("cpu", "cuda")])
def test_cuda_a_checkpoint_moves_between_the_gpu_and_the_cpu(tmp_path, saved_on, resumed_on):
    """Without dropout, whose masks the CPU and the GPU draw from different generators, a run
    stopped on one device and resumed on the other follows the straight run on the second up
    to float rounding: the two devices' kernels round differently in the first 27 steps (a
    float64 first part moved the final weights by 1.2e-7 at most on the CPU). One prediction
    on a decision boundary may flip, so the accuracies may differ by one sample."""
    path = tmp_path / "run.pt"
    straight, straight_loop = resumable_run(dropout=0.0, device=resumed_on)
    _, stopped = resumable_run(path, stop_at_step=27, dropout=0.0, device=saved_on)
    assert stopped.device.type == saved_on and stopped.step == 27
    resumed, loop = resumable_run(path, resume=path, dropout=0.0, device=resumed_on)
    assert loop.device.type == resumed_on and loop.step == 40
    assert all(p.device.type == resumed_on for p in resumed.parameters())
    assert all(value.device.type == resumed_on for state in loop.optimizer.state.values()
               for name, value in state.items() if name != "step")  # Adam's moments moved too
    for name, expected in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name].cpu(), expected.cpu(), rtol=1e-4,
                                   atol=1e-5)
    assert loop.history.keys() == straight_loop.history.keys()
    for name, values in straight_loop.history.items():
        tolerance = dict(abs=0.021) if name.endswith("acc") else dict(rel=1e-5, abs=1e-6)
        assert loop.history[name] == pytest.approx(values, **tolerance), name


@pytest.mark.cuda
def test_cuda_evaluate_and_predict_run_on_the_gpu_and_return_cpu_results():
    X, y = make_data(100)
    batches = [(X[i:i + 30], y[i:i + 30]) for i in range(0, 100, 30)]
    model = make_mlp(dropout=0.5)
    results = loopy.evaluate(model, batches, F.cross_entropy, {"acc": loopy.accuracy})
    assert next(model.parameters()).is_cuda and model.training
    model.eval()
    with torch.no_grad():  # by hand, on the GPU, in the same batches (so the same kernels)
        outputs = [model(x.cuda()) for x, _ in batches]
    loss = sum(F.cross_entropy(o, t.cuda()).item() * len(t) for o, (_, t) in zip(outputs, batches))
    hits = sum((o.argmax(1).cpu() == t).sum().item() for o, (_, t) in zip(outputs, batches))
    assert results == pytest.approx({"loss": loss / 100, "acc": hits / 100}, rel=1e-6)
    assert all(type(value) is float for value in results.values())
    predicted = loopy.predict(model, batches)
    assert predicted.device.type == "cpu" and torch.equal(predicted, torch.cat(outputs).cpu())
    assert torch.equal(loopy.predict(model, X, batch_size=30), predicted)

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            logits = self.body(x)
            return {"logits": logits, "probabilities": logits.softmax(dim=1)}

    heads = loopy.predict(TwoHeads(), [x for x, _ in batches])
    assert heads["logits"].device.type == heads["probabilities"].device.type == "cpu"
    assert torch.equal(heads["logits"], predicted)
    assert torch.equal(heads["probabilities"], torch.cat([o.softmax(dim=1) for o in outputs]).cpu())


def check_syncs_in_steps(model, optimizer, batches):
    """Make every training step of fit raise on a host-device sync: CUDA's sync debug mode is
    "error" from an epoch's first training forward until its last optimizer step (after
    ``batches`` training forwards), so fetching and moving each later batch is checked too.
    The epoch's start (a shuffle order is copied to the GPU) and end (the epoch means are
    pulled, validation, the progress line) may sync, and run unchecked. The check rides on
    torch's own module and optimizer hooks, not on a loopy hook, so that it checks the run
    as fit does it with no hook at all."""
    forwards = []

    def check_from_here(module, args):
        if module.training:
            forwards.append(1)
            torch.cuda.set_sync_debug_mode("error")

    def unchecked_after_the_epochs_last_step(optimizer, args, kwargs):
        if len(forwards) % batches == 0:
            torch.cuda.set_sync_debug_mode(0)

    model.register_forward_pre_hook(check_from_here)
    optimizer.register_step_post_hook(unchecked_after_the_epochs_last_step)


@pytest.mark.cuda
@pytest.mark.parametrize("data", ["GPU tensors", "pinned DataLoader"])
@pytest.mark.parametrize("options", [{}, {"adam": True}, {"precision": "bf16"}, {"hook": True},
                                     {"adam": True, "accumulate": 2, "clip_grad": 1.0}],
                         ids=["defaults", "adam", "bf16", "a step hook", "accumulate and clip"])
def test_cuda_no_host_sync_inside_training_steps(data, options, monkeypatch):
    X, y = make_data(512)  # 16 batches of 32
    Xv, yv = make_data(96, seed=1)  # 3 validation batches
    if data == "GPU tensors":  # on the GPU already, sliced there: no copy to wait for
        loader, val_loader = (X.cuda(), y.cuda()), (Xv.cuda(), yv.cuda())
    else:
        loader = DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True, pin_memory=True)
        val_loader = DataLoader(TensorDataset(Xv, yv), batch_size=32, pin_memory=True)
    options = dict(options)
    adam, hook = options.pop("adam", False), options.pop("hook", False)

    def run(epochs, forward_modes=None):
        model = make_mlp()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01) if adam else \
            torch.optim.SGD(model.parameters(), lr=0.1)
        if forward_modes is not None:
            check_syncs_in_steps(model, optimizer, batches=16)
            model.register_forward_pre_hook(
                lambda module, args: forward_modes.append(torch.cuda.get_sync_debug_mode()))
        return train(model=model, optimizer=optimizer, loader=loader,
                     hooks=[listener()] if hook else [], epochs=epochs, val_loader=val_loader,
                     metrics={"acc": loopy.accuracy}, batch_size=32, shuffle=True,
                     progress=True, **options)  # progress on, as by default

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)  # a line, not a bar
    run(1)  # a warm-up: cuBLAS, autocast and the pinned-memory pool start up once, unchecked
    monkeypatch.setattr(loopy._Meter, "FOLD", 4)  # the running sums fold inside checked steps too
    modes = []
    loop = run(2, modes)
    assert torch.cuda.get_sync_debug_mode() == 0  # off again at each epoch's end
    assert loop.step == 2 * 16 // options.get("accumulate", 1) and len(loop.history["val_acc"]) == 2
    # every training forward ran under the check (2, "error"); validation, at the epoch's end, not
    assert modes == ([2] * 16 + [0] * 3) * 2


@pytest.mark.cuda
def test_cuda_the_sync_check_catches_a_sync_inside_a_step():
    X, y = make_data(128)  # 4 batches
    model = make_mlp()
    train(model=model, loader=(X.cuda(), y.cuda()))  # a warm-up, unchecked
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    check_syncs_in_steps(model, optimizer, batches=4)

    def reads_the_loss():  # float() of a CUDA tensor waits for the GPU: what the check is for
        while True:
            float((yield "step").loss)

    with pytest.raises(RuntimeError, match="called a synchronizing CUDA operation"):
        train(model=model, optimizer=optimizer, loader=(X.cuda(), y.cuda()),
              hooks=[reads_the_loss()])


@pytest.mark.cuda
def test_cuda_a_loss_module_a_number_metric_and_a_packed_sequence_on_the_gpu():
    X, y = make_data(64)

    def run(device):
        model = make_mlp()
        loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))
        loop = loopy.fit(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                         val_loader=(X, y), device=device, progress=False,
                         metrics={"acc": lambda o, t: loopy.accuracy(o, t).item()})
        assert loss_fn.weight.device.type == device
        return loop.history

    on_gpu, on_cpu = run("cuda"), run("cpu")
    for name in ("loss", "acc", "val_loss", "val_acc"):
        assert on_gpu[name] == pytest.approx(on_cpu[name], rel=1e-4, abs=1e-6)
    packed = torch.nn.utils.rnn.pack_sequence([torch.ones(3, 2), torch.ones(2, 2)])
    moved = loopy._to_device([packed], torch.device("cuda"), False)[0]
    assert moved.data.is_cuda and moved.batch_sizes.device.type == "cpu"


@pytest.mark.cuda
def test_cuda_a_sliced_pinned_dataloader_trains_like_the_dataloader(monkeypatch):
    X, y = make_data(203)

    def run():
        model = make_mlp(dropout=0.2)
        torch.manual_seed(1)
        loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                  DataLoader(TensorDataset(X, y), 32, shuffle=True, pin_memory=True), epochs=2,
                  device="cuda", progress=False)
        return model

    sliced = run()
    monkeypatch.setattr(loopy, "_sliced", lambda loader: loader)
    assert same_weights(sliced, run())
