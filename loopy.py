# MIT License
#
# Copyright (c) 2026 The loopy authors
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.
"""loopy: the PyTorch training loop in one call, with hooks written as plain generators.

    import torch, loopy
    X, y = torch.randn(512, 20), torch.randint(0, 3, (512,))
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loop = loopy.fit(model, torch.nn.functional.cross_entropy, optimizer, (X, y),
                     batch_size=64, shuffle=True, epochs=3, metrics={"acc": loopy.accuracy})
    print(loop.history["loss"], loop.history["acc"])

A hook is a generator: code before its first ``yield`` runs when training starts, each
``loop = yield "epoch"`` waits for an event and receives the live Loop, ``finally:`` is teardown.
"""

__version__ = "0.1.0"
__all__ = ["fit", "evaluate", "predict", "accuracy", "lr_find", "Loop", "HookError", "EVENTS",
           "plot_history", "progress", "early_stopping", "checkpoint", "csv_logger", "tensorboard",
           "log_to", "live_plot", "ema"]

import atexit
import collections.abc
import contextlib
import copy
import dataclasses
import datetime
import errno
import inspect
import itertools
import math
import numbers
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings

import torch

EVENTS = ("start", "batch", "backward", "step", "epoch", "end")


class HookError(RuntimeError):
    """A hook broke the generator protocol (the message names the hook and the fix)."""


def fit(model, loss_fn, optimizer, loader, hooks=(), *, epochs=None, val_loader=None, metrics=None,
        device="auto", progress=True, step=None, batch_size=None, shuffle=None, drop_last=False,
        val_batch_size=None, scheduler=None, scheduler_interval=None, scheduler_monitor=None,
        precision=None, accumulate=1, clip_grad=None, seed=None, max_steps=None, dry_run=False,
        nonfinite="raise", resume=None, ddp_options=None, process_group_timeout=600,
        resume_missing_ok=False, exit_on_signal=True):
    """Train ``model`` and return the :class:`Loop` that the hooks saw; with the same seed, the
    weights equal the hand-written loop's bit for bit::

        for epoch in range(epochs):
            for x, y in loader:
                loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()

    Parameters:
        model: an ``nn.Module``, moved to ``device``; called as ``model(x)``, ``model(*x)`` (a
            tuple or list ``x``) or ``model(**x)`` (a dict). It trains in train mode, except for
            submodules in eval mode when fit is called (a frozen BatchNorm backbone), which stay
            so (with a warning if their parameters train); a model wholly in eval mode trains.
        loss_fn: ``loss_fn(output, y) -> scalar tensor``; None when ``step`` is given.
            An ``nn.Module`` loss moves with the model. Output and target shapes that broadcast
            to more elements than either (``(N, 1)`` and ``(N,)``) are an error at the first step.
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters (and a loss module's);
            or several, as a list or a dict of names to optimizers (``loop.optimizers``), for a
            manual ``step``.
        loader: an iterable of batches (a ``DataLoader``), or tensors ``(X, y)``, batched by
            ``batch_size``, ``shuffle`` and ``drop_last`` exactly as ``DataLoader(TensorDataset(X,
            y))`` does. NumPy arrays are taken as tensors: floating and bool ones in torch's default
            dtype (bool labels as 0.0/1.0), integer ones as int64.
        hooks: generator objects, e.g. ``[loopy.early_stopping(patience=3)]`` (see ``EVENTS``).
        epochs: the total number of passes over ``loader``, also when resuming; None: 1, or
            as many as ``max_steps`` needs when it is given (``loop.epochs`` is then None).
        val_loader: evaluated after every epoch (no grad, eval mode); recorded as ``val_*``.
        metrics: ``{"name": fn(output, target) -> tensor}`` (epoch means weighted by batch size;
            a function returning a number, such as a scikit-learn metric, works but has synced
            with the device to compute it) or objects with ``update/compute/reset`` (a
            torchmetrics ``Metric``).
        device: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda:1"``, a ``torch.device``.
        progress: what the :func:`progress` hook shows: ``True`` or ``"bar"`` (a live bar where a
            person watches, a terminal or a notebook, and a complete line per epoch on stdout),
            ``"epoch"`` (only the lines, like Keras's ``verbose=2``) or ``False`` (nothing).
        step: ``step(model, batch)`` for any other update, returning the loss or ``(loss, output,
            target)``; validation runs it too, with ``model.training`` False and no grad.
            A manual step, ``step(model, batch, loop)`` (three parameters), makes the updates
            itself with ``loop.backward(loss)`` and ``loop.step_optimizer(name)``, and returns
            a dict of detached numbers to record, ``{"loss_d": ..., "loss_g": ...}`` (or
            ``(numbers, output, target)`` for ``metrics``); it gets your own model, also under
            torchrun, where ``loop.step_optimizer`` averages the gradients over processes.
        batch_size, shuffle, drop_last: for in-memory tensors only, as DataLoader's (default 32,
            False, False); for a DataLoader, set them on it (giving them here is an error, as is
            any option that would be ignored).
        val_batch_size: the batch size for in-memory ``val_loader`` tensors (None: ``batch_size``).
        scheduler: a ``torch.optim.lr_scheduler`` (or a list or dict of them), stepped every
            ``scheduler_interval`` (``"epoch"`` or ``"step"``); ``ReduceLROnPlateau`` gets
            ``scheduler_monitor`` (``"val_loss"``, or ``"loss"`` without validation).
            ``history["lr"]`` holds the (first) optimizer's rate at each epoch's end (before an
            epoch scheduler steps: the rate the epoch used; a step scheduler has stepped: the
            next epoch's first rate). Each must be built for one of the run's optimizers.
        precision: None (full), ``"bf16"`` or ``"fp16"`` (autocast; fp16 adds a GradScaler).
        accumulate: step every n batches, the loss scaled to give the gradient of one n times
            larger batch (an epoch's last partial group still steps, scaled by its own size when
            the loader has a len(), by n otherwise).
        clip_grad: clip the gradient norm to this value; ``loop.grad_norm`` is the norm before.
        seed: seed Python, NumPy (if imported) and torch first, for shuffling and dropout (seed
            the initial weights before building the model); None leaves them. With ``resume``
            the checkpoint's random state replaces it.
        max_steps: stop after this many steps (``loop.step``: optimizer steps; with a manual
            step, batches, or accumulation groups), as ``loop.stop()`` does.
        dry_run: one epoch of 2 batches and 2 validation batches; checkpoints are not written.
        nonfinite: ``"raise"`` (a FloatingPointError naming the first bad epoch and step, checked
            when numbers are pulled: no per-step sync), ``"skip"`` (no update for that batch,
            counted in ``history["skipped"]``; syncs every step) or ``"ignore"``.
        resume: path of a :func:`checkpoint` file; the run continues exactly where it stopped.
        resume_missing_ok: start afresh when the ``resume`` file does not exist yet, so that one
            command line serves the first launch and every relaunch (a requeued job).
        exit_on_signal: after SIGTERM or SIGUSR1 (preemption), which stop training as a first
            Ctrl+C does (the step ends, ``"end"`` runs: a checkpoint saves), end the process with
            status 128 + the signal (143 for SIGTERM); False returns the Loop instead.

        ddp_options: keyword arguments for the DistributedDataParallel that wraps the model
            under torchrun, e.g. ``{"find_unused_parameters": True}``.
        process_group_timeout: seconds that a collective waits for the other processes before
            it fails, when loopy starts the process group (default 600, NCCL's own default).

    Under ``torchrun`` the model trains as DistributedDataParallel (or as the user wrapped it:
    DDP, or FSDP2's ``fully_shard``) on each process's shard of the data; every metric in the
    history is global and the same on every process; only rank 0 shows progress and saves.

    Returns the :class:`Loop`; ``loop.history`` maps each metric to its per-epoch floats.

    Raises TypeError or ValueError for bad arguments, before training starts, and HookError when
    a hook breaks the protocol; errors from the model, loss or hooks propagate as they are.
    """
    hooks = _check_hooks(hooks)
    run = _prepare(model, loss_fn, optimizer, loader, epochs=epochs, val_loader=val_loader,
                   metrics=metrics, device=device, step=step, batch_size=batch_size,
                   shuffle=shuffle, drop_last=drop_last, val_batch_size=val_batch_size,
                   scheduler=scheduler, scheduler_interval=scheduler_interval,
                   scheduler_monitor=scheduler_monitor, precision=precision,
                   accumulate=accumulate, clip_grad=clip_grad, seed=seed, max_steps=max_steps,
                   dry_run=dry_run, nonfinite=nonfinite, resume=resume, progress=progress,
                   ddp_options=ddp_options, process_group_timeout=process_group_timeout,
                   resume_missing_ok=resume_missing_ok, exit_on_signal=exit_on_signal)
    loop = Loop(run, loader, val_loader)
    hooks = _with_builtin_hooks(hooks, run)
    with _HookRunner(hooks, loop) as runner, _signals_stop(loop), _counting_steps(loop):
        position = _restore(loop, run.resume) if run.resume is not None else None
        for each in run.optimizers.values():
            if any(p.grad is not None for p in _parameters(each)):  # (zero_grad costs ~10 µs)
                each.zero_grad()
        runner.emit("start")
        end = run.epochs or sys.maxsize  # (None: until max_steps stops it)
        first = end if _should_stop(loop, run) else loop.epoch  # (a stop at "start")
        for loop.epoch in range(first, end):
            # forward, backward and optimizer step for each batch
            if not _train_epoch(loop, run, runner, position):
                break  # stopped inside the epoch: not recorded; a resume continues it
            position = None
            # validation, the epoch's means, an epoch scheduler, the "epoch" event
            _end_epoch(loop, run, runner)
            # termination: a hook's stop, Ctrl+C, max_steps or another process's stop
            if _should_stop(loop, run):
                break
        runner.emit("end")
    if run.train_model is not model:  # release DDP (and the group) now
        loop._run = dataclasses.replace(run, train_model=model)
    if loop._interrupted:
        _report_interruption(loop, run)
    return loop


def evaluate(model, loader, loss_fn=None, metrics=None, device="auto", *, step=None,
             batch_size=None, precision=None):
    """Evaluate ``model`` on ``loader`` under ``torch.no_grad()`` and ``model.eval()``.

    Returns a dict of floats: ``"loss"`` (when ``loss_fn`` or ``step`` is given; the mean
    weighted by batch size) and each metric. The model's train/eval mode is restored.
    Under torchrun each process evaluates its shard and all get the same, global, result.

        >>> loopy.evaluate(model, (X_test, y_test), F.cross_entropy, {"acc": loopy.accuracy})
        {'loss': 0.21, 'acc': 0.94}
    """
    if loss_fn is None and step is None and not metrics:
        raise ValueError("evaluate has nothing to compute: pass loss_fn, like evaluate(model, "
                         "loader, F.cross_entropy), metrics={...} or step=")
    run = _prepare(model, loss_fn, None, loader, metrics=metrics, device=device, step=step,
                   batch_size=batch_size, precision=precision)
    return _evaluate(run, run.batches, "loader", Loop(run, loader), model)


def predict(model, loader, device="auto", *, batch_size=None):
    """Run ``model`` over ``loader`` (batches of inputs, or ``(x, y)`` pairs whose ``y`` is
    ignored) under ``torch.no_grad()`` and ``model.eval()``; return the outputs concatenated
    along dim 0, on the CPU (a tuple or dict of them when the model returns one; one list when it
    returns a list of one item per sample, as detection models do).
    Under torchrun every process predicts the whole loader and returns all outputs.

        >>> probabilities = loopy.predict(model, X_test).softmax(dim=1)
    """
    run = _prepare(model, None, None, loader, device=device, batch_size=batch_size)
    with _eval_mode(model):
        results = [_predict_batch(run, model, batch) for batch in run.batches]
    if not results:
        raise ValueError(f"loader yielded no batches: predict got {_describe(loader)}")
    outputs, sizes = zip(*results)
    try:
        return _concat(outputs, sizes)
    except (RuntimeError, TypeError, KeyError, IndexError):
        raise TypeError(f"predict cannot join the model's outputs ({_describe(outputs[0])} for "
                        f"the first batch): return batch-first tensors of one shape beyond dim 0, "
                        f"a tuple or dict of them, or a list of one item per sample") from None


def accuracy(output, target):
    """Top-1 accuracy as a 0-dim tensor (no host sync). Class scores ``(N, C, ...)`` are
    compared by argmax over dim 1 with class indices ``(N, ...)``, or with the argmax of class
    probabilities or one-hot targets of the output's shape. Binary outputs (``(N,)`` or
    ``(N, 1)``, targets 0/1 of either shape) count as positive above 0.5 when they are all
    within [0, 1] (a sigmoid's probabilities), else above 0 (logits), as torchmetrics'
    ``BinaryAccuracy`` decides."""
    if output.dim() > 1 and output.size(1) > 1 and output.shape == target.shape:
        return (output.argmax(dim=1) == target.argmax(dim=1)).float().mean()
    if output.dim() == target.dim() + 1 and output.size(1) > 1:
        predicted = output.argmax(dim=1)
    else:
        output = output.reshape(target.shape)
        # decided on the device, per call: no sync
        predicted = output > torch.where(((output >= 0) & (output <= 1)).all(), 0.5, 0.0)
        target = target > 0.5
    return (predicted == target).float().mean()


def lr_find(model, loss_fn, optimizer, loader, *, min_lr=1e-7, max_lr=10.0, num_steps=100,
            smoothing=0.98, diverge=4.0, device="auto", step=None, batch_size=None):
    """The learning-rate range test: train ``num_steps`` batches while the learning rate grows
    exponentially from ``min_lr`` to ``max_lr``; stop early when the smoothed loss exceeds
    ``diverge`` times its best. Model, optimizer and RNG states are restored afterwards.
    In-memory tensors ``(X, y)`` are batched by ``batch_size`` (default 32) and shuffled.

    Returns ``{"lr": [...], "loss": [...smoothed...], "suggestion": lr}``, the suggestion being
    the learning rate where the smoothed loss falls fastest before its minimum.

        >>> found = loopy.lr_find(model, F.cross_entropy, optimizer, (X, y))
        >>> for group in optimizer.param_groups: group["lr"] = found["suggestion"]
    """
    if not 0 < min_lr < max_lr or num_steps < 2:
        raise ValueError(f"lr_find needs 0 < min_lr < max_lr and num_steps >= 2; got min_lr="
                         f"{min_lr}, max_lr={max_lr}, num_steps={num_steps}")
    lrs, losses = [], []

    def sweep():
        mean, best = 0.0, math.inf
        while True:
            lr = min_lr * (max_lr / min_lr) ** (len(lrs) / (num_steps - 1))
            for group in (yield "batch").optimizer.param_groups:
                group["lr"] = lr
            loop = yield "step"
            mean = smoothing * mean + (1 - smoothing) * float(loop.loss)
            lrs.append(lr)
            losses.append(mean / (1 - smoothing ** len(lrs)))
            best = min(best, losses[-1])
            if len(lrs) == num_steps or not losses[-1] < diverge * best:
                loop.stop("lr_find finished")

    # (a DataLoader's iter() below draws a random seed; fit's advice to resume does not apply)
    with _restoring(model, optimizer), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "training interrupted by")
        batches = _as_batches(loader, "loader", batch_size, True)
        _check_in_memory(batch_size=(batch_size, loader, isinstance(batches, _TensorBatches)))
        once = iter(batches) is batches  # a generator: one pass
        epochs = 1 if once else num_steps // _length(batches) + 1 if _length(batches) else None
        loop = fit(model, loss_fn, optimizer, batches, [sweep()], epochs=epochs, progress=False,
                   step=step, nonfinite="ignore", device=device,
                   max_steps=None if epochs else num_steps)
    if loop._interrupted:  # Ctrl+C (a preemption signal has ended the process): abort the sweep
        raise KeyboardInterrupt
    if once and len(lrs) < num_steps and losses[-1] < diverge * min(losses):
        raise ValueError(f"lr_find: the loader, {_describe(loader)}, ran out after {len(lrs)} of "
                         f"num_steps={num_steps} batches, and a one-shot iterator cannot be "
                         f"re-iterated: pass a DataLoader or a list, or lower num_steps")
    return {"lr": lrs, "loss": losses, "suggestion": _suggestion(lrs, losses, min_lr, num_steps)}


