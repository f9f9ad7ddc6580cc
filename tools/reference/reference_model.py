"""reference_model.py: the PyTorch reference for mlm (model, masking, Noam optimizer, clipping, data).

This reproduces the labml "annotated deep learning paper implementations" MLM experiment
(labml_nn/transformers/mlm) as described in /work/shared/SPEC.md:

* ``TransformerMLM`` -- a plain PyTorch replica of labml_nn's modules with the same module tree and
  therefore the same state_dict names (``src_embed.linear.weight``,
  ``encoder.layers.{i}.self_attn.{query,key,value}.linear.{weight,bias}``, ...). Layout is
  ``[seq, batch, ...]`` as in labml. ``build_model(..., impl="labml")`` builds the same model from
  labml_nn's own classes instead (needs labml 0.4.x + labml_helpers + labml_nn importable, see
  README.md); ``tools/reference/check_labml.py`` verifies the two agree bit for bit.
* ``mlm_mask`` -- labml's masking (SPEC "Masking"), driven by an explicit torch.Generator.
* ``NoamAdam`` -- labml's Noam optimizer (its Adam with eps added to sqrt(v) before the bias
  correction, and the Noam learning-rate schedule).
* ``clip_grad_norm`` -- torch.nn.utils.clip_grad_norm_ with max_norm 1 (global L2 norm).
* ``CharData`` / ``SequenceBatches`` -- Tiny Shakespeare character data, 90/10 split, sorted
  vocabulary, sequences with labml's random offsets, shuffled without replacement each epoch.

Nothing here is used by the C trainer; it exists to produce fixtures and reference curves.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, asdict
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------

@dataclass
class RefConfig:
    """Hyper-parameters of the reference experiment (defaults = SPEC.md training config)."""
    vocab: int = 67          # characters + [PAD] + [MASK]
    d_model: int = 128
    n_heads: int = 8
    n_layers: int = 6
    d_ff: int = 256
    seq_len: int = 32
    batch: int = 64
    dropout: float = 0.1
    ln_eps: float = 1e-5
    # Optimizer (labml's "Noam" with learning_rate 1.0, warmup 2000, eps 1e-8, betas (0.9, 0.999)).
    lr_factor: float = 1.0
    warmup: int = 2000
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    # Masking probabilities.
    masking_prob: float = 0.15
    randomize_prob: float = 0.1
    no_change_prob: float = 0.1

    @property
    def pad_id(self) -> int:
        return self.vocab - 2

    @property
    def mask_id(self) -> int:
        return self.vocab - 1

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Model: replica of labml_nn.transformers (models.py, mha.py, feed_forward.py, positional_encoding.py)
# ---------------------------------------------------------------------------------------------------

def get_positional_encoding(d_model: int, max_len: int = 5000) -> torch.Tensor:
    """Fixed sinusoid table [max_len, 1, d_model], computed in float32 exactly as labml does it
    (div_term = exp(2i * -(ln(10000) / d_model)) in float32, then sin/cos of position * div_term)."""
    enc = torch.zeros(max_len, d_model)
    position = torch.arange(0, max_len, dtype=torch.float32).unsqueeze(1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float32)
    div_term = torch.exp(two_i * -(math.log(10000.0) / d_model))
    enc[:, 0::2] = torch.sin(position * div_term)
    enc[:, 1::2] = torch.cos(position * div_term)
    return enc.unsqueeze(1).requires_grad_(False)


class EmbeddingsWithPositionalEncoding(nn.Module):
    """Token embedding * sqrt(d_model) + fixed positional encoding (no dropout)."""

    def __init__(self, d_model: int, n_vocab: int, max_len: int = 5000):
        super().__init__()
        self.linear = nn.Embedding(n_vocab, d_model)
        self.d_model = d_model
        # Persistent buffer as in labml, so labml checkpoints load into the replica unchanged.
        self.register_buffer('positional_encodings', get_positional_encoding(d_model, max_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pe = self.positional_encodings[:x.shape[0]].to(self.linear.weight.dtype)
        return self.linear(x) * math.sqrt(self.d_model) + pe


class PrepareForMultiHeadAttention(nn.Module):
    """Linear projection split into heads: [seq, batch, d_model] -> [seq, batch, heads, d_k]."""

    def __init__(self, d_model: int, heads: int, d_k: int, bias: bool):
        super().__init__()
        self.linear = nn.Linear(d_model, heads * d_k, bias=bias)
        self.heads = heads
        self.d_k = d_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head_shape = x.shape[:-1]
        x = self.linear(x)
        return x.view(*head_shape, self.heads, self.d_k)


class MultiHeadAttention(nn.Module):
    """softmax_j(Q_i . K_j / sqrt(d_k)) V_j per head, no mask, dropout on the probabilities."""

    def __init__(self, heads: int, d_model: int, dropout_prob: float = 0.1, bias: bool = True):
        super().__init__()
        self.d_k = d_model // heads
        self.heads = heads
        self.query = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=bias)
        self.key = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=bias)
        self.value = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=True)
        # Scores are [i (query), j (key), batch, head]: the keys are dim 1.
        self.softmax = nn.Softmax(dim=1)
        self.output = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout_prob)
        self.scale = 1 / math.sqrt(self.d_k)

    def forward(self, *, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is not None:
            raise NotImplementedError("the MLM encoder never uses an attention mask")
        seq_len, batch_size, _ = query.shape
        query = self.query(query)
        key = self.key(key)
        value = self.value(value)
        scores = torch.einsum('ibhd,jbhd->ijbh', query, key)
        scores *= self.scale
        attn = self.softmax(scores)
        attn = self.dropout(attn)
        x = torch.einsum('ijbh,jbhd->ibhd', attn, value)
        x = x.reshape(seq_len, batch_size, -1)
        return self.output(x)


class FeedForward(nn.Module):
    """Linear(d_model, d_ff) -> ReLU -> Dropout -> Linear(d_ff, d_model), both with bias."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1):
        super().__init__()
        self.layer1 = nn.Linear(d_model, d_ff)
        self.layer2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.dropout(self.activation(self.layer1(x))))


