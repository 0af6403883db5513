#!/usr/bin/env python3
"""PyTorch CPU training-throughput benchmark of fedtiny's models (the dense reference).

What it measures
    Samples per second of full *dense* training steps -- forward, mean softmax cross-entropy,
    backward, optimizer step -- of PyTorch re-implementations of the three models that
    `fedtiny-sim bench` measures (common/src/models/): `cnn`, `vgg11` (configuration A, BatchNorm,
    global-average-pool classifier) and `resnet18` (CIFAR-style), each with fedtiny's `width`
    multiplier on the hidden channel counts. The step mirrors simulations/src/bench.rs:

    * one synthetic batch, built once and reused every step: images uniform in [-1, 1), labels
      uniform over the classes (default batch 64, input 1x28x28, 10 classes);
    * Adam, lr 1e-3, betas (0.9, 0.999), eps 1e-8, L2 weight decay 1e-4 on every parameter,
      AMSGrad (fedtiny's `OptimizerConfig::default()`), PyTorch's default Adam implementation;
    * `--warmup` untimed steps, then `--repeats` timings of `--steps` steps each; a repeat's
      throughput is steps x batch / wall seconds, and the reported figure is the median over the
      repeats (the mean of the two middle values for an even count, as fedtiny's `median`).

    The models match fedtiny's layer for layer (channels, kernel sizes, strides, padding, BN
    placement, pooling, classifier, biases), so the trainable parameter counts are equal; the
    script prints them (`--count-only` prints only them). Differences that remain are layout
    only: PyTorch runs NCHW (or channels-last with `--channels-last`) where fedtiny runs NHWC, so
    the cnn's flattened features are in another order, which changes nothing measured here.

How to run
    python3 -m venv /work/venv-torch && /work/venv-torch/bin/pip install torch
    /work/venv-torch/bin/python simulations/bench/pytorch_bench.py \
        --cases cnn:1,vgg11:0.25,resnet18:0.25,resnet18:1 --threads 2 --json runs/pt.json

    On a machine shared with other work, set OMP_WAIT_POLICY=PASSIVE (side_by_side.sh does): with
    the default (spinning) policy of the OpenMP runtime bundled with torch, an oversubscribed
    machine made PyTorch 4-8x slower in our runs, which would measure the spin-waiting rather than
    the kernels.

    `--models` x `--widths` is another way to name the cases (cnn always at width 1, as in
    `fedtiny-sim bench`). Threads are set with torch.set_num_threads and
    torch.set_num_interop_threads before any work. Output: a Markdown table on stdout and, with
    `--json`, a JSON object {torch_version, threads, ..., results: [{model, width, params,
    samples_per_sec (median), repeats: [...]}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time


def channels(reference: int, width: float) -> int:
    """fedtiny's `ModelSpec::channels`: round half away from zero, at least 1."""
    return max(1, int(math.floor(reference * width + 0.5)))


def build_model(nn, arch: str, width: float, input_hwc: tuple[int, int, int], classes: int):
    """The PyTorch twin of fedtiny's `Model::new(spec)` for one architecture."""
    h, w, cin = input_hwc

    def conv(ci, co, k, stride, pad):
        c = nn.Conv2d(ci, co, k, stride=stride, padding=pad, bias=False)
        # fedtiny: Kaiming normal, fan-out, ReLU gain.
        nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")
        return c

    if arch == "cnn":
        c1, c2, hidden = channels(32, width), channels(64, width), channels(128, width)
        h2, w2 = h // 2 // 2, w // 2 // 2
        return nn.Sequential(
            conv(cin, c1, 3, 1, 1),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            conv(c1, c2, 3, 1, 1),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(h2 * w2 * c2, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, classes),
        )

    if arch == "vgg11":
        config_a = [64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0]
        layers = []
        ch, hh, ww = cin, h, w
        for v in config_a:
            if v == 0:
                # fedtiny skips a pool once the map is 1 pixel high or wide (28x28: 4 pools).
                if hh >= 2 and ww >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    hh, ww = hh // 2, ww // 2
                continue
            c = channels(v, width)
            layers += [conv(ch, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            ch = c
        return nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, classes)
        )

    if arch == "resnet18":

        class Block(nn.Module):
            def __init__(self, ci, co, stride):
                super().__init__()
                self.conv1 = conv(ci, co, 3, stride, 1)
                self.bn1 = nn.BatchNorm2d(co)
                self.relu1 = nn.ReLU(inplace=True)
                self.conv2 = conv(co, co, 3, 1, 1)
                self.bn2 = nn.BatchNorm2d(co)
                nn.init.zeros_(self.bn2.weight)  # fedtiny: last BN gamma of a branch is 0
                self.shortcut = None
                if stride != 1 or ci != co:
                    self.shortcut = nn.Sequential(conv(ci, co, 1, stride, 0), nn.BatchNorm2d(co))

            def forward(self, x):
                s = x if self.shortcut is None else self.shortcut(x)
                b = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
                return (b + s).relu_()

        stem = channels(64, width)
        layers = [conv(cin, stem, 3, 1, 1), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)]
        c_in = stem
        for stage, reference in enumerate([64, 128, 256, 512]):
            c = channels(reference, width)
            for b in range(2):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(Block(c_in, c, stride))
                c_in = c
        return nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)
        )

    raise SystemExit(f"unknown model `{arch}` (expected cnn, vgg11 or resnet18)")