def plot_history(history, path=None):
    """Plot a run's curves with matplotlib (``pip install matplotlib``): one panel per metric,
    training against validation, per epoch (the learning rate left out). ``history`` is a
    :class:`Loop`, its ``history``, or the result of :func:`lr_find` (its smoothed loss against
    the learning rate on a log scale, the suggestion marked).

    Returns the matplotlib ``Figure`` (closed in pyplot: a notebook shows it once, as the
    cell's value); with ``path``, it is also saved there (a PNG for ``"curves.png"``).

        >>> loopy.plot_history(loop, "curves.png")
    """
    import matplotlib.pyplot as plt
    history = getattr(history, "history", history)
    if not isinstance(history, collections.abc.Mapping) or not history:
        raise ValueError(f"plot_history needs a Loop, its history or lr_find's result, with at "
                         f"least one epoch recorded; got {_describe(history)}")
    plot = _plot_lr_find if "suggestion" in history else _plot_curves  # (lr_find's result)
    figure, axes = plot(plt, history)
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    plt.close(figure)  # the caller shows or saves it; pyplot would show it a second time
    if path is not None:
        figure.savefig(path)
    return figure


class Loop:
    """The live state of one :func:`fit` run: what every hook receives from ``yield``.

    Attributes: ``model``, ``optimizer``, ``loss_fn``, ``loader`` (the user's own objects),
    ``optimizers`` (a dict: the names given, or a list's indexes), ``device``, ``epoch``
    (0-based index of the current epoch), ``epochs``, ``step`` (optimizer steps so far; with a
    manual step, batches or accumulation groups), ``batch_index`` (within the epoch),
    ``num_batches`` (batches in this epoch; None when the loader has no len()), ``batch`` (on
    the device; a ``"batch"`` hook may replace it), ``output``, ``loss`` (detached tensor; a
    manual step's dict), ``grad_norm`` (with ``clip_grad``), ``metrics`` (the last epoch's
    floats), ``metric_names`` (the names that ``metrics`` will have, known at ``"start"``; a
    hook that adds its own metric appends its name there, and at ``"epoch"`` sets it in
    ``metrics`` and appends it to ``history``; None with a manual step), ``history``
    (a list of floats per epoch for each name, NaN in the epochs without that value), ``event``
    (the current event), ``stop_reason``, ``rank`` and ``world_size`` (under torchrun; 0 and 1
    otherwise), ``scheduler``, ``scaler``, ``val_loader``, ``dry_run``, ``val_model`` (the module
    that validation runs: ``model``, unless a hook sets another, as :func:`ema` does),
    ``hook_state`` (a dict that checkpoints save and a resume restores before the hooks' first
    event: tensors, Python numbers, strings, None, lists, tuples and dicts, checked at each save;
    tensors come back on the CPU; a hook that changes it must come before :func:`checkpoint`).
    Its ``repr`` is one line: epochs done, steps, the stop reason and the last metrics.

    A manual step, ``step(model, batch, loop)``, updates through :meth:`backward` and
    :meth:`step_optimizer`; there the ``"backward"`` event comes before each optimizer's step
    (its gradients unscaled and clipped), and ``"step"`` after each batch (or group).
    """

    def __init__(self, run, loader, val_loader=None):
        self.model, self.loss_fn, self.optimizer = run.model, run.loss_fn, run.optimizer
        self.optimizers = run.optimizers
        self.loader, self.val_loader, self.device = loader, val_loader, run.device
        self.scheduler, self.scaler, self.dry_run = run.scheduler, run.scaler, run.dry_run
        self.rank, self.world_size, self.epochs = run.rank, run.world_size, run.epochs
        self.epoch = self.step = 0
        self.batch_index, self.num_batches = -1, None
        self.batch = self.output = self.loss = self.grad_norm = self.event = None
        self.stop_reason, self.metrics, self.history = None, {}, {}
        self.val_model, self.hook_state = run.model, {}
        self.metric_names = None if run.metric_names is None else list(run.metric_names)
        self._run = run  # the run's options (read only)
        self._epoch = None  # the current epoch's record: its meters, position and completion
        self._interrupted = 0  # the first stopping signal received (SIGINT, SIGTERM, SIGUSR1)
        self._last_save = None  # the path of the last checkpoint, for the Ctrl+C message

    def stop(self, reason="stopped by a hook"):
        """End training at the next boundary (after this optimizer step, or this epoch);
        ``"end"`` still runs. An epoch cut short is not recorded in the history; a checkpoint
        taken then resumes it from the next batch."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def print(self, *values, sep=" ", end="\n", file=None):
        """``print``, on rank 0 only, through ``tqdm.write`` when tqdm is loaded, so that a live
        progress bar is cleared first and redrawn after: the way to print from a hook at
        ``"batch"``, ``"backward"`` or ``"step"`` (at ``"epoch"`` the bar is already cleared)."""
        if self.rank != 0:
            return
        tqdm = sys.modules.get("tqdm")
        if tqdm is None:
            return print(*values, sep=sep, end=end, file=file, flush=True)
        tqdm.tqdm.write(sep.join(map(str, values)), file=file, end=end)
        (file or sys.stdout).flush()

    def __repr__(self):
        stop = f", stopped: {self.stop_reason}" if self.stop_reason else ""
        return (f"<Loop epoch {self.epoch + _epoch_complete(self)}{_of(self.epochs)}, step "
                f"{self.step}{stop}; {_format_metrics(self.metrics) or 'no metrics yet'}>")

    def backward(self, loss, name=None):
        """``loss.backward()`` in a manual step, scaled by fp16's GradScaler and by 1/n for
        ``accumulate=n``; nothing under no grad (validation runs the same step). With ``name``,
        only the parameters of ``loop.optimizers[name]`` get gradients (a generator's loss
        leaves the discriminator's alone)."""
        run = self._run
        if torch.is_grad_enabled():
            group = _group_size(self, run, self._epoch) if run.accumulate > 1 else 1
            inputs = None if name is None else _parameters(_optimizer_named(run, name))
            with _outside_autocast(run):
                _scaled(run, loss, group).backward(inputs=inputs)

    def step_optimizer(self, name):
        """Unscale, clip, step and zero the gradients of ``loop.optimizers[name]`` in a manual
        step (under torchrun, average them over processes first); only at an accumulation
        group's end, and not under no grad. Returns whether it stepped. fp16's GradScaler
        updates once per batch (or group), after all optimizers stepped."""
        run, epoch = self._run, self._epoch
        if not torch.is_grad_enabled() or \
                self.batch_index % run.accumulate != _group_size(self, run, epoch) - 1:
            return False
        with _outside_autocast(run):
            _apply_update(self, run, epoch.runner, _optimizer_named(run, name))
        if isinstance(run.autocast, torch.autocast):  # (the step runs inside it)
            torch.clear_autocast_cache()  # its low-precision copies of the old weights
        epoch.scaled = run.scaler is not None
        return True

    def averages(self):
        """The running means of this epoch so far, as floats (this pulls numbers off the device)."""
        meters = self._epoch.meters if self._epoch is not None else {}
        values = {name: meter.mean() for name, meter in meters.items() if meter.count}
        _check_finite(self, values.get("loss"))
        return values

    def state_dict(self):
        """The full training state that :func:`checkpoint` saves and ``fit(resume=...)`` loads;
        ``"finished"`` says why the run ended (None while it runs, or when a signal stopped it).
        With ``nonfinite="raise"``, a non-finite loss so far raises instead, so that no state
        computed from it is ever saved."""
        if self._epoch is not None:
            self.averages()  # (raises on a non-finite loss; a sync, as saving is anyway)
        model, optimizers = _model_and_optimizer_state(self.model, self._run.optimizers)
        batches = self._run.batches
        finished = self.event == "end" and not self._interrupted
        return {"format": "loopy-checkpoint/1", "model": model, "optimizers": optimizers,
                "optimizer_types": [type(each).__name__ for each in self._run.optimizers.values()],
                "optimizer_names": list(self._run.optimizers),
                "schedulers": [each.state_dict() for each in self._run.schedulers],
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch + _epoch_complete(self), "step": self.step,
                "history": self.history, "rng": _rng_state(),
                "generators": [generator.get_state() for generator in _generators(batches)],
                "loader": batches.state_dict() if _stateful(batches) else None,
                "position": _epoch_position(self), "hook_state": self.hook_state,
                "finished": (self.stop_reason or "all epochs done") if finished else None}

    def save(self, path):
        """Write :meth:`state_dict` to ``path`` atomically: a crash mid-write keeps the old file.
        From a ``"batch"`` or ``"backward"`` hook it is written after this optimizer step, so
        that a resume neither loses nor repeats the batches in flight. Under torchrun every
        process must call it (FSDP2 gathers the full state, and every process's running sums
        are gathered); only the first process (rank 0) writes."""
        path = self._last_save = os.fspath(path)
        if self.event in ("batch", "backward"):
            self._epoch.save_after_step = path
        else:
            _save(self, path)


# --- built-in hooks ---

def progress(refresh=0.5, bar=True):
    """Show training progress: after every epoch, one complete line on stdout with every metric
    and the epoch's time, wherever stdout goes (a terminal, a notebook, a pipe, a file). With
    ``bar`` and tqdm, also one live bar per run where a person watches (stderr on a terminal; a
    notebook: a widget with ipywidgets, else text), its running means refreshed at most every
    ``refresh`` seconds (a sync each time), and cleared after an epoch's last step, so that a
    hook's ``print`` at ``"epoch"`` starts a line of its own. ``fit`` adds it last, unless
    ``hooks`` has one: ``progress=True`` or ``"bar"`` adds ``progress()``, ``progress="epoch"``
    adds ``progress(bar=False)``.
    """
    if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or not refresh >= 0:
        raise ValueError(f"progress(refresh={refresh!r}): use a number of seconds >= 0")
    bar_class = _bar_class() if bar else None
    started, due, live, shown = time.monotonic(), 0.0, None, warnings.showwarning

    def show(*args, **kwargs):  # a warning under the live bar: on a line of its own
        with bar_class.external_write_mode():
            shown(*args, **kwargs)
    try:
        while True:
            loop = yield ("step", "epoch") if bar_class else "epoch"
            if loop.event == "epoch":
                if live is not None:
                    live.clear()  # (already cleared, unless the loader has no len())
                print(f"epoch {loop.epoch + 1}{_of(loop.epochs)}: {_format_metrics(loop.metrics)} "
                      f"({time.monotonic() - started:.1f}s)", flush=True)
                started, due = time.monotonic(), 0.0
                continue
            if due == 0.0:  # an epoch's first step; one bar per run: a notebook keeps no stale bars
                if live is None:
                    live = bar_class(total=loop.num_batches, unit="batch", leave=False)
                    warnings.showwarning = show
                live.set_description_str(f"epoch {loop.epoch + 1}{_of(loop.epochs)}", refresh=False)
                live.reset(total=loop.num_batches)
            if loop.batch_index + 1 == loop.num_batches or loop.stop_reason is not None:
                live.clear()  # validation and the "epoch" (or "end") hooks come next
            elif time.monotonic() >= due:
                live.n = loop.batch_index + 1
                live.set_postfix({name: f"{value:.4g}" for name, value in loop.averages().items()})
                due = time.monotonic() + refresh  # (averages() is a sync: not every step)
    finally:
        if live is not None:
            warnings.showwarning = shown
            live.close()


def early_stopping(monitor="val_loss", patience=3, mode="auto", min_delta=0.0, restore_best=False):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    epochs; with ``restore_best``, load the best epoch's weights back when training ends or
    stops, after every hook's ``"end"``: a checkpoint saved then holds the last weights, so that
    a resume continues the run.
    ``mode="auto"`` is ``"max"`` for scores (acc, f1, auc, ...), ``"min"`` for losses and
    errors; a NaN is never the best value.

        >>> loopy.fit(..., val_loader=val, hooks=[loopy.early_stopping(patience=5)])
    """
    better = _improvement_test(monitor, mode, min_delta, "early_stopping")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"early_stopping(patience={patience!r}): use an int >= 0, the epochs "
                         f"without improvement before stopping")
    loop = yield "start"
    _check_monitor(monitor, "early_stopping", loop.metric_names)
    # after a resume the epochs before it count too, so that the stop comes where it would have
    # (a relaunch of a run that stopped early trains nothing)
    best, waited = _best_so_far(loop.history.get(monitor, []), better)
    if best is not None and waited >= patience:
        loop.stop(f"early stopping: {monitor} did not improve for {patience} epochs "
                  f"(best {best:.6g})")
        return
    best_weights = None
    try:
        while True:
            loop = yield "epoch"
            value = _monitored(loop, monitor, "early_stopping")
            if better(value, best):
                best, waited = value, 0
                if restore_best:
                    best_weights = copy.deepcopy(_unwrap(loop.model).state_dict())
            else:
                waited += 1
                if waited >= patience:
                    loop.stop(f"early stopping: {monitor} did not improve for {patience} epochs "
                              f"(best {'none' if best is None else format(best, '.6g')})")
    finally:
        if restore_best and loop.event == "end":  # after every hook's "end", checkpoints too
            if best_weights is not None:
                _unwrap(loop.model).load_state_dict(best_weights)
            elif best is not None:
                warnings.warn(f"early_stopping(restore_best=True): the best {monitor} came "
                              f"before the run was resumed, and its weights are not in memory, "
                              f"so the last weights are kept; load them from a "
                              f"loopy.checkpoint(monitor={monitor!r}) file")


def checkpoint(path, every="epoch", monitor=None, mode="auto", keep=1):
    """Save the full training state (see ``fit(resume=...)``) atomically to ``path`` after every
    epoch, every ``every`` optimizer steps when it is a number, and when training ends, stops or
    is interrupted; with ``monitor``, only epochs that improve it. ``path`` may contain
    ``{epoch}`` and ``{step}``; then the ``keep`` newest files are kept (with ``monitor``, the
    last ``keep`` improvements; ``mode`` as in :func:`early_stopping`). Nothing is saved after
    a non-finite loss (see ``nonfinite``).
    Hooks that keep state in ``loop.hook_state`` come before it in ``hooks``, to be in its saves.

        >>> loopy.fit(..., hooks=[loopy.checkpoint("run.pt")])
        >>> loopy.fit(..., epochs=20, resume="run.pt")      # continues the same run exactly
    """
    template = _check_checkpoint_options(path, every, monitor, mode, keep)
    better = _improvement_test(monitor, mode, 0.0, "checkpoint") if monitor is not None else None
    loop = yield "start"
    # checked before training; files that an earlier run kept count towards keep
    kept = _checkpoint_files(template) if loop.rank == 0 and not loop.dry_run else []
    best, saved_at, started = None, None, (loop.step, loop.epoch, loop.batch_index)
    if monitor is not None:
        _check_monitor(monitor, "checkpoint", loop.metric_names)
        # after a resume, the best of the epochs before it
        best, _ = _best_so_far(loop.history.get(monitor, []), better)
    while True:
        loop = yield ("epoch", "end") if every == "epoch" else ("step", "epoch", "end")
        if loop.dry_run or (loop.event == "step" and loop.step % every):
            continue
        if monitor is not None:
            if loop.event != "epoch":
                continue
            value = _monitored(loop, monitor, "checkpoint")
            if not better(value, best):
                continue
            best = value
        position = (loop.step, loop.epoch, loop.batch_index)
        if position == started or (position == saved_at and loop.event != "end"):
            continue  # nothing trained since the resume or the last save ("end" marks it finished)
        saved_at, target = position, _fill(template, loop.epoch + 1, loop.step)
        loop.save(target)
        kept = [p for p in kept if p != target] + [target]
        while len(kept) > keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(kept.pop(0))


def csv_logger(path, append=False):
    """Write one row per epoch (``epoch`` and every metric) to the CSV file ``path``."""
    import csv
    _check_path("csv_logger", path, "'log.csv'")
    loop = yield "epoch"
    if loop.rank != 0:
        return
    with open(path, "a" if append else "w", newline="") as file:
        writer = csv.DictWriter(file, ["epoch", *loop.metrics], extrasaction="ignore")
        if file.tell() == 0:
            writer.writeheader()
        while True:
            writer.writerow({"epoch": loop.epoch + 1, **loop.metrics})
            file.flush()
            loop = yield "epoch"


def tensorboard(log_dir=None, every=50):
    """Log the loss and learning rate every ``every`` steps, and every metric each epoch, to
    TensorBoard (``pip install tensorboard``; reading a step's loss is a device sync)."""
    _check_count("tensorboard(every=...)", every)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError("loopy.tensorboard needs the tensorboard package: "
                          "pip install tensorboard") from error
    loop = yield "start"
    if loop.rank != 0:
        return
    writer = SummaryWriter(log_dir)
    try:
        while True:
            loop = yield ("step", "epoch")
            if loop.event == "epoch":
                for name, value in loop.metrics.items():
                    writer.add_scalar(f"epoch/{name}", value, loop.epoch + 1)
            elif loop.step % every == 0:
                losses = loop.loss if isinstance(loop.loss, dict) else {"loss": loop.loss}
                for name, value in losses.items():
                    writer.add_scalar(f"step/{name}", float(value), loop.step)
                writer.add_scalar("step/lr", loop.optimizer.param_groups[0]["lr"], loop.step)
    finally:
        writer.close()


def log_to(log, every=None):
    """Send the metrics to an experiment tracker, on rank 0: ``log(metrics, step)`` after every
    epoch with all of ``loop.metrics`` and ``"epoch"`` (1-based), ``step`` being the optimizer
    steps so far (continuing across a resume); with ``every``, also every ``every`` optimizer
    steps with this epoch's running means, ``loop.averages()`` (rank 0's, and a device sync).
    ``wandb.log``, ``mlflow.log_metrics`` and a Lightning logger's ``log_metrics`` take these
    arguments as they are.

        >>> loopy.fit(..., hooks=[loopy.log_to(wandb.log, every=100)])
    """
    if not callable(log):
        raise TypeError(f"log_to(log={_describe(log)}): pass a function log(metrics, step), like "
                        f"wandb.log or mlflow.log_metrics")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"log_to(every={every!r}): use None (epochs only) or a number of "
                         f"steps > 0")
    events = ("step", "epoch") if every else "epoch"
    while True:
        loop = yield events
        if loop.rank != 0:
            return
        if loop.event == "epoch":
            log({**loop.metrics, "epoch": loop.epoch + 1}, loop.step)
        elif loop.step % every == 0:
            log(loop.averages(), loop.step)


def live_plot(path=None):
    """Redraw :func:`plot_history` after every epoch: in a notebook, one figure updated in
    place (an IPython display handle; nothing is cleared, so the progress lines stay); with
    ``path``, also a PNG written there each epoch; elsewhere without ``path``, nothing."""
    notebook = "ipykernel" in sys.modules
    if path is not None:
        _check_path("live_plot", path, "'history.png'")
    handle = None
    while notebook or path is not None:
        loop = yield "epoch"
        if loop.rank != 0:
            return
        figure = plot_history(loop, path)
        if notebook and handle is None:
            from IPython.display import display
            handle = display(figure, display_id=True)
        elif notebook:
            handle.update(figure)


def ema(decay=0.999, apply_at_end=True):
    """Keep an exponential moving average of the model's parameters, from their values at
    ``"start"``, updated after every optimizer step: ``average = decay * average + (1 - decay)
    * parameter``. Validation runs with the averaged weights (``loop.val_model``, a copy of the
    model); when training ends or stops (not when it fails) the model gets them, unless
    ``apply_at_end=False``. Buffers, such as BatchNorm's running statistics, are not averaged:
    the copy uses the model's own, copied after every step. The average is in the checkpoint
    (``loop.hook_state["ema"]``), so a resumed run continues it exactly; a checkpoint's
    ``["model"]`` holds the trained weights, also with ``monitor``, which judged the average:
    ``model.load_state_dict(state["hook_state"]["ema"]["average"], strict=False)`` loads it.

        >>> loopy.fit(..., val_loader=val, hooks=[loopy.ema(decay=0.999)])
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(f"ema(decay={decay!r}): use a number between 0 and 1, like 0.999 (the "
                         f"weight of the old average at each step; 1 would never move it from "
                         f"the initial weights)")
    loop = yield "start"
    if _is_fsdp(loop.model):
        raise ValueError("loopy.ema() cannot average a model sharded with FSDP2's fully_shard, "
                         "which cannot be copied: train it under DDP (loopy's default under "
                         "torchrun), or keep the average of your shards in a hook of your own")
    model = _unwrap(loop.model)
    averaged = loop.val_model = copy.deepcopy(model).requires_grad_(False)
    # detached: no graph and no torch.no_grad() per step (swa_utils' EMA function is 3x slower)
    averages, parameters = list(averaged.parameters()), [p.detach() for p in model.parameters()]
    copies, buffers = list(averaged.buffers()), list(model.buffers())
    state = loop.hook_state.setdefault("ema", {})
    if state.get("step", -2) >= loop.step - 1:  # resumed (older: a run without ema came between)
        averaged.load_state_dict(state["average"], strict=False)
        if state["step"] < loop.step:  # saved at "step" by a hook before this one's update
            torch._foreach_lerp_(averages, parameters, 1 - decay)
    state["step"] = loop.step
    state["average"] = {name: p.detach() for name, p in averaged.named_parameters()}  # live
    try:
        while True:
            loop = yield "step"
            torch._foreach_lerp_(averages, parameters, 1 - decay)  # as torch.optim.swa_utils
            state["step"] = loop.step
            if buffers:
                torch._foreach_copy_(copies, buffers)
    finally:
        if apply_at_end and loop.event == "end":  # after every hook's "end", checkpoints too
            model.load_state_dict(averaged.state_dict())


# --- the training loop ---

def _with_builtin_hooks(hooks, run):
    """The hooks that fit adds: the first step's checks first, its progress hook last."""
    if run.step_fn is None:
        hooks.insert(0, _first_step_checks())
    shown = any(hook.gi_code is progress.__code__ for hook in hooks)  # the user's own
    if run.progress and run.rank == 0 and not shown:  # last: its line sees what hooks changed
        hooks.append(progress(bar=run.progress == "bar"))
    return hooks


def _report_interruption(loop, run):
    """After a stopping signal: how to resume; a preemption ends the process, as asked."""
    how = f"resume with fit(..., resume={loop._last_save!r})" if loop._last_save else \
        "add hooks=[loopy.checkpoint(path)] to be able to resume"
    warnings.warn(f"training interrupted by {_signal_name(loop._interrupted)} in epoch "
                  f"{loop.epoch + 1}, after step {loop.step}; {how}", stacklevel=3)
    if loop._interrupted != signal.SIGINT and run.exit_on_signal:
        raise SystemExit(128 + loop._interrupted)  # what a scheduler expects of a preemption


@dataclasses.dataclass
class _Epoch:
    """What changes during one epoch; a new record each epoch, passed to what needs it."""
    index: int
    meters: dict  # the running means of the loss and the function metrics
    first_step: int  # loop.step when the epoch began
    generators: list  # the states of the loader's own generators before its batches were drawn
    # torch's RNG state then, taken as the record is made (a resume replays both)
    rng: torch.Tensor = dataclasses.field(default_factory=torch.get_rng_state)
    length: int = None  # how many batches it has (dry_run's limit included); None: unknown
    skipped: int = 0  # batches that nonfinite="skip" left out
    pending: bool = False  # gradients that no optimizer step has applied yet
    complete: bool = False  # recorded in the history
    runner: object = None  # the hooks (loop.step_optimizer's "backward" event, the last step)
    scaled: bool = False  # a manual step stepped through fp16's scaler, which must update
    save_after_step: str = None  # a path that loop.save() got during this step's batches


_NO_CONTEXT = contextlib.nullcontext()  # a reusable "with" that does nothing


def _train_epoch(loop, run, runner, position=None):
    """One pass over the training batches; False when a stop came before the epoch's end.
    ``position`` (from a checkpoint) resumes the epoch after the batches it had consumed."""
    epoch, batches = _start_epoch(loop, run, runner, position)
    model, autocast = run.train_model, run.autocast
    device, non_blocking, accumulate = run.device, run.non_blocking, run.accumulate
    stop_at = run.max_steps or math.inf
    checks_stops = run.world_size > 1  # processes agree on a stop after every step
    late_sync = run.world_size > 1 and not run.sync_gradients and accumulate > 1 and \
        epoch.length is not None
    for loop.batch_index, batch in batches:
        loop.batch = _to_device(batch, device, non_blocking)
        if runner.listening("batch"):
            runner.emit("batch")
        group = 1 if accumulate == 1 else _group_size(loop, run, epoch)
        # under DDP only the last batch of an accumulation group all-reduces the gradients
        late = late_sync and loop.batch_index % accumulate != group - 1
        with _no_gradient_sync(model) if late else _NO_CONTEXT:
            # forward
            with autocast:
                loss, loop.output, target = _forward(run, model, loop.batch, loop)
            # backward: the gradients of a group add up, each batch's scaled by 1/group
            if _backward(loop, run, epoch, loss, group):
                _record(run, epoch.meters, loop.loss, loop.output, target, loop.batch)
        # optimizer step, at the end of each accumulation group
        if (loop.batch_index + 1) % accumulate == 0 and epoch.pending:
            _optimizer_step(loop, run, runner, epoch)
        if epoch.pending:
            continue  # stop only between optimizer steps, so that a resume is exact
        # termination
        if checks_stops or loop.stop_reason or loop._interrupted or loop.step >= stop_at:
            if _should_stop(loop, run):
                break
    return _end_pass(loop, run, epoch, batches)


def _start_epoch(loop, run, runner, position):
    """Train mode, the epoch's record (``loop._epoch``) and its numbered batches."""
    run.train_model.train()
    for module in run.frozen:  # submodules the user put in eval mode stay in it (a frozen BN)
        module.training = False
    epoch = loop._epoch = _Epoch(loop.epoch, _new_meters(run.metrics, not run.manual), loop.step,
                                 [generator.get_state() for generator in _generators(run.batches)],
                                 length=_limited_length(run), runner=runner)
    loop.batch_index, loop.num_batches = -1, epoch.length
    return epoch, _epoch_batches(loop, run, epoch, position)


def _end_pass(loop, run, epoch, batches):
    """The last group's optimizer step; whether the epoch is complete (not cut short by a stop).
    A pass without batches is an error."""
    if loop.batch_index < 0:
        raise ValueError(f"loader yielded no batches in epoch {loop.epoch + 1}: pass a non-empty "
                         f"DataLoader or list")
    if epoch.pending:  # the last group of a loader without len(), or one cut short by a stop
        _optimizer_step(loop, run, epoch.runner, epoch)
    if loop.stop_reason and loop.batch_index + 1 == epoch.length:
        next(batches, None)  # a stop on the last batch ends the pass too (a sampler draws then)
    return loop.stop_reason is None or loop.batch_index + 1 == epoch.length


def _limited_length(run):
    """How many batches a pass over the training data has (dry_run: 2); None when unknown."""
    length = min(_length(run.batches) or math.inf, run.limit or math.inf)
    return None if length == math.inf else length


def _epoch_batches(loop, run, epoch, position):
    """The epoch's numbered batches. A resumed epoch replays its shuffle from the random states
    of its start, skips the batches it had consumed (without loading them where it can), and
    gets back its running means."""
    if position is not None:  # (before set_epoch, which may draw or reseed, as at the start)
        torch.set_rng_state(position["epoch_rng"])
        epoch.rng, epoch.generators = position["epoch_rng"], position.get("epoch_generators", [])
        _set_generator_states(_generators(run.batches), epoch.generators)
    for name in ("sampler", "batch_sampler"):
        sampler = getattr(run.batches, name, None)
        if hasattr(sampler, "set_epoch"):  # a DistributedSampler reshuffles per epoch
            sampler.set_epoch(epoch.index)
    if position is None:
        return itertools.islice(enumerate(run.batches), run.limit)
    done = position["batches"]
    # a stateful loader continues the epoch from its own state, which _restore loaded
    rest = iter(run.batches) if _stateful(run.batches) else _skip_batches(run.batches, done)
    loop.batch_index = done - 1
    batches = enumerate(rest, done)
    if run.limit is not None:
        batches = itertools.islice(batches, max(run.limit - done, 0))
    _set_rng_state(position["rng"])
    _restore_running_means(loop, run, epoch, position)
    return batches


def _restore_running_means(loop, run, epoch, position):
    """A resumed epoch's sums so far: its meters, and the update/compute/reset metrics' states."""
    epoch.first_step, epoch.skipped = position["first_step"], position["skipped"]
    for name, saved in position["meters"][loop.rank].items():  # (a manual step's come later)
        vars(epoch.meters.setdefault(name, _Meter())).update(_to_device(saved, run.device, False))
    for name, state in position.get("metrics", {}).items():
        if hasattr(run.metrics[name], "metric_state"):  # torchmetrics keeps the tensors given
            run.metrics[name].load_state_dict(_to_device(state, run.device, False), strict=False)
        else:
            run.metrics[name].load_state_dict(state)


def _skip_batches(batches, count):
    """The batches of ``batches`` after its first ``count``, skipped at the sampler: drawing the
    random numbers that a full pass draws, but loading none of the skipped samples. For
    in-memory tensors and DataLoaders over map-style datasets; any other loader's skipped
    batches are drawn and dropped."""
    data = torch.utils.data
    if isinstance(batches, _TensorBatches):
        rest = batches.__iter__(skip=count)
        first = next(rest, None)  # it draws its random numbers now, before the resume sets them
        return itertools.chain([] if first is None else [first], rest)
    if type(batches) is not data.DataLoader or batches.batch_sampler is None or \
            isinstance(batches.dataset, data.IterableDataset):
        rest = iter(batches)
        next(itertools.islice(rest, count, count), None)  # (itertools' consume recipe)
        return rest
    if getattr(batches, "_iterator", None) is None:  # (persistent workers' is made once)
        torch.empty((), dtype=torch.int64).random_(generator=batches.generator)  # as iter() does
    rest = list(batches.batch_sampler)[count:]  # all the sampler's draws, as a full pass makes
    options = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
               "multiprocessing_context", "prefetch_factor")  # (not its generator: drawn already)
    return iter(data.DataLoader(batches.dataset, batch_sampler=rest,
                                **{name: getattr(batches, name) for name in options}))