class TransformerLayer(nn.Module):
    """Pre-norm layer: x += Drop(MHA(LN(x))); x += Drop(FFN(LN(x))). One Dropout module for both
    residuals, as in labml (each call draws its own mask)."""

    def __init__(self, *, d_model: int, self_attn: MultiHeadAttention, feed_forward: FeedForward,
                 dropout_prob: float, ln_eps: float = 1e-5):
        super().__init__()
        self.size = d_model
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.dropout = nn.Dropout(dropout_prob)
        self.norm_self_attn = nn.LayerNorm([d_model], eps=ln_eps)
        self.norm_ff = nn.LayerNorm([d_model], eps=ln_eps)

    def forward(self, *, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        z = self.norm_self_attn(x)
        x = x + self.dropout(self.self_attn(query=z, key=z, value=z, mask=mask))
        z = self.norm_ff(x)
        x = x + self.dropout(self.feed_forward(z))
        return x


class Encoder(nn.Module):
    """n_layers deep copies of one template layer, then a final LayerNorm."""

    def __init__(self, layer: TransformerLayer, n_layers: int, ln_eps: float = 1e-5):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(n_layers)])
        self.norm = nn.LayerNorm([layer.size], eps=ln_eps)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x=x, mask=mask)
        return self.norm(x)


