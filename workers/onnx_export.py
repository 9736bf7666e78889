"""Export the `mtcnn` package's three networks, with the weights it ships, to ONNX.

    python -m workers.onnx_export OUTDIR [--prelu prelu|keep] [--opset N] [--compare]

writes OUTDIR/pnet.onnx, OUTDIR/rnet.onnx and OUTDIR/onet.onnx for `workers.onnx_engine`.

Build/install time only: it needs tensorflow, mtcnn, tf2onnx and onnx, and downloads nothing (the
weights come from the mtcnn wheel's own assets). The workers that run the models need only
onnxruntime and numpy.

Input shapes are left open where the package leaves them open: P-Net takes [N, H, W, 3] (any H, W
of at least 11), R-Net [N, 24, 24, 3], O-Net [N, 48, 48, 3]; all float32, pixels normalised as
(v - 127.5) / 128. Outputs, in the Keras models' order:
    pnet: bbox_reg [N, h, w, 4], bbox_class [N, h, w, 2]
    rnet: bbox_reg [N, 4], bbox_class [N, 2]
    onet: bbox_reg [N, 4], landmarks [N, 10], bbox_class [N, 2]

tf2onnx writes Keras 3's PReLU (relu(x) - alpha * relu(-x)) as five nodes (Relu, Neg, Relu, Mul,
Add); by default they are fused into one ONNX `PRelu` node (`--prelu keep` leaves them). The
outputs are bit-identical either way; with onnxruntime 1.32 on a 2-core machine the fused P-Net
measured 5-20% faster and whole detection passes 5-15% faster (a loaded machine: `--compare`
times P-Net both ways). onnxruntime's PRelu kernel itself is slow (P-Net's first PRelu costs more
than the convolution before it); exact rewrites as Max(x, s * x) were tried and measured no faster
end to end, because onnxruntime turns the per-channel Mul into a blocked-layout convolution.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NETWORKS = (
    # name, input shape, output names in the Keras model's order
    ("pnet", [None, None, None, 3], ("bbox_reg", "bbox_class")),
    ("rnet", [None, 24, 24, 3], ("bbox_reg", "bbox_class")),
    ("onet", [None, 48, 48, 3], ("bbox_reg", "landmarks", "bbox_class")),
)
DEFAULT_OPSET = 17


def _keras_models():
    """The package's three networks with its shipped weights loaded, by name."""
    from mtcnn.stages import StageONet, StagePNet, StageRNet

    return {"pnet": StagePNet().model, "rnet": StageRNet().model, "onet": StageONet().model}


def convert(model, shape, output_names, opset=DEFAULT_OPSET):
    """One Keras network as an ONNX ModelProto (input "input", outputs named `output_names`)."""
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec(shape, tf.float32, name="input")]
    function = tf.function(lambda x: model(x), input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)
    graph = proto.graph
    if len(graph.output) != len(output_names):
        raise RuntimeError(f"expected {len(output_names)} outputs, got {len(graph.output)}")
    # tf2onnx names the outputs Identity:0, Identity_1:0, ... in the function's return order.
    renames = {old.name: new for old, new in zip(graph.output, output_names, strict=True)}
    for node in graph.node:
        node.output[:] = [renames.get(name, name) for name in node.output]
        node.input[:] = [renames.get(name, name) for name in node.input]
    for output in graph.output:
        output.name = renames[output.name]
    return proto


PRELU_FORMS = ("prelu", "keep")


