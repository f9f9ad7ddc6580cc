#!/usr/bin/env python3
"""test_compare_runs.py (unit, tools): tools/compare_runs.py on synthetic metrics files and checkpoints.

epochs: an mlm run within the tolerance of the reference at every epoch agrees (exit 0), one epoch beyond it
disagrees (exit 1) and names the epoch, epochs only one run reached are listed but not judged, torn lines
are skipped, no common epoch is "no data" (2). steps: losses within 1e-3 agree, one step beyond disagrees, a
missing step disagrees. identical: equal runs are identical; one flipped byte in a checkpoint tensor or one
logged loss digit is not. throughput: the median after the first interval. Under a second.
"""

import io
import json
import math
import os
import struct
import sys
import tempfile
import unittest
from contextlib import redirect_stdout

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tools'))
import compare_runs  # noqa: E402


def write_jsonl(path, records, torn=False):
    with open(path, 'w', encoding='utf-8') as f:
        for r in records:
            f.write(json.dumps(r) + '\n')
        if torn:
            f.write('{"kind": "valid", "epoch": 9, "accur')  # a run killed mid-line


def mlm_valid(accs):
    return [dict(kind='valid', step=491 * (e + 1), epoch=e, loss=3.0 - 0.1 * e, accuracy=a) for e, a in enumerate(accs)]


def ref_valid(accs):
    return [dict(kind='valid', scope='epoch', epoch=e, step=491 * (e + 1), loss=3.0 - 0.1 * e, accuracy=a)
            for e, a in enumerate(accs)]


def run(argv):
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = compare_runs.main(argv)
    return rc, buf.getvalue()


def write_safetensors(path, tensors):
    header, data = {}, b''
    for name, raw in tensors.items():
        header[name] = dict(dtype='F32', shape=[len(raw) // 4], data_offsets=[len(data), len(data) + len(raw)])
        data += raw
    header['__metadata__'] = dict(format='mlm-checkpoint')
    h = json.dumps(header).encode()
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(h)) + h + data)


class Epochs(unittest.TestCase):
    def setUp(self):
        self.d = tempfile.mkdtemp()
        self.ref = os.path.join(self.d, 'ref.jsonl')
        self.mlm = os.path.join(self.d, 'mlm.jsonl')
        write_jsonl(self.ref, ref_valid([0.30, 0.40, 0.45, 0.48]) +
                    [dict(kind='train', scope='epoch', epoch=0, accuracy=0.9)])

    def test_agree_within_tolerance(self):
        write_jsonl(self.mlm, mlm_valid([0.31, 0.39, 0.455, 0.47]), torn=True)
        rc, out = run(['epochs', self.mlm, self.ref, '--tol', '0.011'])
        self.assertEqual(rc, 0, out)
        self.assertIn('verdict: AGREE: 4 common epochs, largest |d acc| 0.0100', out)

    def test_disagree_names_the_epoch(self):
        write_jsonl(self.mlm, mlm_valid([0.31, 0.39, 0.40, 0.47]))
        rc, out = run(['epochs', self.mlm, self.ref, '--tol', '0.011'])
        self.assertEqual(rc, 1, out)
        self.assertIn('DISAGREE', out)
        self.assertIn('beyond it at epochs 3', out)

    def test_partial_run_judges_common_epochs_only(self):
        write_jsonl(self.mlm, mlm_valid([0.30, 0.40]))
        rc, out = run(['epochs', self.mlm, self.ref, '--tol', '0.001'])
        self.assertEqual(rc, 0, out)
        self.assertIn('2 common epochs', out)
        self.assertIn('(one run only)', out)

    def test_default_tolerance_is_the_measured_noise(self):
        self.assertIsNotNone(compare_runs.DEFAULT_TOL)
        write_jsonl(self.mlm, mlm_valid([0.30 + compare_runs.DEFAULT_TOL * 0.9, 0.40, 0.45, 0.48]))
        self.assertEqual(run(['epochs', self.mlm, self.ref])[0], 0)
        write_jsonl(self.mlm, mlm_valid([0.30 + compare_runs.DEFAULT_TOL * 1.1 + 1e-4, 0.40, 0.45, 0.48]))
        self.assertEqual(run(['epochs', self.mlm, self.ref])[0], 1)

    def test_noise_sampling_floor_follows_targets(self):
        # Two runs that agree exactly: the tolerance is the sampling floor 3.2 sqrt(2 * 0.25 / n) of n targets.
        write_jsonl(self.mlm, mlm_valid([0.30, 0.40]))
        for n in (16700, 2000):
            rc, out = run(['noise', self.mlm, self.mlm, '--targets', str(n)])
            self.assertEqual(rc, 0, out)
            self.assertIn('tolerance 3.2 sigma = %.4f' % (3.2 * math.sqrt(0.5 / n)), out)

    def test_no_common_epoch_is_no_data(self):
        write_jsonl(self.mlm, [dict(kind='train', step=1, epoch=0, loss=4.0, accuracy=0.0)])
        rc, out = run(['epochs', self.mlm, self.ref, '--tol', '0.01'])
        self.assertEqual(rc, 2, out)
        self.assertEqual(run(['epochs', os.path.join(self.d, 'missing.jsonl'), self.ref, '--tol', '0.01'])[0], 2)


