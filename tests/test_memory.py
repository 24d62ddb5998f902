"""Memory planner decisions with the full-size components, the fitted activation model against fresh traces, and the
executor's ledger, streaming and out-of-memory fallback on the tiny model."""

from __future__ import annotations

import pytest
import torch

from cascade.activations import ActivationModel, Shape, default_model, measure
from cascade.errors import CascadeError
from cascade.memory import GiB, ComponentSizes, default_dtypes, format_plan, make_plan, parse_size
from cascade.request import GenerationRequest, StageSettings
from cascade.sizing import full_size, sizes_from_sources

FULL = None


def full_sizes() -> ComponentSizes:
    global FULL
    FULL = FULL or full_size(default_dtypes("bf16"))
    return FULL


def test_full_size_weights_match_the_reference_parameter_counts():
    sizes = full_sizes()
    assert sizes.weights["prior"] == 3_589_103_632 * 2
    assert sizes.weights["decoder"] == 1_562_941_136 * 2
    assert sizes.weights["text_encoder"] == 694_659_840 * 2
    assert len(sizes.blocks["prior"]) == 3 * (8 + 24) * 2  # Res, Timestep, Attn per layer, down and up
    assert 0 < sizes.rest("prior") < 0.01 * sizes.weights["prior"]


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * GiB), ("12GB", 12 * 10**9), ("8000MiB", 8000 * 2**20), ("15.5G", int(15.5 * GiB))])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


# The decision table: (card, width, height) -> expected mode, bf16 UNets and text encoder, fp32 Stage A (the policy
# on bf16 hardware). Peaks must be within the usable budget.
DECISIONS = [
    ("6GiB", 1024, 1024, "stream"), ("6GiB", 1024, 1536, "stream"), ("6GiB", 2048, 1152, "stream"),
    ("8GiB", 1024, 1024, "stage"), ("8GiB", 1024, 1536, "stage"), ("8GiB", 2048, 1152, "stage"),
    ("12GiB", 1024, 1024, "stage"), ("12GiB", 1024, 1536, "stage"), ("12GiB", 2048, 1152, "stage"),
    ("16GiB", 1024, 1024, "resident"), ("16GiB", 1024, 1536, "resident"), ("16GiB", 2048, 1152, "resident"),
    ("24GiB", 1024, 1024, "resident"), ("24GiB", 1024, 1536, "resident"), ("24GiB", 2048, 1152, "resident"),
]


@pytest.mark.parametrize("budget,width,height,mode", DECISIONS)
def test_planner_decisions_full_size_bf16(budget, width, height, mode):
    plan = make_plan(full_sizes(), Shape(width, height), parse_size(budget))
    assert plan.mode == mode
    assert plan.chosen.peak <= plan.usable
    cheaper = plan.options[: [o.mode for o in plan.options].index(mode)]
    assert all(not o.fits for o in cheaper)  # the cheapest plan that fits is chosen
    if mode == "stream":
        kept = plan.chosen.resident_blocks["prior"]
        assert 0 < kept < len(full_sizes().blocks["prior"])  # Stage C partly streamed, not all of it
        assert plan.chosen.bytes_moved < 80 * GiB


@pytest.mark.parametrize("budget,mode", [("8GiB", "stream"), ("12GiB", "stream"), ("16GiB", "stage")])
def test_fp32_stage_c_on_cards_without_bf16(budget, mode):
    """RDNA2 / Turing: no native bf16, so Stage C runs in fp32 (14.4 GB) and must be staged or streamed."""
    plan = make_plan(full_size(default_dtypes("fp32")), Shape(1024, 1536), parse_size(budget))
    assert plan.mode == mode and plan.chosen.peak <= plan.usable


def test_refusal_names_the_largest_size_that_fits():
    plan = make_plan(full_sizes(), Shape(2048, 2048, batch=4), parse_size("2GiB"))
    assert not plan.fits
    text = format_plan(plan)
    assert "does not fit" in text
    w, h = plan.largest_fitting
    assert w == h and w % 128 == 0 and w < 2048
    assert make_plan(full_sizes(), Shape(w, h, batch=4), parse_size("2GiB")).fits


def test_plan_json_has_every_option():
    d = make_plan(full_sizes(), Shape(1024, 1536), parse_size("16GiB")).to_dict()
    assert [o["mode"] for o in d["options"]] == ["resident", "stage", "stream", "sequential"]
    assert d["mode"] == "resident" and d["options"][1]["bytes_moved_per_generation"] > 10 * GiB


