"""TensorRT engines from the exported ONNX files -- UNTESTED in this project.

TensorRT cannot be installed on the machines this project is developed and tested on (the
PyPI ``tensorrt`` libraries download from NVIDIA's own index at install time, and the lent
GPU machines have no TensorRT either). This module is written against the TensorRT 10/11
Python API and kept small and isolated; the test suite only checks the path without TensorRT:
``pfedsam export --format tensorrt`` still writes the ONNX files and prints the ``trtexec``
command lines that build the engines elsewhere.

With TensorRT importable:
- networks are created strongly typed (TensorRT 11 has nothing else; ``BuilderFlag.FP16`` is
  gone), so fp16 means converting the ONNX graph to fp16 first: ``onnxconverter_common``'s
  ``convert_float_to_float16`` with fp32 inputs/outputs kept; without that package the engines
  are built in fp32 and the manifest says so;
- all exported shapes are static (batch 1, one box), so no optimization profile is needed; if
  an ONNX input has a symbolic dimension, a profile min = 1, opt = 2, max = 16 is added for it
  (e.g. a point count) and the ``trtexec`` commands carry the matching ``--minShapes`` etc.;
- engines are run with ``execute_async_v3`` on CUDA memory owned by torch tensors.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ENGINE_SUFFIX = ".plan"
PROFILE_RANGE = (1, 2, 16)  # min, opt, max for a symbolic (dynamic) dimension


def tensorrt_status() -> tuple[bool, str]:
    """(importable, version or the reason it is not)."""
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as exc:  # ImportError, or OSError for a missing libnvonnxparser / libnvinfer
        return False, f"TensorRT is not installed here (import tensorrt failed: {exc})"
    return True, str(getattr(trt, "__version__", "unknown"))


def engine_name(onnx_file: str) -> str:
    return Path(onnx_file).name.removesuffix(".onnx").removesuffix(".fp16") + ENGINE_SUFFIX


def onnx_input_shapes(onnx_path: str | Path) -> dict[str, list[int | str]]:
    """Input name -> shape (ints; strings for symbolic dimensions)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        shapes[inp.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return shapes


def _profile_shapes(shapes: dict[str, list[int | str]]) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """min/opt/max shapes for inputs with symbolic dimensions (none for this project's exports)."""
    out = {}
    for name, shape in shapes.items():
        if all(isinstance(d, int) and d > 0 for d in shape):
            continue
        out[name] = tuple([d if isinstance(d, int) and d > 0 else r for d in shape] for r in PROFILE_RANGE)
    return out


def convert_fp16(src: str | Path, dst: str | Path) -> bool:
    """Write an fp16 copy of an ONNX graph (fp32 inputs/outputs kept); False when no converter is installed."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        return False
    import onnx

    model = onnx.load(str(src))
    onnx.save(float16.convert_float_to_float16(model, keep_io_types=True), str(dst))
    return True


def trtexec_commands(out_dir: str | Path, onnx_files: list[str]) -> list[str]:
    """The exact ``trtexec`` command lines that build an engine next to each ONNX file."""
    out = Path(out_dir)
    commands = []
    for name in onnx_files:
        onnx_path = out / name
        cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={out / engine_name(name)}"]
        profiles = _profile_shapes(onnx_input_shapes(onnx_path))
        for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            if profiles:
                cmd.append(flag + "=" + ",".join(f"{n}:{'x'.join(map(str, s[k]))}" for n, s in profiles.items()))
        commands.append(shlex.join(cmd))
    return commands


def build_engine(onnx_path: str | Path, engine_path: str | Path, workspace_gib: float = 4.0) -> Path:
    """Parse an ONNX file into a strongly typed network and serialize its engine to ``engine_path``."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profiles = _profile_shapes(onnx_input_shapes(onnx_path))
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    return engine_path


class TensorRTRunner:
    """Runs one serialized engine on the current CUDA device; inputs and outputs are numpy arrays.

    Arguments:
      engine_path: a ``.plan`` file written by ``build_engine`` or ``trtexec --saveEngine``.
    """

    def __init__(self, engine_path: str | Path) -> None:
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("TensorRT engines need a CUDA GPU; none is visible to torch")
        self._trt, self._torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: cannot be deserialized by TensorRT {trt.__version__} "
                               "(engines are specific to the TensorRT version and GPU that built them)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def _torch_dtype(self, name: str):
        np_dtype = np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))
        return self._torch.from_numpy(np.zeros(1, dtype=np_dtype)).dtype

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        keep = []
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", self._torch_dtype(name)).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {n: t.float().cpu().numpy() for n, t in outs.items()}


def build_engines(out_dir: str | Path, onnx_files: list[str], precision: str = "fp16") -> dict[str, Any]:
    """Build one engine per ONNX file (fp16 by converting the graph first when possible).

    Returns a manifest section: precision actually used, engine file per ONNX file, notes.
    """
    out = Path(out_dir)
    ok, version = tensorrt_status()
    if not ok:
        raise RuntimeError(version)
    section: dict[str, Any] = {"status": "built", "tensorrt": version, "precision": precision, "engines": {},
                               "notes": []}
    for name in onnx_files:
        source = out / name
        if precision == "fp16":
            fp16 = out / (Path(name).stem + ".fp16.onnx")
            if convert_fp16(source, fp16):
                source = fp16
            else:
                section["precision"] = "fp32"
                section["notes"].append("onnxconverter_common is not installed: built in fp32")
        engine = build_engine(source, out / engine_name(name))
        section["engines"][name] = engine.name
        log.info("built %s from %s", engine, source)
    return section
