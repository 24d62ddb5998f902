"""Stage C ControlNets (cascade.controlnet, cascade.models.controlnet).

Key layout of the files, from the definitions (Stability-AI/StableCascade modules/controlnet.py `ControlNet`,
ComfyUI comfy/ldm/cascade/controlnet.py): `backbone.*` = torchvision efficientnet_v2_s().features (stem conv
`backbone.0.0.weight` of shape (24, c_in, 3, 3), canny c_in=1, inpainting c_in=4), or the "large" backbone
`backbone.0` conv c_in->16384, `backbone.2` conv ->1024, `backbone.3..10` CNetResBlocks (`blocks.{0,3}` LayerNorm,
`blocks.{2,5}` conv3x3), `backbone.11` conv ->1280; `projections.{i}.0.weight` (1280, 1280, 1, 1) and
`projections.{i}.2.weight` (2048, 1280, 1, 1), no biases. ComfyUI's detection keys (comfy/controlnet.py
load_t2i_adapter): `backbone.0.0.weight` (effnet type) and `backbone.10.blocks.0.weight` (large type).
Where residuals go: comfy/ldm/cascade/stage_c.py pops one per ResBlock call (down then up path) and adds it,
bilinearly resized, before the block. Start/end: ControlBase.pre_run + percent_to_sigma.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests._headers import header_from_shapes
from cascade import controlnet as cn
from cascade import tiny
from cascade.checkpoints import CONTROLNET, checkpoint_from_header, scan
from cascade.errors import CheckpointError, InvalidRequestError, NotStableCascadeError
from cascade.models.controlnet import PROJ_BLOCKS, StageCControlNet, official_config
from cascade.tensorfile import SafetensorsHeader, write_safetensors


@pytest.fixture(scope="module")
def cnet_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("controlnets")
    return {kind: tiny.write_tiny_controlnet(folder / f"tiny_{kind}.safetensors", kind) for kind in tiny.TINY_CONTROLNETS}


def _header(name: str, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16") -> SafetensorsHeader:
    return header_from_shapes(name, shapes, dtype)


def _official_shapes(backbone: str, c_in: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = StageCControlNet(official_config(backbone, c_in))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- 1. detection, loading, the module ---------------------------------------------------------------------------

@pytest.mark.parametrize("backbone,c_in,kind", [("effnet", 1, "canny"), ("effnet", 4, "inpainting"),
                                                ("large", 16, "super-resolution")])
def test_official_layouts_are_recognised_by_their_tensors(backbone, c_in, kind):
    shapes = _official_shapes(backbone, c_in)
    # The published names the detection relies on are really what the definition produces.
    marker = "backbone.0.0.weight" if backbone == "effnet" else "backbone.10.blocks.0.weight"
    assert marker in shapes and shapes["projections.7.2.weight"] == (2048, 1280, 1, 1)
    if backbone == "effnet":
        assert shapes["backbone.0.0.weight"] == (24, c_in, 3, 3)
    else:
        assert shapes["backbone.0.weight"] == (16384, 16, 1, 1) and shapes["backbone.11.weight"] == (1280, 1024, 1, 1)
    ckpt = checkpoint_from_header(_header("any_name.safetensors", shapes))
    assert ckpt.role == "controlnet" and CONTROLNET in ckpt.parts
    config = cn.config_from_part(ckpt.parts[CONTROLNET])
    assert config["backbone"] == backbone and config["c_in"] == c_in and config["proj_blocks"] == list(PROJ_BLOCKS)
    assert cn.ControlNetFile(Path("x"), ckpt.parts[CONTROLNET], config).kind == kind


def test_effnet_stem_has_no_padding_and_output_is_1_32():
    """The replaced stem is Conv2d(c_in, 24, 3, stride 2, bias=False): padding 0 (not torchvision's 1)."""
    with torch.device("meta"):
        model = StageCControlNet(official_config("effnet", 1))
    assert model.backbone[0][0].padding == (0, 0) and model.backbone[0][0].stride == (2, 2)
    out = model(torch.zeros(1, 1, 768, 1024, device="meta"))
    assert len(out) == 64 and [i for i, r in enumerate(out) if r is not None] == list(PROJ_BLOCKS)
    assert tuple(out[0].shape) == (1, 2048, 24, 32)


def test_tiny_files_scan_load_and_match_the_module(cnet_files):
    for kind, path in cnet_files.items():
        cnet = cn.scan_controlnet(path)
        assert cnet.kind == kind and cnet.config == tiny.TINY_CONTROLNETS[kind]
        model = cn.load_controlnet(cnet)
        reference = tiny.build_tiny_controlnet(kind)
        hint = torch.rand(1, cnet.config["c_in"], *cn.hint_size((6, 6), cnet.backbone))
        got, want = model(hint), reference(hint)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, want))


