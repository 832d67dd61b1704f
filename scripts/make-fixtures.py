#!/usr/bin/env python3
"""Builds the test and demo models in fixtures/ and their expected outputs.

Trains a small scikit-learn classifier on the Iris data set, exports it with
skl2onnx, and records predictions made by onnxruntime (an implementation
independent of tract) for the end-to-end tests to compare against.

    pip install scikit-learn skl2onnx onnx onnxruntime
    python3 scripts/make-fixtures.py

The outputs are committed so that the demo and the tests need no Python.
`python3 scripts/make-fixtures.py recurrent` (or `wide`, `staged`, `compile`, `zipmap`, `drift`)
rebuilds only the recurrent models (or wide.onnx, or the scorer-*.onnx
versions); their bytes come out the same every time.
"""
import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort

OUT = pathlib.Path(__file__).resolve().parent.parent / "fixtures"


def small_models() -> None:
    """Two hand-built graphs for failure tests.

    fragile.onnx: idx int64[1] -> Gather(table f32[4]) -> y f32[1]; an index
    past the table fails inside the runtime although the signature matches.
    slow.onnx: x f32[1] -> Expand to f32[2048, 2048] -> ReduceSum -> y; tens
    of milliseconds per run, to fill a request queue.
    """
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.array([1.0, 2.0, 3.0, 4.0], np.float32), "table")
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        "fragile",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [table],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "fragile.onnx")

    shape = numpy_helper.from_array(np.array([2048, 2048], np.int64), "shape")
    g = helper.make_graph(
        [
            helper.make_node("Expand", ["x", "shape"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0),
        ],
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [shape],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "slow.onnx")


def wide_model() -> None:
    """wide.onnx: x f32[N, 65536] -> ReduceSum over axis 1 -> y f32[N]: a
    quarter of a megabyte per row, to test the agent's request memory; and
    echo.onnx, which answers with its input."""
    from onnx import TensorProto, helper, numpy_helper

    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    g = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 65536])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        [axes],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "wide.onnx")
    # echo.onnx: the same rows back, for answers as large as the request.
    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "echo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 65536])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 65536])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "echo.onnx")
    print("wrote wide.onnx and echo.onnx")


