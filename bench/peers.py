"""The PyTorch peers' side of the benchmarks: the same workloads as `flowmatching-bench`.

Usage: .venv/bin/python peers.py WORKLOAD [--iters N] [--warmup N] [--checkpoint DIR]
Prints one JSON line like `flowmatching-bench`. Defaults are the libraries' own (float32, all cores).
`--precision bf16` runs the MLP workloads (b1, b2, step, b3-*) under `torch.autocast("cpu",
dtype=torch.bfloat16)`, as flow_matching's and torchcfm's image examples train.

`ot --batch N --dim D --points FILE` is exact minibatch OT as torchcfm's OT-CFM computes it: POT's
`ot.dist` (squared Euclidean, float64) and `ot.emd` at its default iteration cap, timed; SciPy's
`linear_sum_assignment` on the same costs is timed once beside it (batches up to 2,048).
"""
import argparse
import json
import statistics
import time

import torch
from torch import nn

from flow_matching.path import AffineProbPath
from flow_matching.path.scheduler import CondOTScheduler
from flow_matching.solver import ODESolver
from flow_matching.utils import ModelWrapper


DEVICE = "cpu"
# torch.autocast's dtype for the MLP workloads (None: float32).
AUTOCAST = None


def autocast():
    """The autocast context of --precision (a no-op context in float32)."""
    import contextlib
    if AUTOCAST is None:
        return contextlib.nullcontext()
    return torch.autocast(DEVICE, dtype=AUTOCAST)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def checkerboard(n, device=None):
    device = device or DEVICE
    """flow_matching's 2-D example data."""
    x1 = torch.rand(n, device=device) * 4 - 2
    x2_ = torch.rand(n, device=device) - torch.randint(high=2, size=(n,), device=device) * 2
    x2 = x2_ + (torch.floor(x1) % 2)
    return torch.cat([x1[:, None], x2[:, None]], dim=1) / 0.45


class MLP(nn.Module):
    """(x, t) -> hidden (x depth) -> x, like flow_matching's and torchcfm's 2-D examples."""

    def __init__(self, hidden, depth, act):
        super().__init__()
        layers, fan_in = [], 3
        for _ in range(depth):
            layers += [nn.Linear(fan_in, hidden), act()]
            fan_in = hidden
        layers.append(nn.Linear(fan_in, 2))
        self.layers = nn.Sequential(*layers)

    def forward(self, x, t):
        t = t.reshape(-1, 1).expand(x.shape[0], 1)
        return self.layers(torch.cat([x, t], dim=1))


