#!/usr/bin/env python3
"""rotsweep bench: TF-Keras CPU reference of the rotsweep models (rnn, gru, mha).

Same architecture and protocol as ref_torch.py, with a compiled tf.function
train step (graph mode). One model at one length per process; prints one
JSON line with train and infer median ms and peak RSS.
"""
import argparse
import json
import math
import os
import resource
import statistics
import time

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
from keras import layers  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(THREADS)
tf.config.threading.set_inter_op_parallelism_threads(THREADS)


def positions(length, width):
    pos = np.arange(length)[:, None].astype("float32")
    idx = np.arange(width)[None, :]
    ang = pos / np.power(10000.0, (idx // 2 * 2) / width)
    return np.where(idx % 2 == 0, np.sin(ang), np.cos(ang)).astype("float32")


def attend(x, width, heads):
    y = layers.MultiHeadAttention(num_heads=heads, key_dim=width // heads)(x, x)
    return layers.LayerNormalization(epsilon=1e-3)(layers.Add()([x, y]))


def build(kind, length, vocab=27, emb=32, filters=64, units=64, classes=46):
    tokens = keras.Input((length,), dtype="int32")
    x = layers.Embedding(vocab, emb)(tokens)
    if kind == "mha":
        # Scaled by sqrt(E) before the positions, as rotsweep's model does.
        x = x * math.sqrt(emb) + positions(length, emb)[None]
    x = layers.Conv1D(filters, 4, strides=4, activation="elu")(x)
    if kind == "mha":
        x = attend(x, filters, 4)
        x = layers.AveragePooling1D(2)(x)
        x = attend(x, filters, 4)
        x = layers.GlobalMaxPooling1D()(x)
    else:
        layer = layers.GRU if kind == "gru" else layers.SimpleRNN
        x = layer(units, return_sequences=True)(x)
        x = layers.AveragePooling1D(2)(x)
        x = layer(units)(x)
    x = layers.Dense(64, activation="elu")(x)
    x = layers.Dense(32, activation="elu")(x)
    return keras.Model(tokens, layers.Dense(classes)(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", required=True)
    ap.add_argument("--len", type=int, required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    keras.utils.set_random_seed(7)

    model = build(a.kind, a.len)
    opt = keras.optimizers.Adam(1e-3)
    lossf = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(7)
    tokens = tf.constant(rng.integers(2, 27, (a.batch, a.len)), dtype=tf.int32)
    labels = tf.constant(rng.integers(0, 46, (a.batch,)), dtype=tf.int32)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = lossf(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def infer(x):
        return model(x, training=False)

    def timed(fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        _ = out.numpy()  # wait for the result
        return (time.perf_counter() - t) * 1e3

    for _ in range(a.warmup):
        timed(step, tokens, labels)
    train = [timed(step, tokens, labels) for _ in range(a.steps)]
    for _ in range(a.warmup):
        timed(infer, tokens)
    inf = [timed(infer, tokens) for _ in range(a.steps)]

    print(json.dumps({
        "framework": "tf-keras",
        "version": f"tf {tf.__version__} keras {keras.__version__}",
        "kind": a.kind,
        "len": a.len,
        "batch": a.batch,
        "threads": THREADS,
        "params": int(model.count_params()),
        "train_ms": statistics.median(train),
        "train_min_ms": min(train),
        "train_max_ms": max(train),
        "infer_ms": statistics.median(inf),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
