#!/usr/bin/env python3
"""onnxruntime, single-threaded, on the model and inputs tern-compile-bench gives.

usage: ort_multi.py MODEL ITERS WARMUP SPEC.json
SPEC.json: {"inputs": [{name, dtype, shape, file}], "reference": [{dtype, shape, file}]},
each file raw little-endian numpy data. Prints JSON: per-run latencies (ms),
onnxruntime's version, and the largest |out - reference| / (1 + |reference|)
over all outputs.
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def load(t):
    return np.fromfile(t["file"], dtype=np.dtype(t["dtype"])).reshape(t["shape"])


model, iters, warmup, spec = sys.argv[1:5]
spec = json.load(open(spec))
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
feed = {t["name"]: load(t) for t in spec["inputs"]}
for _ in range(int(warmup)):
    sess.run(None, feed)
lat = []
for _ in range(int(iters)):
    t0 = time.perf_counter()
    out = sess.run(None, feed)
    lat.append((time.perf_counter() - t0) * 1e3)
diff = 0.0
refs = spec["reference"]
if len(refs) != len(out):
    diff = float("inf")
for got, ref in zip(out, refs):
    want = load(ref).astype(np.float64)
    got = np.asarray(got).astype(np.float64)
    if got.shape != want.shape:
        diff = float("inf")
    elif got.size:
        diff = max(diff, float(np.max(np.abs(got - want) / (1.0 + np.abs(want)))))
print(json.dumps({"latencies_ms": lat, "version": ort.__version__, "max_scaled_diff": diff}))
