"""loopy against the frameworks users would pick instead (issue 7), on identical work.

Every runner trains the same torch model from the same initial weights on the same data in
the same order (same seed), batch 64, CPU, torch.set_num_threads(1). Peers are optional: a
runner whose package is missing is skipped with a note (``pip install .[bench]``).

Workloads: (1) mlp: an overhead-bound MLP 32-64-10 on in-memory tensors through a DataLoader;
(2) cnn: a small compute-bound CNN; (3) mlp_val: workload 1 plus an accuracy metric and a
validation loader every epoch (every runner does that same work).

Figures:
- ms/step: median over interleaved rounds (a new random runner order every round) of the wall
  time of everything the user writes to train one epoch, once the model, optimizer and data
  exist (a framework's Trainer/Engine/compile is inside), divided by the optimizer steps;
  x hand: the median over rounds of the paired ratio to the hand-written DataLoader loop.
- weights: the final parameters against the hand-written loop's (torch.equal, else max |diff|).
- import: ``import X`` beyond ``import torch`` in the same fresh process, median of several.
- e2e: wall time (and CPU time, user + system, which a busy machine disturbs less) of a fresh
  process that imports, builds the data and the model, and trains one epoch of workload 1
  (median of several).
- memory: in those processes, the peak RSS of the whole process (VmHWM), and the training
  peak above the RSS just before training (the kernel's peak mark is reset there through
  /proc/self/clear_refs, so the import peak does not hide it). tracemalloc would miss torch's
  tensors (they are not allocated through Python's allocator), hence RSS.

    python benchmarks/peers.py              # full run, Markdown (a few minutes)
    python benchmarks/peers.py --json       # JSON
    python benchmarks/peers.py --quick      # smoke run with tiny sizes
    python benchmarks/peers.py --runners hand,loopy,lightning_lean --workloads mlp
"""

import argparse
import atexit
import contextlib
import importlib.util
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything can import keras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# --- runners -------------------------------------------------------------------------------
# Each factory imports its framework (so that the import stays outside the timed region) and
# returns fn(model, optimizer, workload), which trains workload.epochs epochs.

def _hand():
    def run(model, optimizer, w):
        C.hand_loop(model, optimizer, w.loader, w.epochs, w.val_loader, w.metric)
    return run


def _sliced():
    def run(model, optimizer, w):
        val = C.Slices(w.Xv, w.yv, shuffle=False) if w.val_steps else None
        C.hand_loop(model, optimizer, C.Slices(w.X, w.y), w.epochs, val, w.metric)
    return run


def _loopy(tensors=False, **options):
    import loopy

    def run(model, optimizer, w):
        extra = {}
        if w.metric:
            extra["metrics"] = {"acc": loopy.accuracy}
        if tensors:
            if w.val_steps:
                extra["val_loader"] = (w.Xv, w.yv)
            loopy.fit(model, F.cross_entropy, optimizer, (w.X, w.y), batch_size=C.BATCH,
                      shuffle=True, epochs=w.epochs, **extra, **options)
        else:
            loopy.fit(model, F.cross_entropy, optimizer, w.loader, val_loader=w.val_loader,
                      epochs=w.epochs, **extra, **options)
    return run


def _lightning(lean):
    import lightning as L
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the "GPU available: ..." banner

    class Module(L.LightningModule):
        def __init__(self, net, optimizer, metric):
            super().__init__()
            self.net, self.metric, self._optimizer = net, metric, optimizer

        def training_step(self, batch, batch_index):
            x, y = batch
            output = self.net(x)
            loss = F.cross_entropy(output, y)
            if self.metric:
                self.log("loss", loss, on_step=False, on_epoch=True, prog_bar=True)
                self.log("acc", C.accuracy(output, y), on_step=False, on_epoch=True,
                         prog_bar=True)
            return loss

        def validation_step(self, batch, batch_index):
            x, y = batch
            output = self.net(x)
            self.log("val_loss", F.cross_entropy(output, y), prog_bar=True)
            self.log("val_acc", C.accuracy(output, y), prog_bar=True)

        def configure_optimizers(self):
            return self._optimizer

    root = tempfile.mkdtemp(prefix="bench-lightning-")  # its logs and checkpoints go here
    atexit.register(shutil.rmtree, root, True)
    options = dict(enable_progress_bar=False, logger=False, enable_checkpointing=False,
                   enable_model_summary=False) if lean else {}

    def run(model, optimizer, w):
        trainer = L.Trainer(max_epochs=w.epochs, default_root_dir=root, **options)
        trainer.fit(Module(model, optimizer, w.metric), w.loader, w.val_loader)
    return run