def recurrent_models() -> None:
    """Models whose operators keep a state inside one run: a GRU and an LSTM
    over a 5-step sequence, and a Scan that sums its steps into a state that
    starts from a constant. A runtime that carried that state over into the
    next run would answer differently from the second request on; onnxruntime
    (which does not) gives the expected outputs.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(14)
    steps, batch, width, hidden = 5, 1, 3, 4
    x = rng.standard_normal((steps, batch, width)).astype(np.float32)
    expected = {"producer": f"onnxruntime {ort.__version__}", "models": {}}

    def rec(op: str, gates: int) -> onnx.ModelProto:
        w = numpy_helper.from_array(rng.standard_normal((1, gates * hidden, width)).astype(np.float32) * 0.5, "W")
        r = numpy_helper.from_array(rng.standard_normal((1, gates * hidden, hidden)).astype(np.float32) * 0.5, "R")
        b = numpy_helper.from_array(rng.standard_normal((1, 2 * gates * hidden)).astype(np.float32) * 0.1, "B")
        outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
        g = helper.make_graph(
            [helper.make_node(op, ["X", "W", "R", "B"], outs, hidden_size=hidden)],
            op.lower(),
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [steps, batch, width])],
            [
                helper.make_tensor_value_info(o, TensorProto.FLOAT, [steps, 1, batch, hidden] if o == "Y" else [1, batch, hidden])
                for o in outs
            ],
            [w, r, b],
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])

    # Scan: state s (initialised from a constant 10) += each step of X; outputs
    # the final state and every partial sum.
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["y_t"])],
        "body",
        [
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [batch, width]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [batch, width]),
        ],
        [
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [batch, width]),
            helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [batch, width]),
        ],
    )
    init = numpy_helper.from_array(np.full((batch, width), 10.0, np.float32), "init")
    scan = helper.make_graph(
        [helper.make_node("Scan", ["init", "X"], ["S", "Y"], body=body, num_scan_inputs=1)],
        "scan",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [steps, batch, width])],
        [
            helper.make_tensor_value_info("S", TensorProto.FLOAT, [batch, width]),
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, [steps, batch, width]),
        ],
        [init],
    )
    models = {
        "gru.onnx": rec("GRU", 3),
        "lstm.onnx": rec("LSTM", 4),
        "scan.onnx": helper.make_model(scan, opset_imports=[helper.make_opsetid("", 14)]),
    }
    for name, model in models.items():
        onnx.checker.check_model(model)
        onnx.save(model, OUT / name)
        sess = ort.InferenceSession(str(OUT / name), providers=["CPUExecutionProvider"])
        outs = sess.run(None, {"X": x})
        expected["models"][name] = {
            o.name: {"shape": list(v.shape), "data": v.flatten().tolist()} for o, v in zip(sess.get_outputs(), outs)
        }
    expected["input"] = {"name": "X", "shape": list(x.shape), "data": x.flatten().tolist()}
    (OUT / "recurrent.expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {', '.join(models)} and recurrent.expected.json")


def staged_models() -> None:
    """Versions of one "scorer" (x f32[N, 4] -> scores f32[N, 3] = x @ W)
    for the staged-update tests; each passes the registry's load and its
    own golden vectors unless said otherwise.

    scorer-a.onnx: W picks x[:, 0..3]; the class is the largest of those.
    scorer-a2.onnx: 2 W: other scores, the same class (agrees in shadow).
    scorer-b.onnx: W reversed: another class (disagrees in shadow).
    scorer-noisy.onnx: adds RandomUniform noise (no seed): its answers
      change every run, so it fails the agent's self-test.
    scorer-fragile.onnx: also gathers table[int(x[0, 3])] (a table of 2):
      golden inputs lie in [0, 1) and pass; a live x[0, 3] of 5 fails
      inside the runtime (errors on probation).
    scorer-slow.onnx: also sums a 2048 x 2048 expansion of x: tens of
      milliseconds a run (p99 on probation).
    """
    from onnx import TensorProto, helper, numpy_helper

    def save(name, nodes, inits):
        g = helper.make_graph(
            nodes,
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
            inits,
        )
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / f"{name}.onnx")

    w = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], np.float32)
    mm = lambda out: helper.make_node("MatMul", ["x", "w"], [out])  # noqa: E731
    save("scorer-a", [mm("scores")], [numpy_helper.from_array(w, "w")])
    save("scorer-a2", [mm("scores")], [numpy_helper.from_array(2 * w, "w")])
    save("scorer-b", [mm("scores")], [numpy_helper.from_array(w[:, ::-1].copy(), "w")])
    save(
        "scorer-noisy",
        [
            mm("s"),
            helper.make_node("RandomUniform", [], ["noise"], shape=[1, 3]),
            helper.make_node("Add", ["s", "noise"], ["scores"]),
        ],
        [numpy_helper.from_array(w, "w")],
    )
    consts = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array([0.0, 0.0], np.float32), "table"),
        numpy_helper.from_array(np.array([0, 3], np.int64), "at"),
        numpy_helper.from_array(np.array([2048, 2048], np.int64), "big"),
    ]
    save(
        "scorer-fragile",
        [
            mm("s"),
            helper.make_node("GatherND", ["x", "at2"], ["x03"]),
            helper.make_node("Cast", ["x03"], ["i"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "i"], ["zero"], axis=0),
            helper.make_node("Add", ["s", "zero"], ["scores"]),
        ],
        consts[:2] + [numpy_helper.from_array(np.array([[0, 3]], np.int64), "at2")],
    )
    save(
        "scorer-slow",
        [
            mm("s"),
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1),
            helper.make_node("Expand", ["total", "big"], ["wide"]),
            helper.make_node("ReduceSum", ["wide"], ["sum"], keepdims=0),
            helper.make_node("Mul", ["sum", "zero"], ["nothing"]),
            helper.make_node("Add", ["s", "nothing"], ["scores"]),
        ],
        # Times 1e-30: far below a float's resolution at these scores, so
        # the answers are scorer-a's, but not a zero tract could fold away.
        [consts[0], consts[3], numpy_helper.from_array(np.array(1e-30, np.float32), "zero")],
    )
    for name in ["scorer-a", "scorer-a2", "scorer-b", "scorer-fragile", "scorer-slow"]:
        sess = ort.InferenceSession(str(OUT / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": np.array([[0.1, 0.7, 0.2, 0.5]], np.float32)})[0]
        print(f"{name}: {out.tolist()}")


def oversized_model() -> None:
    """scorer-oversized.onnx: scorer-a's answers, but each run also sums a
    12000 x 12000 expansion of x (576 MB of f32): a device without that
    much memory dies inside the runtime (an allocation failure aborts the
    process whatever the panic strategy), a machine with it runs it."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], np.float32)
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["s"]),
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1),
            helper.make_node("Expand", ["total", "big"], ["wide"]),
            helper.make_node("ReduceSum", ["wide"], ["sum"], keepdims=0),
            helper.make_node("Mul", ["sum", "zero"], ["nothing"]),
            helper.make_node("Add", ["s", "nothing"], ["scores"]),
        ],
        "scorer-oversized",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([12000, 12000], np.int64), "big"),
            numpy_helper.from_array(np.array(1e-30, np.float32), "zero"),
        ],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "scorer-oversized.onnx")


