"""
nightshift pretraining script: the seed variant the researcher edits. Single device, one file.
Karpathy's autoresearch train.py (cherry-picked and simplified from nanochat), with attention
through PyTorch itself (flex_attention on CUDA, scaled_dot_product_attention on the CPU) so
nothing is downloaded at run time, and a small eager float32 configuration for CPU machines.
Usage: python train.py   (after `python prepare.py`)
"""
# mypy: disable-error-code="union-attr, operator, index, arg-type"
# (nn.ModuleDict / nn.ModuleList lookups are typed Tensor | Module)

import contextlib
import gc
import math
import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from prepare import MAX_SEQ_LEN, PROFILE, TIME_BUDGET, Tokenizer, evaluate_bpb, make_dataloader
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------

# Model architecture
DEPTH = 8  # number of transformer layers
ASPECT_RATIO = 64  # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128  # target head dimension for attention
WINDOW_PATTERN = "SSSL"  # sliding window pattern: L = full context, S = half context

# Optimization
TOTAL_BATCH_SIZE = 524288  # tokens per optimizer step (2**19)
DEVICE_BATCH_SIZE = 128  # rows per forward/backward; reduce if out of memory
EMBEDDING_LR = 0.6  # learning rate for token and value embeddings (Adam)
UNEMBEDDING_LR = 0.004  # learning rate for lm_head (Adam)
MATRIX_LR = 0.04  # learning rate for matrix parameters (Muon)
SCALAR_LR = 0.5  # learning rate for per-layer scalars (Adam)
WEIGHT_DECAY = 0.2  # cautious weight decay for Muon, decayed linearly to 0 over the budget
ADAM_BETA1 = 0.8
ADAM_BETA2 = 0.95
WARMUP_RATIO = 0.0  # fraction of time budget for LR warmup
WARMDOWN_RATIO = 0.5  # fraction of time budget for LR warmdown
FINAL_LR_FRAC = 0.0  # final LR as fraction of initial
SEED = 42  # overridden by env NIGHTSHIFT_SEED (replicate runs measure the noise)

# cpu profile (two CPU cores, a budget of seconds): the gpu-sized model above cannot learn
# anything there, so on that profile these replace their namesakes. All else is shared.
CPU_DEPTH = 3
CPU_ASPECT_RATIO = 48
CPU_HEAD_DIM = 32
CPU_TOTAL_BATCH_SIZE = 2048
CPU_DEVICE_BATCH_SIZE = 8

if PROFILE == "cpu":
    DEPTH, ASPECT_RATIO, HEAD_DIM = CPU_DEPTH, CPU_ASPECT_RATIO, CPU_HEAD_DIM
    TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = CPU_TOTAL_BATCH_SIZE, CPU_DEVICE_BATCH_SIZE

device_type = "cuda" if torch.cuda.is_available() else "cpu"

