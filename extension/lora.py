"""`<lora:name:weight>` in SD.Next for our models, through the LoRA calls SD.Next already makes on a pipeline.

How SD.Next hands LoRAs to a pipeline (modules/extra_networks.py, modules/lora/*): it strips the `<lora:...>` tags
from the prompt (extra_networks.parse_prompts), and before encoding the prompt its `lora` extra network activates
them. For a model type that is not in its native list (`allow_native` in modules/lora/lora_overrides.py; Stable
Cascade, type 'sc', is not), it takes the "diffusers" method (lora_load.network_load, lora_diffusers.load_diffusers)
and calls diffusers' LoRA-loader API on the pipeline object: `load_lora_weights(file, adapter_name=name)`,
`get_list_adapters()`, `set_adapters(adapter_names, adapter_weights)`, `enable_lora()`, `get_active_adapters()`,
with the "fuse" setting `fuse_lora(...)` + `unload_lora_weights()`, and `disable_lora()` / `unfuse_lora()` /
`unload_lora_weights()` when the prompt no longer has LoRAs. A pipeline without `load_lora_weights` gets one log
line ("does not implement load lora") and the tag is silently ignored.

`LoraAdapters` implements that API for our pipeline on the engine's own merge (cascade.lora_apply): it is a
mixin of the SD.Next pipeline class, so SD.Next's unchanged flow drives it — nothing of SD.Next is patched.
Weights are merged when SD.Next sets the adapters (before it encodes the prompt, so the CLIP-G part applies) and
restored bit for bit when the set changes or is removed. SD.Next itself then writes `LoRA networks` / `LoRA
hashes` into the infotext (extra_networks_lora.infotext). SD.Next catches and only logs the errors of these calls,
so a LoRA that could not be used (another model family, the other variant, LoHa, ...) is remembered and raised by
`preprocess`, which SD.Next calls right before the generation: an error in the UI/API, not a silent no-op.
SD.Next's diffusers method passes one weight per LoRA (its text-encoder multiplier); it applies to all parts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)


class LoraAdapters:
    """diffusers' LoRA pipeline API (the part SD.Next calls) over `self.engine` (a cascade CascadePipeline)."""

    def _lora_state(self) -> dict[str, Any]:
        state = self.__dict__.get("_cascade_lora")
        if state is None:
            state = {"files": {}, "failed": {}, "active": [], "weights": [], "merged": None, "enabled": True,
                     "fused": False}
            self.__dict__["_cascade_lora"] = state
        return state

    # --- loading ------------------------------------------------------------------------------------------------
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs):
        """Check the file against the loaded model (headers and shapes; no weight changes) and register it."""
        from cascade.lora_apply import prepare

        state = self._lora_state()
        if not isinstance(pretrained_model_name_or_path_or_dict, (str, Path)):
            raise TypeError("Stable Cascade LoRAs load from a file path")
        path = Path(pretrained_model_name_or_path_or_dict)
        name = adapter_name or path.stem
        try:
            prepare(self.engine, [(str(path), 1.0, None)])
        except Exception as err:
            state["failed"][name] = f"LoRA {name!r}: {err}"
            raise
        state["failed"].pop(name, None)
        state["files"][name] = str(path)

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {"prior": list(self._lora_state()["files"])}

    def get_active_adapters(self) -> list[str]:
        state = self._lora_state()
        return list(state["active"]) if state["enabled"] else []

    # --- strengths and activation -------------------------------------------------------------------------------
    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """Make exactly these LoRAs (at these weights) the merged set: the previous set is restored first."""
        state = self._lora_state()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        weights = [1.0 if w is None else float(w) for w in weights]
        unknown = [n for n in names if n not in state["files"]]
        if unknown:
            raise ValueError(f"LoRA adapter(s) {unknown} were not loaded; loaded: {list(state['files'])}")
        state["active"], state["weights"], state["enabled"] = names, weights, True
        self._lora_apply()

    def enable_lora(self) -> None:
        state = self._lora_state()
        if not state["enabled"]:
            state["enabled"] = True
            self._lora_apply()

    def disable_lora(self) -> None:
        state = self._lora_state()
        state["enabled"] = False
        self._lora_restore()

    def fuse_lora(self, *args, **kwargs) -> None:
        """The active set is already merged; remember that `unload_lora_weights` must keep it (diffusers' fuse)."""
        self._lora_state()["fused"] = True

    def unfuse_lora(self, *args, **kwargs) -> None:
        state = self._lora_state()
        state["fused"] = False
        self._lora_restore()
        state["active"], state["weights"] = [], []

    def unload_lora_weights(self, *args, **kwargs) -> None:
        """Forget the registered files; a fused set stays merged (as diffusers' fused weights do) until unfused."""
        state = self._lora_state()
        if not state["fused"]:
            self._lora_restore()
            state["active"], state["weights"] = [], []
        state["files"] = {n: f for n, f in state["files"].items() if state["fused"] and n in state["active"]}

    def delete_adapters(self, adapter_names) -> None:
        state = self._lora_state()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if any(n in state["active"] for n in names):
            self._lora_restore()
            keep = [(n, w) for n, w in zip(state["active"], state["weights"]) if n not in names]
            state["active"], state["weights"] = [n for n, _ in keep], [w for _, w in keep]
        for name in names:
            state["files"].pop(name, None)
        if state["active"] and state["enabled"]:
            self._lora_apply()

    # --- the generation ---------------------------------------------------------------------------------------
    def lora_problems(self) -> list[str]:
        """LoRAs SD.Next tried to load for this model and could not (its calls only log them)."""
        return list(self._lora_state()["failed"].values())

    def preprocess(self, p: Any, args: dict[str, Any]) -> None:
        state = self._lora_state()
        requested = _requested_names(p)
        if requested is not None and state["active"] and not set(state["active"]) <= requested:
            # SD.Next makes no LoRA call at all when none of the prompt's LoRAs is in its Lora folder: without this,
            # the previous request's LoRA would stay merged into this image.
            log.info("Stable Cascade: LoRA %s not asked for by this prompt; restoring the weights", state["active"])
            self._lora_restore()
            state["active"], state["weights"] = [], []
        problems = self.lora_problems()
        if problems and _still_requested(p, self._lora_state()["failed"]):
            from cascade.lora import LoraError

            raise LoraError("; ".join(problems))
        super().preprocess(p, args)

    # --- internals ----------------------------------------------------------------------------------------------
    def _lora_apply(self) -> None:
        from cascade.lora_apply import merge, prepare

        state = self._lora_state()
        self._lora_restore()
        entries = [(state["files"][n], w, None) for n, w in zip(state["active"], state["weights"]) if w != 0]
        if entries:
            state["merged"] = merge(self.engine, prepare(self.engine, entries))
            log.info("Stable Cascade: LoRA %s merged in %.2f s", state["active"], state["merged"].seconds)

    def _lora_restore(self) -> None:
        from cascade.lora_apply import restore

        state = self._lora_state()
        if state["merged"] is not None:
            restore(state["merged"])
            state["merged"] = None


def _still_requested(p: Any, failed: dict[str, str]) -> bool:
    """True when this request's prompt asks for a LoRA that failed (SD.Next keeps the tags' arguments in
    p.network_data['lora']; adapter names are the names with '.' replaced by '_', lora_diffusers.load_diffusers);
    also True when `p` does not say (no network_data): better an error than a silent no-op."""
    data = getattr(p, "network_data", None)
    if not hasattr(data, "get"):
        return True
    for params in data.get("lora", None) or []:
        positional = getattr(params, "positional", None) or []
        if positional and str(positional[0]).replace(".", "_") in failed:
            return True
    return False


def _requested_names(p: Any) -> set[str] | None:
    """The adapter names this request's prompt asks for (SD.Next's p.network_data['lora'], names with '.' as '_'),
    or None when `p` does not say."""
    data = getattr(p, "network_data", None)
    if not hasattr(data, "get"):
        return None
    names = set()
    for params in data.get("lora", None) or []:
        positional = getattr(params, "positional", None) or []
        if positional:
            names.add(str(positional[0]).replace(".", "_"))
    return names
