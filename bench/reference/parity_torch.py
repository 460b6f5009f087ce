#!/usr/bin/env python3
"""rotsweep bench: train the PyTorch reference on real folds, for accuracy parity.

Trains the models of ref_torch.py on every rotation of a fold folder with
rotsweep's data rules and training loop, and prints one JSON line per
(model, rotation) with the test accuracy, then one per model with the mean
and sample standard deviation (ddof = 1). `bench/parity` runs it beside
`rotsweep run` with the same settings and compares the two.

Data rules as in shared/src/data.rs: rotation r trains on folds r, r+1, r+2
(mod 5), validates on r+3 and tests on r+4; the vocabulary is the letters
A-Z seen in the training folds (ids 2.., 0 = padding, 1 = anything else);
sequences keep their last max_len characters and are padded at the front;
labels are the training folds' families, sorted. Training as in
worker/src/train.rs: Adam, cross-entropy, one shuffled pass over the
training folds per epoch, early stopping on validation accuracy with
`patience`, and the weights of the best epoch restored for the test.
"""
import argparse
import copy
import csv
import json
import math
import os
import statistics

import torch
from torch.nn import functional as F

from ref_torch import Classifier


def glorot_(w, fan_in, fan_out):
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    torch.nn.init.uniform_(w, -bound, bound)


def keras_init(model):
    """rotsweep's initialisers (worker/src/model.rs), which follow Keras':
    U(-0.05, 0.05) embedding, Glorot uniform on every kernel counted over
    the whole (stacked) matrix, zero biases."""
    with torch.no_grad():
        torch.nn.init.uniform_(model.embed.weight, -0.05, 0.05)
        w = model.conv.weight  # (F, E, K)
        glorot_(w, w.shape[1] * w.shape[2], w.shape[0] * w.shape[2])
        for name, p in model.named_parameters():
            if name.startswith("embed.") or name == "conv.weight":
                continue
            if name.endswith("norm.weight"):
                torch.nn.init.ones_(p)
            elif p.dim() == 1:
                torch.nn.init.zeros_(p)
            elif name.endswith("in_proj_weight"):
                # Query, key and value: one (E, E) kernel each in rotsweep.
                for chunk in p.chunk(3, dim=0):
                    glorot_(chunk, chunk.shape[1], chunk.shape[0])
            elif p.dim() == 2:
                glorot_(p, p.shape[1], p.shape[0])


def read_fold(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return [(seq, label) for seq, label in rows[1:]]


def encode(rows, vocab, labels, max_len):
    ids = torch.zeros(len(rows), max_len, dtype=torch.long)
    for i, (seq, _) in enumerate(rows):
        kept = seq[-max_len:]
        for j, c in enumerate(kept):
            ids[i, max_len - len(kept) + j] = vocab.get(c, 1)
    y = torch.tensor([labels[label] for _, label in rows])
    return ids, y


def accuracy(model, x, y, batch):
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            right += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return right / len(y)


def run(kind, rotation, folds, a):
    train = [r for k in range(3) for r in folds[(rotation + k) % 5]]
    val, test = folds[(rotation + 3) % 5], folds[(rotation + 4) % 5]
    letters = sorted({c for s, _ in train for c in s if "A" <= c <= "Z"})
    vocab = {c: i + 2 for i, c in enumerate(letters)}
    names = sorted({label for _, label in train})
    labels = {name: i for i, name in enumerate(names)}
    for _, label in val + test:
        if label not in labels:
            raise SystemExit(f"label {label} of rotation {rotation} is not in its training folds")
    xtr, ytr = encode(train, vocab, labels, a.max_len)
    xva, yva = encode(val, vocab, labels, a.max_len)
    xte, yte = encode(test, vocab, labels, a.max_len)

    torch.manual_seed(a.seed * 1000 + rotation)
    model = Classifier(kind, a.max_len, vocab=len(vocab) + 2, classes=len(names))
    if a.init == "keras":
        keras_init(model)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    best, best_state, since = -1.0, None, 0
    for epoch in range(1, a.epochs + 1):
        model.train()
        order = torch.randperm(len(ytr))
        for i in range(0, len(order), a.batch):
            idx = order[i:i + a.batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        val_acc = accuracy(model, xva, yva, a.batch)
        if val_acc > best:
            best, best_state, since = val_acc, copy.deepcopy(model.state_dict()), 0
        else:
            since += 1
            if since >= a.patience:
                break
    model.load_state_dict(best_state)
    return accuracy(model, xte, yte, a.batch), epoch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--kinds", default="rnn,gru,mha")
    ap.add_argument("--max-len", type=int, default=192)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--init", choices=["torch", "keras"], default="keras",
                    help="keras: rotsweep's (and Keras') initialisers; torch: PyTorch's defaults")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    folds = [read_fold(os.path.join(a.data, f"pfam_fold_{k}.csv")) for k in range(5)]
    for kind in a.kinds.split(","):
        accs = []
        for rotation in range(5):
            acc, epochs = run(kind, rotation, folds, a)
            accs.append(acc)
            print(json.dumps({"framework": "pytorch", "model": kind, "rotation": rotation,
                              "test_accuracy": acc, "epochs_trained": epochs}), flush=True)
        print(json.dumps({"framework": "pytorch", "model": kind, "n": len(accs),
                          "mean": statistics.mean(accs), "sd": statistics.stdev(accs)}), flush=True)


if __name__ == "__main__":
    main()
