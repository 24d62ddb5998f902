"""Malformed and hostile checkpoint files (issue 10): each gets one clear error type, nothing allocates more than
the file holds, nothing prints raw escape sequences, nothing escapes its folder, nothing dies of SIGBUS."""

from __future__ import annotations

import json
import os
import shutil
import struct
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cascade import configs, tiny
from cascade.checkpoints import STAGE_A, TEXT_ENCODER, describe, printable, scan
from cascade.errors import (
    CheckpointError,
    CorruptFileError,
    HeaderError,
    MissingComponentError,
    PickleRefusedError,
)
from cascade.keymaps import unet_keymap
from cascade.loader import check_part, instantiate, load_part
from cascade.tensorfile import MAX_HEADER_BYTES, TensorReader, read_header, write_safetensors

from tests._bounded import MEMORY_BOUND, run_bounded

OK = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _write(path: Path, header=None, *, raw: bytes | None = None, data: int = 8, length: int | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + b"\0" * data)
    return path


def _entry(**fields) -> dict:
    return {"t": {**OK, **fields}}


# --- the header reader: every malformed header is a HeaderError naming the field or byte at fault ---------------

HEADER_CASES = {
    # name: (header object or raw JSON bytes, expected HeaderError.field, words of the message)
    "dtype_list": (_entry(dtype=["F32"]), "t.dtype", "dtype must be a string"),
    "dtype_unknown": (_entry(dtype="F128"), "t.dtype", "not supported"),
    "dtype_missing": ({"t": {"shape": [2], "data_offsets": [0, 8]}}, "t.dtype", "dtype must be a string"),
    "metadata_list": ({"__metadata__": [1, 2], "t": OK}, "__metadata__", "object of string values"),
    "metadata_string": ({"__metadata__": "x", "t": OK}, "__metadata__", "object of string values"),
    "metadata_number_value": ({"__metadata__": {"a": 1}, "t": OK}, "__metadata__", "object of string values"),
    "offsets_letters": (_entry(data_offsets=["a", 8]), "t.data_offsets", "two integers"),
    "offsets_nulls": (_entry(data_offsets=[None, None]), "t.data_offsets", "two integers"),
    "offsets_null": (_entry(data_offsets=None), "t.data_offsets", "two integers"),
    "offsets_string": (_entry(data_offsets="0,8"), "t.data_offsets", "two integers"),
    "offsets_floats": (_entry(data_offsets=[0.0, 8.0]), "t.data_offsets", "two integers"),
    "offsets_bools": (_entry(data_offsets=[False, True]), "t.data_offsets", "two integers"),
    "offsets_three": (_entry(data_offsets=[0, 4, 8]), "t.data_offsets", "two integers"),
    "offsets_nan": (b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[NaN,8]}}', "header", "NaN"),
    "offsets_inf": (b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,Infinity]}}', "header", "Infinity"),
    "offsets_reversed": (_entry(data_offsets=[8, 0]), "t.data_offsets", "reversed"),
    "offsets_negative": (_entry(data_offsets=[-8, 0]), "t.data_offsets", "negative"),
    "offsets_wrong_size": (_entry(data_offsets=[0, 4]), "t.data_offsets", "needs 8"),
    "shape_negative": (_entry(shape=[-64], data_offsets=[256, 0]), "t.shape", "dimension -64"),
    "shape_both_negative": (_entry(shape=[-2, -1], data_offsets=[0, 8]), "t.shape", "dimension -2"),
    "shape_inf": (b'{"t":{"dtype":"F32","shape":[-Infinity],"data_offsets":[0,8]}}', "header", "-Infinity"),
    "shape_5000_digits": (b'{"t":{"dtype":"F32","shape":[' + b"7" * 5000 + b'],"data_offsets":[0,8]}}', "header",
                          "5000 digits"),
    "shape_huge_zero_size": (_entry(shape=[0, 1 << 60], data_offsets=[0, 0]), "t.shape", "2**48"),
    "shape_float": (_entry(shape=[2.0]), "t.shape", "dimension 2.0"),
    "shape_string": (_entry(shape="2"), "t.shape", "list of at most 8"),
    "shape_bool": (_entry(shape=[True, True]), "t.shape", "dimension true"),
    "shape_rank_100": (_entry(shape=[1] * 99 + [2]), "t.shape", "100 dimensions"),
    "entry_number": ({"t": 5}, "t.entry", "must be an object"),
    "entry_list": ({"t": [1]}, "t.entry", "must be an object"),
    "nested_1e5": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "header", "nested too deeply"),
    "duplicate_tensor": (b'{"t":' + json.dumps(OK).encode() + b',"t":' + json.dumps(OK).encode() + b"}", "header",
                         "appears twice"),
    "overlap": ({"a": OK, "b": {**OK, "shape": [1], "data_offsets": [4, 8]}}, "b.data_offsets", "overlap"),
    "not_an_object": (b"[1, 2, 3]", "header", "does not start with '{'"),
    "trailing_garbage": (b"{} trailing", "header", "Extra data"),
    "bad_utf8": (b'{"t\xff": 1}', "header", "invalid UTF-8"),
    "bad_json": (b'{"t": {"dtype": }', "header", "invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_header_is_one_error_type(tmp_path, case):
    header, field, words = HEADER_CASES[case]
    path = tmp_path / f"{case}.safetensors"
    _write(path, raw=header) if isinstance(header, bytes) else _write(path, header)
    with pytest.raises(HeaderError) as info:
        scan(path)
    err = info.value
    message = str(err)
    assert err.field == field, message
    assert words in message
    assert message.startswith(f"{case}.safetensors: ") and "\n" not in message
    assert "download it again" in message  # says what to do
    if field != "header" or "JSON" in words or "UTF-8" in words:
        assert err.offset is not None and f"byte {err.offset}" in message  # where it is


def test_header_length_and_bound(tmp_path):
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(HeaderError, match=r"only 3 bytes"):
        read_header(tmp_path / "tiny.safetensors")
    with pytest.raises(HeaderError, match=r"header length 99999 \(bytes 0-7\) does not fit"):
        read_header(_write(tmp_path / "long.safetensors", OK, length=99_999))
    # A header just over the bound is refused before it is read: the file is sparse, reading it would cost 16 MiB.
    big = tmp_path / "big_header.safetensors"
    with open(big, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{")
        f.truncate(8 + MAX_HEADER_BYTES + 64)
    start = time.perf_counter()
    with pytest.raises(HeaderError, match=r"at most 16 MiB") as info:
        read_header(big)
    assert info.value.field == "length" and time.perf_counter() - start < 1.0


def test_sparse_file_declaring_more_than_it_holds(tmp_path):
    """A 1 GiB tensor declared in a file that is 1 GiB long but holds only a few bytes (a sparse or preallocated
    download) is refused from the header, before any tensor is read."""
    n = 1 << 28  # F32 elements: 1 GiB
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + b"\1" * 4096)
        f.truncate(8 + len(header) + 4 * n)
    assert os.stat(path).st_blocks * 512 < 1 << 20  # really sparse here
    with pytest.raises(CorruptFileError, match=r"never written .*sparse"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\1" * 4096)
    with pytest.raises(CorruptFileError, match=r"truncated"):
        read_header(path)


def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(HeaderError, match="not a regular file"):
        read_header(fifo)  # opening a FIFO for reading would block forever
    dev = tmp_path / "null.safetensors"
    dev.symlink_to("/dev/null")
    with pytest.raises(HeaderError, match="not a regular file"):
        read_header(dev)
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "absent.safetensors")


def test_pickle_magic_only_counts_when_the_header_does_not_fit(tmp_path):
    """A real header whose length happens to start with byte 0x80 is not a pickle."""
    body = json.dumps({"t": OK, "__metadata__": {"pad": ""}}).encode()
    body = body.replace(b'"pad": ""', b'"pad": "' + b"x" * (0x180 - len(body)) + b'"')
    assert len(body) == 0x180
    path = _write(tmp_path / "x80.safetensors", raw=body)
    assert path.read_bytes()[:1] == b"\x80"
    assert read_header(path).tensors["t"].shape == (2,)
    path.write_bytes(b"\x80\x02" + b"\0" * 64)
    with pytest.raises(PickleRefusedError):
        read_header(path)


# --- names with escape sequences -----------------------------------------------------------------------------------


def test_printable_escapes_terminal_sequences():
    assert printable("plain.name-1") == "plain.name-1"
    assert printable("\x1b[31mred\x1b]0;title\x07") == "\\x1b[31mred\\x1b]0;title\\x07"
    assert printable("a\nb\rc\td\x00") == "a\\x0ab\\x0dc\\x09d\\x00"
    assert printable("evil\u202etxt.exe\u200b") == "evil\\u202etxt.exe\\u200b"  # bidi override, zero width
    assert printable("\ud800x") == "\\ud800x"  # a lone surrogate (undecodable file name) cannot break an encoder
    assert printable("é日本") == "é日本"
    long = printable("x" * 1000, 10)
    assert long == "x" * 10 + "...(+990 chars)"


def test_escape_sequences_never_reach_messages_or_inspect(tmp_path, tiny_models, capsys):
    evil = "\x1b[2J\x1b]0;pwned\x07"
    bad = _write(tmp_path / "esc_bad.safetensors", {evil: {**OK, "dtype": [1]}})
    with pytest.raises(HeaderError) as info:
        scan(bad)
    assert "\x1b" not in str(info.value) and "\\x1b[2J" in str(info.value)
    sd = dict(tiny_models.state_dicts()[STAGE_A])
    sd[evil + "extra"] = torch.zeros(2)  # no dot: claimed by no part, listed as unknown
    good = tmp_path / "esc_good.safetensors"
    write_safetensors(good, sd, tiny._metadata(STAGE_A))
    from cascade.cli import main

    assert main(["inspect", str(good), str(bad)]) == 2
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J" in out and "unknown tensors: 1" in out
    assert sum("ERROR" in line for line in out.splitlines()) == 1


# --- configs embedded in metadata, and sizes checked before anything is allocated ----------------------------------


def _stage_a_file(path: Path, tiny_models, config_json: str) -> Path:
    write_safetensors(path, tiny_models.state_dicts()[STAGE_A], {"cascade.config.stage_a": config_json})
    return path


@pytest.mark.parametrize("raw, words", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object, got list"),
    ('"a string"', "must be a JSON object, got str"),
    ("[" * 50_000, "nested too deeply"),
    (json.dumps({**tiny.TINY_STAGE_A, "scale_factor": float("nan")}), "NaN"),
    (json.dumps({**tiny.TINY_STAGE_A, "embed_dim": "32"}), "embed_dim must be an integer"),
    (json.dumps({**tiny.TINY_STAGE_A, "embed_dim": 10 ** 12}), "embed_dim must be between"),
    (json.dumps({**tiny.TINY_STAGE_A, "levels": -1}), "levels must be between"),
    (json.dumps({**tiny.TINY_STAGE_A, "bottleneck_blocks": True}), "bottleneck_blocks must be an integer"),
    (json.dumps({**tiny.TINY_STAGE_A, "evil": 1}), "unknown config key"),
])
def test_metadata_config_is_validated(tmp_path, tiny_models, raw, words):
    path = _stage_a_file(tmp_path / "cfg.safetensors", tiny_models, raw)
    with pytest.raises(HeaderError, match="cascade.config.stage_a") as info:
        scan(path)
    assert words in str(info.value) and info.value.field == "cascade.config.stage_a"


def test_config_problem_covers_every_kind():
    assert all(configs.config_problem(kind, cfg) is None for kind, cfg in tiny.TINY_CONFIGS.items()
               if kind in ("prior", "decoder", "text_encoder", "stage_a"))
    assert all(configs.config_problem(kind, configs.unet_config(kind, v)) is None
               for kind in ("prior", "decoder") for v in ("big", "lite"))
    bad = {
        ("prior", "block_out_channels"): [200_000, 2048],
        ("prior", "num_attention_heads"): [3, 32],  # does not divide 2048
        ("prior", "down_num_layers_per_block"): [8],  # one per level
        ("prior", "block_types_per_layer"): [["SDCascadeResBlock", "os.system"], ["SDCascadeResBlock"]],
        ("prior", "timestep_conditioning_type"): ["sca", "mapper.evil"],
        ("prior", "dropout"): [0.1, float("inf")],
        ("decoder", "effnet_in_channels"): -16,
        ("text_encoder", "hidden_size"): 1 << 40,
        ("text_encoder", "max_position_embeddings"): 10 ** 9,
        ("text_encoder", "hidden_act"): "__import__",
        ("stage_a", "embed_dim"): 33,  # not divisible by 2**(levels-1)
    }
    base = {"prior": configs.PRIOR, "decoder": configs.DECODER, "text_encoder": configs.CLIP_G, "stage_a": configs.STAGE_A}
    for (kind, key), value in bad.items():
        problem = configs.config_problem(kind, {**base[kind], key: value})
        assert problem and key in problem, (kind, key, problem)
    with pytest.raises(CheckpointError, match="block_out_channels"):
        instantiate("prior", {**configs.PRIOR, "block_out_channels": [200_000, 2048]})


def test_config_asking_for_more_than_the_file_holds_is_refused_before_loading(tmp_path, tiny_models):
    """A tiny file whose (valid-looking) config describes a bigger model than its tensors: refused from the header."""
    cfg = {**tiny.TINY_STAGE_A, "embed_dim": 16384, "latent_channels": 1024, "num_vq_embeddings": 1 << 20}
    part = scan(_stage_a_file(tmp_path / "big_cfg.safetensors", tiny_models, json.dumps(cfg))).parts[STAGE_A]
    with pytest.raises(CheckpointError, match=r"has shape .* in the file but the stage_a model expects"):
        check_part(part)
    with pytest.raises(CheckpointError, match=r"model expects"):
        load_part(part, dtype=torch.float32)


def test_negative_parameter_counts_impossible(tmp_path):
    """Shapes are non-negative by construction, so `inspect` counts (parameters, bytes) are too."""
    path = _write(tmp_path / "neg.safetensors", {"clip_txt_mapper.weight": {"dtype": "F32", "shape": [-2, -1],
                                                                           "data_offsets": [0, 8]}})
    with pytest.raises(HeaderError, match="dimension -2"):
        scan(path)


def test_zero_dim_marker_tensor_does_not_crash_classification(tmp_path):
    path = _write(tmp_path / "zero_dim.safetensors", {"clip_txt_mapper.weight": {"dtype": "F32", "shape": [],
                                                                                "data_offsets": [0, 4]}})
    with pytest.raises(CheckpointError, match="no known size"):
        scan(path)


def test_keymap_survives_a_key_with_the_marker_twice():
    key = "down_blocks.0.attention.attn.in_proj_x.attention.attn.in_proj_weight"
    assert len(unet_keymap([key], "", "prior")) == 3


# --- diffusers folders: shards stay inside their folder ------------------------------------------------------------


@pytest.fixture()
def vqgan_folder(tmp_path, tiny_models):
    """A diffusers `vqgan` component folder whose weights are split into two shards with an index."""
    folder = tmp_path / "vqgan"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "PaellaVQModel", **tiny.TINY_STAGE_A}))
    sd = tiny_models.state_dicts()[STAGE_A]
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, members in shards.items():
        write_safetensors(folder / name, {k: sd[k] for k in members})
    weight_map = {k: name for name, members in shards.items() for k in members}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _set_index(folder: Path, mapping) -> None:
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(mapping))