def test_wrong_files_are_clear_errors(tmp_path, tiny_pair):
    sd15 = tmp_path / "control_v11p_sd15_canny.safetensors"
    write_safetensors(sd15, {"control_model.zero_convs.0.0.weight": torch.zeros(320, 320, 1, 1),
                             "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)})
    with pytest.raises(NotStableCascadeError, match="ControlNet for Stable Diffusion 1.x/2.x"):
        cn.scan_controlnet(sd15)
    sdxl = tmp_path / "diffusers_xl_canny.safetensors"
    write_safetensors(sdxl, {"controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3),
                             "add_embedding.linear_1.weight": torch.zeros(4, 4)})
    with pytest.raises(NotStableCascadeError, match="ControlNet for SDXL"):
        cn.scan_controlnet(sdxl)
    with pytest.raises(CheckpointError, match="is a Stage C .* not a Stage C ControlNet"):
        cn.scan_controlnet(tiny_pair[0])
    with pytest.raises(CheckpointError, match="no such file"):
        cn.scan_controlnet(tmp_path / "missing.safetensors")
    odd = tmp_path / "odd.safetensors"  # effnet marker, no metadata config, not the released size
    write_safetensors(odd, {"backbone.0.0.weight": torch.zeros(8, 1, 3, 3), "projections.0.0.weight": torch.zeros(4, 4, 1, 1)})
    with pytest.raises(CheckpointError, match="unknown size"):
        cn.scan_controlnet(odd)


def test_truncated_controlnet_is_refused_before_loading(tmp_path, cnet_files):
    state = tiny.build_tiny_controlnet("canny").state_dict()
    state.pop("projections.1.2.weight")
    path = tmp_path / "cut.safetensors"
    from safetensors import safe_open

    with safe_open(str(cnet_files["canny"]), "pt") as f:
        meta = f.metadata()
    write_safetensors(path, state, meta)
    with pytest.raises(CheckpointError, match="incomplete .*projections.1.2.weight"):
        cn.load_controlnet(cn.scan_controlnet(path))


def test_residual_width_must_fit_the_prior(cnet_files):
    cnet = cn.scan_controlnet(cnet_files["canny"])
    cn.check_fits(cnet, tiny.TINY_PRIOR)
    with pytest.raises(CheckpointError, match="big .*Stage C only"):
        cn.check_fits(cnet, {"block_out_channels": [1536, 1536]})


# --- 2. conditioning ---------------------------------------------------------------------------------------------

def _prior():
    from cascade.models import CascadeUNet

    torch.manual_seed(0)
    return CascadeUNet.from_config(tiny.TINY_PRIOR).eval()


def _prior_inputs(batch: int = 1):
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(batch, 16, 6, 6, generator=g), timestep_ratio=torch.full((batch,), 0.6),
                clip_text_pooled=torch.randn(batch, 1, 32, generator=g), clip_text=torch.randn(batch, 8, 32, generator=g),
                clip_img=torch.zeros(batch, 1, 768))


@torch.no_grad()
def test_residual_enters_before_the_first_resblock_like_adding_it_to_the_embedding():
    """control[0] is added to the first ResBlock's input, which is the embedding's output (Stage C's level-0
    downscaler is the identity): a hook on the embedding is an independent way to compute the same thing."""
    prior, inputs = _prior(), _prior_inputs()
    residual = torch.randn(1, 64, 3, 3)  # smaller than the latent: resized bilinearly, align_corners
    resized = torch.nn.functional.interpolate(residual, size=(6, 6), mode="bilinear", align_corners=True)
    got = prior(**inputs, control=[residual], return_dict=False)[0]
    handle = prior.embedding.register_forward_hook(lambda m, a, out: out + resized)
    try:
        want = prior(**inputs, return_dict=False)[0]
    finally:
        handle.remove()
    plain = prior(**inputs, return_dict=False)[0]
    assert torch.equal(got, want) and not torch.allclose(got, plain)


@torch.no_grad()
def test_every_resblock_call_gets_its_own_residual_and_extra_ones_are_ignored():
    from diffusers.models.unets.unet_stable_cascade import SDCascadeResBlock

    prior, inputs = _prior(), _prior_inputs()
    seen = []
    blocks = [b for lvl in (*prior.down_blocks, *prior.up_blocks) for b in lvl if isinstance(b, SDCascadeResBlock)]
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, a[0].clone()))) for i, b in enumerate(blocks)]
    try:  # these hooks run before the ones forward() adds, so they see each block's input before its residual
        prior(**inputs, control=None)
        plain_inputs = [x for _, x in seen]
        seen.clear()
        control = [None] * 64
        control[3] = torch.ones(1, 64, 6, 6)  # the first up-path ResBlock (after the skip fix-up)
        prior(**inputs, control=control)
    finally:
        for h in hooks:
            h.remove()
    assert [i for i, _ in seen] == list(range(6))
    assert all(torch.equal(a, b) for a, b in zip(plain_inputs[:4], [x for _, x in seen][:4]))
    assert not torch.equal(plain_inputs[4], seen[4][1])  # the residual at call 3 changed what came after it
    zeros = prior(**inputs, control=[torch.zeros(1, 64, 6, 6)] * 64, return_dict=False)[0]
    assert torch.equal(zeros, prior(**inputs, return_dict=False)[0])