def compile_models() -> None:
    """mode-if.onnx: x f32[N, 4], mode bool[] -> If(mode) -> y. The then
    branch gives x * 2 (f32[N, 4]), the else branch the row sums
    (f32[N, 1]): the branches' shapes differ, so only a model whose `mode`
    is known (compiled with it constant) has one output type; the batch
    axis N is left open, as exporters write it.
    """
    from onnx import TensorProto, helper, numpy_helper

    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"])],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])], [two],
    )
    else_g = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["e"], keepdims=1)],
        "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 1])], [axes],
    )
    g = helper.make_graph(
        [helper.make_node("If", ["mode"], ["y"], then_branch=then_g, else_branch=else_g)],
        "mode_if",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("mode", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "mode-if.onnx")
    # scale-by.onnx: x f32[N, 4] times gain f32[1] -> y: a gain fixed in
    # use (a calibration), which compiling with it constant folds away.
    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "gain"], ["y"])],
        "scale_by",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "scale-by.onnx")
    # rate-if.onnx: mode-if's branches on Equal(sr, Constant 16000), as
    # silero-vad branches on its sample rate: sr i64[] constant in use.
    g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["sixteen_k"], value=numpy_helper.from_array(np.array(16000, np.int64))),
            helper.make_node("Equal", ["sr", "sixteen_k"], ["is_16k"]),
            helper.make_node("If", ["is_16k"], ["y"], then_branch=then_g, else_branch=else_g),
        ],
        "rate_if",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "rate-if.onnx")
    # shape-if.onnx: x f32[N, 4] -> If(Shape(x)[0] == 1): then Squeeze
    # axis 0 (f32[4]), else x itself (f32[N, 4]), as PyTorch's exports
    # squeeze only an axis that is 1 (silero-vad has such `If`s nested in
    # its sample-rate one). Only the pinned shape decides the branch.
    squeeze_g = helper.make_graph(
        [helper.make_node("Squeeze", ["x", "axis0"], ["s"])],
        "squeeze", [], [helper.make_tensor_value_info("s", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array([0], np.int64), "axis0")],
    )
    keep_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["k"])],
        "keep", [], [helper.make_tensor_value_info("k", TensorProto.FLOAT, ["N", 4])],
    )
    g = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
            helper.make_node("Gather", ["shape", "zero"], ["rows"], axis=0),
            helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.int64))),
            helper.make_node("Equal", ["rows", "one"], ["single"]),
            helper.make_node("If", ["single"], ["y"], then_branch=squeeze_g, else_branch=keep_g),
        ],
        "shape_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "shape-if.onnx")
    # log-relu.onnx: y = Log(Relu(x - 0.5)), -inf wherever x <= 0.5 (about
    # half of the seeded inputs, which are in [0, 1)), in the source and in
    # any faithful artifact: the same infinity on both sides agrees.
    g = helper.make_graph(
        [
            helper.make_node("Sub", ["x", "mid"], ["c"]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Log", ["r"], ["y"]),
        ],
        "log_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "mid")],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "log-relu.onnx")
    # dropout-train.onnx: Dropout with training_mode a constant true and
    # ratio 0.5: it loads, and every run fails (tract runs Dropout only
    # for inference), so registration must refuse it.
    g = helper.make_graph(
        [helper.make_node("Dropout", ["x", "ratio", "training"], ["y"])],
        "dropout_train",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [
            numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
            numpy_helper.from_array(np.array(True), "training"),
        ],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "dropout-train.onnx")
    # attention.onnx: one opset-23 Attention over (batch 1, 4 heads, 64
    # positions, 16 per head); tract-onnx's `transformers` operators load it.
    qkv = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 64, 16]) for n in "qkv"]
    g = helper.make_graph(
        [helper.make_node("Attention", ["q", "k", "v"], ["y"])],
        "attention",
        qkv,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 64, 16])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]), OUT / "attention.onnx")


