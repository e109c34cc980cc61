"""A deterministic /think chat data set for the training benchmarks: same seed, same bytes, on any machine.

Each line is gradflow's `{"id": ..., "messages": [user, assistant]}` JSONL; the assistant content holds
`<think-task>`, `<think-safety>`, `<think-policy>` and `<final>`, each once and in that order (it passes
`gradflow.data.think.parse`). Sample lengths are log-normal: with gradflow's byte-level preset tokenizer
(one token per ASCII character, one per chat or /think tag) the median is about 500 tokens, and a few samples pass
2048 tokens, so that truncation is exercised too. The text is drawn from a small word list with a fixed
per-topic bias, so a model can learn something from it and the loss falls.

    python bench/think_data.py OUT.jsonl [--samples 512] [--seed 0] [--median 500]
"""

from __future__ import annotations

import argparse
import json
import math
import random

WORDS = (
    "the a model gradient loss layer token batch step weight adapter rank memory device kernel attention head "
    "value key query norm scale shift learn rate update check flow through every each one two three four "
    "before after while when then so but and or not never always only first last next sample data set train "
    "test measure report plan pack pad mask sequence length budget peak fast slow correct honest same other"
).split()
TOPICS = ("arithmetic", "packing", "memory", "checkpointing", "attention", "tokenizers", "optimizers", "safety")
SAFETY = ("benign", "benign: no personal data", "benign: public technical topic", "needs care: cite the measurement")
POLICY = ("be brief", "show the numbers", "answer, then one caveat", "state the tolerance")
OVERHEAD = 40  # tokens of chat and /think tags and fixed phrases around the generated text


def _sentence(rng: random.Random, bias: list[str], n_words: int) -> str:
    words = [rng.choice(bias) if rng.random() < 0.35 else rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def _text(rng: random.Random, bias: list[str], chars: int) -> str:
    out, size = [], 0
    while size < chars:
        s = _sentence(rng, bias, rng.randint(6, 16))
        out.append(s)
        size += len(s) + 1
    return " ".join(out)[: max(chars, 1)].rstrip() or "ok"


def sample(i: int, rng: random.Random, median: int) -> dict:
    """One /think conversation whose tokenised length is drawn from a log-normal around `median`."""
    topic = TOPICS[i % len(TOPICS)]
    bias = [w for j, w in enumerate(WORDS) if (j + i % len(TOPICS)) % 5 == 0]
    total = int(min(max(rng.lognormvariate(math.log(median), 0.6), 96), 6000))
    body = max(total - OVERHEAD, 40)
    # the split of the body between the turns and blocks varies per sample
    shares = [rng.uniform(0.5, 1.5) for _ in range(5)]
    parts = [max(8, int(body * s / sum(shares))) for s in shares]
    user = f"About {topic}: " + _text(rng, bias, parts[0])
    assistant = (
        f"<think-task>{_text(rng, bias, parts[1])}</think-task>"
        f"<think-safety>{rng.choice(SAFETY)}. {_text(rng, bias, parts[2] // 4)}</think-safety>"
        f"<think-policy>{rng.choice(POLICY)}. {_text(rng, bias, parts[3] // 4)}</think-policy>"
        f"<final>{_text(rng, bias, parts[4] + parts[2] - parts[2] // 4 + parts[3] - parts[3] // 4)}</final>"
    )
    return {"id": f"think-{i:04d}", "messages": [{"role": "user", "content": user},
                                                 {"role": "assistant", "content": assistant}]}


def generate(samples: int = 512, seed: int = 0, median: int = 500) -> list[dict]:
    """The data set as a list of records (deterministic in `samples`, `seed` and `median`)."""
    rng = random.Random(seed)
    return [sample(i, rng, median) for i in range(samples)]


def write(path: str, samples: int = 512, seed: int = 0, median: int = 500) -> int:
    """Write the JSONL file; returns the number of lines."""
    rows = generate(samples, seed, median)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return len(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--median", type=int, default=500, help="median tokens per sample (byte-level tokenizer)")
    args = ap.parse_args(argv)
    print(f"wrote {write(args.out, args.samples, args.seed, args.median)} samples to {args.out}")


if __name__ == "__main__":
    main()
