"""train_reference.py: train the PyTorch reference MLM on Tiny Shakespeare and log curves as metrics.jsonl.

Reproduces the labml MLM experiment (SPEC.md): batch 64, seq_len 32, d_model 128, 8 heads, 6 layers,
d_ff 256, dropout 0.1, reference masking (15%; of those [MASK] / unchanged / random as labml draws them),
cross-entropy over masked positions, global-norm clipping at 1.0, labml's Noam Adam (factor 1, warmup 2000).
All layers start as copies of one template layer, as in the reference.

Output directory (--out): metrics.jsonl, config.json and, with --save, weights.safetensors (parameters
under their PyTorch state_dict names). metrics.jsonl lines, in the style of mlm's own metrics.jsonl:

  {"kind": "train", "scope": "interval", ...}  every --log-every steps and at the end of each epoch:
        means over the steps since the previous interval line (loss = mean of per-batch losses,
        accuracy = correct / masked positions)
  {"kind": "train", "scope": "epoch", ...}     once per epoch: the same over the whole epoch
  {"kind": "valid", "scope": "epoch", ...}     once per epoch: loss = mean over all masked positions
        of the validation split (fresh masks), "loss_batch_mean" = mean of per-batch losses (labml's
        tracker), accuracy = correct / masked positions

Every line has "epoch" (from 0), "step" (optimizer steps so far), "tokens" (training tokens so far,
counting the real size of the last partial batch, as labml does), "loss", "accuracy", "lr" (of the last
step), "time_s" (since the start); train lines add "grad_norm" (pre-clip, last step) and "tokens_per_s".

Differences from the reference that are options here: the reference keeps dropout on during validation
(--valid-dropout reproduces that; off by default, as mlm's default); the reference sets no seed (--seed).
Random streams: torch.manual_seed(seed) for the initial weights and dropout; separate generators for
the data order/offsets (seed + 1) and the masks (seed + 2). Masking draws the random replacement token
for every position and uses it where selected (no device sync); --exact-masking uses labml's exact
draw order instead. The distribution is identical either way.

Examples:
  python3 tools/reference/train_reference.py --epochs 1 --out runs/ref-cpu
  python3 tools/reference/train_reference.py --device cuda --epochs 32 --seed 1 --out runs/ref-gpu --save
"""

import argparse
import json
import math
import os
import sys
import time

import torch

import reference_model as rm

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
DEFAULT_DATA = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare.txt'))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', default=DEFAULT_DATA, help='Tiny Shakespeare text (default: %(default)s)')
    ap.add_argument('--out', default=os.path.join(REPO, 'runs', 'reference'), help='output directory')
    ap.add_argument('--epochs', type=int, default=1024)
    ap.add_argument('--max-steps', type=int, default=0, help='stop after this many optimizer steps (0 = no limit)')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu, cuda, cuda:1, ...')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--log-every', type=int, default=50, help='steps between train interval lines')
    ap.add_argument('--threads', type=int, default=0, help='torch CPU threads (0 = torch default)')
    ap.add_argument('--impl', choices=['replica', 'labml'], default='replica',
                    help='model classes: our replica or labml_nn itself (needs labml installed)')
    ap.add_argument('--valid-dropout', action='store_true', help='keep dropout on in validation (the reference)')
    ap.add_argument('--exact-masking', action='store_true', help="labml's exact masking draw order (syncs)")
    ap.add_argument('--no-valid', action='store_true', help='skip validation')
    ap.add_argument('--tf32', action='store_true', help='allow TF32 matmuls on CUDA (off: full float32)')
    ap.add_argument('--save', action='store_true', help='write weights.safetensors at the end')
    ap.add_argument('--quiet', action='store_true')
    # Model / optimizer overrides (defaults: the reference configuration).
    ap.add_argument('--batch-size', type=int, default=64)
    ap.add_argument('--seq-len', type=int, default=32)
    ap.add_argument('--d-model', type=int, default=128)
    ap.add_argument('--n-heads', type=int, default=8)
    ap.add_argument('--n-layers', type=int, default=6)
    ap.add_argument('--d-ff', type=int, default=256)
    ap.add_argument('--dropout', type=float, default=0.1)
    ap.add_argument('--warmup', type=int, default=2000)
    ap.add_argument('--lr-factor', type=float, default=1.0)
    return ap.parse_args()


