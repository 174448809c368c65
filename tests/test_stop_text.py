"""tierkv.stop_text: streamed text is held back while it may become a stop string, and ends before one."""

from tierkv.stop_text import StopText


def _stream(stops, prefixes):
    st = StopText(stops)
    pieces = [st.feed(t) for t in prefixes]
    if st.hit is None:
        pieces.append(st.flush(prefixes[-1]))
    return pieces, st.hit


def test_stop_string_ends_the_text_and_is_not_emitted():
    text = "Hello world. END more"
    pieces, hit = _stream(["END"], [text[:i] for i in range(1, len(text) + 1)])
    assert "".join(pieces) == "Hello world. " and hit == "END"


def test_a_possible_stop_prefix_is_held_back_then_released():
    st = StopText(["STOP"])
    assert st.feed("abc ST") == "abc "  # "ST" may begin STOP
    assert st.feed("abc STa") == "STa"
    assert st.flush("abc STa") == ""


def test_earliest_of_several_stops_wins():
    pieces, hit = _stream(["zz", "\n\n"], ["one\n\ntwo zz"])
    assert pieces == ["one"] and hit == "\n\n"


def test_without_stops_everything_passes():
    pieces, hit = _stream([], ["a", "ab", "abc"])
    assert "".join(pieces) == "abc" and hit is None
