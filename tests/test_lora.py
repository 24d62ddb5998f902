"""LoRA files: naming schemes, merge = an independent reference, bit-exact restore, refusals, CLI end to end.

Formats (facts, from the trainers' and loaders' code, cited in cascade/lora.py): kohya sd-scripts stable-cascade
branch networks/lora.py (`lora_unet_` / `lora_te_` + module path with '.' -> '_', `.lora_down/.lora_up/.alpha`),
OneTrainer's legacy Stable Cascade names (`lora_prior_unet_` / `lora_prior_te_`), ComfyUI comfy/lora.py
model_lora_keys_unet/clip (`lora_prior_unet_` + the ComfyUI state-dict key minus `diffusion_model.` and `.weight`,
dots -> '_'; `lora_prior_te_` for clip_g's `text_model...`), diffusers/PEFT (`<module>.lora_A.weight` = down,
`lora_B` = up; alpha from `lora_adapter_metadata`). The files are written here, tensor by tensor.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cascade import lora as L
from cascade import lora_apply as A
from cascade.errors import CascadeError, GenerationInterrupted
from cascade.request import GenerationRequest, StageSettings, build_request
from cascade.tensorfile import write_safetensors

FAST_PRIOR = StageSettings(steps=3, cfg=4.0, sampler="ddpm", scheduler="sgm_uniform", shift=2.0)
FAST_DECODER = StageSettings(steps=2, cfg=1.0, sampler="euler_ancestral", scheduler="karras", shift=1.0)
RANK = 4


def request(**kw) -> GenerationRequest:
    base = dict(prompt="1girl, solo", negative_prompt="bad", width=128, height=128, seed=3, prior=FAST_PRIOR,
                decoder=FAST_DECODER)
    return GenerationRequest(**{**base, **kw})


def factors(out_dim: int, in_shape: tuple[int, ...], seed: int, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, *in_shape), generator=g) * 0.2
    up = torch.randn((out_dim, rank, *([1] * (len(in_shape) - 1))), generator=g) * 0.2
    return down, up


def write_kohya(path: Path, layers: dict[str, tuple], alpha: float | None = 2.0, metadata=None) -> Path:
    tensors = {}
    for name, (down, up) in layers.items():
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    write_safetensors(path, tensors, metadata)
    return path


def write_peft(path: Path, layers: dict[str, tuple], alpha: float | None = None) -> Path:
    tensors = {}
    for name, (down, up) in layers.items():
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up
    metadata = None
    if alpha is not None:  # diffusers write_lora_layers: the LoraConfig packed as '<prefix>.<field>'
        prefixes = {n.split(".")[0] for n in layers}
        metadata = {"lora_adapter_metadata": json.dumps({f"{p}.lora_alpha": alpha for p in prefixes} |
                                                        {f"{p}.r": RANK for p in prefixes})}
    write_safetensors(path, tensors, metadata)
    return path


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in A.models_of(pipe).items() for k, v in m.state_dict().items()}


def assert_same_weights(pipe, before: dict[str, torch.Tensor]) -> None:
    now = snapshot(pipe)
    assert now.keys() == before.keys()
    changed = [k for k in now if not torch.equal(now[k], before[k])]
    assert not changed, f"not restored: {changed[:5]}"


# One Stage C linear, one Stage C 1x1 conv and one CLIP-G linear of the tiny model, in each scheme's names.
Q = "down_blocks.0.2.attention.to_q"  # our (diffusers) module path
SCHEMES = {
    "kohya": ("lora_unet_down_blocks_0_2_attention_attn_to_q", "lora_unet_clf_1",
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    "onetrainer": ("lora_prior_unet_down_blocks_0_2_attention_attn_to_q", "lora_prior_unet_clf_1",
                   "lora_prior_te_text_model_encoder_layers_0_self_attn_q_proj"),
    "comfyui-generic": ("diffusion_model.down_blocks.0.2.attention.attn.to_q", "diffusion_model.clf.1",
                        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    # OneTrainer's OMI names (modules/util/convert/lora: 'attention.attn.in_proj.0' <-> diffusers 'attention.to_q')
    "onetrainer-omi": ("unet.down_blocks.0.2.attention.attn.in_proj.0", "unet.clf.1",
                       "clip_g.text_model.encoder.layers.0.self_attn.q_proj"),
    "diffusers": ("prior.down_blocks.0.2.attention.to_q", "prior.clf.1",
                  "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"),
}


def three_layers(pipe, names: tuple[str, str, str]) -> dict[str, tuple]:
    q = pipe.prior.get_submodule(Q).weight
    clf = pipe.prior.get_submodule("clf.1").weight
    te = pipe.text_encoder.get_submodule("text_model.encoder.layers.0.self_attn.q_proj").weight
    return {names[0]: factors(q.shape[0], (q.shape[1],), 1), names[1]: factors(clf.shape[0], tuple(clf.shape[1:]), 2),
            names[2]: factors(te.shape[0], (te.shape[1],), 3)}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_each_scheme_merges_the_reference_and_restores_bit_exactly(tiny_pipeline, tmp_path, scheme):
    """Merged layer output == W x + b + w * (alpha / rank) * up(down(x)), computed with F.linear / F.conv2d on the
    factors; the text encoder takes its own weight; restore gives back every weight bit for bit."""
    pipe = tiny_pipeline
    layers = three_layers(pipe, SCHEMES[scheme])
    path = tmp_path / f"{scheme}.safetensors"
    if scheme == "diffusers":
        write_peft(path, layers, alpha=2.0)
    else:
        write_kohya(path, layers, alpha=2.0)
    before = snapshot(pipe)
    q, clf = pipe.prior.get_submodule(Q), pipe.prior.get_submodule("clf.1")
    te = pipe.text_encoder.get_submodule("text_model.encoder.layers.0.self_attn.q_proj")
    x = torch.randn(3, q.in_features, generator=torch.Generator().manual_seed(9))
    xc = torch.randn(1, clf.in_channels, 5, 5, generator=torch.Generator().manual_seed(10))
    (qd, qu), (cd, cu), (td, tu) = layers.values()
    scale = 2.0 / RANK
    want_q = F.linear(x, q.weight, q.bias) + 0.8 * scale * F.linear(F.linear(x, qd), qu)
    want_c = F.conv2d(xc, clf.weight, clf.bias) + 0.8 * scale * F.conv2d(F.conv2d(xc, cd), cu)
    # CLIP-G runs in its own dtype (bf16 here): the merged weight is the fp32 sum rounded once to that dtype.
    want_t = (te.weight.float() + 0.5 * scale * (tu @ td)).to(te.weight.dtype)

    with A.applied(pipe, [(str(path), 0.8, 0.5)]) as state:
        te_weight = ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj.weight")
        assert sorted(state.originals) == sorted([("prior", f"{Q}.weight"), ("prior", "clf.1.weight"), te_weight])
        with torch.no_grad():
            torch.testing.assert_close(q(x), want_q, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(clf(xc), want_c, rtol=1e-5, atol=1e-5)
            assert torch.equal(te.weight, want_t)
        assert not torch.equal(q.weight, before[f"prior.{Q}.weight"])
    assert_same_weights(pipe, before)


def test_comfyui_rule_from_the_checkpoint_keys(tiny_pipeline, tiny_pair, tmp_path):
    """A LoRA named independently of our maps: ComfyUI's model_lora_keys_unet/clip rule applied to the keys of the
    tiny ComfyUI Stage C file itself ('model.diffusion_model.X.weight' -> 'lora_prior_unet_' + X with '_';
    'text_encoder.clip_g.transformer.text_model.X.weight' -> 'lora_prior_te_text_model_' + X with '_')."""
    from cascade.tensorfile import read_header

    header = read_header(tiny_pair[0])
    layers, expect = {}, 0
    for i, key in enumerate(sorted(header.keys())):
        info = header.tensors[key]
        if not key.endswith(".weight") or len(info.shape) != 2:
            continue
        if key.startswith("model.diffusion_model.") and ".attention.attn." not in key:
            name = "lora_prior_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        elif key.startswith("text_encoder.clip_g.transformer.text_model.encoder."):
            name = "lora_prior_te_" + key[len("text_encoder.clip_g.transformer."):-len(".weight")].replace(".", "_")
        else:
            continue
        layers[name] = factors(info.shape[0], (info.shape[1],), 100 + i)
        expect += 1
    assert expect > 30
    path = write_kohya(tmp_path / "independent.safetensors", layers)
    before = snapshot(tiny_pipeline)
    bound = A.prepare(tiny_pipeline, [path])[0].bound
    assert len(bound.patches) == expect
    assert {p.component for p in bound.patches} == {"prior", "text_encoder"}
    with A.applied(tiny_pipeline, [path]) as state:
        assert len(state.originals) == expect
    assert_same_weights(tiny_pipeline, before)


def test_weight_zero_is_no_lora_and_a_b_a_is_exact(tiny_pipeline, tmp_path):
    pipe = tiny_pipeline
    a = write_kohya(tmp_path / "a.safetensors", three_layers(pipe, SCHEMES["kohya"]), alpha=4.0)
    layers_b = {k: (d * -3, u) for k, (d, u) in three_layers(pipe, SCHEMES["onetrainer"]).items()}
    b = write_kohya(tmp_path / "b.safetensors", layers_b, alpha=4.0)
    before = snapshot(pipe)
    none = pipe.generate(request()).images
    zero = pipe.generate(request(loras=((str(a), 0.0, 0.0),))).images
    assert torch.equal(none, zero)
    first = pipe.generate(request(loras=((str(a), 1.0, None),)))
    second = pipe.generate(request(loras=((str(b), 1.0, None),))).images
    third = pipe.generate(request(loras=((str(a), 1.0, None),))).images
    assert torch.equal(first.images, third)
    assert not torch.equal(first.images, none) and not torch.equal(first.images, second)
    assert first.timings["lora_merge"] >= 0
    both = pipe.generate(request(loras=((str(a), 1.0, None), (str(b), 0.5, None)))).images
    assert not torch.equal(both, first.images)
    assert_same_weights(pipe, before)


def test_restored_after_an_interrupt(tiny_pipeline, tmp_path):
    path = write_kohya(tmp_path / "a.safetensors", three_layers(tiny_pipeline, SCHEMES["kohya"]))
    before = snapshot(tiny_pipeline)
    with pytest.raises(GenerationInterrupted):
        tiny_pipeline.generate(request(loras=((str(path), 1.0, None),)), interrupt=lambda: True)
    assert_same_weights(tiny_pipeline, before)


def test_bad_layer_midway_changes_nothing(tiny_pipeline, tmp_path):
    """A layer whose factors are NaN is found while merging: the weights merged before it are put back."""
    layers = three_layers(tiny_pipeline, SCHEMES["kohya"])
    name = SCHEMES["kohya"][2]
    layers[name] = (torch.full_like(layers[name][0], float("nan")), layers[name][1])
    path = write_kohya(tmp_path / "nan.safetensors", layers)
    before = snapshot(tiny_pipeline)
    with pytest.raises(L.LoraError, match="NaN"):
        tiny_pipeline.generate(request(loras=((str(path), 1.0, None),)))
    assert_same_weights(tiny_pipeline, before)


def test_every_copy_the_placement_holds_is_edited_and_restored(tiny_pipeline, tmp_path):
    """A weight on the accelerator also has the executor's host copy (cascade.offload.Executor.host_copies): both
    get the same merged values and both get the originals back."""
    pipe = tiny_pipeline
    path = write_kohya(tmp_path / "a.safetensors", three_layers(pipe, SCHEMES["kohya"]))
    q = pipe.prior.get_submodule(Q)
    host = q.weight.detach().clone()
    plain = q.weight.data
    with torch.inference_mode():  # what an upload inside a phase (pipeline methods run in inference mode) makes
        q.weight.data = plain.clone()

    class TwoCopies:
        name = "fake"

        def host_copies(self):
            return {(id(q), "weight"): host}

    original_placement, pipe.placement = pipe.placement, TwoCopies()
    try:
        original = host.clone()
        with A.applied(pipe, [path]):
            assert torch.equal(host, q.weight) and not torch.equal(host, original)
        assert torch.equal(host, original) and torch.equal(q.weight, original)
    finally:
        pipe.placement = original_placement
        q.weight.data = plain


def test_merge_in_half_precision_keeps_dtype_and_restores(tiny_models, tmp_path):
    """bf16 weights: merged at their dtype from an fp32 delta, restored bit for bit."""
    import copy

    from cascade.pipeline import Resident

    class Pipe:
        prior = copy.deepcopy(tiny_models.prior).to(torch.bfloat16)
        decoder = tiny_models.decoder
        text_encoder = tiny_models.text_encoder
        placement = Resident("cpu")

    q = Pipe.prior.get_submodule(Q)
    down, up = factors(q.weight.shape[0], (q.weight.shape[1],), 5)
    path = write_kohya(tmp_path / "a.safetensors", {SCHEMES["kohya"][0]: (down, up)}, alpha=None)
    before = q.weight.detach().clone()
    with A.applied(Pipe, [(str(path), 0.7, None)]):
        assert q.weight.dtype == torch.bfloat16
        want = (before.float() + 0.7 * (up @ down)).to(torch.bfloat16)
        assert torch.equal(q.weight, want)
    assert torch.equal(q.weight, before)


def test_tucker_locon_on_a_kernel_conv(tiny_pipeline, tmp_path):
    """LoCon with lora_mid (Tucker): delta[o,i,h,w] = sum up[o,a] mid[a,b,h,w] down[b,i] (einsum reference)."""
    conv = tiny_pipeline.prior.get_submodule("down_blocks.0.0.depthwise")  # (64, 1, 3, 3)
    g = torch.Generator().manual_seed(4)
    down = torch.randn(RANK, conv.weight.shape[1], 1, 1, generator=g)
    mid = torch.randn(RANK, RANK, 3, 3, generator=g)
    up = torch.randn(conv.weight.shape[0], RANK, 1, 1, generator=g)
    write_safetensors(tmp_path / "t.safetensors", {"lora_unet_down_blocks_0_0_depthwise.lora_down.weight": down,
                                                   "lora_unet_down_blocks_0_0_depthwise.lora_mid.weight": mid,
                                                   "lora_unet_down_blocks_0_0_depthwise.lora_up.weight": up})
    before = conv.weight.detach().clone()
    want = before + torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    with A.applied(tiny_pipeline, [tmp_path / "t.safetensors"]):
        torch.testing.assert_close(conv.weight, want)
    assert torch.equal(conv.weight, before)


def test_stage_b_lora_binds_to_the_decoder(tiny_pipeline, tmp_path):
    """`lora_unet_` names exist in both UNets; the shapes decide (Stage B's effnet_mapper exists only there)."""
    w = tiny_pipeline.decoder.get_submodule("effnet_mapper.0").weight
    layer = factors(w.shape[0], tuple(w.shape[1:]), 6)
    path = write_kohya(tmp_path / "b.safetensors", {"lora_unet_effnet_mapper_0": layer})
    bound = A.prepare(tiny_pipeline, [path])[0].bound
    assert bound.components() == {"decoder"}


# --- refusals ------------------------------------------------------------------------------------------------------


def test_wrong_stage_is_refused_naming_it(tiny_pipeline, tmp_path):
    w = tiny_pipeline.decoder.get_submodule("effnet_mapper.0").weight
    layer = factors(w.shape[0], tuple(w.shape[1:]), 6)
    path = write_kohya(tmp_path / "x.safetensors", {"lora_prior_unet_effnet_mapper_0": layer})
    before = snapshot(tiny_pipeline)
    with pytest.raises(L.IncompatibleLoraError, match="does not fit the loaded Stage C.*effnet_mapper"):
        tiny_pipeline.generate(request(loras=((str(path), 1.0, None),)))
    assert_same_weights(tiny_pipeline, before)


def test_big_stage_c_lora_on_another_variant_names_the_variant(tiny_pipeline, tmp_path):
    """Stage C big is 2048 wide (reference §2.1): a LoRA of its shapes is named as such on our (tiny) Stage C."""
    layers = {"lora_prior_unet_down_blocks_0_2_attention_attn_to_q": factors(2048, (2048,), 7),
              "lora_prior_unet_down_blocks_0_2_attention_attn_to_k": factors(2048, (2048,), 8)}
    path = write_kohya(tmp_path / "big.safetensors", layers)
    before = snapshot(tiny_pipeline)
    with pytest.raises(L.IncompatibleLoraError, match="it fits Stage C big"):
        A.applied(tiny_pipeline, [path]).__enter__()
    assert_same_weights(tiny_pipeline, before)


def test_second_lora_misfit_changes_nothing(tiny_pipeline, tmp_path):
    good = write_kohya(tmp_path / "good.safetensors", three_layers(tiny_pipeline, SCHEMES["kohya"]))
    bad = write_kohya(tmp_path / "bad.safetensors", {SCHEMES["kohya"][0]: factors(64, (63,), 1)})
    before = snapshot(tiny_pipeline)
    with pytest.raises(L.IncompatibleLoraError, match=r"lora_down is \[4, 63\]"):
        tiny_pipeline.generate(request(loras=((str(good), 1.0, None), (str(bad), 1.0, None))))
    assert_same_weights(tiny_pipeline, before)


def test_checkpoint_is_not_a_lora(tiny_pair):
    with pytest.raises(L.NotALoraError, match="checkpoint, not a LoRA"):
        L.read_lora(tiny_pair[0])


def test_sdxl_lora_is_named(tmp_path):
    path = write_kohya(tmp_path / "sdxl.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": factors(640, (2048,), 1),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": factors(768, (768,), 2),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": factors(1280, (1280,), 3)})
    with pytest.raises(L.IncompatibleLoraError, match="SDXL"):
        L.read_lora(path)