class Logger:
    """Appends JSON lines to metrics.jsonl (flushed each line so partial runs are usable)."""

    def __init__(self, path: str, t0: float):
        self.f = open(path, 'w', encoding='utf-8')
        self.t0 = t0

    def write(self, **fields):
        fields['time_s'] = round(time.time() - self.t0, 3)
        self.f.write(json.dumps(fields) + '\n')
        self.f.flush()


def run_valid(model, batches, data_gen, mask_gen, cfg, exact, dropout_on):
    """One pass over the validation split with fresh masks; returns (loss per target, batch-mean loss, acc)."""
    model.train(dropout_on)
    mask_fn = rm.mlm_mask_exact if exact else rm.mlm_mask
    dev = batches.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    batch_loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    targets = torch.zeros((), dtype=torch.long, device=dev)
    n = 0
    with torch.no_grad():
        for x in batches.epoch(data_gen):
            inputs, labels = mask_fn(x, cfg, generator=mask_gen)
            logits = model(inputs)
            loss = rm.mlm_loss(logits, labels, cfg.pad_id)
            c, t = rm.mlm_correct(logits, labels, cfg.pad_id)
            # A batch without targets gives NaN in PyTorch; count it as an empty contribution (no sync).
            loss_sum += torch.where(t > 0, loss.double() * t, torch.zeros_like(loss_sum))
            batch_loss_sum += torch.where(t > 0, loss.double(), torch.zeros_like(loss_sum))
            correct += c
            targets += t
            n += 1
    model.train(True)
    t = max(int(targets), 1)
    return float(loss_sum) / t, float(batch_loss_sum) / max(n, 1), int(correct) / t


