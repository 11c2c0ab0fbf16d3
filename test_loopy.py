"""Tests for loopy. The oracle is the hand-written PyTorch loop: same seed, bit-identical weights."""
import collections
import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import loopy

HERE = os.path.dirname(os.path.abspath(__file__))


# --- fixtures: small data and models ---

def make_data(n=200, features=8, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, features, generator=generator)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return X, y % classes


def make_mlp(seed=0, dropout=0.0):
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
    loop = loopy.fit(model, F.cross_entropy, optimizer, tensor_loader(X, y, shuffle=shuffle),
                     epochs=3, val_loader=tensor_loader(Xv, yv), progress=False,
                     metrics={"acc": loopy.accuracy})
    assert same_weights(model, by_hand)
    for name in ("loss", "acc", "val_loss", "val_acc"):
        assert loop.history[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-7)
    assert loop.model is model and loop.optimizer is optimizer


@pytest.mark.parametrize("shuffle", [False, True])
def test_in_memory_tensors_give_the_same_batches_as_a_dataloader(shuffle):
    X, y = make_data(203)  # a partial last batch
    torch.manual_seed(3)
    expected = [tuple(b) for b in tensor_loader(X, y, batch_size=16, shuffle=shuffle)]
    torch.manual_seed(3)
    got = list(loopy._as_batches((X, y), "loader", 16, shuffle))
    assert len(got) == len(expected) == 13
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, expected))
    after_dataloader = torch.get_rng_state()  # the next draws are the same too
    torch.manual_seed(3)
    list(loopy._as_batches((X, y), "loader", 16, shuffle))
    assert torch.equal(torch.get_rng_state(), after_dataloader)


@pytest.mark.parametrize("shuffle", [False, True])
def test_fit_on_tensors_equals_the_dataloader_loop(shuffle):
    X, y = make_data(203)
    by_hand, model = make_mlp(dropout=0.2), make_mlp(dropout=0.2)
    torch.manual_seed(5)
    hand_loop(by_hand, torch.optim.SGD(by_hand.parameters(), lr=0.1),
              tensor_loader(X, y, batch_size=16, shuffle=shuffle), 2)
    torch.manual_seed(5)
    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
              batch_size=16, shuffle=shuffle, epochs=2, progress=False)
    assert same_weights(model, by_hand)


def test_history_is_plain_json_floats_named_like_keras():
    import json
    X, y = make_data()
    model = make_mlp()
    loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                     val_loader=(X, y), epochs=2, progress=False, metrics={"acc": loopy.accuracy})
    assert set(loop.history) == {"loss", "acc", "val_loss", "val_acc", "lr"}
    assert all(type(v) is float and len(values) == 2 for values in loop.history.values()
               for v in values)
    assert json.loads(json.dumps(loop.history)) == loop.history
    assert loop.metrics == {name: values[-1] for name, values in loop.history.items()}


def test_history_weights_the_mean_by_batch_size():
    X, y = make_data(70)  # batches of 32, 32, 6
    model = make_mlp()
    before = make_mlp()
    loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.0), (X, y),
                     progress=False, metrics={"acc": loopy.accuracy})
    with torch.no_grad():
        output = before(X)
    assert loop.history["loss"][0] == pytest.approx(F.cross_entropy(output, y).item(), rel=1e-6)
    assert loop.history["acc"][0] == pytest.approx((output.argmax(1) == y).float().mean().item())


def test_meter_folds_the_same_whenever_it_is_read():
    values = [torch.tensor(float(i) / 7) for i in range(150)]
    read_often, read_once = loopy._Meter(), loopy._Meter()
    for value in values:
        read_often.add(value, 3)
        read_often.mean()
        read_once.add(value, 3)
    assert read_often.mean() == read_once.mean() == pytest.approx(sum(range(150)) / 7 / 150)


# --- events and hooks ---

def recorder(log, name="hook"):
    try:
        log.append((name, "setup"))
        while True:
            loop = yield
            log.append((name, loop.event))
    finally:
        log.append((name, "closed"))


