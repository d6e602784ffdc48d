"""Write a tiny Qwen2-architecture checkpoint that loads through the real path.

The hub is not always reachable (CI, air-gapped machines, a laptop on a
train), yet the server, the tests and the demo must exercise the same
loading code as production: ``AutoTokenizer`` + ``AutoModelForCausalLM`` +
``PeftModel``. So we build, offline and in seconds:

* a byte-level BPE tokenizer trained on the Thai text in ``assets/``, with
  Qwen's special tokens and ChatML chat template;
* a randomly initialised ``Qwen2ForCausalLM`` (its output is not meaningful);
* a peft LoRA adapter on the attention projections, saved with the tokenizer,
  like the real ``models/qwen_thai_lora``.

Usage: ``python -m api.engine.demo_checkpoint --out models/demo``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5-Instruct's ChatML template, without the tool-calling branches.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus_lines() -> list[str]:
    lines: list[str] = []
    for path in sorted(ASSETS.glob("thai_corpus*.txt")) + sorted((ASSETS / "examples").glob("*.txt")):
        lines.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not lines:
        raise FileNotFoundError(f"no Thai training text found under {ASSETS}")
    return lines


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer (Qwen's kind) trained on the bundled Thai text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_demo_checkpoint(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 3000,
    max_position_embeddings: int = 4096,
    lora_rank: int = 8,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``out_dir/base`` and ``out_dir/lora``; returns both paths."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    base_dir, lora_dir = out / "base", out / "lora"
    base_dir.mkdir(parents=True, exist_ok=True)
    lora_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = train_tokenizer(vocab_size)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        initializer_range=0.1,  # peaked logits: greedy output is stable across batch shapes
        bos_token_id=eos_ids[1],
        eos_token_id=eos_ids,
        pad_token_id=eos_ids[1],
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=eos_ids[1], bos_token_id=eos_ids[1],
        do_sample=True, temperature=0.7, top_p=0.9,
    )
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    lora = LoraConfig(
        r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # a fresh adapter is a no-op (B = 0); make it change the output
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(lora_dir)
    tokenizer.save_pretrained(lora_dir)
    cfg_path = lora_dir / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = "../base"
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2))
    (out / "DEMO_CHECKPOINT.txt").write_text(
        "Random-weight Qwen2 demo checkpoint generated by api.engine.demo_checkpoint.\n"
        "Its output is not meaningful; it exists so the server runs offline.\n"
    )
    return base_dir, lora_dir


def ensure_demo_checkpoint(out_dir: str | Path) -> tuple[Path, Path]:
    """Build the default demo checkpoint unless a complete one is already there."""
    out = Path(out_dir)
    if (out / "DEMO_CHECKPOINT.txt").exists() and (out / "lora" / "adapter_config.json").exists():
        return out / "base", out / "lora"
    return build_demo_checkpoint(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="models/demo", help="output directory")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base, lora = build_demo_checkpoint(
        args.out, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size, seed=args.seed,
    )
    print(f"base model: {base}\nLoRA adapter: {lora}")


if __name__ == "__main__":
    main()
