"""torch_cpu_bench.py: time PyTorch training steps of the reference MLM on the CPU.

One step = reference masking, forward, cross-entropy, backward, global-norm clip at 1.0 and labml's
Noam-Adam update, with dropout 0.1 on, for the reference configuration (batch 64, seq 32, d_model 128,
8 heads, 6 layers, d_ff 256) on random character batches. After --warmup untimed steps, --steps steps
are timed (wall clock, and CPU time of the process); prints one JSON object:

  {"tokens_per_s", "step_ms", "step_ms_mean", "step_ms_min", "cpu_ms_per_step", "threads", "torch_version", ...}

tokens_per_s and step_ms are from the median timed step: on a shared machine a few steps can be slowed
many times over by other processes (thread pools spin-wait badly when cores are oversubscribed), and the
median ignores them; step_ms_mean and step_ms_min are given too. Combine with mlm's own CPU benchmark
at the same thread count (e.g. OMP_NUM_THREADS=2 for mlm, --threads 2 here).

Examples:
  python3 bench/torch_cpu_bench.py --threads 2
  python3 bench/torch_cpu_bench.py --threads 1 --steps 20 --flush-denormal
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tools', 'reference'))
import reference_model as rm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--threads', type=int, default=2,
                    help='torch.set_num_threads (default: %(default)s; 0: PyTorch\'s own default, as a user gets it)')
    ap.add_argument('--warmup', type=int, default=5, help='untimed steps first')
    ap.add_argument('--steps', type=int, default=30, help='timed steps')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--flush-denormal', action='store_true', help='torch.set_flush_denormal(True)')
    ap.add_argument('--batch-size', type=int, default=64)
    ap.add_argument('--seq-len', type=int, default=32)
    ap.add_argument('--d-model', type=int, default=128)
    ap.add_argument('--n-heads', type=int, default=8)
    ap.add_argument('--n-layers', type=int, default=6)
    ap.add_argument('--d-ff', type=int, default=256)
    ap.add_argument('--per-step', action='store_true', help='also list every timed step (ms)')
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    cfg = rm.RefConfig(d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers, d_ff=args.d_ff,
                       seq_len=args.seq_len, batch=args.batch_size)
    model = rm.build_model(cfg, 'replica', copy_layers=True)
    model.train(True)
    params = list(model.parameters())
    opt = rm.NoamAdam(params, lr_factor=cfg.lr_factor, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                      warmup=cfg.warmup, d_model=cfg.d_model)
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_chars = cfg.vocab - 2

    def step():
        x = torch.randint(0, n_chars, (cfg.seq_len, cfg.batch), generator=gen)
        inputs, labels = rm.mlm_mask(x, cfg, generator=gen)
        loss = rm.mlm_loss(model(inputs), labels, cfg.pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        rm.clip_grad_norm(params, cfg.max_grad_norm)
        opt.step()
        return loss

    for _ in range(args.warmup):
        step()
    times, cpu_times = [], []
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    mean = sum(times) / len(times)
    median = statistics.median(times)
    out = {
        'tokens_per_s': cfg.batch * cfg.seq_len / median,
        'step_ms': 1000 * median,
        'step_ms_mean': 1000 * mean,
        'step_ms_min': 1000 * min(times),
        # CPU seconds of the whole process (all threads) per step: what a loaded machine inflates least.
        'cpu_ms_per_step': 1000 * statistics.median(cpu_times),
        'threads': torch.get_num_threads(),
        'torch_version': torch.__version__,
        'steps': args.steps,
        'warmup': args.warmup,
        'batch': cfg.batch,
        'seq_len': cfg.seq_len,
        'flush_denormal': args.flush_denormal,
        'cpu': platform.processor() or platform.machine(),
    }
    if args.per_step:
        out['per_step_ms'] = [round(1000 * t, 2) for t in times]
    print(json.dumps(out))
    return 0


if __name__ == '__main__':
    sys.exit(main())
