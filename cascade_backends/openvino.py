"""OpenVINO: device discovery and compiling torch modules for an OpenVINO device.

`openvino` is optional and imported lazily (only when asked for).  The torch side stays on CPU tensors; OpenVINO
owns the device (CPU; GPU = GPU.0; GPU.1 when an iGPU sits next to an Arc card; NPU).

Two ways to compile, both through `compile_module`:

* method="convert" (default): `ov.convert_model` on the first call for each input signature, IR saved under
  `cache_dir/ir/<key>.xml` and compiled blobs under `cache_dir/blob` (OpenVINO CACHE_DIR).  A later process with
  the same weights and shapes reads the IR and imports the blob: no tracing, no conversion.  An op OpenVINO cannot
  convert raises (nothing silently runs in torch).
* method="torch.compile": `torch.compile(backend="openvino")` with aot_autograd (weights frozen as constants;
  without it torch 2.13 Dynamo fails building guards).  Unsupported ops run in torch by design.  OpenVINO's own
  `model_caching` option is NOT used: in openvino 2026.4.1 the cached-IR path raises inside the backend
  (UnboundLocalError on `decoder`) and the backend then silently runs eager torch; only the compiled-blob
  CACHE_DIR is used.  The backend also swallows conversion errors (falls back to Inductor / eager torch): those
  events are captured from its logger and re-emitted as warnings (see `fallback_events`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .types import BackendUnavailable

INSTALL_HINT = "pip install openvino (the CPU torch wheel is enough; OpenVINO brings its own device plugins)"
log = logging.getLogger(__name__)
METHODS = ("convert", "torch.compile")


def is_available() -> bool:
    """True when the openvino package is importable (does not import it)."""
    return importlib.util.find_spec("openvino") is not None


@lru_cache(maxsize=1)
def _core() -> Any:
    import openvino as ov

    return ov.Core()


def core() -> Any:
    """The process-wide openvino.Core; raises BackendUnavailable when the package is missing."""
    if not is_available():
        raise BackendUnavailable(f"OpenVINO requested but the openvino package is not installed: {INSTALL_HINT}")
    return _core()


def version() -> str | None:
    if not is_available():
        return None
    import openvino as ov

    return str(ov.__version__)


def devices(core_obj: Any | None = None) -> list[str]:
    """OpenVINO device names, e.g. ['CPU', 'GPU.0', 'GPU.1']."""
    c = core_obj if core_obj is not None else core()
    return [str(d) for d in c.available_devices]


def device_type(core_obj: Any, ov_device: str) -> str:
    """'discrete', 'integrated' or 'other' (CPU/NPU/unknown)."""
    try:
        t = str(core_obj.get_property(ov_device, "DEVICE_TYPE")).upper()
    except Exception:  # noqa: BLE001 - CPU has no DEVICE_TYPE on some versions
        return "other"
    if "DISCRETE" in t:
        return "discrete"
    if "INTEGRATED" in t:
        return "integrated"
    return "other"


def resolve_device(core_obj: Any, requested: str | None) -> str:
    """Map 'GPU' / 'GPU.1' / None to an available device.  Default: a discrete GPU if present, else CPU
    (an iGPU is used only when named: it shares system RAM and is often no faster than the CPU)."""
    avail = devices(core_obj)
    if requested:
        req = requested.upper()
        if req in avail:
            return req
        if req == "GPU" and "GPU.0" in avail:  # "GPU" is GPU.0 when several GPUs exist
            return "GPU.0"
        raise BackendUnavailable(
            f"OpenVINO device {requested!r} not found; available: {', '.join(avail) or 'none'}. "
            "GPU needs the Intel GPU driver with OpenCL (intel-opencl-icd on Linux)")
    for dev in avail:
        if dev.startswith("GPU") and device_type(core_obj, dev) == "discrete":
            return dev
    return "CPU"


def _ov_config(device: str, cache_dir: Path | None, precision: str | None,
               config: dict[str, Any] | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    cfg.update(config or {})
    if precision is not None:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    if cache_dir is not None:
        blob = Path(cache_dir) / "blob"
        blob.mkdir(parents=True, exist_ok=True)
        cfg.setdefault("CACHE_DIR", str(blob))
    return cfg


# --- fallback capture for the torch.compile backend ---------------------------------------------------------
_FALLBACK_MARKERS = ("Failed in OpenVINO execution", "Falling back to native PyTorch")
fallback_events: list[str] = []


class _FallbackCapture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if any(m in msg for m in _FALLBACK_MARKERS):
            first = msg not in fallback_events
            fallback_events.append(msg)
            if first:
                log.warning("OpenVINO torch.compile backend fell back to torch: %s", msg)


@lru_cache(maxsize=1)
def _install_fallback_capture() -> None:
    handler = _FallbackCapture(level=logging.DEBUG)
    for name in ("openvino.frontend.pytorch.torchdynamo.backend", "openvino.frontend.pytorch.torchdynamo.execute"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.DEBUG)  # the backend logs its fallbacks at DEBUG only
        lg.addHandler(handler)
        lg.propagate = False  # keep its DEBUG chatter out of the host's logs; fallbacks are re-emitted above


def torch_compile_options(device: str = "CPU", cache_dir: Path | None = None, precision: str | None = None,
                          config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Options for torch.compile(backend="openvino").  aot_autograd freezes parameters into constants (needed
    for speed: OpenVINO pre-packs constant weights, and for torch 2.13 whose guard builder fails otherwise)."""
    return {"device": device, "aot_autograd": True, "config": _ov_config(device, cache_dir, precision, config)}


