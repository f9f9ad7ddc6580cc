#!/usr/bin/env python3
"""compare_runs.py: compare mlm runs with the PyTorch reference and with each other (the GPU bring-up's verdicts).

Subcommands (each prints a table and a one-line verdict; exit 0 = agree/identical, 1 = not, 2 = no usable data):

  epochs MLM_METRICS REF_METRICS [--tol T]
      Validation accuracy per epoch of an mlm run (metrics.jsonl, kind "valid") and of the reference trainer
      (tools/reference/train_reference.py metrics.jsonl, kind "valid"). They agree when |acc_mlm - acc_ref|
      <= T at every epoch both have reached. Epochs only one run reached are listed, not judged.
  steps CPU_METRICS GPU_METRICS [--rel R] [--steps N]
      Per-step training losses of two mlm runs logged with train.log_every = 1 (the GPU-vs-CPU agreement run):
      agree when every |l_a - l_b| / |l_a| <= R (default 1e-3) over the first N steps (default: all common).
  identical RUN_A RUN_B
      Bit identity of two mlm run directories (an interrupted-and-resumed run against an uninterrupted one):
      the per-step training losses as logged (%.9g strings, so equal strings are equal floats) and every
      tensor of the newest checkpoint (parameters, Adam moments), byte for byte.
  throughput METRICS --tokens-per-step N
      Median tokens/s over the train lines of a run (mlm or the reference trainer), the first line (warm-up)
      left out, and the ms/step it means at N tokens per step.

THE TOLERANCE OF `epochs` (DEFAULT_TOL below) comes from the run-to-run noise of the reference itself: two
reference runs that differ only in their seed, on the CPU, 1 thread each:

  for s in 0 1; do OMP_NUM_THREADS=1 nice -n 19 python3 tools/reference/train_reference.py --device cpu \\
      --threads 1 --epochs 3 --seed $s --log-every 100 --out runs/noise-seed$s; done
  python3 tools/compare_runs.py noise runs/noise-seed0/metrics.jsonl runs/noise-seed1/metrics.jsonl

NOISE_MEASURED records what that printed (PyTorch 2.15.0 CPU, 2026-11-30; each run ~66 min): validation
accuracy 0.2123 / 0.2125, 0.2186 / 0.2236, 0.2290 / 0.2214 at epochs 1-3, differences 0.0002, 0.0050 and
0.0077 (RMS 0.0053). Two seeds give one difference per epoch, too few to estimate a spread from, and that
RMS is at the sampling noise of a validation pass itself (each pass scores ~16,700 masked positions with
fresh masks, so two runs' accuracies differ by sqrt(2 p (1 - p) / 16,700) = 0.0055 at p = 0.5 from sampling
alone, trajectory differences not counted). So the per-epoch standard deviation of the difference is
taken as the larger of the measured RMS difference and that sampling floor, and two runs agree when every
epoch is within 3.2 of those standard deviations (0.0175): with 20 epochs judged, a run drawn from the
reference's own distribution then fails by chance with probability ~3% (20 x 0.14%), while a real error (a
wrong mask, a lost dropout, a broken optimizer) moves validation accuracy by several hundredths within a few
epochs.
"""

import argparse
import json
import math
import os
import statistics
import struct
import sys

# Filled from the measurement described in the module docstring.
NOISE_MEASURED = {
    'command': 'train_reference.py --device cpu --threads 1 --epochs 3 --seed {0,1} (PyTorch 2.15.0, CPU)',
    # epoch (1-based) -> (validation accuracy seed 0, seed 1)
    'valid_accuracy_by_epoch': {1: (0.21230217975515078, 0.21249774896452367), 2: (0.2186126618363226, 0.22359804738659364), 3: (0.22903453136011276, 0.2213558716743051)},
}
VALID_TARGETS = 16700  # masked positions a validation pass scores (15% of 111,520)
SIGMA_K = 3.2


def noise_sigma(measured=NOISE_MEASURED, n=VALID_TARGETS):
    """Standard deviation of a per-epoch accuracy difference between two runs: the measured RMS difference
    of the two reference seeds, floored by the validation-sampling noise at p = 0.5."""
    diffs = [a - b for a, b in measured['valid_accuracy_by_epoch'].values() if a is not None and b is not None]
    rms = math.sqrt(sum(d * d for d in diffs) / len(diffs)) if diffs else 0.0
    return max(rms, math.sqrt(2 * 0.25 / n))


DEFAULT_TOL = round(SIGMA_K * noise_sigma(), 4)


def read_jsonl(path):
    """Records of a JSON-lines file; torn or non-JSON lines (a run killed mid-write) are skipped."""
    out = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def valid_by_epoch(path):
    """{epoch: (loss, accuracy)} of the validation lines; a later line for the same epoch wins (resumes)."""
    out = {}
    for r in read_jsonl(path):
        if r.get('kind') == 'valid' and 'epoch' in r and 'accuracy' in r:
            out[int(r['epoch'])] = (float(r.get('loss', float('nan'))), float(r['accuracy']))
    return out