def _backward(loop, run, epoch, loss, group):
    """loss.backward() (scaled for accumulation and fp16); False when the batch is skipped."""
    if run.manual:  # the step did its own backward passes: ``loss`` is its dict of numbers
        loop.loss, epoch.pending = loss, True
        return True
    try:
        loop.loss = loss.detach()
        if run.nonfinite == "skip" and not torch.isfinite(loss):  # a host sync, asked for
            epoch.skipped += 1
            return False
        _scaled(run, loss, group).backward()
    except (AttributeError, RuntimeError):
        _check_loss(loss, run)  # checked only now: a clearer message when the loss is the cause
        raise
    epoch.pending = True
    return True


def _scaled(run, loss, group):
    """The loss to call backward() on: divided by the accumulation group's size, fp16-scaled."""
    scaled = loss / group if group > 1 else loss
    return run.scaler.scale(scaled) if run.scaler is not None else scaled


def _optimizer_step(loop, run, runner, epoch):
    """The end of a step: the update (a manual step has made its own), the scaler's update,
    a save asked for during its batches, a step scheduler, the "step" event."""
    step = loop.step
    if not run.manual:
        _apply_update(loop, run, runner, run.optimizer)
    if run.scaler is not None and (epoch.scaled or not run.manual):
        run.scaler.update()  # once for all optimizers, as torch.amp's documentation asks
        epoch.scaled = False
    if run.scaler is None or run.manual:  # (else _counting_steps counts the optimizer's own)
        loop.step += 1
    epoch.pending = False
    if epoch.save_after_step is not None:
        _save(loop, epoch.save_after_step)
        epoch.save_after_step = None
    if loop.step == step:
        return  # fp16's scaler skipped it (inf/nan gradients): no step for schedulers, hooks
    if run.scheduler_interval == "step":
        for scheduler in run.schedulers:
            scheduler.step()
    if runner.listening("step"):
        runner.emit("step")


