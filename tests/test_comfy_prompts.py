"""ComfyUI's prompt-weight syntax (prompt_syntax="comfyui") and its conditioning, issue 11.

The expected segments below follow ComfyUI's comfy/sd1_clip.py (escape_important / parse_parentheses /
token_weights / tokenize_with_weights): only \\( \\) escape, "(x)" is x1.1 of the outer weight, "(x:w)" *sets* w,
"[x]" and BREAK are plain text, stray or unclosed brackets are text, each weighted segment is tokenized whole. The
conditioning reference is ComfyUI's ClipTokenWeightEncoder.encode_token_weights formula written out:
the prompt's chunks and an empty [BOS, EOS, pad...] row in one encoder batch, then per token of weight w != 1:
z = (z - z_empty) * w + z_empty; the pooled output of the first chunk, unweighted (Stable Cascade's CLIP-G:
sdxl_clip.py StableCascadeClipG: last layer before the final LayerNorm, EOS padding, attention mask through EOS).
"""

from __future__ import annotations

import pytest
import torch

from cascade.prompts import parse_comfyui_weights, parse_prompt_attention, parse_weights
from cascade.text import SEQUENCE_LENGTH, encode_prompts, load_tokenizer, tokenize_weighted

R = 1.1
TABLE = [
    ("(1girl:1.3), smile, red scarf", [("1girl", 1.3), (", smile, red scarf", 1.0)]),
    ("(1girl:1.3), [smile], red scarf", [("1girl", 1.3), (", [smile], red scarf", 1.0)]),  # no de-emphasis
    ("((masterpiece))", [("masterpiece", R * R)]),
    ("((a:1.5))", [("a", 1.5)]),  # an explicit weight replaces, it does not multiply
    ("((a):1.5)", [("a", 1.5 * R)]),
    ("(a (b:0.5) c)", [("a ", R), ("b", 0.5), (" c", R)]),
    (r"\(literal\) (x)", [("(literal) ", 1.0), ("x", R)]),
    (r"\[smile\]", [(r"\[smile\]", 1.0)]),  # \[ is no escape: backslash and bracket stay
    (r"\\(x)", [(r"\(x)", 1.0)]),  # "\(" escapes; the ")" left has nothing open
    ("a BREAK b", [("a BREAK b", 1.0)]),  # no BREAK in ComfyUI
    ("(BREAK:1.2)", [("BREAK", 1.2)]),
    ("", []),
    ("()", []),
    ("a () b", [("a ", 1.0), (" b", 1.0)]),  # not merged: each segment is tokenized on its own
    ("(unclosed", [("(unclosed", 1.0)]),
    ("stray) (x)", [("stray) (x)", 1.0)]),  # a stray ")" makes the depth negative: the group is text
    ("(a(b)", [("a", R), ("(b", R)]),
    ("(a:1.2.3)", [("a:1.2.3", R)]),  # not a number: text, and the group's 1.1
    ("(:1.2)", [(":1.2", R)]),  # a colon at the start is no weight
    ("(a: 1.3 )", [("a", 1.3)]),
    ("(a:1e-1)", [("a", 0.1)]),
    ("(a:1_5)", [("a", 15.0)]),  # Python float() syntax
    ("(a:b:1.2)", [("a:b", 1.2)]),  # the last colon
    ("time: 12:30 (b:0.8)", [("time: 12:30 ", 1.0), ("b", 0.8)]),
    ("(x:0)", [("x", 0.0)]),
    ("(x:-1)", [("x", -1.0)]),
]


@pytest.mark.parametrize("prompt,expected", TABLE)
def test_comfyui_segments(prompt, expected):
    got = parse_comfyui_weights(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)
    assert parse_weights(prompt, "comfyui") == got


def test_the_two_syntaxes_differ_where_issue_11_says():
    assert parse_prompt_attention("[smile]") == [("smile", pytest.approx(1 / 1.1))]
    assert parse_comfyui_weights("[smile]") == [("[smile]", 1.0)]
    assert ("BREAK", -1.0) in parse_prompt_attention("a BREAK b")
    assert parse_prompt_attention("((a:1.5))") == [("a", pytest.approx(1.65))]


@pytest.mark.parametrize("prompt", ["(a:nan)", "(a:inf)", "((b:-inf) c)"])
def test_non_finite_weight_is_refused(prompt):
    with pytest.raises(ValueError, match="not a finite number"):
        parse_comfyui_weights(prompt)


def test_unknown_syntax_is_refused():
    with pytest.raises(ValueError, match="a1111, comfyui"):
        parse_weights("x", "invokeai")


# --- tokenization and chunking ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tokens(tokenizer, prompt: str, syntax: str) -> list[str]:
    chunks = tokenize_weighted(tokenizer, prompt, syntax)
    n = int(chunks.attention_mask[0].sum())
    return tokenizer.convert_ids_to_tokens(chunks.input_ids[0, 1 : n - 1].tolist())


def test_escaped_square_brackets_tokenize_with_their_backslash(tokenizer):
    assert tokens(tokenizer, r"\[smile\]", "comfyui") == ["\\", "[</w>", "smile</w>", "\\", "]</w>"]
    assert tokens(tokenizer, r"\[smile\]", "a1111") == ["[</w>", "smile</w>", "]</w>"]


