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

Several mlm builds can run side by side (--mlm openblas=build/mlm builtin=build-builtin/mlm), "default" as a
thread count runs both programs without setting any (mlm without train.threads, PyTorch without
set_num_threads), and --busy-peer times the given thread settings again with one busy process running beside
(a Python loop), reporting the share of its unloaded speed each program keeps.

Usage: python3 bench/cpu_vs_torch.py [--threads 1 2 default] [--busy-peer [default]] [--steps 40] [--repeats 3]
                                     [--mlm [LABEL=]PATH ...]
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
    # threads 0: no train.threads, mlm's own default (what a user who sets nothing gets)
    cmd = ([mlm, 'train', '--device', 'cpu', '--set', f'train.max_steps={steps}'] +
           (['--set', f'train.threads={threads}'] if threads > 0 else []) +
           ['--set', f'train.log_every={LOG_EVERY}', '-q', '-o', run_dir])
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


def run_mlm(mlm: str, threads: int, steps: int, env: dict, cpu_time: bool = True) -> dict:
    rows, cpu_long, command = train_once(mlm, threads, steps, env)
    tps = [r['tokens_per_s'] for r in rows if r.get('kind') == 'train'][1:]  # the first interval is warm-up
    if not tps:
        sys.exit(f'cpu_vs_torch: {steps} steps give no timed interval after the warm-up; use --steps >= {2 * LOG_EVERY}')
    med = statistics.median(tps)
    out = {'tokens_per_s': med, 'step_ms': 1000.0 * B * T / med, 'intervals_tokens_per_s': [round(x, 1) for x in tps],
           'command': command}
    if cpu_time:
        # CPU time per step: the same command with LOG_EVERY steps costs the same start-up, samples and final
        # validation, so the difference is the CPU time of steps - LOG_EVERY training steps.
        _, cpu_short, _ = train_once(mlm, threads, LOG_EVERY, env)
        out['cpu_ms_per_step'] = 1000.0 * (cpu_long - cpu_short) / (steps - LOG_EVERY)
    return out


def run_torch(python: str, threads: int, steps: int, env: dict) -> dict:
    cmd = [python, os.path.join(HERE, 'torch_cpu_bench.py'), '--threads', str(threads), '--steps', str(steps)]
    r = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
    d = json.loads(r.stdout)
    d['command'] = ' '.join(['python3', 'bench/torch_cpu_bench.py'] + cmd[2:])
    return d


def summary(xs: list) -> dict:
    return {'min': min(xs), 'median': statistics.median(xs), 'max': max(xs)}


