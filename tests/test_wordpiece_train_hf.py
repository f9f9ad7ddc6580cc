#!/usr/bin/env python3
# test_wordpiece_train_hf.py: a vocabulary trained by `mlm vocab` against one trained by Hugging Face tokenizers'
# WordPiece trainer (BertWordPieceTokenizer.train, the same defaults: lowercase, min_frequency 2, limit_alphabet
# 1000) on the same corpus and size. Both vocabularies tokenize the corpus with the same tokenizer (Hugging Face's
# BertWordPieceTokenizer); tokens per word must agree within 2%. Prints both figures, the overlap of the two
# vocabularies (shared tokens), and, as the yardstick, the overlap of two Hugging Face runs: its trainer gives the
# "##c" tokens their ids in hash order, so its own ties (and a few tokens) change from run to run.
# Also checks: mlm's vocabulary loads in Hugging Face, starts with the five specials, has the requested size, and
# the lowercase=False pipeline (--no-lowercase) agrees the same way at one size; and the same on a generated
# multilingual text (accents, Greek, Cyrillic, Hangul, kana, CJK, punctuation), lower-cased and cased.
# Usage: test_wordpiece_train_hf.py --mlm build/mlm --corpus tinyshakespeare.txt   (about 15 s of CPU)
import argparse, os, subprocess, sys, tempfile, time

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def read_vocab(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def tokens_per_word(vocab_path, lines, lower):
    from tokenizers import BertWordPieceTokenizer
    tok = BertWordPieceTokenizer(vocab_path, lowercase=lower)
    enc = tok.encode_batch(lines, add_special_tokens=False)
    n_tokens = sum(len(e.ids) for e in enc)
    n_words = sum(len(set(w for w in e.word_ids if w is not None)) for e in enc)
    n_unk = sum(e.ids.count(tok.token_to_id("[UNK]")) for e in enc)
    return n_tokens / n_words, n_tokens, n_words, n_unk


def hf_train(corpus, size, lower, out_dir):
    from tokenizers import BertWordPieceTokenizer
    tok = BertWordPieceTokenizer(lowercase=lower)
    tok.train([corpus], vocab_size=size, min_frequency=2, limit_alphabet=1000, show_progress=False)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_model(out_dir)
    return os.path.join(out_dir, "vocab.txt")


def multilingual_text(path):
    """A deterministic mixed-script text (about 400 KB): words built from syllables of Latin with accents, Greek,
    Cyrillic, Hangul, kana and CJK ideographs (each ideograph a word of its own to BERT), punctuation between."""
    import random
    rng = random.Random(7)
    syllables = ["ka", "mé", "lo", "ré", "ñu", "ça", "ßa", "ø", "ÆR", "ἀλ", "φά", "ΣΟ", "мо", "ЖИ", "щё", "가", "나",
                 "한", "글", "の", "テ", "キ", "中", "国", "語", "文", "字", "Ö", "İs", "ŀl", "tr", "st", "en", "IN"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    weights = [1.0 / (i + 1) for i in range(len(words))]  # Zipf-like
    punct = [" ", " ", " ", " ", ", ", ". ", "! ", "¿", "«", "» ", "、", "。", " — "]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(4000):
            f.write("".join(w + rng.choice(punct) for w in rng.choices(words, weights, k=12)) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mlm", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--sizes", default="1000,4000,8000")
    a = ap.parse_args()
    try:
        import tokenizers  # noqa: F401
    except ImportError as e:
        print("SKIP: Hugging Face tokenizers is not installed (%s); tools/test.sh installs it" % e)
        return 77
    if not os.path.exists(a.corpus):
        print("SKIP: %s is missing" % a.corpus)
        return 77
    failures = 0
    with tempfile.TemporaryDirectory() as d:
        multi = os.path.join(d, "multilingual.txt")
        multilingual_text(multi)
        cases = ([(a.corpus, int(s), True) for s in a.sizes.split(",")] + [(a.corpus, 4000, False)]
                 + [(multi, 1200, True), (multi, 1200, False)])
        for corpus, size, lower in cases:
            with open(corpus, encoding="utf-8") as f:
                lines = f.read().split("\n")
            name = "shakespeare" if corpus == a.corpus else "multilingual"
            tag = "%s-%d%s" % (name, size, "" if lower else "-cased")
            mine = os.path.join(d, "mlm-%s.txt" % tag)
            t0 = time.perf_counter()
            subprocess.run([a.mlm, "vocab", "--quiet", "--size", str(size), "--out", mine]
                           + ([] if lower else ["--no-lowercase"]) + [corpus], check=True)
            t1 = time.perf_counter()
            theirs = hf_train(corpus, size, lower, os.path.join(d, "hf-%s" % tag))
            t2 = time.perf_counter()
            theirs2 = hf_train(corpus, size, lower, os.path.join(d, "hf2-%s" % tag))
            mv, hv, hv2 = read_vocab(mine), read_vocab(theirs), read_vocab(theirs2)
            tm, nt_m, nw, unk_m = tokens_per_word(mine, lines, lower)
            th, nt_h, _, unk_h = tokens_per_word(theirs, lines, lower)
            shared, shared_hf = len(set(mv) & set(hv)), len(set(hv) & set(hv2))
            rel = abs(tm - th) / th
            print("%-12s size %5d %-5s: tokens/word mlm %.5f (%d tokens) hf %.5f (%d tokens) over %d words, differ by "
                  "%.3f%%; vocab overlap mlm/hf %d of %d (%.2f%%), hf/hf (two runs) %d; [UNK] mlm %d hf %d; "
                  "train mlm %.2f s hf %.2f s"
                  % (name, size, "lower" if lower else "cased", tm, nt_m, th, nt_h, nw, 100 * rel, shared, len(hv),
                     100.0 * shared / len(hv), shared_hf, unk_m, unk_h, t1 - t0, t2 - t1))
            checks = [
                (rel <= 0.02, "tokens per word differ by %.3f%% (> 2%%)" % (100 * rel)),
                (mv[:5] == SPECIALS, "mlm's vocabulary does not start with %s: %s" % (SPECIALS, mv[:5])),
                (len(mv) == size, "mlm's vocabulary has %d tokens, not %d" % (len(mv), size)),
                (len(mv) == len(set(mv)), "mlm's vocabulary has duplicate tokens"),
                (len(hv) == size, "Hugging Face's vocabulary has %d tokens, not %d" % (len(hv), size)),
                # Same algorithm: far more shared than not (a tie-broken difference, as between two HF runs).
                (shared >= 0.99 * len(hv), "only %d of %d tokens shared with Hugging Face" % (shared, len(hv))),
            ]
            for ok, msg in checks:
                if not ok:
                    print("FAIL %s: %s" % (tag, msg))
                    failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
