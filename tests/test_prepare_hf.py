#!/usr/bin/env python3
# test_prepare_hf.py: `mlm prepare --tokenizer wordpiece --vocab vocab.txt` writes exactly the ids of Hugging Face's
# BertTokenizerFast(vocab, do_lower_case=True) (and do_lower_case=False with --no-lowercase), token for token, read
# back from the shards by an independent reader of the format (include/mlm/shards.h): on Tiny Shakespeare (one
# document per file, pieces cut by mlm at 256 KB and batches tokenized on several threads) and on a multilingual
# sample (CJK, accents, punctuation) as blank-line-separated documents. Also: the byte and char tokenizers against
# Python's bytes and sorted(set(text)), a 700 KB multilingual document cut into pieces, directories and standard
# input, the document boundaries and the seeded train/valid split (the same with
# 1 and 2 threads, and all documents accounted for), and that a truncated shard is refused by `mlm train`.
# Usage: test_prepare_hf.py --mlm build/mlm --vocab vocab.txt --corpus tinyshakespeare.txt
import argparse, hashlib, os, struct, subprocess, sys, tempfile, time

MULTI = [
    "Hello, World! HELLO world... unaffable", "Café crème brûlée à la carte; naïve résumé façade Ærøskøbing Straße",
    "Cafe\u0301 decomposed İstanbul ıi ﬁ", "ΑΘΗΝΑ Ὀδυσσεύς ΣΊΣΥΦΟΣ\nМосква, ЁЛКА! Їжак",
    "Tiếng Việt có dấu: Nguyễn Đình", "中华人民共和国成立了\n日本語のテキスト、カタカナとひらがな。\n한국어 텍스트입니다",
    "混合mixed中文text 𠀀𪜀 ext-B", "«quotes» „German“ ‘single’ — dash – ¿Qué? ¡Sí!",
    "$100 + 5% = <tag> ^caret `tick` |pipe| ~tilde~ @at #hash", "don't won't o'clock e.g. U.S.A. 3.14 1,000,000",
    "emoji 😀 👍🏽 ❤️ ✨ Ⅻ ① ㎏ ½ x² H₂O", "עברית ،العربية؟ हिन्दी। ไทย", "a" * 100 + " " + "b" * 101,
    "[MASK] is special; x[CLS]y[SEP] [mask]", "tab\there\rcarriage  trailing spaces   ",
]


def read_shard(path):
    b = open(path, "rb").read()
    assert b[:8] == b"MLMSHARD", path
    version, width, ntok, ndocs, vsize, flags = struct.unpack_from("<IIQQII", b, 8)
    assert version == 1 and width in (2, 4)
    hdr_hash = struct.unpack_from("<Q", b, 64)[0]
    assert hdr_hash == fnv1a(b[:64]), "header checksum"
    off = 72 + ntok * width
    off += (8 - off % 8) % 8
    payload_hash = struct.unpack_from("<Q", b, 56)[0]
    assert payload_hash == fnv1a(b[72:]), "payload checksum"
    ids = list(struct.unpack_from("<%d%s" % (ntok, "H" if width == 2 else "I"), b, 72))
    docs = list(struct.unpack_from("<%dQ" % (ndocs + 1), b, off))
    assert len(b) == off + 8 * (ndocs + 1) and docs[0] == 0 and docs[-1] == ntok
    return ids, docs, flags, payload_hash