class BusyPeer:
    """One busy process beside the benchmark (a Python loop that never sleeps), as on a shared machine."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
        return self

    def __exit__(self, *exc):
        self.proc.kill()  # our own child, by its handle
        self.proc.wait()


def thread_label(t: int) -> str:
    return 'default' if t == 0 else str(t)


def parse_threads(values: list) -> list:
    return [0 if v == 'default' else int(v) for v in values]


def run_condition(args, binaries, python, t, env, peer: bool) -> dict:
    """REPEATS rounds of (each mlm binary, PyTorch), alternated; with peer, one busy process runs throughout."""
    runs = {label: [] for label in binaries}
    runs['torch'] = []
    passive = []

    def rounds():
        for _ in range(args.repeats):
            for label, path in binaries.items():
                runs[label].append(run_mlm(path, t, args.steps, env, cpu_time=not args.no_cpu_time))
            runs['torch'].append(run_torch(python, t, args.torch_steps, env))
            if args.torch_passive:
                passive.append(run_torch(python, t, args.torch_steps, dict(env, OMP_WAIT_POLICY='passive')))

    if peer:
        with BusyPeer():
            rounds()
    else:
        rounds()
    out = {'threads': thread_label(t), 'busy_peer': peer, 'runs': runs, 'loadavg': os.getloadavg()}
    out['tokens_per_s'] = {k: summary([r['tokens_per_s'] for r in v]) for k, v in runs.items()}
    out['ratio_vs_torch'] = {k: summary([a['tokens_per_s'] / b['tokens_per_s'] for a, b in zip(runs[k], runs['torch'])])
                             for k in binaries}
    if not args.no_cpu_time:
        out['cpu_ms_per_step'] = {k: summary([r['cpu_ms_per_step'] for r in v]) for k, v in runs.items()}
    if passive:
        out['torch_passive_tokens_per_s'] = summary([r['tokens_per_s'] for r in passive])
    return out


def print_condition(c: dict, binaries) -> None:
    where = 'with one busy process beside it' if c['busy_peer'] else 'no added load'
    tps = c['tokens_per_s']
    line = (f"{c['threads']:>7} | {where:31} | " + ' | '.join(
        f"{k} {tps[k]['median']:6.0f} ({tps[k]['min']:.0f}-{tps[k]['max']:.0f}) x{c['ratio_vs_torch'][k]['median']:.2f}"
        for k in binaries) + f" | torch {tps['torch']['median']:6.0f} ({tps['torch']['min']:.0f}-{tps['torch']['max']:.0f})"
            f" | load {c['loadavg'][0]:.1f}")
    print(line, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--threads', nargs='+', default=['1', '2'],
                    help='thread counts; "default" runs both programs without setting any (default: 1 2)')
    ap.add_argument('--busy-peer', nargs='*', default=None, metavar='THREADS',
                    help='also time these thread counts (default: "default") with one busy process running beside, '
                         'and report the share of its unloaded speed each program keeps')
    ap.add_argument('--steps', type=int, default=40, help='mlm optimizer steps per run (intervals of 5; default %(default)s)')
    ap.add_argument('--torch-steps', type=int, default=20, help='timed PyTorch steps per run (default %(default)s)')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--mlm', nargs='+', default=[os.path.join(ROOT, 'build', 'mlm')],
                    help='mlm binaries, each PATH or LABEL=PATH (e.g. openblas=build/mlm builtin=build-builtin/mlm)')
    ap.add_argument('--python', default=None, help='python with torch (default: .venv-bench/bin/python, else python3)')
    ap.add_argument('--torch-passive', action='store_true', help='also time PyTorch with OMP_WAIT_POLICY=passive')
    ap.add_argument('--no-cpu-time', action='store_true', help='skip the second, short mlm run that gives CPU time per step')
    ap.add_argument('--note', default='', help='free text stored with the results (e.g. "machine shared")')
    args = ap.parse_args()
    python = args.python
    if python is None:
        venv = os.path.join(ROOT, '.venv-bench', 'bin', 'python')
        python = venv if os.path.exists(venv) else 'python3'
    binaries = {}
    for spec in args.mlm:
        label, path = spec.split('=', 1) if '=' in spec else ('mlm', spec)
        if not os.access(path, os.X_OK):
            sys.exit(f'cpu_vs_torch: {path} not found: build it first (cmake -S . -B build && cmake --build build --target mlm)')
        binaries[label] = path
    env = clean_env()
    versions = {k: subprocess.run([p, '--version'], env=env, stdout=subprocess.PIPE, text=True).stdout.strip()
                for k, p in binaries.items()}
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
               platform.processor())
    try:
        commit = subprocess.check_output(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'], text=True).strip()
    except Exception:
        commit = 'unknown'
    flops = train_flops_per_step()
    result = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), 'commit': commit,
              'host': socket.gethostname(), 'cpu': cpu, 'cores': os.cpu_count(), 'mlm_versions': versions,
              'loadavg_start': os.getloadavg(), 'note': args.note, 'config': {'B': B, 'T': T, 'C': C, 'F': F, 'L': L, 'V': V},
              'step_gflop': flops / 1e9, 'conditions': []}
    print(f'{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; ' +
          '; '.join(f'{k}: {v}' for k, v in versions.items()), flush=True)
    print('threads | condition | per mlm build: tokens/s median (min-max) x median ratio to PyTorch | PyTorch tokens/s | load')
    plan = [(t, False) for t in parse_threads(args.threads)]
    if args.busy_peer is not None:
        plan += [(t, True) for t in parse_threads(args.busy_peer or ['default'])]
    os.makedirs(os.path.join(HERE, 'results'), exist_ok=True)
    out = os.path.join(HERE, 'results', f"cpu-{socket.gethostname().split('.')[0]}-"
                       f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    for t, peer in plan:
        c = run_condition(args, binaries, python, t, env, peer)
        result['conditions'].append(c)
        print_condition(c, binaries)
        with open(out, 'w') as f:  # after every condition, so that an interrupted run keeps what it measured
            json.dump(result, f, indent=1)
    # Under load: the share of its unloaded speed each program keeps, at the same thread setting.
    shares = {}
    for c in result['conditions']:
        if not c['busy_peer']:
            continue
        base = next((d for d in result['conditions'] if not d['busy_peer'] and d['threads'] == c['threads']), None)
        if base is None:
            continue
        shares[c['threads']] = {k: c['tokens_per_s'][k]['median'] / base['tokens_per_s'][k]['median']
                                for k in c['tokens_per_s']}
        print(f"share of unloaded speed kept beside one busy process, {c['threads']} threads: " +
              ', '.join(f'{k} {v:.2f}' for k, v in shares[c['threads']].items()), flush=True)
    result['share_kept_with_busy_peer'] = shares
    result['loadavg_end'] = os.getloadavg()
    with open(out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'written to {os.path.relpath(out, ROOT)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
