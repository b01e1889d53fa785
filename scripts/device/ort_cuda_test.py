"""ONNX Runtime's own CUDA kernels on this GPU, with no CPU fallback allowed.

A small graph (MatMul → Add → Relu → LayerNormalization → Softmax → Cast fp16) runs on the
CUDAExecutionProvider with session.disable_cpu_ep_fallback=1 and is checked against numpy. Every
op but MatMul runs one of ORT's own kernels from libonnxruntime_providers_cuda.so, so this also
proves that its sm_90 images are there and load (the carried copy keeps only the sm_90 images).
"""

import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

print("onnxruntime", ort.__version__, ort.__file__)
print("available providers:", ort.get_available_providers())
if hasattr(ort, "get_build_info"):
    print("build info:", ort.get_build_info())
if "CUDAExecutionProvider" not in ort.get_available_providers():
    print("FAIL: CUDAExecutionProvider is not available in this onnxruntime build")
    sys.exit(1)

rng = np.random.default_rng(0)
a = rng.standard_normal((64, 128), dtype=np.float32)
b = rng.standard_normal((128, 96), dtype=np.float32)
c = rng.standard_normal((96,), dtype=np.float32)
gamma = rng.standard_normal((96,), dtype=np.float32)
beta = rng.standard_normal((96,), dtype=np.float32)
nodes = [
    helper.make_node("MatMul", ["A", "B"], ["m"]),
    helper.make_node("Add", ["m", "C"], ["s"]),
    helper.make_node("Relu", ["s"], ["r"]),
    helper.make_node("LayerNormalization", ["r", "G", "Bt"], ["ln"], axis=-1, epsilon=1e-5),
    helper.make_node("Softmax", ["ln"], ["y"], axis=-1),
    helper.make_node("Cast", ["y"], ["Y"], to=TensorProto.FLOAT16),
]
graph = helper.make_graph(
    nodes, "t",
    [helper.make_tensor_value_info("A", TensorProto.FLOAT, [64, 128])],
    [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [64, 96])],
    initializer=[helper.make_tensor("B", TensorProto.FLOAT, b.shape, b.flatten()),
                 helper.make_tensor("C", TensorProto.FLOAT, c.shape, c),
                 helper.make_tensor("G", TensorProto.FLOAT, gamma.shape, gamma),
                 helper.make_tensor("Bt", TensorProto.FLOAT, beta.shape, beta)],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
so = ort.SessionOptions()
so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
try:
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
except Exception as exc:  # noqa: BLE001
    print(f"FAIL: CUDA session could not be created: {type(exc).__name__}: {exc}")
    if hasattr(ort, "preload_dlls"):  # diagnostic: would ORT's own loader of the nvidia-* pip libraries help?
        try:
            import glob
            import sysconfig

            hits = glob.glob(sysconfig.get_paths()["purelib"] + "/nvidia/**/libcublasLt.so.*", recursive=True)
            print("  preload_dlls from", hits[0].rsplit("/", 1)[0] if hits else "the default paths")
            ort.preload_dlls(directory=hits[0].rsplit("/", 1)[0] if hits else "")
            ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
            print("  ... but it works after onnxruntime.preload_dlls(): LD_LIBRARY_PATH misses a library the services need")
        except Exception as exc2:  # noqa: BLE001
            print(f"  ... and still after onnxruntime.preload_dlls(): {type(exc2).__name__}: {exc2}")
    sys.exit(1)
print("session providers:", sess.get_providers())
try:
    (y,) = sess.run(None, {"A": a})
except Exception as exc:  # noqa: BLE001
    print(f"FAIL: CUDA run failed: {type(exc).__name__}: {exc}")
    print("(a 'no kernel image is available' here would mean the sm_90 images are missing)")
    sys.exit(1)
r = np.maximum(a @ b + c, 0)
mu, var = r.mean(-1, keepdims=True), r.var(-1, keepdims=True)
ln = (r - mu) / np.sqrt(var + 1e-5) * gamma + beta
e = np.exp(ln - ln.max(-1, keepdims=True))
ref = e / e.sum(-1, keepdims=True)
err = float(np.abs(y.astype(np.float32) - ref).max())
ok = sess.get_providers()[0] == "CUDAExecutionProvider" and err < 2e-2
print(f"{'OK' if ok else 'FAIL'}: ORT CUDA kernels ran on the GPU, max abs error vs numpy {err:.2e}")
sys.exit(0 if ok else 1)