def test_sd15_lora_is_named(tmp_path):
    path = write_kohya(tmp_path / "sd15.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": factors(640, (768,), 1)})
    with pytest.raises(L.IncompatibleLoraError, match="Stable Diffusion 1"):
        L.read_lora(path)


def test_loha_and_dora_are_refused(tiny_pipeline, tmp_path):
    write_safetensors(tmp_path / "loha.safetensors", {"lora_unet_clf_1.hada_w1_a": torch.zeros(16, 4),
                                                      "lora_unet_clf_1.hada_w1_b": torch.zeros(4, 64)})
    with pytest.raises(L.UnsupportedLoraError, match="LoHa"):
        L.read_lora(tmp_path / "loha.safetensors")
    layers = three_layers(tiny_pipeline, SCHEMES["kohya"])
    tensors = {f"{n}.lora_down.weight": d for n, (d, u) in layers.items()}
    tensors |= {f"{n}.lora_up.weight": u for n, (d, u) in layers.items()}
    tensors[f"{SCHEMES['kohya'][0]}.dora_scale"] = torch.ones(1, 64)
    write_safetensors(tmp_path / "dora.safetensors", tensors)
    before = snapshot(tiny_pipeline)
    with pytest.raises(L.UnsupportedLoraError, match="DoRA"):
        tiny_pipeline.generate(request(loras=((str(tmp_path / "dora.safetensors"), 1.0, None),)))
    assert_same_weights(tiny_pipeline, before)