# ---------------------------------------------------------------------------
# GPT Model
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx: int, n_layer: int) -> bool:
    """Returns True if layer should have Value Embedding (alternating, last always included)."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    assert x.ndim == 4  # (B, T, H, D)
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3)


_masks: dict[tuple[int, int, str], Any] = {}


def get_mask(T: int, window: int, device: torch.device) -> Any:
    """The attention mask of a (T, window), made once: a flex_attention BlockMask on CUDA,
    a boolean (T, T) matrix on the CPU (True = may attend)."""
    key = (T, window, device.type)
    if key not in _masks:
        if device.type == "cuda":

            def sliding_causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
                return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

            _masks[key] = create_block_mask(sliding_causal, None, None, T, T, device=device)
        else:
            idx = torch.arange(T, device=device)
            dist = idx[:, None] - idx[None, :]
            _masks[key] = (dist >= 0) & (dist < window)
    return _masks[key]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention over the last `window` positions; q, k, v are (B, H, T, D).
    CUDA: flex_attention with a block-sparse mask (compiled with the model, it skips the blocks
    outside the window). CPU: SDPA, with an explicit boolean mask for short windows."""
    T = q.size(2)
    if q.is_cuda:
        return flex_attention(q, k, v, block_mask=get_mask(T, window, q.device))
    if window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=get_mask(T, window, q.device))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = self.n_embd // self.n_head
        assert self.n_embd % self.n_head == 0
        assert self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_ve(layer_idx, config.n_layer) else None)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None,
                cos_sin: tuple[torch.Tensor, torch.Tensor], window: int) -> torch.Tensor:
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)

        # Value residual (ResFormer): mix in value embedding with input-dependent gate per head
        if ve is not None and self.ve_gate is not None:
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve

        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK norm
        # One dtype for the kernels (autocast may leave the norms in float32), heads first,
        # and key/value heads repeated for grouped-query attention.
        q, k, v = (t.to(v.dtype).transpose(1, 2) for t in (q, k, v))
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = attention(q, k, v, window)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)
        x = F.relu(x).square()  # ReLU²
        return self.c_proj(x)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None,
                cos_sin: tuple[torch.Tensor, torch.Tensor], window: int) -> torch.Tensor:
        x = x + self.attn(norm(x), ve, cos_sin, window)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        # Value embeddings
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        # Rotary embeddings
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        # Embedding and unembedding
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        # Transformer blocks: uniform with the std of a normal of 1/sqrt(n_embd); zero outputs
        n_embd = self.config.n_embd
        s = 3**0.5 * n_embd**-0.5
        for block in self.transformer.h:
            torch.nn.init.uniform_(block.attn.c_q.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_k.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_v.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            # Gate weights init to zero (sigmoid(0)=0.5, scaled by 2 -> 1.0 = neutral)
            if block.attn.ve_gate is not None:
                torch.nn.init.zeros_(block.attn.ve_gate.weight)
        # Per-layer scalars
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        # Value embeddings
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)
        # Embeddings in bf16 on CUDA (half the memory traffic); float32 on the CPU, where
        # bf16 arithmetic is slow
        if device_type == "cuda":
            self.transformer.wte.to(dtype=torch.bfloat16)
            for ve in self.value_embeds.values():
                ve.to(dtype=torch.bfloat16)

    def _precompute_rotary_embeddings(self, seq_len: int, head_dim: int, base: int = 10000,
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        return cos[None, :, None, :], sin[None, :, None, :]

    def _compute_window_sizes(self, config: GPTConfig) -> list[int]:
        pattern = config.window_pattern.upper()
        assert all(c in "SL" for c in pattern)
        long_window = config.sequence_len
        short_window = long_window // 2
        windows = [long_window if pattern[i % len(pattern)] == "L" else short_window
                   for i in range(config.n_layer)]
        windows[-1] = long_window  # the last layer always sees the full context
        return windows

    def estimate_flops(self) -> float:
        """Estimated FLOPs per token (forward + backward)."""
        nparams = sum(p.numel() for p in self.parameters())
        value_embeds_numel = sum(p.numel() for p in self.value_embeds.parameters())
        nparams_exclude = (self.transformer.wte.weight.numel() + value_embeds_numel +
                           self.resid_lambdas.numel() + self.x0_lambdas.numel())
        h = self.config.n_head
        q = self.config.n_embd // self.config.n_head
        t = self.config.sequence_len
        attn_flops = sum(12 * h * q * min(w, t) for w in self.window_sizes)
        return 6 * (nparams - nparams_exclude) + attn_flops

    def setup_optimizer(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2,
                        matrix_lr: float = 0.02, weight_decay: float = 0.0,
                        adam_betas: tuple[float, float] = (0.8, 0.95),
                        scalar_lr: float = 0.5) -> "MuonAdamW":
        model_dim = self.config.n_embd
        matrix_params = list(self.transformer.h.parameters())
        value_embeds_params = list(self.value_embeds.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        resid_params = [self.resid_lambdas]
        x0_params = [self.x0_lambdas]
        assert len(list(self.parameters())) == (
            len(matrix_params) + len(embedding_params) + len(lm_head_params)
            + len(value_embeds_params) + len(resid_params) + len(x0_params))
        # Scale LR ∝ 1/√dmodel (tuned at 768 dim)
        dmodel_lr_scale = (model_dim / 768) ** -0.5
        print(f"Scaling AdamW LRs by 1/sqrt({model_dim}/768) = {dmodel_lr_scale:.6f}")
        adam = {"kind": "adamw", "betas": adam_betas, "eps": 1e-10, "weight_decay": 0.0}
        param_groups: list[dict[str, Any]] = [
            dict(adam, params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
            dict(adam, params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
            dict(adam, params=value_embeds_params, lr=embedding_lr * dmodel_lr_scale),
            dict(adam, params=resid_params, lr=scalar_lr * 0.01),
            dict(adam, params=x0_params, lr=scalar_lr, betas=(0.96, 0.95)),
        ]
        # Muon steps all matrices of one shape together (one stacked orthogonalization)
        for shape in sorted({p.shape for p in matrix_params}):
            param_groups.append(dict(
                kind="muon", params=[p for p in matrix_params if p.shape == shape],
                lr=matrix_lr, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay,
            ))
        optimizer = MuonAdamW(param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        B, T = idx.size()
        assert T <= self.cos.size(1)
        cos_sin = self.cos[:, :T], self.sin[:, :T]

        x = self.transformer.wte(idx)
        x = norm(x)
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i])
        x = norm(x)

        softcap = 15  # logit soft-cap
        logits = self.lm_head(x)
        logits = logits.float()
        logits = softcap * torch.tanh(logits / softcap)

        if targets is not None:
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1, reduction=reduction)
        return logits


# ---------------------------------------------------------------------------
# Optimizer (MuonAdamW, single device only)
# ---------------------------------------------------------------------------

polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step_fused(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                     exp_avg_sq: torch.Tensor, step_t: torch.Tensor, lr_t: torch.Tensor,
                     beta1_t: torch.Tensor, beta2_t: torch.Tensor, eps_t: torch.Tensor,
                     wd_t: torch.Tensor) -> None:
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    step_size = lr_t / bias1
    p.sub_((exp_avg / denom) * step_size)


def muon_step_fused(stacked_grads: torch.Tensor, stacked_params: torch.Tensor,
                    momentum_buffer: torch.Tensor, second_momentum_buffer: torch.Tensor,
                    momentum_t: torch.Tensor, lr_t: torch.Tensor, wd_t: torch.Tensor,
                    beta2_t: torch.Tensor, ns_steps: int, red_dim: int) -> None:
    # Nesterov momentum
    momentum = momentum_t.to(stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)
    # Polar express orthogonalization (bf16 on CUDA; float32 on the CPU, where bf16 is slow)
    X = g.bfloat16() if g.is_cuda else g.float()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    if g.size(-2) > g.size(-1):
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    g = X
    # NorMuon variance reduction
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_dim_size = g.size(red_dim)
    v_norm_sq = v_mean.sum(dim=(-2, -1), keepdim=True) * red_dim_size
    v_norm = v_norm_sq.sqrt()
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype),
                                 1 - beta2_t.to(second_momentum_buffer.dtype))
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    scaled_sq_sum = (v_mean * red_dim_size) * step_size.float().square()
    v_norm_new = scaled_sq_sum.sum(dim=(-2, -1), keepdim=True).sqrt()
    final_scale = step_size * (v_norm / v_norm_new.clamp_min(1e-10))
    g = g * final_scale.to(g.dtype)
    # Cautious weight decay + parameter update
    lr = lr_t.to(g.dtype)
    wd = wd_t.to(g.dtype)
    mask = (g * stacked_params) >= 0
    stacked_params.sub_(lr * g + lr * wd * stacked_params * mask)


