"""test_bench_suite.py (unit; python3 only, < 1 s): the benchmark suite's arithmetic, schema and table generator
(bench/suite.py, bench/report.py) on a small hand-made GPU result (tests/fixtures/bench/gpu-result-small.json),
checked against figures worked out here by hand; with --e2e BUILD (label slow, needs PyTorch): the suite's CPU
mode end to end in --quick form, one thread, into a temporary folder.

  python3 tests/test_bench_suite.py
  python3 tests/test_bench_suite.py --e2e build --python PY
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))
import report  # noqa: E402
import suite  # noqa: E402

checks = failures = 0


def check(what: str, ok: bool) -> None:
    global checks, failures
    checks += 1
    if not ok:
        failures += 1
        print(f'FAILED: {what}')


def close(a, b, rel=1e-9) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def fixture() -> dict:
    with open(os.path.join(ROOT, 'tests', 'fixtures', 'bench', 'gpu-result-small.json')) as f:
        d = json.load(f)
    d['ratios'] = suite.ratios(d['throughput'])
    d['roofline'] = suite.roofline(d['counts'], d['device_rates'], measured={'layernorm_forward': 250.0}, tf32=True)
    return d


def unit_checks() -> None:
    d = fixture()
    check('the fixture conforms to the schema', report.validate(d) == [])

    # Ratios: mlm 1,000,000 (900k - 1.1M) against the reference 50,000 (40k - 60k) and compile 250,000 (200k - 300k);
    # the failed fused row has none.
    r = {x['vs']: x for x in d['ratios']}
    check('ratios only against the variants that ran', sorted(r) == ['compile', 'reference'])
    check('ratio to the reference: median 20, spread 15 - 27.5',
          close(r['reference']['median'], 20.0) and close(r['reference']['min'], 15.0)
          and close(r['reference']['max'], 27.5))
    check('ratio to torch.compile: median 4, spread 3 - 5.5',
          close(r['compile']['median'], 4.0) and close(r['compile']['min'], 3.0) and close(r['compile']['max'], 5.5))

    # Roofline: bandwidth = max(4000, 3000) GB/s; TF32 matrix rate 300 TFLOP/s.
    rf = d['roofline']
    rows = {x['family']: x for x in rf['rows']}
    check('kernel families drop template arguments and _kernel',
          sorted(k for k in rows if not k.startswith('cuBLAS')) == ['layernorm_forward', 'softmax_forward'])
    ln = rows['layernorm_forward']
    check('layernorm: 250 MB at 4000 GB/s = 62.5 us, memory-bound', close(ln['bound_us'], 62.5)
          and ln['bound_by'] == 'memory' and ln['launches'] == 2)
    check('layernorm: measured 250 us is 25% of its roofline', close(ln['fraction_of_roofline'], 0.25))
    g = rows['cuBLAS forward layer: TN 384x2048x128']
    check("gemm family: 3 GFLOP at 300 TFLOP/s = 10 us; 40 MB at 4000 GB/s = 10 us",
          close(g['matrix_us'], 10.0) and close(g['memory_us'], 10.0))
    check('sum of bounds: 62.5 + 37.5 + 10 us', close(rf['sum_bound_us'], 110.0))
    check('launch floor: (3 + 2 + 1 + 2) launches x 5 us', close(rf['launch_floor_us'], 40.0))
    check('rows sorted by bound, largest first', [x['family'] for x in rf['rows']][0] == 'layernorm_forward')
    fp32 = suite.roofline(d['counts'], d['device_rates'], tf32=False)
    check('TF32 off uses the FP32 rate: 3 GFLOP at 50 TFLOP/s = 60 us',
          close({x['family']: x for x in fp32['rows']}['cuBLAS forward layer: TN 384x2048x128']['bound_us'], 60.0))
    owed = suite.roofline(d['counts'], {'status': 'owed: no GPU'})
    check('without rates: counted rows, no bound, status says owed',
          owed['rows'] and all('bound_us' not in x for x in owed['rows']) and 'owed' in owed['status'])
    check('without counts: no rows and the reason',
          suite.roofline({'status': 'missing', 'detail': 'not built'}, d['device_rates'])['rows'] == [])

    # The table shows the figures of the file.
    t = report.render(d)
    check('table: the device and versions', 'NVIDIA H200, driver 580.00' in t and 'PyTorch 2.15.0' in t)
    check('table: mlm row with median and spread', '| mlm | 64 | on | - | 1,000,000 (900,000 - 1,100,000) | 2.05 | - |' in t)
    check('table: reference row with mlm\'s ratio', '| reference | 64 | on | - | 50,000 (40,000 - 60,000) | 40.96 | '
          '**20.00** (15.00 - 27.50) |' in t)
    check('table: the compile mode and the failed mode', '| compile (reduce-overhead) |' in t
          and 'max-autotune: RuntimeError: fixture failure' in t)
    check('table: a failed variant says so', '| fused | 64 | on | - | failed: fixture: exit status 1 |' in t)
    check('table: roofline rows', '| layernorm_forward | 2 | 200.00 | 50.00 | 0.000 | 62.5 | memory | 250.0 |' in t)
    check('table: roofline and launch floor', "the step's roofline is 110.0 us" in t and 'cost 40 us' in t)

    # Schema violations are found.
    def bad(mutate):
        e = copy.deepcopy(d)
        mutate(e)
        return report.validate(e)
    check('missing key', any('missing "commit"' in x for x in bad(lambda e: e.pop('commit'))))
    check('wrong schema name', any('schema' in x for x in bad(lambda e: e.update(schema='other/2'))))
    check('min <= median <= max', any('min <= median' in x for x in
                                      bad(lambda e: e['throughput'][0]['tokens_per_s'].update(min=2e6))))
    check('a CPU result must say there was no GPU', any('NO GPU' in x for x in bad(lambda e: e.update(mode='cpu'))))
    check('a GPU result names its device', any('machine.gpu' in x for x in bad(lambda e: e['machine'].update(gpu=None))))
    check('a boolean is not a number', any('tf32' in x for x in bad(lambda e: e['throughput'][0].update(tf32=1))))

    # README regeneration: the latest file by date, only between the markers, idempotent.
    with tempfile.TemporaryDirectory() as tmp:
        res = os.path.join(tmp, 'results')
        os.makedirs(res)
        old = copy.deepcopy(d)
        old['date'], old['commit'] = '2026-11-01T00:00:00+00:00', 'old0000'
        for name, obj in (('bench-gpu-z-old.json', old), ('bench-gpu-a-new.json', d)):
            with open(os.path.join(res, name), 'w') as f:
                json.dump(obj, f)
        readme = os.path.join(tmp, 'README.md')
        with open(readme, 'w') as f:
            f.write('# title\n\nkept above\n')
        report.update_readme(readme, res)
        first = open(readme).read()
        check('README: the block is appended, the text above kept', first.startswith('# title\n\nkept above\n')
              and report.BEGIN in first and report.END in first)
        check('README: from the newest file by date', 'commit abc1234' in first and 'old0000' not in first)
        with open(readme, 'a') as f:
            f.write('\nkept below\n')
        report.update_readme(readme, res)
        second = open(readme).read()
        check('README: regenerating replaces only the block', second == first + '\nkept below\n')


def e2e(build: str, python: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        readme = os.path.join(tmp, 'README.md')
        cmd = [python, os.path.join(ROOT, 'bench', 'suite.py'), '--quick', '--mode', 'cpu', '--threads', '1',
               '--build', build, '--python', python, '--results-dir', tmp, '--readme', readme]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        print(p.stdout[-3000:])
        check('the CPU suite exits 0', p.returncode == 0)
        files = [f for f in os.listdir(tmp) if f.startswith('bench-cpu-') and f.endswith('.json')]
        check('one results file', len(files) == 1)
        if len(files) != 1:
            return
        d = report.load(os.path.join(tmp, files[0]))
        check('it conforms to the schema', report.validate(d) == [])
        check('it is labelled as the CPU comparison', d['mode'] == 'cpu' and 'NO GPU' in d['note'])
        rows = {r['variant']: r for r in d['throughput']}
        check('mlm and PyTorch both measured', rows.get('mlm-cpu', {}).get('status') == 'ok'
              and rows.get('torch-cpu', {}).get('status') == 'ok')
        check('a ratio', len(d['ratios']) == 1 and d['ratios'][0]['median'] > 0)
        check('device rates owed', 'owed' in d['device_rates']['status'])
        if os.access(os.path.join(build, 'bench', 'bench_emu_step'), os.X_OK):
            check('counted roofline rows', d['counts']['status'] == 'ok' and len(d['roofline']['rows']) > 10)
        check('README table written', 'mlm-cpu' in open(readme).read())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument('--e2e', metavar='BUILD', help='also run the CPU suite with BUILD/mlm')
    ap.add_argument('--python', default=sys.executable)
    args = ap.parse_args()
    if args.e2e:
        r = subprocess.run([args.python, '-c', 'import torch'], capture_output=True)
        if r.returncode != 0:
            print(f'SKIP: {args.python} cannot import torch (tools/python_env.sh makes an environment that can)')
            return 77
        e2e(os.path.abspath(args.e2e), args.python)
    else:
        unit_checks()
    print(f'test_bench_suite: {checks} checks, {failures} failed')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