def test_break_is_a_word(tokenizer):
    assert tokens(tokenizer, "a BREAK b", "comfyui") == ["a</w>", "break</w>", "b</w>"]
    assert tokenize_weighted(tokenizer, "a BREAK b", "a1111").n_chunks == 2


def test_segment_boundary_inside_a_word_splits_it(tokenizer):
    """ComfyUI tokenizes each segment on its own: "sun(flower)" is "sun" + "flower", never "sunflower"."""
    whole = tokens(tokenizer, "sunflower", "comfyui")
    split = tokens(tokenizer, "sun(flower:1.0)", "comfyui")
    assert split == tokens(tokenizer, "sun", "comfyui") + tokens(tokenizer, "flower", "comfyui") != whole


def test_long_segment_is_split_at_75_tokens(tokenizer):
    """One long segment (>= 8 tokens) fills a chunk to 75 tokens and goes on in the next, even mid-word; the
    A1111 word rule moves the two-token word that does not fit whole."""
    word = "xylophonist"
    n = len(tokenizer(word, add_special_tokens=False)["input_ids"])
    assert n >= 2
    prompt = " ".join([word] * (80 // n + 1))
    comfy = tokenize_weighted(tokenizer, prompt, "comfyui")
    a1111 = tokenize_weighted(tokenizer, prompt, "a1111")
    assert int(comfy.attention_mask[0].sum()) == 77  # BOS + 75 + EOS
    assert int(a1111.attention_mask[0].sum()) == 2 + (75 // n) * n
    assert 75 % n == 0 or int(a1111.attention_mask[0].sum()) < 77


def test_short_weighted_segment_moves_whole_to_the_next_chunk(tokenizer):
    filler = " ".join(["cat"] * 74)  # 74 one-token words in one segment
    chunks = tokenize_weighted(tokenizer, f"{filler}(red fox:1.2)", "comfyui")
    assert chunks.n_chunks == 2
    assert int(chunks.attention_mask[0].sum()) == 76  # the 2-token segment did not fit beside 74
    assert chunks.weights[1, 1:3].tolist() == pytest.approx([1.2, 1.2])


def test_embeddings_are_refused(tokenizer):
    with pytest.raises(ValueError, match="embedding"):
        tokenize_weighted(tokenizer, "a photo, embedding:easynegative", "comfyui")


# --- conditioning vs ComfyUI's formula on the tiny text encoder --------------------------------------------------
@pytest.fixture(scope="module")
def text_encoder():
    from cascade.tiny import build_tiny_models

    return build_tiny_models(seed=0).text_encoder.float()


def comfy_reference(encoder, tokenizer, segments: list[tuple[str, float]]):
    """ComfyUI's encode for a one-chunk prompt given its (hand-written) segments: each segment tokenized whole,
    [BOS] + tokens + [EOS] padded with EOS; prompt row and empty row in one batch; per-token weighting."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pairs = [(bos, 1.0)]
    for text, weight in segments:
        pairs += [(t, weight) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    pairs.append((eos, 1.0))
    pairs += [(eos, 1.0)] * (SEQUENCE_LENGTH - len(pairs))
    rows = [[t for t, _ in pairs], [bos, eos] + [eos] * (SEQUENCE_LENGTH - 2)]
    ids = torch.tensor(rows)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        mask[r, : row.index(eos) + 1] = 1
    with torch.no_grad():
        out = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    z, z_empty = out.hidden_states[-1][0:1].clone(), out.hidden_states[-1][1]
    for j, (_, weight) in enumerate(pairs):
        if weight != 1.0:
            z[0, j] = (z[0, j] - z_empty[j]) * weight + z_empty[j]
    return z, out.text_embeds[0:1].unsqueeze(1)


@pytest.mark.parametrize("prompt,expected", [row for row in TABLE if row[1]])
def test_conditioning_matches_comfyui_formula(text_encoder, tokenizer, prompt, expected):
    hidden, pooled = encode_prompts(text_encoder, tokenizer, [prompt], syntax="comfyui")
    ref_hidden, ref_pooled = comfy_reference(text_encoder, tokenizer, expected)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)


def test_a1111_syntax_conditions_brackets_differently(text_encoder, tokenizer):
    prompt = "(1girl:1.3), [smile], red scarf"
    comfy, _ = encode_prompts(text_encoder, tokenizer, [prompt], syntax="comfyui")
    a1111, _ = encode_prompts(text_encoder, tokenizer, [prompt])
    assert float((comfy - a1111).abs().max()) > 1e-2
    plain = "(1girl:1.3), smile, red scarf"  # where the syntaxes agree, so do the conditionings
    torch.testing.assert_close(encode_prompts(text_encoder, tokenizer, [plain], syntax="comfyui")[0],
                               encode_prompts(text_encoder, tokenizer, [plain])[0], rtol=1e-5, atol=1e-5)


def test_request_field_and_pipeline_use_the_syntax(tiny_pipeline):
    from cascade.errors import InvalidRequestError
    from cascade.request import build_request

    with pytest.raises(InvalidRequestError, match="prompt syntax 'x'"):
        build_request(prompt="a", prompt_syntax="x")
    assert build_request(prompt="a").prompt_syntax == "a1111"
    a = tiny_pipeline.encode(["[smile]"], "comfyui").hidden
    b = tiny_pipeline.encode(["[smile]"]).hidden
    assert not torch.allclose(a, b)
