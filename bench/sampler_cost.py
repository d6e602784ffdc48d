"""What choosing the next token costs per decode step, on Qwen2.5's 151,936-token vocabulary.

A 1.5B decode step on two CPU cores takes ~45 ms; a sampler that sorts the vocabulary for
top-p (~16 ms a row) and draws with ``torch.multinomial`` (~5 ms a row) adds half of that
again for every request that keeps the default temperature 0.7 / top_p 0.9. This prints the
milliseconds per step of ``api.engine.sampler.sample_batch`` beside that plain path (the one
transformers' TopPLogitsWarper takes: full sort, softmax, cumsum, multinomial), for greedy,
temperature-only and top-p rows, at batch 1, 8 and 32, with logits shaped like a trained
model's (Zipf-like: the probability of the r-th most likely token falls as r^-1.1, so the
nucleus is a few dozen tokens) and as flat as a random model's (the nucleus is most of the
vocabulary, so the sampler sorts in full as well).

    python -m bench.sampler_cost [--threads 1] [--vocab 151936]
"""

from __future__ import annotations

import argparse
import time

import torch

from api.engine.sampler import NGramBlocker, RowRule, sample_batch


def plain_path(logits: torch.Tensor, temperature: float, top_p: float) -> list[int]:
    """Full sort + cumsum + multinomial, as transformers' TopPLogitsWarper samples."""
    scaled = logits / temperature
    ordered, order = scaled.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) > top_p, 0.0)
    picks = torch.multinomial(probs, 1)
    return order.gather(1, picks).squeeze(1).tolist()


def ms_per_call(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a server's "
                        "sampler runs beside the model's own threads)")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"vocabulary {args.vocab:,}, {args.threads} thread(s), ms per step "
          f"(mean of {args.repeats} calls)")
    print("| logits | batch | setting | nucleus | sample_batch ms | plain path ms | ratio |")
    print("|---|---:|---|---:|---:|---:|---:|")
    ranks = torch.arange(1, args.vocab + 1, dtype=torch.float32)
    for shape in ("Zipf-like", "flat"):
        for batch in (1, 8, 32):
            if shape == "flat":
                logits = torch.randn(batch, args.vocab, generator=generator)
            else:  # each row its own order of the vocabulary
                zipf = -1.1 * ranks.log() + 0.1 * torch.randn(args.vocab, generator=generator)
                logits = torch.stack([zipf[torch.randperm(args.vocab, generator=generator)]
                                      for _ in range(batch)])
            for name, temperature, top_p in (("greedy", 0.0, 1.0), ("temperature 0.7", 0.7, 1.0),
                                             ("0.7 / top_p 0.9", 0.7, 0.9)):
                rows = [RowRule(temperature=temperature, top_p=top_p, generator=None,
                                blocker=NGramBlocker(0), suppress=[]) for _ in range(batch)]
                ours = ms_per_call(lambda: sample_batch(logits, rows), args.repeats)
                if temperature == 0.0:
                    plain = ms_per_call(lambda: logits.argmax(dim=-1).tolist(), args.repeats)
                else:
                    plain = ms_per_call(lambda: plain_path(logits, temperature, top_p),
                                        args.repeats)
                probs = (logits[0] / max(temperature, 1e-5)).softmax(dim=-1).sort(
                    descending=True).values
                nucleus = int(((probs.cumsum(0) - probs) <= top_p).sum()) if top_p < 1 else "-"
                print(f"| {shape} | {batch} | {name} | {nucleus} | {ours:.2f} | {plain:.2f} | "
                      f"{plain / ours:.1f}x |")


if __name__ == "__main__":
    main()
