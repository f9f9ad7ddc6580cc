#!/usr/bin/env python3
"""gpu_summary.py LOGS OUTDIR: summary.txt and gpu-<date>.json of a tools/gpu_verify.sh run.

Reads LOGS/results.tsv (step, pass|fail|skip, seconds, detail; a later line for a step wins), LOGS/facts.txt
(key=value), LOGS/compare-20ep.log, the throughput steps' logs (LOGS/tput-*.log) and the two 20-epoch
metrics files in OUTDIR (mlm-20ep.jsonl, ref-20ep.jsonl). Writes OUTDIR/summary.txt and
OUTDIR/gpu-<YYYYMMDD-HHMMSS>.json; the JSON is what goes to bench/results/ (README, GPU section).
"""

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_runs  # noqa: E402

# Throughput steps: name -> (what, batch, seq_len, precision).
THROUGHPUT = {
    'tput-mlm-b64-tf32': ('mlm, batch 64, TF32 on', 64, 32, 'tf32'),
    'tput-mlm-b64-fp32': ('mlm, batch 64, TF32 off', 64, 32, 'fp32'),
    'tput-mlm-b64-bf16': ('mlm, batch 64, train.precision = bf16', 64, 32, 'bf16'),
    'tput-mlm-b512-tf32': ('mlm, batch 512, TF32 on', 512, 32, 'tf32'),
    'tput-reference': ('PyTorch reference trainer, batch 64, TF32 off, 300 steps', 64, 32, 'fp32'),
    # issue 23: bert-base (configs/bert-base.conf) against transformers' BertForMaskedLM, autocast BF16 + SDPA
    'tput-bert-t128-bf16': ('mlm bert-base, T 128, batch 64, BF16', 64, 128, 'bf16'),
    'tput-torch-bert-t128-bf16': ('PyTorch BertForMaskedLM, T 128, batch 64, BF16 autocast, SDPA', 64, 128, 'bf16'),
    'tput-bert-t128-tf32': ('mlm bert-base, T 128, batch 64, TF32', 64, 128, 'tf32'),
    'tput-bert-t512-bf16': ('mlm bert-base, T 512, batch 16, BF16', 16, 512, 'bf16'),
    'tput-torch-bert-t512-bf16': ('PyTorch BertForMaskedLM, T 512, batch 16, BF16 autocast, SDPA', 16, 512, 'bf16'),
}
# Issue 23's goals, as ratios of two throughput steps: (numerator, denominator, goal, what).
GOALS = [
    ('tput-bert-t128-bf16', 'tput-torch-bert-t128-bf16', 1.5, 'mlm BF16 / PyTorch BF16 (autocast, SDPA), bert-base T 128'),
    ('tput-bert-t128-bf16', 'tput-bert-t128-tf32', 1.8, 'mlm BF16 / mlm TF32, bert-base T 128'),
    ('tput-bert-t512-bf16', 'tput-torch-bert-t512-bf16', None, 'mlm BF16 / PyTorch BF16 (autocast, SDPA), bert-base T 512'),
]


def goal_lines(tput):
    """One line per goal: the ratio and whether it is met, or why it is not measured."""
    lines = []
    for num, den, goal, what in GOALS:
        if num in tput and den in tput:
            r = tput[num]['tokens_per_s'] / tput[den]['tokens_per_s']
            verdict = '' if goal is None else (f' (goal {goal}x: met)' if r >= goal else f' (goal {goal}x: NOT met)')
            lines.append(f'  {what}: {r:.2f}x{verdict}')
        else:
            lines.append(f'  {what}: not measured ({", ".join(n for n in (num, den) if n not in tput)} missing)')
    return lines


def read_results(path):
    order, last = [], {}
    with open(path, encoding='utf-8') as f:
        for line in f:
            parts = line.rstrip('\n').split('\t')
            if len(parts) < 4:
                continue
            name, status, secs, detail = parts[0], parts[1], parts[2], '\t'.join(parts[3:])
            if name not in last:
                order.append(name)
            last[name] = (status, secs, detail)
    return [(n,) + last[n] for n in order]


def read_facts(path):
    facts = {}
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            for line in f:
                if '=' in line:
                    k, v = line.rstrip('\n').split('=', 1)
                    facts[k] = v
    return facts


def throughput_of(log):
    """(tokens/s, ms/step) from a throughput step's log, or None."""
    if not os.path.exists(log):
        return None
    with open(log, encoding='utf-8', errors='replace') as f:
        m = re.search(r'^throughput: ([0-9.]+) tokens/s, ([0-9.]+) ms/step', f.read(), re.M)
    return (float(m.group(1)), float(m.group(2))) if m else None


def epochs_of(path):
    if not os.path.exists(path):
        return []
    return [dict(epoch=e + 1, loss=l, accuracy=a) for e, (l, a) in sorted(compare_runs.valid_by_epoch(path).items())]


