"""loopy's cost per training step on a GPU, against the hand-written loop (issue 5).

Two workloads; in each, every runner trains from the same initial weights on the same batches:

- overhead-bound: the MLP 32-64-10 of overhead.py, batch 64, SGD with momentum. The data is on
  the GPU already (the hand loop slices the GPU tensors; loopy gets ``(X, y)`` and slices them
  there), and again comes from a ``DataLoader(pin_memory=True)`` (non-blocking copies in both);
- compute-bound: a small ResNet (4 residual blocks of 64 and 128 channels) on 3x32x32 images,
  batch 256, in bf16 (loopy: ``precision="bf16"``; the hand loop: ``torch.autocast``).

Runners are interleaved round by round, in a new random order each round; each run starts and
ends with ``torch.cuda.synchronize()``, so it is charged for all the GPU work it queued. The
figure is the median time per optimizer step; the ratio is the median over rounds of the paired
ratio to the hand-written loop on the same data path. The hand loop over tensors draws its own
``torch.randperm`` order, as people write it; loopy's final weights are compared with those of
the hand loop over the DataLoader, whose batches ``fit((X, y), shuffle=True)`` promises: on one
GPU the MLP's should be bit-identical; cuDNN may choose non-deterministic convolution
algorithms, so the ResNet's are shown beside that hand loop's own run-to-run change.

    python benchmarks/gpu.py                        # Markdown tables, on the GPU
    python benchmarks/gpu.py --json                 # JSON
    python benchmarks/gpu.py --device cpu --quick   # a smoke run without a GPU
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import loopy  # noqa: E402


# --- workloads -----------------------------------------------------------------------------

def conv(inputs, outputs, kernel, stride=1):
    return torch.nn.Conv2d(inputs, outputs, kernel, stride, padding=kernel // 2, bias=False)


class Block(torch.nn.Module):
    """A basic residual block: conv-bn-relu-conv-bn, plus the input (projected when its shape
    changes), then relu."""

    def __init__(self, inputs, outputs, stride):
        super().__init__()
        self.conv1, self.bn1 = conv(inputs, outputs, 3, stride), torch.nn.BatchNorm2d(outputs)
        self.conv2, self.bn2 = conv(outputs, outputs, 3), torch.nn.BatchNorm2d(outputs)
        self.shortcut = torch.nn.Identity() if stride == 1 and inputs == outputs else \
            torch.nn.Sequential(conv(inputs, outputs, 1, stride), torch.nn.BatchNorm2d(outputs))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(width):
    return torch.nn.Sequential(
        conv(3, width, 3), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
        Block(width, width, 1), Block(width, width, 1),
        Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2 * width, 10))


# --- runners -------------------------------------------------------------------------------

def hand_tensors(model, optimizer, w):
    """The hand-written loop over tensors already on the device: a torch.randperm order per
    epoch, then slices (its own order: compared for time, not for weights)."""
    C.hand_loop(model, optimizer, C.Slices(w.X, w.y, w.batch), w.epochs, autocast=w.autocast)


def hand_loader(model, optimizer, w):
    """The hand-written loop over the DataLoader, non-blocking copies from pinned memory: the
    batches that ``fit((X, y), shuffle=True)`` promises, so the weights to match."""
    C.hand_loop(model, optimizer, w.loader, w.epochs, device=w.device, autocast=w.autocast)


def fit(data, fit_device, **options):
    def run(model, optimizer, w):
        if data == "tensors":
            loader, sizes = (w.X, w.y), {"batch_size": w.batch, "shuffle": True}
        else:
            loader, sizes = w.loader, {}
        loopy.fit(model, F.cross_entropy, optimizer, loader, epochs=w.epochs,
                  precision=w.precision, **sizes, **fit_device, **options)
    return run


def runners(workload, fit_device):
    """Runners of a workload; the key of each one's hand-written baseline is its ``baseline``."""
    cuda = workload.device.type == "cuda"
    rows = [
        C.Runner("hand", "hand-written loop, slicing tensors on the device in a `torch.randperm` "
                 "order", hand_tensors),
        C.Runner("loopy_lean", "loopy `progress=False`, `fit((X, y), shuffle=True)`",
                 fit("tensors", fit_device, progress=False), "hand"),
        C.Runner("loopy_defaults", "loopy defaults (progress on: a line per epoch)",
                 fit("tensors", fit_device), "hand"),
    ]
    if workload.key == "mlp":
        pinned = "`DataLoader(pin_memory=True)`" if cuda else "`DataLoader` (pinned on a GPU)"
        rows += [
            C.Runner("hand_loader", f"hand-written loop, {pinned}, non-blocking copies",
                     hand_loader),
            C.Runner("loopy_loader_lean", "loopy `progress=False`, the same DataLoader",
                     fit("loader", fit_device, progress=False), "hand_loader"),
            C.Runner("loopy_loader_defaults", "loopy defaults, the same DataLoader",
                     fit("loader", fit_device), "hand_loader"),
        ]
    return rows