def test_strength_scales_the_residuals_linearly(cnet_files):
    model = cn.load_controlnet(cn.scan_controlnet(cnet_files["inpainting"]))
    hint = torch.rand(1, 4, 192, 192)
    one, two, half = (cn.residuals(model, hint, s) for s in (1.0, 2.0, 0.5))
    for a, b, c in zip(one, two, half):
        assert (a is None) == (b is None) == (c is None)
        if a is not None:
            assert torch.equal(b, a * 2) and torch.equal(c, a * 0.5) and a.abs().max() > 0


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.0, 0.5), (0.3, 0.8), (0.5, 0.5)])
def test_start_end_window_by_step_follows_percent_to_sigma(start, end):
    """Step with sigma s is controlled iff sigma(1 - end) <= s <= sigma(1 - start) on the shift-2 schedule
    (start 0 = always from the first step, end 1 = through the last)."""
    from cascade.sampling import sigma_from_t, sigmas_for

    shift = 2.0
    sigmas = [float(s) for s in sigmas_for("ddpm", "sgm_uniform", 20, shift)[:-1]]
    hi = float("inf") if start <= 0 else float(sigma_from_t(1 - start, shift))
    lo = 0.0 if end >= 1 else float(sigma_from_t(1 - end, shift))
    expected = [lo <= s <= hi for s in sigmas]
    control = cn.ActiveControl([torch.ones(1)], *cn.window(start, end, shift))
    assert [control.active(s) for s in sigmas] == expected
    if (start, end) == (0.0, 1.0):
        assert all(expected)
    if 0 < start < end:
        assert not expected[0] and any(expected)
    if start == end:  # an empty window: no step sits exactly on that sigma
        assert not any(expected)


