#!/usr/bin/env python3
# test_bert_hf.py: mlm's CPU model.arch = bert against transformers' own BertForMaskedLM (issue 20). A seeded
# BertForMaskedLM is built offline from a small BertConfig, its parameters moved off their init (so every bias,
# LayerNorm and embedding gradient is generic) and saved with save_pretrained; tests/bert_hf_tool.c loads that
# model.safetensors by transformers' names and runs mlm on the same batch (one row ends in [PAD]s, which both sides
# mask out of attention: attention_mask = input_ids != pad). Compared, with dropout off:
#   - logits within 1e-5 and the loss within 1e-6 relative;
#   - every parameter's gradient within 1e-4 (mlm freezes the [PAD] word-embedding row: its gradient is 0, and
#     torch's is masked the same way before the steps; checked separately);
#   - three training steps (clip to norm 1, AdamW with decay on 2-D weights, mlm's linear warmup/decay schedule
#     computed here from its formula) against torch.optim.AdamW: parameters within 1e-4 after each step.
# Tolerances. Both sides compute in float32 in different orders (BLAS blocking, fused vs separate adds), ~1e-7
# relative per op; the logits (|x| ~ 1) pass through ~30 ops, so a few 1e-7 absolute is expected and 1e-5 leaves
# room for a wrong op to show (a missing bias or a wrong eps moves them by > 1e-3). Gradients are O(1e-2..1):
# 1e-4 absolute. AdamW: the update lr * m / (sqrt(v) + eps) moves by at most lr * dg / eps for a gradient
# difference dg; with lr 1e-3, eps 1e-6 and dg <= 1e-7 (measured ~1e-8) that is <= 1e-4 per step.
# Exit 0 pass, 1 fail, 77 skipped (no torch/transformers). About 15 s (mostly importing torch).
# Usage: test_bert_hf.py --tool build/tests/bert_hf_tool
import argparse, os, subprocess, sys, tempfile

V, C, H, L, F, P, T, B, PAD = 43, 32, 4, 2, 64, 20, 16, 3, 0
STEPS, LR, WARMUP, TOTAL, WD, B1, B2, EPS, CLIP = 3, 1e-3, 2, 4, 0.01, 0.9, 0.999, 1e-6, 1.0