@pytest.mark.parametrize("phase", ["prior", "decoder", "vqgan"])
def test_activation_model_predicts_fresh_traces(phase):
    """The fit (made on a grid without 2048x1152 or 768x1280) predicts new traces of the full-size models within 10%."""
    for shape in (Shape(2048, 1152), Shape(768, 1280, batch=2)):
        traced = measure(phase, shape, torch.bfloat16)
        predicted = default_model().predict(phase, shape, 2)
        assert abs(predicted - traced) / traced < 0.10, (phase, shape, predicted, traced)


# --- executor on the tiny model ---------------------------------------------------------------------------------

ZERO = ActivationModel({p: [0.0, 0.0, 0.0] for p in ("text_encoder", "prior", "decoder", "vqgan")})
FAST = dict(prior=StageSettings(4, 7.0, "dpmpp_2m", "sgm_uniform", 2.0), decoder=StageSettings(2, 1.0, "euler", "karras", 1.0))


def tiny_plan(tiny_pair, monkeypatch, budget: int, mode: str = "auto", activations: ActivationModel = ZERO):
    """A plan for the tiny model from its headers, with the given activation model and no margin."""
    import cascade.memory as memory
    from cascade.loader import resolve_sources

    monkeypatch.setattr(memory, "default_model", lambda: activations)
    monkeypatch.setattr(memory, "MARGIN_FIXED", 0)
    monkeypatch.setattr(memory, "MARGIN_FRACTION", 0.0)
    from cascade_backends import select_backend
    from cascade.precision import choose_dtypes

    # the dtypes `load_with` loads at (fp32 UNets; the text encoder at the CPU backend's own choice)
    sizes = sizes_from_sources(resolve_sources(*tiny_pair), choose_dtypes(select_backend("cpu"), torch.float32))
    return sizes, make_plan(sizes, Shape(256, 256), budget, steps={"prior": 4, "decoder": 2}, mode=mode)


def squeezing_activations(sizes: ComponentSizes) -> tuple[int, ActivationModel]:
    """A budget (the text encoder's weights) and constant activations that leave room for about half of each
    UNet's blocks, so the streamed plans really stream (the tiny CLIP is bigger than the tiny UNets)."""
    budget = sizes.weights["text_encoder"]
    act = {}
    for unet, partner in (("prior", 0), ("decoder", sizes.weights["vqgan"])):
        blocks = sizes.blocks[unet]
        act[unet] = budget - sizes.rest(unet) - partner - 2 * max(blocks) - sum(blocks) // 2
        assert act[unet] > 0
    per_fp32 = lambda n: [n / 2, 0.0, 0.0]  # noqa: E731 - the model is at 2-byte activations; fp32 doubles it
    return budget, ActivationModel({"text_encoder": [0.0] * 3, "prior": per_fp32(act["prior"]),
                                     "decoder": per_fp32(act["decoder"]), "vqgan": [0.0] * 3})


def load_with(tiny_pair, executor):
    from cascade.engine import load_pipeline

    pipe, _ = load_pipeline(*tiny_pair, backend=executor.backend, dtype=torch.float32, placement=executor)
    return pipe


@pytest.mark.parametrize("mode", ["resident", "stage", "stream", "sequential"])
def test_ledger_equals_plan(tiny_pair, monkeypatch, mode):
    from cascade_backends import select_backend
    from cascade.offload import Executor

    sizes, _ = tiny_plan(tiny_pair, monkeypatch, 10**12)
    budget, activations = squeezing_activations(sizes) if mode in ("stream", "sequential") else (10**12, ZERO)
    _, plan = tiny_plan(tiny_pair, monkeypatch, budget, mode=mode, activations=activations)
    assert plan.mode == mode
    executor = Executor(plan, select_backend("cpu"))
    pipe = load_with(tiny_pair, executor)
    result = pipe.generate(GenerationRequest("a cat", width=256, height=256, seed=1, **FAST))
    assert result.images.shape == (1, 3, 256, 256)
    for phase, predicted in plan.chosen.phases.items():
        assert executor.ledger.after_enter[phase] == predicted.resident, phase
    assert executor.ledger.peak <= plan.chosen.peak
    for unet in ("prior", "decoder"):
        kept = plan.chosen.resident_blocks.get(unet)
        if mode == "stream":  # part resident, part streamed
            assert 0 < kept < len(sizes.blocks[unet]), unet
        elif mode == "sequential":  # every block streamed through one buffer
            assert kept == 0, unet


