"""Decoding options, exactly: the one parser of users' text, the options type's checks, and their messages.

Every door shows these messages to users (one CLI line, an HTTP 400), so they are pinned word for word here.
"""

from __future__ import annotations

import pytest

from captioner.decoding import OPTIONS_BY_NAME, DecodingOptions, parse_option, parse_options


def test_flags_and_ranges_as_users_see_them() -> None:
    assert OPTIONS_BY_NAME["beam_size"].flag == "--beam-size"
    assert OPTIONS_BY_NAME["no_repeat_ngram_size"].flag == "--no-repeat-ngram-size"
    assert OPTIONS_BY_NAME["strategy"].describe_range() == "one of greedy, beam"
    assert OPTIONS_BY_NAME["beam_size"].describe_range() == "a whole number from 1 to 10"
    assert OPTIONS_BY_NAME["length_penalty"].describe_range() == "a number from 0 to 2"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("beams", "3", "unknown decoding option 'beams'; known: strategy, beam_size, max_length, num_captions, "
                       "length_penalty, no_repeat_ngram_size"),
        ("strategy", "sample", "strategy must be one of greedy, beam, got 'sample'"),
        ("beam_size", "3.5", "beam_size must be a whole number from 1 to 10, got '3.5'"),
        ("beam_size", "11", "beam_size must be a whole number from 1 to 10, got '11'"),
        ("beam_size", "0", "beam_size must be a whole number from 1 to 10, got '0'"),
        ("length_penalty", "2.01", "length_penalty must be a number from 0 to 2, got '2.01'"),
        ("length_penalty", "-1", "length_penalty must be a number from 0 to 2, got '-1'"),
    ],
)
def test_parse_option_messages(name: str, text: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_option(name, text)
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("beam_size", "1", 1), ("beam_size", "10", 10), ("beam_size", "\t3 ", 3),  # the range's ends are in it
        ("length_penalty", "0", 0.0), ("length_penalty", "2", 2.0), ("length_penalty", "2.", 2.0),
        ("length_penalty", "1.25", 1.25), ("strategy", "BEAM", "beam"), ("strategy", "greedy", "greedy"),
        ("beam_size", "", None), ("beam_size", " \t", None), ("strategy", "  ", None),
    ],
)
def test_parse_option_values(name: str, text: str, value: object) -> None:
    parsed = parse_option(name, text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["3\n", "\n3", "3\r", "\x0b3", "X3", "3X"])
def test_only_spaces_and_tabs_are_stripped(text: str) -> None:
    with pytest.raises(ValueError, match="beam_size must be a whole number"):
        parse_option("beam_size", text)


def test_parse_options_leaves_blank_ones_out() -> None:
    assert parse_options({"beam_size": "4", "strategy": " ", "length_penalty": "0.5"}) == {
        "beam_size": 4, "length_penalty": 0.5}
    assert parse_options({}) == {}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"strategy": "sample"}, "strategy must be one of ('greedy', 'beam'), got 'sample'"),
        ({"beam_size": 0}, "beam_size must be at least 1, got 0"),
        ({"max_length": 0}, "max_length must be at least 1, got 0"),
        ({"beam_size": 3, "num_captions": 4}, "num_captions must be from 1 to beam_size (3), got 4"),
        ({"num_captions": 0}, "num_captions must be from 1 to beam_size (3), got 0"),
        ({"strategy": "greedy", "num_captions": 2}, "num_captions must be from 1 to 1 with strategy=greedy, got 2"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be >= 0"),
    ],
)
def test_invalid_options_messages(given: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        DecodingOptions(**given)
    assert str(error.value) == message


def test_valid_edges() -> None:
    assert DecodingOptions(beam_size=1, max_length=1, num_captions=1, no_repeat_ngram_size=0).width == 1
    assert DecodingOptions(beam_size=4, num_captions=4).width == 4
    assert DecodingOptions(strategy="greedy", beam_size=4).width == 1


def test_from_recorded_then_given() -> None:
    recorded = {"beam_size": 5, "length_penalty": 1.0, "no_repeat_ngram_size": 3, "unknown_key": 1}
    options = DecodingOptions.from_recorded(recorded, beam_size=2, length_penalty=None, strategy=None)
    assert options == DecodingOptions(beam_size=2, length_penalty=1.0, no_repeat_ngram_size=3)
    assert DecodingOptions.from_recorded({}) == DecodingOptions()
    assert options.to_json() == {"strategy": "beam", "beam_size": 2, "max_length": 20, "num_captions": 1,
                                 "length_penalty": 1.0, "no_repeat_ngram_size": 3}
