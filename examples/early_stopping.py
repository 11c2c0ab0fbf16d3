"""Early stopping: train until the validation loss stops improving for 5 epochs, then put
back the weights of the best epoch (``restore_best=True``).

    python examples/early_stopping.py [--epochs 100] [--plot early_stopping.png]
"""
import torch
import torch.nn.functional as F

import digits
import loopy

args = digits.arguments(__file__, __doc__, epochs=100)  # an upper bound: it stops far earlier
(X, y), (X_val, y_val) = digits.load(shape=(64,))

torch.manual_seed(0)  # the initial weights; fit(seed=0) below seeds the shuffling and dropout
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                            torch.nn.Linear(256, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

loop = loopy.fit(model, F.cross_entropy, optimizer, (X, y), batch_size=32, shuffle=True,
                 epochs=args.epochs, val_loader=(X_val, y_val), metrics={"acc": loopy.accuracy},
                 hooks=[loopy.early_stopping("val_loss", patience=5, restore_best=True)], seed=0)

val_losses = loop.history["val_loss"]
best = min(range(len(val_losses)), key=val_losses.__getitem__)
print(f"{loop.stop_reason or 'ran all epochs'}; ran {len(val_losses)} epochs, "
      f"the best was epoch {best + 1} (val_loss {val_losses[best]:.4f})")
# the model now holds the best epoch's weights, not the last epoch's
final = loopy.evaluate(model, (X_val, y_val), F.cross_entropy, {"acc": loopy.accuracy})
digits.report(final)
digits.plot(loop.history, args.plot, "early stopping on val_loss (patience 5)")