def test_sharded_folder_loads(vqgan_folder):
    part = scan(vqgan_folder).parts[STAGE_A]
    assert len(part.headers) == 2
    load_part(part, dtype=torch.float32)


@pytest.mark.parametrize("shard, words", [
    ("ABSOLUTE", "outside the folder"),
    ("../outside.safetensors", "outside the folder"),
    ("sub/../../outside.safetensors", "outside the folder"),
    ("link.safetensors", "symbolic link"),
    ("linked_dir/outside.safetensors", "symbolic link"),
    ("C:/Windows/outside.safetensors", "outside the folder"),
    ("..\\outside.safetensors", "outside the folder"),
    (7, "not a file name"),
])
def test_shard_index_cannot_leave_its_folder(vqgan_folder, shard, words):
    outside = vqgan_folder.parent / "outside.safetensors"
    shutil.copy(vqgan_folder / "diffusion_pytorch_model-00001-of-00002.safetensors", outside)
    (vqgan_folder / "link.safetensors").symlink_to(outside)
    (vqgan_folder / "linked_dir").symlink_to(vqgan_folder.parent)
    _set_index(vqgan_folder, {"weight_map": {"a": str(outside) if shard == "ABSOLUTE" else shard}})
    with pytest.raises(CorruptFileError, match=words):
        scan(vqgan_folder)


