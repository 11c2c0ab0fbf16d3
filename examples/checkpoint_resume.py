"""Checkpoint and resume: a run that is interrupted in the middle of an epoch and resumed from
its checkpoint ends with exactly the same weights and history as a run that never stopped.

    python examples/checkpoint_resume.py [--epochs 10] [--plot checkpoint_resume.png]
"""
import os
import tempfile

import torch
import torch.nn.functional as F

import digits
import loopy

args = digits.arguments(__file__, __doc__, epochs=10)
(X, y), (X_val, y_val) = digits.load(shape=(64,))


def train(hooks=(), resume=None):
    """A fresh model and optimizer each time, as in a new process after a crash."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Dropout(0.2), torch.nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loop = loopy.fit(model, F.cross_entropy, optimizer, (X, y), hooks, batch_size=32,
                     shuffle=True, epochs=args.epochs, val_loader=(X_val, y_val),
                     metrics={"acc": loopy.accuracy}, seed=0, resume=resume, progress=False)
    return model, loop


def crash_at(step):
    """Stand-in for a crash or Ctrl+C: stop training after optimizer step ``step``."""
    loop = yield "step"
    while loop.step < step:
        loop = yield "step"
    loop.stop(f"simulated crash after step {step}")


# 1. the straight run
model, loop = train()

with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "run.pt")
    # 2. the same run, checkpointed every 20 steps and when it ends, "crashing" in the middle
    #    of an epoch (a SIGKILL would lose the end-of-run save; the resume from the last
    #    every-20-steps checkpoint would be just as exact)
    steps_per_epoch = -(-len(X) // 32)                     # 45 batches of 32
    middle = (args.epochs // 2) * steps_per_epoch + steps_per_epoch // 2
    _, first = train(hooks=[loopy.checkpoint(path, every=20), crash_at(middle)])
    print(f"first attempt: {first.stop_reason}, in epoch {first.epoch + 1} of {args.epochs}")
    # 3. resume from the file: a new model and optimizer, the same call plus resume=path
    resumed_model, resumed = train(hooks=[loopy.checkpoint(path, every=20)], resume=path)

same_weights = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                      resumed_model.state_dict().values()))
print(f"resumed run == straight run: weights {same_weights}, "
      f"history {resumed.history == loop.history}")
digits.report({"loss": resumed.metrics["val_loss"], "acc": resumed.metrics["val_acc"]})
digits.plot(resumed.history, args.plot, "checkpointed, interrupted and resumed run")