def main(argv):
    if len(argv) != 3:
        print(__doc__)
        return 2
    logs, out = argv[1], argv[2]
    results = read_results(os.path.join(logs, 'results.tsv'))
    facts = read_facts(os.path.join(logs, 'facts.txt'))
    compare_log = ''
    if os.path.exists(os.path.join(logs, 'compare-20ep.log')):
        with open(os.path.join(logs, 'compare-20ep.log'), encoding='utf-8', errors='replace') as f:
            compare_log = f.read().rstrip()
    verdict = next((l for l in compare_log.splitlines() if l.startswith('verdict:')), 'verdict: none')
    mlm_epochs = epochs_of(os.path.join(out, 'mlm-20ep.jsonl'))
    ref_epochs = epochs_of(os.path.join(out, 'ref-20ep.jsonl'))
    tput = {}
    for name, (what, batch, seq_len, precision) in THROUGHPUT.items():
        t = throughput_of(os.path.join(logs, name + '.log'))
        if t:
            tput[name] = dict(what=what, batch=batch, seq_len=seq_len, precision=precision, tf32=precision == 'tf32',
                              tokens_per_s=round(t[0], 1), ms_per_step=t[1])
    counts = {s: sum(1 for r in results if r[1] == s) for s in ('pass', 'fail', 'skip')}
    failed = [r[0] for r in results if r[1] == 'fail']
    started = facts.get('started', '')
    stamp = re.sub(r'[^0-9T]', '', started).replace('T', '-')[:15] or 'unknown'

    L = []
    L.append(f'mlm GPU verification (tools/gpu_verify.sh): {started} to {facts.get("finished", "?")}, '
             f'{facts.get("elapsed_s", "?")} s of a {facts.get("deadline_s", "?")} s deadline')
    if facts.get('stub') == '1' or facts.get('device', '').startswith('stand-in'):
        L.append('STAND-IN RUN (MLM_VERIFY_STUB=1): no GPU step ran; these figures test the plumbing only.')
    L.append(f'commit {facts.get("commit", "?")}; device {facts.get("device", "?") or "none found"}; driver '
             f'{facts.get("driver", "?")}; {facts.get("cuda_driver_api", "CUDA ?")}; nvcc '
             f'{facts.get("nvcc", "?")}; PyTorch {facts.get("torch", "?")}')
    L.append(f'build: {facts.get("build", "?")}; corpus: {facts.get("corpus", "?")}; epochs: {facts.get("epochs", "?")}')
    L.append('')
    overall = 'every step passed or was skipped for the stated reason' if not failed else \
        'FAILED: ' + ', '.join(failed)
    L.append(f'steps: {counts["pass"]} passed, {counts["fail"]} failed, {counts["skip"]} skipped: {overall}')
    for name, status, secs, detail in results:
        L.append(f'  {status.upper():4} {name:24} {secs:>4} s  {detail}')
    L.append('')
    L.append(f'{facts.get("epochs", "20")}-epoch comparison, validation loss and accuracy per epoch (mlm on the GPU, TF32 '
             f'off, vs the PyTorch reference on the same GPU, TF32 off; mlm-20ep.jsonl, ref-20ep.jsonl):')
    L.append(f'  mlm epochs logged: {len(mlm_epochs)}; reference epochs logged: {len(ref_epochs)}')
    L.extend('  ' + l for l in compare_log.splitlines())
    L.append('')
    L.append('throughput (median tokens/s over the logged intervals after the first; ms/step at that rate):')
    if facts.get('throughput_contended'):
        L.append('  NOTE: ' + facts['throughput_contended'])
    for name, (what, _, _, _) in THROUGHPUT.items():
        t = tput.get(name)
        L.append(f'  {what:62} ' + (f'{t["tokens_per_s"]:>12,.0f} tokens/s {t["ms_per_step"]:>9.3f} ms/step'
                                       if t else 'not measured (see its step above)'))
    L.append('')
    L.append('issue 23 goals (ratios of the figures above, same GPU, same batch):')
    L.extend(goal_lines(tput))
    with open(os.path.join(out, 'summary.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(L) + '\n')

    doc = dict(date=started, commit=facts.get('commit'), stub=facts.get('stub') == '1' or
               facts.get('device', '').startswith('stand-in'),
               device=facts.get('device'), driver=facts.get('driver'), cuda=facts.get('cuda_driver_api'),
               nvcc=facts.get('nvcc'), torch=facts.get('torch'), build=facts.get('build'),
               deadline_s=facts.get('deadline_s'), elapsed_s=facts.get('elapsed_s'),
               steps={n: dict(status=s, seconds=int(sec) if sec.isdigit() else sec, detail=d)
                      for n, s, sec, d in results},
               epochs=dict(config='configs/shakespeare.conf, TF32 off', mlm=mlm_epochs, reference=ref_epochs,
                           verdict=verdict[len('verdict: '):] if verdict.startswith('verdict: ') else verdict),
               throughput=tput, throughput_contended=bool(facts.get('throughput_contended')),
               goals=[dict(what=w, numerator=n, denominator=d, goal=g,
                           ratio=round(tput[n]['tokens_per_s'] / tput[d]['tokens_per_s'], 3)
                           if n in tput and d in tput else None) for n, d, g, w in GOALS])
    with open(os.path.join(out, f'gpu-{stamp}.json'), 'w', encoding='utf-8') as f:
        json.dump(doc, f, indent=1)
        f.write('\n')
    print(f'wrote {os.path.join(out, "summary.txt")} and gpu-{stamp}.json')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