def test_event_sequence_for_two_epochs_of_three_batches():
    X, y = make_data(96)
    model = make_mlp()
    log = []
    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
              hooks=[recorder(log)], epochs=2, progress=False)
    events = [event for _, event in log]
    per_batch = ["batch", "backward", "step"]
    assert events == ["setup", "start", *per_batch * 3, "epoch", *per_batch * 3, "epoch", "end",
                      "closed"]


def test_hooks_run_in_order_and_close_in_reverse():
    X, y = make_data(32)
    model = make_mlp()
    log = []
    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
              hooks=[recorder(log, "a"), recorder(log, "b")], progress=False)
    assert [n for n, e in log if e == "start"] == ["a", "b"]
    assert [n for n, e in log if e == "step"] == ["a", "b"]
    assert [n for n, e in log if e == "closed"] == ["b", "a"]


def test_a_hook_waits_for_what_it_yields_and_sees_the_live_loop():
    X, y = make_data(96)
    model = make_mlp()
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

    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
              hooks=[hook()], epochs=2, progress=False)
    assert seen == [("start", 0, 0), ("step", 0, 1), ("step", 0, 2), ("step", 0, 3),
                    ("epoch", 0, 3), ("step", 1, 4), ("step", 1, 5), ("step", 1, 6),
                    ("epoch", 1, 6)]


def test_a_batch_hook_may_replace_the_batch():
    X, y = make_data(64)
    model = make_mlp()
    outputs = []

    def zero_inputs():
        while True:
            loop = yield "batch"
            loop.batch = (torch.zeros_like(loop.batch[0]), loop.batch[1])
            loop = yield "step"
            outputs.append(loop.output)

    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.0), (X, y),
              hooks=[zero_inputs()], progress=False)
    assert all(torch.equal(o[0], o[1]) for o in outputs)


def test_stop_ends_training_delivers_end_and_keeps_the_reason():
    X, y = make_data(96)
    model = make_mlp()
    log = []

    def stop_after_first_epoch():
        loop = yield "epoch"
        loop.stop("enough")
        loop = yield "end"
        log.append(loop.stop_reason)

    loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                     hooks=[stop_after_first_epoch()], epochs=5, progress=False)
    assert loop.stop_reason == "enough" and log == ["enough"]
    assert len(loop.history["loss"]) == 1 and loop.step == 3


def test_stop_mid_epoch_discards_the_partial_epoch():
    X, y = make_data(96)
    model = make_mlp()

    def stop_at_step_4():
        while True:
            loop = yield "step"
            if loop.step == 4:
                loop.stop("mid-epoch")

    loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                     hooks=[stop_at_step_4()], epochs=5, progress=False)
    assert loop.step == 4 and loop.epoch == 1 and len(loop.history["loss"]) == 1


def test_a_hook_that_returns_is_dropped():
    X, y = make_data(64)
    model = make_mlp()
    calls = []

    def once():
        loop = yield "step"
        calls.append(loop.step)

    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
              hooks=[once()], epochs=2, progress=False)
    assert calls == [1]


@pytest.mark.parametrize("error", [ValueError("model broke"), KeyboardInterrupt()])
def test_hooks_are_closed_in_reverse_and_the_error_propagates_unchanged(error):
    X, y = make_data(64)
    model = make_mlp()
    log = []

    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = model, 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise error
            return self.inner(x)

    failing = Failing()
    with pytest.raises(type(error)) as raised:
        loopy.fit(failing, F.cross_entropy, torch.optim.SGD(failing.parameters(), lr=0.1),
                  (X, y), hooks=[recorder(log, "a"), recorder(log, "b")], progress=False)
    assert raised.value is error
    assert log[-2:] == [("b", "closed"), ("a", "closed")]
    assert ("a", "end") not in log


def test_an_error_inside_a_hook_propagates_and_the_others_are_closed():
    X, y = make_data(64)
    model = make_mlp()
    log = []

    def broken():
        yield "step"
        raise LookupError("hook bug")

    with pytest.raises(LookupError, match="hook bug"):
        loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                  hooks=[recorder(log), broken()], progress=False)
    assert log[-1] == ("hook", "closed")


