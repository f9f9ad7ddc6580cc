"""bert_mini_cpu.py: training tokens/s of mlm's CPU backend at BERT-mini's shape, dense and with sparse
prediction, against the PyTorch reference model (tools/reference/reference_model.py) at the same shape and
thread count.

Shape (BERT-mini): 4 layers x 256, 4 heads, d_ff 1024, sequence 128, vocabulary 30,522, batch 32 (--batch).
Random token batches on both sides (no corpus, no tokenizer). One step on both sides: masking (15%),
forward with dropout 0.1, cross-entropy over the selected positions, backward, global-norm clip at 1.0 and
labml's Noam-Adam update.

- mlm: build/bench/bert_mini_cpu (bench/bert_mini_cpu.c), the CPU model built from a ModelConfig, with
  --sparse for train.sparse_prediction.
- torch: the reference model (replica of labml's TransformerMLM) with torch.set_num_threads(T); the dense
  model as the reference computes it (every position's logits), and, as a fairer yardstick for the sparse
  figure, "torch-sparse": the same model with the generator applied to the selected rows only (gathered after
  the encoder and its final LayerNorm).

--arch bert (issue 20): mlm's model.arch = bert (BertForMaskedLM) with BERT's AdamW against transformers' own
BertForMaskedLM with the same BertConfig (512 positions), batch, threads and optimizer (torch.optim.AdamW, decay
on 2-D weights, clip 1.0), as a user would run it (its default attention implementation): "hf" computes every
position's logits (model(input_ids, labels=...)), "hf-sparse" runs model.bert, then model.cls on the selected
rows only. Masking on both sides is BERT's 15% with 80/10/10.

After --warmup untimed steps, --steps steps are timed; each program reports its median step (tokens/s) and the
median process CPU time per step (what other processes on a shared machine inflate least). The programs run
one after another, --repeats rounds, in the same environment with the thread-related variables removed.

Usage: python3 bench/bert_mini_cpu.py [--arch labml|bert] [--threads 1 2] [--steps 5] [--warmup 1] [--repeats 1]
                                      [--bin build/bench/bert_mini_cpu] [--python PY] [--json OUT]
       (PY: the interpreter with PyTorch, `bash tools/python_env.sh` prints it; default: this one)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
THREAD_VARS = ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'MKL_NUM_THREADS')
SHAPE = dict(n_layers=4, d_model=256, n_heads=4, d_ff=1024, seq_len=128, vocab=30522)


def timed_steps(step, args):
    """--warmup untimed calls of step(), then --steps timed ones: their target counts, wall and CPU seconds."""
    for _ in range(args.warmup):
        step()
    targets, wall, cpu = [], [], []
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        targets.append(step())
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return targets, wall, cpu


def torch_worker(args) -> int:
    """Time the PyTorch reference model in this process; print one JSON line."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, 'tools', 'reference'))
    import reference_model as rm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = rm.RefConfig(vocab=SHAPE['vocab'], d_model=SHAPE['d_model'], n_heads=SHAPE['n_heads'],
                       n_layers=SHAPE['n_layers'], d_ff=SHAPE['d_ff'], seq_len=SHAPE['seq_len'], batch=args.batch)
    model = rm.build_model(cfg, 'replica', copy_layers=False)
    model.train(True)
    params = list(model.parameters())
    opt = rm.NoamAdam(params, lr_factor=cfg.lr_factor, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                      warmup=cfg.warmup, d_model=cfg.d_model)
    gen = torch.Generator().manual_seed(args.seed + 1)
    sparse = args.worker == 'torch-sparse'

    def step():
        x = torch.randint(0, cfg.vocab - 2, (cfg.seq_len, cfg.batch), generator=gen)
        inputs, labels = rm.mlm_mask(x, cfg, generator=gen)
        if sparse:
            hidden = model.encoder(model.src_embed(inputs), None)  # [seq, batch, d_model], final norm included
            sel = labels != cfg.pad_id
            loss = torch.nn.functional.cross_entropy(model.generator(hidden[sel]), labels[sel])
        else:
            loss = rm.mlm_loss(model(inputs), labels, cfg.pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        rm.clip_grad_norm(params, cfg.max_grad_norm)
        opt.step()
        return int((labels != cfg.pad_id).sum())

    targets, wall, cpu = timed_steps(step, args)
    med = statistics.median(wall)
    print(json.dumps({'impl': args.worker, 'tokens_per_s': cfg.batch * cfg.seq_len / med, 'step_ms': 1e3 * med,
                      'step_ms_min': 1e3 * min(wall), 'cpu_ms_per_step': 1e3 * statistics.median(cpu),
                      'threads': torch.get_num_threads(), 'torch_version': torch.__version__,
                      'targets_per_step': sum(targets) / len(targets), 'steps': args.steps, 'warmup': args.warmup,
                      'batch': cfg.batch, **SHAPE}))
    return 0


def hf_worker(args) -> int:
    """Time transformers' BertForMaskedLM in this process; print one JSON line."""
    import torch
    import transformers
    from transformers import BertConfig, BertForMaskedLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    V, T, B = SHAPE['vocab'], SHAPE['seq_len'], args.batch
    pad, mask_id = V - 2, V - 1  # as bert_mini_cpu.c lays out the specials
    cfg = BertConfig(vocab_size=V, hidden_size=SHAPE['d_model'], num_hidden_layers=SHAPE['n_layers'],
                     num_attention_heads=SHAPE['n_heads'], intermediate_size=SHAPE['d_ff'],
                     max_position_embeddings=512, pad_token_id=pad)
    model = BertForMaskedLM(cfg)
    model.train(True)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([{'params': [p for p in params.values() if p.dim() == 2], 'weight_decay': 0.01},
                             {'params': [p for p in params.values() if p.dim() != 2], 'weight_decay': 0.0}],
                            lr=1e-4, betas=(0.9, 0.999), eps=1e-6)
    gen = torch.Generator().manual_seed(args.seed + 1)
    sparse = args.worker == 'hf-sparse'

    def step():
        x = torch.randint(0, V - 2, (B, T), generator=gen)
        sel = torch.rand(B, T, generator=gen) < 0.15
        r = torch.rand(B, T, generator=gen)
        inputs = x.clone()
        inputs[sel & (r < 0.8)] = mask_id
        rnd = sel & (r >= 0.8) & (r < 0.9)
        inputs[rnd] = torch.randint(0, V - 2, (int(rnd.sum()),), generator=gen)
        labels = torch.where(sel, x, torch.full_like(x, -100))
        if sparse:
            hidden = model.bert(input_ids=inputs).last_hidden_state
            loss = torch.nn.functional.cross_entropy(model.cls(hidden[sel]), x[sel])
        else:
            loss = model(input_ids=inputs, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return int(sel.sum())

    targets, wall, cpu = timed_steps(step, args)
    med = statistics.median(wall)
    print(json.dumps({'impl': args.worker, 'arch': 'bert', 'tokens_per_s': B * T / med, 'step_ms': 1e3 * med,
                      'step_ms_min': 1e3 * min(wall), 'cpu_ms_per_step': 1e3 * statistics.median(cpu),
                      'threads': torch.get_num_threads(), 'torch_version': torch.__version__,
                      'transformers_version': transformers.__version__,
                      'attn_implementation': model.config._attn_implementation,
                      'targets_per_step': sum(targets) / len(targets), 'steps': args.steps, 'warmup': args.warmup,
                      'batch': B, 'params': sum(p.numel() for p in params.values()), **SHAPE}))
    return 0


def run_json(cmd, env) -> dict:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f'{" ".join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}')
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--arch', choices=['labml', 'bert'], default='labml',
                    help='bert: model.arch = bert against transformers\' BertForMaskedLM')
    ap.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    ap.add_argument('--steps', type=int, default=5)
    ap.add_argument('--warmup', type=int, default=1)
    ap.add_argument('--repeats', type=int, default=1)
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--bin', default=os.path.join(ROOT, 'build', 'bench', 'bert_mini_cpu'))
    ap.add_argument('--python', default=sys.executable, help='interpreter with PyTorch (tools/python_env.sh)')
    ap.add_argument('--no-torch-sparse', action='store_true', help='skip the torch-sparse yardstick')
    ap.add_argument('--json', help='write every run here')
    ap.add_argument('--worker', choices=['torch', 'torch-sparse', 'hf', 'hf-sparse'], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        return hf_worker(args) if args.worker.startswith('hf') else torch_worker(args)
    if not os.access(args.bin, os.X_OK):
        sys.exit(f'{args.bin} not found: cmake --build build --target bert_mini_cpu')

    env = dict(os.environ)
    for k in THREAD_VARS:
        env.pop(k, None)
    common = ['--steps', str(args.steps), '--warmup', str(args.warmup), '--batch', str(args.batch)]
    ref = 'hf' if args.arch == 'bert' else 'torch'  # the yardstick: transformers' model or the labml reference
    runs = []
    for th in args.threads:
        for rep in range(args.repeats):
            impls = [('mlm', [args.bin, '--arch', args.arch, '--threads', str(th)] + common),
                     ('mlm-sparse', [args.bin, '--arch', args.arch, '--threads', str(th), '--sparse'] + common),
                     (ref, [args.python, __file__, '--worker', ref, '--threads', str(th)] + common)]
            if not args.no_torch_sparse:
                impls.append((ref + '-sparse', [args.python, __file__, '--worker', ref + '-sparse', '--threads',
                                                str(th)] + common))
            for name, cmd in impls:
                r = run_json(cmd, env)
                r.update(name=name, threads_asked=th, repeat=rep)
                runs.append(r)
                print(f'  {name:13s} threads {th}: {r["tokens_per_s"]:8.1f} tokens/s, step {r["step_ms"]:8.1f} ms, '
                      f'CPU {r["cpu_ms_per_step"]:8.1f} ms/step, {r["targets_per_step"]:.0f} targets', flush=True)
    print(f'\nBERT-mini on the CPU (L 4, C 256, H 4, F 1024, T 128, V 30522, arch {args.arch}), batch {args.batch}: '
          f'median over {args.repeats} round(s) of the median step')
    print(f'{"threads":>7} {"impl":>13} {"tokens/s":>10} {"CPU ms/step":>12} {"vs " + ref + " (tok/s)":>17} '
          f'{"vs " + ref + " (CPU)":>15}')
    for th in args.threads:
        med = {}
        for name in ('mlm', 'mlm-sparse', ref, ref + '-sparse'):
            rs = [r for r in runs if r['name'] == name and r['threads_asked'] == th]
            if rs:
                med[name] = (statistics.median(r['tokens_per_s'] for r in rs),
                             statistics.median(r['cpu_ms_per_step'] for r in rs))
        for name, (tps, cpu) in med.items():
            base = med[ref]
            print(f'{th:>7} {name:>13} {tps:10.1f} {cpu:12.1f} {tps / base[0]:16.2f}x {base[1] / cpu:14.2f}x')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