def test_shard_links_into_a_hugging_face_blob_store_are_allowed(vqgan_folder, tmp_path):
    """The HF cache (SD.Next's Diffusers folder) stores every file as a link into <repo>/blobs/."""
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "0123abc" / "vqgan"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in vqgan_folder.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../..") / "blobs" / blob.name)
    assert len(scan(snapshot).parts[STAGE_A].headers) == 2


@pytest.mark.parametrize("index, error, words", [
    ("{not json", CorruptFileError, "invalid JSON"),
    ("[]", CorruptFileError, "not a shard index"),
    ('{"weight_map": []}', CorruptFileError, "not a shard index"),
    ('{"weight_map": {"a": "missing.safetensors"}}', MissingComponentError, "missing"),
    ("[" * 100_000, CorruptFileError, "nested too deeply"),
])
def test_malformed_shard_index(vqgan_folder, index, error, words):
    (vqgan_folder / "diffusion_pytorch_model.safetensors.index.json").write_text(index)
    with pytest.raises(error, match=words):
        scan(vqgan_folder)


@pytest.mark.parametrize("config, words", [
    ("{bad", "invalid JSON"),
    (json.dumps([1]), "must be a JSON object"),
    (json.dumps({**tiny.TINY_STAGE_A, "embed_dim": -3}), "embed_dim"),
])
def test_diffusers_config_json_is_validated(vqgan_folder, config, words):
    (vqgan_folder / "config.json").write_text(config)
    with pytest.raises(CorruptFileError, match=words):
        scan(vqgan_folder)


