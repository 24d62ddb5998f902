"""NaN/inf guard: a stage that produced non-finite output in fp16/bf16 is re-run once in the next safer dtype.

The engine wraps each stage run: `result, used, reason = run_with_dtype_fallback(run, dtype, backend, ...)`, then
records `used` in the infotext.  The warning is emitted once per (backend, stage, dtype) per process; the reason
string is returned every time so the infotext can say why a stage ran in a different dtype.  `stage` is only a
label for the messages; what to tell the user about a model's non-finite output is the engine's business
(`cascade.precision.explain_non_finite`, which uses `non_finite_weights` here).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

import torch

if TYPE_CHECKING:
    from .base import Backend

T = TypeVar("T")
log = logging.getLogger(__name__)
_warned: set[tuple[str, str, str]] = set()

_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


class NonFiniteOutput(RuntimeError):
    """The stage still produced NaN/inf after the retry (or in fp32): a real bug, not a precision problem."""


def dtype_name(dtype: torch.dtype) -> str:
    return _SHORT.get(dtype, str(dtype).replace("torch.", ""))


def has_non_finite(t: Any) -> bool:
    """True if any floating tensor in `t` (tensor, or nested list/tuple/dict of them) has NaN or inf."""
    if isinstance(t, torch.Tensor):
        if not (t.is_floating_point() or t.is_complex()):
            return False
        return not bool(torch.isfinite(t).all())
    if isinstance(t, Mapping):
        return any(has_non_finite(x) for x in t.values())
    if isinstance(t, Sequence) and not isinstance(t, (str, bytes)):
        return any(has_non_finite(x) for x in t)
    return False


def non_finite_weights(modules: Mapping[str, Any], limit: int = 3) -> dict[str, list[str]]:
    """{module name: up to `limit` names of its floating parameters/buffers holding NaN/inf}; modules with clean
    weights are left out. Weights on the meta device (not materialised) are skipped. Used only after a stage
    produced NaN/inf, to tell a damaged file from a numerical overflow, so its cost (one pass over the weights)
    is paid only on that error path."""
    found: dict[str, list[str]] = {}
    for name, module in modules.items():
        tensors = []
        for attr in ("named_parameters", "named_buffers"):
            try:
                tensors.extend(getattr(module, attr)())
            except (AttributeError, TypeError):  # not an nn.Module (e.g. a compiled wrapper without weights)
                continue
        bad = []
        for key, t in tensors:
            if not isinstance(t, torch.Tensor) or t.is_meta or not t.is_floating_point():
                continue
            if not bool(torch.isfinite(t).all()):
                bad.append(key)
                if len(bad) >= limit:
                    break
        if bad:
            found[name] = bad
    return found


def _default_check(result: Any) -> bool:
    return not has_non_finite(result)


def _log_warn(msg: str) -> None:
    log.warning(msg)


def reset_warnings() -> None:
    """Forget which warnings were shown (tests)."""
    _warned.clear()


def run_with_dtype_fallback(run: Callable[[torch.dtype], T], dtype: torch.dtype, backend: "Backend", *,
                            check: Callable[[T], bool] = _default_check,
                            warn: Callable[[str], None] = _log_warn,
                            stage: str = "stage") -> tuple[T, torch.dtype, str | None]:
    """Run `run(dtype)`; if the output fails `check` and `dtype` is fp16/bf16, run once more in
    `backend.safer_dtype(dtype)`.

    check(result) -> True when the result is good (default: no NaN/inf anywhere in it).
    Returns (result, dtype actually used, reason or None).  Raises NonFiniteOutput when the output is still bad
    after the retry, or bad in fp32 (nothing safer to try)."""
    result = run(dtype)
    if check(result):
        return result, dtype, None
    safer = backend.safer_dtype(dtype) if dtype in (torch.float16, torch.bfloat16) else None
    if safer is None:
        raise NonFiniteOutput(f"{stage} produced NaN/inf in {dtype_name(dtype)} on {backend.description}; "
                              "no safer dtype to retry with")
    reason = (f"{stage} produced NaN/inf in {dtype_name(dtype)} on {backend.name}; retried in {dtype_name(safer)}")
    key = (backend.name, stage, dtype_name(dtype))
    if key not in _warned:
        _warned.add(key)
        warn(reason + " (shown once; pass an explicit dtype to choose it up front)")
    del result  # free the bad output before the retry allocates
    result = run(safer)
    if not check(result):
        raise NonFiniteOutput(f"{stage} produced NaN/inf in {dtype_name(dtype)} and again in {dtype_name(safer)} "
                              f"on {backend.description}")
    return result, safer, reason
