"""Tokenizer, chunking, weighting and encoding, checked against a tiny random CLIP text model."""

import json

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from cascade.text import (
    CHUNK_TOKENS,
    SEQUENCE_LENGTH,
    TOKENIZER_DIR,
    encode_prompts,
    load_tokenizer,
    match_sequence_lengths,
    tokenize_weighted,
)

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=24,  # differs from hidden_size so a mix-up of the two shows
        hidden_act="gelu",
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    return CLIPTextModelWithProjection(config).eval()


def raw_encode(encoder, ids: torch.Tensor, mask: torch.Tensor | None):
    """Straight transformers call on already-built 77-token rows."""
    with torch.no_grad():
        return encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)


def one_token_word(tokenizer, word="cat"):
    assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    return word


def word_with_tokens(tokenizer, low: int, high: int) -> tuple[str, int]:
    candidates = ["xylophonist", "zzyzx", "qwertyuiopasdf", "antidisestablishmentarianism", "xqzvkwjxqzvkwjxqzvkwj"]
    for word in candidates:
        n = len(tokenizer(word, add_special_tokens=False)["input_ids"])
        if low <= n <= high:
            return word, n
    raise AssertionError(f"no test word with {low}..{high} tokens")


# --- tokenizer ------------------------------------------------------------------------------------------------