def _apply_update(loop, run, runner, optimizer):
    """One optimizer's update: unscale, clip, the "backward" event, step, zero_grad."""
    if run.sync_gradients:
        _average_gradients([p.grad for p in _parameters(optimizer) if p.grad is not None],
                           run.world_size)
    if run.scaler is not None:
        run.scaler.unscale_(optimizer)  # hooks and clipping see the true gradients
    if run.clip_grad is not None:
        norm = torch.nn.utils.clip_grad_norm_(_parameters(optimizer), run.clip_grad)
        loop.grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # (FSDP2)
    if runner.listening("backward"):
        runner.emit("backward")
    if run.scaler is not None:
        run.scaler.step(optimizer)  # no optimizer.step() for inf/nan gradients: _counting_steps
    else:
        optimizer.step()
    optimizer.zero_grad()


def _average_gradients(grads, world_size):
    """What DistributedDataParallel does for a manual step: average the gradients over the
    processes, in one all-reduce."""
    if grads:
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= world_size
        torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))


def _optimizer_named(run, name):
    if name not in run.optimizers:
        raise ValueError(f"no optimizer is named {name!r}: this run's are "
                         f"{', '.join(map(repr, run.optimizers))} (loop.optimizers)")
    return run.optimizers[name]


def _parameters(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _outside_autocast(run):
    """Backward passes and optimizer steps run outside autocast, as torch.amp advises."""
    if isinstance(run.autocast, torch.autocast):
        return torch.autocast(run.device.type, enabled=False)
    return _NO_CONTEXT


@contextlib.contextmanager
def _no_gradient_sync(model):
    """Gradients add up on each process without an all-reduce: DDP's no_sync, or FSDP2's
    set_requires_gradient_sync(False)."""
    if not _is_fsdp(model):
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _group_size(loop, run, epoch):
    """How many batches the current accumulation group has (fewer in an epoch's last group)."""
    n, total = run.accumulate, epoch.length
    if total is None:
        return n
    return min(n, total - (loop.batch_index - loop.batch_index % n))


def _forward(run, model, batch, loop):
    """(loss, output, target) of one batch: ``step(model, batch)``, or ``loss_fn(model(x), y)``;
    a manual step's dict of numbers takes the place of the loss."""
    if run.manual:
        result = run.step_fn(model, batch, loop)
        if isinstance(result, dict):
            return result, None, None
        if isinstance(result, (tuple, list)) and len(result) == 3 and isinstance(result[0], dict):
            return tuple(result)
        raise TypeError(f"step(model, batch, loop) must return a dict of the numbers to record, "
                        f"like {{'loss_d': loss_d.detach()}}, or (numbers, output, target); it "
                        f"returned {_describe(result)}")
    if run.step_fn is not None:
        result = run.step_fn(model, batch)
        if isinstance(result, torch.Tensor):
            return result, None, None
        if isinstance(result, (tuple, list)) and len(result) == 3:
            return tuple(result)
        raise TypeError(f"step= must return the loss (a scalar tensor) or (loss, output, "
                        f"target); it returned {_describe(result)}")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        hint = "" if isinstance(batch, (tuple, list, dict)) else \
            " (a list [X, y] is two batches: pass in-memory data as the tuple (X, y))"
        raise TypeError(f"loopy cannot unpack this batch: the loader yielded {_describe(batch)}, "
                        f"and loopy expects (inputs, target) pairs{hint}. For any other batch pass "
                        f"step=fn(model, batch) returning the loss, or (loss, output, target)")
    x, target = batch
    output = model(x) if isinstance(x, torch.Tensor) else _call_model(model, x)
    return (run.loss_fn(output, target) if run.loss_fn else None), output, target


def _record(run, meters, loss, output, target, batch):
    size = _batch_size(target if target is not None else batch)
    if isinstance(loss, dict):  # a manual step's numbers
        for name, value in loss.items():
            meters.setdefault(name, _Meter()).add(_number(name, value), size)
    elif loss is not None and "loss" in meters:
        meters["loss"].add(loss.detach() if loss.requires_grad else loss, size)
    metrics = run.metrics
    if not metrics:
        return
    if output is None or target is None:
        raise TypeError("metrics need the output and the target: make step= return "
                        "(loss, output, target) instead of the loss alone (a manual step: "
                        "(numbers, output, target))")
    with torch.no_grad():  # metrics never touch the gradients
        for name, metric in metrics.items():
            if name in meters:
                value = metric(output, target)
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    value = _metric_number(name, value)
                meters[name].add(value.detach(), size)
            else:
                _update(run, metric, output, target)


def _update(run, metric, output, target):
    """metric.update(); under torchrun with every process's outputs and targets, so that its
    value is global (torchmetrics objects gather their own states in compute() instead)."""
    torchmetrics = sys.modules.get("torchmetrics")
    if run.world_size > 1 and not (torchmetrics and isinstance(metric, torchmetrics.Metric)):
        output, target = _gather(output, "output"), _gather(target, "target")
    metric.update(output, target)


def _gather(tensor, name):
    """Every process's ``tensor`` joined along dim 0 (their lengths may differ)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        raise TypeError(f"under torchrun, update/compute/reset metrics get every process's "
                        f"outputs and targets, gathered as batch-first tensors; the {name} is "
                        f"{_describe(tensor)}: use a torchmetrics Metric or a metric function")
    dist = torch.distributed
    sizes = [torch.zeros(1, dtype=torch.int64, device=tensor.device)
             for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(tensor)], device=tensor.device))
    sizes = [int(size) for size in sizes]  # (a sync, for metrics that asked for objects)
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[:len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def _metric_number(name, value):
    """A metric's number as a tensor; a metric returning a tensor of many values is an error."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value))  # (on the CPU: computing it has synced already)
    raise TypeError(f"metrics[{name!r}] returned {_describe(value)}: a metric returns one "
                    f"number per batch, a 0-dim tensor such as (output.argmax(1) == target)"
                    f".float().mean(), or a Python number")


def _number(name, value):
    """A manual step's number to record: a float, or a one-element tensor without a graph."""
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value))
    if value.requires_grad or value.numel() != 1:
        raise TypeError(f"step(model, batch, loop) returned {{{name!r}: {_describe(value)}}}"
                        f"{' with a graph' if value.requires_grad else ''}: return one number "
                        f"per name, detached ({name}.detach()); a step that returns its loss "
                        f"for loopy to backpropagate takes two parameters, step(model, batch)")
    return value


def _end_epoch(loop, run, runner):
    """Validation, the epoch's values in loop.metrics and the history, an epoch scheduler's step,
    the "epoch" event."""
    values = _epoch_values(loop, run)
    values["lr"] = float(run.optimizer.param_groups[0]["lr"])  # before an epoch scheduler
    if run.scheduler_interval == "epoch":
        for scheduler in run.schedulers:
            _step_scheduler(scheduler, run.scheduler_monitor, values)
    loop.metrics = values
    # one entry per epoch in every list, NaN where a metric is new (a resume added it) ...
    for name, value in values.items():
        loop.history.setdefault(name, [math.nan] * loop.epoch).append(value)
    loop._epoch.complete = True
    runner.emit("epoch")
    for recorded in loop.history.values():  # ... or gone (neither loopy nor a hook added it)
        if len(recorded) == loop.epoch:
            recorded.append(math.nan)


def _epoch_values(loop, run):
    """The epoch's means (checked to be finite), its skipped batches, the validation results."""
    values = _epoch_results(run, loop._epoch.meters)
    _check_finite(loop, values.get("loss"))
    if run.nonfinite == "skip":
        values["skipped"] = float(loop._epoch.skipped)
    if run.val_batches is not None:
        results = _evaluate(run, run.val_batches, "val_loader", loop, loop.val_model)
        values.update({f"val_{name}": value for name, value in results.items()})
    return values


def _step_scheduler(scheduler, monitor, values):
    if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return scheduler.step()
    if monitor not in values:  # (a manual step's numbers, known only now)
        raise ValueError(f"scheduler_monitor={monitor!r} is not a metric of this run; choose "
                         f"one of {sorted(values)}")
    scheduler.step(values[monitor])  # a NaN counts as an epoch without improvement


def _evaluate(run, batches, name, loop, model):
    with_loss = (run.loss_fn is not None or run.step_fn is not None) and not run.manual
    meters = _new_meters(run.metrics, with_loss)
    # (the module inside a DDP wrapper: its forward would broadcast buffers)
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    last = None
    with _eval_mode(model):
        for index, batch in enumerate(_in_step(run, itertools.islice(batches, run.limit))):
            if batch is None:  # a pass that keeps this process in step with the others
                _extra_pass(run, model, last, loop)
                continue
            last = batch = _to_device(batch, run.device, run.non_blocking)
            with run.autocast:
                loss, output, target = _forward(run, model, batch, loop)
            if index == 0 and run.loss_fn is not None and run.step_fn is None:
                _check_loss_shapes(output, target)
            _record(run, meters, loss, output, target, batch)
    if last is None:  # (under torchrun every process gets here: none had a batch)
        raise ValueError(f"{name} yielded no batches{' on any process' * (run.world_size > 1)}, "
                         f"so there is nothing to evaluate: pass a non-empty DataLoader or list")
    return _epoch_results(run, meters)


def _in_step(run, batches):
    """The batches; under torchrun, then None until every process has run out, so all make as
    many passes (FSDP2's forward and gathered metrics are collectives; shards can be uneven)."""
    if run.world_size == 1:
        yield from batches
        return
    for batch in itertools.chain(batches, itertools.repeat(None)):
        if not _on_any_process(run, batch is not None):
            return
        yield batch


def _extra_pass(run, model, last, loop):
    """What a process with no batch left does while others evaluate: the same collectives
    (an FSDP2 forward, gathers of nothing), recorded nowhere."""
    if last is None:
        raise ValueError(f"under torchrun, process {run.rank} got no evaluation batch, while "
                         f"another did: give the validation data at least one batch per process")
    with run.autocast:
        _, output, target = _forward(run, model, last, loop)
    for metric in run.metrics.values():
        if _is_metric_object(metric):
            _update(run, metric, output[:0], target[:0])


def _new_meters(metrics, with_loss):
    """Meters for the loss and function metrics; update/compute/reset objects are reset."""
    for metric in metrics.values():
        if _is_metric_object(metric):
            metric.reset()
    names = [name for name, metric in metrics.items() if not _is_metric_object(metric)]
    return {name: _Meter() for name in ["loss"] * with_loss + names}


def _epoch_results(run, meters):
    """The meters' means, then the values of the update/compute/reset metrics."""
    results = _means(run, meters)
    for name, metric in run.metrics.items():
        if _is_metric_object(metric):
            value = metric.compute()
            try:
                results[name] = float(value)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"metrics[{name!r}].compute() returned {_describe(value)}; "
                                f"loopy records one number per metric") from None
    return results


def _means(run, meters):
    """Batch-size-weighted means; under torchrun of every process's batches (sums all-reduced)."""
    if run.world_size == 1:
        return {name: meter.mean() for name, meter in meters.items()}
    sums = [meter.sum(run.device).to(run.device, torch.float64) for meter in meters.values()]
    counts = [torch.tensor(float(meter.count), dtype=torch.float64, device=run.device)
              for meter in meters.values()]
    both = torch.stack(sums + counts) if sums else torch.zeros(0, device=run.device)
    torch.distributed.all_reduce(both)
    return dict(zip(meters, (both[:len(sums)] / both[len(sums):]).tolist()))


class _Meter:
    """A batch-size-weighted mean whose sum stays on the device. Values are folded into the
    sum every FOLD batches (fixed points, so the result never depends on when it is read)."""
    FOLD = 1024

    def __init__(self):
        self.total = self.first_bad = None
        self.count = self.folded = 0
        self.values, self.sizes = [], []

    def add(self, value, size):
        self.values.append(value)
        self.sizes.append(size)
        self.count += size
        if len(self.values) == self.FOLD:
            self.total, self.first_bad = self._fold()
            self.folded, self.values, self.sizes = self.folded + self.FOLD, [], []

    def _fold(self, index=True):
        if not self.values:
            return self.total, self.first_bad
        values = torch.stack(self.values).float().reshape(-1)
        sizes = torch.tensor(self.sizes, dtype=values.dtype).to(values.device, non_blocking=True)
        total = (values * sizes).sum() + (self.total if self.total is not None else 0)
        if not index:  # (a mean needs only the sum: the index costs ~6 small ops per fit call)
            return total, None
        # where the first non-finite value is, kept on the device: no sync until it is read
        bad = ~torch.isfinite(values)
        index = torch.where(bad.any(), bad.int().argmax() + self.folded, -1)
        if self.first_bad is not None:
            index = torch.where(self.first_bad >= 0, self.first_bad, index)
        return total, index

    def mean(self):
        return float(self._fold(index=False)[0]) / self.count if self.count else math.nan

    def sum(self, device):
        total = self._fold(index=False)[0]
        return total if total is not None else torch.zeros((), device=device)

    def first_nonfinite(self):
        index = self._fold()[1]
        return int(index) if index is not None and int(index) >= 0 else None


# --- helpers of predict, lr_find, plot_history and the built-in hooks ---

def _predict_batch(run, model, batch):
    """The model's output for one batch (on the CPU), and the batch's size."""
    batch = _to_device(batch, run.device, run.non_blocking)
    pair = isinstance(batch, (tuple, list)) and len(batch) == 2
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        batch = batch[0]
    try:
        output = _call_model(model, batch)
    except TypeError as error:
        if pair:  # (X, Z) reads as (inputs, target), as a DataLoader's batches do
            error.add_note("predict took each batch as (inputs, target) and called model("
                           "inputs); for a model of two inputs pass DataLoader(list(zip("
                           "zip(X, Z))), batch_size=32), which calls model(x, z)")
        raise
    return _to_device(output, torch.device("cpu"), False), _batch_size(batch)


@contextlib.contextmanager
def _restoring(model, optimizer):
    """Put back the model's and the optimizer's states, the train/eval modes and the RNGs."""
    saved = copy.deepcopy((_unwrap(model).state_dict(), optimizer.state_dict())), _rng_state()
    modes = _modes(model)
    try:
        yield
    finally:
        _unwrap(model).load_state_dict(saved[0][0])
        optimizer.load_state_dict(saved[0][1])
        _set_rng_state(saved[1])
        for module, training in modes:
            module.training = training


def _suggestion(lrs, losses, min_lr, num_steps):
    """The learning rate where the smoothed loss falls fastest before its minimum."""
    lowest = min(range(len(losses)), key=losses.__getitem__)
    if lowest == 0:
        warnings.warn(f"lr_find found no descent: the smoothed loss never fell below its "
                      f"value at the first step (min_lr={min_lr:g}), so the suggestion means "
                      f"nothing; lower min_lr, raise num_steps (it was {num_steps}), or check "
                      f"that the model and loss_fn train at a small learning rate", stacklevel=3)
    candidates = range(len(losses) // 10, max(lowest, len(losses) // 10 + 1))
    best = min(candidates, key=lambda i: losses[min(i + 1, len(losses) - 1)] - losses[i])
    return lrs[best]


def _plot_lr_find(plt, history):
    """lr_find's smoothed loss against the learning rate (log scale), the suggestion marked."""
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(history["lr"], history["loss"], label="loss (smoothed)")
    axis.axvline(history["suggestion"], color="gray", linestyle="--",
                 label=f"suggestion {history['suggestion']:.3g}")
    axis.set(xscale="log", xlabel="learning rate")
    return figure, [axis]


def _plot_curves(plt, history):
    """One panel per metric (the learning rate left out): training against validation."""
    names = dict.fromkeys(name.removeprefix("val_") for name in history
                          if name not in ("lr", "skipped"))
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names):
        for key, label in ((name, "training"), ("val_" + name, "validation")):
            if key in history:
                axis.plot(range(1, len(history[key]) + 1), history[key], label=label)
        axis.set(title=name, xlabel="epoch")
    return figure, axes[0]


def _monitored(loop, monitor, who):
    """This epoch's value of ``monitor`` (NaN when missing); with a manual step, whose metrics
    are known only now, it is checked to exist."""
    _check_monitor(monitor, who, loop.metric_names is None and loop.metrics)
    return loop.metrics.get(monitor, math.nan)


