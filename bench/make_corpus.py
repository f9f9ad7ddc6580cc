#!/usr/bin/env python3
# make_corpus.py: a large test corpus from a small text: its blank-line-separated paragraphs, shuffled (seeded)
# and repeated until the output reaches --mb megabytes, written as one file (documents separated by blank lines).
# Used by bench/prepare_memory.sh and bench/prepare_vs_hf.py; the output is not committed.
# usage: make_corpus.py --text tinyshakespeare.txt --mb 200 --out big.txt [--seed 1]
import argparse, random


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--mb", type=float, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    paras = [p.strip("\n") for p in open(a.text, encoding="utf-8").read().split("\n\n") if p.strip()]
    rng = random.Random(a.seed)
    target = int(a.mb * 1e6)
    n = 0
    with open(a.out, "w", encoding="utf-8") as f:
        while n < target:
            rng.shuffle(paras)
            for p in paras:
                s = p + "\n\n"
                f.write(s)
                n += len(s.encode("utf-8"))
                if n >= target:
                    break
    print("%s: %.1f MB, %d paragraphs shuffled and repeated" % (a.out, n / 1e6, len(paras)))


if __name__ == "__main__":
    main()
