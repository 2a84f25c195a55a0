"""B5's PyTorch peer: the same U-Net as flowmatching's (crates/flowmatching/src/nn/unet.rs), in plain torch eager.

Usage: python peer_unet.py b5-step|b5-sample [--batch 128] [--unet small|tiny] [--iters N] [--warmup N]
       [--device cuda|cpu] [--precision f32|bf16]
Prints one JSON line like `flowmatching-bench b5-step`. Needs only torch.

`--precision bf16` runs the model's forward (and so its backward) under
`torch.autocast(device, dtype=torch.bfloat16)`, PyTorch's mixed precision: weights and optimizer state
stay float32, the loss is computed in float32 from the model's output.

The workloads match ours: b5-step is one CFM training step (CondOT path, sigma_min 0, Adam lr 1e-3, label
dropout 0.1, the loss read back to the host); b5-sample is midpoint with 20 steps (40 NFE) from noise.
"""
import argparse
import contextlib
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


PRESETS = {
    # base channels, channel mults, res blocks, attention resolutions, heads, groups
    "small": (64, (1, 2, 2), 2, (14, 7), 4, 32),
    "tiny": (32, (1, 2, 2), 1, (7,), 1, 8),
}


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, c, heads, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.heads = heads

    def forward(self, x):
        n, c, h, w = x.shape
        d = c // self.heads
        tokens = self.norm(x).reshape(n, c, h * w).transpose(1, 2)
        q, k, v = self.qkv(tokens).reshape(n, h * w, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        out = self.proj((att @ v).transpose(1, 2).reshape(n, h * w, c))
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class UNet(nn.Module):
    """Blocks in the order of unet.rs's `layout`: down (res [+attn], save; stride-2 conv, save), mid
    (res, attn, res), up (cat skip, res [+attn]; nearest x2 + conv)."""

    def __init__(self, preset, channels=1, size=28, num_classes=10):
        super().__init__()
        base, mults, res_blocks, attn_res, heads, groups = PRESETS[preset]
        emb = 4 * base
        half = base // 2
        freqs = 1000.0 * torch.exp(-math.log(10000.0) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs[None, :])
        self.time = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_embedding = nn.Embedding(num_classes + 1, emb)
        self.num_classes = num_classes
        self.conv_in = nn.Conv2d(channels, base, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.kinds = []

        def add(kind, module=None):
            self.kinds.append(kind)
            self.blocks.append(module if module is not None else nn.Identity())

        chans = [m * base for m in mults]
        skips, c, res = [base], base, size
        add("save")
        for i, co in enumerate(chans):
            for _ in range(res_blocks):
                add("res", ResBlock(c, co, emb, groups))
                c = co
                if res in attn_res:
                    add("attn", Attention(c, heads, groups))
                add("save")
                skips.append(c)
            if i + 1 < len(chans):
                add("down", nn.Conv2d(c, c, 3, stride=2, padding=1))
                add("save")
                skips.append(c)
                res //= 2
        add("res", ResBlock(c, c, emb, groups))
        add("attn", Attention(c, heads, groups))
        add("res", ResBlock(c, c, emb, groups))
        for i in reversed(range(len(chans))):
            co = chans[i]
            for _ in range(res_blocks + 1):
                add("cat")
                add("res", ResBlock(c + skips.pop(), co, emb, groups))
                c = co
                if res in attn_res:
                    add("attn", Attention(c, heads, groups))
            if i > 0:
                add("up", nn.Conv2d(c, c, 3, padding=1))
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(groups, base), nn.SiLU(), nn.Conv2d(base, channels, 3, padding=1))

    def forward(self, x, t, labels):
        arg = t[:, None] * self.freqs
        emb = self.time(torch.cat([arg.sin(), arg.cos()], dim=1)) + self.class_embedding(labels)
        h = self.conv_in(x)
        saved = []
        for kind, block in zip(self.kinds, self.blocks):
            if kind == "save":
                saved.append(h)
            elif kind == "cat":
                h = torch.cat([h, saved.pop()], dim=1)
            elif kind == "res":
                h = block(h, emb)
            elif kind == "up":
                h = block(F.interpolate(h, scale_factor=2, mode="nearest"))
            else:
                h = block(h)
        return self.out(h)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=["b5-step", "b5-sample"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--unet", default="small", choices=list(PRESETS))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    a = ap.parse_args()
    dev = a.device

    def autocast():
        if a.precision == "f32":
            return contextlib.nullcontext()
        return torch.autocast(dev, dtype=torch.bfloat16)

    torch.manual_seed(0)
    model = UNet(a.unet).to(dev)
    b = a.batch
    data = torch.randn(1024, 1, 28, 28, device=dev)
    data_labels = torch.arange(1024, device=dev) % 10

    if a.workload == "b5-step":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def fn():
            idx = torch.randint(0, 1024, (b,), device=dev)
            x1, y = data[idx], data_labels[idx]
            y = torch.where(torch.rand(b, device=dev) < 0.1, torch.full_like(y, model.num_classes), y)
            x0 = torch.randn_like(x1)
            t = torch.rand(b, device=dev)
            tt = t[:, None, None, None]
            xt = (1 - tt) * x0 + tt * x1
            with autocast():
                v = model(xt, t, y)
            loss = F.mse_loss(v.float(), x1 - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()
    else:
        model.eval()
        x0 = torch.randn(b, 1, 28, 28, device=dev)
        labels = torch.full((b,), model.num_classes, device=dev, dtype=torch.long)

        @torch.no_grad()
        def fn():
            x, h = x0, 1.0 / 20
            for i in range(20):
                t = torch.full((b,), i * h, device=dev)
                with autocast():
                    k1 = model(x, t, labels).float()
                    x = x + h * model(x + 0.5 * h * k1, t + 0.5 * h, labels).float()
            return x

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    for _ in range(a.warmup):
        fn()
    sync()
    times = []
    for _ in range(a.iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    suffix = ("-tiny" if a.unet == "tiny" else "") + ("-bf16" if a.precision == "bf16" else "")
    print(json.dumps({"workload": f"{a.workload}-b{b}{suffix}", "impl": "pytorch", "device": dev,
                      "median_ms": statistics.median(times), "times_ms": times,
                      "nfe": 40 if a.workload == "b5-sample" else None, "threads": torch.get_num_threads(),
                      "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
