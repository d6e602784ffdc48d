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
