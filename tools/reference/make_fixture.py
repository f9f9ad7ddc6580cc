"""make_fixture.py: write the small PyTorch reference fixture that tests/test_reference_fixture.c checks.

Default output: tests/fixtures/reference_small.safetensors, for vocab 67, d_model 16, 2 heads, 2 layers,
d_ff 32, seq_len 8, batch 3, dropout off. Contents (PyTorch layout, [seq, batch, ...]):

  <name>            every parameter under its state_dict name (initial weights)
  input_ids         int64 [seq, batch]: a masked batch (some [MASK]=66, some random ids)
  labels            int64 [seq, batch]: original ids where selected, [PAD]=65 elsewhere (>= 5 selected)
  logits            [seq, batch, vocab] of the initial model
  loss              [1] mean cross-entropy over non-PAD labels
  grad.<name>       gradient of `loss` for every parameter, before clipping
  step3.<name>      every parameter after three Noam-Adam steps on the same batch (clip 1.0 each step)
  losses            [3] the loss at each step, before its update
  grad_norms        [3] the global gradient norm at each step, before clipping
  grad2.<name>, grad3.<name>
                    the pre-clip gradients PyTorch computed at steps 2 and 3 (step 1 = grad.<name>), so
                    the optimizer can be checked on exactly the reference gradients: Adam's update
                    m / (sqrt(v) + eps) amplifies float32 rounding in small gradients, and even PyTorch's
                    own float32 and float64 runs disagree by ~2e-4 (relative) after three steps

The config is in the safetensors __metadata__ (string values). Floating tensors are float32 unless
--dtype float64 is given: then the model is initialised in float32 as usual, the computation runs in
float64 and every floating tensor is stored as F64 (initial parameters are then exact float32 values).
Layers are initialised independently (not as copies of one template) so that a layer mix-up in the
code under test cannot hide behind identical layers; --copy-layers restores the reference behaviour.
--weights FILE loads the initial parameters from a safetensors file (e.g. written by mlm) instead.
"""

import argparse
import os
import sys

import torch
from safetensors.torch import load_file, save_file

import reference_model as rm

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))