def _ignite():
    from ignite.engine import Events, create_supervised_evaluator, create_supervised_trainer
    from ignite.metrics import Accuracy, Average, Loss

    def run(model, optimizer, w):
        if not w.metric:
            trainer = create_supervised_trainer(model, optimizer, F.cross_entropy)
        else:
            trainer = create_supervised_trainer(
                model, optimizer, F.cross_entropy,
                output_transform=lambda x, y, y_pred, loss: (y_pred, y, loss.detach()))
            Accuracy(output_transform=lambda out: out[:2]).attach(trainer, "acc")
            Average(output_transform=lambda out: out[2]).attach(trainer, "loss")
        if w.val_loader is not None:
            evaluator = create_supervised_evaluator(
                model, metrics={"acc": Accuracy(), "loss": Loss(F.cross_entropy)})
            trainer.add_event_handler(Events.EPOCH_COMPLETED,
                                      lambda engine: evaluator.run(w.val_loader))
        trainer.run(w.loader, max_epochs=w.epochs)
    return run


def _keras():
    import keras

    def run(model, optimizer, w):
        wrapped = keras.Sequential([keras.Input(shape=w.input_shape),
                                    keras.layers.TorchModuleWrapper(model)])
        wrapped.compile(optimizer=keras.optimizers.SGD(learning_rate=C.LR, momentum=C.MOMENTUM),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        metrics=["accuracy"] if w.metric else None)
        wrapped.fit(w.loader, epochs=w.epochs, validation_data=w.val_loader)
    return run


def _poutyne():
    import poutyne

    def run(model, optimizer, w):
        trainer = poutyne.Model(model, optimizer, F.cross_entropy,
                                batch_metrics=["accuracy"] if w.metric else None)
        trainer.fit_generator(w.loader, w.val_loader, epochs=w.epochs)
    return run


def _accelerate():
    from accelerate import Accelerator

    def run(model, optimizer, w):
        accelerator = Accelerator()
        model, optimizer, loader = accelerator.prepare(model, optimizer, w.loader)
        val_loader = accelerator.prepare(w.val_loader) if w.val_loader is not None else None
        C.hand_loop(model, optimizer, loader, w.epochs, val_loader, w.metric,
                    backward=accelerator.backward)
    return run


# key, row name, package needed, factory, the import a user writes (for the import cost)
RUNNERS = [
    ("hand", "hand-written loop (DataLoader)", None, _hand, None),
    ("sliced", "hand-written loop, sliced tensors", None, _sliced, None),
    ("loopy", "loopy defaults", None, lambda: _loopy(), "import loopy"),
    ("loopy_lean", "loopy lean (`progress=False`)", None, lambda: _loopy(progress=False),
     "import loopy"),
    ("loopy_tensors", "loopy tensors `(X, y), batch_size=64, shuffle=True`", None,
     lambda: _loopy(tensors=True), "import loopy"),
    ("lightning", "Lightning defaults", "lightning", lambda: _lightning(False),
     "import lightning"),
    ("lightning_lean", "Lightning lean (no bar/logger/checkpoint/summary)", "lightning",
     lambda: _lightning(True), "import lightning"),
    ("ignite", "Ignite `create_supervised_trainer`", "ignite", _ignite,
     "from ignite.engine import create_supervised_trainer"),
    ("keras", "Keras 3 (torch backend) `compile`+`fit`", "keras", _keras, "import keras"),
    ("poutyne", "Poutyne `Model.fit_generator`", "poutyne", _poutyne, "import poutyne"),
    ("accelerate", "Accelerate around the raw loop", "accelerate", _accelerate,
     "from accelerate import Accelerator"),
]
PEERS = ("lightning", "lightning_lean", "ignite", "keras", "poutyne", "accelerate")
PACKAGES = {"lightning": "lightning", "ignite": "pytorch-ignite", "keras": "keras",
            "poutyne": "poutyne", "accelerate": "accelerate"}
