#!/usr/bin/env python3
"""onnxruntime, single-threaded, on the same model and input as tern-bench.

usage: ort_bench.py MODEL SHAPE(1,3,48,192) ITERS WARMUP INPUT.f32 REFERENCE.f32
Prints JSON: per-run latencies (ms), onnxruntime's version, and the largest
absolute difference between its first output and the reference (tract's).
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort

model, shape, iters, warmup, inp, ref = sys.argv[1:7]
shape = [int(d) for d in shape.split(",")]
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
x = np.fromfile(inp, dtype=np.float32).reshape(shape)
feed = {sess.get_inputs()[0].name: x}
for _ in range(int(warmup)):
    sess.run(None, feed)
lat = []
for _ in range(int(iters)):
    t0 = time.perf_counter()
    out = sess.run(None, feed)
    lat.append((time.perf_counter() - t0) * 1e3)
reference = np.fromfile(ref, dtype=np.float32)
first = np.asarray(out[0], dtype=np.float32).reshape(-1)
diff = float(np.max(np.abs(first - reference))) if first.size == reference.size else float("inf")
print(json.dumps({"latencies_ms": lat, "version": ort.__version__, "max_abs_diff": diff}))