def mlm_lr(t):  # src/host/training/optim.c, SCHED_LINEAR with min_lr 0: warmup from lr/warmup, then linear decay
    if t <= WARMUP:
        return LR * t / WARMUP
    return LR + (0.0 - LR) * min(max((t - WARMUP) / (TOTAL - WARMUP), 0.0), 1.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True)
    args = ap.parse_args()
    try:
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import BertConfig, BertForMaskedLM
    except ImportError as e:
        print(f"SKIP: torch, safetensors or transformers is not importable ({e})")
        return 77
    torch.manual_seed(20)
    cfg = BertConfig(vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=H, intermediate_size=F,
                     max_position_embeddings=P, type_vocab_size=2, pad_token_id=PAD, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
    cfg._attn_implementation = "eager"  # modeling_bert's eager_attention_forward: scores * head_dim^-0.5 + mask
    model = BertForMaskedLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.rand_like(p) * 0.2 - 0.1)
        model.bert.embeddings.word_embeddings.weight[PAD].zero_()  # as transformers initialises padding_idx
    inputs = torch.randint(5, V, (B, T), dtype=torch.int32)
    inputs[2, T - 5:] = PAD
    labels = torch.full((B, T), PAD, dtype=torch.int32)
    pick = torch.rand(B, T) < 0.25
    pick[2, T - 5:] = False
    labels[pick] = torch.randint(1, V, (int(pick.sum()),), dtype=torch.int32)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="mlm_bert_hf_") as tmp:
        model.save_pretrained(tmp)
        meta = {"vocab": V, "d_model": C, "n_heads": H, "n_layers": L, "d_ff": F, "max_positions": P, "type_vocab": 2,
                "ln_eps": 1e-12, "pad_id": PAD, "steps": STEPS, "lr": LR, "warmup": WARMUP, "total_steps": TOTAL,
                "weight_decay": WD, "beta1": B1, "beta2": B2, "adam_eps": EPS, "max_norm": CLIP}
        batch = os.path.join(tmp, "batch.safetensors")
        save_file({"inputs": inputs.contiguous(), "labels": labels.contiguous()}, batch,
                  metadata={k: repr(v) for k, v in meta.items()})
        out = os.path.join(tmp, "out.safetensors")
        res = subprocess.run([args.tool, os.path.join(tmp, "model.safetensors"), batch, out], capture_output=True,
                             text=True)
        if res.returncode != 0:
            print(f"FAIL: {args.tool} exited {res.returncode}\n{res.stdout}{res.stderr}")
            return 1
        got = load_file(out)

    def check(what, ok, detail):
        nonlocal failures
        print(f"  {'ok  ' if ok else 'FAIL'} {what}: {detail}")
        failures += not ok

    model.train()  # dropout probabilities are 0: train mode only keeps autograd's usual path
    ids, mask = inputs.long(), (inputs != PAD).long()
    hf_labels = torch.where(labels == PAD, torch.full_like(labels, -100), labels).long()
    word = model.bert.embeddings.word_embeddings.weight
    # mlm's decision (model.h): the [PAD] row is frozen, so its gradient (the tied decoder's share) is masked.
    word.register_hook(lambda g: g.index_fill(0, torch.tensor([PAD]), 0.0))
    params = dict(model.named_parameters())  # the tied decoder appears once, as word_embeddings
    decay = [p for n, p in params.items() if p.dim() == 2]
    no_decay = [p for n, p in params.items() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(B1, B2), eps=EPS)
    print(f"BertForMaskedLM V={V} C={C} H={H} L={L} F={F} P={P}, batch {B}x{T} (row 2 ends in 5 [PAD]s), "
          f"{int(pick.sum())} targets")
    for t in range(1, STEPS + 1):
        opt.zero_grad()
        outp = model(input_ids=ids, attention_mask=mask, labels=hf_labels)
        outp.loss.backward()
        if t == 1:
            dl = (outp.logits.reshape(-1, V) - got["logits"]).abs().max().item()
            check("logits", dl <= 1e-5, f"max |mlm - transformers| {dl:.2e} (tolerance 1e-5)")
            rel = abs(got["loss"][0].item() - outp.loss.item()) / outp.loss.item()
            check("loss", rel <= 1e-6, f"mlm {got['loss'][0].item():.7f}, transformers {outp.loss.item():.7f}")
            worst, worst_name = 0.0, ""
            for n, p in params.items():
                d = (p.grad - got["grad." + n]).abs().max().item()
                if d > worst:
                    worst, worst_name = d, n
            check("gradients", worst <= 1e-4, f"max |mlm - transformers| {worst:.2e} at {worst_name} over "
                  f"{len(params)} tensors (tolerance 1e-4)")
            pad_row = got["grad.bert.embeddings.word_embeddings.weight"][PAD].abs().max().item()
            check("[PAD] row", pad_row == 0.0, f"mlm's gradient of the frozen row: max |g| {pad_row}")
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        for g in opt.param_groups:
            g["lr"] = mlm_lr(t)
        check(f"step {t} learning rate", abs(got["lr"][t - 1].item() - mlm_lr(t)) <= 1e-9,
              f"mlm {got['lr'][t - 1].item():.6g}, formula {mlm_lr(t):.6g}")
        opt.step()
        worst, worst_name = 0.0, ""
        for n, p in params.items():
            d = (p.detach() - got[f"step{t}.{n}"]).abs().max().item()
            if d > worst:
                worst, worst_name = d, n
        check(f"parameters after step {t}", worst <= 1e-4, f"max |mlm - torch AdamW| {worst:.2e} at {worst_name}")
    with torch.no_grad():
        final = model(input_ids=ids, attention_mask=mask, labels=hf_labels).loss.item()
    check("loss after the steps", abs(got["loss"][STEPS].item() - final) <= 1e-5 * final,
          f"mlm {got['loss'][STEPS].item():.7f}, transformers {final:.7f} (it started at {got['loss'][0].item():.7f})")
    print("test_bert_hf:", "FAIL" if failures else "ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