def test_huge_rank_declared_and_garbage_files_are_clear_errors(tmp_path):
    """A header that declares a rank-1e6 factor the file does not hold, a text file, an empty file, a missing file."""
    good = write_kohya(tmp_path / "g.safetensors", {"lora_unet_clf_1": factors(16, (64, 1, 1), 1)})
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    key = "lora_unet_clf_1.lora_down.weight"
    header[key]["shape"] = [1_000_000, 64, 1, 1]
    text = json.dumps(header).encode()
    (tmp_path / "huge.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    (tmp_path / "text.safetensors").write_text("not a model")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("huge", "text", "empty", "missing"):
        with pytest.raises(CascadeError) as info:
            L.read_lora(tmp_path / f"{name}.safetensors")
        assert "Traceback" not in str(info.value) and len(str(info.value)) < 600


def test_rank_zero_too_high_and_nonfinite_alpha(tiny_pipeline, tmp_path):
    path = write_kohya(tmp_path / "a.safetensors", {"lora_unet_clf_1": factors(16, (64, 1, 1), 1)}, alpha=float("inf"))
    with pytest.raises(L.LoraError, match="alpha"):
        A.applied(tiny_pipeline, [path]).__enter__()
    for rank in (0, 17):  # clf.1 is [16, 64, 1, 1]: rank 1..16
        path = write_kohya(tmp_path / f"r{rank}.safetensors", {"lora_unet_clf_1": factors(16, (64, 1, 1), 1, rank)})
        with pytest.raises(L.IncompatibleLoraError, match=f"declares rank {rank}"):
            A.prepare(tiny_pipeline, [path])


# --- request, CLI, infotext ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("style.safetensors", ("style.safetensors", 1.0, None)),
    ("style.safetensors:0.8", ("style.safetensors", 0.8, None)),
    ("style.safetensors:0.8:0.3", ("style.safetensors", 0.8, 0.3)),
    ("C:\\loras\\a.safetensors:0.5", ("C:\\loras\\a.safetensors", 0.5, None)),
    ("C:\\loras\\a.safetensors", ("C:\\loras\\a.safetensors", 1.0, None)),
])
def test_parse_lora_arg(text, expected):
    assert L.parse_lora_arg(text) == expected


