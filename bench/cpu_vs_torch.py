"""cpu_vs_torch.py: the main command's CPU training speed against PyTorch on the same machine.

mlm is timed through the command a user runs, `mlm train --device cpu --set train.max_steps=N
--set train.threads=T` on Tiny Shakespeare with the reference configuration: the throughput is what the
training loop itself logs in the run's metrics.jsonl (tokens/s over each train.log_every interval, batch
assembly, masking, forward, backward, clip and Adam included). The first interval is warm-up and is
dropped; the median of the others is mlm's figure for that run. PyTorch runs the reference model of
tools/reference/ (bench/torch_cpu_bench.py: masking, forward, backward, clip, Noam-Adam) with
torch.set_num_threads(T); its figure is the median timed step.

Both programs see the same environment with the thread-related variables removed (OPENBLAS_NUM_THREADS,
OMP_NUM_THREADS, OMP_WAIT_POLICY, GOMP_SPINCOUNT, MKL_NUM_THREADS): what a user who sets nothing gets.
mlm and PyTorch alternate, REPEATS runs each, so that a machine whose load drifts slows both alike; the
report gives the min, median and max of the per-run figures and of the per-pair ratios.

CPU time per step is reported too, as a figure that other processes on the machine inflate much less than
wall time: for mlm, the CPU seconds of the run minus those of the same command stopped after 5 steps
(start-up, samples and the final validation cancel), per step; for PyTorch, the process CPU time of each
timed step (median). At 1 thread it is the work a step needs; at more threads it adds any waiting
that burns CPU.

With --torch-passive PyTorch is also timed with OMP_WAIT_POLICY=passive (a fairer yardstick on a machine
that other processes keep busy, where its OpenMP threads otherwise spin against them); the ratio columns
always use PyTorch as a user gets it, and the passive figures are reported beside them.

Usage: python3 bench/cpu_vs_torch.py [--threads 1 2] [--steps 40] [--repeats 3] [--mlm build/mlm]
Writes bench/results/cpu-<host>-<date>.json and prints a table.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
THREAD_VARS = ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'MKL_NUM_THREADS')
LOG_EVERY = 5
B, T, C, F, L, V = 64, 32, 128, 256, 6, 67  # reference configuration; V: 65 characters + [PAD] + [MASK]


def train_flops_per_step() -> float:
    # As model_train_flops (src/host/model/model.c): matmuls and attention, forward + 2x for backward.
    fwd = 2.0 * B * T * (L * (4.0 * C * C + 2.0 * C * F + 2.0 * T * C) + C * V)
    return 3.0 * fwd


def clean_env() -> dict:
    env = dict(os.environ)
    for k in THREAD_VARS:
        env.pop(k, None)
    return env


def train_once(mlm: str, threads: int, steps: int, env: dict):
    """Runs the command; returns (its metrics rows, the CPU seconds it used, user + system)."""
    out = tempfile.mkdtemp(prefix='mlm-bench-')
    run_dir = os.path.join(out, 'run')
    cmd = [mlm, 'train', '--device', 'cpu', '--set', f'train.max_steps={steps}', '--set', f'train.threads={threads}',
           '--set', f'train.log_every={LOG_EVERY}', '-q', '-o', run_dir]
    before = os.times()
    try:
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except subprocess.CalledProcessError as e:
        sys.exit(f'cpu_vs_torch: {" ".join(cmd)} failed: {e.stderr.strip()}')
    finally:
        shutil.rmtree(out, ignore_errors=True)
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return rows, cpu, ' '.join(cmd[:-2] + ['-o', 'RUN'])


def run_mlm(mlm: str, threads: int, steps: int, env: dict) -> dict:
    rows, cpu_long, command = train_once(mlm, threads, steps, env)
    tps = [r['tokens_per_s'] for r in rows if r.get('kind') == 'train'][1:]  # the first interval is warm-up
    if not tps:
        sys.exit(f'cpu_vs_torch: {steps} steps give no timed interval after the warm-up; use --steps >= {2 * LOG_EVERY}')
    # CPU time per step: the same command with LOG_EVERY steps costs the same start-up, samples and final
    # validation, so the difference is the CPU time of steps - LOG_EVERY training steps.
    _, cpu_short, _ = train_once(mlm, threads, LOG_EVERY, env)
    med = statistics.median(tps)
    return {'tokens_per_s': med, 'step_ms': 1000.0 * B * T / med, 'intervals_tokens_per_s': [round(x, 1) for x in tps],
            'cpu_ms_per_step': 1000.0 * (cpu_long - cpu_short) / (steps - LOG_EVERY), 'command': command}


def run_torch(python: str, threads: int, steps: int, env: dict) -> dict:
    cmd = [python, os.path.join(HERE, 'torch_cpu_bench.py'), '--threads', str(threads), '--steps', str(steps)]
    r = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
    d = json.loads(r.stdout)
    d['command'] = ' '.join(['python3', 'bench/torch_cpu_bench.py'] + cmd[2:])
    return d


def summary(xs: list) -> dict:
    return {'min': min(xs), 'median': statistics.median(xs), 'max': max(xs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    ap.add_argument('--steps', type=int, default=40, help='mlm optimizer steps per run (intervals of 5; default %(default)s)')
    ap.add_argument('--torch-steps', type=int, default=20, help='timed PyTorch steps per run (default %(default)s)')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--mlm', default=os.path.join(ROOT, 'build', 'mlm'))
    ap.add_argument('--python', default=None, help='python with torch (default: .venv-bench/bin/python, else python3)')
    ap.add_argument('--torch-passive', action='store_true', help='also time PyTorch with OMP_WAIT_POLICY=passive')
    ap.add_argument('--note', default='', help='free text stored with the results (e.g. "machine shared")')
    args = ap.parse_args()
    python = args.python
    if python is None:
        venv = os.path.join(ROOT, '.venv-bench', 'bin', 'python')
        python = venv if os.path.exists(venv) else 'python3'
    if not os.access(args.mlm, os.X_OK):
        sys.exit(f'cpu_vs_torch: {args.mlm} not found: build it first (cmake -S . -B build && cmake --build build --target mlm)')
    env = clean_env()
    version = subprocess.run([args.mlm, '--version'], env=env, stdout=subprocess.PIPE, text=True).stdout.strip()
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
               platform.processor())
    try:
        commit = subprocess.check_output(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'], text=True).strip()
    except Exception:
        commit = 'unknown'
    flops = train_flops_per_step()
    result = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), 'commit': commit,
              'host': socket.gethostname(), 'cpu': cpu, 'cores': os.cpu_count(), 'mlm_version': version,
              'loadavg_start': os.getloadavg(), 'note': args.note, 'config': {'B': B, 'T': T, 'C': C, 'F': F, 'L': L, 'V': V},
              'step_gflop': flops / 1e9, 'by_threads': {}}
    print(f'{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {version}', flush=True)
    print('threads | mlm tokens/s (min/med/max) | mlm ms/step | GFLOP/s | torch tokens/s (min/med/max) | mlm/torch (min/med/max)')
    for t in args.threads:
        mlm_runs, torch_runs, passive_runs = [], [], []
        for _ in range(args.repeats):
            mlm_runs.append(run_mlm(args.mlm, t, args.steps, env))
            torch_runs.append(run_torch(python, t, args.torch_steps, env))
            if args.torch_passive:
                passive_runs.append(run_torch(python, t, args.torch_steps, dict(env, OMP_WAIT_POLICY='passive')))
        m = summary([r['tokens_per_s'] for r in mlm_runs])
        p = summary([r['tokens_per_s'] for r in torch_runs])
        ratio = summary([a['tokens_per_s'] / b['tokens_per_s'] for a, b in zip(mlm_runs, torch_runs)])
        cpu_ratio = summary([b['cpu_ms_per_step'] / a['cpu_ms_per_step'] for a, b in zip(mlm_runs, torch_runs)])
        result['by_threads'][str(t)] = {'mlm': mlm_runs, 'torch': torch_runs, 'mlm_tokens_per_s': m,
                                        'torch_tokens_per_s': p, 'ratio': ratio,
                                        'mlm_cpu_ms_per_step': summary([r['cpu_ms_per_step'] for r in mlm_runs]),
                                        'torch_cpu_ms_per_step': summary([r['cpu_ms_per_step'] for r in torch_runs]),
                                        'ratio_cpu_time': cpu_ratio,
                                        'mlm_gflops_per_s_median': m['median'] * flops / (B * T) / 1e9}
        extra = ''
        if passive_runs:
            q = summary([r['tokens_per_s'] for r in passive_runs])
            qr = summary([a['tokens_per_s'] / b['tokens_per_s'] for a, b in zip(mlm_runs, passive_runs)])
            result['by_threads'][str(t)].update({'torch_passive': passive_runs, 'torch_passive_tokens_per_s': q,
                                                 'ratio_vs_torch_passive': qr})
            extra = (f" | torch passive {q['min']:.0f} {q['median']:.0f} {q['max']:.0f}, "
                     f"mlm/that {qr['min']:.2f} {qr['median']:.2f} {qr['max']:.2f}")
        print(f"{t:7d} | {m['min']:6.0f} {m['median']:6.0f} {m['max']:6.0f} | {1000 * B * T / m['median']:10.1f} | "
              f"{m['median'] * flops / (B * T) / 1e9:7.1f} | {p['min']:6.0f} {p['median']:6.0f} {p['max']:6.0f} | "
              f"{ratio['min']:.2f} {ratio['median']:.2f} {ratio['max']:.2f}{extra}", flush=True)
        mc, tc = result['by_threads'][str(t)]['mlm_cpu_ms_per_step'], result['by_threads'][str(t)]['torch_cpu_ms_per_step']
        print(f"        CPU ms/step (min/med/max): mlm {mc['min']:.0f} {mc['median']:.0f} {mc['max']:.0f}, "
              f"torch {tc['min']:.0f} {tc['median']:.0f} {tc['max']:.0f}; torch/mlm "
              f"{cpu_ratio['min']:.2f} {cpu_ratio['median']:.2f} {cpu_ratio['max']:.2f}", flush=True)
    result['loadavg_end'] = os.getloadavg()
    os.makedirs(os.path.join(HERE, 'results'), exist_ok=True)
    out = os.path.join(HERE, 'results', f"cpu-{socket.gethostname().split('.')[0]}-"
                       f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    with open(out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'written to {os.path.relpath(out, ROOT)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
