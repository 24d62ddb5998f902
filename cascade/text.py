"""CLIP-G text conditioning for Stage C / Stage B, computed the way ComfyUI computes it.

- Tokenizer: the CLIP BPE tokenizer shipped in ``cascade/data/clip_tokenizer`` (no network, see
  ``tools/make_clip_tokenizer.py``).
- Prompts use the A1111 weight syntax or ComfyUI's (``cascade.prompts``, ``syntax=``) and may be longer than
  75 tokens: they are cut into 75-token chunks, each encoded as its own ``[BOS] + 75 + [EOS]`` sequence padded
  to 77 with EOS, and the chunk encodings are concatenated along the sequence (77·k tokens), as ComfyUI and
  A1111 do.
- ``clip_text`` is the output of the last transformer layer *before* the final LayerNorm (Stable Cascade was
  trained on that, unlike SDXL's penultimate layer); ``clip_text_pooled`` is the projected, final-LN state at the
  first EOS of the first chunk.
- Weights follow ComfyUI: ``z = (z - z_empty) * w + z_empty`` per token, ``z_empty`` being the encoding of the
  empty prompt; tokens of weight 1 are left untouched, so an unweighted prompt encodes bit-for-bit as without
  this machinery. The pooled embedding is never weighted.

Chunking rule, A1111 syntax (ComfyUI's ``SDTokenizer.tokenize_with_weights``, in its older word-splitting form):
every whitespace-separated word is tokenized on its own; a word shorter than 8 tokens that does not fit in the
current chunk moves whole to the next chunk, a longer word is split at the chunk boundary. ``BREAK``
(A1111 syntax; ComfyUI has no equivalent) closes the current chunk; it never creates an empty chunk. Current
ComfyUI groups whole weighted segments instead of words, which splits long unweighted prompts mid-word; we
keep the word rule for A1111 syntax because it never splits a short word. A1111 instead backtracks to the last
comma within 20 tokens, so chunk boundaries can differ from A1111's for prompts longer than 75 tokens.

ComfyUI syntax follows current ComfyUI exactly: each weighted segment is tokenized whole (so a segment boundary
inside a word splits its BPE, as there) and is the unit the chunker keeps together or splits; there is no BREAK.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cascade.prompts import is_break, parse_comfyui_weights, parse_weights

if TYPE_CHECKING:
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "clip_tokenizer"
CHUNK_TOKENS = 75  # prompt tokens per chunk
SEQUENCE_LENGTH = CHUNK_TOKENS + 2  # with BOS and EOS
MAX_WORD_TOKENS = 8  # ComfyUI's max_word_length: shorter words are never split across chunks
MAX_TILE_RATIO = 4  # ComfyUI's CONDCrossAttn limit for repeating a shorter conditioning
_EMBEDDING = re.compile(r"(?:^|[ \n])embedding:")  # where ComfyUI starts a textual-inversion name


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> CLIPTokenizer:
    """The shipped CLIP tokenizer (transformers ``CLIPTokenizer``), loaded once and never from the hub."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


@dataclass(frozen=True)
class PromptChunks:
    """One prompt as 77-token chunks: what the text encoder consumes, plus the per-token weights."""

    input_ids: torch.Tensor  # (n_chunks, 77) long: BOS, tokens, EOS, EOS padding
    weights: torch.Tensor  # (n_chunks, 77) float32: 1.0 on BOS/EOS/padding
    attention_mask: torch.Tensor  # (n_chunks, 77) long: 1 through the first EOS, 0 on padding

    @property
    def n_chunks(self) -> int:
        return self.input_ids.shape[0]

    @property
    def has_weights(self) -> bool:
        return bool((self.weights != 1.0).any())


def tokenize_weighted(tokenizer: CLIPTokenizer, text: str, syntax: str = "a1111") -> PromptChunks:
    """Tokenize a prompt in `syntax` into 77-token chunks (see the module docstring for the chunking rules)."""
    return _to_chunks(tokenizer, _token_groups(tokenizer, text, syntax))


