#!/usr/bin/env python3
# prepare_vs_hf.py: WordPiece tokenization throughput of `mlm prepare` against Hugging Face's BertTokenizerFast
# and tokenizers' BertWordPieceTokenizer (batched, the same thread count) on the same file, with the same BERT uncased vocab.txt, documents = blank-line
# separated blocks. mlm's figure is end to end (read, tokenize, write the shards); Hugging Face's covers reading
# and splitting the file and encode_batch over batches of documents (ids discarded), so it does less work.
# Both report MB/s of input over wall time and over CPU time (user + system), best of --repeat runs, and the
# token counts, which must agree.
# usage: prepare_vs_hf.py --mlm build/mlm --vocab vocab.txt --text corpus.txt [--threads 2] [--repeat 3]
import argparse, os, resource, shutil, subprocess, sys, tempfile, time


def cpu_children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_self():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_mlm(a, out):
    c0, t0 = cpu_children(), time.perf_counter()
    subprocess.run([a.mlm, "prepare", "-q", "--force", "-t", "wordpiece", "--vocab", a.vocab, "--documents", "blank",
                    "--valid-fraction", "0", "--threads", str(a.threads), "-o", out, a.text], check=True)
    wall, cpu = time.perf_counter() - t0, cpu_children() - c0
    man = dict(l.rstrip("\n").split(" = ", 1) for l in open(os.path.join(out, "manifest.txt")) if " = " in l)
    return wall, cpu, int(man["train_tokens"]) + int(man["valid_tokens"])


def run_hf(a, tok):
    c0, t0 = cpu_self(), time.perf_counter()
    text = open(a.text, encoding="utf-8").read()
    docs = [d for d in text.split("\n\n") if d.strip()]
    n = 0
    for i in range(0, len(docs), a.batch):
        for ids in tok(docs[i:i + a.batch], add_special_tokens=False)["input_ids"]:
            n += len(ids)
    return time.perf_counter() - t0, cpu_self() - c0, n


def run_hf_wordpiece(a, tok):
    c0, t0 = cpu_self(), time.perf_counter()
    text = open(a.text, encoding="utf-8").read()
    docs = [d for d in text.split("\n\n") if d.strip()]
    n = 0
    for i in range(0, len(docs), a.batch):
        for e in tok.encode_batch(docs[i:i + a.batch], add_special_tokens=False):
            n += len(e.ids)
    return time.perf_counter() - t0, cpu_self() - c0, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mlm", required=True)
    ap.add_argument("--vocab", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1000, help="documents per encode_batch call")
    a = ap.parse_args()
    # tokenizers parallelises encode_batch with rayon: pin its pool to the same thread count.
    os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = str(a.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from transformers import BertTokenizerFast
    import tokenizers
    tok = BertTokenizerFast(a.vocab, do_lower_case=True)
    wp = tokenizers.BertWordPieceTokenizer(a.vocab, lowercase=True)
    mb = os.path.getsize(a.text) / 1e6
    out = tempfile.mkdtemp(prefix="mlm_bench_prepare_")
    try:
        best = {}
        for _ in range(a.repeat):
            for name, fn in (("mlm prepare", lambda: run_mlm(a, out)), ("HF BertTokenizerFast", lambda: run_hf(a, tok)),
                             ("HF BertWordPieceTok.", lambda: run_hf_wordpiece(a, wp))):
                wall, cpu, n = fn()
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, cpu, n)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print("%s: %.1f MB, %d threads, best of %d (tokenizers %s)" % (a.text, mb, a.threads, a.repeat, tokenizers.__version__))
    print("%-22s %8s %8s %10s %10s %12s" % ("", "wall s", "cpu s", "MB/s wall", "MB/s cpu", "tokens"))
    for name, (wall, cpu, n) in best.items():
        print("%-22s %8.2f %8.2f %10.2f %10.2f %12d" % (name, wall, cpu, mb / wall, mb / cpu, n))
    counts = {v[2] for v in best.values()}
    if len(counts) != 1:
        print("token counts differ: %s" % best)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
