"""Build the offline CLIP BPE tokenizer folder (cascade/data/clip_tokenizer/).

Stable Cascade's text encoder (CLIP ViT-bigG-14) uses the ordinary OpenAI CLIP BPE vocabulary. The engine must
tokenize without network access, so we ship the four files of a standard Hugging Face ``CLIPTokenizer`` folder.
They are derived from ``open_clip/bpe_simple_vocab_16e6.txt.gz``, the merges file that the PyPI package
``open_clip_torch`` bundles (the same file OpenAI's CLIP repository ships), exactly the way OpenAI's
``SimpleTokenizer`` builds its vocabulary:

    vocab  = 256 byte-level characters
           + the same 256 characters with "</w>" appended
           + one entry per merge (the two halves joined), merges = lines[1 : 49152 - 256 - 2 + 1]
           + "<|startoftext|>", "<|endoftext|>"                                    -> 49408 entries

We read the wheel as a zip archive (open_clip is never imported or installed).

Usage:
    python tools/make_clip_tokenizer.py                 # pip-downloads open_clip_torch==3.3.0 into a temp dir
    python tools/make_clip_tokenizer.py --wheel X.whl   # use a wheel you already have
    python tools/make_clip_tokenizer.py --check         # only verify the committed folder loads and tokenizes right
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "cascade" / "data" / "clip_tokenizer"
OPEN_CLIP_VERSION = "3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2  # 48894: what OpenAI's SimpleTokenizer keeps

# (prompt, expected ids) pairs that any correct CLIP tokenizer reproduces.
KNOWN_IDS = [
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
    ("", [49406, 49407]),
]


def byte_unicode_table() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes, in vocab order.

    Printable latin-1 bytes map to themselves; the other 68 bytes are mapped, in byte order, to code points
    256, 257, ... so that every byte has a visible, non-whitespace character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = list(printable)
    code_points = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return [chr(c) for c in code_points]


def read_merges_from_wheel(wheel: Path) -> list[tuple[str, str]]:
    """Return the merges OpenAI CLIP uses, read from the gzip file inside the open_clip_torch wheel."""
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(BPE_MEMBER)
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"unexpected merges file layout in {wheel}")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    chars = byte_unicode_table()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocab has {len(vocab)} unique entries, expected {VOCAB_SIZE}")
    return vocab


def special_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def tokenizer_config(vocab: dict[str, int]) -> dict:
    """Matches the stable-cascade / laion bigG tokenizer_config.json: pad = eos, 77 tokens, lower-cased."""
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab[BOS]): {**special_token(BOS), "special": True},
            str(vocab[EOS]): {**special_token(EOS), "special": True},
        },
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }


def special_tokens_map() -> dict:
    return {
        "bos_token": special_token(BOS),
        "eos_token": special_token(EOS),
        "pad_token": special_token(EOS),
        "unk_token": special_token(EOS),
    }


def write_folder(out: Path, merges: list[tuple[str, str]], source_note: str) -> None:
    vocab = build_vocab(merges)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n", "utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(vocab), indent=2) + "\n", "utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special_tokens_map(), indent=2) + "\n", "utf-8")
    (out / "SOURCE.md").write_text(source_note, "utf-8")


def download_wheel(target: Path) -> Path:
    package = f"open_clip_torch=={OPEN_CLIP_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", package, "-d", str(target)]
    subprocess.run(cmd, check=True)
    wheels = sorted(target.glob("open_clip_torch-*.whl"))
    if not wheels:
        raise FileNotFoundError("pip download produced no open_clip_torch wheel")
    return wheels[0]


def source_note(wheel: Path, merges_sha256: str) -> str:
    return (
        "# CLIP BPE tokenizer (offline copy)\n\n"
        "Generated by `tools/make_clip_tokenizer.py`; do not edit by hand.\n\n"
        f"- Source: `{BPE_MEMBER}` inside the PyPI wheel `{wheel.name}`.\n"
        f"- sha256 of the decompressed merges file: `{merges_sha256}`.\n"
        "- The vocabulary and merges are OpenAI CLIP's (MIT License, Copyright (c) 2021 OpenAI); open_clip\n"
        "  redistributes them under the same terms.\n"
        "- Layout: a standard Hugging Face `CLIPTokenizer` folder (vocab 49408, bos 49406, eos = pad = 49407,\n"
        "  model_max_length 77, lower-cased), loadable with transformers 4.x and 5.x.\n"
    )


def check(folder: Path) -> None:
    """Load the folder with transformers, offline, and verify size, special ids and a few known encodings."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert len(tok) == VOCAB_SIZE, len(tok)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77
    for text, ids in KNOWN_IDS:
        got = tok(text)["input_ids"]
        assert got == ids, (text, got, ids)
    padded = tok("a photo of a cat", padding="max_length", max_length=77)
    assert padded["input_ids"][7:] == [49407] * 70
    print(f"ok: {folder} ({len(tok)} tokens)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="an open_clip_torch wheel to read instead of downloading one")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="only verify the existing folder")
    args = parser.parse_args(argv)

    if not args.check:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = args.wheel or download_wheel(Path(tmp))
            merges = read_merges_from_wheel(wheel)
            with zipfile.ZipFile(wheel) as archive:
                digest = hashlib.sha256(gzip.decompress(archive.read(BPE_MEMBER))).hexdigest()
            write_folder(args.out, merges, source_note(wheel, digest))
            print(f"wrote {args.out} from {wheel.name}")
    check(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