NOTES = {
    "sliced": "its own torch.randperm draws: a different batch order, so different weights",
    "keras": "Keras's own SGD and loss on the same torch module (TorchModuleWrapper); its fit "
             "iterates the DataLoader 3 times for one epoch (it peeks at the data), so the "
             "shuffle draws and the batch order differ (with shuffle=False: max diff 9e-8)",
}


def available(keys):
    chosen, skipped = [], {}
    for key, name, package, factory, statement in RUNNERS:
        if key not in keys:
            continue
        if package is not None and importlib.util.find_spec(package) is None:
            skipped[key] = f"{name}: skipped, `{PACKAGES[package]}` is not installed"
            continue
        chosen.append((key, name, package, factory, statement))
    return chosen, skipped


def build_runners(chosen, skipped):
    runners = []
    for key, name, package, factory, _ in chosen:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = factory()
        except Exception as error:  # an installed but broken package: skip, say why
            skipped[key] = f"{name}: skipped, {type(error).__name__}: {error}"
            continue
        runners.append(C.Runner(key, name, _silenced(fn), None if key == "hand" else "hand",
                                note=NOTES.get(key, "")))
    return runners


def _silenced(fn):
    def run(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(*args)
    return run


def cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 10))


def workload_cnn(steps):
    return C.Workload("cnn", f"compute-bound CNN on 1x28x28, {steps} steps", cnn, (1, 28, 28),
                      steps)


