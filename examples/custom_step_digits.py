"""A custom update through ``step=``, with no subclassing: an autoencoder whose 16-number code
must both reconstruct the image and classify it. The step function returns the combined loss,
plus the class scores and labels so that ``metrics={"acc": ...}`` still works.

    python examples/custom_step_digits.py [--epochs 30] [--plot custom_step_digits.png]
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import digits
import loopy

args = digits.arguments(__file__, __doc__, epochs=30)
(X, y), (X_val, y_val) = digits.load(shape=(64,))

torch.manual_seed(0)  # the initial weights; fit(seed=0) below seeds the shuffling
model = nn.ModuleDict({
    "encoder": nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)),
    "decoder": nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 64), nn.Sigmoid()),
    "classifier": nn.Linear(16, 10),
})
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)


def step(model, batch):
    """One batch: reconstruction loss + classification loss. Also used for validation,
    where loopy has switched gradients off and the model to eval mode."""
    images, labels = batch
    code = model["encoder"](images)
    scores = model["classifier"](code)
    loss = F.mse_loss(model["decoder"](code), images) * 10 + F.cross_entropy(scores, labels)
    return loss, scores, labels       # (loss, output, target): the metrics see scores and labels


def reconstruction_error(model):
    """Mean squared error of the decoded validation images (step= in evaluate, too)."""
    def mse(model, batch):
        images, _ = batch
        return F.mse_loss(model["decoder"](model["encoder"](images)), images)
    return loopy.evaluate(model, (X_val, y_val), step=mse)["loss"]


before = reconstruction_error(model)
loop = loopy.fit(model, None, optimizer, (X, y), batch_size=32, shuffle=True,
                 epochs=args.epochs, val_loader=(X_val, y_val),
                 metrics={"acc": loopy.accuracy}, step=step, seed=0)
after = reconstruction_error(model)

print(f"reconstruction error (validation): {before:.4f} before training, {after:.4f} after")
digits.report({"loss": loop.metrics["val_loss"], "acc": loop.metrics["val_acc"],
               "reconstruction_mse": after})
digits.plot(loop.history, args.plot, "autoencoder + classifier via step=")