class Generator(nn.Module):
    """Final projection to raw logits (no softmax)."""

    def __init__(self, n_vocab: int, d_model: int):
        super().__init__()
        self.projection = nn.Linear(d_model, n_vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


class TransformerMLM(nn.Module):
    """src_embed -> encoder (no mask) -> generator; input [seq, batch] ids, output [seq, batch, vocab]."""

    def __init__(self, *, encoder: nn.Module, src_embed: nn.Module, generator: nn.Module):
        super().__init__()
        # Same attribute order as labml's TransformerMLM (it fixes the parameter iteration order).
        self.generator = generator
        self.src_embed = src_embed
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator(self.encoder(self.src_embed(x), None))


def build_model(cfg: RefConfig, impl: str = "replica", copy_layers: bool = True) -> nn.Module:
    """Build the MLM with PyTorch default initialisation from the current torch RNG state.

    Modules are created in the order labml's lazy configs create them (encoder layer: attention then
    feed-forward then norms; encoder; source embedding; generator), so the same torch seed gives the
    same initial weights as the reference experiment. ``copy_layers=False`` re-initialises every
    layer independently (used by test fixtures, so that a layer mix-up cannot hide behind identical
    layers)."""
    if impl == "labml":
        # Import lazily: needs labml 0.4.x, labml_helpers and labml_nn (see README.md).
        from labml_nn.transformers.mha import MultiHeadAttention as LMHA
        from labml_nn.transformers.feed_forward import FeedForward as LFF
        from labml_nn.transformers import models as lm

        if cfg.ln_eps != 1e-5:
            raise ValueError("labml's modules fix LayerNorm eps at 1e-5")
        attn = LMHA(cfg.n_heads, cfg.d_model, dropout_prob=cfg.dropout)
        ff = copy.deepcopy(LFF(cfg.d_model, cfg.d_ff, dropout=cfg.dropout, activation=nn.ReLU(),
                               is_gated=False, bias1=True, bias2=True, bias_gate=False))
        layer = lm.TransformerLayer(d_model=cfg.d_model, self_attn=attn, src_attn=None,
                                    feed_forward=ff, dropout_prob=cfg.dropout)
        encoder = lm.Encoder(layer, cfg.n_layers)
        src_embed = lm.EmbeddingsWithPositionalEncoding(cfg.d_model, cfg.vocab)
        generator = lm.Generator(cfg.vocab, cfg.d_model)

        class LabmlTransformerMLM(TransformerMLM):
            """labml's encoder takes (x, mask) positionally, like ours."""

        model = LabmlTransformerMLM(encoder=encoder, src_embed=src_embed, generator=generator)
    elif impl == "replica":
        attn = MultiHeadAttention(cfg.n_heads, cfg.d_model, dropout_prob=cfg.dropout)
        ff = FeedForward(cfg.d_model, cfg.d_ff, dropout=cfg.dropout)
        layer = TransformerLayer(d_model=cfg.d_model, self_attn=attn, feed_forward=ff,
                                 dropout_prob=cfg.dropout, ln_eps=cfg.ln_eps)
        encoder = Encoder(layer, cfg.n_layers, ln_eps=cfg.ln_eps)
        src_embed = EmbeddingsWithPositionalEncoding(cfg.d_model, cfg.vocab)
        generator = Generator(cfg.vocab, cfg.d_model)
        model = TransformerMLM(encoder=encoder, src_embed=src_embed, generator=generator)
    else:
        raise ValueError(f"unknown impl {impl!r} (replica or labml)")
    if not copy_layers:
        for layer_mod in model.encoder.layers:
            for m in layer_mod.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
    return model


def param_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Trainable parameters by state_dict name (the positional-encoding buffer excluded)."""
    return {name: p for name, p in model.named_parameters()}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# Masking (labml_nn.transformers.mlm.MLM), loss and metrics
# ---------------------------------------------------------------------------------------------------

def mlm_mask(x: torch.Tensor, cfg: RefConfig, generator: Optional[torch.Generator] = None,
             no_mask_tokens: Tuple[int, ...] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference masking of a [seq, batch] id tensor; returns (inputs, labels), x is not modified.

    full = U1 < 0.15 (never on PAD/MASK/no_mask_tokens); unchanged = full & U2 < 0.1;
    random = full & U3 < 0.1 (independent of unchanged); mask = full & !random & !unchanged -> [MASK];
    random positions get uniform [0, vocab) (PAD/MASK included); labels = x where full else PAD."""
    dev = x.device
    full = torch.rand(x.shape, device=dev, generator=generator) < cfg.masking_prob
    for t in tuple(no_mask_tokens) + (cfg.pad_id, cfg.mask_id):
        full &= x != t
    unchanged = full & (torch.rand(x.shape, device=dev, generator=generator) < cfg.no_change_prob)
    random_mask = full & (torch.rand(x.shape, device=dev, generator=generator) < cfg.randomize_prob)
    # Drawn for every position and then selected (rather than only for the selected ones) so the
    # stream does not depend on a device sync to count them; the distribution is the same.
    random_tokens = torch.randint(0, cfg.vocab, x.shape, device=dev, generator=generator)
    mask = full & ~random_mask & ~unchanged
    inputs = x.masked_fill(mask, cfg.mask_id)
    inputs = torch.where(random_mask, random_tokens, inputs)
    labels = x.masked_fill(~full, cfg.pad_id)
    return inputs, labels


def mlm_mask_exact(x: torch.Tensor, cfg: RefConfig, generator: Optional[torch.Generator] = None,
                   no_mask_tokens: Tuple[int, ...] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
    """labml's masking draw-for-draw (random tokens drawn only for the selected positions, in
    row-major order), for reproducing its random stream under a torch seed. Slower on GPU (syncs)."""
    dev = x.device
    x = x.clone()
    full = torch.rand(x.shape, device=dev, generator=generator) < cfg.masking_prob
    for t in tuple(no_mask_tokens) + (cfg.pad_id, cfg.mask_id):
        full &= x != t
    unchanged = full & (torch.rand(x.shape, device=dev, generator=generator) < cfg.no_change_prob)
    random_mask = full & (torch.rand(x.shape, device=dev, generator=generator) < cfg.randomize_prob)
    idx = torch.nonzero(random_mask, as_tuple=True)
    random_tokens = torch.randint(0, cfg.vocab, (len(idx[0]),), device=dev, generator=generator)
    mask = full & ~random_mask & ~unchanged
    y = x.clone()
    x.masked_fill_(mask, cfg.mask_id)
    x[idx] = random_tokens
    y.masked_fill_(~full, cfg.pad_id)
    return x, y


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not PAD (nn.CrossEntropyLoss(ignore_index))."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=pad_id)


def mlm_correct(logits: torch.Tensor, labels: torch.Tensor, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(number of argmax == label, number of non-PAD labels) as device tensors."""
    valid = labels != pad_id
    correct = (logits.argmax(dim=-1) == labels) & valid
    return correct.sum(), valid.sum()


# ---------------------------------------------------------------------------------------------------
# Optimizer: labml_nn.optimizers.noam.Noam (amsgrad off, weight decay 0, optimized_update on)
# ---------------------------------------------------------------------------------------------------

def noam_lr(factor: float, d_model: int, warmup: int, t: int) -> float:
    """lr_t = factor * d_model^-0.5 * min(t^-0.5, t * warmup^-1.5), t from 1 (Python double)."""
    return factor * d_model ** (-0.5) * min(t ** (-0.5), t * warmup ** (-1.5))


class NoamAdam(torch.optim.Optimizer):
    """labml's Noam: Adam whose eps is added to sqrt(v) before the bias correction.

    m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; t += 1;
    step = lr_t * sqrt(1 - b2^t) / (1 - b1^t); p -= step * m / (sqrt(v) + eps).
    The same elementwise operations as labml (mul_/add_/addcmul_/sqrt/add_/addcdiv_), batched over
    all parameters with torch._foreach_* (identical results, fewer kernel launches)."""

    def __init__(self, params, lr_factor: float = 1.0, betas=(0.9, 0.999), eps: float = 1e-8,
                 warmup: int = 2000, d_model: int = 128):
        defaults = dict(lr=lr_factor, betas=betas, eps=eps, warmup=warmup)
        super().__init__(params, defaults)
        self.d_model = d_model
        self.t = 0
        self.last_lr = 0.0

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        t = self.t
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group['betas']
            grads = [p.grad for p in params]
            ms, vs = [], []
            for p in params:
                st = self.state[p]
                if not st:
                    st['step'] = 0
                    st['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st['step'] += 1
                ms.append(st['exp_avg'])
                vs.append(st['exp_avg_sq'])
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, grads, alpha=1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
            lr = group['lr'] * self.d_model ** (-0.5) * min(t ** (-0.5), t * group['warmup'] ** (-1.5))
            bias_correction1 = 1 - beta1 ** t
            bias_correction2 = 1 - beta2 ** t
            step_size = lr * math.sqrt(bias_correction2) / bias_correction1
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, group['eps'])
            torch._foreach_addcdiv_(params, ms, denom, value=-step_size)
            self.last_lr = lr
        return None


def clip_grad_norm(params, max_norm: float = 1.0) -> torch.Tensor:
    """Global L2 norm clip, scale min(1, max_norm / (norm + 1e-6)); returns the pre-clip norm."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)


# ---------------------------------------------------------------------------------------------------
# Data: Tiny Shakespeare characters (labml_helpers TextFileDataset + SequentialUnBatchedDataset)
# ---------------------------------------------------------------------------------------------------

class CharData:
    """Corpus split 90/10 by characters, vocabulary sorted(set(train + valid)) by code point."""

    def __init__(self, path: str):
        with open(path, 'r', encoding='utf-8') as f:
            text = f.read()
        split = int(len(text) * 0.9)
        self.train_text = text[:split]
        self.valid_text = text[split:]
        self.itos: List[str] = sorted(set(self.train_text + self.valid_text))
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.n_chars = len(self.itos)
        self.n_tokens = self.n_chars + 2  # + [PAD], [MASK]

    def encode(self, s: str) -> torch.Tensor:
        """Ids of the characters of s that are in the vocabulary (others dropped)."""
        return torch.tensor([self.stoi[c] for c in s if c in self.stoi], dtype=torch.long)


class SequenceBatches:
    """Sequences of seq_len ids: item i starts at i*seq_len + r, r uniform in
    [0, min(seq_len-1, N - (i*seq_len + seq_len + 1))]; items shuffled without replacement each epoch;
    batches of batch_size with the last partial batch kept. Yields [seq, batch] long tensors."""

    def __init__(self, data: torch.Tensor, seq_len: int, batch_size: int, device: torch.device):
        self.data = data.to(device)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.n = (data.shape[0] - 1) // seq_len
        self.device = device
        starts = torch.arange(self.n, dtype=torch.long) * seq_len
        # Largest offset of each item (inclusive), as labml's random.randint bounds.
        self.base = starts.to(device)
        self.max_off = torch.clamp(data.shape[0] - (starts + seq_len + 1), max=seq_len - 1).to(device)
        self.ar = torch.arange(seq_len, device=device)

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def epoch(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """One shuffled pass; `generator` lives on the CPU (randperm/rand), results move to device."""
        perm = torch.randperm(self.n, generator=generator).to(self.device)
        u = torch.rand(self.n, generator=generator, dtype=torch.float64).to(self.device)
        offs = torch.minimum((u * (self.max_off + 1).double()).long(), self.max_off)
        starts = self.base + offs  # offsets indexed by item, drawn once per epoch
        for b in range(len(self)):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            pos = starts[idx].unsqueeze(0) + self.ar.unsqueeze(1)  # [seq, batch]
            yield self.data[pos]
