"""What incremental detokenization costs per token: the tokenizer's ``decode`` against the
direct Rust call the engine uses (``api/engine/detokenizer.py``'s ``text_decoder``).

Every stream decodes twice per generated token, in the scheduler thread, so this is
part of the engine's fixed cost per step (x the number of streams)::

    python -m bench.detokenizer_cost [--tokenizer DIR] [--tokens 512] [--rounds 7]

Without ``--tokenizer`` the demo checkpoint's (Qwen2's byte-level BPE over Thai) is built
in a temporary folder. Prints JSON and one line; both paths must produce the same text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from api.engine import detokenizer
from bench.servers import REPO


def per_token_us(tokenizer, ids: list[int], decoder) -> tuple[float, str]:
    detok = detokenizer.IncrementalDetokenizer(tokenizer, ())
    detok._decode = decoder
    start = time.perf_counter()
    for token in ids:
        detok.add(token)
        detok.take()
    return (time.perf_counter() - start) / len(ids) * 1e6, detok.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: the demo checkpoint's)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = args.tokenizer
        if not path:
            from api.engine.demo_checkpoint import build_demo_checkpoint

            path = str(build_demo_checkpoint(tmp)[0])
        tokenizer = AutoTokenizer.from_pretrained(path)
    text = (REPO / "assets" / "examples" / "news.txt").read_text(encoding="utf-8")
    ids = tokenizer(text)["input_ids"][:args.tokens]
    wrapper = lambda part: tokenizer.decode(part, skip_special_tokens=True)  # noqa: E731
    direct = detokenizer.text_decoder(tokenizer)
    runs: dict[str, list[float]] = {"tokenizer.decode": [], "direct": []}
    texts = {}
    for _ in range(args.rounds):
        for name, decoder in (("tokenizer.decode", wrapper), ("direct", direct)):
            us, texts[name] = per_token_us(tokenizer, ids, decoder)
            runs[name].append(us)
    result = {name: round(statistics.median(v), 2) for name, v in runs.items()}
    result.update(tokens=len(ids), rounds=args.rounds, same_text=texts["direct"] == texts["tokenizer.decode"])
    print(json.dumps(result))
    print(f"per token: tokenizer.decode {result['tokenizer.decode']} us, direct {result['direct']} us "
          f"(median of {args.rounds}); x16 streams: {16 * result['tokenizer.decode'] / 1000:.2f} -> "
          f"{16 * result['direct'] / 1000:.2f} ms per step; same text: {result['same_text']}")


if __name__ == "__main__":
    main()