def protocol_error(hooks, error=loopy.HookError):
    X, y = make_data(64)
    model = make_mlp()
    with pytest.raises(error) as raised:
        loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                  hooks=hooks, progress=False)
    return str(raised.value)


def test_passing_the_generator_function_says_call_it():
    message = protocol_error([loopy.early_stopping], TypeError)
    assert "hooks[0]" in message and "'early_stopping'" in message
    assert "call it, hooks=[early_stopping()]" in message


def test_a_non_generator_hook_is_rejected():
    def not_a_generator():
        return 1

    message = protocol_error([not_a_generator], TypeError)
    assert "hooks[0]" in message and "without yield" in message and "hooks=[my_hook()]" in message
    message = protocol_error([42], TypeError)
    assert "hooks[0]" in message and "not a generator" in message


def test_a_reused_hook_is_rejected():
    X, y = make_data(32)
    model = make_mlp()
    hook = recorder([])
    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
              hooks=[hook], progress=False)
    message = protocol_error([hook])
    assert "hook 'recorder'" in message and "test_loopy.py:" in message
    assert "already used" in message and "create a new one" in message


def test_an_unknown_event_lists_the_valid_ones():
    def typo():
        yield "epochs"

    message = protocol_error([typo()])
    assert "hook 'typo'" in message and "'epochs'" in message
    assert all(repr(event) in message for event in loopy.EVENTS)


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

    message = protocol_error([stubborn()])
    assert "hook 'stubborn'" in message and "ignored GeneratorExit" in message
    assert "finally" in message


def test_raising_stop_iteration_in_a_hook_says_use_return():
    def stops():
        yield "step"
        raise StopIteration

    message = protocol_error([stops()])
    assert "hook 'stops'" in message and "use return" in message


def test_a_hook_cannot_swallow_the_models_error():
    X, y = make_data(32)
    model = make_mlp()

    def swallower():
        try:
            while True:
                yield
        except BaseException:
            return

    with pytest.raises(FloatingPointError):
        loopy.fit(model, lambda output, target: torch.tensor(math.nan, requires_grad=True),
                  torch.optim.SGD(model.parameters(), lr=0.1), (X, y), hooks=[swallower()],
                  progress=False)


# --- bad input ---

def fit_error(error, **overrides):
    X, y = make_data(64)
    model = make_mlp()
    arguments = dict(model=model, loss_fn=F.cross_entropy,
                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loader=(X, y),
                     progress=False)
    arguments.update(overrides)
    with pytest.raises(error) as raised:
        loopy.fit(**arguments)
    return str(raised.value)


def test_bad_arguments_name_the_argument_and_the_fix():
    message = fit_error(TypeError, model=lambda x: x)
    assert "model must be a torch.nn.Module" in message and "function" in message
    message = fit_error(TypeError, optimizer="adam")
    assert "optimizer must be a torch.optim.Optimizer" in message and "'adam'" in message
    message = fit_error(ValueError, optimizer=torch.optim.SGD(make_mlp().parameters(), lr=0.1))
    assert "optimizer holds none of the model's parameters" in message
    assert "model.parameters()" in message
    message = fit_error(TypeError, loader=42)
    assert "loader must be an iterable of batches" in message and "42" in message
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_asking_for_cuda_without_cuda_says_so():
    message = fit_error(ValueError, device="cuda:1")
    assert "device='cuda:1'" in message and "not available" in message and "'cpu'" in message


def test_errors_come_before_any_hook_or_training_runs():
    model = make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = []
    X, y = make_data(64)
    with pytest.raises(ValueError):
        loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                  hooks=[recorder(log)], epochs=0)
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
    X, y = make_data(96)
    calls = []

    def loss_fn(output, target):
        calls.append(1)
        loss = F.cross_entropy(output, target)
        return loss * math.inf if len(calls) == 5 else loss

    message = fit_error(FloatingPointError, loss_fn=loss_fn, loader=(X, y), epochs=3)
    assert "epoch 2" in message and "batch 2 of the epoch" in message
    assert "optimizer step 5" in message and "nonfinite='skip'" in message