def _check_path(hook, path, example):
    """A hook's file path as a string; anything else is an error naming the hook."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{hook}(path={_describe(path)}): pass a file path, like "
                        f"{hook}({example})")
    return os.fspath(path)


def _check_checkpoint_options(path, every, monitor, mode, keep):
    """checkpoint's options checked; returns its path as a string (the file name template)."""
    if every != "epoch" and not (isinstance(every, int) and every > 0):
        raise ValueError(f"checkpoint(every={every!r}): use 'epoch' or a number of steps > 0")
    if not (isinstance(keep, int) and keep > 0):
        raise ValueError(f"checkpoint(keep={keep!r}): use a number of files > 0")
    template = _check_path("checkpoint", path, "'run.pt'")
    if keep > 1 and _fill(template, 1, 1) == _fill(template, 2, 2):
        raise ValueError(f"checkpoint(keep={keep}) would be ignored: each save replaces "
                         f"{template!r}; put {{epoch}} or {{step}} in the path")
    if monitor is None and mode != "auto":
        raise ValueError(f"checkpoint(mode={mode!r}) would be ignored: it applies to a monitor=; "
                         f"pass one, like monitor='val_loss', or leave mode out")
    if monitor is not None and every != "epoch":
        raise ValueError(f"checkpoint(every={every!r}, monitor={monitor!r}): a monitored value "
                         f"exists at an epoch's end only; use every='epoch', or two checkpoints")
    return template


# --- setup, and torchrun ---

@dataclasses.dataclass(frozen=True)
class _Run:
    """The options of one run, decided once by _prepare: read everywhere, written nowhere."""
    model: torch.nn.Module  # the user's module, on the device
    train_model: torch.nn.Module  # what trains: the model, or DistributedDataParallel around it
    loss_fn: object
    optimizer: object
    step_fn: object
    metrics: dict
    device: torch.device
    non_blocking: bool  # copies from pinned memory to a GPU need not wait
    autocast: object  # torch.autocast, or a context that does nothing
    scaler: object  # fp16's GradScaler, else None
    batches: object  # this process's batches: to train on, evaluate or predict
    val_batches: object = None
    epochs: int = 1  # None: until max_steps
    limit: int = None  # batches per pass (dry_run: 2); None for all
    accumulate: int = 1
    clip_grad: float = None
    max_steps: int = None
    nonfinite: str = "raise"
    scheduler: object = None
    scheduler_interval: str = "epoch"
    scheduler_monitor: str = "loss"
    metric_names: tuple = ()  # the names of loop.metrics, known before training
    dry_run: bool = False
    rank: int = 0
    world_size: int = 1
    stop_group: object = None  # the process group that stop flags travel on (None: the default)
    exit_on_signal: bool = True  # SIGTERM and SIGUSR1 end the process after the run stops
    resume: dict = None  # the checkpoint to resume from, loaded and checked
    progress: str = None  # what fit's own progress hook shows: "bar", "epoch" or None (nothing)
    frozen: tuple = ()  # submodules in eval mode when fit began: they stay in eval mode
    optimizers: dict = None  # name (or a list's index) -> optimizer; ``optimizer`` is the first
    schedulers: tuple = ()  # every scheduler given (``scheduler`` is the argument as given)
    manual: bool = False  # step(model, batch, loop) makes its own updates
    sync_gradients: bool = False  # a manual step under torchrun: step_optimizer averages them


def _prepare(model, loss_fn, optimizer, loader, *, epochs=None, val_loader=None, metrics=None,
             device="auto", step=None, batch_size=None, shuffle=None, drop_last=False,
             val_batch_size=None, scheduler=None, scheduler_interval=None, scheduler_monitor=None,
             precision=None, accumulate=1, clip_grad=None, seed=None, max_steps=None,
             dry_run=False, nonfinite="raise", resume=None, progress=None, ddp_options=None,
             process_group_timeout=600, resume_missing_ok=False, exit_on_signal=True,
             distributed=True):
    """Check every option and resolve it into a _Run, before any hook runs or anything trains:
    the arguments, device and process group, precision, data and its sharding, the resume file.
    ``optimizer=None`` prepares an evaluation; ``distributed=False`` ignores torchrun."""
    for name, value in (("model", model), ("loss_fn", loss_fn), ("optimizer", optimizer),
                        ("scheduler", scheduler), ("step", step)):
        _check_not_a_class(name, value)
    if not isinstance(model, torch.nn.Module):
        hint = ("; hold several models in one: torch.nn.ModuleDict({'generator': ..., "
                "'discriminator': ...})" if isinstance(model, (dict, list, tuple)) else "")
        raise TypeError(f"model must be a torch.nn.Module; got {_describe(model)}{hint}")
    manual, training = _takes_loop(step), optimizer is not None
    parameters = list(model.parameters())  # (walked once: each walk costs ~10 µs per fit call)
    interval = "epoch" if scheduler_interval is None else scheduler_interval
    optimizers, schedulers = _named(optimizer), _named(scheduler)
    plateau = any(isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau)
                  for s in schedulers.values())
    if training:
        _check_training_args(parameters, loss_fn, optimizers, step, epochs, accumulate, max_steps,
                             nonfinite, interval, drop_last, val_batch_size, manual, clip_grad)
        _check_schedulers(schedulers, optimizers, interval, plateau)
    elif loss_fn is not None and not callable(loss_fn):
        hint = ": metrics go in metrics={...}" if isinstance(loss_fn, dict) else ""
        raise TypeError(f"loss_fn must be callable, like torch.nn.functional.cross_entropy, or "
                        f"None; got {_describe(loss_fn)}{hint}")
    metrics = _check_metrics(metrics)
    if progress not in (None, False, True, "bar", "epoch"):
        raise ValueError(f"progress={progress!r}: use True or 'bar' (a live bar where a person "
                         f"watches, and a line per epoch), 'epoch' (the lines only) or False")
    device = _resolve_device(device)
    device = _join_process_group(device, process_group_timeout) if distributed else device
    if seed is not None:  # before anything draws a random number
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, like seed=0; got {_describe(seed)}")
        _seed_everything(int(seed))  # (a NumPy integer too: random.seed refuses one)
    batches, val_loader = _data(loader, val_loader, batch_size, shuffle, drop_last,
                                val_batch_size)
    _check_effect(loss_fn=(loss_fn, step is None, "step= computes the loss; pass None"),
                  scheduler_interval=(scheduler_interval, bool(schedulers),
                                      "there is no scheduler="),
                  scheduler_monitor=(scheduler_monitor, plateau,
                                     "only a ReduceLROnPlateau scheduler reads a metric"))
    # (a manual step's numbers are known only when it returns them)
    names = None if manual else _metric_names(metrics, nonfinite == "skip", val_loader is not None)
    monitor = scheduler_monitor or ("val_loss" if val_loader is not None else "loss")
    if plateau and names is not None and monitor not in names:
        raise ValueError(f"scheduler_monitor={monitor!r} is not a metric of this run"
                         f"{_hint(monitor)}; choose one of {', '.join(map(repr, names))}")
    autocast, scaler = _mixed_precision(precision, device)
    if training and isinstance(loss_fn, torch.nn.Module):
        _check_loss_parameters(loss_fn, optimizers)
    _place(device, model, parameters, loss_fn, *metrics.values())
    rank, world_size, batches, val_loader = _shares(batches, val_loader, training, distributed)
    train_model, stop_group, sync_gradients = _wrap(model, device, world_size, training, manual,
                                                    ddp_options)
    if training and manual and accumulate > 1 and _length(batches) is None:
        raise ValueError(f"accumulate={accumulate} with a manual step needs a loader with a "
                         f"len(), so that loop.step_optimizer knows where the epoch's last group "
                         f"ends; got {_describe(loader)}")
    run = _Run(
        model, train_model, loss_fn, next(iter(optimizers.values()), None), step, metrics, device,
        device.type == "cuda" and getattr(loader, "pin_memory", False), autocast, scaler,
        batches, val_loader, 1 if dry_run or (epochs is None is max_steps) else epochs,
        2 if dry_run else None, accumulate,
        clip_grad, max_steps, nonfinite, scheduler, interval, monitor, names, dry_run, rank,
        world_size, stop_group, exit_on_signal, None,
        "bar" if progress in (True, "bar") else progress or None,
        _frozen_submodules(model) if training and model.training else (),
        optimizers, tuple(schedulers.values()), manual, sync_gradients)
    if resume is not None and not (resume_missing_ok and not os.path.exists(resume)):
        # (a set-and-forget resume's first launch starts afresh)
        run = dataclasses.replace(run, resume=_load_checkpoint(resume, run))
    _check_passes(run, epochs, loader=loader, val_loader=val_loader)
    _check_total_steps(run)
    return run


def _check_total_steps(run):
    """A scheduler of a fixed number of steps (OneCycleLR) fits the run it schedules: torch
    raises past its end, and one counted in optimizer steps but stepped once per epoch never
    leaves its warm-up. (A resumed, dry or manual run is not checked.)"""
    length = _limited_length(run)
    if run.resume is not None or run.dry_run or run.manual or length is None:
        return
    per_epoch = -(-length // run.accumulate)  # (an epoch's last, shorter group steps too)
    steps = min(per_epoch * run.epochs if run.epochs else math.inf, run.max_steps or math.inf)
    for scheduler in run.schedulers:
        total = getattr(scheduler, "total_steps", None)
        if not isinstance(total, int):
            continue
        left = total - scheduler.last_epoch
        count = steps if run.scheduler_interval == "step" else run.epochs or 0
        if count > left:
            raise ValueError(f"scheduler {type(scheduler).__name__}(total_steps={total}) has "
                             f"{left} steps left, but scheduler_interval="
                             f"{run.scheduler_interval!r} steps it {count} times in this run, "
                             f"and torch raises after its last step: build it with "
                             f"total_steps={count}")
        if run.scheduler_interval == "epoch" and left == steps != run.epochs:
            raise ValueError(f"scheduler {type(scheduler).__name__}(total_steps={total}) "
                             f"counts this run's optimizer steps ({per_epoch} per epoch), but "
                             f"scheduler_interval='epoch' steps it once per epoch, so it would "
                             f"never leave its warm-up: pass scheduler_interval='step'")


def _check_passes(run, epochs, **data):
    """A one-shot iterator (a generator) can serve one pass only."""
    passes = (run.epochs or 1) - (run.resume["epoch"] if run.resume else 0)  # (None: max_steps)
    for name, each in data.items():
        if isinstance(each, collections.abc.Iterator) and passes > 1:
            raise ValueError(f"{name} is a one-shot iterator ({_describe(each)}), empty after "
                             f"one pass, but this run makes {passes} passes over it (epochs="
                             f"{epochs}): pass a DataLoader, a list of batches or tensors (X, y)")


def _shares(batches, val_batches, training, distributed):
    """This process's rank, the number of processes, and this process's share of the data."""
    dist = torch.distributed
    rank, world_size = 0, 1
    if distributed and dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size > 1:
        batches = _shard(batches, rank, world_size, training=training)
        val_batches = _shard(val_batches, rank, world_size, training=False)
    return rank, world_size, _sliced(batches), _sliced(val_batches)  # the same batches, faster


def _place(device, model, parameters, *modules):
    """Move the model, and a loss's or a metric's module (class weights, states), to the device."""
    if any(t.device != device for t in itertools.chain(parameters, model.buffers())):
        model.to(device)  # (a model already there is left alone: .to() costs ~60 µs per call)
    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.to(device)


def _data(loader, val_loader, batch_size, shuffle, drop_last, val_batch_size):
    """The training and validation batches; the options for in-memory tensors checked."""
    batches = _as_batches(loader, "loader", batch_size, shuffle, drop_last)
    if val_loader is not None:
        val_loader = _as_batches(val_loader, "val_loader", val_batch_size or batch_size, False)
    in_memory, val_in_memory = (isinstance(d, _TensorBatches) for d in (batches, val_loader))
    _check_in_memory(batch_size=(batch_size, loader, in_memory or val_in_memory and
                                 val_batch_size is None),
                     shuffle=(shuffle, loader, in_memory),
                     drop_last=(drop_last or None, loader, in_memory),
                     val_batch_size=(val_batch_size, val_loader, val_in_memory))
    return batches, val_loader


def _wrap(model, device, world_size, training, manual, ddp_options):
    """What trains under torchrun, the process group that stop flags travel on, and whether
    loop.step_optimizer averages the gradients (a manual step)."""
    dist = torch.distributed
    wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel) or _is_fsdp(model)
    if wrapped and ddp_options:
        raise ValueError(f"ddp_options={ddp_options!r}, but the model is already wrapped "
                         f"({type(model).__name__}): pass the options where you wrap it")
    if world_size == 1 or not training or wrapped:
        return model, None, False
    if manual:
        # DDP's reducer expects one backward per forward, through its wrapper, with every
        # parameter used; a manual step gets the model itself, loop.step_optimizer averages
        # the gradients, and the processes start from rank 0's weights as under DDP
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor.detach(), 0)
        return model, None, True
    cuda = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=cuda, **(ddp_options or {}))
    # stop flags travel on the CPU, so agreeing to stop never waits for the GPU
    return ddp, dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None, False


def _frozen_submodules(model):
    """The submodules in eval mode, which stay so while training (as in Lightning), with a
    warning when they hold parameters that train: from_pretrained returns models in eval mode."""
    frozen = {module: name for name, module in model.named_modules() if not module.training}
    training = [name for module, name in frozen.items()
                if any(p.requires_grad for p in module.parameters(recurse=False))]
    if training:
        warnings.warn(f"submodules of the model are in eval mode ({', '.join(training[:3])}"
                      f"{', ...' if len(training) > 3 else ''}), so they stay in eval mode while "
                      f"training (dropout off, BatchNorm statistics fixed), yet their parameters "
                      f"train; to train them in train mode call model.train() before fit (a "
                      f"from_pretrained model comes in eval mode); to train none of them, "
                      f"requires_grad_(False)", stacklevel=4)
    return tuple(frozen)


def _join_process_group(device, timeout):
    """Under torchrun (WORLD_SIZE > 1), start the process group unless the user has, and use
    this process's own GPU, cuda:LOCAL_RANK."""
    dist = torch.distributed
    torchrun = dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if device.type == "cuda" and device.index is None:  # named as its tensors name it: cuda:0
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if torchrun
                              else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():  # before joining the group half-way
            raise ValueError(f"torchrun started this process as LOCAL_RANK={device.index}, but "
                             f"only {torch.cuda.device_count()} CUDA device(s) are visible: start "
                             f"one process per GPU (torchrun --nproc_per_node="
                             f"{torch.cuda.device_count()}), or pass device='cpu'")
    if torchrun and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
        # what loopy started it also ends: a group left to die with the interpreter can abort
        # it ("terminate called without an active exception")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if torchrun and device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _shard(loader, rank, world_size, training):
    """Each process's part of a DataLoader over a map-style dataset. Sequential and random
    samplers become a DistributedSampler for training (reshuffled each epoch) and a strided
    slice for evaluation; any other sampler or batch sampler is kept, and each process takes its
    share of what it draws (_ShardedSampler). Other loaders are used as given."""
    data = torch.utils.data
    if isinstance(loader, _TensorBatches):
        loader = data.DataLoader(data.TensorDataset(*loader.tensors), loader.batch_size,
                                 shuffle=loader.shuffle, drop_last=loader.drop_last)
    if not isinstance(loader, data.DataLoader) or isinstance(loader.dataset, data.IterableDataset) \
            or isinstance(loader.sampler, (data.DistributedSampler, _ShardedSampler)):
        return loader
    options = {name: getattr(loader, name) for name in (
        "num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
        "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers")}
    if loader.batch_size is None:  # the user's batch sampler: a share of its batches
        batches = _ShardedSampler(loader.batch_sampler, rank, world_size, pad=training)
        return data.DataLoader(loader.dataset, batch_sampler=batches, **options)
    sampler, kind = loader.sampler, type(loader.sampler)
    if kind is data.SequentialSampler or (kind is data.RandomSampler and not
                                          sampler.replacement and sampler._num_samples is None):
        sampler = data.DistributedSampler(loader.dataset, drop_last=loader.drop_last,
                                          shuffle=kind is data.RandomSampler) if training \
            else range(rank, len(loader.dataset), world_size)
    else:
        sampler = _ShardedSampler(sampler, rank, world_size, pad=training)
    return data.DataLoader(loader.dataset, loader.batch_size, sampler=sampler,
                           drop_last=loader.drop_last, **options)