def test_several_controlnets_add_up_and_only_active_ones_count():
    a = cn.ActiveControl([torch.ones(1, 2, 2, 2), None], 1e9, 5.0)
    b = cn.ActiveControl([torch.full((1, 2, 2, 2), 2.0), torch.ones(1, 2, 2, 2)], 10.0, 0.0)
    schedule = cn.ControlSchedule([a, b])
    both = schedule(7.0)
    assert torch.equal(both[0], torch.full((1, 2, 2, 2), 3.0)) and torch.equal(both[1], torch.ones(1, 2, 2, 2))
    only_a = schedule(50.0)
    assert torch.equal(only_a[0], torch.ones(1, 2, 2, 2)) and only_a[1] is None
    assert schedule(1.0)[0][0, 0, 0, 0] == 2.0
    assert cn.ControlSchedule([a])(1.0) is None


class _Recorder(torch.nn.Module):
    """A stand-in UNet that records the control residuals of each call and returns zeros."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x, r, control=None, return_dict=False, **kwargs):
        self.calls.append((x.shape[0], None if control is None else [None if c is None else c.clone() for c in control]))
        return (torch.zeros_like(x),)


@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_cfg_denoiser_gives_both_passes_the_residuals(cfg):
    from cascade.pipeline import cfg_denoiser

    res = [torch.full((1, 3, 2, 2), 0.25), None]
    schedule = cn.ControlSchedule([cn.ActiveControl(res, 1e9, 5.0)])
    unet = _Recorder()
    cond = {"clip_text": torch.zeros(2, 4, 8)}
    uncond = {"clip_text": torch.ones(2, 4, 8)}
    denoise = cfg_denoiser(unet, cond, uncond, cfg, control=schedule)
    x = torch.zeros(2, 16, 4, 4)
    denoise(x, torch.tensor([10.0]))  # inside the window
    denoise(x, torch.tensor([1.0]))  # after its end
    batch, first = unet.calls[0]
    assert batch == (4 if cfg != 1.0 else 2)  # cond + uncond as one batch at CFG != 1
    assert torch.equal(first[0], res[0].expand(batch, 3, 2, 2)) and first[1] is None
    assert unet.calls[-1][1] is None
    assert [n for _, n in schedule.calls] == [1, 0]


# --- request fields -------------------------------------------------------------------------------------------

def _edges(size=(256, 256)) -> Image.Image:
    image = Image.new("RGB", size, "black")
    image.paste((255, 255, 255), (64, 64, 192, 192))
    return image


def test_request_field_validation(cnet_files):
    from cascade.request import build_request

    good = build_request(prompt="x", width=256, height=256, controlnets=[(str(cnet_files["canny"]), _edges(), 0.7, 0.1, 0.9)])
    assert cn.as_entry(good.controlnets[0]).strength == 0.7
    bad = [((str(cnet_files["canny"]), _edges(), 11.0), "strength 11.0"),
           ((str(cnet_files["canny"]), _edges(), 1.0, 0.8, 0.2), "start 0.8 is after its end"),
           ((str(cnet_files["canny"]), "edges.png"), "must be a PIL image"),
           (("", _edges()), "no file name"),
           ((str(cnet_files["canny"]), _edges(), 1.0, -0.1, 1.0), "start -0.1")]
    for entry, message in bad:
        with pytest.raises(InvalidRequestError, match=message):
            build_request(prompt="x", width=256, height=256, controlnets=[entry])


def test_json_bodies_cannot_set_controlnets():
    from cascade.api_fields import json_fields

    assert "controlnets" not in json_fields()


# --- 3. preprocessing ------------------------------------------------------------------------------------------

def test_canny_finds_the_square_outline_only():
    edges = cn.canny_edges(_edges(), 0.4, 0.8)
    assert edges.mode == "L" and edges.size == (256, 256)
    import numpy as np

    e = torch.from_numpy(np.asarray(edges, dtype=np.float32)) / 255
    assert set(e.unique().tolist()) <= {0.0, 1.0}
    ring = torch.zeros(256, 256, dtype=torch.bool)
    ring[60:197, 60:197] = True
    ring[68:188, 68:188] = False
    assert e[~ring].sum() == 0  # flat regions (inside, outside) have no edges
    for row in (100, 128, 150):  # each side of the square is found (one thin line after non-maximum suppression)
        assert 1 <= e[row, 60:68].sum() <= 2 and 1 <= e[row, 188:197].sum() <= 2
    faint = Image.new("RGB", (256, 256), (100, 100, 100))
    faint.paste((130, 130, 130), (64, 64, 192, 192))
    assert cn.canny_tensor(cn.images_tensor(faint), 0.4, 0.8).sum() == 0  # below the low threshold
    assert cn.canny_tensor(cn.images_tensor(faint), 0.05, 0.1).sum() > 0
    with pytest.raises(Exception, match="thresholds"):
        cn.canny_edges(_edges(), 0.9, 0.2)


def test_inpaint_hint_is_white_where_masked_plus_the_mask():
    image = torch.rand(1, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:6] = 1
    hint = cn.inpaint_hint(image, mask)
    assert hint.shape == (1, 4, 8, 8) and torch.equal(hint[:, 3:], mask)
    assert torch.all(hint[:, :3, 2:5, 3:6] == 1) and torch.equal(hint[:, :3, 0], image[:, :, 0])
    entry = cn.ControlEntry("x", Image.new("RGB", (64, 32), "red"), mask=Image.new("L", (32, 16), 255))
    assert torch.all(cn.pixel_hint(entry, 4)[:, 3] == 1)  # the mask is resized to the image
    with pytest.raises(Exception, match="needs a mask"):
        cn.pixel_hint(cn.ControlEntry("x", _edges()), 4)
    with pytest.raises(Exception, match="only the inpainting one takes a mask"):
        cn.pixel_hint(entry, 1)


def test_hint_sizes_and_super_resolution_crop():
    assert cn.hint_size((24, 25), "effnet") == (768, 800)  # latent x 32
    assert cn.hint_size((24, 25), "large") == (24, 32)  # latent x 1, rounded up to multiples of 8
    pixels = cn.sr_pixels(cn.ControlEntry("x", Image.new("RGB", (100, 70), "white")))
    assert pixels.shape == (1, 3, 64, 96) and torch.all(pixels == 1)  # centre crop to x32, in [-1, 1]
    grey = cn.fit_hint(torch.rand(1, 3, 50, 70), (6, 6), "effnet", 1)
    assert grey.shape == (1, 1, 192, 192)  # the channel mean for a 1-channel ControlNet
    with pytest.raises(Exception, match="4 input channels"):
        cn.fit_hint(torch.rand(1, 3, 50, 70), (6, 6), "effnet", 4)


# --- the pipeline end to end -----------------------------------------------------------------------------------

def _request(cnets, **more):
    from cascade.request import build_request

    return build_request(prompt="a cat", width=256, height=256, seed=5, prior_steps=4, decoder_steps=1,
                         controlnets=cnets, **more)


def test_pipeline_strength_zero_is_no_controlnet_and_strength_changes_the_image(tiny_pipeline, cnet_files):
    canny = str(cnet_files["canny"])
    plain = tiny_pipeline.generate(_request([])).images
    zero = tiny_pipeline.generate(_request([(canny, _edges(), 0.0)])).images
    assert torch.equal(plain, zero)
    strong = tiny_pipeline.generate(_request([(canny, _edges(), 0.5)])).images
    assert not torch.equal(plain, strong)
    # a window that closes before the first step (end 0) is no ControlNet either
    closed = tiny_pipeline.generate(_request([(canny, _edges(), 0.5, 0.0, 0.0)])).images
    assert torch.equal(plain, closed)


def test_pipeline_runs_every_type(tiny_pipeline, cnet_files):
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (0, 0, 128, 256))
    entries = [(str(cnet_files["inpainting"]), _edges(), 0.5, 0.0, 1.0, mask),
               (str(cnet_files["super-resolution"]), Image.new("RGB", (128, 128), "grey"), 0.5)]
    plain = tiny_pipeline.generate(_request([])).images
    for entry in entries:
        out = tiny_pipeline.generate(_request([entry])).images
        assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_pipeline_refuses_unfit_files_before_work(tiny_pipeline, tmp_path, cnet_files):
    big = tmp_path / "wide.safetensors"
    state = tiny.build_tiny_controlnet("canny").state_dict()
    import json

    config = {**tiny.TINY_CONTROLNETS["canny"], "c_proj": 48}
    for i in range(4):
        state[f"projections.{i}.2.weight"] = torch.zeros(48, config["embed"], 1, 1)
    write_safetensors(big, state, {"cascade.config.controlnet": json.dumps(config)})
    with pytest.raises(CheckpointError, match="48 wide but this Stage C is 64 wide"):
        tiny_pipeline.generate(_request([(str(big), _edges(), 1.0)]))


def test_planner_counts_controlnet_weights_and_residuals(cnet_files):
    request = _request([(str(cnet_files["canny"]), _edges(), 1.0)])
    extras = cn.planner_extras(request)
    cnet = cn.scan_controlnet(cnet_files["canny"])
    kept = len(tiny.TINY_CONTROLNETS["canny"]["proj_blocks"]) * 64 * 6 * 6 * 4  # fp32 residuals at the latent size
    assert extras["prior"] > cnet.nbytes + kept  # weights, their activations and the kept residuals
    assert cn.planner_extras(_request([(str(cnet_files["canny"]), _edges(), 0.0)])) == {}
    two = cn.planner_extras(_request([(str(cnet_files["canny"]), _edges(), 1.0)] * 2))
    assert two["prior"] == extras["prior"] + kept  # they run one after another: one peak, both residuals kept


# --- 4. command line ------------------------------------------------------------------------------------------

def test_spec_parsing():
    assert cn.parse_spec("c.safetensors:e.png") == ("c.safetensors", "e.png", None, 1.0, 0.0, 1.0, None)
    assert cn.parse_spec("c.safetensors:e.png:0.6") == ("c.safetensors", "e.png", None, 0.6, 0.0, 1.0, None)
    assert cn.parse_spec("C:\\m\\c.safetensors:D:/i/e.png:0.5:0.1:0.9")[:6] == (
        "C:\\m\\c.safetensors", "D:/i/e.png", None, 0.5, 0.1, 0.9)
    assert cn.parse_spec("i.safetensors:p.png,m.png:1:0:0.5")[1:3] == ("p.png", "m.png")
    assert cn.parse_spec("c.safetensors:canny=p.png")[6] == cn.CANNY_THRESHOLDS
    assert cn.parse_spec("c.safetensors:canny@0.2,0.5=p.png")[1::5] == ("p.png", (0.2, 0.5))
    for bad, message in (("c.safetensors", "expected a file, an image"), ("c.safetensors:e.png:x", "not a number"),
                         ("c.safetensors:e.png:1:0", "expected a file"), ("c.safetensors:canny@a=p.png", "thresholds")):
        with pytest.raises(InvalidRequestError, match=message):
            cn.parse_spec(bad)


def test_cli_generates_with_two_stacked_controlnets_on_the_tiny_model(tmp_path, cnet_files, capsys):
    """No --prior: the embedded tiny model; canny edges computed from a photo, plus an inpainting ControlNet."""
    from cascade.cli import main
    from cascade.infotext import parse_infotext

    photo, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    _edges().save(photo)
    Image.new("L", (256, 256), 255).save(mask)
    out = tmp_path / "out.png"
    code = main(["generate", "a cat", "--out", str(out), "--width", "256", "--height", "256", "--seed", "2",
                 "--steps", "3", "--decoder-steps", "1", "--device", "cpu", "--quiet",
                 "--controlnet", f"{cnet_files['canny']}:canny=" + str(photo) + ":0.8:0:0.5",
                 "--controlnet", f"{cnet_files['inpainting']}:{photo},{mask}:0.4"])
    assert code == 0, capsys.readouterr().err
    params = parse_infotext(Image.open(out).text["parameters"])
    assert params["ControlNet"] == "tiny_canny 0.8 0-0.5; tiny_inpainting 0.4 0-1"


def test_cli_super_resolution_doubles_its_image_unless_a_size_is_typed(tmp_path, cnet_files, capsys):
    """ComfyUI's StableCascade_SuperResolutionControlnet: the output is twice the input (Stage C latent = input // 16,
    i.e. compression 32 of the output); the input is cropped to multiples of 64 so the output is one of 128."""
    from cascade.cli import main
    from cascade.infotext import parse_infotext

    small = tmp_path / "small.png"
    Image.new("RGB", (140, 70), (90, 140, 200)).save(small)
    base = ["generate", "x", "--steps", "2", "--decoder-steps", "1", "--device", "cpu", "--quiet", "--controlnet",
            f"{cnet_files['super-resolution']}:{small}"]
    assert main([*base, "--out", str(tmp_path / "sr.png")]) == 0, capsys.readouterr().err
    image = Image.open(tmp_path / "sr.png")
    assert image.size == (256, 128) and parse_infotext(image.text["parameters"])["Compression"] == "32"
    assert main([*base, "--width", "384", "--out", str(tmp_path / "typed.png")]) == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "typed.png").size == (384, 128)


@pytest.mark.parametrize("spec,message", [
    ("{missing}:{photo}", "no such file"),
    ("{sd15}:{photo}", "ControlNet for Stable Diffusion"),
    ("{canny}:{photo}:12", "strength 12"),
    ("{canny}:{photo}:1:0.9:0.1", "start 0.9 is after its end"),
    ("{canny}:{nophoto}", "nophoto"),
    ("{canny}", "the form is"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, cnet_files, capsys, spec, message):
    from cascade.cli import main

    photo = tmp_path / "photo.png"
    _edges().save(photo)
    sd15 = tmp_path / "sd15_canny.safetensors"
    write_safetensors(sd15, {"control_model.zero_convs.0.0.weight": torch.zeros(4, 4, 1, 1)})
    text = spec.format(missing=tmp_path / "missing.safetensors", photo=photo, sd15=sd15, canny=cnet_files["canny"],
                       nophoto=tmp_path / "nophoto.png")
    out = tmp_path / "out.png"
    code = main(["generate", "x", "--out", str(out), "--width", "256", "--height", "256", "--device", "cpu",
                 "--quiet", "--controlnet", text])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and not out.exists()


def test_side_parts_planner_extras_include_controlnets(tiny_pipeline, cnet_files):
    request = _request([(str(cnet_files["canny"]), _edges(), 1.0)])
    with_cnet = tiny_pipeline.side.planner_extras(request)
    without = tiny_pipeline.side.planner_extras(_request([]))
    assert with_cnet["prior"] - without.get("prior", 0) == cn.planner_extras(request)["prior"]


def test_full_size_stage_c_has_the_64_resblock_calls_the_projections_index():
    """proj_blocks reach 63: the big Stage C must make 64 ResBlock calls (32 down, 32 up), each one taking a
    residual of the official ControlNet's shape (meta device: shapes only, no memory)."""
    from diffusers.models.unets.unet_stable_cascade import SDCascadeResBlock

    from cascade import configs
    from cascade.models import CascadeUNet

    with torch.device("meta"):
        prior = CascadeUNet.from_config(configs.PRIOR).eval()
        net = StageCControlNet(official_config("effnet", 1)).eval()
        res = net(torch.zeros(1, 1, *cn.hint_size((24, 24), "effnet")))
        calls = []
        blocks = [b for lvl in (*prior.down_blocks, *prior.up_blocks) for b in lvl if isinstance(b, SDCascadeResBlock)]
        hooks = [b.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1])) for b in blocks]
        try:
            out = prior(torch.zeros(2, 16, 24, 24), torch.zeros(2), torch.zeros(2, 1, 1280), torch.zeros(2, 77, 1280),
                        torch.zeros(2, 1, 768), control=cn.expand(res, 2), return_dict=False)[0]
        finally:
            for h in hooks:
                h.remove()
    assert len(calls) == 64 and max(PROJ_BLOCKS) == len(calls) - 1 and set(calls) == {2048}
    assert tuple(out.shape) == (2, 16, 24, 24)