def load(model, checkpoint):
    """Weights from one of our checkpoints (safetensors names layers.i.weight / layers.i.bias)."""
    from safetensors.torch import load_file

    meta = json.load(open(f"{checkpoint}/checkpoint.json"))
    tensors = load_file(f"{checkpoint}/{meta['weights_file']}")
    linears = [m for m in model.layers if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        lin.weight.data.copy_(tensors[f"model.layers.{i}.weight"])
        lin.bias.data.copy_(tensors[f"model.layers.{i}.bias"])
    return model


def train_step_fn(hidden, depth, batch, act, sigma_min):
    model = MLP(hidden, depth, act).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    path = AffineProbPath(scheduler=CondOTScheduler())

    def step():
        x1 = checkerboard(batch)
        x0 = torch.randn_like(x1)
        t = torch.rand(batch, device=DEVICE)
        if sigma_min is None:  # flow_matching's example
            s = path.sample(t=t, x_0=x0, x_1=x1)
            xt, ut = s.x_t, s.dx_t
        else:  # torchcfm's ConditionalFlowMatcher with sigma = 0
            tt = t[:, None]
            xt, ut = tt * x1 + (1 - tt) * x0, x1 - x0
        with autocast():
            v = model(xt, t)
        loss = torch.pow(v.float() - ut, 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()  # like ours: the loss comes back to the host every step
        return None

    return step


class Counting(ModelWrapper):
    def __init__(self, model):
        super().__init__(model)
        self.calls = 0

    def forward(self, x, t, **extras):
        self.calls += 1
        return self.model(x, t)


def ot_workload(a):
    """POT's exact OT (and SciPy's assignment) on the points of --points: x0 then x1, float32."""
    import numpy as np
    import ot
    from scipy.optimize import linear_sum_assignment

    v = np.fromfile(a.points, dtype="<f4").astype(np.float64).reshape(2, a.batch, a.dim)
    x0, x1 = v[0], v[1]
    w = np.full(a.batch, 1.0 / a.batch)

    def fn():
        m = ot.dist(x0, x1, metric="sqeuclidean")
        plan, log = ot.emd(w, w, m, log=True)
        return m, plan, log

    for _ in range(a.warmup):
        fn()
    times = []
    for _ in range(a.iters):
        start = time.perf_counter()
        m, plan, log = fn()
        times.append((time.perf_counter() - start) * 1e3)
    row = {"workload": f"ot-n{a.batch}-d{a.dim}", "impl": "pot", "device": "cpu",
           "median_ms": statistics.median(times), "times_ms": times, "nfe": None, "gflops": None,
           "threads": torch.get_num_threads(), "pot_version": ot.__version__,
           "cost": float(np.sum(plan * m)),
           # POT stops at numItermax (100,000) and then says so: its plan is not optimal.
           "pot_optimal": not log.get("warning")}
    if a.batch <= 2048:
        start = time.perf_counter()
        r, c = linear_sum_assignment(m)
        row["scipy_ms"] = (time.perf_counter() - start) * 1e3
        row["scipy_cost"] = float(m[r, c].mean())
    print(json.dumps(row))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workload")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--checkpoint")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dim", type=int, default=2)
    ap.add_argument("--points")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    a = ap.parse_args()
    if a.workload == "ot":
        return ot_workload(a)
    global DEVICE, AUTOCAST
    DEVICE = a.device
    if a.precision == "bf16":
        if a.workload in ("b4", "gemm"):
            raise SystemExit(f"--precision bf16 is for the MLP training and sampling workloads, not {a.workload}")
        AUTOCAST = torch.bfloat16
    torch.manual_seed(0)
    w = a.workload
    nfe = None
    if w == "b1":
        fn = train_step_fn(512, 4, 4096, nn.SiLU, None)
    elif w == "b2":
        fn = train_step_fn(64, 3, 256, nn.SELU, 0.0)
    elif w == "gemm":
        a_m, b_m = torch.randn(2048, 2048, device=DEVICE), torch.randn(2048, 2048, device=DEVICE)

        def fn():
            torch.mm(a_m, b_m)
    elif w == "step":
        fn = train_step_fn(a.hidden, 4, a.batch, nn.SiLU, None)
    else:
        model = load(MLP(512, 4, nn.SiLU), a.checkpoint).to(DEVICE).eval()
        wrapped = Counting(model)
        solver = ODESolver(velocity_model=wrapped)
        if w in ("b3-midpoint", "b3-dopri5"):
            x0 = torch.randn(50_000, 2, device=DEVICE)

            def fn():
                wrapped.calls = 0
                with torch.no_grad(), autocast():
                    if w == "b3-midpoint":
                        solver.sample(x_init=x0, method="midpoint", step_size=0.05,
                                      time_grid=torch.tensor([0.0, 1.0], device=DEVICE))
                    else:
                        solver.sample(x_init=x0, method="dopri5", step_size=None, atol=1e-5, rtol=1e-5,
                                      time_grid=torch.tensor([0.0, 1.0], device=DEVICE))
                return wrapped.calls
        elif w == "b4":
            x1 = checkerboard(10_000)
            d = x1.shape[1]

            def log_p0(x):
                return -0.5 * (x ** 2).sum(1) - 0.5 * d * torch.log(torch.tensor(2 * torch.pi, device=x.device))

            def fn():
                wrapped.calls = 0
                solver.compute_likelihood(x_1=x1, log_p0=log_p0, step_size=None, method="dopri5", atol=1e-5,
                                          rtol=1e-5, exact_divergence=True,
                                          time_grid=torch.tensor([1.0, 0.0], device=DEVICE))
                return wrapped.calls
        else:
            raise SystemExit(f"unknown workload {w}")
    for _ in range(a.warmup):
        fn()
    sync()
    times = []
    for _ in range(a.iters):
        start = time.perf_counter()
        nfe = fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    name = f"step-h{a.hidden}-b{a.batch}" if w == "step" else w
    if a.precision == "bf16":
        name += "-bf16"
    med = statistics.median(times)
    gflops = 2 * 2048 ** 3 / (med * 1e6) if w == "gemm" else None
    print(json.dumps({"workload": name, "impl": "pytorch", "device": DEVICE, "median_ms": med, "times_ms": times, "nfe": nfe,
                      "threads": torch.get_num_threads(), "gflops": gflops}))


if __name__ == "__main__":
    main()
