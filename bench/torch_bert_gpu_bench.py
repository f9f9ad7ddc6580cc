"""torch_bert_gpu_bench.py: training tokens/s of transformers' BertForMaskedLM on one device, the yardstick of
issue 23 for `mlm train --config configs/bert-base.conf` (tools/gpu_verify.sh runs both on the same GPU).

What PyTorch users run for BERT pre-training on one GPU, eager: transformers' BertForMaskedLM built from a
BertConfig (default bert-base: 12 layers x 768, 12 heads, d_ff 3072, vocabulary 30,522, 512 positions), SDPA
attention (attn_implementation="sdpa": PyTorch picks its flash / memory-efficient kernel), torch.optim.AdamW
(fused on CUDA; weight decay 0.01 on 2-D weights, as BERT), gradient clipping at 1.0, and the precision:
  bf16   torch.autocast(device_type, dtype=torch.bfloat16) around forward and loss (FP32 master weights and
         optimizer state; no loss scaling, as BF16 needs none)
  tf32   FP32 with TF32 matmuls (torch.backends.cuda.matmul.allow_tf32 = True, cuDNN likewise)
  fp32   FP32, TF32 off
Batches are random token ids drawn on the device (the speed does not depend on the text), BERT's masking: 15%
of the positions selected, of those 80% [MASK], 10% a random token, 10% unchanged; the loss over the selected
positions (labels -100 elsewhere), every position's logits computed as BertForMaskedLM does.

Timing: --warmup untimed steps, then --windows windows of --window steps, each synchronised at both ends; each
window gives tokens/s (batch x seq_len x steps / seconds). Prints one JSON line per window and at the end
  throughput: N tokens/s, M ms/step (median of W windows of S steps after K warm-up steps; min A max B)
the line tools/gpu_summary.py reads.

Examples:
  python3 bench/torch_bert_gpu_bench.py --precision bf16 --batch 64 --seq-len 128
  python3 bench/torch_bert_gpu_bench.py --device cpu --layers 2 --hidden 64 --heads 2 --ffn 128 --vocab 1000 \
      --batch 4 --seq-len 32 --warmup 1 --windows 2 --window 2 --precision fp32     # a smoke run anywhere
"""

import argparse
import json
import statistics
import sys
import time

import torch


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda')
    p.add_argument('--precision', choices=('bf16', 'tf32', 'fp32'), default='bf16')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--seq-len', type=int, default=128)
    p.add_argument('--layers', type=int, default=12)
    p.add_argument('--hidden', type=int, default=768)
    p.add_argument('--heads', type=int, default=12)
    p.add_argument('--ffn', type=int, default=3072)
    p.add_argument('--vocab', type=int, default=30522)
    p.add_argument('--positions', type=int, default=512)
    p.add_argument('--attention', default='sdpa', help='attn_implementation (sdpa, eager)')
    p.add_argument('--lr', type=float, default=1e-4)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--windows', type=int, default=5)
    p.add_argument('--window', type=int, default=10)
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)
    if a.seq_len > a.positions:
        p.error(f'--seq-len {a.seq_len} is longer than --positions {a.positions}')
    if min(a.batch, a.seq_len, a.warmup + 1, a.windows, a.window) < 1:
        p.error('--batch, --seq-len, --windows and --window must be at least 1, --warmup at least 0')
    return a


def build(a, dev):
    from transformers import BertConfig, BertForMaskedLM
    cfg = BertConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                     num_attention_heads=a.heads, intermediate_size=a.ffn, max_position_embeddings=a.positions,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12)
    torch.manual_seed(a.seed)
    model = BertForMaskedLM._from_config(cfg, attn_implementation=a.attention).to(dev)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=0.01), dict(params=no_decay, weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.999), eps=1e-6, fused=dev.type == 'cuda')
    return model, opt


# BERT's special ids in bert-base-uncased's vocabulary: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103; the
# random ids are drawn above them, so no special token is ever selected or drawn.
MASK_ID, FIRST_WORD = 103, 999


def batch(a, dev, gen):
    lo = FIRST_WORD if a.vocab > FIRST_WORD + 1 else 1
    mask_id = MASK_ID if a.vocab > MASK_ID else 0
    ids = torch.randint(lo, a.vocab, (a.batch, a.seq_len), device=dev, generator=gen)
    u = torch.rand(a.batch, a.seq_len, device=dev, generator=gen)
    selected = u < 0.15
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    r = torch.rand(a.batch, a.seq_len, device=dev, generator=gen)
    inputs = torch.where(selected & (r < 0.8), torch.full_like(ids, mask_id), ids)
    random_ids = torch.randint(lo, a.vocab, ids.shape, device=dev, generator=gen)
    inputs = torch.where(selected & (r >= 0.8) & (r < 0.9), random_ids, inputs)
    return inputs, labels


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    dev = torch.device(a.device)
    cuda = dev.type == 'cuda'
    if cuda and not torch.cuda.is_available():
        print('error: --device cuda but PyTorch sees no GPU', file=sys.stderr)
        return 3
    tf32 = a.precision == 'tf32'
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    model, opt = build(a, dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(a.seed)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=a.precision == 'bf16')

    def step():
        inputs, labels = batch(a, dev, gen)
        with autocast:
            loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=cuda)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(a.warmup):
        loss = step()
    sync()
    rates, losses = [], []
    for w in range(a.windows):
        sync()
        t0 = time.perf_counter()
        for _ in range(a.window):
            loss = step()
        sync()
        dt = time.perf_counter() - t0
        rates.append(a.batch * a.seq_len * a.window / dt)
        losses.append(float(loss))
        print(json.dumps(dict(window=w, tokens_per_s=round(rates[-1], 1), ms_per_step=round(1e3 * dt / a.window, 3),
                              loss=round(losses[-1], 4))), flush=True)
    if not all(l == l and l < 1e4 for l in losses):  # NaN or an exploding loss: the figure is not a training step's
        print(f'error: the loss is not finite or exploded: {losses}', file=sys.stderr)
        return 1
    med = statistics.median(rates)
    print(json.dumps(dict(summary=True, precision=a.precision, batch=a.batch, seq_len=a.seq_len, layers=a.layers,
                          hidden=a.hidden, attention=a.attention, torch=torch.__version__,
                          device=torch.cuda.get_device_name(dev) if cuda else 'cpu', tokens_per_s=round(med, 1),
                          min=round(min(rates), 1), max=round(max(rates), 1))), flush=True)
    print(f'throughput: {med:.0f} tokens/s, {1e3 * a.batch * a.seq_len / med:.3f} ms/step (median of {a.windows} '
          f'windows of {a.window} steps after {a.warmup} warm-up steps; min {min(rates):.0f} max {max(rates):.0f}; '
          f'BertForMaskedLM {a.layers}x{a.hidden}, {a.attention} attention, {a.precision}, batch {a.batch} x '
          f'{a.seq_len})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