class _ShardedSampler:
    """A process's strided share of what the user's sampler (or batch sampler) draws, as
    Lightning's DistributedSamplerWrapper does. Every process draws with the same seeds (the
    epoch's), so the shares are disjoint and together are the draw. For training, the draw is
    padded by repeating its start, so that every process gets as many items as the others."""

    def __init__(self, sampler, rank, world_size, pad):
        if _length(sampler) is None:
            raise ValueError(f"under torchrun each of the {world_size} processes takes its "
                             f"share of what the loader's sampler draws, which needs its len(), "
                             f"and {_describe(sampler)} has none: give it __len__, or build the "
                             f"DataLoader on a torch.utils.data.DistributedSampler yourself")
        self.sampler, self.rank, self.world_size, self.pad, self.epoch = \
            sampler, rank, world_size, pad, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self):
        total = len(self.sampler)
        return -(-total // self.world_size) if self.pad else \
            len(range(self.rank, total, self.world_size))

    def __iter__(self):
        saved, generator = _rng_state(), getattr(self.sampler, "generator", None)
        own = generator.get_state() if isinstance(generator, torch.Generator) else None
        try:  # the same draw on every process
            _seed_everything(self.epoch)
            if own is not None:
                generator.manual_seed(self.epoch)
            drawn = list(self.sampler)
        finally:
            _set_rng_state(saved)
            if own is not None:
                generator.set_state(own)
        if self.pad and drawn:
            total = len(self) * self.world_size
            drawn = (drawn * -(-total // len(drawn)))[:total]
        return iter(drawn[self.rank::self.world_size])


def _should_stop(loop, run):
    """Turn a Ctrl+C or max_steps into a stop; under torchrun, all processes stop together."""
    if loop._interrupted:
        loop.stop(f"interrupted by {_signal_name(loop._interrupted)}")
    if run.max_steps is not None and loop.step >= run.max_steps:
        loop.stop(f"reached max_steps={run.max_steps}")
    if run.world_size > 1 and _on_any_process(run, loop.stop_reason is not None):
        loop.stop("stopped by another process")
    return loop.stop_reason is not None


def _on_any_process(run, flag):
    """Whether ``flag`` is true on any process (every process must call this)."""
    flag = torch.tensor([int(flag)])
    torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX, group=run.stop_group)
    return bool(flag.item())


@contextlib.contextmanager
def _signals_stop(loop):
    """The first Ctrl+C, SIGTERM or SIGUSR1 finishes the current step and stops cleanly; a
    second Ctrl+C interrupts. Only signals left to Python's default handling are taken."""
    def handle(signum, frame):
        if loop._interrupted and signum == signal.SIGINT:
            raise KeyboardInterrupt
        loop._interrupted = loop._interrupted or signum
    previous = {}
    with contextlib.suppress(ValueError):  # signals can only be handled in the main thread
        for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
            number = getattr(signal, name, None)  # (Windows has no SIGUSR1)
            if number and signal.getsignal(number) in (signal.default_int_handler, signal.SIG_DFL):
                previous[number] = signal.signal(number, handle)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _signal_name(number):
    return "Ctrl+C" if number == signal.SIGINT else signal.Signals(number).name


def _counting_steps(loop):
    """Under fp16, loop.step counts the optimizer's own steps: the GradScaler skips those whose
    gradients hold inf/nan, and decides that on the host already, so counting adds no sync.
    The hook's handle is the context: leaving it removes the hook."""
    if loop.scaler is None or loop._run.manual:  # (a manual step's steps count batches)
        return _NO_CONTEXT
    return loop.optimizer.register_step_post_hook(lambda *_: setattr(loop, "step", loop.step + 1))


# --- hooks: the generator protocol ---

class _HookRunner:
    """Primes the hooks, sends each event to those waiting for it, closes them in reverse."""

    def __init__(self, hooks, loop):
        self.hooks, self.loop = hooks, loop
        self.waiting = {}  # hook -> (what it yielded, the events it waits for or None for all)
        self.listeners = {}  # event -> the hooks waiting for it, rebuilt when `waiting` changes

    def __enter__(self):
        try:
            for hook in self.hooks:
                self._send(hook, None)  # primes it: runs its setup up to the first yield
        except BaseException as error:
            self.__exit__(type(error), error, None)
            raise
        return self

    def emit(self, event):
        self.loop.event = event
        for hook in self.listening(event):
            self._send(hook, self.loop)

    def listening(self, event):
        """The hooks waiting for ``event``."""
        if event not in self.listeners:
            self.listeners[event] = [hook for hook, (_, events) in self.waiting.items()
                                     if events is None or event in events]
        return self.listeners[event]

    def _send(self, hook, value):
        try:
            wanted = hook.send(value)
        except StopIteration:
            self.waiting.pop(hook, None)
            self.listeners = {}
            return
        except RuntimeError as error:
            if isinstance(error.__cause__, StopIteration):
                raise HookError(f"{_name(hook)} raised StopIteration, which Python turns into "
                                f"a RuntimeError (PEP 479): use return to end a hook") from error
            raise
        if hook in self.waiting and self.waiting[hook][0] is wanted and \
                not isinstance(wanted, (list, set)):
            return  # waits for the same (unchangeable) events as before, checked then
        events = (wanted,) if isinstance(wanted, str) else wanted
        if wanted is not None and (not isinstance(events, (tuple, list, set, frozenset)) or
                                   not all(isinstance(e, str) and e in EVENTS for e in events)):
            hook.close()  # it is not in `waiting`, so close it here: its finally: runs now
            raise HookError(f"{_name(hook)} yielded {wanted!r}, which is not an event: yield one "
                            f"of {', '.join(map(repr, EVENTS))}, a tuple of them, or nothing")
        self.waiting[hook] = (wanted, None if wanted is None else frozenset(events))
        self.listeners = {}

    def __exit__(self, error_type, error, traceback):
        # no cycle through the epoch's record: the loop, and a loader's worker processes, are
        # freed as soon as the caller lets go of them, not at the garbage collector's next pass
        self.loop = None
        failures = []
        for hook in reversed(self.waiting):
            try:
                hook.close()
            except Exception as failure:
                if isinstance(failure, RuntimeError) and "ignored GeneratorExit" in str(failure):
                    failure = HookError(f"{_name(hook)} ignored GeneratorExit: it yielded while "
                                        f"being closed. Do not yield inside finally:, nor catch "
                                        f"GeneratorExit (a bare except: around yield does)")
                failures.append(failure)
        if failures and error is None:
            raise failures[0]
        for failure in failures if hasattr(error, "add_note") else ():  # Python 3.11+
            error.add_note(f"while closing the hooks after this error: {failure!r}")


def _name(hook):
    code = hook.gi_code
    return f"hook '{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"


def _check_hooks(hooks):
    if inspect.isgenerator(hooks):
        hooks = [hooks]
    if isinstance(hooks, (str, bytes)) or not hasattr(hooks, "__iter__"):
        raise TypeError(f"hooks must be a list of generator objects, like hooks=[loopy."
                        f"early_stopping()]; got {_describe(hooks)}")
    hooks = list(hooks)
    for i, hook in enumerate(hooks):
        if inspect.isgeneratorfunction(hook):
            raise TypeError(f"hooks[{i}] is the generator function {hook.__name__!r}, not a "
                            f"hook: call it, hooks=[{hook.__name__}()]")
        if not inspect.isgenerator(hook):
            hint = " is a function without yield" if callable(hook) else " is not a generator"
            raise TypeError(f"hooks[{i}] ({_describe(hook)}){hint}: a hook is a generator object, "
                            f"e.g. def my_hook(): loop = yield 'epoch' ... then hooks=[my_hook()]")
        if inspect.getgeneratorstate(hook) != inspect.GEN_CREATED or hooks.index(hook) != i:
            raise HookError(f"hooks[{i}], {_name(hook)}, was already used (by an earlier fit, or "
                            f"twice in this list): a hook runs once; create a new one for each "
                            f"run, hooks=[{hook.gi_code.co_name}(...)]")
    return hooks


# --- argument checks ---

def _check_training_args(parameters, loss_fn, optimizers, step, epochs, accumulate, max_steps,
                         nonfinite, scheduler_interval, drop_last, val_batch_size, manual,
                         clip_grad):
    _check_optimizers(parameters, optimizers)
    if clip_grad is not None and (isinstance(clip_grad, bool) or not isinstance(
            clip_grad, (int, float)) or not clip_grad > 0):  # (torch flips the gradients' sign)
        raise ValueError(f"clip_grad must be a number > 0, the largest gradient norm, or None "
                         f"for no clipping; got {_describe(clip_grad)}")
    if len(optimizers) > 1 and not manual:
        raise ValueError(f"optimizer is {len(optimizers)} optimizers, and loopy steps only one "
                         f"itself: pass a manual step, step=fn(model, batch, loop), which "
                         f"updates each with loop.backward(loss) and loop.step_optimizer(name)")
    if manual and nonfinite == "skip":
        raise ValueError("nonfinite='skip' cannot undo a manual step's updates: use 'raise' or "
                         "'ignore', or skip inside the step")
    if not callable(step if step is not None else loss_fn):
        raise TypeError(f"loss_fn must be callable, like torch.nn.functional.cross_entropy (or "
                        f"pass step=fn(model, batch) -> loss); got {_describe(loss_fn)}")
    for name, value in (("epochs", epochs), ("accumulate", accumulate), ("max_steps", max_steps),
                        ("val_batch_size", val_batch_size)):
        if value is not None or name == "accumulate":
            _check_count(name, value)
    for name, value, allowed in (("nonfinite", nonfinite, ("raise", "skip", "ignore")),
                                 ("scheduler_interval", scheduler_interval, ("epoch", "step")),
                                 ("drop_last", drop_last, (False, True))):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}: use one of {', '.join(map(repr, allowed))}")


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")


def _check_optimizers(parameters, optimizers):
    own = set(map(id, parameters))
    for name, optimizer in optimizers.items() or [(0, None)]:
        where = f"optimizer[{name!r}]" if len(optimizers) > 1 else "optimizer"
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{where} must be a torch.optim.Optimizer, like torch.optim.Adam("
                            f"model.parameters()); got {_describe(optimizer)}")
        if own and not any(id(p) in own for p in _parameters(optimizer)):
            raise ValueError(f"{where} holds none of the model's parameters: it was built for "
                             f"another model (or before the model was re-created, or before "
                             f"fully_shard replaced its parameters), or that model is not part "
                             f"of this one; build it from this one, last: torch.optim.SGD("
                             f"model.parameters(), lr=...), or hold all the models in one "
                             f"torch.nn.ModuleDict and pass that as the model")


def _check_schedulers(schedulers, optimizers, scheduler_interval, plateau):
    for name, scheduler in schedulers.items():
        where = f"scheduler[{name!r}]" if len(schedulers) > 1 else "scheduler"
        if not all(callable(getattr(scheduler, method, None)) for method in ("step", "state_dict")):
            raise TypeError(f"{where} must be a learning-rate scheduler (with step() and "
                            f"state_dict()), like torch.optim.lr_scheduler.CosineAnnealingLR("
                            f"optimizer, T_max=epochs); got {_describe(scheduler)}")
        if not any(getattr(scheduler, "optimizer", o) is o for o in optimizers.values()):
            raise ValueError(f"{where} was built for another optimizer than fit's, so it would "
                             f"never change this run's learning rate: build it from the "
                             f"optimizer that fit gets, after it, {type(scheduler).__name__}("
                             f"optimizer, ...)")
    if plateau and scheduler_interval == "step":
        raise ValueError("scheduler_interval='step' cannot drive ReduceLROnPlateau, which needs "
                         "an epoch's metric: use scheduler_interval='epoch'")


def _metric_names(metrics, skip, validate):
    """The names of loop.metrics, in its order, known before training (hooks check theirs)."""
    ordered = ["loss", *sorted(metrics, key=lambda name: _is_metric_object(metrics[name]))]
    validated = [f"val_{name}" for name in ordered] if validate else []
    return (*ordered, *["skipped"] * skip, *validated, "lr")


def _check_effect(**options):
    """Each option given (not None) must change something: ``name=(value, effective, why)``."""
    for name, (value, effective, why) in options.items():
        if value is not None and not effective:
            raise ValueError(f"{name}={_describe(value)} would be ignored: {why}")


def _check_in_memory(**options):
    """Options for in-memory tensors only: ``name=(value, data, whether it applies)``."""
    for name, (value, data, applies) in options.items():
        if value is not None and not applies:
            raise ValueError(f"{name}={value!r} applies to in-memory tensors, but the data is "
                             f"{_describe(data)}: set it on the DataLoader, DataLoader(..., "
                             f"{name.replace('val_', '')}={value!r})")


def _check_not_a_class(name, value):
    if isinstance(value, type):
        raise TypeError(f"{name} is the class {value.__module__}.{value.__qualname__}, not an "
                        f"instance of it: create one, {name}={value.__qualname__}(...)")


def _check_loss_parameters(loss_fn, optimizers):
    """A loss module's learnable parameters (a multi-task loss's weights) must be optimized."""
    held = {id(p) for optimizer in optimizers.values() for p in _parameters(optimizer)}
    missing = [name for name, p in loss_fn.named_parameters() if p.requires_grad and
               id(p) not in held]
    if missing:
        raise ValueError(f"loss_fn has learnable parameters that the optimizer does not hold "
                         f"({', '.join(missing)}), so they would never change: build the "
                         f"optimizer over both, torch.optim.Adam([*model.parameters(), "
                         f"*loss_fn.parameters()]), or freeze them (requires_grad_(False))")


def _named(value):
    """name -> object for one object ({0: it}), a list (its indexes) or a dict; {} for None."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    return dict(enumerate(value)) if isinstance(value, (list, tuple)) else {0: value}


def _takes_loop(step):
    """Whether ``step`` is a manual step: three positional parameters, (model, batch, loop)."""
    try:
        parameters = inspect.signature(step).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is p.empty for p in parameters) == 3


def _check_metrics(metrics):
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of name -> metric, like metrics={{'acc': "
                        f"loopy.accuracy}}; got {_describe(metrics)}")
    for name, metric in metrics.items():
        _check_not_a_class(f"metrics[{name!r}]", metric)
        if not isinstance(name, str) or name in ("loss", "lr", "skipped", "epoch") or \
                name[:4] == "val_":
            raise ValueError(f"metrics: {name!r} cannot name a metric (loss, lr, skipped, epoch "
                             f"and val_* are loopy's own); pick another name")
        if not (_is_metric_object(metric) or callable(metric)):
            raise TypeError(f"metrics[{name!r}] is {_describe(metric)}: a metric is a function "
                            f"(output, target) -> tensor, or an object with update/compute/reset")
    return dict(metrics)


def _is_metric_object(metric):
    return all(callable(getattr(metric, name, None)) for name in ("update", "compute", "reset"))


def _resolve_device(device):
    if device == "auto":
        mps = torch.backends.mps.is_available()
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r} is not a device: use 'auto', 'cpu', 'cuda', "
                         f"'cuda:1', 'mps' or a torch.device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but CUDA is not available here (torch "
                         f"{torch.__version__}, torch.cuda.is_available() is False): use "
                         f"device='auto' or 'cpu', or install a CUDA build of torch")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r}, but only {torch.cuda.device_count()} CUDA "
                         f"device(s) exist: use an index below that")
    return device


def _mixed_precision(precision, device):
    if precision is None:
        return contextlib.nullcontext(), None
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision={precision!r}: use None (full precision), 'bf16' or 'fp16'")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16' needs a GPU with bfloat16 support, and "
                         f"{torch.cuda.get_device_name(device)} has none: use precision='fp16'")
    try:
        autocast = torch.autocast(device.type, dtype=dtypes[precision])
    except RuntimeError as error:
        raise ValueError(f"precision={precision!r} is not supported on {device}: {error}") from None
    return autocast, torch.amp.GradScaler(device.type) if precision == "fp16" else None


def _check_loss(loss, run):
    source = "step=" if run.step_fn is not None else "loss_fn"
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"the loss must be a scalar tensor, but {source} returned "
                        f"{_describe(loss)}: reduce it (reduction='mean' or .mean())")
    if not loss.requires_grad:
        raise ValueError(f"the loss from {source} does not require grad, so backward() cannot "
                         f"run: was it computed under torch.no_grad(), through .item(), .detach() "
                         f"or numpy, or are all of the model's parameters frozen?")


def _first_step_checks():
    """A hook for fit's first optimizer step, which then ends: checks that cost nothing later."""
    loop = yield "backward"
    _check_loss_shapes(loop.output, loop.batch[1])


def _check_loss_shapes(output, target):
    """Shapes that broadcast to more elements than either, (N, 1) and (N,) to (N, N), make
    loss_fn compare every output with every target: torch only warns, once."""
    if not (isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor)):
        return
    # broadcast by hand: torch.broadcast_shapes takes 30-220 µs, at every fit call
    pairs = itertools.zip_longest(reversed(output.shape), reversed(target.shape), fillvalue=1)
    dims = [a * b if 1 in (a, b) else a if a == b else None for a, b in pairs]  # None: no fit
    if None not in dims and math.prod(dims) > max(output.numel(), target.numel()):
        shape = tuple(reversed(dims))
        raise ValueError(f"loss_fn got an output of shape {tuple(output.shape)} and a "
                         f"target of shape {tuple(target.shape)}, which broadcast to "
                         f"{shape}: every output would be compared with every "
                         f"target. Give them one shape: output.squeeze(-1) in the model, "
                         f"or y.unsqueeze(-1) in the data (a loss that pairs them on "
                         f"purpose goes in step=)")


