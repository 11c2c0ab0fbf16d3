"""A recurrent network (a GRU) that reads each digit row by row, as a sequence of 8 steps of
8 pixels, and classifies it from its last hidden state. Reaches >= 0.95 validation accuracy.

    python examples/rnn_digits.py [--epochs 15] [--plot rnn_digits.png]
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import digits
import loopy


class RowReader(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.gru = nn.GRU(input_size=8, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, rows):                  # rows: (batch, 8 steps, 8 pixels)
        states, _ = self.gru(rows)
        return self.head(states[:, -1])       # the state after the last row


args = digits.arguments(__file__, __doc__, epochs=15)
(X, y), (X_val, y_val) = digits.load(shape=(8, 8))

torch.manual_seed(0)  # the initial weights; fit(seed=0) below seeds the shuffling
model = RowReader()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

loop = loopy.fit(model, F.cross_entropy, optimizer, (X, y), batch_size=32, shuffle=True,
                 epochs=args.epochs, val_loader=(X_val, y_val), metrics={"acc": loopy.accuracy},
                 scheduler=scheduler, seed=0)

digits.report(loopy.evaluate(model, (X_val, y_val), F.cross_entropy, {"acc": loopy.accuracy}))
digits.plot(loop.history, args.plot, "GRU reading digits row by row")