class MuonAdamW(torch.optim.Optimizer):
    """Combined optimizer: Muon for 2D matrix params, AdamW for others."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        super().__init__(param_groups, defaults={})
        # 0-D tensors so that changing hyperparameters does not recompile the fused steps
        def scalar() -> torch.Tensor:
            return torch.tensor(0.0, dtype=torch.float32)

        self._adamw_step_t, self._adamw_lr_t, self._adamw_beta1_t = scalar(), scalar(), scalar()
        self._adamw_beta2_t, self._adamw_eps_t, self._adamw_wd_t = scalar(), scalar(), scalar()
        self._muon_momentum_t, self._muon_lr_t = scalar(), scalar()
        self._muon_wd_t, self._muon_beta2_t = scalar(), scalar()
        # Compiled on CUDA (fused kernels); eager on the CPU, where compiling costs more
        # seconds than a whole run saves
        if device_type == "cuda":
            self.adamw_step = torch.compile(adamw_step_fused, dynamic=False, fullgraph=True)
            self.muon_step = torch.compile(muon_step_fused, dynamic=False, fullgraph=True)
        else:
            self.adamw_step, self.muon_step = adamw_step_fused, muon_step_fused

    def _step_adamw(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            self._adamw_step_t.fill_(state["step"])
            self._adamw_lr_t.fill_(group["lr"])
            self._adamw_beta1_t.fill_(group["betas"][0])
            self._adamw_beta2_t.fill_(group["betas"][1])
            self._adamw_eps_t.fill_(group["eps"])
            self._adamw_wd_t.fill_(group["weight_decay"])
            self.adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                            self._adamw_step_t, self._adamw_lr_t, self._adamw_beta1_t,
                            self._adamw_beta2_t, self._adamw_eps_t, self._adamw_wd_t)

    def _step_muon(self, group: dict[str, Any]) -> None:
        params = group["params"]
        if not params:
            return
        p = params[0]
        state = self.state[p]
        shape, device, dtype = p.shape, p.device, p.dtype
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(len(params), *shape, dtype=dtype, device=device)
        if "second_momentum_buffer" not in state:
            state_shape = ((len(params), shape[-2], 1) if shape[-2] >= shape[-1]
                           else (len(params), 1, shape[-1]))
            state["second_momentum_buffer"] = torch.zeros(state_shape, dtype=dtype, device=device)
        red_dim = -1 if shape[-2] >= shape[-1] else -2
        stacked_grads = torch.stack([p.grad for p in params])
        stacked_params = torch.stack(params)
        self._muon_momentum_t.fill_(group["momentum"])
        self._muon_beta2_t.fill_(group["beta2"] if group["beta2"] is not None else 0.0)
        self._muon_lr_t.fill_(group["lr"] * max(1.0, shape[-2] / shape[-1]) ** 0.5)
        self._muon_wd_t.fill_(group["weight_decay"])
        self.muon_step(stacked_grads, stacked_params,
                       state["momentum_buffer"], state["second_momentum_buffer"],
                       self._muon_momentum_t, self._muon_lr_t, self._muon_wd_t,
                       self._muon_beta2_t, group["ns_steps"], red_dim)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            elif group["kind"] == "muon":
                self._step_muon(group)


# ---------------------------------------------------------------------------
# Schedules (all based on progress = training_time / TIME_BUDGET)
# ---------------------------------------------------------------------------


def get_lr_multiplier(progress: float) -> float:
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO if WARMUP_RATIO > 0 else 1.0
    elif progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    else:
        cooldown = (1.0 - progress) / WARMDOWN_RATIO
        return cooldown * 1.0 + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step: int) -> float:
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress: float) -> float:
    return WEIGHT_DECAY * (1 - progress)


def sync() -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------
# Setup: tokenizer, model, optimizer, dataloader
# ---------------------------------------------------------------------------

t_start = time.time()
seed = int(os.environ.get("NIGHTSHIFT_SEED") or SEED)
torch.manual_seed(seed)
torch.cuda.manual_seed(seed)
torch.set_float32_matmul_precision("high")
device = torch.device(device_type)
# bf16 autocast on CUDA; plain float32 on the CPU
autocast_ctx: Any = (torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
                     if device_type == "cuda" else contextlib.nullcontext())
gpu_peak_flops = 989.5e12  # H100 and H200 alike; MFU is reported as 0 on the CPU

tokenizer = Tokenizer.from_directory()
vocab_size = tokenizer.get_vocab_size()
print(f"Profile: {PROFILE}, device: {device_type}, seed: {seed}, vocab_size: {vocab_size:,}")

model_dim = ((DEPTH * ASPECT_RATIO + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
num_heads = model_dim // HEAD_DIM
config = GPTConfig(
    sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=DEPTH, n_head=num_heads,
    n_kv_head=num_heads, n_embd=model_dim, window_pattern=WINDOW_PATTERN,
)
print(f"Model config: {asdict(config)}")

with torch.device("meta"):
    model = GPT(config)
model.to_empty(device=device)
model.init_weights()
# Buffers made on the meta device hold garbage after to_empty(): recompute the rotary tables
head_dim = config.n_embd // config.n_head
cos, sin = model._precompute_rotary_embeddings(model.rotary_seq_len, head_dim)
model.cos, model.sin = cos.to(device), sin.to(device)

num_params = sum(p.numel() for p in model.parameters())
num_flops_per_token = model.estimate_flops()
print(f"Parameters: {num_params:,}; estimated FLOPs per token: {num_flops_per_token:e}")

tokens_per_fwdbwd = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0, "TOTAL_BATCH_SIZE % (rows × seq len) != 0"
grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd

optimizer = model.setup_optimizer(
    unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, scalar_lr=SCALAR_LR,
    adam_betas=(ADAM_BETA1, ADAM_BETA2), matrix_lr=MATRIX_LR, weight_decay=WEIGHT_DECAY,
)

train_model: Any = model
if device_type == "cuda":
    for w in set(model.window_sizes):  # build the flex_attention block masks before tracing
        get_mask(MAX_SEQ_LEN, w, device)
    train_model = torch.compile(model, dynamic=False)

train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=device)
x, y, epoch = next(train_loader)  # prefetch first batch

print(f"Time budget: {TIME_BUDGET}s")
print(f"Gradient accumulation steps: {grad_accum_steps}")

# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------

# The first steps compile (CUDA) or warm caches (CPU): the budget counts only the steps after
# them, so slow starts do not eat into the training everybody is compared on.
timed_after_step = 10 if device_type == "cuda" else 1
t_start_training = time.time()
smooth_train_loss = 0.0
total_training_time = 0.0
step = 0

while True:
    sync()
    t0 = time.time()
    for _ in range(grad_accum_steps):
        with autocast_ctx:
            loss = train_model(x, y)
        train_loss = loss.detach()
        loss = loss / grad_accum_steps
        loss.backward()
        x, y, epoch = next(train_loader)

    # Progress and schedules
    progress = min(total_training_time / TIME_BUDGET, 1.0)
    lrm = get_lr_multiplier(progress)
    muon_momentum = get_muon_momentum(step)
    muon_weight_decay = get_weight_decay(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum
            group["weight_decay"] = muon_weight_decay
    optimizer.step()
    model.zero_grad(set_to_none=True)

    train_loss_f = train_loss.item()
    # Fast fail: abort if loss is exploding or NaN
    if math.isnan(train_loss_f) or train_loss_f > 100:
        print("FAIL")
        raise SystemExit(1)

    sync()
    dt = time.time() - t0
    if step > timed_after_step:
        total_training_time += dt

    # Logging: one line per step, parsed by the launcher
    ema_beta = 0.9
    smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
    debiased_smooth_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))
    pct_done = 100 * progress
    tok_per_sec = int(TOTAL_BATCH_SIZE / dt)
    mfu = (100 * num_flops_per_token * TOTAL_BATCH_SIZE / dt / gpu_peak_flops
           if device_type == "cuda" else 0.0)
    remaining = max(0.0, TIME_BUDGET - total_training_time)
    print(f"step {step:05d} ({pct_done:.1f}%) | loss: {debiased_smooth_loss:.6f} | "
          f"lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.1f}% | "
          f"epoch: {epoch} | remaining: {remaining:.0f}s", flush=True)

    # GC management (Python's GC causes ~500ms stalls on GPU)
    if step == 0:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif (step + 1) % 5000 == 0:
        gc.collect()

    step += 1

    # Time's up — but only stop after the untimed first steps
    if step > timed_after_step and total_training_time >= TIME_BUDGET:
        break

total_tokens = step * TOTAL_BATCH_SIZE

# Final eval
model.eval()
with autocast_ctx:
    val_bpb = evaluate_bpb(train_model, tokenizer, DEVICE_BATCH_SIZE)

# Final summary
t_end = time.time()
timed_steps = step - timed_after_step - 1
steady_state_mfu = (100 * num_flops_per_token * TOTAL_BATCH_SIZE * timed_steps
                    / total_training_time / gpu_peak_flops
                    if device_type == "cuda" and total_training_time > 0 else 0.0)
if device_type == "cuda":
    peak_vram_mb = torch.cuda.max_memory_allocated() / 1024 / 1024
else:  # CPU: the process's peak resident memory (Linux reports ru_maxrss in KiB)
    peak_vram_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {total_training_time:.1f}")
print(f"total_seconds:    {t_end - t_start:.1f}")
print(f"peak_vram_mb:     {peak_vram_mb:.1f}")
print(f"mfu_percent:      {steady_state_mfu:.2f}")
print(f"total_tokens_M:   {total_tokens / 1e6:.1f}")
print(f"num_steps:        {step}")
print(f"num_params_M:     {num_params / 1e6:.1f}")
print(f"depth:            {DEPTH}")