def _check_finite(loop, loss):
    run, epoch = loop._run, loop._epoch
    if loss is None or math.isfinite(loss) or run.nonfinite != "raise":
        return
    index = epoch.meters["loss"].first_nonfinite() or 0
    step = epoch.first_step + index // run.accumulate + 1
    raise FloatingPointError(f"the loss is not finite ({loss}) at epoch {loop.epoch + 1}, batch "
                             f"{index + 1} of the epoch (optimizer step {step}): lower the "
                             f"learning rate or check the data for nan/inf; fit(nonfinite='skip') "
                             f"skips such batches")


# --- batches and data ---

def _as_batches(data, name, batch_size, shuffle, drop_last=False):
    data = _from_numpy(data)
    if isinstance(data, torch.Tensor) or (isinstance(data, tuple) and data and
                                          all(isinstance(t, torch.Tensor) for t in data)):
        return _TensorBatches(data, name, batch_size, shuffle, drop_last)
    if isinstance(data, tuple) and any(isinstance(t, torch.Tensor) for t in data) and \
            any(isinstance(t, (tuple, list, dict)) for t in data):
        raise TypeError(f"{name}: in-memory data is flat tensors, (X, y), not nested inputs; got "
                        f"{_describe(data)}. For a model of several inputs pass a DataLoader of "
                        f"samples: DataLoader(list(zip(zip(X, Z), y)), batch_size=32) calls "
                        f"model(x, z), DataLoader([({{'x': a}}, b) for a, b in zip(X, y)], "
                        f"batch_size=32) calls model(x=...)")
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        hint = (": batch it, DataLoader(dataset, batch_size=32)"
                if isinstance(data, torch.utils.data.Dataset) else "")
        raise TypeError(f"{name} must be an iterable of batches (a DataLoader) or tensors "
                        f"(X, y); got {_describe(data)}{hint}")
    if _length(data) == 0:
        raise ValueError(f"{name} is empty ({_describe(data)} has no batches): check the "
                         f"dataset's size, batch_size and drop_last")
    return data


def _from_numpy(data):
    """NumPy arrays (alone or in a tuple) as tensors, as Keras takes them: floating and bool
    arrays in torch's default dtype, integer arrays as int64 (class indices)."""
    numpy = sys.modules.get("numpy")
    if isinstance(data, tuple) and numpy is not None:
        return tuple(map(_from_numpy, data))
    if numpy is None or not isinstance(data, numpy.ndarray):
        return data
    tensor = torch.from_numpy(numpy.ascontiguousarray(data))
    if tensor.is_floating_point() or data.dtype.kind == "b":  # bool labels: 0/1 for BCE
        return tensor.to(torch.get_default_dtype())
    return tensor.long() if data.dtype.kind in "iu" else tensor


class _TensorBatches:
    """Batches of in-memory tensors by slicing. Draws the same random numbers as
    ``DataLoader(TensorDataset(*tensors), batch_size, shuffle, drop_last=drop_last)``, so the
    batches are identical; given a DataLoader's ``sampler`` and ``generator``, its (_sliced)."""

    def __init__(self, data, name, batch_size, shuffle, drop_last=False, *, sampler=None,
                 generator=None):
        self.single = isinstance(data, torch.Tensor)
        self.tensors = (data,) if self.single else tuple(data)
        lengths = {t.shape[0] if t.dim() else None for t in self.tensors}
        if len(lengths) != 1 or None in lengths or 0 in lengths:
            raise ValueError(f"{name}: in-memory tensors must be non-empty and equally long "
                             f"along dim 0; got shapes {[tuple(t.shape) for t in self.tensors]}")
        batch_size = 32 if batch_size is None else batch_size
        _check_count("batch_size", batch_size)
        self.size, self.batch_size, self.shuffle = lengths.pop(), batch_size, shuffle
        if sampler is None:  # what DataLoader(TensorDataset(*tensors), shuffle=shuffle) uses
            if drop_last and self.size < batch_size:
                raise ValueError(f"{name} is empty: {self.size} samples make no full batch of "
                                 f"batch_size={batch_size}, and drop_last=True drops the partial "
                                 f"one")
            sampler = torch.utils.data.RandomSampler(range(self.size)) if shuffle else \
                range(self.size)
        self.drop_last, self.sampler, self.generator = drop_last, sampler, generator
        self.count = len(sampler)  # indices per epoch

    def __len__(self):
        batches, rest = divmod(self.count, self.batch_size)
        return batches + (rest > 0 and not self.drop_last)

    def __iter__(self, skip=0):
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # as DataLoader:
        pieces, device = self._indices(), self.tensors[0].device  # its workers' base seed
        order, offset = torch.empty(0, dtype=torch.int64, device=device), 0  # order[0] is at offset
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            end = min(start + self.batch_size, self.count)
            # as a BatchSampler pulls indices from its sampler: a piece of the order is drawn when
            # its first index is needed, and all that remain when a batch comes up short
            needed = end if end - start == self.batch_size else math.inf
            while offset + len(order) < needed and (piece := next(pieces, None)) is not None:
                piece = piece.to(device, non_blocking=True)  # (a no-op on the CPU)
                order, offset = torch.cat((order[start - offset:], piece)), start
            if start < skip * self.batch_size:
                continue  # (a resume skips them: drawn, as in a full pass, but never loaded)
            # copies, as a DataLoader's are: a hook changing a batch in place leaves X alone
            batch = [t.index_select(0, order[start - offset:end - offset]) for t in self.tensors]
            yield batch[0] if self.single else batch
        for _ in pieces:  # the sampler's last draw, when its iterator is exhausted
            pass

    def _indices(self):
        """The sampler's indices in the pieces it draws them in (for RandomSampler, each drawn
        when the first index in it is needed: a generator stopped mid-epoch is left as the
        DataLoader leaves it)."""
        sampler, n, data = self.sampler, self.size, torch.utils.data
        if isinstance(sampler, range):  # sequential, or loopy's evaluation shard
            yield torch.arange(sampler.start, sampler.stop, sampler.step)
        elif isinstance(sampler, data.DistributedSampler):
            order = torch.arange(n) if not sampler.shuffle else torch.randperm(
                n, generator=torch.Generator().manual_seed(sampler.seed + sampler.epoch))
            order = order.repeat(-(-sampler.total_size // n))[:sampler.total_size]  # padded
            yield order[sampler.rank:sampler.total_size:sampler.num_replicas]
        else:  # as RandomSampler.__iter__ does
            generator = sampler.generator
            if generator is None:
                seed = int(torch.empty((), dtype=torch.int64).random_().item())
                generator = torch.Generator().manual_seed(seed)
            piece = 32 if sampler.replacement else n
            for length in [piece] * (self.count // piece) + [self.count % piece]:
                yield torch.randint(n, (length,), generator=generator) if sampler.replacement \
                    else torch.randperm(n, generator=generator)[:length]


def _sliced(loader):
    """A DataLoader whose batches _TensorBatches reproduces exactly, as _TensorBatches (slicing
    instead of fetching and collating samples one by one); anything else as it is."""
    data, sampler = torch.utils.data, getattr(loader, "sampler", None)
    if type(loader) is not data.DataLoader or type(loader.dataset) is not data.TensorDataset or \
            loader.num_workers or loader.collate_fn is not data.default_collate or \
            loader.batch_size is None:  # (else its batch sampler is the default BatchSampler)
        return loader
    if type(sampler) in (data.SequentialSampler, data.RandomSampler, data.DistributedSampler):
        exact = getattr(sampler, "data_source", getattr(sampler, "dataset", None)) is loader.dataset
    else:  # a range: loopy's evaluation shard
        exact = type(sampler) is range and sampler.start >= 0 and sampler.step > 0
    if not exact:
        return loader
    sampler = range(len(sampler)) if type(sampler) is data.SequentialSampler else sampler
    return _TensorBatches(loader.dataset.tensors, "loader", loader.batch_size, False,
                          loader.drop_last, sampler=sampler, generator=loader.generator)


def _length(data):
    try:
        return len(data)
    except TypeError:
        return None


def _to_device(batch, device, non_blocking):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (tuple, list)):
        for item in batch:  # the common case first, cheaply: all there already
            if not (isinstance(item, torch.Tensor) and item.device == device):
                break
        else:
            return batch
    if callable(getattr(batch, "to", None)):
        # its own move before any recursion: a graph batch, a BatchEncoding, a PackedSequence
        # (whose batch_sizes must stay on the CPU)
        return batch.to(device, non_blocking=True) if non_blocking else batch.to(device)
    if isinstance(batch, (tuple, list)):
        moved = [_to_device(item, device, non_blocking) for item in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, collections.abc.Mapping):  # dicts, UserDicts (BatchEncoding), ...
        moved = {key: _to_device(value, device, non_blocking) for key, value in batch.items()}
        with contextlib.suppress(TypeError):
            return type(batch)(moved)
        return moved
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        moved = copy.copy(batch)  # not dataclasses.replace, which would rerun __post_init__
        for field in dataclasses.fields(batch):
            value = _to_device(getattr(batch, field.name), device, non_blocking)
            object.__setattr__(moved, field.name, value)  # frozen dataclasses too
        return moved
    if any(isinstance(value, torch.Tensor) and value.device != device
           for value in getattr(batch, "__dict__", {}).values()):
        warnings.warn(f"loopy cannot move a batch of type {type(batch).__qualname__} to {device}: "
                      f"it holds tensors, but has no .to() method; give its class one, "
                      f"to(self, device, non_blocking=False) returning the moved batch, or make "
                      f"it a dataclass", stacklevel=3)
    return batch


def _call_model(model, x):
    if isinstance(x, torch.Tensor):
        return model(x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(**x) if isinstance(x, dict) else model(x)


def _batch_size(data):
    if isinstance(data, torch.Tensor):
        return data.shape[0] if data.dim() else 1
    if dataclasses.is_dataclass(data):
        data = [getattr(data, f.name) for f in dataclasses.fields(data)]
    if not isinstance(data, collections.abc.Iterable):
        return 1  # (a batch object of its own kind: each batch weighs the same)
    for item in (data, *data) if isinstance(data, (tuple, list)) else ():
        if isinstance(item, (tuple, list)) and item and all(isinstance(i, dict) for i in item):
            return len(item)  # one dict per sample (detection targets), beside per-sample images
    for item in data.values() if isinstance(data, dict) else data:
        if isinstance(item, (torch.Tensor, tuple, list, dict)):
            return _batch_size(item)
    return 1


def _concat(outputs, sizes):
    """predict's outputs joined: tensors along dim 0, dicts and tuples field by field, lists of
    one item per sample (a detection model's dicts) into one list."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, dict):
        return {key: _concat([o[key] for o in outputs], sizes) for key in first}
    if isinstance(first, list) and all(len(o) == n for o, n in zip(outputs, sizes)) and not all(
            isinstance(o, torch.Tensor) and o.dim() and len(o) == sizes[0] for o in first):
        return [item for output in outputs for item in output]  # not batch-first tensors
    if not isinstance(first, (tuple, list)) or any(len(o) != len(first) for o in outputs):
        raise TypeError("outputs of different structure")
    parts = [_concat([o[i] for o in outputs], sizes) for i in range(len(first))]
    return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)


@contextlib.contextmanager
def _eval_mode(model):
    modes = _modes(model)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:  # every submodule's own mode, not only the model's
            module.training = training


def _modes(model):
    return [(module, module.training) for module in model.modules()]


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    if isinstance(value, (tuple, list)) and len(value) <= 8:
        return f"a {type(value).__name__} of ({', '.join(map(_describe, value))})"
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 63 else text} (type {type(value).__name__})"


# --- checkpoints and resume ---

def _epoch_complete(loop):
    return loop._epoch is not None and loop._epoch.complete


def _epoch_position(loop):
    """Where inside an unfinished epoch the loop stands (None between epochs), with the running
    sums of every process (under torchrun gathered from all: every process must call this)."""
    epoch, run = loop._epoch, loop._run
    if epoch is None or epoch.complete or loop.batch_index < 0:
        return None
    meters = [{name: dict(vars(meter)) for name, meter in epoch.meters.items()}]
    if run.world_size > 1:
        meters = meters * run.world_size
        torch.distributed.all_gather_object(
            meters, _to_device(meters[0], torch.device("cpu"), False), group=run.stop_group)
    return {"batches": loop.batch_index + 1, "first_step": epoch.first_step,
            "skipped": epoch.skipped, "epoch_rng": epoch.rng, "epoch_generators": epoch.generators,
            "meters": meters, "metrics": _metric_states(run.metrics),
            "data": _data_shape(run.batches, run.world_size)}


def _metric_states(metrics):
    """The state of each update/compute/reset metric: a torchmetrics Metric's states (its own
    and those of the metrics inside it), else its state_dict(); a warning for the others."""
    states = {}
    for name, metric in metrics.items():
        if hasattr(metric, "metric_state"):
            states[name] = {f"{inner}.{key}".lstrip("."): value
                            for inner, module in metric.named_modules()
                            for key, value in getattr(module, "metric_state", {}).items()}
        elif callable(getattr(metric, "state_dict", None)):
            states[name] = metric.state_dict()
        elif _is_metric_object(metric):
            warnings.warn(f"metrics[{name!r}] ({type(metric).__name__}) has no state_dict(), so "
                          f"a checkpoint in the middle of an epoch cannot hold its state: a run "
                          f"resumed from it counts only the rest of that epoch; give it "
                          f"state_dict() and load_state_dict()", stacklevel=4)
    return states


def _data_shape(batches, world_size):
    """What a position inside an epoch depends on."""
    sampler = getattr(batches, "sampler", batches)
    shuffle = getattr(sampler, "shuffle", isinstance(sampler, torch.utils.data.RandomSampler))
    return {"batches": _length(batches), "batch_size": getattr(batches, "batch_size", None),
            "shuffle": bool(shuffle), "processes": world_size}


def _generators(batches):
    """The torch.Generators of a DataLoader and of its sampler (shuffle=True, generator=g)."""
    found = []
    for owner in (batches, getattr(batches, "sampler", None),
                  getattr(getattr(batches, "batch_sampler", None), "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _set_generator_states(generators, states):
    for generator, state in zip(generators, states):
        generator.set_state(state)


def _stateful(batches):
    """A loader that saves its own position (torchdata's StatefulDataLoader)."""
    return callable(getattr(batches, "state_dict", None)) and \
        callable(getattr(batches, "load_state_dict", None))


def _save(loop, path):
    _check_loadable(loop.hook_state, "loop.hook_state")  # on every process: all raise
    if loop.world_size > 1 and loop._epoch is not None:
        _check_finite_everywhere(loop)
    state = loop.state_dict()  # on every process: under torchrun it gathers the running sums
    if loop.rank == 0:
        _write(state, path)
    if loop.world_size > 1:  # once save returns, every process can read the file
        torch.distributed.barrier(group=loop._run.stop_group)


def _check_finite_everywhere(loop):
    """The pending non-finite check, agreed by every process before any writes: under DDP one
    process's non-finite loss has already reached every process's weights."""
    try:
        loop.averages()
    except FloatingPointError:
        _on_any_process(loop._run, True)
        raise
    if _on_any_process(loop._run, False):
        raise FloatingPointError(f"the loss is not finite on another process (this is rank "
                                 f"{loop.rank}), at or before optimizer step {loop.step}: nothing "
                                 f"was saved; lower the learning rate or check the data for "
                                 f"nan/inf; fit(nonfinite='skip') skips such batches")


def _check_loadable(value, where):
    """Only what torch.load(weights_only=True) reads back, so that the resume does not fail."""
    if type(value) in (dict, collections.OrderedDict):  # (a state_dict() is an OrderedDict)
        for key, item in value.items():
            _check_loadable(key, f"{where} key {key!r}")
            _check_loadable(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple, set, torch.Size):
        for index, item in enumerate(value):
            _check_loadable(item, f"{where}[{index}]")
    elif not (isinstance(value, (torch.Tensor, torch.dtype, torch.device)) or value is None or
              type(value) in (bool, int, float, complex, str, bytes)):
        raise TypeError(f"{where} is {_describe(value)}, which a checkpoint cannot hold: a "
                        f"resume reads back only tensors, Python numbers, str, bool, None, and "
                        f"lists, tuples and dicts of them; convert it (float(x), int(x), "
                        f"torch.as_tensor(x)) before the save")


def _write(state, path):
    """torch.save to a unique temporary file beside ``path``, then an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".loopy-", suffix=".tmp", dir=directory)
    try:
        with open(descriptor, "wb") as file:
            _lock(file, wait=True)  # held while it is written: another run's cleanup skips it
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(directory).free
        raise OSError(error.errno, f"no space left to write the checkpoint {path!r}: it needs "
                      f"about {_nbytes(state):,} bytes, and {free:,} bytes are free there; the "
                      f"previous file is intact. Free some space, or save elsewhere") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def _lock(file, wait):
    """An advisory lock on an open file (False when another process holds it, or no fcntl)."""
    try:
        import fcntl
        fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except (ImportError, OSError):
        return False


def _nbytes(value):
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        value = list(value.values())
    return sum(map(_nbytes, value)) if isinstance(value, (list, tuple)) else 0


def _fill(template, epoch, step):
    """A checkpoint path: only {epoch} and {step} are fields, other braces are literal."""
    return template.replace("{epoch}", str(epoch)).replace("{step}", str(step))


def _checkpoint_files(template):
    """Before training: check that checkpoints can be written where ``template`` says, remove
    the temporary files of killed saves, and list the files of earlier runs, oldest first."""
    name = os.path.basename(template)
    directory = _checked_directory(template)
    for entry in os.listdir(directory):
        if entry.startswith(".loopy-") and entry.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError), \
                    open(os.path.join(directory, entry), "rb") as file:
                if _lock(file, wait=False):  # its writer is gone
                    os.remove(file.name)
    pattern = re.escape(name).replace(r"\{epoch\}", r"\d+").replace(r"\{step\}", r"\d+")
    earlier = [os.path.join(directory, entry) for entry in os.listdir(directory)
               if pattern != re.escape(name) and re.fullmatch(pattern, entry)]
    return sorted(earlier, key=os.path.getmtime)


def _checked_directory(template):
    """The directory of the checkpoints, created, where the longest of their names can be
    written (a ValueError for the user otherwise)."""
    first = _fill(template, 1, 1)
    directory = os.path.dirname(os.path.abspath(first))
    longest = _fill(os.path.basename(template), 10**6, 10**9)
    try:
        os.makedirs(directory, exist_ok=True)
        if os.path.isdir(first):
            raise IsADirectoryError(errno.EISDIR, "a directory", first)
        if len(os.fsencode(longest)) > getattr(os, "pathconf", lambda *_: 255)(directory,
                                                                             "PC_NAME_MAX"):
            raise OSError(errno.ENAMETOOLONG, "file name too long", longest)
        descriptor, probe = tempfile.mkstemp(prefix=".loopy-", suffix=".tmp", dir=directory)
        os.close(descriptor)
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"checkpoint(path={template!r}) cannot be written ({error}): pass a "
                         f"file path in a writable directory") from None
    return directory


def _load_checkpoint(path, run):
    """The state saved in ``path``, checked to fit this run: the model, the optimizer, the
    scheduler, and the data and processes of a position inside an epoch."""
    path = os.fspath(path)
    state = _read_checkpoint(path)
    saved = len(state["optimizers"])
    if saved != len(run.optimizers):
        raise ValueError(f"resume={path!r} holds the state of {saved} optimizer(s), and this "
                         f"run has {len(run.optimizers)}: resume with the "
                         f"optimizers that the checkpoint was saved with")
    _check_model_state(path, _unwrap(run.model).state_dict(), state["model"])
    _match_optimizers(path, state, run.optimizers)
    saved = state.get("optimizer_types")
    given = [type(each).__name__ for each in run.optimizers.values()]
    if saved not in (None, given):
        raise ValueError(f"resume={path!r} holds the state of optimizer {', '.join(saved)}, but "
                         f"fit got optimizer={', '.join(given)}: resume with the optimizer the "
                         f"run was saved with")
    if len(state["schedulers"]) != len(run.schedulers):
        raise ValueError(f"resume={path!r} holds the state of {len(state['schedulers'])} "
                         f"scheduler(s), but fit got scheduler={_describe(run.scheduler)}: resume "
                         f"with the scheduler the run was saved with (or none, if it had none)")
    _check_position(path, state, _data_shape(run.batches, run.world_size))
    return state


def _read_checkpoint(path):
    """A loopy checkpoint's state, read back whole (only what weights_only loading accepts)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"resume={path!r} is a directory; pass the file that a "
                                f"loopy.checkpoint hook wrote in it, like "
                                f"{os.path.join(path, 'run.pt')!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume={path!r}: no such file; pass the path that a "
                                f"loopy.checkpoint hook wrote (or resume_missing_ok=True to "
                                f"start afresh when it does not exist yet)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"resume={path!r} cannot be loaded ({type(error).__name__}: {error}); "
                         f"the file is corrupt or not a loopy checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != "loopy-checkpoint/1":
        raise ValueError(f"resume={path!r} is not a loopy checkpoint (no 'format' entry): "
                         f"pass a file written by loopy.checkpoint or Loop.save (to start from "
                         f"plain weights, model.load_state_dict(torch.load(path)) before fit)")
    missing = [key for key in ("model", "optimizers", "schedulers", "scaler", "epoch", "step",
                               "history", "rng", "position") if key not in state]
    if missing:
        raise ValueError(f"resume={path!r} lacks the entries {missing}: it was not written whole "
                         f"by loopy.checkpoint or Loop.save; resume from another checkpoint")
    return state


def _check_model_state(path, own, saved):
    """The saved weights have the model's keys and shapes."""
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    mismatched = [f"{k}: {tuple(saved[k].shape)} in the file, {tuple(v.shape)} in the model"
                  for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"resume={path!r} holds the weights of a different model: missing keys "
                         f"{missing}, unexpected keys {unexpected}, shape mismatches {mismatched}; "
                         f"resume with the model that the checkpoint was saved from")


def _check_position(path, state, now):
    """A position inside an epoch fits only the data and processes it was taken with."""
    changed = [f"{key} {value!r} then, {now[key]!r} now" for key, value in
               (state["position"] or {}).get("data", {}).items() if now[key] != value]
    if changed:
        raise ValueError(f"resume={path!r} stopped in the middle of epoch {state['epoch'] + 1}, "
                         f"after {state['position']['batches']} batches, and the data differs ("
                         f"{'; '.join(changed)}), so that position no longer fits: resume with "
                         f"the same loader and number of processes, or from a checkpoint taken "
                         f"between epochs, where any data and processes can go on")


def _match_optimizers(path, state, optimizers):
    """Put the saved optimizer states in the order of ``optimizers``, by name, and check that each
    saved state fits its optimizer's parameters (a swapped list of different models does not)."""
    names = state.get("optimizer_names", list(optimizers))
    if sorted(map(str, names)) != sorted(map(str, optimizers)):
        raise ValueError(f"resume={path!r} holds optimizers named {names}, but fit got "
                         f"{list(optimizers)}: resume with the names the run was saved with")
    order = [names.index(name) for name in optimizers]
    for key in ("optimizers", "optimizer_types"):
        if state.get(key) is not None:
            state[key] = [state[key][index] for index in order]
    for name, optimizer, saved in zip(optimizers, optimizers.values(), state["optimizers"]):
        ids = [i for group in saved.get("param_groups", []) for i in group["params"]]
        for parameter, i in zip(_parameters(optimizer), ids):
            shapes = {tuple(value.shape) for value in saved["state"].get(i, {}).values()
                      if isinstance(value, torch.Tensor) and value.dim()}
            if shapes - {tuple(parameter.shape)}:
                raise ValueError(f"resume={path!r}: the saved state of optimizer {name!r} is "
                                 f"for parameters of shape {sorted(shapes)}, and this run's "
                                 f"{name!r} holds one of shape {tuple(parameter.shape)}: give "
                                 f"the optimizers in the order (or with the names) they had")


def _restore(loop, state):
    """Load a checkpoint's state into the run; returns the position inside its unfinished
    epoch (None at an epoch boundary)."""
    _restore_loader(loop._run.batches, state)
    _load_model_and_optimizer_state(loop.model, loop.optimizers, state)
    for scheduler, saved in zip(loop._run.schedulers, state["schedulers"]):
        scheduler.load_state_dict(saved)
    if loop.scaler is not None and state["scaler"] is not None:
        loop.scaler.load_state_dict(state["scaler"])
    loop.epoch, loop.step, loop.history = state["epoch"], state["step"], state["history"]
    loop.hook_state = state.get("hook_state", {})
    loop.metrics = {name: values[-1] for name, values in loop.history.items() if values}
    _set_rng_state(state["rng"])
    return state["position"] and dict(state["position"], rng=state["rng"])


def _restore_loader(batches, state):
    """The loader's own state: its workers' seed, a stateful loader's position, its generators."""
    if getattr(batches, "persistent_workers", False):
        if state["epoch"] > 0:  # it draws its workers' seed at its first pass only: done before
            iter(batches)
        warnings.warn("the loader has persistent_workers=True, whose worker processes keep "
                      "their random state from one epoch to the next: random augmentation in "
                      "them differs from the run before the resume (all else is the same)",
                      stacklevel=4)
    if _stateful(batches) and state.get("loader") is not None:
        batches.load_state_dict(state["loader"])
    _set_generator_states(_generators(batches), state.get("generators", []))


def _seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)


def _rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:  # stored as plain lists, which weights_only loading accepts
        kind, keys, *rest = sys.modules["numpy"].random.get_state()
        state["numpy"] = [kind, keys.tolist(), *rest]
    return state


def _set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and "numpy" in sys.modules:
        numpy = sys.modules["numpy"]
        kind, keys, *rest = state["numpy"]
        numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), *rest))


