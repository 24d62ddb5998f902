"""Prompt-weight syntaxes: A1111 / SD.Next's (the default) and ComfyUI's (``parse_comfyui_weights``).

Users arrive from A1111 and SD.Next with prompts such as ``a (red:1.3) [blurry] cat BREAK background``; this module
turns such a prompt into ``(text, weight)`` segments with exactly the results of A1111's
``modules/prompt_parser.py:parse_prompt_attention`` (which SD.Next copies), so that a prompt weighs the same here:

- ``(text)`` multiplies by 1.1, ``[text]`` divides by 1.1, ``(text:1.5)`` multiplies by 1.5; nesting multiplies.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters; any other backslash is dropped.
- Brackets left open at the end still apply to everything after them (round ones first, then square ones);
  a closing bracket with nothing open is literal text.
- ``BREAK`` (upper case, as a whole word, surrounding whitespace removed) becomes the segment
  ``("BREAK", -1.0)``: the marker A1111 uses to start a new 75-token chunk.
- Adjacent segments with equal weights are merged; an empty prompt gives ``[("", 1.0)]``.

One deliberate difference: A1111 crashes on a malformed number such as ``(a:1.2.3)`` or ``(a:.)``; here such text
is not taken as a weight, so its characters stay literal and the ``)`` closes the group with the usual 1.1.
"""

from __future__ import annotations

import math
import re

SYNTAXES: tuple[str, ...] = ("a1111", "comfyui")  # the request's `prompt_syntax` values
BREAK = "BREAK"
BREAK_WEIGHT = -1.0
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One alternative per kind of lexical piece, tried in this order (the same pieces and order as A1111).
_PIECES = re.compile(
    r"""
      (?P<escaped>\\[()\[\]\\])                                  # \( \) \[ \] \\  -> the character itself
    | (?P<backslash>\\)                                          # any other backslash -> dropped
    | (?P<open_round>\()
    | (?P<open_square>\[)
    | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)             # ':1.3)' closes a round group with a weight
    | (?P<close_round>\))
    | (?P<close_square>\])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)                                               # a colon that does not start a weight
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(segment, weight)`` pairs the way A1111 does (see the module docstring).

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_prompt_attention(r"\\(literal\\]")
    [('(literal]', 1.0)]
    """
    segments: list[list] = []  # [text, weight], mutable so open groups can scale them later
    open_round: list[int] = []  # index of the first segment inside each open "(" group
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for segment in segments[start:]:
            segment[1] *= factor

    for piece in _PIECES.finditer(text):
        kind = piece.lastgroup
        if kind == "escaped":
            segments.append([piece.group()[1:], 1.0])
        elif kind == "backslash":
            segments.append(["", 1.0])
        elif kind == "open_round":
            open_round.append(len(segments))
        elif kind == "open_square":
            open_square.append(len(segments))
        elif kind == "weight" and open_round:
            scale_from(open_round.pop(), float(piece.group("weight")))
        elif kind == "close_round" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif kind == "close_square" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # plain text, a colon, or a closing bracket / weight with no open group
            for i, part in enumerate(_BREAK_WORD.split(piece.group())):
                if i > 0:
                    segments.append([BREAK, BREAK_WEIGHT])
                segments.append([part, 1.0])

    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    if not segments:
        return [("", 1.0)]
    return _merge_equal_weights(segments)


def is_break(segment: tuple[str, float]) -> bool:
    """True for the chunk-break marker.

    A1111 only honours the marker with weight exactly -1; a ``BREAK`` inside brackets gets its weight scaled
    and A1111 then encodes the word "break" with a negative weight, which is never what the user meant, so any
    negative weight on the bare word counts as a break here.
    """
    text, weight = segment
    return text == BREAK and weight < 0


def _merge_equal_weights(segments: list[list]) -> list[tuple[str, float]]:
    merged: list[tuple[str, float]] = []
    for text, weight in segments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


# --- ComfyUI -----------------------------------------------------------------------------------------------------
# ComfyUI's syntax (comfy/sd1_clip.py: escape_important, parse_parentheses, token_weights), as behaviour:
# - only ``\(`` and ``\)`` are escapes (the backslash is dropped); every other backslash, ``[``, ``]`` and the word
#   BREAK are plain text;
# - a top-level group runs from a "(" at depth 0 to the ")" that brings the depth back to 0; a ")" with nothing
#   open makes the depth negative and is text, and so is a "(" met at a non-zero depth;
# - a group ``(inner)`` gets weight ``outer * 1.1``; if the last ":" of inner is not its first character and the
#   rest parses as a Python float, that number *replaces* the weight (``((a:1.5))`` is 1.5, not 1.65);
# - the inner text is parsed again at the group's weight; a group left open at the end is text;
# - segments are not merged (each is tokenized on its own) and an empty group vanishes.
_ESCAPES = {"\\(": "\x00\x02", "\\)": "\x00\x01"}  # placeholders that contain no parenthesis
COMFY_MULTIPLIER = 1.1


def _split_top_level(text: str) -> list[str]:
    """Top-level pieces: plain runs and whole "(...)" groups, by ComfyUI's depth rule (see above)."""
    pieces: list[str] = []
    current, depth = "", 0
    for char in text:
        if char == "(" and depth == 0:
            if current:
                pieces.append(current)
            current = "("
            depth = 1
        elif char == "(":
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            current += char
            if depth == 0:
                pieces.append(current)
                current = ""
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


def _group_weight(inner: str, weight: float) -> tuple[str, float]:
    """(text, weight) of a group's content: 1.1 x the outer weight, or the number after its last ':'."""
    colon = inner.rfind(":")
    if colon > 0:
        try:
            value = float(inner[colon + 1 :])
        except ValueError:
            return inner, weight * COMFY_MULTIPLIER
        return inner[:colon], value
    return inner, weight * COMFY_MULTIPLIER


def _comfy_segments(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for piece in _split_top_level(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            out += _comfy_segments(*_group_weight(piece[1:-1], weight))
        else:
            out.append((piece, weight))
    return out


def parse_comfyui_weights(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(segment, weight)`` pairs as ComfyUI's CLIPTextEncode does (rules above); an empty
    prompt gives ``[]``. One difference: a weight that is not finite (``(a:nan)``, ``(a:inf)``), which ComfyUI
    would turn into a NaN conditioning, raises ValueError.

    >>> parse_comfyui_weights("a ((b:1.5)) [c]")
    [('a ', 1.0), ('b', 1.5), (' [c]', 1.0)]
    """
    for escape, placeholder in _ESCAPES.items():
        text = text.replace(escape, placeholder)
    restore = {placeholder: escape[1] for escape, placeholder in _ESCAPES.items()}
    out = []
    for segment, weight in _comfy_segments(text, 1.0):
        for placeholder, char in restore.items():
            segment = segment.replace(placeholder, char)
        if not math.isfinite(weight):
            raise ValueError(f"prompt weight {weight} on {segment!r} is not a finite number")
        out.append((segment, weight))
    return out


def parse_weights(text: str, syntax: str = "a1111") -> list[tuple[str, float]]:
    """The ``(text, weight)`` segments of a prompt in `syntax` ("a1111": with BREAK markers; "comfyui")."""
    if syntax == "a1111":
        return parse_prompt_attention(text)
    if syntax == "comfyui":
        return parse_comfyui_weights(text)
    raise ValueError(f"unknown prompt syntax {syntax!r}; use one of: {', '.join(SYNTAXES)}")
