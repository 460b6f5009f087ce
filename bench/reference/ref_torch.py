#!/usr/bin/env python3
"""rotsweep bench: PyTorch CPU reference of the rotsweep models (rnn, gru, mha).

Architecture as in rotsweep's worker/src/model.rs defaults: token embedding
(27 -> 32), [mha: x sqrt(32) + sinusoidal positions], Conv1D 64 filters, kernel 4,
stride 4, ELU; a body (two recurrent layers around an average pool of 2, or
two self-attention blocks around the pool followed by a max over time);
Dense 64 ELU, Dense 32 ELU, Dense 46 (logits). Adam 1e-3, cross-entropy.

Times one model at one length per process (so the peak RSS belongs to that
row) and prints one JSON line: train and infer median ms and peak RSS.
"""
import argparse
import json
import math
import os
import resource
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F


def positions(length, width):
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(-math.log(10000.0) * (torch.arange(width) // 2 * 2).float() / width)
    ang = pos * freq
    out = torch.empty(length, width)
    out[:, 0::2] = torch.sin(ang[:, 0::2])
    out[:, 1::2] = torch.cos(ang[:, 1::2])
    return out


class Attend(nn.Module):
    """Self-attention with a residual and a layer norm."""

    def __init__(self, width, heads):
        super().__init__()
        self.mha = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width, eps=1e-3)

    def forward(self, x):
        y, _ = self.mha(x, x, x, need_weights=False)
        return self.norm(x + y)


class Classifier(nn.Module):
    def __init__(self, kind, length, vocab=27, emb=32, filters=64, units=64, classes=46):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(vocab, emb)
        self.conv = nn.Conv1d(emb, filters, kernel_size=4, stride=4)
        if kind == "mha":
            self.register_buffer("pos", positions(length, emb).unsqueeze(0))
            self.first, self.second = Attend(filters, 4), Attend(filters, 4)
        elif kind in ("rnn", "gru"):
            layer = nn.GRU if kind == "gru" else nn.RNN
            self.first = layer(filters, units, batch_first=True)
            self.second = layer(units, units, batch_first=True)
        else:
            raise SystemExit(f"unknown kind {kind}")
        self.head = nn.Sequential(
            nn.Linear(units, 64), nn.ELU(), nn.Linear(64, 32), nn.ELU(), nn.Linear(32, classes)
        )

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.kind == "mha":
            # Scaled by sqrt(E) before the positions, as rotsweep's model does.
            x = x * math.sqrt(x.shape[-1]) + self.pos
        x = F.elu(self.conv(x.transpose(1, 2)))  # (B, C, T)
        if self.kind == "mha":
            x = self.first(x.transpose(1, 2))
            x = F.avg_pool1d(x.transpose(1, 2), 2).transpose(1, 2)
            x = self.second(x).amax(dim=1)
        else:
            x, _ = self.first(x.transpose(1, 2))
            x = F.avg_pool1d(x.transpose(1, 2), 2).transpose(1, 2)
            _, last = self.second(x)
            x = last[0]
        return self.head(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", required=True)
    ap.add_argument("--len", type=int, required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(7)

    model = Classifier(a.kind, a.len)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(2, 27, (a.batch, a.len))
    labels = torch.randint(0, 46, (a.batch,))

    def train_step():
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(tokens), labels)
        loss.backward()
        opt.step()
        return (time.perf_counter() - t) * 1e3

    model.train()
    for _ in range(a.warmup):
        train_step()
    train = [train_step() for _ in range(a.steps)]

    model.eval()
    infer = []
    with torch.no_grad():
        for i in range(a.warmup + a.steps):
            t = time.perf_counter()
            model(tokens)
            if i >= a.warmup:
                infer.append((time.perf_counter() - t) * 1e3)

    print(json.dumps({
        "framework": "pytorch",
        "version": torch.__version__,
        "kind": a.kind,
        "len": a.len,
        "batch": a.batch,
        "threads": a.threads,
        "params": sum(p.numel() for p in model.parameters()),
        "train_ms": statistics.median(train),
        "train_min_ms": min(train),
        "train_max_ms": max(train),
        "infer_ms": statistics.median(infer),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