def _model_and_optimizer_state(model, optimizers):
    """Plain state dicts (a list for the optimizers); an FSDP2 model's are gathered in full
    (every process must call this), so the file loads into a plain module with weights_only."""
    if not _is_fsdp(model):
        return _unwrap(model).state_dict(), [each.state_dict() for each in optimizers.values()]
    sdp, options = _fsdp_state_api()
    return (sdp.get_model_state_dict(model, options=options),
            [sdp.get_optimizer_state_dict(model, each, options=options)
             for each in optimizers.values()])


def _load_model_and_optimizer_state(model, optimizers, state):
    """What _model_and_optimizer_state saved, loaded: under FSDP2 every process has read the
    whole file, and takes its shards."""
    if not _is_fsdp(model):
        _unwrap(model).load_state_dict(state["model"])
        for optimizer, saved in zip(optimizers.values(), state["optimizers"]):
            optimizer.load_state_dict(saved)
        return
    sdp, options = _fsdp_state_api()
    sdp.set_model_state_dict(model, copy.copy(state["model"]), options=options)
    for optimizer, saved in zip(optimizers.values(), state["optimizers"]):
        sdp.set_optimizer_state_dict(model, optimizer, saved, options=options)


def _fsdp_state_api():
    import torch.distributed.checkpoint.state_dict as sdp
    return sdp, sdp.StateDictOptions(full_state_dict=True, cpu_offload=True)


def _is_fsdp(model):
    """Whether ``model`` was sharded with FSDP2's fully_shard (which needs a process group)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _unwrap(model):
    """The user's own module inside torch.compile's and DistributedDataParallel's wrappers."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or \
            hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


# --- small helpers for the built-in hooks ---

_SCORES = ("acc", "accuracy", "auc", "auroc", "f1", "fbeta", "precision", "recall", "iou",
           "jaccard", "dice", "r2", "map", "score")  # higher is better
_ERRORS = ("loss", "error", "err", "mse", "mae", "rmse", "nll", "crossentropy", "perplexity")


def _improvement_test(monitor, mode, min_delta, who):
    """better(value, best): a NaN never improves, the first finite value always does."""
    if mode == "auto":  # the name's last word that says what it measures decides
        words = [w for w in re.split(r"[^a-z0-9]+", monitor.lower()) if w in _SCORES + _ERRORS]
        if not words:
            raise ValueError(f"{who}(monitor={monitor!r}): mode='auto' cannot tell whether "
                             f"higher or lower is better (if it is a metric of the run, check "
                             f"its spelling); pass mode='max' or mode='min'")
        mode = "max" if words[-1] in _SCORES else "min"
    # (Keras takes abs(): a negative one would count worse as better)
    if not isinstance(min_delta, (int, float)) or not min_delta >= 0:
        raise ValueError(f"{who}(min_delta={min_delta!r}): use a number >= 0, the least change "
                         f"that counts as an improvement, in either mode")
    if mode not in ("min", "max"):
        raise ValueError(f"{who}(mode={mode!r}): use 'auto', 'min' (lower is better) or 'max'")
    improves = (lambda value, best: value < best - min_delta) if mode == "min" else \
        (lambda value, best: value > best + min_delta)
    return lambda value, best: math.isfinite(value) and (best is None or improves(value, best))


def _best_so_far(values, better):
    """The best of earlier epochs' values, and how many epochs have passed since it."""
    best, since = None, 0
    for value in values:
        best, since = (value, 0) if better(value, best) else (best, since + 1)
    return best, since


def _check_monitor(monitor, who, names):
    """At "start", ``names`` is loop.metric_names; with a manual step (None), each epoch's
    metrics are checked instead."""
    if names and monitor not in names:
        raise ValueError(f"{who}(monitor={monitor!r}): this run has no such metric"
                         f"{_hint(monitor)}; it has {', '.join(map(repr, names))} "
                         f"(a hook adding its own appends the name to loop.metric_names at "
                         f"'start', before this hook runs)")


def _hint(monitor):
    return " (val_* metrics need fit(val_loader=...))" if monitor.startswith("val_") else ""


def _of(epochs):
    return "" if epochs is None else f"/{epochs}"  # (None: until max_steps)


def _format_metrics(metrics):
    return " - ".join(f"{name} {value:.4g}" for name, value in metrics.items())


def _bar_class():
    """tqdm's bar class where a person watches (a terminal, a notebook), else None."""
    notebook = "ipykernel" in sys.modules
    if not (notebook or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())):
        return None
    with contextlib.suppress(ImportError):
        if notebook:
            with contextlib.suppress(ImportError):
                import ipywidgets  # noqa: F401 (without it, tqdm's notebook bar warns, then prints)
                from tqdm.notebook import tqdm
                return tqdm
        from tqdm.std import tqdm
        return tqdm
    return None