def _token_groups(tokenizer: CLIPTokenizer, text: str, syntax: str) -> list[list[tuple[int, float]] | None]:
    """The units the chunker keeps together (None = BREAK): A1111 syntax, each whitespace-separated word;
    ComfyUI syntax, each weighted segment, tokenized whole (comfy/sd1_clip.py ``tokenize_with_weights``)."""
    if syntax == "comfyui":
        groups: list[list[tuple[int, float]] | None] = []
        for segment, weight in parse_comfyui_weights(text):
            if _EMBEDDING.search(segment):
                raise ValueError(f"textual-inversion embeddings are not supported: {segment.strip()!r} (ComfyUI "
                                 "would load a file from models/embeddings); remove the 'embedding:' word")
            ids = tokenizer(segment, add_special_tokens=False)["input_ids"]
            groups.append([(token, weight) for token in ids])
        return groups
    groups = []
    for segment in parse_weights(text, syntax):
        if is_break(segment):
            groups.append(None)
            continue
        segment_text, weight = segment
        groups += [[(token, weight) for token in word_ids] for word_ids in _tokenize_words(tokenizer, segment_text)]
    return groups


def _to_chunks(tokenizer: CLIPTokenizer, groups: list[list[tuple[int, float]] | None]) -> PromptChunks:
    """ComfyUI's chunking of token groups: a group shorter than 8 tokens that does not fit moves whole to the next
    chunk, a longer one is split at the boundary; None (BREAK) closes the current chunk (never an empty one)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    for group in groups:
        if group is None:
            if current:
                chunks.append(current)
                current = []
            continue
        tokens = list(group)
        splittable = len(tokens) >= MAX_WORD_TOKENS
        while tokens:
            room = CHUNK_TOKENS - len(current)
            if len(tokens) <= room:
                current.extend(tokens)
                tokens = []
            else:
                if splittable:
                    current.extend(tokens[:room])
                    tokens = tokens[room:]
                chunks.append(current)
                current = []
    if current or not chunks:
        chunks.append(current)

    ids = torch.full((len(chunks), SEQUENCE_LENGTH), eos, dtype=torch.long)
    weights = torch.ones((len(chunks), SEQUENCE_LENGTH), dtype=torch.float32)
    mask = torch.zeros((len(chunks), SEQUENCE_LENGTH), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        n = len(chunk)
        ids[row, 0] = bos
        if n:
            ids[row, 1 : n + 1] = torch.tensor([token for token, _ in chunk])
            weights[row, 1 : n + 1] = torch.tensor([w for _, w in chunk], dtype=torch.float32)
        first_eos = int((ids[row] == eos).nonzero()[0])  # n + 1 unless the prompt itself typed an EOS
        mask[row, : first_eos + 1] = 1
    return PromptChunks(input_ids=ids, weights=weights, attention_mask=mask)


def _tokenize_words(tokenizer: CLIPTokenizer, text: str) -> list[list[int]]:
    """Token ids of each whitespace-separated word (CLIP's pre-tokenizer never joins across whitespace)."""
    words = text.split()
    if not words:
        return []
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    return [ids for ids in encoded if ids]


@torch.no_grad()
def encode_prompts(
    text_encoder: CLIPTextModelWithProjection,
    tokenizer: CLIPTokenizer,
    prompts: Sequence[str],
    use_attention_mask: bool = True,
    syntax: str = "a1111",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a batch of prompts into ``(clip_text (B, 77·k, hidden), clip_text_pooled (B, 1, proj))``.

    ``text_encoder`` is a ``transformers.CLIPTextModelWithProjection``; outputs are on its device and dtype.
    All chunks of all prompts run as one batch; the empty prompt, needed only when some weight differs from 1,
    runs as a second one.

    Prompts with different chunk counts are tiled to a common length with ComfyUI's rule (each conditioning is
    repeated along the sequence up to the LCM of the lengths, see ``match_sequence_lengths``); a ``ValueError``
    is raised when that would need more than 4 repeats, in which case encode the prompts one call each.

    ``use_attention_mask=False`` reproduces unmasked encoding (how kohya trained SoteDiffusion's Stage C); it only
    changes the hidden states after the first EOS. The default, masked, is what ComfyUI and diffusers do.

    ``syntax`` is the prompt-weight syntax (cascade.prompts.SYNTAXES): "a1111" (SD.Next's) or "comfyui", which
    parses, tokenizes and chunks exactly as ComfyUI's CLIPTextEncode (so the conditioning matches ComfyUI's).
    """
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    chunked = [tokenize_weighted(tokenizer, prompt, syntax) for prompt in prompts]
    hidden, pooled = _run_encoder(text_encoder, chunked, use_attention_mask)
    if any(c.has_weights for c in chunked):
        # A separate pass, so that weights never change the batch (and thus the bits) of the prompt pass.
        empty, _ = _run_encoder(text_encoder, [tokenize_weighted(tokenizer, "")], use_attention_mask)
        hidden = _apply_weights(hidden, empty[0], torch.cat([c.weights for c in chunked]).to(hidden.device))

    per_prompt_hidden, per_prompt_pooled = [], []
    start = 0
    for chunks in chunked:
        k = chunks.n_chunks
        per_prompt_hidden.append(hidden[start : start + k].reshape(1, k * SEQUENCE_LENGTH, -1))
        per_prompt_pooled.append(pooled[start].reshape(1, 1, -1))  # first chunk's pooled, unweighted
        start += k

    tiled = _tile_to_common_length(per_prompt_hidden)
    if tiled is None:
        lengths = sorted({h.shape[1] for h in per_prompt_hidden})
        raise ValueError(f"prompts of {lengths} tokens cannot share a batch; encode them separately")
    return torch.cat(tiled), torch.cat(per_prompt_pooled)


def _run_encoder(
    text_encoder: CLIPTextModelWithProjection, chunked: list[PromptChunks], use_attention_mask: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over all chunks: (last layer before final LN (N, 77, D), text_embeds (N, P))."""
    device = text_encoder.device
    input_ids = torch.cat([c.input_ids for c in chunked]).to(device)
    mask = torch.cat([c.attention_mask for c in chunked]).to(device) if use_attention_mask else None
    output = text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    return output.hidden_states[-1], output.text_embeds


def _apply_weights(hidden: torch.Tensor, empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ComfyUI's weighting, in float32: move weighted tokens away from the empty prompt's encoding."""
    weights = weights.unsqueeze(-1)
    original = hidden.float()
    reference = empty.float().unsqueeze(0)
    weighted = (original - reference) * weights + reference
    return torch.where(weights != 1.0, weighted, original).to(hidden.dtype)


def match_sequence_lengths(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Give two ``(B, L, D)`` conditionings the same ``L`` so that they can share a CFG batch, as ComfyUI does.

    Each is repeated along the sequence up to ``lcm(La, Lb)``. For pure cross-attention repeating keys/values would
    not change the result, but Stable Cascade's attention puts image and text tokens in one softmax, so repeated
    text tokens gain weight: the result then depends slightly on the other prompt's length, exactly as in ComfyUI.
    Returns ``None`` when that needs more than 4 repeats of the shorter one: then run cond and uncond in separate
    passes, as ComfyUI does.
    """
    if a.ndim != 3 or b.ndim != 3 or a.shape[2] != b.shape[2]:
        raise ValueError(f"expected (B, L, D) tensors with equal D, got {tuple(a.shape)} and {tuple(b.shape)}")
    tiled = _tile_to_common_length([a, b])
    return None if tiled is None else (tiled[0], tiled[1])


def _tile_to_common_length(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    lengths = [t.shape[1] for t in tensors]
    if len(set(lengths)) == 1:
        return tensors
    target = math.lcm(*lengths)
    if target // min(lengths) > MAX_TILE_RATIO:
        return None
    return [t.repeat(1, target // t.shape[1], 1) for t in tensors]
