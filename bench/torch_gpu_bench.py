"""torch_gpu_bench.py: PyTorch's side of the benchmark suite (bench/suite.py) on one device.

Two kinds of run, each printing one JSON object per line on stdout as soon as it is measured (so that a
timeout still leaves the figures measured so far):

  probe      the device's rates the roofline is drawn against: device-to-device copy bandwidth (cudaMemcpy
             through Tensor.copy_ and an elementwise copy kernel), the SGEMM rate with TF32 off and on (a
             large square torch.mm, i.e. cuBLAS), and the time of one small kernel launch from Python.
  train      training steps of the tools/reference/ model (reference masking, forward, cross-entropy,
             backward, global-norm clip at 1.0, Noam schedule) for each --configs entry BATCHxTF32, in one
             of two optimizer/compiler variants:
               fused     eager PyTorch with torch.optim.Adam(fused=True) (Noam lr set per step) and
                         clip_grad_norm_(foreach=True);
               compile   the same, with model + loss under torch.compile in the first mode of --modes that
                         works (reduce-overhead and max-autotune use CUDA graphs); a mode that fails is
                         reported and the next one is tried.
             The labml-Adam reference trainer itself is timed by the suite through
             tools/reference/train_reference.py, not here.

Timing: --warmup untimed steps (compilation and CUDA-graph recording fall in them), then --windows windows of
--window steps each, synchronised at both ends; each window gives tokens/s. The figures are the median, min
and max over the windows. Batches are random characters drawn on the device (the speed does not depend on
the text); masking uses the reference's rule with a device generator.

Examples:
  python3 bench/torch_gpu_bench.py probe
  python3 bench/torch_gpu_bench.py train --variant compile --configs 64xon 64xoff 512xon --modes reduce-overhead
  python3 bench/torch_gpu_bench.py train --variant fused --device cpu --configs 4xoff --warmup 2 --windows 2 --window 2
"""

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tools', 'reference'))
import reference_model as rm  # noqa: E402


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of fn() over reps calls, each synchronised (after two untimed calls)."""
    fn(), fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def probe(args) -> None:
    device = torch.device(args.device)
    n = args.copy_mib * (1 << 20) // 4  # float32 elements
    x = torch.empty(n, device=device).normal_()
    y = torch.empty_like(x)
    nbytes = 2 * 4 * n  # read + write
    t = timed(lambda: y.copy_(x), device, 10)
    emit({'probe': 'copy_memcpy', 'gb_per_s': nbytes / t / 1e9, 'bytes': nbytes, 'seconds': t,
          'how': f'Tensor.copy_ of {args.copy_mib} MiB float32 on the device (cudaMemcpy device-to-device), '
                 'read + write bytes / median time of 10'})
    t = timed(lambda: torch.mul(x, 1.0, out=y), device, 10)
    emit({'probe': 'copy_kernel', 'gb_per_s': nbytes / t / 1e9, 'bytes': nbytes, 'seconds': t,
          'how': f'torch.mul(x, 1.0, out=y) over {args.copy_mib} MiB float32 (an elementwise kernel), '
                 'read + write bytes / median time of 10'})
    del x, y
    s = args.gemm_size
    a = torch.empty(s, s, device=device).normal_()
    b = torch.empty(s, s, device=device).normal_()
    c = torch.empty(s, s, device=device)
    for tf32 in (False, True):
        if device.type == 'cuda':
            torch.backends.cuda.matmul.allow_tf32 = tf32
        t = timed(lambda: torch.mm(a, b, out=c), device, 5)
        emit({'probe': 'sgemm_tf32' if tf32 else 'sgemm_fp32', 'tflop_per_s': 2.0 * s ** 3 / t / 1e12,
              'seconds': t, 'how': f'torch.mm of two {s} x {s} float32 matrices (cuBLAS), TF32 '
                                   f'{"on" if tf32 else "off"}, median of 5'})
    del a, b, c
    z = torch.zeros(1, device=device)
    k = 2000

    def launches():
        for _ in range(k):
            z.add_(1.0)

    t = timed(launches, device, 3)
    emit({'probe': 'launch', 'us_per_launch': 1e6 * t / k,
          'how': f'{k} z.add_(1.0) on a one-element tensor, back to back from Python, per launch (an upper '
                 'estimate of a bare kernel launch: it includes PyTorch\'s dispatch)'})


def noam_lr(cfg, t: int) -> float:
    return cfg.lr_factor * cfg.d_model ** (-0.5) * min(t ** (-0.5), t * cfg.warmup ** (-1.5))


def train_config(args, batch: int, tf32: bool) -> dict:
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    cfg = rm.RefConfig(batch=batch)
    model = rm.build_model(cfg, 'replica', copy_layers=True).to(device)
    model.train(True)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=noam_lr(cfg, 1), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    gen = torch.Generator(device=device).manual_seed(1)
    n_chars = cfg.vocab - 2

    def loss_of(inputs, labels):
        return rm.mlm_loss(model(inputs), labels, cfg.pad_id)

    mode_used, failures = 'eager', []
    fn = loss_of
    step_no = [0]

    def make_step(f):
        def step():
            step_no[0] += 1
            x = torch.randint(0, n_chars, (cfg.seq_len, batch), device=device, generator=gen)
            inputs, labels = rm.mlm_mask(x, cfg, generator=gen)
            if mode_used in ('reduce-overhead', 'max-autotune'):
                torch.compiler.cudagraph_mark_step_begin()
            loss = f(inputs, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
            for g in opt.param_groups:
                g['lr'] = noam_lr(cfg, step_no[0])
            opt.step()
            return loss
        return step

    step = make_step(fn)
    t_compile = 0.0
    if args.variant == 'compile':
        for mode in args.modes:
            torch._dynamo.reset()
            mode_used = mode
            try:
                fn = torch.compile(loss_of, mode=None if mode == 'default' else mode)
                step = make_step(fn)
                t0 = time.perf_counter()
                for _ in range(3):  # compilation, autotuning and CUDA-graph recording happen here
                    step()
                sync(device)
                t_compile = time.perf_counter() - t0
                break
            except Exception as e:  # noqa: BLE001 - any failure of a mode means: try the next one
                failures.append({'mode': mode, 'error': f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
                                 if str(e) else type(e).__name__})
                print(traceback.format_exc(), file=sys.stderr)
                mode_used = 'eager'
                fn = loss_of
                step = make_step(fn)
    for _ in range(args.warmup):
        step()
    sync(device)
    tps = []
    for _ in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.window):
            loss = step().detach()
        sync(device)
        tps.append(batch * cfg.seq_len * args.window / (time.perf_counter() - t0))
    if not torch.isfinite(loss).item():
        raise RuntimeError(f'the loss is not finite ({loss.item()})')
    out = {'variant': args.variant, 'batch': batch, 'tf32': tf32, 'tokens_per_s': summarize(tps),
           'step_ms': summarize([1000.0 * batch * cfg.seq_len / x for x in tps]), 'samples': [round(x, 1) for x in tps],
           'warmup_steps': args.warmup, 'windows': args.windows, 'window_steps': args.window,
           'optimizer': 'torch.optim.Adam(fused=True), Noam lr set per step', 'final_loss': float(loss.detach())}
    if args.variant == 'compile':
        out.update(compile_mode=mode_used, compile_failures=failures, compile_s=round(t_compile, 2),
                   cuda_graphs=mode_used in ('reduce-overhead', 'max-autotune') and device.type == 'cuda')
    return out


def summarize(xs: list) -> dict:
    return {'median': statistics.median(xs), 'min': min(xs), 'max': max(xs)}


def parse_config(s: str):
    b, _, t = s.partition('x')
    if not b.isdigit() or t not in ('on', 'off'):
        raise argparse.ArgumentTypeError(f'{s!r}: expected BATCHxon or BATCHxoff, e.g. 64xon')
    return int(b), t == 'on'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('kind', choices=['probe', 'train'])
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--variant', choices=['fused', 'compile'], default='fused')
    ap.add_argument('--configs', type=parse_config, nargs='+', default=[(64, True)])
    ap.add_argument('--modes', nargs='+', default=['reduce-overhead', 'default'],
                    help='torch.compile modes to try in order (default: %(default)s)')
    ap.add_argument('--warmup', type=int, default=20)
    ap.add_argument('--windows', type=int, default=5)
    ap.add_argument('--window', type=int, default=50, help='steps per timed window')
    ap.add_argument('--copy-mib', type=int, default=1024)
    ap.add_argument('--gemm-size', type=int, default=8192)
    args = ap.parse_args()
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        emit({'error': 'torch.cuda.is_available() is False: no usable GPU for PyTorch'})
        return 1
    if args.kind == 'probe':
        probe(args)
        return 0
    rc = 0
    for batch, tf32 in args.configs:
        try:
            emit(train_config(args, batch, tf32))
        except Exception as e:  # noqa: BLE001 - report and go on with the next configuration
            print(traceback.format_exc(), file=sys.stderr)
            emit({'variant': args.variant, 'batch': batch, 'tf32': tf32, 'error': f'{type(e).__name__}: {e}'[:400]})
            rc = 1
        if args.device.startswith('cuda'):
            torch.cuda.empty_cache()
    return rc


if __name__ == '__main__':
    sys.exit(main())
