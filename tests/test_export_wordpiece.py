#!/usr/bin/env python3
# test_export_wordpiece.py: the vocabulary `mlm export` writes for a WordPiece checkpoint is the vocab.txt it trained
# with, byte for byte (read from the safetensors header with the standard library: no mlm code involved), and
# Hugging Face's BertTokenizerFast built from that exported text (do_lower_case from its "lowercase") puts each [MASK]
# at the token positions `mlm fill --json` reports and has the special ids the export records. A tiny bert-tiny run
# (2 steps) on a set prepared from 50 KB of the corpus; about 7 s. Exit 0 pass, 1 fail, 77 skipped (no transformers).
# Usage: test_export_wordpiece.py --mlm build/mlm --configs configs --vocab vocab.txt --corpus tinyshakespeare.txt
import argparse, json, os, struct, subprocess, sys, tempfile

TEXTS = ["the [MASK] of denmark", "To be, or not to be: that is the [MASK].", "[MASK] unaffable Café crème [MASK]!",
         "中华[MASK]民 don't [MASK]"]


def run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout}\n{res.stderr}\n")
        sys.exit(1)
    return res.stdout


def metadata(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))["__metadata__"]


def main():
    ap = argparse.ArgumentParser()
    for a in ("--mlm", "--configs", "--vocab", "--corpus"):
        ap.add_argument(a, required=True)
    args = ap.parse_args()
    for p in (args.vocab, args.corpus):
        if not os.access(p, os.R_OK):
            print(f"SKIP: {p} is missing")
            return 77
    failures = 0
    with tempfile.TemporaryDirectory(prefix="mlm_export_wp_") as tmp:
        text = os.path.join(tmp, "text.txt")
        with open(args.corpus, "rb") as src, open(text, "wb") as dst:
            dst.write(src.read(50000))
        s = os.path.join(tmp, "set")
        run([args.mlm, "prepare", "-q", "--tokenizer", "wordpiece", "--vocab", args.vocab, "--documents", "blank",
             "--valid-fraction", "0.05", "-o", s, text])
        r = os.path.join(tmp, "run")
        run([args.mlm, "train", "--config", os.path.join(args.configs, "bert-tiny.conf"), "--set", f"data.path={s}",
             "--set", "train.batch_size=2", "--set", "train.threads=2", "--device", "cpu", "-q", "--steps", "2", "-o", r])
        out = os.path.join(tmp, "w.safetensors")
        run([args.mlm, "export", "--ckpt", r, "--out", out])
        meta = metadata(out)
        want = open(args.vocab, encoding="utf-8", newline="").read()
        ok = meta.get("vocab_wordpiece") == want and meta.get("tokenizer") == "wordpiece"
        print(f"exported vocab_wordpiece: {len(meta.get('vocab_wordpiece', ''))} characters, equal to vocab.txt: {ok}")
        failures += not ok
        try:
            from transformers import BertTokenizerFast
        except ImportError as e:
            print(f"SKIP: transformers is not importable ({e}); the vocabulary itself matched" if ok else "FAIL")
            return 77 if ok else 1
        exported = os.path.join(tmp, "exported-vocab.txt")
        with open(exported, "w", encoding="utf-8", newline="") as f:
            f.write(meta["vocab_wordpiece"])
        tok = BertTokenizerFast(exported, do_lower_case=meta["lowercase"] == "true")
        specials = {"pad_id": tok.pad_token_id, "mask_id": tok.mask_token_id, "unk_id": tok.unk_token_id,
                    "cls_id": tok.cls_token_id, "sep_id": tok.sep_token_id}
        for k, v in specials.items():
            if int(meta[k]) != v:
                print(f"FAIL: {k} {meta[k]} in the export, {v} in BertTokenizerFast")
                failures += 1
        for t in TEXTS:
            ids = tok(t, add_special_tokens=False)["input_ids"]
            hf = [i for i, x in enumerate(ids) if x == tok.mask_token_id]
            res = json.loads(run([args.mlm, "fill", "--ckpt", r, "--json", "--top-k", "3", t]))
            got = [p["index"] for p in res["positions"]]
            vocab = meta["vocab_wordpiece"].split("\n")
            texts_ok = all(c["char"] == vocab[c["id"]] for p in res["positions"] for c in p["top"])
            print(f"{t!r}: [MASK] at {got} (mlm fill), {hf} (BertTokenizerFast); candidate texts match ids: {texts_ok}")
            if got != hf or not texts_ok or len(got) != t.count("[MASK]"):
                failures += 1
    print(f"test_export_wordpiece: {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