def workloads(quick, steps=None):
    if quick:
        s = steps or 16
        return {"mlp": C.workload_mlp(s), "cnn": workload_cnn(max(s // 4, 2)),
                "mlp_val": C.workload_mlp_val(s, max(s // 4, 1))}
    return {"mlp": C.workload_mlp(steps or 256), "cnn": workload_cnn(32),
            "mlp_val": C.workload_mlp_val(steps or 256, 64)}


# --- fresh-process measurements ------------------------------------------------------------

def child(key, workload_key, steps):
    """In a fresh process: import, build, train one epoch; print the memory figures."""
    torch.set_num_threads(1)
    (entry,) = [r for r in RUNNERS if r[0] == key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = entry[3]()
    w = workloads(False, steps)[workload_key]
    model, optimizer = w.build()
    torch.manual_seed(C.SEED + 1)
    before, import_peak = C.rss_kib()
    reset = C.reset_peak_rss()
    with C.quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(model, optimizer, w)
    _, train_peak = C.rss_kib()
    print("CHILD-RESULT", json.dumps({
        "rss_before_kib": before, "train_peak_kib": train_peak, "reset_ok": reset,
        "process_peak_kib": max(import_peak, train_peak)}))


def fresh_process(key, workload_key, steps, repeats):
    """Median wall time of the whole child process, and its memory figures (medians)."""
    walls, cpus, results = [], [], []
    for _ in range(repeats):
        command = [sys.executable, os.path.abspath(__file__), "--child", key,
                   "--workloads", workload_key] + (["--steps", str(steps)] if steps else [])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=C.ROOT)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if done.returncode != 0 or "CHILD-RESULT" not in done.stdout:
            return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
        results.append(json.loads(done.stdout.split("CHILD-RESULT", 1)[1]))
    med = lambda name: C.median([r[name] for r in results]) / 1024  # noqa: E731
    return {"e2e_s": C.median(walls), "e2e_cpu_s": C.median(cpus),
            "process_peak_mib": med("process_peak_kib"),
            "train_growth_mib": C.median([r["train_peak_kib"] - r["rss_before_kib"]
                                          for r in results]) / 1024,
            "peak_reset": all(r["reset_ok"] for r in results), "repeats": repeats}


# --- main ----------------------------------------------------------------------------------

def main(argv=None):
    parser = C.parser(__doc__)
    parser.add_argument("--runners", help="comma-separated keys (default: all); keys: " +
                        ", ".join(r[0] for r in RUNNERS))
    parser.add_argument("--workloads", help="comma-separated: mlp, cnn, mlp_val (default all)")
    parser.add_argument("--steps", type=int, help="MLP steps per epoch (default 256)")
    parser.add_argument("--rounds", type=int, help="timed rounds per workload (default 9)")
    parser.add_argument("--repeats", type=int,
                        help="fresh processes per import / e2e figure (default 5 / 3)")
    parser.add_argument("--no-processes", action="store_true",
                        help="skip the fresh-process figures (import, e2e, memory)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.workloads, args.steps)

    keys = args.runners.split(",") if args.runners else [r[0] for r in RUNNERS]
    unknown = set(keys) - {r[0] for r in RUNNERS}
    if unknown:
        parser.error(f"unknown runners {sorted(unknown)}")
    if "hand" not in keys:
        keys.insert(0, "hand")
    rounds = args.rounds or (2 if args.quick else 9)
    import_repeats = args.repeats or (1 if args.quick else 5)
    e2e_repeats = args.repeats or (1 if args.quick else 3)
    all_workloads = workloads(args.quick, args.steps)
    chosen_workloads = args.workloads.split(",") if args.workloads else list(all_workloads)

    torch.set_num_threads(1)
    chosen, skipped = available(keys)
    # a reference run before any framework is imported: importing them must change nothing
    w0 = all_workloads[chosen_workloads[0]]
    model, optimizer = w0.build()
    torch.manual_seed(C.SEED + 1)
    _hand()(model, optimizer, w0)
    pristine = [p.detach().clone() for p in model.parameters()]
    runners = build_runners(chosen, skipped)

    result = {"machine": C.machine(), "clock": args.clock, "batch_size": C.BATCH, "rounds": rounds,
              "versions": versions(), "skipped": skipped, "workloads": {}}
    for wkey in chosen_workloads:
        w = all_workloads[wkey]
        times, weights = C.time_runners(runners, w, rounds, warmup=1, clock=args.clock)
        rows = C.summarize(runners, times, weights, reference="hand")
        entry = {"title": w.title, "steps": w.total_steps, "rows": rows}
        if "sliced" in times and "loopy_tensors" in times:
            entry["tensors_vs_sliced"] = C.median(
                [a / b for a, b in zip(times["loopy_tensors"], times["sliced"])])
        if wkey == chosen_workloads[0]:
            entry["imports_changed_nothing"] = all(
                torch.equal(a, b) for a, b in zip(pristine, weights["hand"]))
        result["workloads"][wkey] = entry

    if not args.no_processes:
        result["processes"] = processes(runners, chosen, import_repeats, e2e_repeats,
                                        args.steps or (16 if args.quick else None))
    result["targets"] = targets(result)
    return C.report(result, args, render)


def processes(runners, chosen, import_repeats, e2e_repeats, steps):
    statements = {key: statement for key, _, _, _, statement in chosen}
    by_statement, rows = {}, {}
    for runner in runners:
        statement = statements[runner.key]
        row = {"import_ms": 0.0 if statement is None else None}
        if statement is not None:
            if statement not in by_statement:
                beyond, _ = C.import_cost(statement, import_repeats)
                by_statement[statement] = 1e3 * beyond
            row["import_ms"] = by_statement[statement]
        row["mlp"] = fresh_process(runner.key, "mlp", steps, e2e_repeats)
        rows[runner.key] = row
    return rows


def versions():
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for name in ("torch", "lightning", "pytorch-ignite", "keras", "poutyne", "accelerate"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def targets(result):
    out = {}
    mlp = result["workloads"].get("mlp")
    if mlp:
        rows = {r["key"]: r for r in mlp["rows"]}
        for key, limit in (("loopy", 1.05), ("loopy_lean", 1.02)):
            if key in rows:
                out[f"{key} per step on mlp <= {limit}x hand"] = (rows[key]["ratio"],
                                                                 rows[key]["ratio"] <= limit)
        if "tensors_vs_sliced" in mlp:
            out["loopy tensors <= 1.10x hand-sliced on mlp"] = (
                mlp["tensors_vs_sliced"], mlp["tensors_vs_sliced"] <= 1.10)
        if "loopy" in rows and rows["loopy"].get("bit_identical") is not None:
            out["loopy weights bit-identical to hand"] = (None, rows["loopy"]["bit_identical"])
        peers = [r for r in mlp["rows"] if r["key"] in PEERS]
        if peers and "loopy" in rows:
            out["loopy defaults faster than every peer on mlp"] = (
                None, all(rows["loopy"]["ms_per_step"] < r["ms_per_step"] for r in peers))
    proc = result.get("processes", {})
    if "loopy" in proc:
        out["import loopy < 30 ms beyond torch"] = (proc["loopy"]["import_ms"],
                                                    proc["loopy"]["import_ms"] < 30)
    if "loopy" in proc and "hand" in proc and "process_peak_mib" in proc["loopy"]["mlp"] \
            and "process_peak_mib" in proc["hand"]["mlp"]:
        ratio = proc["loopy"]["mlp"]["process_peak_mib"] / proc["hand"]["mlp"]["process_peak_mib"]
        out["loopy process peak RSS <= 1.05x hand"] = (ratio, ratio <= 1.05)
    return out


def render(result):
    m = result["machine"]
    lines = [
        f"### loopy vs peers: batch {result['batch_size']}, CPU, 1 thread",
        "",
        f"{m['cpu']} ({m['logical_cpus']} logical CPUs), Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + f"; {C.CLOCK_WORDS[result['clock']]}, median of {result['rounds']} interleaved "
        f"rounds. Command: `{m['command']}`",
    ]
    for wkey, entry in result["workloads"].items():
        table = []
        for row in entry["rows"]:
            ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "1.00x"
            table.append([row["runner"], f"{row['ms_per_step']:.3f}", ratio,
                          C.weights_cell(row) if row["key"] != "hand" else "(reference)"])
        lines += ["", f"**{wkey}: {entry['title']}**", "",
                  C.markdown_table(["runner", "ms/step", "x hand", "weights vs hand"], table)]
        if "tensors_vs_sliced" in entry:
            lines += ["", f"loopy tensor path / hand-sliced loop: "
                          f"**{entry['tensors_vs_sliced']:.3f}x** (paired, median)"]
    proc = result.get("processes")
    if proc:
        names = {r["key"]: r["runner"] for e in result["workloads"].values() for r in e["rows"]}
        table = []
        for key, row in proc.items():
            mlp = row["mlp"]
            if "error" in mlp:
                table.append([names.get(key, key), fmt_ms(row["import_ms"]),
                              "error: " + " ".join(mlp["error"]), "", ""])
                continue
            table.append([names.get(key, key), fmt_ms(row["import_ms"]),
                          f"{mlp['e2e_s']:.2f} / {mlp['e2e_cpu_s']:.2f}",
                          f"{mlp['process_peak_mib']:.1f}", f"{mlp['train_growth_mib']:.2f}"])
        first = next(iter(proc.values()))["mlp"]
        lines += ["", "**Fresh processes** (workload mlp, one epoch; import: median of "
                  "several processes, beyond `import torch`; e2e and memory: median of "
                  f"{first.get('repeats', '?')})", "",
                  C.markdown_table(["runner", "import beyond torch (ms)", "e2e wall / CPU (s)",
                                    "peak RSS (MiB)", "training RSS growth (MiB)"], table)]
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(result["skipped"].values())]
    notes = sorted({f"{r['runner']}: {r['note']}" for e in result["workloads"].values()
                    for r in e["rows"] if r.get("note")})
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    if result["targets"]:
        lines += ["", "Targets:"]
        for name, (value, ok) in result["targets"].items():
            shown = "" if value is None else f" ({value:.3f})"
            lines.append(f"- {name}{shown}: {'met' if ok else '**missed**'}")
    return "\n".join(lines)


def fmt_ms(value):
    return "—" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


if __name__ == "__main__":
    main()
