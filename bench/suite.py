"""suite.py: mlm's benchmark suite, one command (bench/run.sh wraps it). What it runs depends on the machine:

GPU (nvidia-smi lists one and PyTorch can use it), in this order, each part under a timeout cut to --budget:
  1. the step's counted work in the background: build/bench/bench_emu_step --json (launches, bytes per kernel,
     FLOPs per cuBLAS family, from the CUDA code as it is, run on the CPU execution layer, tests/emu);
  2. the device's rates (bench/torch_gpu_bench.py probe): copy bandwidth, SGEMM rate TF32 off/on, launch time;
  3. for batch 64 and --big-batch, TF32 on and off:
       mlm        `mlm train --device cuda` on configs/shakespeare.conf; tokens/s from the run's own
                  metrics.jsonl (one line per train.log_every steps; the first interval is warm-up, dropped);
       reference  tools/reference/train_reference.py, the PyTorch reference trainer exactly as the reference
                  trains (labml's Noam Adam), its own tokens/s per logged interval (first dropped);
       fused      eager PyTorch, torch.optim.Adam(fused=True) (bench/torch_gpu_bench.py);
       compile    torch.compile in the first mode that works of --compile-modes (default reduce-overhead, which
                  uses CUDA graphs, then default);
     with mlm's ratio to each, median and spread (min/max over the timed intervals or windows);
  4. the roofline: each kernel family's counted bytes at the measured copy bandwidth and each cuBLAS family's
     FLOPs at the measured matrix rate (the larger of the two times is its bound); with --nsys, the measured
     time of each kernel next to it.
No GPU: the CPU comparison instead (mlm train --device cpu against bench/torch_cpu_bench.py, the reference
model in PyTorch on the CPU, at each --threads), clearly labelled, plus the counted part of the roofline; the
device figures are listed as owed.

Everything is read from the code that runs: the model configuration from configs/shakespeare.conf, the counts
from bench_emu_step, the rates from the device. Results: one JSON file (schema mlm-bench/1, bench/report.py
validates it) in --results-dir, and the table in bench/README.md regenerated from the latest file.

Usage: python3 bench/suite.py [--quick] [--mode auto|gpu|cpu] [--build DIR] [--budget S] [--results-dir DIR]
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import report  # noqa: E402

THREAD_VARS = ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'MKL_NUM_THREADS')
VARIANTS = {
    'mlm': 'mlm train (its own metrics)',
    'reference': 'PyTorch reference trainer (tools/reference/train_reference.py, labml Noam Adam)',
    'fused': 'PyTorch eager, torch.optim.Adam(fused=True)',
    'compile': 'PyTorch torch.compile (CUDA graphs when the mode has them)',
    'mlm-cpu': 'mlm train --device cpu (its own metrics)',
    'torch-cpu': 'PyTorch reference model on the CPU (bench/torch_cpu_bench.py, Noam Adam)',
}


class Clock:
    """The suite's time budget: every part's timeout is cut to what is left."""

    def __init__(self, budget):
        self.t0 = time.time()
        self.budget = budget

    def left(self) -> float:
        return float('inf') if self.budget is None else self.budget - (time.time() - self.t0)

    def cap(self, seconds: float) -> float:
        return max(0.0, min(seconds, self.left()))


def log(msg: str) -> None:
    print(f'[suite] {msg}', flush=True)


CHILDREN = set()  # process groups of the running children, stopped with the suite (SIGTERM from a timeout)


def stop_children(*_):
    for pid in list(CHILDREN):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    sys.exit(143)


def run(cmd, timeout, env=None, cwd=None):
    """(returncode or 'timeout', stdout, stderr) of cmd; never raises for a failing or missing program. The child
    gets its own process group, stopped whole at the timeout (torch.compile's workers included), and what it
    printed until then is kept."""
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                             start_new_session=True)
    except OSError as e:
        return 'missing', '', str(e)
    CHILDREN.add(p.pid)
    try:
        out, err = p.communicate(timeout=max(timeout, 0.1))
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        out, err = p.communicate()
        return 'timeout', out, err
    finally:
        CHILDREN.discard(p.pid)


def summarize(xs):
    return {'median': statistics.median(xs), 'min': min(xs), 'max': max(xs)} if xs else None


def reference_config() -> dict:
    """The keys of configs/shakespeare.conf that size the step (the suite's reference configuration)."""
    cfg, section = {}, ''
    with open(os.path.join(ROOT, 'configs', 'shakespeare.conf'), encoding='utf-8') as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line.startswith('[') and line.endswith(']'):
                section = line[1:-1]
            elif '=' in line:
                k, v = (x.strip() for x in line.split('=', 1))
                cfg[f'{section}.{k}'] = v
    keys = {'seq_len': 'data.seq_len', 'd_model': 'model.d_model', 'n_heads': 'model.n_heads',
            'n_layers': 'model.n_layers', 'd_ff': 'model.d_ff', 'batch_size': 'train.batch_size'}
    out = {k: int(cfg[v]) for k, v in keys.items()}
    out['dropout'] = float(cfg['model.dropout'])
    return out


def source_stamp() -> str:
    """The digest tools/gpu_verify.sh's source_stamp computes (CMakeLists.txt then src/include/tests sources)."""
    names = []
    for top in ('src', 'include', 'tests'):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for n in files:
                if n.endswith(('.c', '.cu', '.h')) or n == 'CMakeLists.txt':
                    names.append(os.path.relpath(os.path.join(d, n), ROOT))
    h = hashlib.md5()
    for n in ['CMakeLists.txt'] + sorted(names, key=lambda s: s.encode()):
        with open(os.path.join(ROOT, n), 'rb') as f:
            h.update(f.read())
    return h.hexdigest()


def find_corpus() -> str:
    for c in (os.path.join(ROOT, 'data', 'tinyshakespeare.txt'),
              os.path.join(os.environ.get('MLM_DATA_MIRROR', '/nonexistent'), 'tinyshakespeare.txt'),
              os.path.join(ROOT, '..', 'shared', 'data', 'tinyshakespeare.txt')):
        if os.path.isfile(c):
            return os.path.abspath(c)
    return ''


def machine_facts(python: str, mlm: str) -> dict:
    f = {'host': socket.gethostname(), 'cores': os.cpu_count(), 'loadavg_start': list(os.getloadavg()),
         'cpu': next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
                     platform.processor() or platform.machine()),
         'python': platform.python_version()}
    rc, out, _ = run([python, '-c', 'import torch, json; print(json.dumps({"torch": torch.__version__, '
                      '"torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}))'], 120)
    f.update(json.loads(out) if rc == 0 and out.strip() else {'torch': None, 'torch_cuda': None, 'cuda_available': False})
    rc, out, _ = run([mlm, '--version'], 30)
    f['mlm_version'] = out.strip() if rc == 0 else None
    rc, out, _ = run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm',
                      '--format=csv,noheader'], 30)
    if rc == 0 and out.strip():
        name, driver, mem, clock = [x.strip() for x in out.strip().splitlines()[0].split(',')][:4]
        f.update(gpu=name, driver=driver, gpu_memory=mem, gpu_max_sm_clock=clock)
        rc, out, _ = run(['nvidia-smi'], 30)
        f['cuda_driver_api'] = next((l.split('CUDA Version:')[1].split()[0] for l in out.splitlines()
                                     if 'CUDA Version:' in l), None)
    else:
        f.update(gpu=None, driver=None)
    rc, out, _ = run(['nvcc', '--version'], 30)
    f['nvcc'] = next((l.split('release')[1].split(',')[0].strip() for l in out.splitlines() if 'release' in l),
                     None) if rc == 0 else None
    return f


