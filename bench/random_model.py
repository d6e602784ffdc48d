"""Build a random-weight model with a real model's exact shape, offline.

For the GPU benchmark we want Qwen2.5-1.5B-Instruct's cost per token (same
layers, heads, KV heads, MLP and 151,936-entry vocabulary) without
downloading it. The config values live in ``bench/qwen2_5_1_5b_config.json``.

The tokenizer is the demo checkpoint's Thai byte-level BPE, padded up to the
model's vocabulary size with plain ASCII "words" that decode cleanly: a random
model picks ids all over the vocabulary, and each must turn into text so every
generated token is streamed (and timed) like a real one.

    python -m bench.random_model --out DIR [--shape qwen2.5-1.5b|small] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import itertools
import json
import string
from pathlib import Path

CONFIG = Path(__file__).resolve().parent / "qwen2_5_1_5b_config.json"
# A CPU-sized stand-in used to test the GPU script without a GPU (same vocabulary).
SMALL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def padded_tokenizer(vocab_size: int, out: Path):
    """The demo tokenizer with filler tokens appended until it has ``vocab_size`` ids."""
    from transformers import AutoTokenizer

    from api.engine.demo_checkpoint import train_tokenizer

    train_tokenizer(3000).save_pretrained(out)
    path = out / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    taken = set(vocab) | {t["content"] for t in data.get("added_tokens", [])}
    used_ids = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    next_id = max(used_ids) + 1
    letters = string.ascii_lowercase
    fillers = ("\u0120" + "".join(p) for n in itertools.count(2)  # "Ġab": " ab" once decoded
               for p in itertools.product(letters, repeat=n))
    for token in fillers:
        if next_id >= vocab_size:
            break
        if token not in taken:
            vocab[token] = next_id
            next_id += 1
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def build_random_model(out_dir: str | Path, *, shape: str = "qwen2.5-1.5b", dtype: str = "bfloat16",
                       device: str = "cpu", seed: int = 0) -> Path:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = json.loads(CONFIG.read_text())
    if shape == "small":
        values.update(SMALL)
    tokenizer = padded_tokenizer(values["vocab_size"], out)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    values.update(eos_token_id=eos, bos_token_id=eos[1], pad_token_id=eos[1])
    values.pop("torch_dtype", None)
    config = Qwen2Config(**values)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):  # initialise on the GPU when there is one: much faster
            model = Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[1],
                                               bos_token_id=eos[1])
    model.save_pretrained(out)
    (out / "RANDOM_WEIGHTS.txt").write_text(
        f"Random weights with the shape of {CONFIG.name} ({shape}); output is not meaningful.\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", choices=("qwen2.5-1.5b", "small"), default="qwen2.5-1.5b")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cpu", help="where to initialise the weights")
    args = parser.parse_args(argv)
    print(build_random_model(args.out, shape=args.shape, dtype=args.dtype, device=args.device))


if __name__ == "__main__":
    main()
