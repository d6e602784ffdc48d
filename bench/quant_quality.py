"""How much CPU quantization changes the model's predictions: KL divergence per token.

Loads the same checkpoint through the product's loader (``THAI_QUANTIZATION`` none,
then each setting asked for, same dtype), runs the bundled Thai texts
(``assets/examples``) through each, and reports per setting the mean and worst
KL(reference || quantized) of the next-token distributions, and how often the top
token agrees::

    python -m bench.quant_quality --model /tmp/qwen15 [--lora DIR] [--dtype bfloat16] \
        [--quantization int8,w8a8,w8a8:head-unquantized]

On random weights (``bench.random_model``) the numbers say how much the
arithmetic moves, not how a trained model's quality changes; run it on the
real base model and adapter for that.
"""

from __future__ import annotations

import argparse
import json

from api.engine.loader import load_model_bundle
from api.engine.quantize import kl_divergence, next_token_logprobs
from api.settings import ModelSettings
from bench.servers import REPO


def kl_stats(model: str, lora: str, dtype: str, window: int = 256, max_tokens: int = 1024,
             quantization: str = "int8") -> dict:
    return kl_table(model, lora, dtype, window, max_tokens, (quantization,))[quantization]


def kl_table(model: str, lora: str, dtype: str, window: int = 256, max_tokens: int = 1024,
             quantizations: tuple[str, ...] = ("int8", "w8a8"),
             reference_dtype: str | None = None) -> dict[str, dict]:
    """Each setting at ``dtype`` against the unquantized model at ``reference_dtype``
    (default ``dtype``; float32 with setting ``none`` gives bf16's own cost)."""
    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "assets" / "examples").glob("*.txt"))]
    common = dict(base_model=model, lora_path=lora, require_model=True, device="cpu", dtype=dtype)
    reference = load_model_bundle(ModelSettings(**{**common, "dtype": reference_dtype or dtype},
                                                quantization="none"))
    ids = [i for text in texts for i in reference.tokenizer(text)["input_ids"]][:max_tokens]
    ref = next_token_logprobs(reference.model, ids, window)
    del reference
    table = {}
    for quantization in quantizations:
        setting, _, variant = quantization.partition(":")
        quantized = load_model_bundle(ModelSettings(**common, quantization=setting,
                                                    quant_cache_dir=""))
        if variant == "head-unquantized":
            unquantize_tied_head(quantized.model)
        q = next_token_logprobs(quantized.model, ids, window)
        del quantized
        kl = kl_divergence(ref, q)
        table[quantization] = {
            "quantization": quantization, "tokens": len(ids), "dtype": dtype,
            "reference_dtype": reference_dtype or dtype,
            "kl_mean": round(kl.mean().item(), 6), "kl_p99": round(kl.quantile(0.99).item(), 6),
            "kl_max": round(kl.max().item(), 6),
            "top1_agreement": round((ref.argmax(-1) == q.argmax(-1)).float().mean().item(), 4)}
    return table


def unquantize_tied_head(model) -> None:
    """Put back a full-precision output projection (the tied embedding matrix), to measure
    what quantizing ``lm_head`` alone costs (setting ``w8a8:head-unquantized``)."""
    from torch import nn

    embedding = model.get_input_embeddings()
    head = nn.Linear(embedding.weight.shape[1], embedding.weight.shape[0], bias=False)
    head.weight = embedding.weight
    model.lm_head = head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lora", default="")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--quantization", default="int8,w8a8",
                        help="comma-separated THAI_QUANTIZATION settings to compare with none; "
                        "SETTING:head-unquantized keeps the tied output projection unquantized")
    parser.add_argument("--reference-dtype", help="the unquantized reference's dtype (default "
                        "--dtype); with float32, add 'none' to --quantization for bf16's own cost")
    args = parser.parse_args()
    table = kl_table(args.model, args.lora, args.dtype, max_tokens=args.max_tokens,
                     quantizations=tuple(q for q in args.quantization.split(",") if q),
                     reference_dtype=args.reference_dtype)
    print(json.dumps(table))
    print("| setting | against | tokens | KL mean | KL p99 | KL max | top-1 agreement |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in table.values():
        print(f"| {row['quantization']} ({row['dtype']}) | {row['reference_dtype']} | "
              f"{row['tokens']} | {row['kl_mean']} | {row['kl_p99']} | {row['kl_max']} | "
              f"{row['top1_agreement']} |")


if __name__ == "__main__":
    main()
