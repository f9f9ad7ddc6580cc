"""check_labml.py: verify that the plain-PyTorch replica equals labml_nn's own modules bit for bit.

Needs labml 0.4.x, labml_helpers and labml_nn importable (tools/python_env.sh makes an environment with
the pinned versions; see README.md). Builds both models from the
same torch seed and checks: identical state_dict names, shapes and initial values; identical logits,
loss and gradients with dropout on (same seed for the dropout masks); identical parameters after a few
NoamAdam steps (ours) against labml_nn.optimizers.noam.Noam; identical masking streams.
Exit code 0 if everything matches exactly, 1 otherwise, 77 (skipped) without PyTorch or labml_nn.
tools/test.sh installs both into its virtual environment; CTest runs `check_labml.py --small` as test_check_labml.
"""

import argparse
import sys

try:
    import torch

    import reference_model as rm
except ImportError as e:  # CTest runs this as test_check_labml: no PyTorch is a skip, not a failure
    print(f"SKIP: PyTorch is not importable ({e}); tools/test.sh installs it (tools/requirements-test.txt)")
    sys.exit(77)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--seed', type=int, default=1234)
    ap.add_argument('--steps', type=int, default=3, help='optimizer steps to compare')
    ap.add_argument('--small', action='store_true', help='use the small fixture config instead of the reference one')
    args = ap.parse_args()

    try:
        from labml_nn.optimizers.noam import Noam
        from labml_nn.transformers.mlm import MLM
    except ImportError as e:
        print(f"SKIP: labml_nn not importable ({e}); tools/test.sh installs it (tools/requirements-test*.txt)")
        return 77

    cfg = rm.RefConfig()
    if args.small:
        cfg = rm.RefConfig(d_model=16, n_heads=2, n_layers=2, d_ff=32, seq_len=8, batch=3, warmup=4)
    ok = True

    torch.manual_seed(args.seed)
    ours = rm.build_model(cfg, 'replica')
    torch.manual_seed(args.seed)
    theirs = rm.build_model(cfg, 'labml')
    sa, sb = ours.state_dict(), theirs.state_dict()
    if list(sa.keys()) != list(sb.keys()):
        print('state_dict names differ:', set(sa) ^ set(sb))
        return 1
    for k in sa:
        if sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]):
            print(f'initial {k} differs')
            ok = False
    print(f'state_dict: {len(sa)} entries, {rm.count_params(ours)} trainable parameters')

    opt_a = rm.NoamAdam(ours.parameters(), lr_factor=cfg.lr_factor, betas=(cfg.beta1, cfg.beta2),
                        eps=cfg.eps, warmup=cfg.warmup, d_model=cfg.d_model)
    opt_b = Noam(theirs.parameters(), lr=cfg.lr_factor, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 warmup=cfg.warmup, d_model=cfg.d_model)
    labml_mlm = MLM(padding_token=cfg.pad_id, mask_token=cfg.mask_id, no_mask_tokens=[], n_tokens=cfg.vocab,
                    masking_prob=cfg.masking_prob, randomize_prob=cfg.randomize_prob,
                    no_change_prob=cfg.no_change_prob)
    for step in range(args.steps):
        x = torch.randint(0, cfg.vocab - 2, (cfg.seq_len, cfg.batch))
        torch.manual_seed(args.seed + 100 + step)
        xa, ya = rm.mlm_mask_exact(x, cfg)
        torch.manual_seed(args.seed + 100 + step)
        xb, yb = labml_mlm(x.clone())
        if not (torch.equal(xa, xb) and torch.equal(ya, yb)):
            print(f'step {step}: masking differs')
            ok = False
        outs = []
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            torch.manual_seed(args.seed + 200 + step)  # same dropout masks
            logits = model(xa)
            loss = rm.mlm_loss(logits, ya, cfg.pad_id)
            opt.zero_grad()
            loss.backward()
            norm = rm.clip_grad_norm(model.parameters(), cfg.max_grad_norm)
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            outs.append((logits.detach(), loss.detach(), norm, grads))
        (la, lossa, na, ga), (lb, lossb, nb, gb) = outs
        same = torch.equal(la, lb) and torch.equal(lossa, lossb) and torch.equal(na, nb)
        same = same and all(torch.equal(ga[k], gb[k]) for k in ga)
        print(f'step {step + 1}: loss {lossa.item():.6f} vs {lossb.item():.6f}, norm {na.item():.6f} vs '
              f'{nb.item():.6f}, forward/backward identical: {same}')
        ok = ok and same
    pa, pb = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for k in pa:
        if not torch.equal(pa[k], pb[k]):
            print(f'after {args.steps} steps {k} differs by {(pa[k] - pb[k]).abs().max().item():.3e}')
            ok = False
    print('replica == labml_nn:', 'yes (bitwise)' if ok else 'NO')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
