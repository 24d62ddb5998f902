"""Device layer: CPU for real; CUDA / ROCm / XPU / MPS detection and policy at the boundary, with a stand-in for
the torch module passed as `torch_mod` (torch itself is never patched). The engine's per-stage precision rules
(cascade.precision) are checked on the same stand-in devices, and the layer's imports on their own."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cascade_backends
from cascade import precision
from cascade.names import COMPONENTS
from cascade.precision import dtype_for
from cascade_backends import GiB, Backend, BackendUnavailable, Capabilities, UnsupportedDtype
from cascade_backends import attention, capabilities, doctor, dtypes, env as env_mod, ipex, nan_guard

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


# --- stand-ins -----------------------------------------------------------------------------------------------
def _forbidden(what):
    def f(*a, **k):
        raise AssertionError(f"{what} must not be called")

    return f


class FakeAllocator(SimpleNamespace):
    """cuda/xpu-like module with allocator statistics."""

    def __init__(self, props, *, available=True, arch_list=(), mem_get_info=None, reserved=3 * GiB, **kw):
        super().__init__(**kw)
        self._props = props
        self.is_available = lambda: available
        self.device_count = lambda: len(props)
        self.get_device_properties = lambda i=0: props[i]
        self.get_arch_list = lambda: list(arch_list)
        self.mem_get_info = mem_get_info or (lambda i=0: (props[i].total_memory - reserved, props[i].total_memory))
        self.memory_allocated = lambda i=0: 2 * GiB
        self.memory_reserved = lambda i=0: reserved
        self.max_memory_allocated = lambda i=0: 5 * GiB
        self.calls: list[str] = []
        self.reset_peak_memory_stats = lambda i=0: self.calls.append("reset")
        self.synchronize = lambda i=0: self.calls.append("sync")
        self.empty_cache = lambda: self.calls.append("empty")
        self.is_bf16_supported = _forbidden("is_bf16_supported")  # emulation-inclusive: never trusted


def cuda_props(name="NVIDIA GeForce RTX 4090", cc=(8, 9), total=24 * GiB, arch=None):
    return SimpleNamespace(name=name, major=cc[0], minor=cc[1], total_memory=total, gcnArchName=arch)


def xpu_props(name="Intel(R) Arc(TM) A770 Graphics", device_id=0x56A0, *, dpas=True, fp64=False,
              total=int(15.11 * GiB)):
    return SimpleNamespace(name=name, device_id=device_id, has_fp16=True, has_fp64=fp64,
                           has_bfloat16_conversions=True, has_subgroup_matrix_multiply_accumulate=dpas,
                           total_memory=total, driver_version="1.6.32224")


def fake_torch(*, cuda=None, xpu=None, hip=None, cuda_version=None, mps=None, cpu_caps=None, hijacked=False):
    """A torch-like namespace.  Absent vendors report unavailable."""
    no_dev = FakeAllocator([], available=False)
    tm = SimpleNamespace(__version__="2.13.0+test")
    tm.version = SimpleNamespace(cuda=cuda_version, hip=hip, xpu=None)
    tm.cuda = cuda or no_dev
    if hijacked:
        tm.cuda.is_xpu_hijacked = True
    tm.xpu = xpu or FakeAllocator([], available=False)
    mps_ns = mps or {}
    tm.backends = SimpleNamespace(mps=SimpleNamespace(
        is_available=lambda: bool(mps_ns), is_built=lambda: bool(mps_ns),
        is_macos_or_newer=lambda major, minor=0: (mps_ns.get("macos", 0), 0) >= (major, minor),
        get_name=lambda: "Apple M2 Max"))
    tm.mps = SimpleNamespace(recommended_max_memory=lambda: 48 * GiB, driver_allocated_memory=lambda: 6 * GiB,
                             current_allocated_memory=lambda: 4 * GiB, synchronize=lambda: None,
                             empty_cache=lambda: None)
    tm.cpu = SimpleNamespace(get_capabilities=lambda: dict(cpu_caps or {"architecture": "x86_64", "avx2": True}))
    return tm


def nvidia(cc=(8, 9), name="NVIDIA GeForce RTX 4090", n=1):
    return fake_torch(cuda=FakeAllocator([cuda_props(name, cc) for _ in range(n)]), cuda_version="12.8")


def amd(arch="gfx1100", built=("gfx90a", "gfx942", "gfx1100", "gfx1101", "gfx1200", "gfx1201")):
    props = cuda_props("AMD Radeon RX 7900 XTX", (11, 0), arch=arch)
    return fake_torch(cuda=FakeAllocator([props], arch_list=built), hip="7.2.0", cuda_version=None)


def arc(*props, hijacked=False, reserved=3 * GiB):
    xpu = FakeAllocator(list(props) or [xpu_props()], mem_get_info=_forbidden("torch.xpu.mem_get_info"),
                        reserved=reserved)
    cuda = None
    if hijacked:  # SD.Next's ipex_init: torch.cuda *is* torch.xpu, torch.version.cuda = "12.1"
        cuda = FakeAllocator([cuda_props("Intel(R) Arc(TM) A770 Graphics", (12, 1))])
        cuda.get_device_properties = _forbidden("torch.cuda.get_device_properties (aliased to xpu)")
    return fake_torch(xpu=xpu, cuda=cuda, cuda_version="12.1" if hijacked else None, hijacked=hijacked)


class FakeOVCore:
    def __init__(self, devs=("CPU", "GPU.0", "GPU.1")):
        self.available_devices = list(devs)
        self.props = {
            "CPU": {"FULL_DEVICE_NAME": "Intel Core Ultra 7", "OPTIMIZATION_CAPABILITIES": ["FP32", "INT8"]},
            "GPU.0": {"FULL_DEVICE_NAME": "Intel Graphics (iGPU)", "DEVICE_TYPE": "Type.INTEGRATED",
                      "OPTIMIZATION_CAPABILITIES": ["FP32", "FP16", "BIN"], "GPU_DEVICE_TOTAL_MEM_SIZE": 8 * GiB},
            "GPU.1": {"FULL_DEVICE_NAME": "Intel Arc A770 (dGPU)", "DEVICE_TYPE": "Type.DISCRETE",
                      "OPTIMIZATION_CAPABILITIES": ["FP32", "FP16", "BIN"], "GPU_DEVICE_TOTAL_MEM_SIZE": 16 * GiB},
        }

    def get_property(self, dev, key):
        return self.props[dev][key]


NOENV: dict[str, str] = {}


# --- request parsing and selection ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (None, ("auto", None, None)), ("auto", ("auto", None, None)), ("cuda", ("cuda", None, None)),
    ("cuda:1", ("cuda", 1, None)), ("ipex", ("xpu", None, None)), ("zluda:0", ("cuda", 0, None)),
    ("openvino:gpu.1", ("openvino", None, "GPU.1")), ("openvino", ("openvino", None, None)), ("CPU", ("cpu", None, None)),
])
def test_parse_request(text, expected):
    assert cascade_backends.parse_request(text) == expected


@pytest.mark.parametrize("bad", ["cuda:x", "vulkan", "directml"])
def test_parse_request_rejects(bad):
    with pytest.raises(BackendUnavailable):
        cascade_backends.parse_request(bad)


def test_auto_prefers_xpu_over_aliased_cuda():
    tm = arc(hijacked=True)  # SD.Next: torch.cuda.is_available() is True on Arc and torch.version.cuda is set
    b = cascade_backends.select_backend(env=NOENV, torch_mod=tm)
    assert b.name == "xpu" and b.device == torch.device("xpu", 0)
    with pytest.raises(BackendUnavailable, match="alias of torch.xpu"):
        cascade_backends.select_backend("cuda", env=NOENV, torch_mod=tm)


def test_auto_order_and_env_override():
    tm = nvidia()
    assert cascade_backends.select_backend(env=NOENV, torch_mod=tm).name == "cuda"
    assert cascade_backends.select_backend(None, env={"CASCADE_DEVICE": "cpu"}, torch_mod=tm).name == "cpu"
    assert cascade_backends.select_backend("auto", env={"CASCADE_DEVICE": "cpu"}, torch_mod=tm).name == "cpu"
    b = cascade_backends.select_backend("cuda", env={"CASCADE_DEVICE": "cpu"}, torch_mod=tm)  # explicit request wins
    assert b.name == "cuda" and "--device" in b.reasons[0]
    assert cascade_backends.select_backend(env=NOENV, torch_mod=fake_torch(mps={"macos": 14})).name == "mps"
    assert cascade_backends.select_backend(env=NOENV, torch_mod=fake_torch()).name == "cpu"


def test_requested_unavailable_never_falls_back():
    tm = nvidia(n=2)
    assert cascade_backends.select_backend("cuda:1", env=NOENV, torch_mod=tm).device == torch.device("cuda", 1)
    with pytest.raises(BackendUnavailable, match="only 2"):
        cascade_backends.select_backend("cuda:2", env=NOENV, torch_mod=tm)
    with pytest.raises(BackendUnavailable, match="download.pytorch.org/whl/xpu"):
        cascade_backends.select_backend("xpu", env=NOENV, torch_mod=tm)
    with pytest.raises(BackendUnavailable, match="hip"):
        cascade_backends.select_backend("rocm", env=NOENV, torch_mod=tm)
    with pytest.raises(BackendUnavailable, match="CASCADE_DEVICE"):
        cascade_backends.select_backend(env={"CASCADE_DEVICE": "mps"}, torch_mod=tm)


def test_real_torch_cpu_here():
    b = cascade_backends.select_backend("cpu")
    assert b.name == "cpu" and b.device.type == "cpu"
    assert isinstance(b.capabilities, Capabilities) and b.capabilities.total_memory > 0
    if torch.version.cuda is None:  # this machine: the CPU wheel
        with pytest.raises(BackendUnavailable, match="download.pytorch.org"):
            cascade_backends.select_backend("cuda")
    assert any(x.name == "cpu" for x in cascade_backends.available_backends())


# --- CUDA ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cc, bf", [((6, 1), False), ((7, 0), False), ((7, 5), False), ((8, 0), True),
                                    ((8, 6), True), ((8, 9), True), ((9, 0), True), ((12, 0), True)])
def test_cuda_bf16_by_compute_capability(cc, bf):
    b = cascade_backends.select_backend("cuda", env=NOENV, torch_mod=nvidia(cc))
    assert b.capabilities.bf16 is bf and b.arch == f"sm_{cc[0]}{cc[1]}"
    assert dtype_for(b, "prior") == (bf16 if bf else fp32)  # never fp16 for Stage C
    assert dtype_for(b, "decoder") == (bf16 if bf else fp16)
    assert dtype_for(b, "vqgan") == fp32


def test_cuda_fp16_broken_cards_and_zluda():
    b = cascade_backends.select_backend("cuda", env=NOENV, torch_mod=nvidia((7, 5), "NVIDIA GeForce GTX 1660 SUPER"))
    assert not b.capabilities.fp16 and dtype_for(b, "decoder") == fp32
    z = cascade_backends.select_backend("cuda", env=NOENV, torch_mod=nvidia((8, 8), "AMD Radeon RX 6800 [ZLUDA]"))
    assert z.flavor == "zluda" and not z.capabilities.bf16 and dtype_for(z, "prior") == fp32


def test_cuda_memory_and_sync():
    tm = nvidia()
    b = cascade_backends.select_backend("cuda", env=NOENV, torch_mod=tm)
    m = b.memory()
    assert (m.total, m.free, m.reserved, m.peak) == (24 * GiB, 21 * GiB, 3 * GiB, 5 * GiB)
    b.reset_peak_memory(), b.synchronize(), b.empty_cache()
    assert tm.cuda.calls == ["reset", "sync", "empty"]
    assert b.generator(7).device.type == "cpu"


# --- ROCm ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, bf", [("gfx1100", True), ("gfx1101", True), ("gfx1151", True), ("gfx1201", True),
                                      ("gfx90a:sramecc+:xnack-", True), ("gfx942", True), ("gfx950", True),
                                      ("gfx908", True), ("gfx1030", False), ("gfx1010", False), ("gfx906", False)])
def test_rocm_bf16_by_gfx(arch, bf):
    b = cascade_backends.select_backend(env=NOENV, torch_mod=amd(arch))
    assert b.name == "rocm" and b.device == torch.device("cuda", 0)  # ROCm's torch device is still "cuda"
    assert b.capabilities.bf16 is bf and b.arch == arch.split(":")[0]
    assert dtype_for(b, "prior") == (bf16 if bf else fp32)


def test_rocm_cuda_request_means_rocm_and_gfx1102_no_fp16():
    assert cascade_backends.select_backend("cuda", env=NOENV, torch_mod=amd()).name == "rocm"
    b = cascade_backends.select_backend("rocm", env=NOENV, torch_mod=amd("gfx1102", built=("gfx1102",)))
    assert not b.capabilities.fp16 and dtype_for(b, "decoder") == bf16  # RDNA3: bf16 native


def test_rocm_missing_kernels_warns():
    b = cascade_backends.select_backend(env={"HSA_OVERRIDE_GFX_VERSION": "11.0.0"}, torch_mod=amd("gfx1103"))
    assert any("no kernels for gfx1103" in w for w in b.warnings)
    assert any("HSA_OVERRIDE_GFX_VERSION" in r for r in b.reasons)
    assert not cascade_backends.select_backend(env=NOENV, torch_mod=amd("gfx1100")).warnings
    assert capabilities.rocm_has_kernels(amd(built=()), "gfx1100") is None  # unknown build list: no claim


# --- XPU -----------------------------------------------------------------------------------------------------
def test_xpu_a770_capabilities_memory_generator():
    tm = arc()
    b = cascade_backends.select_backend("xpu", env=NOENV, torch_mod=tm)
    c = b.capabilities
    assert (c.bf16, c.fp16, c.fp64, c.max_alloc_bytes) == (True, True, False, 4 * GiB)
    m = b.memory()  # free = total - reserved; torch.xpu.mem_get_info is a forbidden call here
    assert m.total == int(15.11 * GiB) and m.free == m.total - 3 * GiB and m.peak == 5 * GiB
    assert b.generator(1).device.type == "cpu"
    assert b.max_attention_bytes == 1 * GiB and "chunked" in b.attention.kernel
    assert dtype_for(b, "prior") == bf16 and dtype_for(b, "decoder") == bf16


def test_xpu_relaxed_limits_and_battlemage():
    b = cascade_backends.select_backend("xpu", env={"UR_L0_ENABLE_RELAXED_ALLOCATION_LIMITS": "1"}, torch_mod=arc())
    assert b.capabilities.max_alloc_bytes is None and b.max_attention_bytes is None
    bmg = cascade_backends.select_backend("xpu", env=NOENV, torch_mod=arc(xpu_props("Intel(R) Arc(TM) B580 Graphics",
                                                                          0xE20B)))
    assert bmg.capabilities.max_alloc_bytes is None


def test_xpu_igpu_without_xmx_runs_prior_fp32():
    b = cascade_backends.select_backend("xpu", env=NOENV, torch_mod=arc(xpu_props("Intel(R) Graphics", 0x7D55, dpas=False)))
    assert not b.capabilities.bf16 and dtype_for(b, "prior") == fp32 and dtype_for(b, "decoder") == fp16


def test_backend_from_a_hosts_choice_does_not_probe_cuda():
    tm = arc(hijacked=True)  # torch.cuda.get_device_properties is forbidden in this stand-in
    b = cascade_backends.backend_from_torch_device("xpu:0", backend_name="xpu", env=NOENV, torch_mod=tm)
    assert b.name == "xpu" and "backend=xpu" in b.reasons[0]
    b2 = cascade_backends.backend_from_torch_device(torch.device("cuda", 0), env=NOENV, torch_mod=tm)
    assert b2.name == "xpu"  # a hijacked "cuda" device (SD.Next's ipex_init) is the XPU
    r = cascade_backends.backend_from_torch_device("cuda:0", backend_name="rocm", env=NOENV, torch_mod=amd())
    assert r.name == "rocm"
    with pytest.raises(BackendUnavailable, match="unknown backend 'ipex'"):  # host names are the host glue's job
        cascade_backends.backend_from_torch_device("xpu:0", backend_name="ipex", env=NOENV, torch_mod=tm)
    o = cascade_backends.backend_from_torch_device("cpu", backend_name="openvino", ov_device="GPU.1", env=NOENV,
                                                   torch_mod=tm, ov_core=FakeOVCore())
    assert o.name == "openvino" and o.device.type == "cpu" and o.ov_device == "GPU.1"


def test_sdnext_backend_names_map_in_the_extension():
    from extension.host import sdnext_backend

    tm = arc(hijacked=True)
    b = sdnext_backend(SimpleNamespace(device=torch.device("xpu", 0), backend="ipex"), env=NOENV, torch_mod=tm)
    assert b.name == "xpu" and "'ipex'" in b.reasons[1]
    z = sdnext_backend(SimpleNamespace(device=torch.device("cuda"), backend="zluda"), env=NOENV,
                       torch_mod=nvidia((8, 8), "AMD Radeon RX 6800 [ZLUDA]"))
    assert z.name == "cuda" and z.flavor == "zluda"
    with pytest.raises(BackendUnavailable, match="DirectML"):
        sdnext_backend(SimpleNamespace(device="privateuseone:0", backend="directml"), torch_mod=tm)
    with pytest.raises(BackendUnavailable, match="unknown SD.Next backend 'vulkan'"):
        sdnext_backend(SimpleNamespace(device="cpu", backend="vulkan"), torch_mod=tm)


# --- MPS / CPU / OpenVINO policy at the boundary --------------------------------------------------------------
@pytest.mark.parametrize("macos, bf", [(14, True), (13, False)])
def test_mps(macos, bf):
    b = cascade_backends.select_backend(env=NOENV, torch_mod=fake_torch(mps={"macos": macos}))
    assert b.name == "mps" and b.capabilities.bf16 is bf and not b.capabilities.fp64
    assert dtype_for(b, "prior") == (bf16 if bf else fp32)
    m = b.memory()
    assert m.total == 48 * GiB and m.free == 42 * GiB and m.peak is None
    if not bf:
        with pytest.raises(UnsupportedDtype):
            dtype_for(b, "prior", bf16)


@pytest.mark.parametrize("flags, bf", [({"avx2": True}, False), ({"avx512_bf16": True}, True),
                                       ({"amx_bf16": True, "amx_tile": True}, True)])
def test_cpu_bf16_only_with_native_instructions(flags, bf):
    b = cascade_backends.select_backend("cpu", env=NOENV, torch_mod=fake_torch(cpu_caps={"architecture": "x86_64", **flags}))
    assert b.capabilities.bf16 is bf
    assert dtype_for(b, "prior") == (bf16 if bf else fp32)
    assert dtype_for(b, "decoder") == (bf16 if bf else fp32)


def test_openvino_detection_with_fake_core():
    core = FakeOVCore()
    b = cascade_backends.select_backend("openvino", env=NOENV, torch_mod=fake_torch(), ov_core=core)
    assert b.ov_device == "GPU.1" and b.device == torch.device("cpu")  # default: the discrete GPU
    assert not b.capabilities.bf16 and b.capabilities.fp16 and b.capabilities.total_memory == 16 * GiB
    assert all(dtype_for(b, s) == fp32 for s in COMPONENTS)  # OpenVINO chooses execution precision
    with pytest.raises(UnsupportedDtype):
        dtype_for(b, "prior", bf16)
    assert cascade_backends.select_backend("openvino:GPU.0", env=NOENV, torch_mod=fake_torch(), ov_core=core).ov_device == "GPU.0"
    assert cascade_backends.select_backend("openvino", env=NOENV, torch_mod=fake_torch(),
                                   ov_core=FakeOVCore(("CPU", "GPU.0"))).ov_device == "CPU"
    with pytest.raises(BackendUnavailable, match="GPU.2"):
        cascade_backends.select_backend("openvino:GPU.2", env=NOENV, torch_mod=fake_torch(), ov_core=core)
    names = [(x.name, x.ov_device) for x in cascade_backends.available_backends(env=NOENV, torch_mod=fake_torch(),
                                                                          ov_core=core)]
    assert names == [("openvino", "CPU"), ("openvino", "GPU.0"), ("openvino", "GPU.1"), ("cpu", None)]


# --- dtypes: what a device runs (cascade_backends.dtypes), what each stage uses (cascade.precision) ------------
def _cpu_backend(bf=False, fp=False) -> Backend:
    return Backend("cpu", torch.device("cpu"), "test", Capabilities(bf16=bf, fp16=fp, fp64=True))


def test_device_dtypes_without_stages():
    assert [_cpu_backend(bf, fp).preferred_low_precision() for bf, fp in ((True, True), (False, True), (False, False))] \
        == [bf16, fp16, None]
    ov = Backend("openvino", torch.device("cpu"), "ov", Capabilities(bf16=False, fp16=True, fp64=False))
    assert ov.preferred_low_precision() is None  # torch modules stay fp32 on OpenVINO
    with pytest.raises(UnsupportedDtype, match="OpenVINO"):
        ov.check_dtype(bf16)
    with pytest.raises(UnsupportedDtype, match="not a compute dtype"):
        _cpu_backend().check_dtype(torch.int8)
    assert _cpu_backend().check_dtype(bf16) == bf16  # emulated: allowed (with a warning), not swapped
    b = _cpu_backend(bf=True, fp=True)
    assert [b.safer_dtype(d) for d in (fp16, bf16, fp32)] == [bf16, fp32, None]
    assert _cpu_backend(bf=False).safer_dtype(fp16) == fp32
    assert dtypes.is_low_precision(fp16) and not dtypes.is_low_precision(fp32)


def test_stage_dtype_requests():
    b = _cpu_backend(bf=True, fp=True)
    assert dtype_for(b, "prior", fp16) == fp16  # only when asked
    assert dtype_for(b, "text_encoder") == bf16 and dtype_for(b, "vqgan") == fp32
    assert dtype_for(_cpu_backend(bf=False, fp=True), "prior") == fp32  # fp16 native, yet never the prior's default
    with pytest.raises(ValueError):
        dtype_for(b, "unet")
    with pytest.raises(UnsupportedDtype):
        dtype_for(b, "prior", torch.int8)


def test_openvino_precision_hint_per_stage():
    core = FakeOVCore()
    gpu = cascade_backends.select_backend("openvino:GPU.1", env=NOENV, torch_mod=fake_torch(), ov_core=core)
    cpu = cascade_backends.select_backend("openvino:CPU", env=NOENV, torch_mod=fake_torch(), ov_core=core)
    # always explicit on OpenVINO: the plugins' own defaults (GPU f16, CPU bf16 on AVX512-BF16 hosts) would differ
    assert {c: precision.openvino_precision(gpu, c) for c in COMPONENTS} == dict.fromkeys(COMPONENTS, "f32")
    assert precision.openvino_precision(cpu, "decoder", torch.bfloat16) == "bf16"
    assert precision.openvino_precision(cpu, "decoder", torch.float16) == "f16"
    assert precision.openvino_precision(gpu, "prior", torch.float16) == "f32"  # Stage C overflows in f16
    assert precision.openvino_precision(cpu, "prior", torch.float16) == "f16"  # asked for, on a CPU: honoured
    assert precision.openvino_precision(_cpu_backend(), "prior") is None


# --- environment ---------------------------------------------------------------------------------------------
def test_apply_environment_only_where_unset():
    tm = arc()
    tm.xpu.is_initialized = lambda: False
    b = cascade_backends.select_backend("xpu", env=NOENV, torch_mod=tm)
    env = {"SYCL_CACHE_PERSISTENT": "0"}
    changes = {c.name: c for c in b.apply_environment(env)}
    assert env["SYCL_CACHE_PERSISTENT"] == "0" and not changes["SYCL_CACHE_PERSISTENT"].applied
    assert env["UR_L0_ENABLE_RELAXED_ALLOCATION_LIMITS"] == "1" and all(c.reason for c in changes.values())
    assert b.capabilities.max_alloc_bytes is None  # re-read after the relaxed-limit variable was set
    assert changes["UR_L0_ENABLE_RELAXED_ALLOCATION_LIMITS"].effective_now
    fallback = changes["PYTORCH_ENABLE_XPU_FALLBACK"]  # read at torch import: set, but reported as too late
    assert fallback.applied and fallback.when == "import" and not fallback.effective_now
    assert "too late" in b.reasons[-1]
    b2 = cascade_backends.select_backend("xpu", env=NOENV, torch_mod=arc())
    env2 = {"UR_L0_ENABLE_RELAXED_ALLOCATION_LIMITS": "0"}  # user opted out: limit stays, attention chunks
    b2.apply_environment(env2)
    assert env2["UR_L0_ENABLE_RELAXED_ALLOCATION_LIMITS"] == "0" and b2.capabilities.max_alloc_bytes == 4 * GiB
    late = cascade_backends.select_backend("xpu", env=NOENV, torch_mod=arc())  # runtime already started (or unknown)
    late.apply_environment({})
    assert late.capabilities.max_alloc_bytes == 4 * GiB and "apply_early" in late.reasons[-1]
    assert not {c.name: c for c in late.apply_environment({})}["SYCL_CACHE_PERSISTENT"].effective_now
    early: dict[str, str] = {}
    tm_xpu_build = arc()
    tm_xpu_build.version.xpu = "20250300"
    assert {c.name for c in env_mod.apply_early(early, tm_xpu_build)} >= {"SYCL_CACHE_PERSISTENT"}
    assert cascade_backends.select_backend("xpu", env=early, torch_mod=tm_xpu_build).capabilities.max_alloc_bytes is None
    assert env_mod.apply_early({}, nvidia()) == []
    rocm_env: dict[str, str] = {}
    cascade_backends.select_backend(env=NOENV, torch_mod=amd()).apply_environment(rocm_env)
    assert rocm_env["MIOPEN_FIND_MODE"] == "2"
    assert _cpu_backend().apply_environment({}) == []
    for name, table in env_mod.RECOMMENDED.items():
        assert all(len(rec.reason) > 20 and rec.when in ("import", "device-init", "first-use")
                   for rec in table.values()), name


# --- attention -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape_q, shape_k, mask_shape, budget_div", [
    ((2, 4, 64, 32), (2, 4, 80, 32), None, 3),  # splits batch
    ((1, 4, 64, 32), (1, 4, 80, 32), None, 3),  # splits heads
    ((1, 1, 64, 32), (1, 1, 80, 32), None, 5),  # splits queries
    ((2, 3, 50, 16), (2, 3, 70, 16), (2, 1, 50, 70), 7),  # mask broadcast over heads
    ((2, 3, 50, 16), (2, 3, 70, 16), (50, 70), 100),  # 2-D mask, down to single rows
    ((3, 40, 16), (3, 60, 16), (3, 40, 60), 2),  # 3-D inputs
])
def test_chunked_sdpa_matches_sdpa(monkeypatch, shape_q, shape_k, mask_shape, budget_div):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(shape_q, generator=g)
    k = torch.randn(shape_k, generator=g)
    v = torch.randn(shape_k, generator=g)
    mask = None if mask_shape is None else torch.randn(mask_shape, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    budget = attention.score_bytes(q, k) // budget_div
    seen = []
    real = F.scaled_dot_product_attention

    def spy(qq, kk, vv, **kw):
        seen.append(attention.score_bytes(qq, kk))
        return real(qq, kk, vv, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    out = attention.chunked_sdpa(q, k, v, max_bytes=budget, attn_mask=mask, scale=0.3)
    row = shape_k[-2] * q.element_size()
    assert len(seen) > 1 and max(seen) <= max(budget, row)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_sdpa_dispatch_and_bool_mask():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    mask = torch.rand(16, 16) > 0.3
    mask[:, 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention.scaled_dot_product_attention(q, k, v, max_bytes=None, attn_mask=mask), ref)
    torch.testing.assert_close(attention.scaled_dot_product_attention(q, k, v, max_bytes=64, attn_mask=mask), ref,
                               atol=1e-6, rtol=1e-5)


# --- NaN guard -----------------------------------------------------------------------------------------------
def test_has_non_finite():
    assert not nan_guard.has_non_finite(torch.ones(3))
    assert nan_guard.has_non_finite(torch.tensor([1.0, math.inf]))
    assert nan_guard.has_non_finite((torch.ones(1), {"x": torch.tensor([math.nan])}))
    assert not nan_guard.has_non_finite(torch.arange(3))


def test_dtype_fallback_retries_once_and_warns_once():
    nan_guard.reset_warnings()
    b = _cpu_backend(bf=True)
    warnings: list[str] = []

    def run(dt):
        return torch.full((2,), math.nan if dt == fp16 else 1.0, dtype=dt)

    for _ in range(2):
        out, used, reason = nan_guard.run_with_dtype_fallback(run, fp16, b, warn=warnings.append, stage="decoder")
        assert used == bf16 and out.dtype == bf16 and "retried in bf16" in reason
    assert len(warnings) == 1
    out, used, reason = nan_guard.run_with_dtype_fallback(run, bf16, b, warn=warnings.append)
    assert used == bf16 and reason is None
    _, used, _ = nan_guard.run_with_dtype_fallback(run, fp16, _cpu_backend(bf=False), warn=warnings.append)
    assert used == fp32
    with pytest.raises(nan_guard.NonFiniteOutput):
        nan_guard.run_with_dtype_fallback(lambda dt: torch.tensor([math.nan]), bf16, b, warn=warnings.append)
    with pytest.raises(nan_guard.NonFiniteOutput):
        nan_guard.run_with_dtype_fallback(lambda dt: torch.tensor([math.nan]), fp32, b, warn=warnings.append)
    res, used, _ = nan_guard.run_with_dtype_fallback(lambda dt: dt, fp16, b, check=lambda r: r != fp16,
                                                     warn=warnings.append)
    assert res == bf16 == used


# --- CPU memory for real, IPEX, doctor -----------------------------------------------------------------------
def test_cpu_memory_real():
    b = cascade_backends.select_backend("cpu")
    m = b.memory()
    assert m.total > 0 and 0 < m.free <= m.total
    b.synchronize(), b.empty_cache(), b.reset_peak_memory()
    assert torch.equal(torch.randn(4, generator=b.generator(3)), torch.randn(4, generator=b.generator(3)))


def test_ipex_only_when_matching():
    assert not ipex.status("2.13.0+xpu", "2.8.10+xpu").compatible
    assert ipex.status("2.8.0+xpu", "2.8.10+xpu").compatible
    assert not ipex.status("2.13.0", None, probe=False).installed


def test_doctor_real_machine_json_and_table():
    d = doctor.report()
    json.dumps(d)
    text = doctor.format_report(d)
    assert "Selected: " in text and "preferred low precision" in text and "cpu" in text
    assert "dtypes:" not in text and "Stage" not in text  # the device layer knows no model
    assert d["versions"]["torch"] == torch.__version__
    d = doctor.report(advisor=precision.advice)
    assert set(d["selected"]["dtypes"]) == set(COMPONENTS) and "dtypes: text_encoder=" in doctor.format_report(d)


def _sysfs(tmp_path: Path, bar_bytes: int) -> Path:
    dev = tmp_path / "0000:03:00.0"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x8086\n")
    (dev / "class").write_text("0x030000\n")
    (dev / "device").write_text("0x56a0\n")
    start = 0x4000000000
    (dev / "resource").write_text(
        f"0x00000000a0000000 0x00000000a0ffffff 0x0000000000040200\n"
        f"0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
        f"0x{start:016x} 0x{start + bar_bytes - 1:016x} 0x000000000014220c\n")
    return tmp_path


def test_doctor_warnings_at_the_boundary(tmp_path):
    d = doctor.report(env=NOENV, torch_mod=arc(), sysfs=_sysfs(tmp_path / "off", 256 * 2**20))
    assert any("Resizable BAR appears OFF" in w for w in d["warnings"])
    assert d["selected"]["attention"]["max_bytes"] == GiB
    assert any(e["name"] == "SYCL_CACHE_PERSISTENT" and e["would_set"] for e in d["selected"]["environment"])
    d = doctor.report(env=NOENV, torch_mod=arc(), sysfs=_sysfs(tmp_path / "on", 16 * GiB))
    assert not any("Resizable BAR" in w for w in d["warnings"])
    d = doctor.report(env=NOENV, torch_mod=amd("gfx1103"), sysfs=tmp_path / "none")
    assert any("no kernels for gfx1103" in w for w in d["warnings"])
    turing = nvidia((7, 5), "NVIDIA GeForce RTX 2080")
    assert not any("bf16" in w for w in doctor.report(env=NOENV, torch_mod=turing, sysfs=tmp_path / "none")["warnings"])
    d = doctor.report(env=NOENV, torch_mod=turing, sysfs=tmp_path / "none", advisor=precision.advice)
    assert any("no native bf16" in w and "fp16 is not used for Stage C" in w for w in d["warnings"])
    assert d["selected"]["dtypes"] == {"text_encoder": "float16", "prior": "float32", "decoder": "float16",
                                       "vqgan": "float32"}
    assert "Warnings:" in doctor.format_report(d)
    two = arc(xpu_props(), xpu_props("Intel(R) Graphics", 0x7D55, dpas=False))
    d = doctor.report(env=NOENV, torch_mod=two, sysfs=tmp_path / "none")
    assert any("ONEAPI_DEVICE_SELECTOR" in w for w in d["warnings"]) and len(d["devices"]) >= 3


def test_doctor_cli(capsys):
    assert doctor.main(["--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["selected"]["backend"] == "cpu"
    assert doctor.main(["--device", "rocm"]) == (0 if torch.version.hip else 2)


def test_engine_doctor_shows_stage_dtypes(capsys):
    from cascade.cli import main

    assert main(["backends", "--json", "--device", "cpu"]) == 0
    selected = json.loads(capsys.readouterr().out)["selected"]
    assert selected["dtypes"]["vqgan"] == "float32" and set(selected["dtypes"]) == set(COMPONENTS)


# --- the package's own imports ---------------------------------------------------------------------------------
PACKAGE_DIR = Path(cascade_backends.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem not in ("__init__", "__main__"))


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _package_imports(path: Path) -> set[str]:
    """Modules of this package that `path` imports anywhere (top level or inside functions), except under
    `if TYPE_CHECKING:`, which never runs."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                if child.module:
                    found.add(child.module.split(".")[0])
                else:
                    found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("cascade_backends."):
                found.add(child.module.split(".")[1])
            visit(child)

    visit(ast.parse(path.read_text()))
    return found & set(MODULES)