@pytest.mark.parametrize("value", [float("nan"), 1e9, True])
def test_request_refuses_bad_weights(value):
    with pytest.raises(CascadeError, match="LoRA 1"):
        build_request(prompt="x", loras=(("a.safetensors", value, None),))


def test_request_field_round_trips():
    req = build_request(prompt="x", loras=[("a.safetensors", 0.5, None)])
    assert req.loras == (("a.safetensors", 0.5, None),)


ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    """The CLI in a child process, from the repo root (the session's tiny-model cache is in the environment)."""
    return subprocess.run([sys.executable, "-m", "cascade", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_cli_end_to_end_with_a_lora(tiny_pipeline, tmp_path):
    from PIL import Image

    from cascade.infotext import parse_infotext

    path = write_kohya(tmp_path / "style.safetensors", three_layers(tiny_pipeline, SCHEMES["kohya"]))
    common = ["x", "--width", "128", "--height", "128", "--steps", "2", "--decoder-steps", "2", "--seed", "1",
              "--quiet"]
    run = _cli("generate", *common, "--lora", f"{path}:0.8", "--out", str(tmp_path / "a.png"))
    assert run.returncode == 0, run.stderr
    plain = _cli("generate", *common, "--out", str(tmp_path / "b.png"))
    assert plain.returncode == 0, plain.stderr
    info = parse_infotext(Image.open(tmp_path / "a.png").text["parameters"])
    assert info["LoRA networks"] == "style"
    assert info["LoRA hashes"] == L.addnet_hash(path)[:8]
    assert "LoRA hashes" not in parse_infotext(Image.open(tmp_path / "b.png").text["parameters"])
    assert Image.open(tmp_path / "a.png").tobytes() != Image.open(tmp_path / "b.png").tobytes()


@pytest.mark.parametrize("make, message", [
    (lambda d, p: write_kohya(d / "sdxl.safetensors", {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
                                                       factors(768, (768,), 2)}), "SDXL"),
    (lambda d, p: p, "checkpoint, not a LoRA"),
    (lambda d, p: d / "missing.safetensors", "no such LoRA file"),
])
def test_cli_refuses_before_loading(tiny_pair, tmp_path, make, message):
    path = make(tmp_path, tiny_pair[0])
    run = _cli("generate", "x", "--lora", f"{path}:0.8", "--out", str(tmp_path / "o.png"), "--quiet")
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip() and "TINY" not in line]
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert not (tmp_path / "o.png").exists()


def test_cli_refuses_a_bad_weight(tmp_path):
    run = _cli("generate", "x", "--lora", "a.safetensors:nan")
    assert run.returncode == 2 and "finite" in run.stderr and "Traceback" not in run.stderr
    path = write_kohya(tmp_path / "s.safetensors", {"lora_unet_clf_1": factors(16, (64, 1, 1), 1)})
    for text in (f"{path}:abc", f"{path}:0.5:abc"):
        run = _cli("generate", "x", "--lora", text)
        assert run.returncode == 2 and "'abc' is not a weight" in run.stderr, run.stderr


# --- SD.Next: the diffusers LoRA calls its extra network makes (extension/lora.py) -------------------------------


class _Params:  # SD.Next's ExtraNetworkParams: the tag's arguments
    def __init__(self, *positional):
        self.positional = list(positional)


class _Base:
    def __init__(self, engine):
        self.engine = engine
        self.preprocessed = 0

    def preprocess(self, p, args):
        self.preprocessed += 1


def test_sdnext_lora_calls_merge_and_restore(tiny_pipeline, tmp_path):
    """The sequence of modules/lora/lora_load.network_load + lora_diffusers.load_diffusers (diffusers method, the
    one SD.Next uses for model type 'sc'): load_lora_weights, get_list_adapters, set_adapters, enable_lora; with
    the fuse setting fuse_lora + unload_lora_weights; a prompt without LoRAs then disable_lora."""
    from extension.lora import LoraAdapters

    class Pipe(LoraAdapters, _Base):
        pass

    path = write_kohya(tmp_path / "style.v1.safetensors", three_layers(tiny_pipeline, SCHEMES["kohya"]))
    pipe = Pipe(tiny_pipeline)
    before = snapshot(tiny_pipeline)
    reference = tiny_pipeline.generate(request(loras=((str(path), 0.8, None),))).images
    plain = tiny_pipeline.generate(request()).images
    name = "style.v1".replace(".", "_")
    pipe.load_lora_weights(str(path), adapter_name=name)
    assert_same_weights(tiny_pipeline, before)  # loading only checks
    assert name in [a for names in pipe.get_list_adapters().values() for a in names]
    pipe.set_adapters(adapter_names=[name], adapter_weights=[0.8])
    pipe.enable_lora()
    assert pipe.get_active_adapters() == [name]
    assert torch.equal(tiny_pipeline.generate(request()).images, reference)
    pipe.fuse_lora(adapter_names=[name], lora_scale=1.0, fuse_unet=True, fuse_text_encoder=True)
    pipe.unload_lora_weights()
    assert torch.equal(tiny_pipeline.generate(request()).images, reference)
    pipe.disable_lora()
    assert_same_weights(tiny_pipeline, before)
    assert torch.equal(tiny_pipeline.generate(request()).images, plain)
    pipe.preprocess(type("P", (), {"network_data": {}})(), {})
    assert pipe.preprocessed == 1


def test_sdnext_incompatible_lora_is_an_error_at_generation(tiny_pipeline, tmp_path):
    from extension.lora import LoraAdapters

    class Pipe(LoraAdapters, _Base):
        pass

    path = write_kohya(tmp_path / "sdxl_style.safetensors", {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": factors(768, (768,), 2)})
    pipe = Pipe(tiny_pipeline)
    with pytest.raises(L.IncompatibleLoraError):
        pipe.load_lora_weights(str(path), adapter_name="sdxl_style")  # SD.Next logs this and carries on
    asked = type("P", (), {"network_data": {"lora": [_Params("sdxl_style", "0.8")]}})()
    with pytest.raises(L.LoraError, match="sdxl_style.*SDXL"):
        pipe.preprocess(asked, {})
    pipe.preprocess(type("P", (), {"network_data": {"lora": []}})(), {})  # a later prompt without it runs
    assert pipe.preprocessed == 1


def test_mixin_composes_with_the_sdnext_pipeline_class(tiny_pipeline, tmp_path):
    """The SD.Next pipeline class itself answers SD.Next's LoRA calls (LoraAdapters first among its bases, over its
    own `engine`, `preprocess` and diffusers bases): weights merge on set_adapters and come back on unload."""
    from extension.pipeline import StableCascadeSingleFilePipeline

    pipe = StableCascadeSingleFilePipeline.from_engine(tiny_pipeline)
    path = write_kohya(tmp_path / "s.safetensors", three_layers(tiny_pipeline, SCHEMES["kohya"]))
    before = snapshot(tiny_pipeline)
    pipe.load_lora_weights(str(path), adapter_name="s")
    pipe.set_adapters(["s"], [1.0])
    assert pipe.get_active_adapters() == ["s"]
    assert not torch.equal(tiny_pipeline.prior.get_submodule(Q).weight, before[f"prior.{Q}.weight"])
    pipe.preprocess(type("P", (), {"network_data": {}})(), {})
    pipe.unload_lora_weights()
    assert_same_weights(tiny_pipeline, before)


def test_openvino_compiled_unet_is_refused(tiny_pipeline, tmp_path):
    """A UNet behind cascade_backends' OpenVINO wrapper (its weights baked into the compiled model) is named, and
    the LoRA refused before anything changes; a LoRA on the (uncompiled) text encoder alone still merges."""
    from torch import nn

    class Wrapper(nn.Module):  # the shape of cascade_backends.openvino.OpenVINOModule: the torch module as .original
        def __init__(self, module):
            super().__init__()
            self.original = module

    class Pipe:
        prior = Wrapper(tiny_pipeline.prior)
        decoder = tiny_pipeline.decoder
        text_encoder = tiny_pipeline.text_encoder
        placement = tiny_pipeline.placement

    layers = three_layers(tiny_pipeline, SCHEMES["kohya"])
    path = write_kohya(tmp_path / "a.safetensors", layers)
    with pytest.raises(L.LoraError, match="compiled for OpenVINO"):
        A.prepare(Pipe, [path])
    te_only = write_kohya(tmp_path / "te.safetensors", {SCHEMES["kohya"][2]: layers[SCHEMES["kohya"][2]]})
    assert A.prepare(Pipe, [te_only])[0].bound.components() == {"text_encoder"}


def test_fp16_overflow_is_refused_and_restored(tiny_models, tmp_path):
    import copy

    from cascade.pipeline import Resident

    class Pipe:
        prior = copy.deepcopy(tiny_models.prior).half()
        decoder = tiny_models.decoder
        text_encoder = tiny_models.text_encoder
        placement = Resident("cpu")

    q = Pipe.prior.get_submodule(Q)
    clf = Pipe.prior.get_submodule("clf.1")
    before = {n: m.weight.detach().clone() for n, m in ((Q, q), ("clf.1", clf))}
    layers = {SCHEMES["kohya"][1]: factors(16, (64, 1, 1), 1),  # fine, merged first
              SCHEMES["kohya"][0]: (torch.full((RANK, 64), 300.0), torch.full((64, RANK), 300.0))}  # 360000 > 65504
    path = write_kohya(tmp_path / "big.safetensors", layers, alpha=None)
    with pytest.raises(L.LoraError, match="overflows float16"):
        A.applied(Pipe, [path]).__enter__()
    assert torch.equal(q.weight, before[Q]) and torch.equal(clf.weight, before["clf.1"])


@pytest.mark.parametrize("mode", ["stage", "stream", "sequential"])
def test_every_memory_plan_gives_the_resident_result(tiny_pair, tiny_pipeline, monkeypatch, tmp_path, mode):
    """cascade.offload.Executor (streamed blocks included) with a LoRA: the image of the resident pipeline with the
    same LoRA, the plain image before and after it, and the executor's host copies are the weights merged."""
    from cascade_backends import select_backend
    from cascade.offload import Executor
    from test_memory import ZERO, load_with, squeezing_activations, tiny_plan

    sizes, _ = tiny_plan(tiny_pair, monkeypatch, 10**12)
    budget, activations = squeezing_activations(sizes) if mode != "stage" else (10**12, ZERO)
    _, plan = tiny_plan(tiny_pair, monkeypatch, budget, mode=mode, activations=activations)
    executor = Executor(plan, select_backend("cpu"))
    pipe = load_with(tiny_pair, executor)
    path = write_kohya(tmp_path / "a.safetensors", three_layers(pipe, SCHEMES["kohya"]))
    plain = pipe.generate(request()).images
    q = pipe.prior.get_submodule(Q)
    assert (id(q), "weight") in executor.host_copies()
    with_lora = pipe.generate(request(loras=((str(path), 0.9, None),))).images
    assert torch.equal(with_lora, tiny_pipeline.generate(request(loras=((str(path), 0.9, None),))).images)
    assert not torch.equal(with_lora, plain)
    assert torch.equal(pipe.generate(request()).images, plain)


def test_api_bodies_cannot_name_lora_files():
    """No path from a request is ever opened (cascade.api_fields): `loras` is refused in an SD.Next API body."""
    from cascade.api_fields import from_sdnext, json_fields

    assert "loras" not in json_fields()
    with pytest.raises(CascadeError, match="loras.*names files"):
        from_sdnext({"prompt": "x", "loras": [["/etc/passwd", 1.0]]})


def test_request_entries_default_the_text_encoder_weight_to_the_unet_weight():
    """A1111/SD.Next's <lora:name:w>: one weight for every part unless a text-encoder weight is given."""
    from cascade.lora_apply import as_entry

    assert as_entry(("a.safetensors", 0.7)).weight_for("text_encoder") == 0.7
    assert as_entry(("a.safetensors", 0.7, 0.2)).weight_for("text_encoder") == 0.2
    assert as_entry(["a.safetensors"]).weight_for("prior") == 1.0 == as_entry("a.safetensors").weight_for("text_encoder")


def test_sdnext_prompt_without_the_merged_lora_restores_the_weights(tiny_pipeline, tmp_path):
    """SD.Next makes no LoRA call when every LoRA of the prompt is missing from its folder; preprocess compares the
    prompt's LoRAs (p.network_data) with the merged set and restores the weights bit for bit."""
    from extension.lora import LoraAdapters

    class Pipe(LoraAdapters, _Base):
        pass

    path = write_kohya(tmp_path / "style.safetensors", three_layers(tiny_pipeline, SCHEMES["kohya"]))
    pipe = Pipe(tiny_pipeline)
    before = snapshot(tiny_pipeline)
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["style"], [0.8])
    pipe.preprocess(type("P", (), {"network_data": {"lora": [_Params("style", "0.8")]}})(), {})
    assert not torch.equal(tiny_pipeline.prior.get_submodule(Q).weight, before[f"prior.{Q}.weight"])  # still merged
    pipe.preprocess(type("P", (), {"network_data": {"lora": [_Params("no_such_lora", "1")]}})(), {})
    assert_same_weights(tiny_pipeline, before)
    assert pipe.get_active_adapters() == []
