"""roundtrip_export.py: `mlm export` weights load into labml_nn's TransformerMLM and give mlm's logits.

Trains a small model for a few steps with the mlm binary (reference architecture at a reduced size,
layers initialised independently so a layer mix-up cannot hide), exports it with `mlm export`, loads the
file with load_state_dict(strict=True) into

  --impl labml    the real labml_nn modules (labml_nn.transformers.mlm.experiment.TransformerMLM built from
                  labml_nn.transformers.models/mha/feed_forward, as the reference experiment builds it);
                  skipped, with the reason, where labml_nn is not importable;
  --impl replica  tools/reference/reference_model.py's plain-PyTorch replica (needs only PyTorch),

runs the same masked texts through it with dropout off (eval mode), and compares the logits of every masked
position with those of `mlm fill --json --logits`: error = max |mlm - torch| / max |torch| must be <= 1e-5.
The file must hold exactly the module's state_dict: nothing missing (the positional-encoding buffer
`src_embed.positional_encodings` included), nothing extra, the same shapes. The exported buffer is also
compared with the one the module computes itself.

The texts are longer than seq_len, so the windowing and the [PAD]-padded last window of `mlm fill` are
checked too. Exit codes: 0 pass, 1 fail, 77 skipped (no PyTorch/safetensors/labml_nn, or no corpus).

usage: python3 roundtrip_export.py --mlm BUILD/mlm --corpus data/tinyshakespeare.txt [--impl labml|replica]
       [--size reference] [--keep]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

SKIP = 77
TOLERANCE = 1e-5

# Masked texts: _ and [MASK] mark positions to predict (several windows of seq_len 32 each).
TEXTS = [
    "First Citizen:\nBefore we proceed any further, h_ar me speak.\n\nAll:\nSpeak, sp_ak.",
    "We are accounted poor citizens, the patr[MASK]cians good. What _uthority surfeits on would re_ieve us",
    "_ou are all resolved rather to die than to famish?_",
]

# Small but with every part of the reference model: 2 layers, 4 heads (--size reference: the reference's
# 128 / 8 heads / 6 layers / 256).
SMALL_MODEL = ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.d_ff=96"]
# The buffer rows mlm uses (seq_len) must equal labml's to float32 rounding of sin/cos at angles up to
# seq_len radians; rows past seq_len only fill labml's fixed [5000, 1, d_model] shape, and at positions up
# to 5000 a 1-ulp difference of a frequency (glibc expf vs PyTorch's exp) moves sin/cos by up to ~5000 * 6e-8.
PE_USED_TOLERANCE = 1e-5
PE_ALL_TOLERANCE = 1e-3
TRAIN_SETTINGS = [
    "model.init=pytorch", "data.seq_len=32", "train.batch_size=8", "train.samples=false", "train.log_every=5",
    "train.ckpt_every=0", "optim.warmup=10", "train.threads=2",
]


def run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        sys.stderr.write(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout}\n{res.stderr}\n")
        sys.exit(1)
    return res.stdout


def encode(text, stoi, mask_id):
    """Token ids as mlm fill reads them: _ and [MASK] become MASK, other characters their vocabulary id."""
    ids, i = [], 0
    while i < len(text):
        if text[i] == '_':
            ids.append(mask_id)
            i += 1
        elif text.startswith('[MASK]', i):
            ids.append(mask_id)
            i += 6
        else:
            ids.append(stoi[text[i]])
            i += 1
    return ids


def torch_logits(model, ids, seq_len, pad_id, mask_id, torch):
    """Logits [n_masked, vocab] of the masked positions, windows of seq_len padded with PAD, in order."""
    n_win = (len(ids) + seq_len - 1) // seq_len
    padded = ids + [pad_id] * (n_win * seq_len - len(ids))
    x = torch.tensor(padded, dtype=torch.long).view(n_win, seq_len).t().contiguous()  # [seq, batch]
    with torch.no_grad():
        out = model(x)  # [seq, batch, vocab]
    rows = [out[i % seq_len, i // seq_len] for i, t in enumerate(ids) if t == mask_id]
    return torch.stack(rows), [i for i, t in enumerate(ids) if t == mask_id]


def build_labml_model(cfg, torch):
    """labml_nn's own TransformerMLM from labml_nn's modules, as its experiment configures them (fixed
    positional encodings, ReLU feed-forward with biases, pre-norm layers, final norm, generator)."""
    from labml_nn.transformers import models as lm
    from labml_nn.transformers.feed_forward import FeedForward
    from labml_nn.transformers.mha import MultiHeadAttention
    from labml_nn.transformers.mlm.experiment import TransformerMLM

    attn = MultiHeadAttention(cfg.n_heads, cfg.d_model, dropout_prob=0.0)
    ff = FeedForward(cfg.d_model, cfg.d_ff, dropout=0.0, activation=torch.nn.ReLU(), is_gated=False,
                     bias1=True, bias2=True, bias_gate=False)
    layer = lm.TransformerLayer(d_model=cfg.d_model, self_attn=attn, src_attn=None, feed_forward=ff,
                                dropout_prob=0.0)
    model = TransformerMLM(encoder=lm.Encoder(layer, cfg.n_layers),
                           src_embed=lm.EmbeddingsWithPositionalEncoding(cfg.d_model, cfg.vocab),
                           generator=lm.Generator(cfg.vocab, cfg.d_model))

    class Logits(torch.nn.Module):
        """TransformerMLM.forward returns (logits, state); keep the logits. The wrapped module's state_dict
        is the one loaded (strict) so names are labml's own."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)[0]

    return model, Logits(model)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--mlm', required=True, help='the mlm binary')
    ap.add_argument('--corpus', required=True, help='Tiny Shakespeare (a 30 kB slice is trained on)')
    ap.add_argument('--size', choices=['small', 'reference'], default='small', help='model size (default small)')
    ap.add_argument('--impl', choices=['labml', 'replica'], default='labml',
                    help='the PyTorch model to load the export into (default: labml_nn\'s own)')
    ap.add_argument('--keep', action='store_true', help='keep the temporary directory')
    args = ap.parse_args()

    try:
        import torch
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError as e:
        print(f"SKIP: PyTorch or safetensors is not importable ({e})")
        return SKIP
    if args.impl == 'labml':
        try:
            import labml_nn.transformers.mlm.experiment  # noqa: F401  (the real TransformerMLM)
        except Exception as e:  # ImportError, or labml failing on a dependency it imports at load time
            print(f"SKIP: labml_nn is not importable ({type(e).__name__}: {e}); tools/test.sh installs it "
                  f"(labml_nn 0.4.137, see tools/requirements-test*.txt)")
            return SKIP
    if not os.access(args.corpus, os.R_OK):
        print(f"SKIP: corpus {args.corpus} is not readable")
        return SKIP
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import reference_model as rm

    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp(prefix='mlm-roundtrip-')
    try:
        with open(args.corpus, 'rb') as f:
            data = f.read(30000)
        corpus = os.path.join(tmp, 'slice.txt')
        with open(corpus, 'wb') as f:
            f.write(data)
        run_dir = os.path.join(tmp, 'run')
        cmd = [args.mlm, 'train', '--data', corpus, '--steps', '12', '--out', run_dir, '-q']
        for s in TRAIN_SETTINGS + (SMALL_MODEL if args.size == 'small' else []):
            cmd += ['--set', s]
        run(cmd)
        weights = os.path.join(tmp, 'weights.safetensors')
        run([args.mlm, 'export', '--ckpt', run_dir, '--out', weights])
        # One call per text: a TEXT argument may hold newlines (standard input would split them into lines).
        results = [json.loads(run([args.mlm, 'fill', '--ckpt', run_dir, '--json', '--logits', '--top-k', '3', t]))
                   for t in TEXTS]

        # The model described by the file's metadata.
        with safe_open(weights, framework='pt') as f:
            meta = f.metadata()
        chars = meta['vocab']
        cfg = rm.RefConfig(vocab=len(chars) + 2, d_model=int(meta['d_model']), n_heads=int(meta['n_heads']),
                           n_layers=int(meta['n_layers']), d_ff=int(meta['d_ff']), seq_len=int(meta['seq_len']))
        if args.impl == 'labml':
            state_owner, model = build_labml_model(cfg, torch)
        else:
            state_owner = model = rm.build_model(cfg, 'replica')
        state = load_file(weights)
        expected = state_owner.state_dict()
        if set(state) != set(expected):
            print(f"FAIL: tensor names differ from {args.impl}'s state_dict: missing "
                  f"{sorted(set(expected) - set(state))}, unexpected {sorted(set(state) - set(expected))}")
            return 1
        pe_name = 'src_embed.positional_encodings'
        own_pe = expected[pe_name].clone()
        state_owner.load_state_dict(state, strict=True)  # also checks every shape
        pe_diff = (state[pe_name] - own_pe).abs()
        pe_used, pe_all = pe_diff[:cfg.seq_len].max().item(), pe_diff.max().item()
        print(f"{args.impl}: {len(state)} tensors load with strict=True; {pe_name} {list(own_pe.shape)}: "
              f"max |mlm - torch| {pe_used:.2e} on the {cfg.seq_len} rows used (tolerance {PE_USED_TOLERANCE:g}), "
              f"{pe_all:.2e} over all rows (tolerance {PE_ALL_TOLERANCE:g})")
        if pe_used > PE_USED_TOLERANCE or pe_all > PE_ALL_TOLERANCE:
            print("FAIL: the exported positional-encoding buffer differs from the module's own")
            return 1
        model.eval()  # dropout off, as mlm fill runs

        stoi = {c: i for i, c in enumerate(chars)}
        worst_abs, worst_ref, n_positions, top1_same = 0.0, 0.0, 0, 0
        for text, res in zip(TEXTS, results):
            assert res['text'] == text, (res['text'], text)
            ids = encode(text, stoi, cfg.mask_id)
            ref, index = torch_logits(model, ids, cfg.seq_len, cfg.pad_id, cfg.mask_id, torch)
            got_index = [p['index'] for p in res['positions']]
            if got_index != index:
                print(f"FAIL: mlm predicted positions {got_index}, expected {index}")
                return 1
            got = torch.tensor([p['logits'] for p in res['positions']], dtype=torch.float64)
            ref = ref.double()
            worst_abs = max(worst_abs, (got - ref).abs().max().item())
            worst_ref = max(worst_ref, ref.abs().max().item())
            top1_same += int((got.argmax(-1) == ref.argmax(-1)).sum())
            n_positions += len(index)
        err = worst_abs / worst_ref
        print(f"{len(TEXTS)} texts, {n_positions} masked positions, vocab {cfg.vocab}, seq_len {cfg.seq_len}: "
              f"max |mlm - torch| = {worst_abs:.3e}, max |torch| = {worst_ref:.3f}, relative error {err:.3e} "
              f"(tolerance {TOLERANCE:g}); top-1 agrees at {top1_same}/{n_positions}")
        if err > TOLERANCE or n_positions == 0:
            print("FAIL: mlm's logits differ from the PyTorch reference on the exported weights")
            return 1
        print("PASS")
        return 0
    finally:
        if args.keep:
            print(f"files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