def test_no_import_circle_inside_the_package():
    """Every import between the package's modules, lazy ones included, points one way (a DAG), and `types`
    depends on nothing: a module imported on its own never re-enters a half-initialised one."""
    graph = {m: _package_imports(PACKAGE_DIR / f"{m}.py") for m in MODULES}
    assert graph["types"] == set() and {"capabilities", "dtypes", "attention", "memory", "env"} <= set(MODULES)
    state: dict[str, str] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            assert state.get(dep) != "open", "import circle: " + " -> ".join(path + [dep])
            if dep not in state:
                walk(dep, path + [dep])
        state[node] = "done"

    for m in MODULES:
        if m not in state:
            walk(m, [m])


def test_each_module_imports_alone_without_cascade_or_sdnext():
    """In a fresh interpreter, each module is imported with nothing of the package loaded before it (after the
    package's __init__, which Python always runs first); none pulls in the engine, the SD.Next glue, SD.Next's
    `modules`, the model libraries or a module named `backends`."""
    code = f"""
import importlib, sys
import torch
bad = ("cascade", "cascade_sdnext", "extension", "modules", "diffusers", "transformers", "backends")
for name in {["__init__"] + MODULES!r}:
    for key in [k for k in sys.modules if k == "cascade_backends" or k.startswith("cascade_backends.")]:
        del sys.modules[key]
    importlib.import_module("cascade_backends" if name == "__init__" else "cascade_backends." + name)
    leaked = sorted(k for k in sys.modules if k.split(".")[0] in bad)
    assert not leaked, (name, leaked)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE_DIR.parent)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
