#!/usr/bin/env bash
# bench/attention_counts.sh: the counted CUDA step (bench_emu_step on the CPU execution layer, tests/emu) at the two
# shapes of docs/performance.md's attention section, and the device memory of the model at several batches:
#   - the reference configuration (B 64 x T 32, d_model 128, 8 heads, 6 layers, d_ff 256);
#   - a bert-base-shaped step at T 128 (d_model 768, 12 heads, 12 layers, d_ff 3072; vocab 67 as the bench's):
#     one step at batch 1 (the layer runs it on one CPU core: tens of minutes), and the memory alone
#     (--memory-only, seconds) at batches 1, 2 and 4, from which the bytes per sequence follow (the layout is
#     linear in the batch) and so the memory at BERT's batch 256, which the layer cannot allocate on this machine.
# Prints one table; keeps every JSON and log in OUTDIR. Counts do not depend on the machine or its load.
#
#   bash bench/attention_counts.sh [BENCH_EMU_STEP] [OUTDIR]
#       default build/bench/bench_emu_step (cmake --build build --target bench_emu_step) and a fresh temp folder
#   MLM_COUNT_SKIP_BERT_STEP=1: the memory figures only (skip the long bert-base step)
set -euo pipefail
cd "$(dirname "$0")/.."
bench="${1:-build/bench/bench_emu_step}"
out="${2:-$(mktemp -d /tmp/attention-counts.XXXXXX)}"
mkdir -p "$out"
[ -x "$bench" ] || { echo "no $bench: build it first (cmake --build build --target bench_emu_step)"; exit 1; }
bert=(--set model.d_model=768 --set model.n_heads=12 --set model.n_layers=12 --set model.d_ff=3072
      --set data.seq_len=128)

echo "== reference step (B 64 x T 32)"
"$bench" --json "$out/ref.json" >"$out/ref.txt" 2>&1
for b in 1 2 4; do
  echo "== bert-base T 128, batch $b: device memory of the model"
  "$bench" "${bert[@]}" --set train.batch_size="$b" --memory-only >"$out/bert-mem-b$b.txt" 2>&1
done
if [ "${MLM_COUNT_SKIP_BERT_STEP:-0}" != 1 ]; then
  echo "== bert-base T 128, batch 1: one counted step (long)"
  "$bench" "${bert[@]}" --set train.batch_size=1 --json "$out/bert-b1.json" >"$out/bert-b1.txt" 2>&1
fi

python3 - "$out" <<'EOF'
import json, os, re, sys
out = sys.argv[1]
def counts(name):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        return None
    c = json.load(open(p))['counts']
    t = c['totals']
    att = [k for k in c['kernels'] if 'attention' in k['name'] or 'softmax' in k['name'] or 'heads' in k['name']]
    batched = [g for g in c['gemms'] if g['batch'] > 1]  # only the attention's products are batched
    return t, att, batched
def mem(b):
    s = open(os.path.join(out, 'bert-mem-b%d.txt' % b)).read()
    return int(re.search(r'device memory (\d+) bytes', s).group(1))
print('\n| step | kernel launches | cuBLAS calls | kernel MB read + written | attention kernels: launches, MB | '
      'batched cuBLAS (attention products): calls, operand MB | peak device MiB |')
print('| --- | --- | --- | --- | --- | --- | --- |')
for name, what in (('ref.json', 'reference, B 64 x T 32'), ('bert-b1.json', 'bert-base, B 1 x T 128')):
    r = counts(name)
    if r is None:
        continue
    t, att, gb = r
    al = sum(k['launches'] for k in att)
    ab = sum(k['bytes_read'] + k['bytes_written'] for k in att) / 1e6
    gc = sum(g['calls'] for g in gb)
    gm = sum(g['bytes_read'] + g['bytes_written'] for g in gb) / 1e6
    print('| %s | %d | %d | %.1f | %d, %.1f | %d, %.1f | %.1f |' % (what, t['launches'], t['cublas_calls'],
          (t['kernel_bytes_read'] + t['kernel_bytes_written']) / 1e6, al, ab, gc, gm,
          t.get('device_bytes_peak', 0) / 2**20))
m1, m2, m4 = mem(1), mem(2), mem(4)
per_seq = (m4 - m2) / 2
print('\nbert-base T 128 device memory of the model: B 1 %.1f MiB, B 2 %.1f MiB, B 4 %.1f MiB; %.2f MiB per sequence '
      '(B 2 to 4; B 1 to 2: %.2f), so at B 256: %.2f GiB' % (m1 / 2**20, m2 / 2**20, m4 / 2**20, per_seq / 2**20,
      (m2 - m1) / 2**20, (m2 + (256 - 2) * per_seq) / 2**30))
print('files:', out)
EOF
