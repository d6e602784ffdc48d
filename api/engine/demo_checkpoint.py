"""Write a tiny Qwen2-architecture checkpoint that loads through the real path.

The hub is not always reachable (CI, air-gapped machines, a laptop on a
train), yet the server, the tests and the demo must exercise the same
loading code as production: ``AutoTokenizer`` + ``AutoModelForCausalLM`` +
``PeftModel``. So we build, offline and in seconds:

* a byte-level BPE tokenizer trained on the Thai text in ``assets/``, with
  Qwen's special tokens, its ``<tool_call>``/``</tool_call>`` tokens and
  Qwen2.5-Instruct's chat template (tool calling included);
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

# Tool-call tags. Qwen2.5's tokenizer has each as one added token that is *not* special
# (``"special": false`` in its tokenizer_config.json), so ``skip_special_tokens=True``
# keeps them in the decoded text, where the hermes-style parser finds them.
TOOL_CALL_TOKENS = ["<tool_call>", "</tool_call>"]

# Qwen2.5-Instruct's chat template, verbatim (tokenizer_config.json of
# Qwen/Qwen2.5-{0.5B..72B}-Instruct): the ``tools`` branch puts the function signatures in
# the system turn inside <tools></tools>; assistant ``tool_calls`` are rendered as
# ``<tool_call>\n{"name": ..., "arguments": <arguments | tojson>}\n</tool_call>`` (so
# ``arguments`` must be a dict here; api.serving.tools.template_messages parses the
# OpenAI JSON string); role ``tool`` messages become <tool_response> blocks in a user turn.
CHATML_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


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


def add_tool_call_tokens(tokenizer) -> None:
    """Give ``tokenizer`` Qwen2.5's ``<tool_call>``/``</tool_call>`` tokens, after its vocabulary.

    Plain added tokens (``special=False``, as Qwen's ids 151657/151658): each tag encodes
    to one id and still decodes with ``skip_special_tokens=True``. Kept out of
    :func:`train_tokenizer`, whose callers (bench/random_model.py pads its vocabulary
    after the trained ids) expect only the trained vocabulary.
    """
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_CALL_TOKENS])


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
    n_trained = len(tokenizer)
    add_tool_call_tokens(tokenizer)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    # The model is built on the trained vocabulary and then grown by the tool-call tokens with
    # zero embeddings: every other weight is what it was before those tokens existed (the same
    # seed draws the same numbers), and a zero row scores 0 under the tied head, below the
    # peaked maximum, so greedy outputs are unchanged. Grammar-forced tool calls still emit them.
    config = Qwen2Config(
        vocab_size=n_trained,
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
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # leave the LoRA init's draws alone
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # config.vocab_size too
        model.get_input_embeddings().weight[n_trained:] = 0.0
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


def derive_adapter(lora_dir: str | Path, out_dir: str | Path, *, seed: int = 1,
                   scale: float = 0.05) -> Path:
    """Write a second adapter for the same base: ``lora_dir``'s config and tokenizer files,
    with its B matrices drawn again (seed ``seed``) so its output differs. For tests and
    ``bench/multi_lora.py``: several adapters over one demo base, as a team that retrains has."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src, out = Path(lora_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.name != "adapter_model.safetensors":
            shutil.copy2(item, out / item.name)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for key, tensor in tensors.items():
        if "lora_B" in key:
            tensors[key] = (torch.randn(tensor.shape, generator=generator) * scale).to(tensor.dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


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
