"""Work-precision of the adaptive solves behind B3 (sampling) and B4 (likelihood): for each tolerance, the
NFE and the error against a float64 reference, ours and the peer's, on the same start points and data.

The benchmarks compare both sides at one tolerance (rtol = atol = 1e-5), but two step-size controllers
reach different accuracies at the same tolerance; this shows what each NFE buys.

Usage (after ./setup.sh):  .venv/bin/python accuracy.py [--points 5000] [--ll-points 2000] [--tols ...]
Reference: the peer's ODE solver (torchdiffeq's Dopri5) in float64 at rtol = atol = 1e-10, on the same
weights. Writes bench/out/accuracy.json, accuracy.md and accuracy.png.
"""
import argparse
import json
import platform
import subprocess
from datetime import date

import numpy as np
import torch

import peers
from run import MODEL, OURS, OUT, ROOT, build, ensure_model
from flow_matching.solver import ODESolver

REF_TOL = 1e-10


def log_p0(x):
    return -0.5 * (x ** 2).sum(1) - 0.5 * x.shape[1] * np.log(2 * np.pi)


def peer_solver(dtype):
    model = peers.load(peers.MLP(512, 4, torch.nn.SiLU), str(MODEL)).eval().to(dtype)
    counting = peers.Counting(model)
    return ODESolver(velocity_model=counting), counting


def peer_sample(dtype, x0, tol):
    solver, counting = peer_solver(dtype)
    with torch.no_grad():
        x1 = solver.sample(x_init=torch.from_numpy(x0).to(dtype), method="dopri5", step_size=None, atol=tol,
                           rtol=tol, time_grid=torch.tensor([0.0, 1.0], dtype=dtype))
    return x1.double().numpy(), counting.calls


def peer_likelihood(dtype, x1, tol):
    solver, counting = peer_solver(dtype)
    _, lp = solver.compute_likelihood(x_1=torch.from_numpy(x1).to(dtype), log_p0=log_p0, step_size=None,
                                      method="dopri5", atol=tol, rtol=tol, exact_divergence=True,
                                      time_grid=torch.tensor([1.0, 0.0], dtype=dtype))
    return lp.detach().double().numpy(), counting.calls


def ours(args):
    subprocess.run([str(OURS)] + args, check=True, cwd=ROOT, capture_output=True)


def ours_sample(x0_file, tol, tag):
    out = OUT / "accuracy" / f"ours-b3-{tag}.npy"
    ours(["sample", "--checkpoint", str(MODEL), "--x0", str(x0_file), "--solver", "dopri5", "--rtol", str(tol),
          "--atol", str(tol), "--out", str(out)])
    stats = json.loads(out.with_name(f"ours-b3-{tag}.stats.json").read_text())
    return np.load(out).astype(np.float64), stats["stats"]["nfe"]


def ours_likelihood(x1_file, n, tol, tag):
    per_point, report = OUT / "accuracy" / f"ours-b4-{tag}.npy", OUT / "accuracy" / f"ours-b4-{tag}.json"
    ours(["likelihood", "--checkpoint", str(MODEL), "--data", str(x1_file), "--batch-size", str(n), "--rtol",
          str(tol), "--atol", str(tol), "--per-point", str(per_point), "--out", str(report)])
    return np.load(per_point), int(json.loads(report.read_text())["nfe_total"])


def rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=5000, help="start points for the sampling comparison")
    ap.add_argument("--ll-points", type=int, default=2000, help="data points for the likelihood comparison")
    ap.add_argument("--tols", type=float, nargs="*", default=[1e-3, 1e-4, 1e-5, 1e-6])
    a = ap.parse_args()
    build()
    ensure_model()
    (OUT / "accuracy").mkdir(exist_ok=True)
    torch.manual_seed(0)
    x0 = torch.randn(a.points, 2).numpy()
    x1 = peers.checkerboard(a.ll_points).numpy()
    x0_file, x1_file = OUT / "accuracy" / "x0.npy", OUT / "accuracy" / "x1.npy"
    np.save(x0_file, x0)
    np.save(x1_file, x1)
    ref_x1, ref_nfe = peer_sample(torch.float64, x0, REF_TOL)
    ref_lp, ref_ll_nfe = peer_likelihood(torch.float64, x1, REF_TOL)
    print(f"reference: sampling {ref_nfe} NFE, likelihood {ref_ll_nfe} NFE (float64, tol {REF_TOL})", flush=True)
    rows = []
    for tol in a.tols:
        tag = f"{tol:g}"
        for side in ("flowmatching", "peer"):
            if side == "flowmatching":
                s, s_nfe = ours_sample(x0_file, tol, tag)
                lp, l_nfe = ours_likelihood(x1_file, a.ll_points, tol, tag)
            else:
                s, s_nfe = peer_sample(torch.float32, x0, tol)
                lp, l_nfe = peer_likelihood(torch.float32, x1, tol)
            row = {"side": side, "tol": tol, "b3_nfe": s_nfe, "b3_rms_error": rms(s, ref_x1), "b4_nfe": l_nfe,
                   "b4_rms_error": rms(lp, ref_lp), "b4_mean_nll_error": float(abs(lp.mean() - ref_lp.mean()))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
            "points": a.points, "ll_points": a.ll_points, "reference_tol": REF_TOL}
    (OUT / "accuracy.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    lines = ["| tol | side | B3 NFE | B3 RMS error of samples | B4 NFE | B4 RMS error of log p | B4 error of mean NLL |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tol']:g} | {r['side']} | {r['b3_nfe']} | {r['b3_rms_error']:.2e} | {r['b4_nfe']} | "
                     f"{r['b4_rms_error']:.2e} | {r['b4_mean_nll_error']:.2e} |")
    (OUT / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows)


def plot(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "b3", "B3: sampling (RMS error of x1)"),
                           (axes[1], "b4", "B4: exact log-likelihood (RMS error of log p)")):
        for side, style in (("flowmatching", "o-"), ("peer", "s--")):
            pts = [r for r in rows if r["side"] == side]
            ax.loglog([r[f"{key}_nfe"] for r in pts], [r[f"{key}_rms_error"] for r in pts], style, label=side)
            for r in pts:
                ax.annotate(f"{r['tol']:g}", (r[f"{key}_nfe"], r[f"{key}_rms_error"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("NFE")
        ax.set_ylabel("error against the float64 reference")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Dopri5 work-precision at rtol = atol = tol (labels): lower left is better", fontsize=10)
    fig.tight_layout()
    tmp = OUT / "accuracy.png.tmp"
    fig.savefig(tmp, dpi=120, format="png")
    tmp.replace(OUT / "accuracy.png")


if __name__ == "__main__":
    main()