def main() -> int:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    os.makedirs(args.out, exist_ok=True)

    data = rm.CharData(args.data)
    cfg = rm.RefConfig(vocab=data.n_tokens, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                       d_ff=args.d_ff, seq_len=args.seq_len, batch=args.batch_size, dropout=args.dropout,
                       warmup=args.warmup, lr_factor=args.lr_factor)
    torch.manual_seed(args.seed)
    model = rm.build_model(cfg, args.impl, copy_layers=True).to(device)
    model.train(True)
    opt = rm.NoamAdam(model.parameters(), lr_factor=cfg.lr_factor, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                      warmup=cfg.warmup, d_model=cfg.d_model)
    params = list(model.parameters())

    train_b = rm.SequenceBatches(data.encode(data.train_text), cfg.seq_len, cfg.batch, device)
    valid_b = rm.SequenceBatches(data.encode(data.valid_text), cfg.seq_len, cfg.batch, device)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    mask_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    mask_fn = rm.mlm_mask_exact if args.exact_masking else rm.mlm_mask

    info = dict(args=vars(args), config=cfg.to_dict(), n_params=rm.count_params(model), vocab=''.join(data.itos),
                train_sequences=train_b.n, train_batches=len(train_b), valid_sequences=valid_b.n,
                valid_batches=len(valid_b), torch_version=torch.__version__, device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
                threads=torch.get_num_threads())
    with open(os.path.join(args.out, 'config.json'), 'w', encoding='utf-8') as f:
        json.dump(info, f, indent=2)
    if not args.quiet:
        print(f'reference MLM: {info["n_params"]} parameters, vocab {cfg.vocab}, {train_b.n} train sequences '
              f'({len(train_b)} batches), {valid_b.n} valid sequences, device {device}', flush=True)

    t0 = time.time()
    log = Logger(os.path.join(args.out, 'metrics.jsonl'), t0)
    step, tokens = 0, 0
    zero_f = lambda: torch.zeros((), dtype=torch.float64, device=device)
    zero_i = lambda: torch.zeros((), dtype=torch.long, device=device)
    done = False
    for epoch in range(args.epochs):
        ep = dict(loss=zero_f(), correct=zero_i(), targets=zero_i(), n=0, tokens=0, t=time.time())
        iv = dict(loss=zero_f(), correct=zero_i(), targets=zero_i(), n=0, tokens=0, t=time.time())
        norm = torch.zeros((), device=device)
        n_batches = len(train_b)
        for bi, x in enumerate(train_b.epoch(data_gen)):
            inputs, labels = mask_fn(x, cfg, generator=mask_gen)
            logits = model(inputs)
            loss = rm.mlm_loss(logits, labels, cfg.pad_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = rm.clip_grad_norm(params, cfg.max_grad_norm)
            opt.step()
            step += 1
            tokens += x.numel()
            with torch.no_grad():
                c, t = rm.mlm_correct(logits, labels, cfg.pad_id)
                for acc in (ep, iv):
                    acc['loss'] += loss.detach().double()
                    acc['correct'] += c
                    acc['targets'] += t
                    acc['n'] += 1
                    acc['tokens'] += x.numel()
            last = bi + 1 == n_batches
            done = args.max_steps > 0 and step >= args.max_steps
            if step % args.log_every == 0 or last or done:
                now = time.time()
                loss_v = float(iv['loss']) / iv['n']
                acc_v = int(iv['correct']) / max(int(iv['targets']), 1)
                if not math.isfinite(loss_v):
                    print(f'training diverged at step {step} (loss {loss_v})', file=sys.stderr)
                    return 1
                log.write(kind='train', scope='interval', epoch=epoch, step=step, tokens=tokens, loss=loss_v,
                          accuracy=acc_v, lr=opt.last_lr, grad_norm=float(norm),
                          tokens_per_s=iv['tokens'] / max(now - iv['t'], 1e-9))
                if not args.quiet:
                    print(f'epoch {epoch + 1}/{args.epochs} step {step} loss {loss_v:.4f} acc {acc_v:.4f} '
                          f'lr {opt.last_lr:.3e} |g| {float(norm):.3f} '
                          f'{iv["tokens"] / max(now - iv["t"], 1e-9):.0f} tok/s', flush=True)
                iv = dict(loss=zero_f(), correct=zero_i(), targets=zero_i(), n=0, tokens=0, t=now)
            if done:
                break
        now = time.time()
        log.write(kind='train', scope='epoch', epoch=epoch, step=step, tokens=tokens,
                  loss=float(ep['loss']) / max(ep['n'], 1),
                  accuracy=int(ep['correct']) / max(int(ep['targets']), 1), lr=opt.last_lr, grad_norm=float(norm),
                  tokens_per_s=ep['tokens'] / max(now - ep['t'], 1e-9))
        if not args.no_valid:
            vloss, vbatch, vacc = run_valid(model, valid_b, data_gen, mask_gen, cfg, args.exact_masking,
                                            args.valid_dropout)
            log.write(kind='valid', scope='epoch', epoch=epoch, step=step, tokens=tokens, loss=vloss,
                      loss_batch_mean=vbatch, accuracy=vacc, lr=opt.last_lr)
            if not args.quiet:
                print(f'epoch {epoch + 1}: valid loss {vloss:.4f} acc {vacc:.4f} '
                      f'({time.time() - t0:.1f} s elapsed)', flush=True)
        if done:
            break
    if args.save:
        from safetensors.torch import save_file
        tensors = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters()}
        save_file(tensors, os.path.join(args.out, 'weights.safetensors'),
                  metadata={k: str(v) for k, v in cfg.to_dict().items()})
    return 0


if __name__ == '__main__':
    sys.exit(main())
