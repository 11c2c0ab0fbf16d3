"""loopy's own cost per training step, against the hand-written loop (issue 2).

Tiny MLP 32-64-10, batch 64, CPU, torch.set_num_threads(1): the loop's own Python cost
dominates. Every runner trains one epoch of the same data from the same initial weights;
runners are interleaved round by round (in a new random order each round) so that machine
drift hits all of them alike; the figure is the median time per optimizer step, and the ratio
is the median over rounds of the paired ratio to the row's baseline. Also: ``import loopy``
beyond ``import torch`` (fresh processes, median).

The rows that measure loopy's own cost hand it the DataLoader inside a plain iterable, so that
it iterates the DataLoader as the hand-written loop does; "loopy on the same DataLoader" hands
it the DataLoader itself, which loopy slices (issue 17: the same batches, without the
DataLoader's per-sample fetching and collating).

    python benchmarks/overhead.py            # Markdown table
    python benchmarks/overhead.py --json     # JSON
    python benchmarks/overhead.py --quick    # a smoke run (tiny sizes)
    python benchmarks/overhead.py --runners hand,loopy_dataloader   # only these rows
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import loopy  # noqa: E402

TARGETS = {"loopy_lean": 1.02, "loopy_lean_work": 1.02, "loopy_defaults_work": 1.05,
           "loopy_tty_work": 1.05, "loopy_dataloader": 0.65}


class _Opaque:
    """A DataLoader inside an iterable that loopy does not recognise: loopy iterates it."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def runners():
    def hand(model, optimizer, w):
        C.hand_loop(model, optimizer, w.loader, w.epochs)

    def hand_work(model, optimizer, w):
        C.hand_loop(model, optimizer, w.loader, w.epochs, w.val_loader, metric=True)

    def fit(work, opaque=True, **options):
        wrap = _Opaque if opaque else lambda loader: loader

        def run(model, optimizer, w):
            extra = {"val_loader": wrap(w.val_loader), "metrics": {"acc": loopy.accuracy}} \
                if work else {}
            loopy.fit(model, F.cross_entropy, optimizer, wrap(w.loader), epochs=w.epochs,
                      **extra, **options)
        return run

    return [
        C.Runner("hand", "hand-written loop on DataLoader(TensorDataset)", hand),
        C.Runner("loopy_dataloader", "loopy on the same DataLoader, `progress=False` (sliced)",
                 fit(work=False, opaque=False, progress=False), "hand"),
        C.Runner("loopy_lean", "loopy `progress=False`", fit(work=False, progress=False),
                 "hand"),
        C.Runner("loopy_defaults", "loopy defaults (progress on; a line per epoch)",
                 fit(work=False), "hand"),
        C.Runner("hand_work", "hand-written loop + accuracy + validation", hand_work),
        C.Runner("loopy_defaults_work", "loopy defaults + accuracy + validation "
                 "(not a terminal: a line per epoch)", fit(work=True), "hand_work"),
        C.Runner("loopy_lean_work", "loopy `progress=False` + accuracy + validation",
                 fit(work=True, progress=False), "hand_work"),
        C.Runner("loopy_tty_work", "loopy defaults + accuracy + validation, stderr a terminal "
                 "(tqdm bar)", fit(work=True), "hand_work", tty=True),
    ]


def main(argv=None):
    parser = C.parser(__doc__)
    parser.add_argument("--steps", type=int, help="training steps per epoch (default 256)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 31)")
    parser.add_argument("--import-repeats", type=int, help="fresh processes (default 9)")
    parser.add_argument("--runners", help="comma-separated runner keys (default: all)")
    args = parser.parse_args(argv)
    steps = args.steps or (16 if args.quick else 256)
    rounds = args.rounds or (2 if args.quick else 31)
    repeats = args.import_repeats or (1 if args.quick else 9)

    torch.set_num_threads(1)
    workload = C.workload_mlp_val(steps=steps, val_steps=max(steps // 4, 1))
    rs = [r for r in runners() if not args.runners or r.key in args.runners.split(",")]
    times, weights = C.time_runners(rs, workload, rounds, warmup=1, clock=args.clock)
    rows = C.summarize(rs, times, weights)
    # loopy must train exactly like the hand-written loop doing the same work
    for row in rows:
        reference = "hand_work" if row["key"].endswith("_work") else "hand"
        row.update(C.compare_weights(weights[row["key"]], weights[reference]))
        if row["key"] in TARGETS:
            row["target"] = TARGETS[row["key"]]
            row["meets_target"] = row["ratio"] <= TARGETS[row["key"]]
    beyond, torch_import = C.import_cost("import loopy", repeats)
    result = {
        "machine": C.machine(), "clock": args.clock, "workload": workload.title,
        "batch_size": C.BATCH,
        "steps_per_epoch": steps, "val_batches": workload.val_steps, "rounds": rounds,
        "rows": rows,
        "import": {"loopy_beyond_torch_ms": 1e3 * beyond, "torch_ms": 1e3 * torch_import,
                   "repeats": repeats, "target_ms": 30.0, "meets_target": beyond < 0.030},
    }
    return C.report(result, args, render)


def render(result):
    table = []
    for row in result["rows"]:
        ratio = f"{row['ratio']:.3f}x" if "ratio" in row else "1 (baseline)"
        target = (f"≤ {row['target']:.2f}x: {'met' if row['meets_target'] else '**missed**'}"
                  if "target" in row else "")
        table.append([row["runner"], f"{row['ms_per_step']:.4f}", ratio, target,
                      C.weights_cell(row)])
    imp = result["import"]
    m = result["machine"]
    return "\n".join([
        f"### loopy overhead: {result['workload']}, batch {result['batch_size']}, CPU, 1 thread",
        "",
        f"{m['cpu']} ({m['logical_cpus']} logical CPUs), Python {m['python']}, torch "
        f"{m['torch']}; {C.CLOCK_WORDS[result['clock']]}, median of {result['rounds']} interleaved "
        f"rounds; ratio = median of the "
        f"per-round ratios to the row's baseline (the hand-written row above it). Command: "
        f"`{m['command']}`",
        "",
        C.markdown_table(["runner", "ms/step", "ratio", "target", "weights vs hand loop"],
                         table),
        "",
        f"`import loopy` beyond `import torch`: **{imp['loopy_beyond_torch_ms']:.1f} ms** "
        f"(target < 30 ms: {'met' if imp['meets_target'] else '**missed**'}; `import torch` "
        f"itself {imp['torch_ms']:.0f} ms; median of {imp['repeats']} fresh processes).",
    ])


if __name__ == "__main__":
    main()
