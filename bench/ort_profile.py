"""Per-operator profile of onnxruntime (one thread) on a model, to set next
to the tract profile of bench/examples/op_profile.rs.

    python bench/ort_profile.py MODEL.onnx 1,3,48,192 [RUNS]
"""
import collections
import json
import os
import sys
import tempfile

import numpy as np
import onnxruntime as ort

WARMUP = 20
model, shape = sys.argv[1], [int(d) for d in sys.argv[2].split(",")]
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 200
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
opts.enable_profiling = True
opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
x = (np.indices(shape).sum(axis=0) % 17).astype(np.float32) / 17.0
feed = {sess.get_inputs()[0].name: x}
for _ in range(WARMUP + runs):
    sess.run(None, feed)
trace = json.load(open(sess.end_profiling()))

model_runs = [ev for ev in trace if ev.get("cat") == "Session" and ev["name"] == "model_run"][-runs:]
since = model_runs[0]["ts"]
per_op = collections.defaultdict(lambda: [0, 0.0])
for ev in trace:
    if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time") and ev["ts"] >= since:
        per_op[ev["args"]["op_name"]][0] += 1
        per_op[ev["args"]["op_name"]][1] += ev["dur"]
per_run_ms = sum(ev["dur"] for ev in model_runs) / runs / 1e3
nodes = sum(c for c, _ in per_op.values()) // runs
print(f"\n## onnxruntime {ort.__version__}, 1 thread: {nodes} nodes per run, {per_run_ms:.3f} ms per run (mean of {runs})\n")
print("| operator | nodes | ms per run | share |\n|---|---|---|---|")
for op, (count, us) in sorted(per_op.items(), key=lambda kv: -kv[1][1]):
    print(f"| {op} | {count // runs} | {us / runs / 1e3:.3f} | {100 * us / runs / 1e3 / per_run_ms:.1f}% |")
