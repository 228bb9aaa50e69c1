"""The DBRX transformer: one readable file whose state_dict() keys are exactly transformers' DbrxForCausalLM keys,
so a Hugging Face checkpoint loads with load_state_dict(strict=True) and no converter.

Shape legend: B batch, T new tokens in this call, S key/value slots (cached + new), D d_model, H query heads,
G kv heads, hd head dim, V vocab, E experts.

Forward, per block (pre-norm): norm_1 -> Wqkv -> clamp to +-clip_qkv -> split q,k,v -> RoPE on q,k ->
(cache k,v) -> causal attention -> out_proj -> residual; norm_2 -> MoE FFN -> residual. Then norm_f, lm_head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dbrx.config import DbrxConfig
from dbrx.moe import DbrxFFN, load_balancing_loss


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V] in the model's dtype (the reference never upcasts)
    aux_loss: torch.Tensor | None = None  # load-balancing loss, when router logits were asked for
    router_logits: tuple[torch.Tensor, ...] | None = None  # per layer, [B*T, E]


class KVCache:
    """A preallocated cache per layer, [B, G, max_len, hd], written at explicit slot positions.

    Slots are shared by the batch: with left padding, row b's first real token sits at slot pad_b, and the
    attention mask (not the slot) tells which slots hold real tokens. `device` may be a list, one device per layer,
    for a model whose blocks sit on several devices."""

    def __init__(self, config: DbrxConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str | list):
        shape = (batch_size, config.kv_n_heads, max_len, config.head_dim)
        devices = device if isinstance(device, list) else [device] * config.n_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.max_len = max_len

    @classmethod
    def of(cls, k: list[torch.Tensor], v: list[torch.Tensor]) -> "KVCache":
        """A cache over existing tensors, one [B, G, max_len, hd] pair per layer."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len = list(k), list(v), k[0].shape[2]
        return cache

    @staticmethod
    def bytes_per_token(config: DbrxConfig, dtype: torch.dtype) -> int:
        return 2 * config.n_layers * config.kv_n_heads * config.head_dim * dtype.itemsize

    def update(self, layer: int, start: int, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor):
        end = start + k_BGTD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to position {end}")
        self.k[layer][:, :, start:end] = k_BGTD
        self.v[layer][:, :, start:end] = v_BGTD
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def rope_cos_sin(positions_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, 1, T, hd] (broadcast over heads) in the half-split ("rotate_half") convention; angles
    computed in fp32."""
    key = (head_dim, theta, positions_BT.device)
    if key not in _INV_FREQ:  # computed as transformers does, so that the angles match to the bit
        with torch.inference_mode(False):  # a cached tensor must stay usable outside inference mode
            arange = torch.arange(0, head_dim, 2, dtype=torch.float, device=positions_BT.device)
            _INV_FREQ[key] = 1.0 / (theta ** (arange / head_dim))
    inv_freq = _INV_FREQ[key]
    freqs_BTd = positions_BT[..., None].float() * inv_freq
    emb_B1TD = torch.cat((freqs_BTd, freqs_BTd), dim=-1)[:, None]
    return emb_B1TD.cos().to(dtype), emb_B1TD.sin().to(dtype)


def apply_rope(x_BHTD: torch.Tensor, cos_B1TD: torch.Tensor, sin_B1TD: torch.Tensor) -> torch.Tensor:
    half = x_BHTD.shape[-1] // 2
    rotated = torch.cat((-x_BHTD[..., half:], x_BHTD[..., :half]), dim=-1)
    return x_BHTD * cos_B1TD + rotated * sin_B1TD


class DbrxAttention(nn.Module):
    def __init__(self, config: DbrxConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.kv_n_heads, config.head_dim
        self.d_model = config.d_model
        self.clip_qkv = config.attn_config.clip_qkv
        self.attn_pdrop = config.attn_config.attn_pdrop
        self.Wqkv = nn.Linear(self.d_model, self.d_model + 2 * self.kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.d_model, self.d_model, bias=False)
        self.sdpa_dtype: torch.dtype | None = None  # attention's compute dtype when set (see set_attention_dtype)

    def forward(self, x_BTD, cos_sin, mask, cache: KVCache | None, start: int) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        qkv = self.Wqkv(x_BTD)
        if self.clip_qkv is not None:  # before the split and before RoPE, as DBRX was trained
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_dim = self.kv_heads * self.head_dim
        qk, v = qkv.split([self.d_model + kv_dim, kv_dim], dim=-1)
        # q and k heads are adjacent in Wqkv's output: rotate them in one go, then split.
        qk = apply_rope(qk.view(B, T, self.n_heads + self.kv_heads, self.head_dim).transpose(1, 2), *cos_sin)
        q_BHTd, k_BGTd = qk.split([self.n_heads, self.kv_heads], dim=1)
        v_BGTd = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None and hasattr(cache, "attend"):
            # A cache of per-request slots (dbrx.serve.engine.SlotCache): the row packs several requests' new
            # tokens; the cache stores each request's keys in its slot and attends each against its own history.
            o = cache.attend(self.layer_idx, q_BHTd, k_BGTd, v_BGTd, self.sdpa)
            return self.out_proj(o.transpose(1, 2).reshape(B, T, self.d_model))
        if cache is not None:
            k_BGTd, v_BGTd = cache.update(self.layer_idx, start, k_BGTd, v_BGTd)
        causal = mask is None and T > 1
        if causal and k_BGTd.shape[2] != T:  # chunked prefill without padding: causal with an offset
            mask, causal = causal_mask(None, start, T, x_BTD.device), False
        o = self.sdpa(q_BHTd, k_BGTd, v_BGTd, mask, causal)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, self.d_model))

    def sdpa(self, q_BHTd, k_BGSd, v_BGSd, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Scaled dot-product attention with grouped kv heads, in `sdpa_dtype` when set, else in q's dtype (keys and
        values from a cache kept in another dtype are cast to it); [B, H, T, hd] in q's dtype."""
        dtype = q_BHTd.dtype
        compute = self.sdpa_dtype or dtype
        if any(t.dtype != compute for t in (q_BHTd, k_BGSd, v_BGSd)):
            q_BHTd, k_BGSd, v_BGSd = (t.to(compute) for t in (q_BHTd, k_BGSd, v_BGSd))
        return F.scaled_dot_product_attention(
            q_BHTd, k_BGSd, v_BGSd, attn_mask=mask, is_causal=causal,
            dropout_p=self.attn_pdrop if self.training else 0.0, enable_gqa=self.kv_heads != self.n_heads,
        ).to(dtype)