# --- timing --------------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(workload, rounds, warmup, fit_device):
    rs = runners(workload, fit_device)
    times, weights = C.time_runners(rs, workload, rounds, warmup, threads=None,
                                    synchronize=lambda: synchronize(workload.device))
    rows = C.summarize(rs, times)
    # the weights to match: the hand-written loop over the DataLoader, run twice (untimed) to
    # show how far apart two identical runs end (cuDNN may not repeat itself)
    reference, repeat = (reference_weights(workload) for _ in range(2))
    for row in rows:
        if row["key"] != "hand":
            row.update(C.compare_weights(weights[row["key"]], reference))
    return {"title": workload.title, "batch_size": workload.batch, "steps": workload.steps,
            "precision": workload.precision, "rounds": rounds, "rows": rows,
            "hand_repeat": C.compare_weights(repeat, reference)}


def reference_weights(workload):
    model, optimizer = workload.build()
    torch.manual_seed(C.SEED + 1)  # as time_runners seeds every run
    hand_loader(model, optimizer, workload)
    return [p.detach().clone() for p in model.parameters()]


# --- main ----------------------------------------------------------------------------------

def main(argv=None):
    parser = C.parser(__doc__)
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA, else the CPU; default), 'cuda', 'cuda:1', 'cpu'")
    parser.add_argument("--rounds", type=int, help="timed rounds of the MLP (default 31); the "
                        "ResNet gets half as many")
    args = parser.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and not args.quick:
            parser.error("no CUDA GPU here (torch.cuda.is_available() is False), and this "
                         "benchmark measures one: pass --device cpu --quick for a smoke run")
        fit_device = {}  # loopy's own device="auto", as users run it
    else:
        device, fit_device = torch.device(args.device), {"device": args.device}
    if device.type == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu leaves out the time spent waiting for the GPU: use the "
                     "wall clock on a GPU")
    rounds = args.rounds or (2 if args.quick else 31)
    sizes = dict(mlp_steps=8, cnn_steps=2, cnn_batch=16, width=8, side=16) if args.quick else \
        dict(mlp_steps=256, cnn_steps=32, cnn_batch=256, width=64, side=32)

    started = time.perf_counter()
    torch.set_num_threads(1)
    workloads = [
        C.Workload("mlp", f"overhead-bound MLP 32-64-10, {sizes['mlp_steps']} steps", C.mlp,
                   (32,), sizes["mlp_steps"], device=device),
        C.Workload("resnet", f"compute-bound ResNet (4 blocks, {sizes['width']} and "
                   f"{2 * sizes['width']} channels) on 3x{sizes['side']}x{sizes['side']}, bf16, "
                   f"{sizes['cnn_steps']} steps", lambda: resnet(sizes["width"]),
                   (3, sizes["side"], sizes["side"]), sizes["cnn_steps"],
                   batch=sizes["cnn_batch"], device=device, precision="bf16"),
    ]
    results = {}
    for workload in workloads:
        share = rounds if workload.key == "mlp" else max(rounds // 2, 1)
        results[workload.key] = measure(workload, share, 1 if args.quick else 2, fit_device)
    machine = C.machine()
    machine.update(device=str(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                   gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    result = {"machine": machine, "clock": args.clock, "workloads": results,
              "elapsed_s": time.perf_counter() - started}
    return C.report(result, args, render)


def render(result):
    m = result["machine"]
    where = (f"{m['gpu']} (CUDA {m['cuda']}, cuDNN {m['cudnn']}); host {m['cpu']}"
             if m["gpu"] else f"{m['cpu']}, no GPU")
    lines = [
        f"### loopy on {m['gpu'] or 'the CPU'}: time per step against the hand-written loop",
        "",
        f"{where} ({m['logical_cpus']} logical CPUs), Python {m['python']}, torch {m['torch']}; "
        f"{C.CLOCK_WORDS[result['clock']]} with the device synchronised at each run's start and "
        f"end, median of interleaved rounds; ratio = median of the per-round ratios to the "
        f"hand-written loop on the same data. Command: `{m['command']}` "
        f"({result['elapsed_s']:.0f} s in all)",
    ]
    for workload in result["workloads"].values():
        table = []
        for row in workload["rows"]:
            ratio = f"{row['ratio']:.3f}x" if "ratio" in row else "1 (baseline)"
            table.append([row["runner"], f"{row['ms_per_step']:.4f}", ratio, C.weights_cell(row)])
        repeat = C.weights_cell(workload["hand_repeat"])
        lines += ["", f"#### {workload['title']}, batch {workload['batch_size']} "
                  f"(rounds: {workload['rounds']})", "",
                  C.markdown_table(["runner", "ms/step", "ratio",
                                    "weights vs hand loop over the DataLoader"], table),
                  "", f"The hand-written loop over the DataLoader, run twice from the same "
                  f"start: {repeat}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
