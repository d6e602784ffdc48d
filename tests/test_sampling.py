"""The batch sampler's OpenAI/vLLM fields, row by row and mixed in one batch, and the
engine's stop tokens, log probabilities and grammar masks on the generated checkpoint."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch

from api.engine.grammar import GrammarCompiler, apply_bitmask
from api.engine.sampler import NGramBlocker, RowRule, apply_penalties, sample_batch
from api.engine.types import GenerationRequest, GrammarSpec, SamplingParams
from tests.test_engine import PROMPTS, started

VOCAB = 50


def rule(**fields) -> RowRule:
    values = {"temperature": 0.0, "top_p": 1.0, "generator": None, "blocker": NGramBlocker(0),
              "suppress": [], **fields}
    return RowRule(**values)


def logits_row(*pairs, base=0.0) -> torch.Tensor:
    row = torch.full((VOCAB,), base)
    for token, value in pairs:
        row[token] = value
    return row


# ------------------------------------------------------------------ the sampler alone
def test_frequency_and_presence_penalties_follow_openai():
    """logit - count * frequency_penalty - (count > 0) * presence_penalty."""
    logits = torch.stack([logits_row((1, 5.0), (2, 4.0)), logits_row((1, 5.0), (2, 4.0))])
    rows = [rule(frequency_penalty=0.5, counts={1: 3}), rule(presence_penalty=2.0, counts={1: 3})]
    apply_penalties(logits, rows)
    assert logits[0, 1].item() == pytest.approx(5.0 - 1.5)
    assert logits[1, 1].item() == pytest.approx(5.0 - 2.0)
    assert logits[0, 2].item() == logits[1, 2].item() == 4.0


def test_repetition_penalty_covers_prompt_and_output_and_both_signs():
    logits = logits_row((1, 6.0), (2, -3.0), (3, 6.0), (4, 1.0))[None].clone()
    row = rule(repetition_penalty=2.0, prompt_tokens=frozenset({1, 2}), counts={4: 1})
    apply_penalties(logits, [row])
    assert logits[0, 1].item() == 3.0      # positive: divided
    assert logits[0, 2].item() == -6.0     # negative: multiplied
    assert logits[0, 3].item() == 6.0      # unseen: untouched
    assert logits[0, 4].item() == 0.5      # generated before


def test_penalties_change_the_greedy_pick_and_counts_grow_with_observe():
    row = rule(frequency_penalty=2.0)
    logits = logits_row((7, 3.0), (8, 2.0))
    picks = []
    for _ in range(3):
        token = sample_batch(logits[None].clone(), [row]).tokens[0]
        row.observe(token)
        picks.append(token)
    assert picks == [7, 8, 7] and row.counts == {7: 2, 8: 1}  # 3-2=1 beats 2-2=0


def test_logit_bias_top_k_and_min_p():
    logits = logits_row((3, 4.0), (4, 3.9), (5, 3.8))
    assert sample_batch(logits[None].clone(), [rule(logit_bias=((10, 100.0),))]).tokens == [10]
    assert sample_batch(logits[None].clone(), [rule(logit_bias=((3, -100.0),))]).tokens == [4]
    gen = torch.Generator().manual_seed(0)
    # top_k 1 and min_p 1 keep only the most likely token whatever the temperature.
    for fields in ({"top_k": 1}, {"min_p": 1.0}):
        picks = {sample_batch(logits[None].clone(), [rule(temperature=2.0, generator=gen,
                                                          **fields)]).tokens[0]
                 for _ in range(30)}
        assert picks == {3}, fields
    picks = {sample_batch(logits[None].clone(), [rule(temperature=1.0, top_k=3, generator=gen)]).tokens[0]
             for _ in range(200)}
    assert picks == {3, 4, 5}, "top_k 3 keeps exactly the three best"


def test_logprobs_are_the_raw_distribution_whatever_else_applies():
    logits = logits_row((3, 4.0), (4, 1.0))
    raw = torch.log_softmax(logits, dim=-1)
    result = sample_batch(logits[None].clone(), [rule(logprobs=2, logit_bias=((4, 100.0),))])
    entry = result.logprobs[0]
    assert result.tokens == [4] and entry.token_id == 4
    assert entry.logprob == pytest.approx(raw[4].item(), abs=1e-5)
    assert [t for t, _ in entry.top] == [3, 4]
    assert entry.top[0][1] == pytest.approx(raw[3].item(), abs=1e-5)


def test_rows_with_features_do_not_disturb_plain_rows():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=gen)
    rows = [rule(), rule(frequency_penalty=2.0, counts={int(logits[1].argmax()): 3}),
            rule(logit_bias=((0, 100.0),), logprobs=1), rule(top_k=2, min_p=0.5)]
    result = sample_batch(logits.clone(), rows)
    assert result.tokens[0] == int(logits[0].argmax())
    assert result.tokens[2] == 0
    assert result.tokens[3] == int(logits[3].argmax())
    assert result.logprobs[0] is None and result.logprobs[2] is not None


def test_apply_bitmask_matches_the_bits():
    gen = torch.Generator().manual_seed(2)
    vocab = 70
    allowed = torch.rand(3, vocab, generator=gen) > 0.5
    words = (vocab + 31) // 32
    bits = torch.zeros(3, words * 32, dtype=torch.int64)
    bits[:, :vocab] = allowed.long()
    packed = (bits.view(3, words, 32) << torch.arange(32)).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    logits = torch.zeros(3, vocab + 5)  # model rows past the tokenizer's are never allowed
    apply_bitmask(logits, packed)
    assert torch.equal(torch.isfinite(logits[:, :vocab]), allowed)
    assert torch.isneginf(logits[:, vocab:]).all()


# ------------------------------------------------------------- the engine, end to end
async def _generate(engine, prompt, **params):
    params = {"max_tokens": 24, "temperature": 0.0, "no_repeat_ngram_size": 0, **params}
    if params.get("grammar") is not None:
        await engine.check_grammar(params["grammar"])
    ids = engine.encode_chat([{"role": "user", "content": prompt}])
    return [c async for c in engine.generate(GenerationRequest(ids, SamplingParams(**params)))]


def _text(chunks) -> str:
    return "".join(c.text for c in chunks)


def test_engine_stop_tokens_logprobs_and_grammar(demo_checkpoint):
    async def main():
        engine = await started(demo_checkpoint)
        try:
            out = {}
            out["free"] = await _generate(engine, PROMPTS[1], max_tokens=12, logprobs=2)
            ids = [e.token_id for c in out["free"] for e in c.logprobs]
            out["ids"] = ids
            out["stop_id"] = await _generate(engine, PROMPTS[1], stop_token_ids=(ids[3],))
            out["stop_id_kept"] = await _generate(engine, PROMPTS[1], stop_token_ids=(ids[3],),
                                                  include_stop_str_in_output=True)
            free_text = _text(out["free"])
            out["stop_str"] = free_text[4:7]
            out["stop_kept"] = await _generate(engine, PROMPTS[1], stop=(out["stop_str"],),
                                               include_stop_str_in_output=True)
            out["prompt_lp"] = await _generate(engine, PROMPTS[0], max_tokens=2, prompt_logprobs=1)
            out["prompt_ids"] = engine.encode_chat([{"role": "user", "content": PROMPTS[0]}])
            regex = GrammarSpec("regex", r"[0-9]{3}-[a-z]{2,4}")
            schema = {"type": "object", "properties": {
                "n": {"type": "integer", "minimum": -5, "maximum": 5},
                "tags": {"type": "array", "items": {"enum": ["ก", "ข"]}, "maxItems": 3}},
                "required": ["n", "tags"], "additionalProperties": False}
            json_spec = GrammarSpec("json_schema", json.dumps(schema))
            # Constrained and plain rows in one batch: the masks stay on their rows.
            together = await asyncio.gather(
                _generate(engine, PROMPTS[2], grammar=regex, temperature=1.0, seed=3, max_tokens=40),
                _generate(engine, PROMPTS[1], max_tokens=12),
                _generate(engine, PROMPTS[3], grammar=json_spec, temperature=1.0, seed=4,
                          max_tokens=60),
                _generate(engine, PROMPTS[4], grammar=GrammarSpec("choice", '["ใช่", "ไม่"]'),
                          no_repeat_ngram_size=1))
            out.update(regex=together[0], plain=together[1], json=together[2],
                       choice=together[3], schema=schema)
            out["model_logits"] = _full_logits(engine, out["prompt_ids"])
        finally:
            await engine.stop()
        return out

    out = asyncio.run(main())
    ids = out["ids"]
    assert len(ids) == out["free"][-1].completion_tokens or out["free"][-1].finish_reason == "stop"
    for chunk in out["free"]:
        for entry in chunk.logprobs:  # greedy: the chosen token is the most likely one
            assert entry.token_id == entry.top[0][0] and len(entry.top) == 2
    stopped = out["stop_id"][-1]
    assert (stopped.finish_reason, stopped.completion_tokens) == ("stop", 4)
    assert _text(out["free"]).startswith(_text(out["stop_id_kept"]))
    assert len(_text(out["stop_id_kept"])) > len(_text(out["stop_id"]))
    assert _text(out["stop_kept"]).endswith(out["stop_str"])
    assert out["stop_kept"][-1].finish_reason == "stop"

    # Prompt log probabilities: each prompt token given the ones before it, as one forward says.
    entries = out["prompt_lp"][0].prompt_logprobs
    prompt_ids = out["prompt_ids"]
    assert entries[0] is None and len(entries) == len(prompt_ids)
    expected = torch.log_softmax(out["model_logits"], dim=-1)
    for pos in (1, len(prompt_ids) // 2, len(prompt_ids) - 1):
        assert entries[pos].token_id == prompt_ids[pos]
        assert entries[pos].logprob == pytest.approx(expected[pos - 1, prompt_ids[pos]].item(), abs=1e-4)

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", _text(out["regex"])), _text(out["regex"])
    assert _text(out["plain"]) == _text(out["free"]), "a plain row batched with constrained ones"
    parsed = json.loads(_text(out["json"]))
    import jsonschema

    jsonschema.validate(parsed, out["schema"])
    assert out["json"][-1].finish_reason == "stop"
    assert _text(out["choice"]) in ("ใช่", "ไม่"), "n-gram bans never outvote the grammar"


def _full_logits(engine, ids):
    model = engine.bundle.model
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_a_grammar_the_library_refuses_is_a_grammar_error(demo_checkpoint):
    from api.engine.errors import GrammarError

    async def main():
        engine = await started(demo_checkpoint)
        try:
            errors = []
            for spec in (GrammarSpec("regex", "(?<=a)b"), GrammarSpec("lark", "start: undefined_rule"),
                         GrammarSpec("json_schema", json.dumps({"$ref": "#/nowhere"}))):
                with pytest.raises(GrammarError) as info:
                    await engine.check_grammar(spec)
                errors.append(str(info.value))
            compiler: GrammarCompiler = engine.scheduler.grammar
            spec = GrammarSpec("json_object")
            await engine.check_grammar(spec)
            await engine.check_grammar(spec)
            return errors, compiler.hits, compiler.misses
        finally:
            await engine.stop()

    errors, hits, misses = asyncio.run(main())
    assert "look-around" in errors[0]
    assert all("<grammar>" not in e and "\n" not in e for e in errors), "one line, no grammar dump"
    assert (hits, misses) == (1, 1), "the second check of a spec is a cache hit"


def test_a_grammar_past_the_parsers_limits_fails_as_a_grammar_error_not_an_empty_answer(demo_checkpoint):
    """1024 choices of 200 Thai characters pass validation, then llguidance's lexer gives up
    mid-generation and allows only EOS: that must end as a GrammarError (a 400), on one line."""
    from api.engine.errors import GrammarError

    spec = GrammarSpec("choice", json.dumps(["ก" * 200 + str(i) for i in range(1024)]))

    async def main():
        engine = await started(demo_checkpoint)
        try:
            with pytest.raises(GrammarError) as info:
                await _generate(engine, PROMPTS[0], grammar=spec, max_tokens=8)
            return str(info.value)
        finally:
            await engine.stop()

    message = asyncio.run(main())
    assert message.startswith("structured output failed:") and "\n" not in message


# ------------------------------------------- the draw against the full-sort reference
def reference_probabilities(logits: torch.Tensor, row: RowRule) -> torch.Tensor:
    """What a row is drawn from, computed the plain way: the whole vocabulary sorted, then
    temperature, top-k, top-p (the token that crosses top_p stays), min-p."""
    scaled = logits / row.temperature
    ordered, order = scaled.sort(descending=True)
    if 0 < row.top_k < len(ordered):
        ordered[row.top_k:] = float("-inf")
    probs = ordered.softmax(dim=-1)
    probs[(probs.cumsum(dim=-1) - probs) > row.top_p] = 0.0
    probs[probs < row.min_p * probs.max()] = 0.0
    out = torch.zeros_like(probs)
    out[order] = probs / probs.sum()
    return out


SAMPLER_VOCAB = 2048  # wider than the sampler's CANDIDATES, so both of its paths are taken
DRAWS = 4000


@pytest.mark.parametrize(("spread", "fields", "sorts"), [
    (4.0, {"top_p": 0.9}, False),                  # peaked: the nucleus is in the candidates
    (0.1, {"top_p": 0.9}, True),                   # flat: wider than them, sorted in full
    (4.0, {"top_k": 40, "top_p": 0.8}, False),
    (0.1, {"top_k": 1500}, False),                 # top-k alone, past the candidates
    (2.0, {"min_p": 0.05}, False),                 # no cut: one draw over the vocabulary
    (1.0, {"temperature": 1.5, "top_p": 0.95, "min_p": 0.01}, None),
])
def test_draws_follow_the_full_sort_reference(monkeypatch, spread, fields, sorts):
    """Sampled tokens lie in the reference's support and their distribution matches it
    (Kolmogorov-Smirnov over the tokens ranked by probability, 4,000 draws from a fixed
    seed, so the outcome is the same on every run)."""
    import api.engine.sampler as sampler

    logits = torch.randn(SAMPLER_VOCAB, generator=torch.Generator().manual_seed(3)) * spread
    row_fields = {"temperature": 0.8, **fields}
    expected = reference_probabilities(logits.clone(), rule(**row_fields))
    sorted_rows = []  # rows cut again from the whole vocabulary, sorted
    real_cut = sampler._cut_and_draw
    monkeypatch.setattr(sampler, "_cut_and_draw",
                        lambda scaled, rows, uniforms, width: (
                            width >= SAMPLER_VOCAB and sorted_rows.append(len(rows)),
                            real_cut(scaled, rows, uniforms, width))[1])
    torch.manual_seed(0)
    tokens = sample_batch(logits.repeat(DRAWS, 1), [rule(**row_fields) for _ in range(DRAWS)]).tokens
    if sorts is not None:
        assert bool(sorted_rows) is sorts, sorted_rows
    counts = torch.bincount(torch.tensor(tokens), minlength=SAMPLER_VOCAB).double() / DRAWS
    assert set(tokens) <= set(expected.nonzero().squeeze(1).tolist())
    ranked = expected.argsort(descending=True)
    gap = (counts[ranked].cumsum(0) - expected[ranked].double().cumsum(0)).abs().max().item()
    assert gap < 1.63 / DRAWS ** 0.5, gap  # KS at the 1% level


def test_a_seed_gives_the_same_draws_and_rows_keep_their_own_generators():
    logits = torch.randn(3, SAMPLER_VOCAB, generator=torch.Generator().manual_seed(4))

    def run(seeds):
        rows = [rule(temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(s))
                for s in seeds]
        return [sample_batch(logits.clone(), rows).tokens for _ in range(20)]

    first = run([1, 2, 3])
    assert run([1, 2, 3]) == first
    # a row's draws depend on its own seed only, not on its neighbours'
    assert [t[0] for t in run([1, 7, 8])] == [t[0] for t in first]
    assert [t[1] for t in run([9, 2, 9])] != [t[1] for t in run([9, 5, 9])]


def test_a_draw_never_lands_on_a_zero_weight():
    """The edges of the inverse-CDF draw: a uniform of 0 takes the first token with weight,
    one just below 1 (or rounded up to 1 in float32) the last one, never the zero after it."""
    from api.engine.sampler import _draw

    weights = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    uniforms = torch.tensor([0.0, 0.5, 1 - 1e-12, 1.0], dtype=torch.float64)
    assert _draw(weights, uniforms).tolist() == [1, 3, 3, 3]