def git_commit() -> str:
    rc, out, _ = run(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'], 10)
    if rc != 0:
        return 'unknown'
    rc2, dirty, _ = run(['git', '-C', ROOT, 'status', '--porcelain', '--untracked-files=no'], 10)
    return out.strip() + ('+dirty' if rc2 == 0 and dirty.strip() else '')


# ---- counts (the CUDA step on the CPU execution layer) --------------------------------------------------------

def counts_command(build: str, small: bool, out: str):
    exe = os.path.join(build, 'bench', 'bench_emu_step')
    cmd = [exe, '--json', out]
    if small:  # a smaller batch: seconds instead of ~40 s on a slow core; the counts are for that batch
        cmd += ['--set', 'train.batch_size=8']
    return exe, cmd


def read_counts(path: str, cmd, rc, err) -> dict:
    if rc == 0 and os.path.isfile(path):
        with open(path) as f:
            d = json.load(f)
        d['status'] = 'ok'
        d['command'] = ' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)
        return d
    return {'status': 'failed', 'detail': f'{" ".join(cmd)}: exit status {rc}: {last_error(err)}'}


# ---- throughput: mlm, the reference trainer, PyTorch variants ---------------------------------------------------

def steps_per_epoch(corpus: str, batch: int, seq_len: int) -> int:
    n = os.path.getsize(corpus) if corpus else 1115394
    return max(2, ((int(n * 0.9) - 1) // seq_len + batch - 1) // batch)


def mlm_gpu(mlm, corpus, batch, tf32, steps, log_every, timeout):
    d = tempfile.mkdtemp(prefix='mlm-suite-')
    cmd = [mlm, 'train', '--config', os.path.join(ROOT, 'configs', 'shakespeare.conf'), '--data', corpus,
           '--device', 'cuda', '--steps', str(steps), '--set', f'train.batch_size={batch}',
           '--set', f'train.tf32={"true" if tf32 else "false"}', '--set', f'train.log_every={log_every}',
           '--set', 'train.samples=false', '--set', 'train.ckpt_every=0', '-q', '--out', os.path.join(d, 'run')]
    rc, _, err = run(cmd, timeout)
    rows = read_jsonl(os.path.join(d, 'run', 'metrics.jsonl'))
    shutil.rmtree(d, ignore_errors=True)
    tps = [r['tokens_per_s'] for r in rows if r.get('kind') == 'train' and 'tokens_per_s' in r][1:]
    shown = ' '.join(cmd[:-1] + ['RUN']).replace(ROOT + '/', '')
    return throughput_row('mlm', batch, tf32, tps, rc, err, shown, f'{steps} steps, log_every {log_every}')


def reference_gpu(python, corpus, batch, tf32, steps, log_every, timeout):
    d = tempfile.mkdtemp(prefix='ref-suite-')
    cmd = [python, os.path.join(ROOT, 'tools', 'reference', 'train_reference.py'), '--device', 'cuda', '--epochs', '1',
           '--max-steps', str(steps), '--no-valid', '--seed', '0', '--data', corpus, '--log-every', str(log_every),
           '--batch-size', str(batch), '--quiet', '--out', d] + (['--tf32'] if tf32 else [])
    rc, _, err = run(cmd, timeout)
    rows = read_jsonl(os.path.join(d, 'metrics.jsonl'))
    shutil.rmtree(d, ignore_errors=True)
    tps = [r['tokens_per_s'] for r in rows if r.get('kind') == 'train' and r.get('scope') == 'interval'
           and r.get('step', 0) % log_every == 0][1:]
    shown = ' '.join(['python3'] + [x if x != d else 'DIR' for x in cmd[1:]]).replace(ROOT + '/', '')
    return throughput_row('reference', batch, tf32, tps, rc, err, shown, f'{steps} steps, log_every {log_every}')


def read_jsonl(path):
    try:
        with open(path) as f:
            return [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError):
        return []


def last_error(err: str) -> str:
    """The line of a program's stderr that says what went wrong (the last one naming an error, else the last)."""
    lines = [l.strip() for l in err.splitlines() if l.strip()]
    named = [l for l in lines if 'rror' in l or 'fatal' in l or 'failed' in l]
    return (named or lines or [''])[-1][:300]


def throughput_row(variant, batch, tf32, tps, rc, err, command, how, seq_len=32):
    row = {'variant': variant, 'batch': batch, 'tf32': tf32, 'command': command, 'how': how, 'samples':
           [round(x, 1) for x in tps]}
    if tps:
        row.update(status='ok', tokens_per_s=summarize(tps),
                   step_ms=summarize([1000.0 * batch * seq_len / x for x in tps]))
        if rc != 0:
            row['detail'] = f'exit status {rc} after {len(tps)} timed intervals'
    else:
        row.update(status='failed', detail=f'exit status {rc}: {last_error(err)}' if rc is not None else err)
    return row


def torch_variant(python, variant, configs, quick, timeout, modes):
    cfg_args = [f'{b}x{"on" if t else "off"}' for b, t in configs]
    win = ['--warmup', '10', '--windows', '3', '--window', '30'] if quick else ['--warmup', '30', '--windows', '5',
                                                                             '--window', '100']
    cmd = [python, os.path.join(HERE, 'torch_gpu_bench.py'), 'train', '--variant', variant, '--configs'] + cfg_args + win
    if variant == 'compile':
        cmd += ['--modes'] + modes
    rc, out, err = run(cmd, timeout)
    got, general = {}, last_error(err)
    for line in out.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if 'batch' in d:
            got[(d['batch'], d.get('tf32'))] = d
        elif 'error' in d:
            general = d['error']
    rows = []
    shown = ' '.join(['python3'] + cmd[1:]).replace(ROOT + '/', '')
    for b, t in configs:
        d = got.get((b, t))
        if d and 'tokens_per_s' in d:
            d = dict(d, status='ok', command=shown, how=f'{d["windows"]} windows of {d["window_steps"]} steps after '
                                                        f'{d["warmup_steps"]} warm-up steps')
        elif d:
            d = dict(d, status='failed', detail=d.get('error', '?'), command=shown)
        else:
            d = {'variant': variant, 'batch': b, 'tf32': t, 'status': 'failed', 'command': shown,
                 'detail': f'no result (exit status {rc}): {general}'}
        rows.append(d)
    return rows


def ratios(rows):
    """mlm's tokens/s over each other variant's, per (batch, TF32): median / median, spread from min and max."""
    out = []
    by = {(r['variant'], r['batch'], r['tf32']): r for r in rows if r.get('status') == 'ok'}
    for (v, b, t), m in sorted(by.items(), key=lambda kv: (kv[0][1], not kv[0][2], kv[0][0])):
        if v not in ('mlm', 'mlm-cpu'):
            continue
        for (w, b2, t2), o in by.items():
            if (b2, t2) != (b, t) or w in ('mlm', 'mlm-cpu'):
                continue
            mt, ot = m['tokens_per_s'], o['tokens_per_s']
            out.append({'batch': b, 'tf32': t, 'mlm': v, 'vs': w, 'median': mt['median'] / ot['median'],
                        'min': mt['min'] / ot['max'], 'max': mt['max'] / ot['min']})
    return out


# ---- the device's rates and the roofline -------------------------------------------------------------------------

def probe_rates(python, timeout):
    cmd = [python, os.path.join(HERE, 'torch_gpu_bench.py'), 'probe']
    rc, out, err = run(cmd, timeout)
    rates = {'command': 'python3 bench/torch_gpu_bench.py probe'}
    for line in out.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if 'probe' in d:
            rates[d['probe']] = d
    rates['status'] = 'ok' if all(k in rates for k in ('copy_memcpy', 'copy_kernel', 'sgemm_fp32', 'sgemm_tf32')) \
        else f'failed (exit status {rc}): ' + next((json.loads(l)['error'] for l in out.splitlines()
                                                     if l.startswith('{"error"')), last_error(err))
    return rates


def family_of(kernel: str) -> str:
    """A kernel's family: its name without template arguments and the _kernel suffix."""
    name = kernel.split('<', 1)[0].strip()
    return name[:-len('_kernel')] if name.endswith('_kernel') else name


def roofline(counts: dict, rates: dict, measured: dict = None, tf32: bool = True) -> dict:
    """Per family: counted launches, bytes, FLOPs; with the device's rates, the time at the roofline (bytes at
    the copy bandwidth, FLOPs at the matrix rate, the larger of the two) and, where measured, the time taken."""
    if counts.get('status') != 'ok':
        return {'status': 'owed', 'detail': 'no counts: ' + counts.get('detail', '?'), 'rows': []}
    c = counts['counts']
    fams = {}
    for k in c['kernels']:
        f = fams.setdefault(family_of(k['name']), {'family': family_of(k['name']), 'kind': 'kernel', 'launches': 0,
                                                   'bytes_read': 0, 'bytes_written': 0, 'flops': 0, 'names': []})
        f['launches'] += k['launches']
        f['bytes_read'] += k['bytes_read']
        f['bytes_written'] += k['bytes_written']
        f['names'].append(k['name'])
    for g in c['gemms']:
        name = f'cuBLAS {g["phase"]}: {g["op"]} {g["m"]}x{g["n"]}x{g["k"]}' + (f' x{g["batch"]}' if g['batch'] > 1 else '')
        fams[name] = {'family': name, 'kind': 'cublas', 'launches': g['calls'], 'bytes_read': g['bytes_read'],
                      'bytes_written': g['bytes_written'], 'flops': g['flops'], 'names': [g['name']]}
    have_rates = rates.get('status') == 'ok'
    bw = max(rates['copy_memcpy']['gb_per_s'], rates['copy_kernel']['gb_per_s']) * 1e9 if have_rates else None
    mm = rates['sgemm_tf32' if tf32 else 'sgemm_fp32']['tflop_per_s'] * 1e12 if have_rates else None
    launch_us = rates.get('launch', {}).get('us_per_launch') if have_rates else None
    rows = []
    for f in fams.values():
        b = f['bytes_read'] + f['bytes_written']
        row = dict(f, bytes=b)
        if have_rates:
            t_mem, t_mm = b / bw * 1e6, f['flops'] / mm * 1e6
            row.update(bound_us=max(t_mem, t_mm), memory_us=t_mem, matrix_us=t_mm,
                       bound_by='matrix' if t_mm > t_mem else 'memory')
        if measured and f['family'] in measured:
            row['measured_us'] = measured[f['family']]
            if have_rates and row['measured_us'] > 0:
                row['fraction_of_roofline'] = row['bound_us'] / row['measured_us']
        rows.append(row)
    rows.sort(key=lambda r: -(r['bound_us'] if 'bound_us' in r else r['bytes']))  # counted only: by bytes
    t = c['totals']
    totals = {'launches': t['launches'], 'cublas_calls': t['cublas_calls'], 'curand_calls': t['curand_calls'],
              'kernel_bytes': t['kernel_bytes_read'] + t['kernel_bytes_written'],
              'cublas_bytes': t['cublas_bytes_read'] + t['cublas_bytes_written'], 'cublas_flops': t['cublas_flops'],
              'memset_bytes': t['memset_bytes'], 'host_syncs': t['host_syncs']}
    out = {'status': 'ok' if have_rates else 'counted only: the device rates are owed', 'rows': rows,
           'totals': totals, 'config': counts.get('config'), 'tf32': tf32,
           'bytes_note': 'kernel bytes are every load and store that hits device memory (re-reads count, caches '
                         'are not modelled): an upper bound of DRAM traffic; cuBLAS bytes are its operands'}
    if have_rates:
        out['copy_gb_per_s'] = bw / 1e9
        out['matrix_tflop_per_s'] = mm / 1e12
        out['sum_bound_us'] = sum(r['bound_us'] for r in rows)
        n_launch = t['launches'] + t['cublas_calls'] + t['curand_calls'] + t['memsets']
        if launch_us:
            out['launch_us'] = launch_us
            out['launch_floor_us'] = n_launch * launch_us
            out['launch_floor_note'] = (f'{n_launch} launches (kernels, cuBLAS calls, cuRAND calls, memsets) x '
                                        f'{launch_us:.2f} us (PyTorch small-op rate; a CUDA graph replay removes '
                                        'most of it)')
    if measured:
        out['measured_from'] = measured.get('_source', 'nsys')
    return out


def nsys_measure(mlm, corpus, batch, timeout):
    """Per-family GPU time of one step from Nsight Systems (steps 20..29 of a short run), when nsys is present."""
    if not shutil.which('nsys'):
        return None, 'nsys is not installed'
    d = tempfile.mkdtemp(prefix='nsys-suite-')
    rep = os.path.join(d, 'rep')
    cmd = ['nsys', 'profile', '--capture-range=cudaProfilerApi', '--capture-range-end=stop', '-o', rep, '-f', 'true',
           mlm, 'train', '--config', os.path.join(ROOT, 'configs', 'shakespeare.conf'), '--data', corpus, '--device',
           'cuda', '--steps', '31', '--profile-steps', '20:29', '--set', f'train.batch_size={batch}',
           '--set', 'train.samples=false', '--set', 'train.ckpt_every=0', '-q', '--out', os.path.join(d, 'run')]
    rc, _, err = run(cmd, timeout / 2)
    if rc != 0:
        shutil.rmtree(d, ignore_errors=True)
        return None, f'nsys profile: exit status {rc}: {err.strip()[-200:]}'
    rc, out, err = run(['nsys', 'stats', '--report', 'cuda_gpu_kern_sum', '--format', 'csv', '-o', '-',
                        rep + '.nsys-rep'], timeout / 2)
    shutil.rmtree(d, ignore_errors=True)
    import csv
    import io
    lines = [l for l in out.splitlines() if l.count(',') > 3]
    fam = {'_source': 'nsys cuda_gpu_kern_sum over 10 steps, per step'}
    head = None
    for r in csv.reader(io.StringIO('\n'.join(lines))):
        if head is None:
            if 'Name' in r and 'Total Time (ns)' in r:
                head = r
            continue
        name, total = r[head.index('Name')], float(r[head.index('Total Time (ns)')])
        key = family_of(name) if not any(s in name for s in ('gemm', 'sgemm', 'cutlass', 'xmma')) else 'cuBLAS (all)'
        fam[key] = fam.get(key, 0.0) + total / 1e3 / 10
    return (fam if head else None), (None if head else f'nsys stats gave no kernel table: {err.strip()[-200:]}')


# ---- the two modes ----------------------------------------------------------------------------------------------

def gpu_mode(args, clock, python, mlm, corpus, refcfg, result):
    tmp = tempfile.mkdtemp(prefix='suite-counts-')
    cpath = os.path.join(tmp, 'counts.json')
    exe, ccmd = counts_command(args.build, False, cpath)  # the full step, in the background (CPU only)
    counter = subprocess.Popen(ccmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True) if os.access(exe, os.X_OK) else None
    if counter:
        CHILDREN.add(counter.pid)
    log('device rates (copy bandwidth, SGEMM, launch)')
    rates = probe_rates(python, clock.cap(90))
    result['device_rates'] = rates
    T = refcfg['seq_len']
    configs = [(b, t) for b in (refcfg['batch_size'], args.big_batch) for t in (True, False)]
    rows = []
    steps = 150 if args.quick else 600
    for b, t in configs:
        spe = steps_per_epoch(corpus, b, T)
        n = min(steps, spe - 1)  # within one epoch: no validation pass inside a timed interval
        every = max(1, n // 6)
        n = every * 6
        if clock.left() < 10:
            rows.append({'variant': 'mlm', 'batch': b, 'tf32': t, 'status': 'skipped', 'detail': 'no time left'})
            continue
        log(f'mlm batch {b} TF32 {"on" if t else "off"}: {n} steps')
        rows.append(mlm_gpu(mlm, corpus, b, t, n, every, clock.cap(90)))
    for b, t in configs:
        spe = steps_per_epoch(corpus, b, T)
        n = min(300 if args.quick else 600, spe - 1)
        every = max(1, n // 6)
        n = every * 6
        if clock.left() < 15:
            rows.append({'variant': 'reference', 'batch': b, 'tf32': t, 'status': 'skipped', 'detail': 'no time left'})
            continue
        log(f'reference trainer batch {b} TF32 {"on" if t else "off"}: {n} steps')
        rows.append(reference_gpu(python, corpus, b, t, n, every, clock.cap(120)))
    for variant in ('compile', 'fused'):  # torch.compile first: the stronger yardstick (the 3x target)
        if clock.left() < 20:
            rows += [{'variant': variant, 'batch': b, 'tf32': t, 'status': 'skipped', 'detail': 'no time left'}
                     for b, t in configs]
            continue
        # reduce-overhead first: CUDA graphs without max-autotune's GEMM search, which can outlast any budget (a
        # mode is abandoned only when it raises, not when it is slow); --compile-modes max-autotune ... to try it.
        modes = args.compile_modes or ['reduce-overhead', 'default']
        todo = configs
        if variant == 'compile' and args.quick:  # each configuration compiles anew (tens of seconds each)
            todo = [c for c in configs if c[0] == refcfg['batch_size']]
            rows += [{'variant': variant, 'batch': b, 'tf32': t, 'status': 'skipped',
                      'detail': '--quick compiles batch ' + str(refcfg['batch_size']) + ' only'}
                     for b, t in configs if (b, t) not in todo]
        log(f'{variant}: {len(todo)} configurations' + (f', modes {modes}' if variant == 'compile' else ''))
        rows += torch_variant(python, variant, todo, args.quick, clock.cap(300 if variant == 'compile' else 120),
                              modes)
    result['throughput'] = rows
    result['ratios'] = ratios(rows)
    measured = None
    if args.nsys and clock.left() > 60:
        measured, why = nsys_measure(mlm, corpus, refcfg['batch_size'], clock.cap(120))
        if why:
            result.setdefault('notes', []).append(why)
    if counter:
        try:
            _, err = counter.communicate(timeout=clock.cap(120))
            rc = counter.returncode
        except subprocess.TimeoutExpired:
            os.killpg(counter.pid, signal.SIGKILL)
            _, err = counter.communicate()
            rc = 'timeout'
        CHILDREN.discard(counter.pid)
        counts = read_counts(cpath, ccmd, rc, err)
    else:
        counts = {'status': 'missing', 'detail': f'{exe} not built (cmake --build BUILD --target bench_emu_step)'}
    shutil.rmtree(tmp, ignore_errors=True)
    result['counts'] = counts
    result['roofline'] = roofline(counts, rates, measured, tf32=True)


def cpu_mode(args, clock, python, mlm, corpus, refcfg, result):
    import cpu_vs_torch as cvt  # bench/: mlm's CPU command and torch_cpu_bench.py, as the CPU comparison runs them
    result['note'] = ('NO GPU on this machine: this is the CPU comparison (mlm train --device cpu against the '
                      'PyTorch reference model on the CPU); the GPU figures and the device rates are owed.')
    result['owed'] = ['GPU throughput of mlm, the reference trainer, fused Adam and torch.compile (batch 64 and '
                      f'{args.big_batch}, TF32 on and off)', 'device copy bandwidth and matrix rate',
                      'roofline bounds (counted part below) and measured per-kernel times']
    env = cvt.clean_env()
    if corpus:
        env.setdefault('MLM_DATA_MIRROR', os.path.dirname(corpus))
    threads = args.threads or ([min(2, os.cpu_count() or 1)] if args.quick else [1, 2])
    repeats = 1 if args.quick else 3
    steps = 15 if args.quick else 40
    torch_steps = 5 if args.quick else 20
    tmp = tempfile.mkdtemp(prefix='suite-counts-')
    cpath = os.path.join(tmp, 'counts.json')
    exe, ccmd = counts_command(args.build, args.quick, cpath)
    rows = []
    B = refcfg['batch_size']
    for t in threads:
        mlm_tps, torch_tps, cmds = [], [], {}
        for _ in range(repeats):
            if clock.left() < 10:
                break
            log(f'CPU: mlm train --device cpu, {t} thread(s), {steps} steps')
            try:
                r = cvt.run_mlm(mlm, t, steps, env)
                mlm_tps += r['intervals_tokens_per_s']
                cmds['mlm'] = r['command'].replace(ROOT + '/', '')
            except SystemExit as e:
                cmds['mlm_error'] = str(e)
            log(f'CPU: PyTorch reference model, {t} thread(s), {torch_steps} steps')
            cmd = [python, os.path.join(HERE, 'torch_cpu_bench.py'), '--threads', str(t), '--steps', str(torch_steps),
                   '--per-step']
            rc, out, err = run(cmd, clock.cap(300), env=env)
            cmds['torch'] = ' '.join(['python3', 'bench/torch_cpu_bench.py'] + cmd[2:])
            if rc == 0:
                d = json.loads(out)
                torch_tps += [B * refcfg['seq_len'] * 1000.0 / ms for ms in d['per_step_ms']]
            else:
                cmds['torch_error'] = (f'stopped at its {clock.cap(300):.0f} s timeout' if rc == 'timeout' else
                                       f'exit status {rc}: {last_error(err)}')
        rows.append(dict(throughput_row('mlm-cpu', B, False, mlm_tps, 0 if mlm_tps else None, cmds.get('mlm_error', ''),
                                        cmds.get('mlm', ''), f'{repeats} run(s) of {steps} steps, intervals of '
                                        f'{cvt.LOG_EVERY} after the first'), threads=t))
        rows.append(dict(throughput_row('torch-cpu', B, False, torch_tps, 0 if torch_tps else None,
                                        cmds.get('torch_error', ''), cmds.get('torch', ''),
                                        f'{repeats} run(s) of {torch_steps} timed steps after 5 warm-up steps'),
                         threads=t))
    result['throughput'] = rows
    result['ratios'] = [dict(r, threads=t) for t in threads
                        for r in ratios([x for x in rows if x.get('threads') == t])]
    if os.access(exe, os.X_OK) and clock.left() > 10:
        log('counts: ' + ' '.join(ccmd))
        rc, _, err = run(ccmd, clock.cap(600))
        counts = read_counts(cpath, ccmd, rc, err)
    else:
        counts = {'status': 'missing', 'detail': f'{exe} not built (GCC Release build: cmake --build BUILD --target '
                                                 'bench_emu_step)'}
    shutil.rmtree(tmp, ignore_errors=True)
    result['counts'] = counts
    result['device_rates'] = {'status': 'owed: no GPU'}
    result['roofline'] = roofline(counts, result['device_rates'])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='fewer steps and repeats (GPU: fits tools/gpu_verify.sh)')
    ap.add_argument('--mode', choices=['auto', 'gpu', 'cpu'], default='auto')
    ap.add_argument('--build', default=os.path.join(ROOT, 'build'), help='build folder with mlm and bench/bench_emu_step')
    ap.add_argument('--python', default=sys.executable, help='python with torch (default: this one)')
    ap.add_argument('--budget', type=float, default=None, help='seconds for the whole suite (default: no limit)')
    ap.add_argument('--big-batch', type=int, default=512)
    ap.add_argument('--threads', type=int, nargs='+', default=None, help='CPU mode: thread counts')
    ap.add_argument('--compile-modes', nargs='+', default=None, help='torch.compile modes to try, in order')
    ap.add_argument('--nsys', action='store_true', help='GPU: measure per-kernel times with Nsight Systems')
    ap.add_argument('--results-dir', default=os.path.join(HERE, 'results'))
    ap.add_argument('--readme', default=os.path.join(HERE, 'README.md'), help="table's file ('' for none)")
    ap.add_argument('--note', default='')
    args = ap.parse_args()
    args.build = os.path.abspath(args.build)
    signal.signal(signal.SIGTERM, stop_children)
    clock = Clock(args.budget)
    mlm = os.path.join(args.build, 'mlm')
    if not os.access(mlm, os.X_OK):
        sys.exit(f'suite: {mlm} not found: build it first (bash bench/run.sh builds it)')
    corpus = find_corpus()
    refcfg = reference_config()
    facts = machine_facts(args.python, mlm)
    mode = args.mode
    if mode == 'auto':
        mode = 'gpu' if facts.get('gpu') and facts.get('cuda_available') else 'cpu'
    if mode == 'gpu' and not corpus:
        sys.exit('suite: no tinyshakespeare.txt in data/ or ../shared/data (or $MLM_DATA_MIRROR)')
    log(f'mode {mode}' + (' (quick)' if args.quick else '') + f'; {facts.get("gpu") or facts["cpu"]}')
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {'schema': report.SCHEMA, 'mode': mode, 'quick': args.quick, 'date': now.isoformat(timespec='seconds'),
              'commit': git_commit(), 'source_stamp': source_stamp(), 'machine': facts, 'config': refcfg,
              'command': 'bash bench/run.sh' + (' --quick' if args.quick else '') + (f' --mode {args.mode}'
                                                                                   if args.mode != 'auto' else ''),
              'user_note': args.note, 'variants': VARIANTS}
    if mode == 'gpu':
        gpu_mode(args, clock, args.python, mlm, corpus, refcfg, result)
    else:
        cpu_mode(args, clock, args.python, mlm, corpus, refcfg, result)
    result['machine']['loadavg_end'] = list(os.getloadavg())
    result['elapsed_s'] = round(time.time() - clock.t0, 1)
    errors = report.validate(result)
    if errors:
        print('suite: the result does not match its schema: ' + '; '.join(errors), file=sys.stderr)
    os.makedirs(args.results_dir, exist_ok=True)
    name = f'bench-{mode}-{facts["host"].split(".")[0]}-{now.strftime("%Y%m%d-%H%M%S")}.json'
    path = os.path.join(args.results_dir, name)
    with open(path + '.tmp', 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(path + '.tmp', path)
    result['_file'] = path
    print(report.render(result))
    log(f'written to {path}')
    if args.readme:
        report.update_readme(args.readme, args.results_dir)
        log(f'table in {args.readme} regenerated from the latest bench-*.json in {args.results_dir}')
    return 1 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