# --- convert path ---------------------------------------------------------------------------------------------
def weights_fingerprint(module: torch.nn.Module, samples: int = 4096) -> str:
    """Cheap identity of the weights: names, shapes, dtypes and a strided sample of every tensor.  Pass an
    explicit cache_key (e.g. the checkpoint hash) when weights are patched in ways a sample could miss."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(module.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            if t.numel() and (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
                flat = t.detach().reshape(-1)
                step = max(1, flat.numel() // samples)
                h.update(flat[::step].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def _signature(args: tuple, kwargs: dict) -> str:
    def one(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"T{tuple(x.shape)}{x.dtype}"
        return repr(x)

    leaves, spec = pytree.tree_flatten((args, kwargs))
    return f"{spec}|" + ",".join(one(x) for x in leaves)


class _Bound(torch.nn.Module):
    """Re-creates a call from its tensor leaves (non-tensor leaves are frozen) and flattens the output, so the
    traced graph has only tensor inputs and a tuple of tensor outputs."""

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict, entry: str = "forward") -> None:
        super().__init__()
        self.module = module
        self.entry = entry
        leaves, self.in_spec = pytree.tree_flatten((args, kwargs))
        self.is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        self.static = [None if t else x for x, t in zip(leaves, self.is_tensor)]
        self._spec: list[Any] = []  # a list, not an attribute assignment: survives tracing by torch.export too
        self.errors: list[Exception] = []  # our own errors, re-raised unwrapped by OpenVINOModule._build

    @property
    def out_spec(self) -> Any:
        return self._spec[-1] if self._spec else None

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(tensors)
        leaves = [next(it) if t else s for t, s in zip(self.is_tensor, self.static)]
        args, kwargs = pytree.tree_unflatten(leaves, self.in_spec)
        out = self.module(*args, **kwargs) if self.entry == "forward" else getattr(self.module, self.entry)(
            *args, **kwargs)
        flat, spec = pytree.tree_flatten(out)
        bad = [type(x).__name__ for x in flat if not isinstance(x, torch.Tensor)]
        if bad:
            self.errors.append(TypeError(
                f"{self.entry}() returned non-tensor leaves ({', '.join(bad)}): return tensors, tuples, dicts or "
                "pytree-registered outputs (e.g. pass return_dict=False)"))
            raise self.errors[-1]
        self._spec.append(spec)
        return tuple(flat)


@dataclass
class _Compiled:
    request: Any
    n_outputs: int
    out_spec: Any
    is_tensor: list[bool]
    load: str  # "converted" or "cached"
    seconds: float


@dataclass
class CompileEvent:
    signature: str
    load: str  # "converted" (traced + converted + compiled) or "cached" (IR read + blob imported)
    seconds: float


class OpenVINOModule(torch.nn.Module):
    """Drop-in wrapper: the first call for each input signature converts (or loads from cache) and compiles;
    later calls run the OpenVINO infer request.  Attribute access falls through to the wrapped module (config,
    dtype, ...).  Inputs are CPU float32 tensors; outputs come back as torch tensors in the original structure."""

    def __init__(self, module: torch.nn.Module, *, device: str, cache_dir: Path | None, precision: str | None,
                 config: dict[str, Any] | None, cache_key: str | None, entry: str = "forward") -> None:
        super().__init__()
        self.original = module
        self.entry = entry
        if entry != "forward":  # module.decode(...) on the wrapper runs the compiled graph, not the original
            object.__setattr__(self, entry, self.forward)
        self.ov_device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.ov_config = _ov_config(device, self.cache_dir, precision, config)
        self._cache_key = cache_key
        self._compiled: dict[str, _Compiled] = {}
        self.events: list[CompileEvent] = []

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("original"), name)

    def _key(self, sig: str) -> str:
        import openvino as ov

        base = self._cache_key or weights_fingerprint(self.original)
        text = (f"{type(self.original).__qualname__}.{self.entry}|{base}|{sig}|ov{ov.__version__}|"
                f"torch{torch.__version__}")
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _build(self, sig: str, args: tuple, kwargs: dict) -> _Compiled:
        import openvino as ov

        t0 = time.perf_counter()
        bound = _Bound(self.original, args, kwargs, self.entry)
        tensors = tuple(x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor))
        for t in tensors:
            if t.dtype == torch.bfloat16:
                raise TypeError("OpenVINO inputs must not be bfloat16 (numpy has no bf16); run the module in float32 "
                                "and let OpenVINO pick the execution precision")
        xml = None
        if self.cache_dir is not None:
            key = self._key(sig)
            xml = self.cache_dir / "ir" / f"{key}.xml"
            spec_file = xml.with_suffix(".spec")
        c = core()
        if xml is not None and xml.exists() and spec_file.exists():
            model = c.read_model(str(xml))
            out_spec = pytree.treespec_loads(spec_file.read_text())
            load = "cached"
        else:
            self.original.eval()
            try:
                with torch.no_grad():
                    model = ov.convert_model(bound, example_input=tensors)
            except Exception as exc:
                if bound.errors:
                    raise bound.errors[-1] from None
                raise RuntimeError(f"OpenVINO could not convert {type(self.original).__name__}.{self.entry}: {exc}\n"
                                   "(method='torch.compile' runs unsupported parts in torch instead)") from exc
            out_spec = bound.out_spec
            if xml is not None:
                xml.parent.mkdir(parents=True, exist_ok=True)
                # compress_to_fp16=False: bf16-origin weights may exceed fp16 range.
                ov.save_model(model, str(xml), compress_to_fp16=False)
                spec_file.write_text(pytree.treespec_dumps(out_spec))
            load = "converted"
        compiled = c.compile_model(model, self.ov_device, self.ov_config)
        seconds = time.perf_counter() - t0
        self.events.append(CompileEvent(sig, load, seconds))
        return _Compiled(compiled.create_infer_request(), len(compiled.outputs), out_spec, bound.is_tensor, load,
                         seconds)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sig = _signature(args, kwargs)
        comp = self._compiled.get(sig)
        if comp is None:
            comp = self._compiled[sig] = self._build(sig, args, kwargs)
        inputs = [x.detach().cpu().contiguous().numpy() for x in pytree.tree_leaves((args, kwargs))
                  if isinstance(x, torch.Tensor)]
        res = comp.request.infer(inputs)
        outs = [torch.from_numpy(res[i]) for i in range(comp.n_outputs)]
        return pytree.tree_unflatten(outs, comp.out_spec)


def compile_module(module: torch.nn.Module, *, device: str = "CPU", cache_dir: Path | None = None,
                   precision: str | None = None, method: str = "convert", config: dict[str, Any] | None = None,
                   cache_key: str | None = None, entry: str = "forward") -> torch.nn.Module:
    """Compile `module` for an OpenVINO device; returns a module called like the original.

    device: "CPU", "GPU", "GPU.1", ... (validated now).  cache_dir: IR + compiled-blob cache (None = no cache).
    precision: INFERENCE_PRECISION_HINT ("f32", "f16", "bf16"); None = the device's default (f16 on the GPU
    plugin, f32 or bf16 on CPU by its instruction set): a model that overflows in f16 asks for "f32" itself.
    cache_key: identity of the weights for the IR cache (default: a sampled fingerprint of the state dict).
    entry: the method to compile ("decode" for a VQ model); the wrapper exposes it under the same name.  Only
    method="convert" supports entries other than forward.
    method: "convert" (default, cached IR, whole graph or error) or "torch.compile" (partitions, blob cache only).
    Compilation happens on the first call per input signature (new shapes compile again)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    device = resolve_device(core(), device)
    module.eval()
    if method == "convert":
        return OpenVINOModule(module, device=device, cache_dir=cache_dir, precision=precision, config=config,
                              cache_key=cache_key, entry=entry)
    if entry != "forward":
        raise ValueError("entry other than 'forward' needs method='convert'")
    import openvino.torch  # noqa: F401 - registers the "openvino" torch.compile backend

    _install_fallback_capture()
    return torch.compile(module, backend="openvino",
                         options=torch_compile_options(device, cache_dir, precision, config))


def timed_call(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(output, seconds) of one inference-mode call; used to report first-call compile time."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
