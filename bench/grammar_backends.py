"""llguidance against xgrammar for the engine's structured output, on one tokenizer.

    python -m bench.grammar_backends [--schemas 100] [--vocab 151936] [--json out.json]

The tokenizer is the demo checkpoint's Thai BPE padded to Qwen2.5's 151,936 ids
(``bench.random_model.padded_tokenizer``), so masks have the real model's width. For each
of ``--schemas`` random bounded JSON schemas (nested objects, arrays, enums, bounded
numbers, strings with maxLength; the same generator as the 200-generation test) each
backend: wraps the tokenizer once; compiles the schema (xgrammar: ``compile_json_schema``;
llguidance: a matcher, whose lexer is built lazily); then drives 16 matchers of that schema
as one batch with seeded random logits for up to ``--steps`` tokens, timing the mask fill
for the batch and the application of the masks to [16, vocab] logits. Prints JSON and a
table; xgrammar is measured only if installed (``pip install --no-deps xgrammar
apache-tvm-ffi``: its triton dependency is for GPUs).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

WORDS = ["กรุงเทพ", "เชียงใหม่", "ฝน", "ข่าว", "red", "blue", "ภูเก็ต", "ok"]
BATCH = 16


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A bounded schema (strings have maxLength, arrays maxItems, numbers bounds), so a
    random-weight model under the grammar finishes within max_tokens."""
    kinds = ["string", "integer", "number", "boolean", "enum"]
    if depth < 2:
        kinds += ["array", "object", "object"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 12)}
    if kind == "integer":
        low = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 5000)}
    if kind == "number":
        low = rng.randint(-50, 50)
        return {"type": "number", "minimum": low, "maximum": low + rng.randint(1, 100)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1),
                "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
    names = rng.sample(["name", "city", "score", "items", "when", "ok", "meta", "ราคา"], rng.randint(1, 4))
    properties = {name: random_schema(rng, depth + 1) for name in names}
    required = [n for n in names if rng.random() < 0.8]
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


def object_schema(rng: random.Random) -> dict:
    schema = random_schema(rng, 1)
    while schema.get("type") != "object":
        schema = random_schema(rng, 1)
    return schema


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int):
        import llguidance
        import llguidance.hf

        from api.engine.grammar import JSON_DEFAULTS, apply_bitmask

        self.llg, self.defaults, self.apply_bitmask = llguidance, JSON_DEFAULTS, apply_bitmask
        self.vocab = vocab
        self.info = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=self.defaults)
        return self.llg.LLMatcher(self.info, grammar, log_level=0)

    def matchers(self, compiled, n: int) -> list:
        return [compiled.deep_copy() for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                              bitmask.data_ptr(), bitmask.shape[1] * 4, len(matchers))

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.apply_bitmask(logits, bitmask)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def done(self, matcher) -> bool:
        return matcher.is_stopped()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int):
        import xgrammar

        self.xgr, self.vocab = xgrammar, vocab
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(self.info)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matchers(self, compiled, n: int) -> list:
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, backend="torch_native")

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def done(self, matcher) -> bool:
        return matcher.is_terminated()


def measure(backend, schemas: list[dict], steps: int, seed: int) -> dict:
    compile_ms, fill_ms, apply_ms, tokens = [], [], [], 0
    words = (backend.vocab + 31) // 32
    gen = torch.Generator().manual_seed(seed)
    for schema in schemas:
        t = time.perf_counter()
        compiled = backend.compile(schema)
        compile_ms.append((time.perf_counter() - t) * 1000)
        matchers = backend.matchers(compiled, BATCH)
        live = list(range(BATCH))
        for _ in range(steps):
            if not live:
                break
            bitmask = torch.full((len(live), words), -1, dtype=torch.int32)
            t = time.perf_counter()
            backend.fill([matchers[i] for i in live], bitmask)
            fill_ms.append((time.perf_counter() - t) * 1000)
            logits = torch.randn(len(live), backend.vocab, generator=gen)
            t = time.perf_counter()
            backend.apply(logits, bitmask)
            apply_ms.append((time.perf_counter() - t) * 1000)
            picks = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1).tolist()
            for i, token in zip(list(live), picks):
                assert backend.accept(matchers[i], token), "a masked token was refused"
                tokens += 1
                if backend.done(matchers[i]):
                    live.remove(i)

    def p(values, q):
        values = sorted(values)
        return round(values[min(len(values) - 1, int(q / 100 * len(values)))], 3)

    return {"backend": backend.name, "schemas": len(schemas), "tokens": tokens,
            "compile_ms_p50": p(compile_ms, 50), "compile_ms_p99": p(compile_ms, 99),
            "compile_ms_total": round(sum(compile_ms), 1),
            "fill_batch16_ms_p50": p(fill_ms, 50), "fill_batch16_ms_p99": p(fill_ms, 99),
            "apply_batch16_ms_p50": p(apply_ms, 50),
            "fill_per_token_us_mean": round(sum(fill_ms) * 1000 / max(tokens, 1), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemas", type=int, default=100)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from bench.random_model import padded_tokenizer

    rng = random.Random(7)
    schemas = [object_schema(rng) for _ in range(args.schemas)]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = padded_tokenizer(args.vocab, Path(tmp))
    results = []
    for cls in (LLGuidance, XGrammar):
        try:
            t = time.perf_counter()
            backend = cls(tokenizer, args.vocab)
            wrap_s = round(time.perf_counter() - t, 2)
        except ImportError as exc:
            print(f"{cls.name}: not installed ({exc})")
            continue
        row = measure(backend, schemas, args.steps, seed=1)
        row["tokenizer_wrap_s"] = wrap_s
        results.append(row)
    print(json.dumps(results, indent=2))
    keys = ["backend", "tokenizer_wrap_s", "compile_ms_p50", "compile_ms_p99", "compile_ms_total",
            "fill_batch16_ms_p50", "fill_batch16_ms_p99", "apply_batch16_ms_p50", "fill_per_token_us_mean", "tokens"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in results:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
