"""Prefix matching, UTF-8 reassembly and stop strings as a client sees them."""
from services.inference.core.text import StreamText, common_prefix_len


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0


def test_multibyte_character_split_across_pieces_is_sent_whole():
    text = StreamText()
    encoded = "é".encode()
    assert text.push(encoded[:1]) == ""
    assert text.push(encoded[1:]) == "é"


def test_stop_string_spanning_pieces_is_cut_and_not_sent():
    text = StreamText(stop=["END"])
    sent = text.push(b"hello E") + text.push(b"N") + text.push(b"D tail")
    assert sent == "hello "
    assert text.stopped
    assert text.push(b"more") == ""


def test_text_that_only_looks_like_a_stop_prefix_is_released_later():
    text = StreamText(stop=["END"])
    assert text.push(b"a E") == "a "
    assert text.push(b"x") == "Ex"
    assert text.flush() == ""


def test_flush_returns_held_text_when_generation_ends():
    text = StreamText(stop=["###"])
    assert text.push(b"ab#") == "ab"
    assert text.flush() == "#"