# --- reading tensors: regular reads, re-validated, never SIGBUS ----------------------------------------------------


def test_parallel_reads_return_the_exact_tensor(tmp_path):
    """Tensors over 16 MiB are read by several threads; the result must be bit-identical, converted or not."""
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(5 << 20, generator=gen).to(torch.bfloat16)  # 10 MiB... x2 below
    tensors = {"big": torch.cat([big, big.flip(0)]).reshape(-1, 1024), "small": torch.arange(7, dtype=torch.int64),
               "flag": torch.tensor([True, False]), "scalar": torch.tensor(3.5)}
    path = tmp_path / "read.safetensors"
    write_safetensors(path, tensors)
    header = read_header(path)
    with TensorReader(header) as reader:
        for name, ref in tensors.items():
            assert torch.equal(reader.get(name), ref)
        assert torch.equal(reader.get("big", torch.float32), tensors["big"].float())
    assert not list(tmp_path.glob("*.partial"))


SIGBUS_PROBE = textwrap.dedent("""
    import os, sys, torch
    from cascade import tiny
    from cascade.checkpoints import STAGE_A, scan
    from cascade.errors import CorruptFileError
    from cascade.loader import load_part
    from cascade.tensorfile import TensorReader
    path = sys.argv[0] if False else os.environ["PROBE_FILE"]
    part = scan(path).parts[STAGE_A]                    # header read and validated
    size = os.path.getsize(path)
    os.truncate(path, size // 2)                        # the file shrinks before the tensors are read
    try:
        load_part(part, dtype=torch.float32)
        print("LOADED")
    except CorruptFileError as e:
        print("REFUSED-BEFORE:", e)
    os.truncate(path, size)                             # ...and while a reader is open, between two tensors
    header = part.headers[0]
    keys = sorted(header.tensors, key=lambda k: header.tensors[k].start)
    with TensorReader(header) as reader:
        reader.get(keys[0])
        os.truncate(path, header.tensors[keys[-1]].start)
        try:
            reader.get(keys[-1])
            print("READ")
        except CorruptFileError as e:
            print("REFUSED-DURING:", e)
    print("ALIVE")
""")


