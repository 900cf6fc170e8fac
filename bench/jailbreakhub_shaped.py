"""Write a data file shaped like JailbreakHub (prompt, jailbreak) for GPU runs without the hub.

The prompts are random English words, with the real set's length spread in o200k tokens: benign
prompts mostly 5-40 tokens (log-normal, median 18), jailbreak prompts median ~350, 10% over ~900,
at most ~3,300 (log-normal, sigma 0.74, cut there). The words are one token each in o200k.
    python bench/jailbreakhub_shaped.py data.csv [--rows 2000] [--seed 0]
"""
import argparse
import csv
import math
import random

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one "
         "had by word but not what all were we when your can said there use an each which she do how their "
         "if will up other about out many then them these so some her would make like him into time has look "
         "two more write go see number no way could people my than first water been call who oil its now find "
         "long down day did get come made may part ignore previous instructions pretend act mode answer").split()


def prompt_length(rng: random.Random, jailbreak: bool) -> int:
    if jailbreak:
        return min(3300, max(30, round(math.exp(rng.gauss(math.log(350), 0.74)))))
    return min(400, max(3, round(math.exp(rng.gauss(math.log(18), 0.6)))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--rows", type=int, default=2000, help="rows, half jailbreak")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    with open(args.path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "jailbreak"])
        for i in range(args.rows):
            jailbreak = i % 2 == 1
            n = prompt_length(rng, jailbreak)
            writer.writerow([" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".",
                             "true" if jailbreak else "false"])
    print(f"wrote {args.rows} rows to {args.path}")


if __name__ == "__main__":
    main()