def test_nonfinite_skip_counts_the_skipped_batches():
    X, y = make_data(96)
    model = make_mlp()
    calls = []

    def loss_fn(output, target):
        calls.append(1)
        loss = F.cross_entropy(output, target)
        return loss * math.nan if len(calls) == 2 else loss

    loop = loopy.fit(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
                     epochs=2, nonfinite="skip", progress=False)
    assert loop.history["skipped"] == [1.0, 0.0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(v) for v in loop.history["loss"])


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


def test_inputs_as_tuple_or_dict_are_spread_into_the_model():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 3)

        def forward(self, left, right):
            return self.linear(left + right)

    X, y = make_data(64)
    for inputs in ((X, X), {"left": X, "right": X}):
        model = TwoInputs()
        loader = [(inputs if isinstance(inputs, tuple) else inputs, y)]
        loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                         loader, progress=False)
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
    loop = loopy.fit(model, None, torch.optim.Adam(model.parameters(), lr=0.01), tensor_loader(X, y),
                     step=step, epochs=2, val_loader=(X, y), metrics={"acc": loopy.accuracy},
                     progress=False)
    assert same_weights(model, by_hand)
    assert {"loss", "acc", "val_loss", "val_acc"} <= set(loop.history)


def test_a_step_returning_only_the_loss_works_without_metrics():
    X, y = make_data(64)
    model = make_mlp()
    loop = loopy.fit(model, None, torch.optim.SGD(model.parameters(), lr=0.1),
                     [{"x": X, "y": y}], step=lambda m, b: F.cross_entropy(m(b["x"]), b["y"]),
                     progress=False)
    assert loop.history["loss"][0] > 0
    message = fit_error(TypeError, loader=[{"x": X, "y": y}], metrics={"acc": loopy.accuracy},
                        step=lambda m, b: F.cross_entropy(m(b["x"]), b["y"]))
    assert "return (loss, output, target)" in message


def test_torchmetrics_objects_work_as_metrics():
    torchmetrics = pytest.importorskip("torchmetrics")
    X, y = make_data(150)
    results = []
    for metric in (loopy.accuracy, torchmetrics.classification.MulticlassAccuracy(3, average="micro")):
        model = make_mlp()
        loop = loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                         (X, y), val_loader=(X, y), epochs=2, metrics={"acc": metric},
                         progress=False)
        results.append((loop.history["acc"], loop.history["val_acc"]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], abs=1e-6)


def test_accuracy_matches_by_hand_for_classes_and_binary_logits():
    scores = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert loopy.accuracy(scores, torch.tensor([0, 1, 1])).item() == pytest.approx(2 / 3)
    logits = torch.tensor([[0.5], [-1.0], [2.0], [-0.1]])
    assert loopy.accuracy(logits, torch.tensor([1.0, 0.0, 0.0, 0.0])).item() == 0.75
    assert loopy.accuracy(logits.squeeze(1), torch.tensor([1, 0, 1, 1])).item() == 0.75


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


# --- progress ---

def test_progress_prints_one_plain_line_per_epoch_when_not_a_terminal(capsys):
    X, y = make_data(64)
    model = make_mlp()
    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
              epochs=3, metrics={"acc": loopy.accuracy})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3: loss ") and " - acc " in lines[0]


def test_progress_shows_a_tqdm_bar_on_a_terminal(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    X, y = make_data(64)
    model = make_mlp()
    loopy.fit(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), (X, y),
              epochs=2)
    captured = capsys.readouterr()
    assert captured.out == "" and "epoch 2/2" in captured.err and "2/2" in captured.err


def test_loopy_copied_alone_trains_without_tqdm(tmp_path):
    shutil.copy(os.path.join(HERE, "loopy.py"), tmp_path)
    script = textwrap.dedent("""
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
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "trained 4"
    assert result.stdout.startswith("epoch 1/2: loss ")


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


def test_importing_loopy_has_no_side_effects():
    script = "import torch, sys; before = set(sys.modules); import loopy; print(sorted(set(sys.modules) - before))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=HERE, timeout=120)
    assert result.returncode == 0 and result.stderr == ""
    assert eval(result.stdout) == ["loopy"]