def make_batch(cfg: rm.RefConfig, gen: torch.Generator, min_targets: int = 5):
    """A [seq, batch] character batch and its reference masking, redrawn until it has at least
    `min_targets` selected positions, at least one [MASK], at least one random replacement that
    changed the token and at least one selected position left as it was (every masking outcome)."""
    for _ in range(100000):
        x = torch.randint(0, cfg.vocab - 2, (cfg.seq_len, cfg.batch), generator=gen)
        inputs, labels = rm.mlm_mask_exact(x, cfg, generator=gen)
        selected = labels != cfg.pad_id
        n_mask = int((inputs == cfg.mask_id).sum())
        n_random = int((selected & (inputs != cfg.mask_id) & (inputs != x)).sum())
        n_same = int((selected & (inputs == x)).sum())
        if int(selected.sum()) >= min_targets and n_mask >= 1 and n_random >= 1 and n_same >= 1:
            return inputs, labels
    raise RuntimeError('could not draw a suitable batch')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', default=os.path.join(REPO, 'tests', 'fixtures', 'reference_small.safetensors'))
    ap.add_argument('--seed', type=int, default=20240607, help='torch.manual_seed for init and the batch')
    ap.add_argument('--impl', choices=['replica', 'labml'], default='replica')
    ap.add_argument('--dtype', choices=['float32', 'float64'], default='float32')
    ap.add_argument('--weights', help='safetensors file with initial parameters (state_dict names)')
    ap.add_argument('--copy-layers', action='store_true', help='all layers start as copies of layer 0')
    ap.add_argument('--vocab', type=int, default=67)
    ap.add_argument('--d-model', type=int, default=16)
    ap.add_argument('--n-heads', type=int, default=2)
    ap.add_argument('--n-layers', type=int, default=2)
    ap.add_argument('--d-ff', type=int, default=32)
    ap.add_argument('--seq-len', type=int, default=8)
    ap.add_argument('--batch', type=int, default=3)
    ap.add_argument('--warmup', type=int, default=4)
    ap.add_argument('--lr-factor', type=float, default=1.0)
    ap.add_argument('--steps', type=int, default=3)
    args = ap.parse_args()

    cfg = rm.RefConfig(vocab=args.vocab, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                       d_ff=args.d_ff, seq_len=args.seq_len, batch=args.batch, dropout=0.0,
                       warmup=args.warmup, lr_factor=args.lr_factor)
    torch.manual_seed(args.seed)
    model = rm.build_model(cfg, args.impl, copy_layers=args.copy_layers)
    params = rm.param_dict(model)
    if args.weights:
        loaded = load_file(args.weights)
        missing = [n for n in params if n not in loaded]
        if missing:
            sys.exit(f'{args.weights}: missing parameters {missing[:5]}{"..." if len(missing) > 5 else ""}')
        with torch.no_grad():
            for n, p in params.items():
                if tuple(loaded[n].shape) != tuple(p.shape):
                    sys.exit(f'{args.weights}: {n} has shape {tuple(loaded[n].shape)}, expected {tuple(p.shape)}')
                p.copy_(loaded[n].to(torch.float32))
    model.eval()  # dropout off (p is 0 anyway)
    initial = {n: p.detach().clone() for n, p in params.items()}
    if args.dtype == 'float64':
        model.double()
        params = rm.param_dict(model)

    gen = torch.Generator().manual_seed(args.seed + 1)
    inputs, labels = make_batch(cfg, gen)

    opt = rm.NoamAdam(model.parameters(), lr_factor=cfg.lr_factor, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                      warmup=cfg.warmup, d_model=cfg.d_model)
    losses, norms = [], []
    out = {}
    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = rm.mlm_loss(logits, labels, cfg.pad_id)
        loss.backward()
        if step == 0:
            out['logits'] = logits.detach().clone()
            out['loss'] = loss.detach().reshape(1).clone()
        prefix = 'grad.' if step == 0 else f'grad{step + 1}.'
        for n, p in params.items():
            out[prefix + n] = p.grad.detach().clone()
        norm = rm.clip_grad_norm(model.parameters(), cfg.max_grad_norm)
        losses.append(loss.detach().item())
        norms.append(norm.detach().item())
        opt.step()
    fdt = torch.float64 if args.dtype == 'float64' else torch.float32
    for n, p in params.items():
        out[n] = initial[n].to(fdt)
        out['step3.' + n] = p.detach().clone()
    out['losses'] = torch.tensor(losses, dtype=fdt)
    out['grad_norms'] = torch.tensor(norms, dtype=fdt)
    out = {k: (v.to(fdt) if v.is_floating_point() else v).contiguous() for k, v in out.items()}
    out['input_ids'] = inputs.to(torch.int64).contiguous()
    out['labels'] = labels.to(torch.int64).contiguous()

    meta = {
        'vocab': cfg.vocab, 'd_model': cfg.d_model, 'n_heads': cfg.n_heads, 'n_layers': cfg.n_layers,
        'd_ff': cfg.d_ff, 'seq_len': cfg.seq_len, 'batch': cfg.batch, 'warmup': cfg.warmup,
        'lr_factor': cfg.lr_factor, 'max_grad_norm': cfg.max_grad_norm, 'ln_eps': cfg.ln_eps,
        'beta1': cfg.beta1, 'beta2': cfg.beta2, 'eps': cfg.eps, 'pad_id': cfg.pad_id, 'mask_id': cfg.mask_id,
        'steps': args.steps, 'seed': args.seed, 'dtype': args.dtype, 'impl': args.impl,
        'copy_layers': int(args.copy_layers), 'torch_version': torch.__version__,
        'generator': 'tools/reference/make_fixture.py',
    }
    meta = {k: str(v) for k, v in meta.items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(out, args.out, metadata=meta)
    n_sel = int((labels != cfg.pad_id).sum())
    print(f'wrote {args.out}: {len(out)} tensors, {os.path.getsize(args.out)} bytes; '
          f'{n_sel} targets, losses {["%.6f" % v for v in losses]}, grad norms {["%.6f" % v for v in norms]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