def fnv1a(data):
    h = 0xcbf29ce484222325
    for x in data:
        h = ((h ^ x) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def read_set(d):
    """The set's manifest (checksum checked: md5 of every byte before the last line) and both splits' tokens."""
    raw = open(os.path.join(d, "manifest.txt"), "rb").read()
    body, last = raw[:raw.rstrip(b"\n").rfind(b"\n") + 1], raw[raw.rstrip(b"\n").rfind(b"\n") + 1:]
    assert last == b"checksum = " + hashlib.md5(body).hexdigest().encode() + b"\n", "manifest checksum"
    man, shards = {}, []
    for line in body.decode("utf-8").splitlines():
        if line.startswith("#") or " = " not in line:
            continue
        k, v = line.split(" = ", 1)
        if k == "shard":
            shards.append(v.split())
        else:
            man[k] = v
    out = {"train": ([], []), "valid": ([], [])}
    for split, f, ntok, ndocs, phash in shards:
        ids, docs, flags, h = read_shard(os.path.join(d, man.get("shard_dir", ""), f))
        assert len(ids) == int(ntok) and len(docs) == int(ndocs) + 1 and int(phash, 16) == h
        toks, bounds = out[split]
        base = len(toks)
        starts = docs[:-1][1:] if flags & 1 else docs[:-1]  # a continued document does not start here
        bounds.extend(base + s for s in starts)
        toks.extend(ids)
    return man, out


def shard_files(d):
    """The shard files of the set in d (in its shard folder)."""
    man = dict(l.split(" = ", 1) for l in open(os.path.join(d, "manifest.txt"), encoding="utf-8").read().splitlines()
               if " = " in l and not l.startswith("shard ="))
    folder = os.path.join(d, man.get("shard_dir", ""))
    return folder, sorted(f for f in os.listdir(folder) if f.endswith(".bin"))


def prepare(mlm, args, inputs, threads=2):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([mlm, "prepare", "-q", "--force"] + args + inputs, capture_output=True, env=env)
    if r.returncode != 0:
        raise SystemExit("FAIL: mlm prepare %s: %s" % (" ".join(args), r.stderr.decode()))


def check(name, mine, theirs):
    if mine == theirs:
        print("%s: %d tokens equal" % (name, len(theirs)))
        return 0
    i = next((k for k in range(min(len(mine), len(theirs))) if mine[k] != theirs[k]), min(len(mine), len(theirs)))
    print("FAIL %s: %d vs %d tokens, first difference at %d: mlm %s hf %s" % (name, len(mine), len(theirs), i,
          mine[i:i + 8], theirs[i:i + 8]))
    return 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mlm", required=True)
    ap.add_argument("--vocab", required=True)
    ap.add_argument("--corpus", required=True)
    a = ap.parse_args()
    try:
        from transformers import BertTokenizerFast
    except ImportError as e:
        print("SKIP: Hugging Face transformers is not installed (%s); tools/test.sh installs it" % e)
        return 77
    for p in (a.vocab, a.corpus):
        if not os.path.exists(p):
            print("SKIP: %s is missing" % p)
            return 77
    hf = BertTokenizerFast(a.vocab, do_lower_case=True)
    hf_cased = BertTokenizerFast(a.vocab, do_lower_case=False, strip_accents=False)
    text = open(a.corpus, encoding="utf-8").read()
    fails = 0
    with tempfile.TemporaryDirectory() as tmp:
        # 1. Tiny Shakespeare as one document: the whole text through HF at once.
        t0 = time.perf_counter()
        out = os.path.join(tmp, "wp")
        prepare(a.mlm, ["-t", "wordpiece", "--vocab", a.vocab, "-o", out], [a.corpus])
        t1 = time.perf_counter()
        man, sets = read_set(out)
        theirs = hf(text, add_special_tokens=False)["input_ids"]
        print("tinyshakespeare: mlm prepare %.2f s, hf %.2f s" % (t1 - t0, time.perf_counter() - t1))
        fails += check("tinyshakespeare wordpiece", sets["train"][0] + sets["valid"][0], theirs)
        if open(os.path.join(out, man["vocab"]), "rb").read() != open(a.vocab, "rb").read() or \
                man["vocab_md5"] != hashlib.md5(open(a.vocab, "rb").read()).hexdigest():
            print("FAIL: the vocabulary copied into the set or its checksum differs")
            fails += 1
        # 2. Multilingual documents separated by blank lines; each document through HF on its own.
        multi = os.path.join(tmp, "multi.txt")
        docs = MULTI * 3
        with open(multi, "w", encoding="utf-8") as f:
            f.write("\n\n  \n".join(docs) + "\n\n")
        for cased, tok in ((0, hf), (1, hf_cased)):
            out = os.path.join(tmp, "multi%d" % cased)
            prepare(a.mlm, ["-t", "wordpiece", "--vocab", a.vocab, "-o", out, "--documents", "blank",
                            "--valid-fraction", "0.3", "--seed", "7"] + (["--no-lowercase"] if cased else []), [multi])
            man, sets = read_set(out)
            want = {"train": [], "valid": []}
            enc = [tok(d + "\n", add_special_tokens=False)["input_ids"] for d in docs]
            split_of = {}
            for s in ("train", "valid"):
                toks, bounds = sets[s]
                for k, b in enumerate(bounds):
                    e = bounds[k + 1] if k + 1 < len(bounds) else len(toks)
                    want[s].append(toks[b:e])
            got = sets["train"][0] + sets["valid"][0]
            if sorted(map(tuple, want["train"] + want["valid"])) != sorted(map(tuple, enc)):
                print("FAIL multilingual (cased=%d): the documents read back are not HF's documents" % cased)
                fails += 1
            else:
                print("multilingual (cased=%d): %d documents, %d train / %d valid, %d tokens equal to HF's" %
                      (cased, len(enc), len(want["train"]), len(want["valid"]), len(got)))
            if not want["valid"] or not want["train"] or int(man["valid_docs"]) != len(want["valid"]):
                print("FAIL: the split by document is empty or miscounted (%s valid)" % man["valid_docs"])
                fails += 1
        # 3. The same set with 1 thread: byte-identical shards.
        out1 = os.path.join(tmp, "multi_t1")
        prepare(a.mlm, ["-t", "wordpiece", "--vocab", a.vocab, "-o", out1, "--documents", "blank",
                        "--valid-fraction", "0.3", "--seed", "7"], [multi], threads=1)
        (folder1, files1), (folder2, files2) = shard_files(out1), shard_files(os.path.join(tmp, "multi0"))
        if files1 != files2 or open(os.path.join(out1, "manifest.txt"), "rb").read().split(b"\n")[1:-2] != \
                open(os.path.join(tmp, "multi0", "manifest.txt"), "rb").read().split(b"\n")[1:-2]:
            print("FAIL: other shard files or manifest with 1 and 2 threads: %s vs %s" % (files1, files2))
            fails += 1
        for f in files1:
            if open(os.path.join(folder1, f), "rb").read() != open(os.path.join(folder2, f), "rb").read():
                print("FAIL: %s differs between 1 and 2 threads" % f)
                fails += 1
        # 4. Byte and char tokenizers, small shards (the text spans several), against Python.
        out = os.path.join(tmp, "byte")
        prepare(a.mlm, ["-t", "byte", "-o", out, "--shard-tokens", "300000"], [a.corpus])
        man, sets = read_set(out)
        fails += check("tinyshakespeare byte (%d shards)" % len(shard_files(out)[1]),
                       sets["train"][0],
                       list(text.encode("utf-8")))
        out = os.path.join(tmp, "char")
        prepare(a.mlm, ["-t", "char", "-o", out, "--shard-tokens", "300000"], [a.corpus])
        man, sets = read_set(out)
        chars = sorted(set(text))
        fails += check("tinyshakespeare char", sets["train"][0], [chars.index(c) for c in text])
        if man["vocab"] != ",".join(str(ord(c)) for c in chars):
            print("FAIL: the char vocabulary differs from sorted(set(text))")
            fails += 1
        # 5. A multilingual document of 700 KB (cut into pieces at whitespace, in the middle of CJK runs and
        # accented words) between two short ones, as blank-line documents.
        long_doc = " ".join(MULTI).replace("\n", " ") * 1
        long_doc = (long_doc + " ") * (700000 // len(long_doc.encode("utf-8")) + 1)
        path = os.path.join(tmp, "long.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("short one\n\n" + long_doc + "\n\nshort two\n")
        out = os.path.join(tmp, "long")
        prepare(a.mlm, ["-t", "wordpiece", "--vocab", a.vocab, "-o", out, "--documents", "blank", "--valid-fraction", "0"],
                [path])
        man, sets = read_set(out)
        toks, bounds = sets["train"]
        want = [hf(t + "\n", add_special_tokens=False)["input_ids"] for t in ("short one", long_doc, "short two")]
        got = [toks[b:(bounds[k + 1] if k + 1 < len(bounds) else len(toks))] for k, b in enumerate(bounds)]
        fails += check("a 700 KB multilingual document", sum(got, []), sum(want, []))
        if [len(g) for g in got] != [len(w) for w in want]:
            print("FAIL: document boundaries around the long document: %s vs %s" % ([len(g) for g in got],
                                                                                  [len(w) for w in want]))
            fails += 1
        # 6. A directory (files in name order, one document each, nested folders walked) and standard input.
        d = os.path.join(tmp, "dir")
        os.makedirs(os.path.join(d, "sub"))
        parts = {"b.txt": "Second file.", "a.txt": "First file, héllo!", "sub/c.txt": "Third: 中文"}
        for name, t in parts.items():
            with open(os.path.join(d, name), "w", encoding="utf-8") as f:
                f.write(t)
        out = os.path.join(tmp, "dirset")
        prepare(a.mlm, ["-t", "wordpiece", "--vocab", a.vocab, "-o", out, "--valid-fraction", "0"], [d])
        man, sets = read_set(out)
        want = [hf(parts[n], add_special_tokens=False)["input_ids"] for n in ("a.txt", "b.txt", "sub/c.txt")]
        toks, bounds = sets["train"]
        got = [toks[b:(bounds[k + 1] if k + 1 < len(bounds) else len(toks))] for k, b in enumerate(bounds)]
        if got != want:
            print("FAIL directory input: %s vs %s" % (got, want))
            fails += 1
        for tk in ("char", "byte"):
            outs = []
            for src in ("file", "stdin"):
                out = os.path.join(tmp, "%s-%s" % (tk, src))
                env = dict(os.environ, OMP_NUM_THREADS="2")
                cmd = [a.mlm, "prepare", "-q", "-t", tk, "-o", out, "--documents", "blank", "--valid-fraction", "0.2"]
                if src == "file":
                    subprocess.run(cmd + [multi], check=True, env=env)
                else:
                    subprocess.run(cmd + ["-"], check=True, env=env, stdin=open(multi, "rb"))
                outs.append(read_set(out)[1])
            if outs[0] != outs[1]:
                print("FAIL %s: standard input gives other shards than the file" % tk)
                fails += 1
        print("directory input and standard input: %s" % ("ok" if not fails else "see above"))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