def test_streaming_stays_within_the_planned_buffers(tiny_pair, monkeypatch):
    """Per phase, the weights on the device never exceed what the plan keeps resident plus its streaming buffers
    (two blocks): also when Stage B's up levels repeat and the block fetched ahead for the next level is not the
    one that runs next (found by benchmarks/gpu_memory.py --dry-run)."""
    from cascade_backends import select_backend
    from cascade.offload import Executor

    sizes, _ = tiny_plan(tiny_pair, monkeypatch, 10**12)
    budget, activations = squeezing_activations(sizes)
    _, plan = tiny_plan(tiny_pair, monkeypatch, budget, mode="stream", activations=activations)
    executor = Executor(plan, select_backend("cpu"))
    peaks: dict[str, int] = {}
    current: list[str] = []
    enter = executor.enter

    def metered_enter(phase, components):
        if current:
            peaks[current[0]] = max(peaks.get(current[0], 0), executor.ledger.peak)
        enter(phase, components)
        executor.ledger.peak = executor.ledger.current
        current[:] = [phase]

    monkeypatch.setattr(executor, "enter", metered_enter)
    pipe = load_with(tiny_pair, executor)
    pipe.generate(GenerationRequest("a cat", width=256, height=256, seed=1, **FAST))
    peaks[current[0]] = max(peaks.get(current[0], 0), executor.ledger.peak)
    assert 0 < plan.chosen.resident_blocks["decoder"] < len(sizes.blocks["decoder"])
    for phase, predicted in plan.chosen.phases.items():
        assert peaks[phase] <= predicted.resident + predicted.buffers, phase


def test_streamed_generation_equals_resident(tiny_pair, monkeypatch):
    from cascade_backends import select_backend
    from cascade.offload import Executor

    images = {}
    for mode in ("resident", "sequential"):
        _, plan = tiny_plan(tiny_pair, monkeypatch, 10**12, mode=mode)
        pipe = load_with(tiny_pair, Executor(plan, select_backend("cpu")))
        images[mode] = pipe.generate(GenerationRequest("a cat", width=256, height=256, seed=3, **FAST)).images
    assert torch.equal(images["resident"], images["sequential"])


class DeviceBudget:
    """Stand-in for a device with `limit` bytes: raises torch.OutOfMemoryError at the allocation boundary."""

    def __init__(self, limit: int):
        self.limit, self.failures = limit, 0

    def __call__(self, nbytes: int) -> None:
        if nbytes > self.limit:
            self.failures += 1
            raise torch.OutOfMemoryError(f"stand-in: {nbytes} bytes > {self.limit}")


def test_oom_falls_back_one_level_and_says_so(tiny_pair, monkeypatch):
    from cascade_backends import select_backend
    from cascade.offload import Executor

    sizes, plan = tiny_plan(tiny_pair, monkeypatch, 10**12, mode="resident")
    stage_peak = plan.option("stage").peak
    budget = DeviceBudget(stage_peak)  # the real device is smaller than the plan assumed: resident cannot fit
    executor = Executor(plan, select_backend("cpu"), guard=budget)
    pipe = load_with(tiny_pair, executor)
    result = pipe.generate(GenerationRequest("a cat", width=256, height=256, seed=1, **FAST))
    assert result.images.shape == (1, 3, 256, 256)
    assert any("retried with the" in w for w in result.warnings)
    assert executor.name != "resident" and budget.failures >= 1


def test_second_oom_is_a_clear_error_and_pipeline_survives(tiny_pair, monkeypatch):
    from cascade_backends import select_backend
    from cascade.offload import Executor

    _, plan = tiny_plan(tiny_pair, monkeypatch, 10**12, mode="stage")
    budget = DeviceBudget(0)  # nothing fits at all
    executor = Executor(plan, select_backend("cpu"), guard=budget)
    pipe = load_with(tiny_pair, executor)
    with pytest.raises(CascadeError, match="Out of memory in the text_encoder phase even with the 'sequential'"):
        pipe.generate(GenerationRequest("a cat", width=256, height=256, seed=1, **FAST))
    budget.limit = 10**12  # memory is back (other program closed): the same pipeline works again
    result = pipe.generate(GenerationRequest("a cat", width=256, height=256, seed=1, **FAST))
    assert result.images.shape == (1, 3, 256, 256)


def test_cli_plan_answers_from_headers_without_loading(capsys, monkeypatch):
    import cascade.loader
    from cascade.cli import main

    def no_weights(*args, **kwargs):
        raise AssertionError("plan must not load weights")

    monkeypatch.setattr(cascade.loader, "load_part", no_weights)
    assert main(["plan", "--vram", "16GiB", "--width", "1024", "--height", "1536"]) == 0
    assert "chosen: resident" in capsys.readouterr().out
    assert main(["plan", "--vram", "1GiB", "--width", "2048", "--height", "2048", "--json"]) == 2
    assert '"fits": false' in capsys.readouterr().out