def cmd_epochs(args):
    tol = args.tol if args.tol is not None else DEFAULT_TOL
    if tol is None:
        print('no tolerance: give --tol (the reference noise has not been measured into this script)')
        return 2
    a, b = valid_by_epoch(args.mlm), valid_by_epoch(args.ref)
    epochs = sorted(set(a) | set(b))
    if not epochs:
        print(f'no validation lines in {args.mlm} or {args.ref}')
        return 2
    print(f'{"epoch":>5}  {"mlm loss":>9} {"mlm acc":>8}  {"ref loss":>9} {"ref acc":>8}  {"|d acc|":>8}')
    worst, judged, bad = 0.0, 0, []
    for e in epochs:
        la, aa = a.get(e, (None, None))
        lb, ab = b.get(e, (None, None))
        fmt = lambda v, w, p: f'{v:{w}.{p}f}' if v is not None else f'{"-":>{w}}'
        if aa is not None and ab is not None:
            d = abs(aa - ab)
            judged += 1
            worst = max(worst, d) if not math.isnan(d) else math.inf
            if not d <= tol:
                bad.append(e)
            ds = f'{d:8.4f}' + ('  <- beyond the noise' if not d <= tol else '')
        else:
            ds = f'{"-":>8}  (one run only)'
        print(f'{e + 1:>5}  {fmt(la, 9, 4)} {fmt(aa, 8, 4)}  {fmt(lb, 9, 4)} {fmt(ab, 8, 4)}  {ds}')
    if judged == 0:
        print('verdict: NO DATA (no epoch reached by both runs)')
        return 2
    verdict = 'AGREE' if not bad else 'DISAGREE'
    print(f'verdict: {verdict}: {judged} common epochs, largest |d acc| {worst:.4f}, tolerance {tol:.4f} '
          f'({"the reference run-to-run noise, compare_runs.py" if args.tol is None else "--tol"}){"; beyond it at epochs " + ", ".join(str(e + 1) for e in bad) if bad else ""}')
    return 0 if not bad else 1


def cmd_noise(args):
    """Largest per-epoch validation-accuracy difference between two runs that differ only in their seed (the
    tolerance's source); --targets: masked positions a validation pass scores, for the sampling floor (default
    VALID_TARGETS, Tiny Shakespeare's character validation split)."""
    a, b = valid_by_epoch(args.a), valid_by_epoch(args.b)
    common = sorted(set(a) & set(b))
    if not common:
        print('no common validation epochs')
        return 2
    worst = 0.0
    for e in common:
        d = abs(a[e][1] - b[e][1])
        worst = max(worst, d)
        print(f'epoch {e + 1}: accuracy {a[e][1]:.4f} vs {b[e][1]:.4f} (|d| {d:.4f}); loss {a[e][0]:.4f} vs {b[e][0]:.4f}')
    sigma = noise_sigma({'valid_accuracy_by_epoch': {e: (a[e][1], b[e][1]) for e in common}}, args.targets)
    print(f'largest |d accuracy| {worst:.4f}; sigma of a difference (RMS, floored by validation sampling) '
          f'{sigma:.4f}; tolerance {SIGMA_K} sigma = {SIGMA_K * sigma:.4f}')
    return 0


def train_losses(path):
    """{step: loss string as logged} of the train lines (mlm prints %.9g: equal strings are equal floats)."""
    out = {}
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get('kind') == 'train' and 'step' in r:
                # The raw text of the loss field, so that the comparison is on the logged digits.
                key = '"loss":'
                i = line.find(key)
                raw = line[i + len(key):].split(',')[0].split('}')[0].strip() if i >= 0 else repr(r.get('loss'))
                out[int(r['step'])] = raw
    return out


def cmd_steps(args):
    a, b = train_losses(args.a), train_losses(args.b)
    common = sorted(set(a) & set(b))
    if args.steps:
        common = [s for s in common if s <= args.steps]
    if not common:
        print(f'no common training steps in {args.a} and {args.b}')
        return 2
    worst, bad = 0.0, 0
    for s in common:
        la, lb = float(a[s]), float(b[s])
        r = abs(la - lb) / abs(la) if la != 0 else abs(lb)
        if math.isnan(r):
            r = math.inf
        worst = max(worst, r)
        bad += not r <= args.rel
        print(f'step {s:4d}: loss {la:.7f} vs {lb:.7f}  rel {r:.2e}')
    missing = args.steps and len(common) < args.steps
    ok = bad == 0 and not missing
    print(f'verdict: {"AGREE" if ok else "DISAGREE"}: {len(common)} steps, worst relative loss difference '
          f'{worst:.2e} (bound {args.rel:.0e}){"; only " + str(len(common)) + " of " + str(args.steps) + " steps" if missing else ""}')
    return 0 if ok else 1


