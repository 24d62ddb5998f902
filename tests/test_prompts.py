"""A1111 prompt-attention parsing: the results A1111's own docstring and code give."""

import pytest

from cascade.prompts import BREAK, is_break, parse_prompt_attention


@pytest.mark.parametrize(
    "text, expected",
    [
        # the examples from A1111's parse_prompt_attention docstring
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        # further A1111 behaviour
        ("", [("", 1.0)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("(word:1.5)", [("word", 1.5)]),
        ("( word : 0.25 )", [(" word ", 0.25)]),
        ("(word:-1)", [("word", -1.0)]),
        ("((a:2) b)", [("a", 2.2), (" b", 1.1)]),
        ("a:b", [("a:b", 1.0)]),
        ("unmatched) and ]", [("unmatched) and ]", 1.0)]),
        ("x:1.5) y", [("x:1.5) y", 1.0)]),  # a weight with no open group is text
        (r"\\", [("\\", 1.0)]),
        (r"a\b", [("ab", 1.0)]),  # a lone backslash is dropped, as in A1111
        ("[unbalanced (both", [("unbalanced ", 1 / 1.1), ("both", 1.0)]),  # round first, then square
        ("[a:b:0.5]", [("a:b:0.5", 1 / 1.1)]),  # prompt-editing syntax is not attention: plain text
    ],
)
def test_a1111_results(text, expected):
    assert parse_prompt_attention(text) == expected


def test_break_marker():
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]
    assert parse_prompt_attention("a\nBREAK\n(b)") == [("a", 1.0), (BREAK, -1.0), ("", 1.0), ("b", 1.1)]
    assert parse_prompt_attention("BREAK a") == [("", 1.0), (BREAK, -1.0), ("a", 1.0)]
    # only the upper-case whole word
    assert parse_prompt_attention("break a BREAKS aBREAK") == [("break a BREAKS aBREAK", 1.0)]


def test_break_inside_brackets_is_still_a_break():
    parsed = parse_prompt_attention("(a BREAK b)")
    assert parsed == [("a", 1.1), (BREAK, -1.1), ("b", 1.1)]  # A1111's result
    assert [is_break(s) for s in parsed] == [False, True, False]
    assert not is_break(("BREAK", 1.0))  # an escaped or weighted literal word stays a word


def test_malformed_weight_does_not_crash():
    # A1111 raises ValueError here; we keep the characters and close the group with 1.1
    assert parse_prompt_attention("(a:1.2.3)") == [("a:1.2.3", 1.1)]
    assert parse_prompt_attention("(a:.)") == [("a:.", 1.1)]


def test_escaped_brackets_stay_literal_next_to_weights():
    assert parse_prompt_attention(r"(\(x\):1.2) \[y\]") == [("(x)", 1.2), (" [y]", 1.0)]
