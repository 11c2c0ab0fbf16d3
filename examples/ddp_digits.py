"""The same script on one process or many: a fully connected network on the digits, with
a DataLoader that loopy shards across processes when it runs under torchrun.

    python examples/ddp_digits.py                                   # one process
    torchrun --nproc_per_node=2 examples/ddp_digits.py              # two processes, one node
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 examples/ddp_digits.py      # on each of two nodes

Under torchrun, fit starts the process group (gloo on CPU, NCCL on GPUs), wraps the model in
DistributedDataParallel, gives each process its part of every epoch, reduces the metrics over
all processes and lets only rank 0 print and save. Nothing in this file knows about it.
"""
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import digits
import loopy

args = digits.arguments(__file__, __doc__, epochs=20)
(X, y), (X_val, y_val) = digits.load(shape=(64,))

torch.manual_seed(0)  # the same initial weights on every process
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
train = DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True)

loop = loopy.fit(model, F.cross_entropy, optimizer, train, epochs=args.epochs,
                 val_loader=DataLoader(TensorDataset(X_val, y_val), batch_size=256),
                 metrics={"acc": loopy.accuracy}, seed=0)

if loop.rank == 0:  # every process holds the same weights and history
    print(f"trained on {loop.world_size} process(es), {loop.step} steps each")
    digits.report({name: loop.history["val_" + name][-1] for name in ("loss", "acc")})
    digits.plot(loop.history, args.plot, f"digits on {loop.world_size} process(es)")