def test_tokenizer_is_offline_and_standard(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_tokenizer.cache_clear()
    tok = load_tokenizer()
    assert isinstance(tok, CLIPTokenizer)
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, EOS)
    assert tok.model_max_length == 77
    assert tok("a photo of a cat")["input_ids"] == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert tok("A PHOTO of a Cat")["input_ids"] == [BOS, 320, 1125, 539, 320, 2368, EOS]  # lower-cased
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text("utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert load_tokenizer() is tok  # cached


@pytest.mark.parametrize(
    "prompt",
    [
        "a photo of a cat",
        "newest, extremely aesthetic, best quality, 1girl, solo, cat ears, pink hair, looking at viewer",
        "Hello,   World!!  123 café — it's 3.5x\tbetter\nthan ever",
        "",
    ],
)
def test_plain_prompts_tokenize_like_clip_tokenizer(tokenizer, prompt):
    chunks = tokenize_weighted(tokenizer, prompt)
    expected = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt")
    assert chunks.n_chunks == 1
    assert torch.equal(chunks.input_ids, expected["input_ids"])
    assert torch.equal(chunks.attention_mask, expected["attention_mask"])
    assert torch.equal(chunks.weights, torch.ones(1, 77))


def test_empty_prompt_is_one_chunk(tokenizer):
    chunks = tokenize_weighted(tokenizer, "")
    assert chunks.input_ids.tolist() == [[BOS] + [EOS] * 76]
    assert chunks.attention_mask.tolist() == [[1, 1] + [0] * 75]
    assert not chunks.has_weights


def test_long_prompt_makes_75_token_chunks(tokenizer):
    word = one_token_word(tokenizer)
    chunks = tokenize_weighted(tokenizer, f"{word} " * 150)
    assert chunks.input_ids.shape == (2, 77)
    for row in chunks.input_ids:
        assert row[0] == BOS and row[76] == EOS and (row[1:76] != EOS).all()
    assert chunks.attention_mask.sum().item() == 2 * 77
    assert tokenize_weighted(tokenizer, f"{word} " * 75).n_chunks == 1
    assert tokenize_weighted(tokenizer, f"{word} " * 76).n_chunks == 2


def test_short_word_moves_whole_to_next_chunk(tokenizer):
    word, n = word_with_tokens(tokenizer, 2, 7)
    filler = one_token_word(tokenizer)
    chunks = tokenize_weighted(tokenizer, f"{filler} " * 74 + word)
    word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert chunks.n_chunks == 2
    assert chunks.input_ids[0, 75].item() == EOS  # 74 fillers, then EOS: the word did not fit in 1 slot
    assert chunks.attention_mask[0].sum().item() == 76
    assert chunks.input_ids[1, 1 : n + 1].tolist() == word_ids


def test_long_word_is_split_at_the_boundary(tokenizer):
    word, n = word_with_tokens(tokenizer, 8, 60)
    filler = one_token_word(tokenizer)
    chunks = tokenize_weighted(tokenizer, f"{filler} " * 74 + word)
    word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert chunks.input_ids[0, 75].item() == word_ids[0]
    assert chunks.input_ids[1, 1:n].tolist() == word_ids[1:]


def test_break_starts_a_new_chunk(tokenizer):
    chunks = tokenize_weighted(tokenizer, "a cat BREAK a dog")
    assert chunks.input_ids[:, :4].tolist() == [[BOS, 320, 2368, EOS], [BOS, 320, 1929, EOS]]
    assert tokenize_weighted(tokenizer, "BREAK a cat").n_chunks == 1  # never an empty chunk
    assert tokenize_weighted(tokenizer, "a cat BREAK").n_chunks == 1
    assert tokenize_weighted(tokenizer, "a BREAK BREAK b").n_chunks == 2
    assert tokenize_weighted(tokenizer, "(a BREAK b:1.2)").n_chunks == 2


def test_weights_land_on_their_tokens(tokenizer):
    chunks = tokenize_weighted(tokenizer, "a (photo:1.5) of [a cat]")
    assert chunks.input_ids[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert chunks.weights[0, :7].tolist() == pytest.approx([1, 1, 1.5, 1, 1 / 1.1, 1 / 1.1, 1])
    assert (chunks.weights[0, 7:] == 1).all()
    assert chunks.has_weights


def test_escaped_brackets_are_literal(tokenizer):
    chunks = tokenize_weighted(tokenizer, r"\(cat\) \[dog\]")
    expected = tokenizer("(cat) [dog]", padding="max_length", max_length=77)["input_ids"]
    assert chunks.input_ids[0].tolist() == expected
    assert not chunks.has_weights


# --- encoder --------------------------------------------------------------------------------------------------


def test_hidden_is_last_layer_before_final_layer_norm(encoder, tokenizer):
    captured = {}

    def grab(_module, _args, output):
        # Must return None: a forward hook's return value replaces the output (transformers 4.x layers return a
        # tuple, so returning output[0] would feed the encoder a tensor and break it).
        captured.setdefault("out", output[0] if isinstance(output, tuple) else output)

    hook = encoder.text_model.encoder.layers[-1].register_forward_hook(grab)
    try:
        hidden, _ = encode_prompts(encoder, tokenizer, ["a photo of a cat"])
    finally:
        hook.remove()
    assert hidden.shape == (1, 77, 32)
    torch.testing.assert_close(hidden, captured["out"], rtol=0, atol=0)
    chunks = tokenize_weighted(tokenizer, "a photo of a cat")
    out = raw_encode(encoder, chunks.input_ids, chunks.attention_mask)
    torch.testing.assert_close(encoder.text_model.final_layer_norm(hidden), out.last_hidden_state)
    assert not torch.allclose(hidden, out.last_hidden_state)


def test_pooled_is_projected_final_ln_state_at_first_eos(encoder, tokenizer):
    hidden, pooled = encode_prompts(encoder, tokenizer, ["a photo of a cat"])
    first_eos = 6
    with torch.no_grad():
        manual = encoder.text_projection(encoder.text_model.final_layer_norm(hidden[0, first_eos]))
    assert pooled.shape == (1, 1, 24)
    torch.testing.assert_close(pooled[0, 0], manual)


def test_attention_mask_only_changes_padding_positions(encoder, tokenizer):
    masked, pooled_masked = encode_prompts(encoder, tokenizer, ["a photo of a cat"])
    unmasked, pooled_unmasked = encode_prompts(encoder, tokenizer, ["a photo of a cat"], use_attention_mask=False)
    torch.testing.assert_close(masked[:, :7], unmasked[:, :7])  # causal: tokens up to EOS never see padding
    assert (masked[0, 7:] - unmasked[0, 7:]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(pooled_masked, pooled_unmasked)


def test_long_prompt_concatenates_chunk_encodings(encoder, tokenizer):
    prompt = "cat " * 150
    hidden, pooled = encode_prompts(encoder, tokenizer, [prompt])
    assert hidden.shape == (1, 2 * 77, 32)
    chunks = tokenize_weighted(tokenizer, prompt)
    out = raw_encode(encoder, chunks.input_ids, chunks.attention_mask)
    torch.testing.assert_close(hidden[0, :77], out.hidden_states[-1][0])
    torch.testing.assert_close(hidden[0, 77:], out.hidden_states[-1][1])
    torch.testing.assert_close(pooled[0, 0], out.text_embeds[0])


def test_break_concatenates_sections(encoder, tokenizer):
    hidden, pooled = encode_prompts(encoder, tokenizer, ["a cat BREAK a dog"])
    cat, cat_pooled = encode_prompts(encoder, tokenizer, ["a cat"])
    dog, _ = encode_prompts(encoder, tokenizer, ["a dog"])
    torch.testing.assert_close(hidden, torch.cat([cat, dog], dim=1))
    torch.testing.assert_close(pooled, cat_pooled)


def test_empty_prompt_encodes(encoder, tokenizer):
    hidden, pooled = encode_prompts(encoder, tokenizer, [""])
    assert hidden.shape == (1, 77, 32) and pooled.shape == (1, 1, 24)


def test_weight_one_is_exactly_unweighted(encoder, tokenizer):
    plain, plain_pooled = encode_prompts(encoder, tokenizer, ["a photo of a cat"])
    ones, ones_pooled = encode_prompts(encoder, tokenizer, ["(a photo:1.0) of (a:1) cat"])
    assert torch.equal(plain, ones) and torch.equal(plain_pooled, ones_pooled)
    # a weighted prompt in the same batch leaves the unweighted one bit-identical
    mixed, _ = encode_prompts(encoder, tokenizer, ["a photo of a cat", "a (photo:1.3) of a cat"])
    same, _ = encode_prompts(encoder, tokenizer, ["a photo of a cat", "a photo of a cat"])
    assert torch.equal(mixed[:1], same[:1])


def test_weight_scales_the_difference_from_the_empty_prompt(encoder, tokenizer):
    plain, plain_pooled = encode_prompts(encoder, tokenizer, ["a photo of a cat"])
    empty, _ = encode_prompts(encoder, tokenizer, [""])
    weighted, weighted_pooled = encode_prompts(encoder, tokenizer, ["a (photo:1.5) of a [cat]"])
    expected = plain.clone()
    expected[0, 2] = (plain[0, 2] - empty[0, 2]) * 1.5 + empty[0, 2]
    expected[0, 5] = (plain[0, 5] - empty[0, 5]) * (1 / 1.1) + empty[0, 5]
    torch.testing.assert_close(weighted, expected)
    untouched = [i for i in range(77) if i not in (2, 5)]
    assert torch.equal(weighted[0, untouched], plain[0, untouched])
    assert torch.equal(weighted_pooled, plain_pooled)  # pooled is never weighted
    zero, _ = encode_prompts(encoder, tokenizer, ["a (photo:0) of a cat"])
    torch.testing.assert_close(zero[0, 2], empty[0, 2])


def test_outputs_follow_encoder_dtype(encoder, tokenizer):
    bf16 = CLIPTextModelWithProjection(encoder.config).eval()
    bf16.load_state_dict(encoder.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    hidden, pooled = encode_prompts(bf16, tokenizer, ["a (photo:1.2) of a cat"])
    assert hidden.dtype == pooled.dtype == torch.bfloat16
    assert hidden.device == pooled.device == bf16.device


# --- different lengths ----------------------------------------------------------------------------------------


def test_positive_and_negative_of_different_lengths(encoder, tokenizer):
    positive, _ = encode_prompts(encoder, tokenizer, ["cat " * 150])  # 154 tokens
    negative, _ = encode_prompts(encoder, tokenizer, ["worst quality"])  # 77 tokens
    pos, neg = match_sequence_lengths(positive, negative)
    assert pos.shape == neg.shape == (1, 154, 32)
    assert torch.equal(pos, positive)
    assert torch.equal(neg, torch.cat([negative, negative], dim=1))
    # repeating keys/values leaves cross-attention unchanged, which is why ComfyUI may tile
    query = torch.randn(1, 5, 32)
    once = torch.nn.functional.scaled_dot_product_attention(query, negative, negative)
    twice = torch.nn.functional.scaled_dot_product_attention(query, neg, neg)
    torch.testing.assert_close(once, twice)


@pytest.mark.parametrize(
    "chunks_a, chunks_b, expected",
    [(1, 1, 1), (2, 1, 2), (1, 4, 4), (2, 3, 6), (3, 4, 12), (1, 5, None), (4, 5, None), (2, 7, None)],
)
def test_match_sequence_lengths_follows_comfyui_rule(chunks_a, chunks_b, expected):
    a, b = torch.randn(2, 77 * chunks_a, 8), torch.randn(2, 77 * chunks_b, 8)
    result = match_sequence_lengths(a, b)
    if expected is None:
        assert result is None
    else:
        assert result[0].shape == result[1].shape == (2, 77 * expected, 8)


def test_match_sequence_lengths_rejects_mismatched_width():
    with pytest.raises(ValueError):
        match_sequence_lengths(torch.zeros(1, 77, 8), torch.zeros(1, 77, 16))


def test_batch_with_different_chunk_counts_is_tiled(encoder, tokenizer):
    hidden, pooled = encode_prompts(encoder, tokenizer, ["a cat", "cat " * 100])
    single, single_pooled = encode_prompts(encoder, tokenizer, ["a cat"])
    assert hidden.shape == (2, 154, 32) and pooled.shape == (2, 1, 24)
    torch.testing.assert_close(hidden[:1], torch.cat([single, single], dim=1))
    torch.testing.assert_close(pooled[:1], single_pooled)
    with pytest.raises(ValueError, match="separately"):
        encode_prompts(encoder, tokenizer, ["a cat", "cat " * (CHUNK_TOKENS * 4 + 1)])  # 1 vs 5 chunks