def safetensors_tensors(path):
    """{name: raw bytes} of a safetensors file (the metadata entry left out)."""
    with open(path, 'rb') as f:
        n = struct.unpack('<Q', f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        lo, hi = info['data_offsets']
        out[name] = (info.get('dtype'), tuple(info.get('shape', ())), data[lo:hi])
    return out


def newest_checkpoint(run_dir):
    d = os.path.join(run_dir, 'checkpoints')
    names = sorted(n for n in os.listdir(d) if n.startswith('ckpt-') and n.endswith('.safetensors')) \
        if os.path.isdir(d) else []
    return os.path.join(d, names[-1]) if names else None


def cmd_identical(args):
    problems = []
    la, lb = train_losses(os.path.join(args.a, 'metrics.jsonl')), train_losses(os.path.join(args.b, 'metrics.jsonl'))
    if not la or set(la) != set(lb):
        problems.append(f'logged steps differ ({len(la)} vs {len(lb)} train lines)')
    differ = [s for s in sorted(set(la) & set(lb)) if la[s] != lb[s]]
    if differ:
        problems.append(f'losses differ at {len(differ)} steps, first at step {differ[0]} ({la[differ[0]]} vs {lb[differ[0]]})')
    ca, cb = newest_checkpoint(args.a), newest_checkpoint(args.b)
    print(f'checkpoints: {ca} and {cb}')
    if not ca or not cb:
        problems.append('a run has no checkpoint')
    elif os.path.basename(ca) != os.path.basename(cb):
        problems.append(f'newest checkpoints are of different steps ({os.path.basename(ca)}, {os.path.basename(cb)})')
    else:
        ta, tb = safetensors_tensors(ca), safetensors_tensors(cb)
        if set(ta) != set(tb):
            problems.append(f'checkpoint tensors differ in names: {sorted(set(ta) ^ set(tb))}')
        for name in sorted(set(ta) & set(tb)):
            same = ta[name] == tb[name]
            print(f'  {name}: {"identical" if same else "DIFFERENT"} ({len(ta[name][2])} bytes)')
            if not same:
                problems.append(f'tensor {name} differs')
    print(f'{len(la)} logged steps compared, {len(differ)} differ')
    print('verdict: ' + ('IDENTICAL' if not problems else 'NOT IDENTICAL: ' + '; '.join(problems)))
    return 0 if not problems else 1


def cmd_throughput(args):
    rates = [float(r['tokens_per_s']) for r in read_jsonl(args.metrics)
             if r.get('kind') == 'train' and r.get('scope', 'interval') == 'interval' and r.get('tokens_per_s')]
    if len(rates) < 2:
        print(f'throughput: too few train lines in {args.metrics} ({len(rates)}; the first is warm-up)')
        return 2
    tps = statistics.median(rates[1:])
    ms = 1000.0 * args.tokens_per_step / tps
    print(f'throughput: {tps:.0f} tokens/s, {ms:.3f} ms/step (median of {len(rates) - 1} intervals after warm-up, '
          f'{args.tokens_per_step} tokens/step)')
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('epochs', help='per-epoch validation accuracy of mlm vs the reference')
    p.add_argument('mlm')
    p.add_argument('ref')
    p.add_argument('--tol', type=float, default=None, help='largest |d accuracy| (default: the measured noise)')
    p.set_defaults(fn=cmd_epochs)
    p = sub.add_parser('noise', help='largest per-epoch accuracy difference of two runs of different seeds')
    p.add_argument('a')
    p.add_argument('b')
    p.add_argument('--targets', type=int, default=VALID_TARGETS,
                   help='masked positions per validation pass, for the sampling floor (default %(default)s)')
    p.set_defaults(fn=cmd_noise)
    p = sub.add_parser('steps', help='per-step losses of two mlm runs')
    p.add_argument('a')
    p.add_argument('b')
    p.add_argument('--rel', type=float, default=1e-3)
    p.add_argument('--steps', type=int, default=0)
    p.set_defaults(fn=cmd_steps)
    p = sub.add_parser('identical', help='bit identity of two mlm run directories')
    p.add_argument('a')
    p.add_argument('b')
    p.set_defaults(fn=cmd_identical)
    p = sub.add_parser('throughput', help='median tokens/s and ms/step of a run')
    p.add_argument('metrics')
    p.add_argument('--tokens-per-step', type=int, required=True)
    p.set_defaults(fn=cmd_throughput)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except OSError as e:
        print(f'cannot read: {e}')
        return 2


if __name__ == '__main__':
    sys.exit(main())
