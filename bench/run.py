"""Runs our benchmarks and the PyTorch peers' side by side, interleaved (A B A B ...), and prints medians
and the ratio peer / ours (above 1: we are faster).

Usage (after ./setup.sh):  .venv/bin/python run.py [--rounds 3] [--workloads b1 b2 b3-midpoint ... ot]
It builds `flowmatching` in release mode, trains the B1 model once (bench/out/b1-model) for the sampling
and likelihood workloads, and writes bench/out/results.json and bench/out/results.md.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OURS = ROOT / "target" / "release" / "flowmatching"
OURS_BENCH = ROOT / "target" / "release" / "flowmatching-bench"
PEERS = [sys.executable, str(HERE / "peers.py")]
OUT = HERE / "out"
MODEL = OUT / "b1-model"

# workload -> (iterations per process, warm-up iterations)
WORKLOADS = {
    "b1": (5, 2),
    "b2": (200, 20),
    "b3-midpoint": (1, 1),
    "b3-dopri5": (1, 1),
    "b4": (2, 1),
    "b3-dopri5-equal-error": (1, 1),
    "b4-equal-error": (2, 1),
    "gemm": (10, 3),
    "b5-step-cpu": (10, 2),
    "b5-sample-cpu": (2, 1),
    "b5-step-cpu-b32": (5, 1),
    "b1-bf16": (5, 2),
    "b3-midpoint-bf16": (1, 1),
    "b5-step-cpu-bf16": (10, 2),
    "b5-step-cpu-b32-bf16": (5, 1),
    "b5-sample-cpu-bf16": (2, 1),
}
# Mixed precision: our bf16 products (AVX-512 BF16) against torch.autocast("cpu", dtype=torch.bfloat16),
# the same workload otherwise: workload -> (workload, arguments for both sides).
BF16 = {
    "b1-bf16": ("b1", ["--precision", "bf16"]),
    "b3-midpoint-bf16": ("b3-midpoint", ["--precision", "bf16"]),
}
# The U-Net workloads on the CPU: the tiny U-Net (the CPU preset) at a CPU-sized batch, against the same
# U-Net in torch eager (peer_unet.py): workload -> (our bench workload, arguments for both sides).
UNET_CPU = {
    "b5-step-cpu": ("b5-step", ["--unet", "tiny", "--batch", "8"]),
    "b5-step-cpu-b32": ("b5-step", ["--unet", "tiny", "--batch", "32"]),
    "b5-sample-cpu": ("b5-sample", ["--unet", "tiny", "--batch", "32"]),
}
# The U-Net's convolutions in bf16 (ours) against the same U-Net under torch.autocast.
UNET_CPU.update({f"{w}-bf16": (kind, args + ["--precision", "bf16"]) for w, (kind, args) in UNET_CPU.items()})
# Equal-error runs (bench/accuracy.py): our Dopri5 at 1e-4 reaches a smaller error than the peer's at the
# workloads' 1e-5 (B3: RMS 4.7e-5 vs 7.8e-5 at 32 NFE each; B4: 1.65e-4 vs 1.76e-4 at 32 vs 50 NFE).
# workload -> (our workload, our extra arguments); the peer runs its workload unchanged.
EQUAL_ERROR = {
    "b3-dopri5-equal-error": ("b3-dopri5", ["--tol", "1e-4"]),
    "b4-equal-error": ("b4", ["--tol", "1e-4"]),
}
PEER_UNET = [sys.executable, str(HERE / "peer_unet.py")]
# Exact minibatch OT (`ot`): (batch, dimension) -> (iterations per process, warm-up iterations); x0 ~
# N(0, I), x1 ~ U(-4, 4)^d, the same float32 points for both sides (bench/out/ot-nN-dD.f32).
OT = {(256, 2): (20, 3), (1024, 2): (5, 1), (4096, 2): (2, 0), (1024, 784): (5, 1)}


def ot_points(n, d):
    """Writes the points of one OT problem once; returns the file."""
    import numpy as np
    path = OUT / f"ot-n{n}-d{d}.f32"
    if not path.exists():
        rng = np.random.default_rng(0)
        x0 = rng.normal(size=(n, d))
        x1 = rng.uniform(-4, 4, size=(n, d))
        np.stack([x0, x1]).astype("<f4").tofile(path)
    return path
SCALING = [("step", h, b) for h in (64, 256, 1024) for b in (256, 4096, 16384)]


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_rss_kb(cmd):
    """Peak resident memory of a command, via GNU time."""
    r = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True, cwd=ROOT)
    return int(r.stderr.strip().splitlines()[-1]) if r.returncode == 0 else None


def build():
    """Builds our binaries (release) and makes bench/out."""
    subprocess.run(["cargo", "build", "--release", "-p", "flowmatching-cli", "-p", "flowmatching-bench"],
                   check=True, cwd=ROOT)
    OUT.mkdir(exist_ok=True)


def ensure_model():
    """Trains the B1 model for the sampling and likelihood workloads once (bench/out/b1-model)."""
    if not (MODEL / "checkpoint.json").exists():
        subprocess.run([str(OURS), "train", "--data", "checkerboard", "--out", str(MODEL), "--hidden", "512",
                        "--depth", "4", "--batch-size", "4096", "--steps", "300", "--ema-decay", "0"],
                       check=True, cwd=ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS) + ["ot"])
    ap.add_argument("--scaling", action="store_true", help="also the B1 step at several widths and batches")
    a = ap.parse_args()
    build()
    if any(w.startswith(("b3", "b4")) for w in a.workloads):
        ensure_model()
    jobs = [(w, [], *WORKLOADS[w]) for w in a.workloads if w != "ot"]
    if "ot" in a.workloads:
        for (n, d), (iters, warmup) in OT.items():
            points = ["--batch", str(n), "--dim", str(d), "--points", str(ot_points(n, d))]
            jobs.append((f"ot-n{n}-d{d}", points, iters, warmup))
    if a.scaling:
        jobs += [(f"step-h{h}-b{b}", ["--hidden", str(h), "--batch", str(b)], 3, 1) for (_, h, b) in SCALING]
    results = []
    for name, extra, iters, warmup in jobs:
        kind = "step" if name.startswith("step") else "ot" if name.startswith("ot-") else name
        if name in UNET_CPU:
            kind, extra = UNET_CPU[name]
        if name in BF16:
            kind, extra = BF16[name]
        ours_only = []
        if name in EQUAL_ERROR:
            kind, ours_only = EQUAL_ERROR[name]
        common = [kind, "--iters", str(iters), "--warmup", str(warmup)] + extra
        if name.startswith(("b3", "b4")):
            common += ["--checkpoint", str(MODEL)]
        ours_cmd, peer_cmd = [str(OURS_BENCH)] + common + ours_only, PEERS + common
        if name in UNET_CPU:
            peer_cmd = PEER_UNET + common + ["--device", "cpu"]
        ours, peer = [], []
        for _ in range(a.rounds):
            ours.append(run(ours_cmd))
            peer.append(run(peer_cmd))
        o = statistics.median(r["median_ms"] for r in ours)
        p = statistics.median(r["median_ms"] for r in peer)
        # Each round's own ratio (its peer run against our run just before it): the spread says how
        # much the shared machine's phases moved the result.
        rounds = [r_p["median_ms"] / r_o["median_ms"] for r_o, r_p in zip(ours, peer)]
        row = {"workload": name, "ours_ms": o, "peer_ms": p, "ratio": p / o,
               "round_ratio_min": min(rounds), "round_ratio_max": max(rounds),
               "ours_gflops": ours[-1].get("gflops"), "peer_gflops": peer[-1].get("gflops"),
               "ours_nfe": ours[-1]["nfe"], "peer_nfe": peer[-1]["nfe"], "threads": ours[-1]["threads"],
               "ours_precision": ours[-1].get("precision"), "cpu": ours[-1].get("cpu")}
        if name.startswith("ot-"):
            row.update({"ours_cost": ours[-1]["cost"], "peer_cost": peer[-1]["cost"],
                        "ours_certified": ours[-1]["certified"], "pot_optimal": peer[-1]["pot_optimal"],
                        "scipy_ms": peer[-1].get("scipy_ms"), "scipy_cost": peer[-1].get("scipy_cost")})
        if name in ("b1", "b1-bf16") or name.startswith("step"):
            row["ours_peak_rss_kb"] = peak_rss_kb(ours_cmd)
            row["peer_peak_rss_kb"] = peak_rss_kb(peer_cmd)
        results.append(row)
        print(json.dumps(row), flush=True)
    cpu = next((r["cpu"] for r in results if r.get("cpu")), platform.processor() or platform.machine())
    info = {"date": str(date.today()), "machine": cpu, "cpus": os.cpu_count(), "rounds": a.rounds}
    (OUT / "results.json").write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    lines = ["| workload | flowmatching (ms) | PyTorch peer (ms) | ratio peer/ours | rounds' ratios | NFE ours / peer |",
             "|---|---|---|---|---|---|"]
    for r in results:
        nfe = f"{r['ours_nfe']} / {r['peer_nfe']}" if r["ours_nfe"] is not None else ""
        spread = f"{r['round_ratio_min']:.2f}-{r['round_ratio_max']:.2f}"
        lines.append(f"| {r['workload']} | {r['ours_ms']:.2f} | {r['peer_ms']:.2f} | {r['ratio']:.2f} | {spread} | {nfe} |")
    ot_rows = [r for r in results if r["workload"].startswith("ot-")]
    if ot_rows:
        lines += ["", "| OT problem | ours (ms) | POT ot.emd (ms) | ratio POT/ours | SciPy LSA (ms) | ours: cost, certified "
                  "| POT: cost, optimal |", "|---|---|---|---|---|---|---|"]
        for r in ot_rows:
            scipy = f"{r['scipy_ms']:.0f}" if r["scipy_ms"] is not None else "-"
            lines.append(f"| {r['workload']} | {r['ours_ms']:.1f} | {r['peer_ms']:.1f} | {r['ratio']:.2f} | {scipy} "
                         f"| {r['ours_cost']:.10f}, {r['ours_certified']} | {r['peer_cost']:.10f}, {r['pot_optimal']} |")
    lines += ["", f"{info['date']}, {cpu}, {info['cpus']} CPUs, {a.rounds} rounds."]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