class Steps(unittest.TestCase):
    def setUp(self):
        self.d = tempfile.mkdtemp()
        self.a, self.b = os.path.join(self.d, 'a.jsonl'), os.path.join(self.d, 'b.jsonl')
        write_jsonl(self.a, [dict(kind='train', step=s, loss=4.0 - 0.01 * s) for s in range(1, 21)])

    def test_agree(self):
        write_jsonl(self.b, [dict(kind='train', step=s, loss=(4.0 - 0.01 * s) * (1 + 5e-4)) for s in range(1, 21)])
        rc, out = run(['steps', self.a, self.b, '--steps', '20'])
        self.assertEqual(rc, 0, out)

    def test_one_step_beyond(self):
        write_jsonl(self.b, [dict(kind='train', step=s, loss=(4.0 - 0.01 * s) * (1 + (2e-3 if s == 17 else 0)))
                             for s in range(1, 21)])
        rc, out = run(['steps', self.a, self.b, '--steps', '20'])
        self.assertEqual(rc, 1, out)

    def test_missing_steps(self):
        write_jsonl(self.b, [dict(kind='train', step=s, loss=4.0 - 0.01 * s) for s in range(1, 11)])
        rc, out = run(['steps', self.a, self.b, '--steps', '20'])
        self.assertEqual(rc, 1, out)
        self.assertIn('only 10 of 20 steps', out)


class Identical(unittest.TestCase):
    def make_run(self, name, losses, params):
        d = os.path.join(self.d, name)
        os.makedirs(os.path.join(d, 'checkpoints'))
        with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
            for s, l in enumerate(losses, 1):
                f.write('{"kind":"train","step":%d,"epoch":0,"loss":%s,"accuracy":0.1}\n' % (s, l))
        write_safetensors(os.path.join(d, 'checkpoints', 'ckpt-00000003.safetensors'),
                          {'params': params, 'adam.m': b'\0' * 8, 'adam.v': b'\1' * 8})
        return d

    def setUp(self):
        self.d = tempfile.mkdtemp()
        self.p = struct.pack('<2f', 0.5, -1.25)
        self.a = self.make_run('a', ['4.1', '4.0', '3.9'], self.p)

    def test_identical(self):
        b = self.make_run('b', ['4.1', '4.0', '3.9'], self.p)
        rc, out = run(['identical', self.a, b])
        self.assertEqual(rc, 0, out)
        self.assertIn('verdict: IDENTICAL', out)

    def test_one_flipped_byte(self):
        b = self.make_run('b', ['4.1', '4.0', '3.9'], self.p[:-1] + bytes([self.p[-1] ^ 1]))
        rc, out = run(['identical', self.a, b])
        self.assertEqual(rc, 1, out)
        self.assertIn('tensor params differs', out)

    def test_one_loss_digit(self):
        b = self.make_run('b', ['4.1', '4.00000001', '3.9'], self.p)
        rc, out = run(['identical', self.a, b])
        self.assertEqual(rc, 1, out)
        self.assertIn('first at step 2', out)


class Throughput(unittest.TestCase):
    def test_median_after_warmup(self):
        d = tempfile.mkdtemp()
        m = os.path.join(d, 'm.jsonl')
        write_jsonl(m, [dict(kind='train', step=50 * i, tokens_per_s=t) for i, t in enumerate([10, 1000, 2000, 3000], 1)]
                    + [dict(kind='train', scope='epoch', tokens_per_s=1.0)])
        rc, out = run(['throughput', m, '--tokens-per-step', '2048'])
        self.assertEqual(rc, 0, out)
        self.assertIn('throughput: 2000 tokens/s, 1024.000 ms/step (median of 3 intervals', out)


if __name__ == '__main__':
    unittest.main(verbosity=1)