def half_model() -> None:
    """half.onnx: f16 in, y = 2x + 0.5 in f16 and the same cast to f32 out; bf16.onnx."""
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["x2"]),
            helper.make_node("Add", ["x2", "half"], ["y"]),
            helper.make_node("Cast", ["y"], ["y32"], to=TensorProto.FLOAT),
        ],
        "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None, 4]),
            helper.make_tensor_value_info("y32", TensorProto.FLOAT, [None, 4]),
        ],
        [
            numpy_helper.from_array(np.array(2.0, np.float16), "two"),
            numpy_helper.from_array(np.array(0.5, np.float16), "half"),
        ],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "half.onnx")
    # bf16.onnx: bf16 in and out, y = x + 0.5 computed in f32 (onnxruntime's
    # CPU kernels have no bf16 Add; tract has no bf16 at all).
    g = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x32", "half"], ["y32"]),
            helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.BFLOAT16),
        ],
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [None, 4])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "half")],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), OUT / "bf16.onnx")


def zipmap_model() -> None:
    """iris-zipmap.onnx: fixtures/iris.onnx with the output skl2onnx writes
    by default (`zipmap` on): its `probabilities` f32[N, 3] through an
    ONNX-ML ZipMap (classes 0, 1, 2) into `output_probability`, a sequence
    of one map from class to probability per row, which tract does not
    run. Built from the committed iris.onnx, so its bytes do not depend on
    the scikit-learn version.
    """
    from onnx import helper

    m = onnx.load(OUT / "iris.onnx")
    g = m.graph
    g.node.append(
        helper.make_node("ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])
    )
    seq = helper.make_sequence_type_proto(helper.make_map_type_proto(onnx.TensorProto.INT64, helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None)))
    out = [o for o in g.output if o.name != "probabilities"]
    del g.output[:]
    g.output.extend(out + [helper.make_value_info("output_probability", seq)])
    onnx.checker.check_model(m)
    onnx.save(m, OUT / "iris-zipmap.onnx")
    # iris-metadata.onnx: iris.onnx with a metadata property holding a
    # quote and line breaks, as PP-OCRv4's recognizer keeps its character
    # list, which tract's NNEF writer does not escape.
    m = onnx.load(OUT / "iris.onnx")
    onnx.helper.set_model_props(m, {"character": "'\n\"\na\nb"})
    onnx.save(m, OUT / "iris-metadata.onnx")


