#!/usr/bin/env python3
"""Merges one side-by-side run (simulations/bench/side_by_side.sh) into one Markdown table.

Usage: python3 merge_side_by_side.py RUN_DIR

RUN_DIR holds machine.json, fedtiny/<model>-w<width>/bench.json (fedtiny-sim bench) and
pytorch/<model>-w<width>-{before,after}.json (pytorch_bench.py, run right before and right after
fedtiny; the PyTorch figure is the median over the repeats of both). Writes RUN_DIR/side_by_side.md (the table,
a parameter/FLOP check of the two model definitions, the machine facts) and
RUN_DIR/side_by_side.json (the same rows as data), and prints the Markdown. Standard library only.
"""

from __future__ import annotations

import json
import os
import statistics
import sys



def load_note(machine):
    """Says whether other work shared the machine, from the 1-minute load averages around the
    run (the benches themselves keep `threads` cores busy)."""
    loads = [float(machine[k].split()[0]) for k in ("loadavg_start", "loadavg_end")]
    if max(loads) > machine["nproc"] + 0.5:
        return ("The machine was shared with other work during the run (load averages below), "
                "so absolute figures are noisy; the ratios within this run are what matter.")
    return ("Nothing else ran on the machine (load averages below, the benches' own threads "
            "included); the ratios within this run are still what matter.")

def fmt_width(w: float) -> str:
    return {0.25: "¼", 0.5: "½"}.get(w, f"{w:g}")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    run = sys.argv[1]
    machine = json.load(open(os.path.join(run, "machine.json")))
    cases = machine["cases"].split()
    rows, checks, pt_meta, fed_meta = [], [], None, {}
    for case in cases:
        model, width = case.split(":")[:2]
        name = f"{model}-w{width}"
        fed = json.load(open(os.path.join(run, "fedtiny", name, "bench.json")))
        halves = [
            json.load(open(os.path.join(run, "pytorch", f"{name}-{when}.json")))
            for when in ("before", "after")
        ]
        pt = halves[0]
        pt_meta = pt_meta or pt
        ptr = dict(halves[0]["results"][0])
        both = [s for h in halves for s in h["results"][0]["repeats"]]
        ptr.update(
            samples_per_sec=statistics.median(both),
            samples_per_sec_min=min(both),
            samples_per_sec_max=max(both),
            repeats=both,
            before=halves[0]["results"][0]["samples_per_sec"],
            after=halves[1]["results"][0]["samples_per_sec"],
        )
        fed_meta[name] = {"steps": pt["steps"], "repeats": pt["repeats"], "warmup": pt["warmup"]}
        dense = next(r for r in fed if r["density"] == 1.0)
        checks.append(
            {
                "model": model,
                "width": dense["width"],
                "fedtiny_params": dense["params"],
                "pytorch_params": ptr["params"],
                "fedtiny_train_flops": dense["train_flops_per_sample"],
                "pytorch_train_flops": ptr["train_flops_per_sample"],
                "pytorch_repeats": ptr["repeats"],
                "pytorch_min": ptr["samples_per_sec_min"],
                "pytorch_max": ptr["samples_per_sec_max"],
                "pytorch_before": ptr["before"],
                "pytorch_after": ptr["after"],
                **fed_meta[name],
            }
        )
        for r in fed:
            rows.append(
                {
                    "model": model,
                    "width": r["width"],
                    "density": r["density"],
                    "fedtiny_samples_per_sec": r["samples_per_sec"],
                    "fedtiny_min": r["samples_per_sec_min"],
                    "fedtiny_max": r["samples_per_sec_max"],
                    "fedtiny_repeats": r["repeats"],
                    "speedup_vs_fedtiny_dense": r["speedup"],
                    "pytorch_dense_samples_per_sec": ptr["samples_per_sec"],
                    "fedtiny_over_pytorch": r["samples_per_sec"] / ptr["samples_per_sec"],
                }
            )

    steps_note = "; ".join(
        f"{c['model']} w{fmt_width(c['width'])}: {c['warmup']} warm-up, median of "
        f"{c['repeats']} repeats × {c['steps']} steps"
        for c in checks
    )
    md = [
        "# fedtiny vs PyTorch CPU: training throughput, same machine, same run",
        "",
        f"Batch {machine['batch_size']}, {machine['threads']} threads, input 1×28×28, 10 classes, "
        "Adam (lr 1e-3, AMSGrad, weight decay 1e-4), synthetic batch, samples/s = median over "
        f"repeats. {steps_note}. fedtiny: random layer-wise masks at each density (densities of a "
        "model measured round-robin); PyTorch: dense only, run right before and right after fedtiny "
        "for each case, median over the repeats of both runs. " + load_note(machine),
        "",
        "| model | width | density | fedtiny samples/s | speed-up vs fedtiny dense "
        "| PyTorch dense samples/s | fedtiny ÷ PyTorch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['model']} | {fmt_width(r['width'])} | {r['density']:g} "
            f"| {r['fedtiny_samples_per_sec']:.0f} | {r['speedup_vs_fedtiny_dense']:.2f}× "
            f"| {r['pytorch_dense_samples_per_sec']:.0f} | {r['fedtiny_over_pytorch']:.2f}× |"
        )
    md += [
        "",
        "## Same models in both (trainable parameters, dense training FLOPs per sample)",
        "",
        "| model | width | fedtiny params | PyTorch params | fedtiny train MFLOP | "
        "PyTorch train MFLOP | match | PyTorch samples/s before / after fedtiny (min–max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        ok = (
            c["fedtiny_params"] == c["pytorch_params"]
            and abs(c["fedtiny_train_flops"] - c["pytorch_train_flops"])
            <= 1e-9 * c["fedtiny_train_flops"]
        )
        md.append(
            f"| {c['model']} | {fmt_width(c['width'])} | {c['fedtiny_params']:,} "
            f"| {c['pytorch_params']:,} | {c['fedtiny_train_flops'] / 1e6:.1f} "
            f"| {c['pytorch_train_flops'] / 1e6:.1f} | {'yes' if ok else 'NO'} "
            f"| {c['pytorch_before']:.0f} / {c['pytorch_after']:.0f} "
            f"({c['pytorch_min']:.0f}–{c['pytorch_max']:.0f}) |"
        )
    md += [
        "",
        "## Machine",
        "",
        f"- nproc: {machine['nproc']}; CPU: {machine['cpu_model']}; memory: {machine['memory']}; "
        f"kernel: {machine['kernel']}",
        f"- PyTorch {machine['torch_version']} (CPU; Python {machine['python']}; "
        f"{pt_meta['threads']} intra-op / {pt_meta['interop_threads']} inter-op threads; "
        f"oneDNN: {'yes' if pt_meta['mkldnn'] else 'no'}; "
        f"OMP_WAIT_POLICY={machine.get('omp_wait_policy') or 'unset'})",
        f"- fedtiny commit {machine['fedtiny_commit']}, binary {machine['fedtiny_sim']}",
        f"- run {machine['started_utc']} → {machine['finished_utc']}; load average (1/5/15 min) "
        f"at start {machine['loadavg_start']}, at end {machine['loadavg_end']}",
        "",
    ]
    text = "\n".join(md)
    with open(os.path.join(run, "side_by_side.md"), "w") as f:
        f.write(text)
    with open(os.path.join(run, "side_by_side.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows, "models": checks}, f, indent=2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