def rewrite_prelu(proto, form="prelu"):
    """Rewrite tf2onnx's PReLU, Relu(x) + Mul(Relu(Neg(x)), c), in place; return how many.

    Keras' PReLU is relu(x) - alpha * relu(-x); tf2onnx folds -alpha into the Mul's constant c,
    so the slope is s = -c. Forms (both give exactly the same values):
      "prelu"  one ONNX PRelu(x, s) node, s shaped to x's rank ((1, C, 1, 1) for convolutions);
      "keep"   leave tf2onnx's five nodes.
    Nodes whose outputs are used elsewhere are left alone.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    if form not in PRELU_FORMS:
        raise ValueError(f"form must be one of {PRELU_FORMS}")
    if form == "keep":
        return 0
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in graph.output}
    initializers = {init.name: init for init in graph.initializer}
    constants = {
        node.output[0]: node for node in graph.node if node.op_type == "Constant" and len(node.output) == 1
    }

    def constant_value(name):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        if name in constants:
            return numpy_helper.to_array(constants[name].attribute[0].t)
        return None

    def only_used_by(name, node):
        return name not in graph_outputs and [id(n) for n in consumers.get(name, [])] == [id(node)]

    def replacement(add, x, slope):
        prefix = add.name or add.output[0]
        slope_name = f"{prefix}_prelu_slope"
        if slope.ndim == 3:
            # (C, 1, 1) -> (1, C, 1, 1): the same broadcast, but of the input's rank, for which
            # onnxruntime's PRelu kernel is about 10% faster.
            slope = slope[None]
        graph.initializer.append(numpy_helper.from_array(slope.astype(np.float32), slope_name))
        return helper.make_node("PRelu", [x, slope_name], [add.output[0]], name=f"{prefix}_prelu")

    removed, replacements = set(), {}
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        first, second = (producers.get(name) for name in add.input)
        for relu_pos, mul in ((first, second), (second, first)):
            if relu_pos is None or mul is None or relu_pos.op_type != "Relu" or mul.op_type != "Mul":
                continue
            x = relu_pos.input[0]
            for branch, const_name in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
                relu_neg = producers.get(branch)
                value = constant_value(const_name)
                if relu_neg is None or relu_neg.op_type != "Relu" or value is None:
                    continue
                neg = producers.get(relu_neg.input[0])
                if neg is None or neg.op_type != "Neg" or neg.input[0] != x:
                    continue
                if not (
                    only_used_by(relu_pos.output[0], add)
                    and only_used_by(mul.output[0], add)
                    and only_used_by(relu_neg.output[0], mul)
                    and only_used_by(neg.output[0], relu_neg)
                ):
                    continue
                replacements[id(add)] = replacement(add, x, -value)
                removed.update({id(relu_pos), id(mul), id(relu_neg), id(neg)})
                break
            else:
                continue
            break

    nodes = [replacements.get(id(node), node) for node in graph.node if id(node) not in removed]
    del graph.node[:]
    graph.node.extend(nodes)
    # Drop constants nothing reads any more (the Mul constants).
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(replacements)


def export(outdir, prelu="prelu", opset=DEFAULT_OPSET, verify=True, log=print):
    """Write pnet.onnx, rnet.onnx and onet.onnx into `outdir`; return their paths by name."""
    import numpy as np
    import onnx

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    models = _keras_models()
    paths = {}
    for name, shape, output_names in NETWORKS:
        started = time.perf_counter()
        proto = convert(models[name], shape, output_names, opset=opset)
        rewritten = rewrite_prelu(proto, prelu)
        proto.doc_string = f"mtcnn {_mtcnn_version()} {name}, exported by workers.onnx_export"
        onnx.checker.check_model(proto, full_check=True)
        path = outdir / f"{name}.onnx"
        tmp = path.with_suffix(".onnx.tmp")
        onnx.save(proto, str(tmp))
        if verify:
            diff = _max_difference(models[name], tmp, shape, np)
            if diff > 1e-4:
                tmp.unlink()
                raise RuntimeError(f"{name}: ONNX and Keras outputs differ by {diff:g}")
        os.replace(tmp, path)  # atomic: a reader never sees half a model
        paths[name] = path
        log(
            f"{name}: {path} ({path.stat().st_size} bytes, {rewritten} PReLU as {prelu!r}, "
            f"{time.perf_counter() - started:.1f} s"
            + (f", max |onnx - keras| {diff:.2e})" if verify else ")")
        )
    return paths


def _max_difference(model, path, shape, np):
    """Largest absolute difference between the Keras model and the ONNX file on random input."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    size = [3] + [dim or 37 for dim in shape[1:]]
    x = rng.uniform(-1, 1, size).astype(np.float32)
    expected = [np.asarray(value) for value in model(x)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})
    return max(float(np.abs(a - b).max()) for a, b in zip(expected, got, strict=True))


def _mtcnn_version():
    from importlib.metadata import version

    return version("mtcnn")


def _compare(repeats=7):
    """Time P-Net over a 1024 x 683 pyramid in each PReLU form, interleaved (1 thread)."""
    import numpy as np
    import onnxruntime as ort

    models = _keras_models()
    shape, output_names = NETWORKS[0][1], NETWORKS[0][2]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {}
    for form in PRELU_FORMS:
        proto = convert(models["pnet"], shape, output_names)
        rewrite_prelu(proto, form)
        sessions[form] = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    levels = [
        rng.uniform(-1, 1, (1, int(683 * 0.709**k), int(1024 * 0.709**k), 3)).astype(np.float32) for k in range(11)
    ]
    reference = [sessions["keep"].run(None, {"input": x}) for x in levels]
    times = {form: [] for form in sessions}
    for _ in range(repeats):
        for form, session in sessions.items():
            started = time.perf_counter()
            outputs = [session.run(None, {"input": x}) for x in levels]
            times[form].append(time.perf_counter() - started)
            assert all(np.array_equal(a, b) for got, ref in zip(outputs, reference) for a, b in zip(got, ref))
    for form, values in times.items():
        median = 1000 * sorted(values)[len(values) // 2]
        print(
            f"pnet, PReLU as {form!r}: median {median:.1f} ms per 1024 x 683 pyramid "
            f"(1 thread, load average {os.getloadavg()[0]:.2f}); outputs identical to 'keep'"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--prelu", choices=PRELU_FORMS, default="prelu", help="PReLU as one node or tf2onnx's five")
    parser.add_argument("--compare", action="store_true", help="also time P-Net with each PReLU form")
    args = parser.parse_args(argv)
    export(args.outdir, prelu=args.prelu, opset=args.opset)
    if args.compare:
        _compare()
    return 0


if __name__ == "__main__":
    sys.exit(main())