def train_flops_per_sample(torch, model, input_chw) -> float:
    """3 x the forward FLOPs of one sample (conv and linear products), the convention of
    fedtiny's `cost::flops(..).train_dense()`, counted by torch's FlopCounterMode; equal values
    confirm that every conv and linear layer sees the same shapes in both implementations."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_chw))
    model.train(was_training)
    return 3.0 * counter.get_total_flops()


def parse_cases(args) -> list[tuple[str, float]]:
    if args.cases:
        out = []
        for item in args.cases.split(","):
            arch, _, width = item.partition(":")
            out.append((arch.strip(), float(width) if width else 1.0))
        return out
    out = []
    for arch in args.models.split(","):
        arch = arch.strip()
        widths = [1.0] if arch == "cnn" else [float(x) for x in args.widths.split(",")]
        for w in widths:
            if (arch, w) not in out:
                out.append((arch, w))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cnn,vgg11,resnet18", help="comma-separated models")
    p.add_argument("--widths", default="0.25", help="comma-separated widths (cnn: always 1)")
    p.add_argument("--cases", default="", help="explicit model:width list, overrides the two above")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (and inter-op)")
    p.add_argument("--interop-threads", type=int, default=None, help="default: --threads")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5, help="repeats (median reported)")
    p.add_argument("--input", default="28,28,1", help="h,w,c per sample (fedtiny order)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--channels-last", action="store_true", help="run in channels-last layout")
    p.add_argument("--count-only", action="store_true", help="print parameter counts and exit")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args()

    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.interop_threads or args.threads)
    torch.manual_seed(args.seed)

    h, w, c = (int(x) for x in args.input.split(","))
    cases = parse_cases(args)
    n = args.batch_size
    results = []
    for arch, width in cases:
        model = build_model(nn, arch, width, (h, w, c), args.classes)
        params = sum(t.numel() for t in model.parameters() if t.requires_grad)
        flops = train_flops_per_sample(torch, model, (c, h, w))
        if args.count_only:
            print(f"{arch} w{width:g}: {params} parameters, {flops / 1e6:.1f} train MFLOP/sample")
            results.append(
                {"model": arch, "width": width, "params": params, "train_flops_per_sample": flops}
            )
            continue
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.rand(n, c, h, w, generator=gen) * 2.0 - 1.0
        y = torch.randint(0, args.classes, (n,), generator=gen)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.Adam(
            model.parameters(),
            lr=1e-3,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=1e-4,
            amsgrad=True,
        )
        loss_fn = nn.CrossEntropyLoss()

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

        print(f"measuring {arch} (width {width:g}, {params} parameters) ...", file=sys.stderr)
        for _ in range(args.warmup):
            step()
        speeds = []
        steps = max(1, args.steps)
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            secs = time.perf_counter() - t0
            speeds.append(steps * n / max(secs, 1e-9))
            print(f"  repeat: {speeds[-1]:.0f} samples/s", file=sys.stderr)
        results.append(
            {
                "model": arch,
                "width": width,
                "params": params,
                "train_flops_per_sample": flops,
                "samples_per_sec": statistics.median(speeds),
                "samples_per_sec_min": min(speeds),
                "samples_per_sec_max": max(speeds),
                "repeats": speeds,
            }
        )
        del model, opt

    out = {
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "cuda_available": bool(torch.cuda.is_available()),
        "batch_size": n,
        "input_hwc": [h, w, c],
        "classes": args.classes,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "channels_last": args.channels_last,
        "optimizer": "Adam lr 1e-3 betas (0.9, 0.999) eps 1e-8 weight_decay 1e-4 amsgrad",
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy_env": os.environ.get("OMP_WAIT_POLICY"),
        "results": results,
    }
    if not args.count_only:
        print(
            f"PyTorch {torch.__version__} CPU, {out['threads']} threads "
            f"({out['interop_threads']} inter-op), batch {n}, input {c}x{h}x{w}, Adam (AMSGrad); "
            f"median of {args.repeats} repeats of {args.steps} steps after {args.warmup} warm-up\n"
        )
        print("| model | width | params | samples/s (median) | min | max |")
        print("|---|---|---|---|---|---|")
        for r in results:
            print(
                f"| {r['model']} | {r['width']:g} | {r['params']} | {r['samples_per_sec']:.0f} "
                f"| {r['samples_per_sec_min']:.0f} | {r['samples_per_sec_max']:.0f} |"
            )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