def test_file_truncated_after_its_header_was_read_is_an_error_not_sigbus(tmp_path, tiny_models):
    path = tiny.write_stage_a(tmp_path / "stage_a.safetensors", tiny_models)
    result = run_bounded(SIGBUS_PROBE, timeout=120, env={"PROBE_FILE": str(path)})
    assert result.returncode == 0, result.stderr[-2000:]  # -7 would be SIGBUS
    out = result.stdout
    assert "REFUSED-BEFORE: stage_a.safetensors: the file changed while it was being loaded" in out
    assert "REFUSED-DURING:" in out and "ALIVE" in out and "LOADED" not in out and "READ\n" not in out


HUGE_CONFIG_PROBE = textwrap.dedent("""
    import json, os, resource, torch
    from cascade import tiny
    from cascade.checkpoints import STAGE_A, TEXT_ENCODER, scan
    from cascade.errors import CheckpointError
    from cascade.loader import load_part
    from cascade.tensorfile import write_safetensors
    folder = os.environ["PROBE_DIR"]
    models = tiny.build_tiny_models()
    sd = models.state_dicts()
    cases = {
        # ~160 GB of fp32 weights asked for by a 20 MB-at-most file: a 1M x 16384 embedding plus 32k-wide layers
        TEXT_ENCODER: {**tiny.TINY_TEXT_ENCODER, "vocab_size": 1 << 20, "hidden_size": 16384,
                       "intermediate_size": 65536, "projection_dim": 16384, "num_attention_heads": 16},
        STAGE_A: {**tiny.TINY_STAGE_A, "embed_dim": 16384, "latent_channels": 1024, "num_vq_embeddings": 1 << 20},
    }
    for kind, cfg in cases.items():
        path = os.path.join(folder, kind + ".safetensors")
        tensors = tiny._text_encoder_tensors(sd[kind], "", torch.float16, "linear") if kind == TEXT_ENCODER else sd[kind]
        write_safetensors(path, tensors, {"cascade.config." + kind: json.dumps(cfg)})
        try:
            load_part(scan(path).parts[kind], dtype=torch.float32)
            print(kind, "LOADED")
        except CheckpointError as e:
            print(kind, "REFUSED", str(e)[:120])
    print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def test_huge_metadata_config_never_allocates(tmp_path):
    """Run under a 4 GiB address-space limit: building what the config asks for would fail with an allocation
    error (not a CheckpointError), so refusing it from the header is the only way to pass."""
    result = run_bounded(HUGE_CONFIG_PROBE, timeout=180, env={"PROBE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert f"{TEXT_ENCODER} REFUSED" in result.stdout and f"{STAGE_A} REFUSED" in result.stdout, result.stdout
    peak = int(next(l for l in lines if l.startswith("MAXRSS")).split()[1])
    assert peak < MEMORY_BOUND // 2


# --- the SD.Next folder scan: a bad file is a problem with its reason, never an exception --------------------------


def test_library_lists_bad_files_as_problems(tmp_path, tiny_pair):
    from extension import library

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "m_main.safetensors").symlink_to(tiny_pair[0])
    (folder / "m_decoder.safetensors").symlink_to(tiny_pair[1])
    _write(folder / "dtype_list.safetensors", _entry(dtype=["F32"]))
    _write(folder / "deep.safetensors", raw=b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    _write(folder / "neg.safetensors", _entry(shape=[-64], data_offsets=[256, 0]))
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    (folder / "linked_secret.safetensors").symlink_to(secret)
    (folder / "dangling.safetensors").symlink_to(tmp_path / "gone.safetensors")
    os.mkfifo(folder / "fifo.safetensors")
    (folder / "\x1b[31mred.safetensors").write_bytes(b"garbage")
    (folder / "m_main.cascade.json").write_text("[" * 60_000)  # under the 64 KiB sidecar bound
    lib = library.scan_library(folder)
    assert [p.name for p in lib.pairs] == ["m_main"]
    by_file = {f.path.name: f.error for f in lib.files if f.error}
    assert set(by_file) == {"dtype_list.safetensors", "deep.safetensors", "neg.safetensors", "linked_secret.safetensors",
                            "dangling.safetensors", "fifo.safetensors", "\x1b[31mred.safetensors"}
    for name, error in by_file.items():
        assert name not in error and printable(name) not in error  # the listing names the file once
        assert "\n" not in error and "\x1b" not in error
    assert by_file["linked_secret.safetensors"] == "Not a safetensors file."  # no size, no first bytes
    assert by_file["dangling.safetensors"].startswith("A broken link")
    assert "dtype must be a string" in by_file["dtype_list.safetensors"]
    assert "nested too deeply" in by_file["deep.safetensors"]
    assert "not a regular file" in by_file["fifo.safetensors"].lower()
    assert any("m_main.cascade.json: not a valid sidecar (JSON nested too deeply)" in p for p in lib.problems)
    assert any(p.startswith("\\x1b[31mred.safetensors: ") for p in lib.problems)
    body = json.dumps(lib.as_json(), ensure_ascii=False).encode("utf-8")  # what the route sends
    assert b"hunter2" not in body and b"\x1b" not in body


def test_library_survives_an_unexpected_bug_in_classification(tmp_path, monkeypatch):
    """Any exception while classifying costs one file, never the listing (here: a scan that raises TypeError)."""
    from extension import library

    (tmp_path / "x.safetensors").write_bytes(b"whatever")

    def broken(path):
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(library, "scan", broken)
    monkeypatch.setattr(library, "_CACHE", {})
    lib = library.scan_library(tmp_path)
    assert lib.files[0].error.startswith("Could not be classified (internal error TypeError)")


def test_describe_counts_are_never_negative(tiny_pair):
    info = describe(scan(tiny_pair[0]))
    assert all(p["parameters"] >= 0 and p["bytes"] >= 0 for p in info["parts"].values())
    assert TEXT_ENCODER in info["parts"]


BIG_HEADER_PROBE = textwrap.dedent("""
    import json, os, resource, struct, time
    from cascade.tensorfile import MAX_HEADER_BYTES, read_header
    path = os.environ["PROBE_FILE"]
    parts, size, i = [], 2, 0
    while True:  # the worst case per byte: as many minimal tensor entries as fit in the bound
        entry = f'"t{i:07d}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
        if size + len(entry) + 1 > MAX_HEADER_BYTES:
            break
        parts.append(entry); size += len(entry) + 1; i += 1
    body = ("{" + ",".join(parts) + "}").encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        f.write(b"\\1" * (4 * i))
    del parts, body
    try:  # current RSS (the generator's garbage is freed); the peak below includes everything parsing adds
        before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    header = read_header(path)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tensors": len(header.tensors), "header_bytes": os.path.getsize(path) - 4 * i - 8,
                      "seconds": elapsed, "rss_growth": after - before}))
""")


def test_biggest_allowed_header_is_bounded_in_memory_and_time(tmp_path):
    """A header at the 16 MiB bound (~235k tensor entries, the costliest kind per byte) parses in bounded RSS/time."""
    result = run_bounded(BIG_HEADER_PROBE, timeout=240, env={"PROBE_FILE": str(tmp_path / "big.safetensors")})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["header_bytes"] > MAX_HEADER_BYTES - 200 and figures["tensors"] > 200_000
    # measured 0.75-0.81 GiB on CPython 3.11 (json objects + TensorInfo per entry; the allocator varies run to run):
    # the bound is what a hostile file can cost at most, far below the 99 MB header's 1.8 GB it replaced
    assert figures["rss_growth"] < 1 << 30, figures
    assert figures["seconds"] < 60, figures
    print(f"16 MiB header: {figures['tensors']} tensors, {figures['seconds']:.1f} s, "
          f"+{figures['rss_growth'] >> 20} MiB RSS")
