"""Incremental detokenization: Thai split across byte-level tokens, stop strings held back."""

from __future__ import annotations

from api.engine.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """Each token is one UTF-8 byte, the worst case for Thai (3 bytes a character)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def feed(text: str, stop=()):
    detok = IncrementalDetokenizer(ByteTokenizer(), tuple(stop))
    deltas = []
    for b in text.encode():
        detok.add(b)
        cut = detok.find_stop()
        if cut >= 0:
            deltas.append(detok.take(cut_at=cut))
            return deltas, True
        deltas.append(detok.take())
    deltas.append(detok.take(final=True))
    return deltas, False


def test_thai_never_emits_replacement_characters():
    deltas, _ = feed("ภาษาไทย สวัสดี")
    assert "".join(deltas) == "ภาษาไทย สวัสดี"
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_cut_and_never_partially_emitted():
    deltas, stopped = feed("สรุป: ข่าวดี END แล้ว", stop=["END"])
    assert stopped
    assert "".join(deltas) == "สรุป: ข่าวดี "
    assert not any("E" in d for d in deltas)


def test_held_back_prefix_released_when_not_a_stop():
    deltas, stopped = feed("abc ENx", stop=["END"])
    assert not stopped and "".join(deltas) == "abc ENx"


def test_direct_decoder_equals_the_tokenizers_decode(demo_checkpoint):
    """The detokenizer calls the Rust tokenizer directly (the Python wrapper was a third of a
    millisecond per step at 16 streams); for the product's tokenizer it must decode exactly as
    ``tokenizer.decode(..., skip_special_tokens=True)`` does, on any slice of ids."""
    import random

    from transformers import AutoTokenizer

    from api.engine.detokenizer import text_decoder

    base, _ = demo_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(base)
    decode = text_decoder(tokenizer)
    assert decode.__closure__ is not None and any(
        cell.cell_contents is tokenizer._tokenizer for cell in decode.__closure__)  # the direct path
    ids = tokenizer('สรุปข่าว: เศรษฐกิจไทย <tool_call>{"a": 1}</tool_call> ok .')["input_ids"]
    ids += [tokenizer.eos_token_id, *tokenizer.all_special_ids, *range(0, len(tokenizer), 7)]
    rng = random.Random(0)
    for _ in range(1000):
        start = rng.randrange(len(ids))
        part = ids[start:rng.randrange(start, len(ids) + 1)]
        assert decode(part) == tokenizer.decode(part, skip_special_tokens=True)
    # a tokenizer without a Rust backend keeps its own decode
    assert text_decoder(ByteTokenizer())(list("ไทย".encode())) == "ไทย"


def test_tokens_that_each_end_mid_character_keep_their_text():
    """Each token is "ภา" plus two bytes of the next letter: only that incomplete tail is held
    back, and at the end the text is what the tokenizer's own decode gives (U+FFFD)."""
    tokenizer = ByteTokenizer()
    token = "ภา".encode() + "ม".encode()[:2]
    detok = IncrementalDetokenizer(_Chunked(token), ())
    deltas = []
    for _ in range(24):
        detok.add(0)
        deltas.append(detok.take())
    assert "".join(deltas).count("ภา") == 24  # all but the last tail, while generating
    detok.finish()
    deltas.append(detok.take(final=True))
    assert "".join(deltas) == tokenizer.decode(list(token * 24))
    assert "".join(deltas) == "ภา\ufffd" * 24


def test_a_character_completed_after_a_long_run_of_partial_tokens():
    """A window restarted after many unclean tokens still joins a character split over
    the restart: every byte a token of its own, a run of lone invalid bytes, then Thai."""
    raw = b"\xff" * 20 + "สวัสดี".encode()
    detok = IncrementalDetokenizer(ByteTokenizer(), ())
    out = []
    for b in raw:
        detok.add(b)
        out.append(detok.take())
    detok.finish()
    out.append(detok.take(final=True))
    assert "".join(out) == raw.decode("utf-8", errors="replace")


class _Chunked:
    """Token 0 is ``piece``; a sequence decodes as its bytes joined, as byte-level BPE does."""

    def __init__(self, piece: bytes):
        self.piece = piece

    def decode(self, ids, skip_special_tokens=True):
        return (self.piece * len(ids)).decode("utf-8", errors="replace")


def test_any_byte_stream_ends_as_decode_shows_it():
    """Random mixes of Thai, ASCII and stray bytes, one byte a token: what is streamed, held
    tails released at the end, is exactly the tokenizer's decode of all the ids."""
    import random

    rng = random.Random(7)
    pieces = ["ภาษา".encode(), b"ab", b"\xe0", b"\xb8", b"\xff", "ไทย".encode()[:4], b" "]
    for _ in range(200):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        detok = IncrementalDetokenizer(ByteTokenizer(), ())
        out = []
        for b in raw:
            detok.add(b)
            out.append(detok.take())
        detok.finish()
        out.append(detok.take(final=True))
        assert "".join(out) == raw.decode("utf-8", errors="replace"), raw


def test_the_demo_tokenizer_streams_what_its_decode_gives(demo_checkpoint):
    """The product's tokenizer, random ids rich in tokens that start or end inside a
    character: the streamed text, its held tail released at the end, is decode's text."""
    import random

    from transformers import AutoTokenizer

    from api.engine.base import token_bytes

    tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint[0])
    ids = list(range(len(tokenizer)))
    partial = [i for i, raw in zip(ids, token_bytes(tokenizer, ids))
               if raw.decode("utf-8", "replace") != raw.decode("utf-8", "ignore")]
    assert partial, "the demo vocabulary has byte-fragment tokens"
    rng = random.Random(1)
    for _ in range(300):
        seq = [rng.choice(partial) if rng.random() < 0.6 else rng.randrange(len(tokenizer))
               for _ in range(rng.randint(1, 40))]
        detok = IncrementalDetokenizer(tokenizer, ())
        out = []
        for token in seq:
            detok.add(token)
            out.append(detok.take())
        detok.finish()
        out.append(detok.take(final=True))
        assert "".join(out) == tokenizer.decode(seq, skip_special_tokens=True), seq