def causal_mask(key_valid_BS: torch.Tensor | None, start: int, T: int, device) -> torch.Tensor:
    """Boolean [B|1, 1, T, S] mask, S = start + T: query i (slot start+i) sees slot j <= start+i that holds a
    real token. Each query always sees its own slot, so a padding row never becomes an all-masked (NaN) row."""
    S = start + T
    q_slot = torch.arange(start, S, device=device)[:, None]
    k_slot = torch.arange(S, device=device)[None, :]
    mask_TS = k_slot <= q_slot
    if key_valid_BS is None:
        return mask_TS[None, None]
    return (mask_TS[None] & key_valid_BS[:, None, :].bool() | (k_slot == q_slot)[None])[:, None]


def document_mask(sequence_id_BT: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask for packed rows: query i sees key j <= i of the same document. Padding
    (sequence_id < 0) sees only itself, so no row is all-masked."""
    T = sequence_id_BT.shape[1]
    idx = torch.arange(T, device=sequence_id_BT.device)
    causal_TT = idx[None, :] <= idx[:, None]
    same_BTT = sequence_id_BT[:, :, None] == sequence_id_BT[:, None, :]
    own_TT = idx[None, :] == idx[:, None]
    return ((causal_TT & same_BTT & (sequence_id_BT[:, None, :] >= 0)) | own_TT)[:, None]


def document_positions(sequence_id_BT: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where each document starts (sequence_id changes along the row)."""
    B, T = sequence_id_BT.shape
    idx = torch.arange(T, device=sequence_id_BT.device).expand(B, T)
    starts = torch.ones_like(sequence_id_BT, dtype=torch.bool)
    starts[:, 1:] = sequence_id_BT[:, 1:] != sequence_id_BT[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


class DbrxNormAttentionNorm(nn.Module):
    """x + attn(norm_1(x)), and norm_2 of that for the FFN (the grouping is transformers', for its weight names)."""

    def __init__(self, config: DbrxConfig, layer_idx: int):
        super().__init__()
        self.resid_pdrop = config.resid_pdrop
        self.norm_1 = nn.LayerNorm(config.d_model, bias=False)
        self.attn = DbrxAttention(config, layer_idx)
        self.norm_2 = nn.LayerNorm(config.d_model, bias=False)

    def forward(self, x_BTD, cos_sin, mask, cache, start):
        h_BTD = self.attn(self.norm_1(x_BTD), cos_sin, mask, cache, start)
        x_BTD = x_BTD + F.dropout(h_BTD, self.resid_pdrop, self.training)
        return x_BTD, self.norm_2(x_BTD)


class DbrxBlock(nn.Module):
    def __init__(self, config: DbrxConfig, layer_idx: int):
        super().__init__()
        self.resid_pdrop = config.resid_pdrop
        self.norm_attn_norm = DbrxNormAttentionNorm(config, layer_idx)
        self.ffn = DbrxFFN(config)

    def forward(self, x_BTD, cos_sin, mask, cache, start):
        x_BTD, h_BTD = self.norm_attn_norm(x_BTD, cos_sin, mask, cache, start)
        h_BTD, router_logits_NE = self.ffn(h_BTD)
        return x_BTD + F.dropout(h_BTD, self.resid_pdrop, self.training), router_logits_NE


class DbrxModel(nn.Module):
    def __init__(self, config: DbrxConfig):
        super().__init__()
        # given its (empty) weight, nn.Embedding skips its own normal_ draw: init_weights draws every weight anyway,
        # and on the meta device (`dbrx info`'s plans) that draw imports torch's compiler stack, 2 s
        V, D = config.vocab_size, config.d_model
        self.wte = nn.Embedding(V, D, _weight=torch.empty(V, D))
        self.blocks = nn.ModuleList(DbrxBlock(config, i) for i in range(config.n_layers))
        self.norm_f = nn.LayerNorm(config.d_model, bias=False)


class DbrxForCausalLM(nn.Module):
    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.config = config
        self.transformer = DbrxModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # the dtype the blocks compute in where it is not the parameters' (set by dbrx.parallel under FSDP's mixed
        # precision: fp32 shards gathered in bf16); generate keeps its KV cache in it
        self.compute_dtype: torch.dtype | None = None
        # the whole batch-1 decode step compiled, installed from outside (dbrx.kernels.compile_decode): a
        # dbrx.kernels.DecodeStep, which dbrx.generate runs where it takes the step
        self.decode_step = None
        self.init_weights()

    def relayout_lm_head(self, column_major: bool = True) -> None:
        """Store lm_head.weight [V, D] column-major (a transposed view of a contiguous [D, V] tensor), or back
        to row-major.

        Shapes and state_dict are unchanged, but a batch-1 decode step then computes x @ W_DV instead of
        x @ W_VD.T, and the head is most of the bytes a step reads. Which is faster depends on the machine and
        dtype (fp32 on a Xeon: column-major streams about 15% more bytes/s; emulated bf16 on AVX2: row-major 9x),
        so loading measures it (dbrx.perf.column_major_head_is_faster). Training wants row-major: the fused
        AdamW kernel takes 5x longer on a non-contiguous parameter."""
        w = self.lm_head.weight
        if w.device.type == "meta" or (w.stride(0) == 1) == column_major:
            return
        with torch.inference_mode(False), torch.no_grad():  # a parameter, never an inference tensor
            data = w.t().contiguous().t() if column_major else w.contiguous()
            self.lm_head.weight = nn.Parameter(data, requires_grad=w.requires_grad)

    # ---- construction ---------------------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for the norms (as transformers initialises). Without
        a seed, in place from torch's global generator; with one, from initial_values(seed): the same values on
        any device, and in a sharded run at any world size."""
        if seed is None:
            with torch.no_grad():
                for p in self.parameters():
                    self._init_tensor(p)
            return
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in self.initial_values(seed):
                params[name].copy_(value)

    def initial_values(self, seed: int, names: list[str] | None = None):
        """(name, initial value) for each parameter (or those in `names`), drawn one at a time on the host from a
        CPU generator seeded with `seed`, in named_parameters() order. A sharded run keeps each rank's pieces of
        these (dbrx.parallel.init), so no rank holds the whole model."""
        generator = torch.Generator().manual_seed(seed)
        params = dict(self.named_parameters())
        for name in params if names is None else names:
            p = params[name]
            value = torch.empty(p.shape, dtype=p.dtype)
            self._init_tensor(value, generator)
            yield name, value

    def _init_tensor(self, t: torch.Tensor, generator: torch.Generator | None = None) -> None:
        if t.device.type == "meta":  # no values to draw
            return
        if t.ndim == 1:
            t.fill_(1.0)
        else:
            t.normal_(0.0, self.config.initializer_range, generator=generator)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu", device_map: str | dict | None = None,
                        max_memory: dict | None = None) -> "DbrxForCausalLM":
        """A checkpoint directory, on `device`; or with device_map ("auto" or {module name: device}) over several
        devices (dbrx.checkpoint.load_pretrained). As in transformers, dtype="auto" keeps the stored dtype (the
        default) and device_map may name one device ("cuda:0")."""
        from dbrx.checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        from dbrx.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)

    def set_attention_dtype(self, dtype: torch.dtype | None) -> None:
        """Run attention (SDPA) in `dtype`, casting q, k, v in and the output back; None: in the inputs' dtype.
        The trainer sets fp32 under bf16 autocast on a CPU where it measures fp32 attention to be faster."""
        for block in self.transformer.blocks:
            block.norm_attn_norm.attn.sdpa_dtype = dtype

    def set_moe_impl(self, impl: str) -> None:
        """"grouped" (default: sorted tokens, one contiguous group per expert) or "reference" (plain loop)."""
        if impl not in ("grouped", "reference"):
            raise ValueError(f"moe impl must be 'grouped' or 'reference', got {impl!r}")
        for block in self.transformer.blocks:
            block.ffn.impl = impl

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, start_pos: int = 0,
                output_router_logits: bool = False, last_only: bool = False) -> CausalLMOutput:
        """input_ids [B, T]. With a cache, the T tokens are written at slots start_pos .. start_pos+T-1.

        attention_mask [B, start_pos+T] (1 = real token, 0 = padding) covers cached and new slots, as in
        transformers; positions then restart at each row's first real token. `last_only` computes logits for
        the last position only (what generation needs from a prefill)."""
        x_BTD, router_logits = self.hidden_states(input_ids, attention_mask=attention_mask,
                                                  position_ids=position_ids, cache=cache, start_pos=start_pos)
        if last_only:
            x_BTD = x_BTD[:, -1:]
        logits = self.lm_head(x_BTD)
        if not output_router_logits:
            return CausalLMOutput(logits=logits)
        f = self.config.ffn_config
        T = input_ids.shape[1]
        aux = load_balancing_loss(router_logits, f.moe_num_experts, f.moe_top_k,
                                  None if attention_mask is None else attention_mask[:, -T:])
        return CausalLMOutput(logits=logits, aux_loss=aux, router_logits=tuple(router_logits))

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                      start_pos: int = 0, sequence_id: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final-norm hidden states [B, T, D] (what lm_head reads) and each layer's router logits.
        Training computes its loss from these in chunks, never materialising the full logits.

        sequence_id [B, T] (LLM Foundry's name) marks packed rows: each token's document index in its row, -1
        for padding. Attention then stays inside each document and positions restart at each document's
        start, so a packed example computes exactly what it would alone.

        attention_mask may also be a boolean [B, 1, T, S] (transformers' custom 4-D mask: query i sees key j where
        True) given with position_ids: scoring runs one shared context and all its continuations in one row. The
        server's slot cache (dbrx.serve.engine) takes one row that packs several requests' tokens, with their
        position_ids, and attends each request against its own slot."""
        B, T = input_ids.shape
        cfg = self.config
        custom = attention_mask is not None and attention_mask.ndim == 4
        if custom and (position_ids is None or start_pos or sequence_id is not None):
            raise ValueError("a 4-D attention_mask needs position_ids, and no start_pos or sequence_id")
        longest = int(position_ids.max()) + 1 if position_ids is not None else start_pos + T
        if longest > cfg.max_seq_len:
            raise ValueError(
                f"sequence of {longest} tokens is longer than the model's max_seq_len ({cfg.max_seq_len})"
            )
        x_BTD = F.dropout(self.transformer.wte(input_ids), cfg.emb_pdrop, self.training)
        if sequence_id is not None:
            if attention_mask is not None or cache is not None or start_pos:
                raise ValueError("sequence_id (packed rows) is for training and scoring: give it without "
                                 "attention_mask, cache or start_pos")
            if position_ids is None:
                position_ids = document_positions(sequence_id)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(start_pos, start_pos + T, device=input_ids.device)[None].expand(B, T)
        cos_sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.attn_config.rope_theta, x_BTD.dtype)
        mask = None
        if custom:
            mask = attention_mask.bool()
        elif sequence_id is not None:
            mask = document_mask(sequence_id)
        elif attention_mask is not None and not bool(attention_mask.all()):
            mask = causal_mask(attention_mask, start_pos, T, input_ids.device)

        router_logits = []
        for block in self.transformer.blocks:
            x_BTD, logits_NE = block(x_BTD, cos_sin, mask, cache, start_pos)
            router_logits.append(logits_NE)
        return self.transformer.norm_f(x_BTD), router_logits

    # ---- sizes ----------------------------------------------------------------------------------------------
    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those one token uses (top_k of the experts' weights)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        f = self.config.ffn_config
        expert = sum(p.numel() for b in self.transformer.blocks for p in b.ffn.experts.parameters())
        return total - expert + expert * f.moe_top_k // f.moe_num_experts