def drift_reference() -> None:
    """drift.expected.json: two samples and the distances an independent
    implementation gives for them, for shared/drift's tests: the KS
    statistic from scipy's `ks_2samp`, PSI and the bins it is taken on by
    the documented formula (docs/drift.md) with numpy, Jensen-Shannon from
    scipy, Model Monitor's categorical L-infinity as Deequ's
    `Distance.categoricalDistance` computes it. Seeded: the same every time.
    """
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(17)
    # Rounded so that both samples have ties within and between them.
    a = np.round(rng.normal(0.0, 1.0, 1500), 2)
    b = np.round(rng.normal(0.3, 1.2, 1100), 2)
    bins = 10
    s = np.sort(a)
    n = len(s)
    interior = [s[-(-j * n // bins) - 1] for j in range(1, bins)]
    cuts = sorted(set([np.nextafter(s[0], -np.inf)] + interior + [s[-1]]))
    # Bin i holds values in (cuts[i-1], cuts[i]].
    count = lambda x: np.bincount(np.searchsorted(cuts, x, side="left"), minlength=len(cuts) + 1)
    ca, cb = count(a), count(b)
    pa = np.maximum(ca / ca.sum(), 1e-4)
    pb = np.maximum(cb / cb.sum(), 1e-4)
    psi = float(np.sum((pb - pa) * np.log(pb / pa)))
    js = float(jensenshannon(ca / ca.sum(), cb / cb.sum(), base=2) ** 2)
    cat_a = rng.choice([0.0, 1.0, 2.0, 3.0], 800, p=[0.4, 0.3, 0.2, 0.1])
    cat_b = rng.choice([0.0, 1.0, 2.0, 3.0, 7.0], 600, p=[0.25, 0.3, 0.2, 0.15, 0.1])
    # Deequ: the union of categories, each side's share (0 where absent).
    union = sorted(set(cat_a) | set(cat_b))
    linf = max(abs(np.mean(cat_a == c) - np.mean(cat_b == c)) for c in union)
    expected = {
        "a": a.tolist(),
        "b": b.tolist(),
        "bins": bins,
        "cuts": [float(c) for c in cuts],
        "counts_a": ca.tolist(),
        "counts_b": cb.tolist(),
        "ks": float(ks_2samp(a, b).statistic),
        "psi": psi,
        "js": js,
        "mean_shift": float(abs(b.mean() - a.mean()) / a.std()),
        "categorical_a": cat_a.tolist(),
        "categorical_b": cat_b.tolist(),
        "categorical_linf": float(linf),
    }
    (OUT / "drift.expected.json").write_text(json.dumps(expected) + "\n")
    print("wrote drift.expected.json")


def breast_cancer() -> None:
    """breast-cancer.onnx: scikit-learn's breast-cancer data (30 numeric
    features) on the split `tests/drift.rs` makes again (test_size 0.3,
    random_state 0, stratified): a small MLP fit on standardized features,
    exported with skl2onnx (label int64[N], probabilities float[N, 2], no
    ZipMap) with the standardization put in front as Sub and Div (tract has
    no ONNX-ML `Scaler`)."""
    from onnx import helper, numpy_helper
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data.astype(np.float32), data.target, test_size=0.3, random_state=0, stratify=data.target
    )
    scaler = StandardScaler().fit(x_train)
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=2000, random_state=3).fit(scaler.transform(x_train), y_train)
    onx = to_onnx(clf, x_train[:1], options={"zipmap": False}, target_opset={"": 17, "ai.onnx.ml": 3})
    g = onx.graph
    inner = g.input[0].name
    raw = "features"
    for n in g.node:
        n.input[:] = ["scaled" if i == inner else i for i in n.input]
    g.initializer.extend([
        numpy_helper.from_array(scaler.mean_.astype(np.float32), "mean"),
        numpy_helper.from_array(scaler.scale_.astype(np.float32), "scale"),
    ])
    g.node.insert(0, helper.make_node("Div", ["centered", "scale"], ["scaled"]))
    g.node.insert(0, helper.make_node("Sub", [raw, "mean"], ["centered"]))
    g.input[0].name = raw
    onnx.checker.check_model(onx)
    (OUT / "breast-cancer.onnx").write_bytes(onx.SerializeToString())
    sess = ort.InferenceSession(str(OUT / "breast-cancer.onnx"), providers=["CPUExecutionProvider"])
    label = sess.run(None, {raw: x_test})[0]
    print(f"wrote breast-cancer.onnx, held-out accuracy {np.mean(label == y_test):.3f}")


def tiny_image() -> None:
    """tiny-image.onnx: an NCHW image classifier small enough to write by
    hand: image f32[N, 3, 4, 4] → the mean of each channel → softmax →
    probs f32[N, 3] (for `--baseline images.npy` in tests/drift.rs)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Softmax", ["flat"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-image",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, OUT / "tiny-image.onnx")
    print("wrote tiny-image.onnx")


def main() -> None:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    recurrent_models()
    wide_model()
    small_models()
    staged_models()
    oversized_model()
    compile_models()
    half_model()
    OUT.mkdir(exist_ok=True)
    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    # No StandardScaler in front: tract has no ONNX-ML `Scaler` op. The
    # pipeline with one is kept as a real model that tract refuses.
    model = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3000, random_state=7)
    model.fit(x, y)
    scaled = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(4,), max_iter=500, random_state=7))
    scaled.fit(x, y)
    unsupported = to_onnx(scaled, x[:1], options={"zipmap": False}, target_opset={"": 17, "ai.onnx.ml": 3})
    onnx.save(unsupported, OUT / "unsupported-scaler.onnx")
    onx = to_onnx(
        model,
        x[:1],
        options={"zipmap": False},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.doc_string = "Iris MLP classifier (scikit-learn, exported with skl2onnx); inputs: sepal/petal length/width in cm"
    path = OUT / "iris.onnx"
    onnx.save(onx, path)

    # A few rows from each class, plus two made-up flowers.
    rows = np.concatenate([x[[0, 1, 50, 51, 100, 101]], np.array([[5.0, 3.0, 1.5, 0.2], [6.9, 3.1, 5.4, 2.1]], np.float32)])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(None, {sess.get_inputs()[0].name: rows})
    expected = {
        "model": "iris.onnx",
        "producer": f"onnxruntime {ort.__version__}",
        "input": {"name": sess.get_inputs()[0].name, "shape": list(rows.shape), "data": rows.flatten().tolist()},
        "outputs": {
            n: {"shape": list(o.shape), "data": o.flatten().tolist(), "dtype": str(o.dtype)}
            for n, o in zip(names, outs)
        },
    }
    (OUT / "iris.expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes), outputs {names}, accuracy {model.score(x, y):.3f}")
    builtin_models(model, x, rows)
    zipmap_model()


def weights_json(family: dict, model) -> dict:
    """A built-in model's weights as `tern model pack` reads them: per layer
    `weight` [in][out] (scikit-learn's `coefs_` layout) and `bias` [out]."""
    return {
        "family": family,
        "layers": [{"weight": w.tolist(), "bias": b.tolist()} for w, b in zip(model.coefs_, model.intercepts_)],
    }


def builtin_models(classifier, x, rows) -> None:
    """The same networks as Tern built-in families (tern-models): the Iris
    classifier above as an `Mlp` with a softmax head, and an autoencoder
    trained to reconstruct Iris rows. Expected outputs come from onnxruntime
    running skl2onnx exports of the very same scikit-learn models."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPRegressor

    mlp = {"Mlp": {"inputs": 4, "hidden": list(classifier.hidden_layer_sizes), "outputs": 3, "head": "Softmax"}}
    (OUT / "iris-mlp.weights.json").write_text(json.dumps(weights_json(mlp, classifier)) + "\n")
    sess = ort.InferenceSession(str(OUT / "iris.onnx"), providers=["CPUExecutionProvider"])
    probabilities = sess.run(["probabilities"], {sess.get_inputs()[0].name: rows})[0]

    ae = MLPRegressor(hidden_layer_sizes=(8, 3, 8), max_iter=4000, random_state=7)
    ae.fit(x, x)
    family = {"Autoencoder": {"inputs": 4, "encoder": [8, 3]}}
    (OUT / "iris-autoencoder.weights.json").write_text(json.dumps(weights_json(family, ae)) + "\n")
    onx = to_onnx(ae, x[:1], target_opset={"": 17})
    sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    recon = sess.run(None, {sess.get_inputs()[0].name: rows})[0].reshape(rows.shape)
    score = ((recon - rows) ** 2).mean(axis=1)
    expected = {
        "producer": f"onnxruntime {ort.__version__} (skl2onnx exports of the same scikit-learn models)",
        "input": {"shape": list(rows.shape), "data": rows.flatten().tolist()},
        "mlp": {"probabilities": probabilities.flatten().tolist()},
        "autoencoder": {"reconstruction": recon.flatten().tolist(), "score": score.tolist()},
    }
    (OUT / "builtin.expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print("wrote built-in model weights and expected outputs")


if __name__ == "__main__":
    import sys

    {"recurrent": recurrent_models, "wide": wide_model, "staged": staged_models, "oversized": oversized_model, "compile": compile_models, "half": half_model, "zipmap": zipmap_model, "drift": drift_reference, "breast-cancer": breast_cancer, "tiny-image": tiny_image}.get(" ".join(sys.argv[1:]), main)()