def test_failed_upload_leaves_nothing_on_the_device(monkeypatch):
    """An out-of-memory error halfway through an upload points the copied slots back at their host copies: a part
    the ledger counts as off the device must not keep device memory (Executor._drop skips such parts)."""
    from torch import nn

    from cascade import offload

    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    weights = offload._Weights(module)
    real_to, calls = torch.Tensor.to, [0]

    def stand_in_device_to(self, *args, **kwargs):  # an upload is a copy; the third one runs out of memory
        calls[0] += 1
        if calls[0] == 3:
            raise torch.OutOfMemoryError("stand-in: out of memory mid-upload")
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "to", stand_in_device_to)
    with pytest.raises(torch.OutOfMemoryError):
        weights.upload(torch.device("cpu"), non_blocking=False)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert not weights.on_device
    assert all(slot.current().data_ptr() == slot.host.data_ptr() for slot in weights.slots)


def test_streamed_block_is_waited_for_before_it_runs(tiny_pair, monkeypatch):
    """With a copy stream, every streamed block's upload is waited for before its forward: the prefetched ones and
    also the ones uploaded on demand (the first streamed block of each pass, a block fetched again when a level
    repeats). A stand-in stream records which uploads are still in flight."""
    from cascade_backends import select_backend
    from cascade import offload
    from cascade.offload import Executor

    sizes, _ = tiny_plan(tiny_pair, monkeypatch, 10**12)
    budget, activations = squeezing_activations(sizes)
    _, plan = tiny_plan(tiny_pair, monkeypatch, budget, mode="stream", activations=activations)
    backend = select_backend("cpu")
    monkeypatch.setattr(type(backend), "copy_stream", lambda self: "side-stream")
    in_flight: set[int] = set()

    def upload_on(stream, device, block, non_blocking):
        moved = block.upload(device, non_blocking)
        if stream is not None:
            block.ready = "copy-finished event"
            in_flight.add(id(block.module))
        return moved

    def wait_for(device, block):
        if block.ready is not None:
            in_flight.discard(id(block.module))
            block.ready = None

    monkeypatch.setattr(offload, "_upload_on", upload_on)
    monkeypatch.setattr(offload, "_wait_for", wait_for)
    executor = Executor(plan, backend)
    install = executor._install_stream_hooks
    used_in_flight, runs = [], [0]

    def install_and_check(name, streamed):
        install(name, streamed)
        for block in streamed:  # registered after the executor's hooks: runs right before the block computes
            def check(module, args):
                runs[0] += 1
                if id(module) in in_flight:
                    used_in_flight.append(type(module).__name__)
            executor._hooks[name].append(block.module.register_forward_pre_hook(check))

    monkeypatch.setattr(executor, "_install_stream_hooks", install_and_check)
    pipe = load_with(tiny_pair, executor)
    pipe.generate(GenerationRequest("a cat", width=256, height=256, seed=1, **FAST))
    assert runs[0] > 0
    assert used_in_flight == []


@pytest.mark.parametrize("width,message", [(0, "width 0 is not a multiple of 128"),
                                           (1_000_064, "width 1000064 is larger than 4096")])
def test_cli_plan_refuses_sizes_a_generation_refuses(capsys, width, message):
    """A zero width divided by zero; a huge one made the largest-fitting search run for hours (also reachable
    through GET /cascade/v1/plan?width=...)."""
    from cascade.cli import main

    assert main(["plan", "--vram", "4GiB", "--width", str(width), "--height", "1024"]) == 2
    assert message in capsys.readouterr().err


def test_nan_fallback_recasts_and_replans(tiny_pair, monkeypatch, nan_when_bf16):
    """bf16 Stage C that yields NaN is re-run in fp32 under a staged plan; the plan is redone for fp32 weights."""
    from cascade_backends import select_backend
    from cascade.engine import load_pipeline
    from cascade.loader import resolve_sources
    from cascade.offload import Executor

    import cascade.memory as memory

    monkeypatch.setattr(memory, "default_model", lambda: ZERO)
    sizes = sizes_from_sources(resolve_sources(*tiny_pair), {**default_dtypes("bf16"), "vqgan": torch.float32})
    plan = make_plan(sizes, Shape(256, 256), 10**12, steps={"prior": 4, "decoder": 2}, mode="stage")
    executor = Executor(plan, select_backend("cpu"))
    pipe, _ = load_pipeline(*tiny_pair, backend=executor.backend, dtype=torch.bfloat16, placement=executor)

    handle = pipe.prior.register_forward_hook(nan_when_bf16)
    try:
        result = pipe.generate(GenerationRequest("a cat", width=256, height=256, seed=1, **FAST))
    finally:
        handle.remove()
    assert torch.isfinite(result.images).all() and result.dtypes["prior"] == "float32"
    assert executor.plan.sizes.weights["prior"] == 2 * sizes.weights["prior"]
    assert executor.name == "stage" and executor.ledger.after_enter["prior"] == executor.option.phases["prior"].resident
