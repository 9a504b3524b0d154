"""ProPy's per-layer computations on top of frozen open_clip blocks (their ln_1/attn/ln_2/mlp weights are reused).

Visual layer (official `ResidualAttentionBlock.forward`): frames attend within themselves (plus event prompts in the
`attn_*` ablations), an optional temporal adapter acts on the frame attention output, and the event prompts read
[events; visual prompts; frame tokens] through one masked attention whose keys and values are the *pre-adapter*
LayerNorm'd inputs of the layer. Two implementations give the same numbers:
- `faithful_visual_layer`: the official computation with `nn.MultiheadAttention` (keys and values re-projected for
  the event attention), the visual prompts replicated as copies, the frame tokens laid out token-major (t*Nf + f),
  the frame stream updated in every layer. Only work whose result is discarded is left out: the official code also
  runs the MLP (and ln_post @ proj) on the prompt copies and frame tokens whose outputs it drops;
- `fast_visual_layer`: one QKV projection shared by the frame and event attention, SDPA, one key per visual prompt
  with a log(copies) bias instead of identical copies, frame tokens frame-major, no frame update in the last layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn


class TemporalAdapter(nn.Module):
    """ST-Adapter on the frame attention output: patch tokens += fc2(depthwise temporal Conv3d(fc1(patches))).

    The CLS token is untouched; there is no activation. Zero-initialised conv and biases make it an identity at
    start. Parameter names (`fc1`, `conv`, `fc2`) follow the official `temp_adapter`.
    """

    def __init__(self, width: int, channels: int, kernel: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, channels)
        self.conv = nn.Conv3d(channels, channels, (kernel, 1, 1), padding=(kernel // 2, 0, 0), groups=channels)
        self.fc2 = nn.Linear(channels, width)
        for param in (self.conv.weight, self.conv.bias, self.fc1.bias, self.fc2.bias):
            nn.init.zeros_(param)

    def forward(self, attn_out: Tensor, num_frames: int) -> Tensor:
        """Adapt `attn_out` [B*Nf, T, D] (video-major rows b*Nf + f, so the conv stays inside one video)."""
        patches = attn_out[:, 1:]
        rows, count, _ = patches.shape
        grid = math.isqrt(count)
        y = self.fc1(patches).view(rows // num_frames, num_frames, grid, grid, -1).permute(0, 4, 1, 2, 3)
        y = self.conv(y).permute(0, 2, 3, 4, 1).reshape(rows, count, -1)
        return torch.cat([attn_out[:, :1], patches + self.fc2(y)], dim=1)


@dataclass(frozen=True)
class LayerMasks:
    """The attention masks of one model, built once (additive float: 0 allowed, -inf blocked; or bool).

    faithful_events: [Ne, Ne + Nvp*copies + T*Nf] over [events; prompt copies p*copies + j; frame tokens t*Nf + f].
    fast_events: [Ne, Ne + Nvp + Nf*T] over [events; prompts (log(copies) bias); frame tokens f*T + t].
    frame_events: [Nf, Ne] bool, which event prompts the tokens of each frame attend (attn-* ablations), or None.
    """

    faithful_events: Tensor
    fast_events: Tensor
    frame_events: Tensor | None
    prompt_copies: int


@dataclass
class VisualState:
    """The residual streams of one video batch: events [B, Ne, D] and frames [B*Nf, T, D] (video-major)."""

    events: Tensor
    frames: Tensor
    num_frames: int


def faithful_visual_layer(
    block: ResidualAttentionBlock,
    adapter: TemporalAdapter | None,
    state: VisualState,
    prompts: Tensor,
    masks: LayerMasks,
    need_weights: bool,
) -> tuple[VisualState, Tensor | None]:
    """One official visual layer; `prompts` [Nvp, D] are replicated `masks.prompt_copies` times (p-major).

    Returns the new state and, if asked, the head-averaged event attention [B, Ne, Ne + Nvp + T*Nf] with the copies
    of each prompt summed.
    """
    batch, nf = state.events.shape[0], state.num_frames
    tokens = state.frames.shape[1]
    events_ln, frames_ln = block.ln_1(state.events), block.ln_1(state.frames)
    copies = block.ln_1(prompts).repeat_interleave(masks.prompt_copies, dim=0).expand(batch, -1, -1)
    frame_out = _faithful_frame_attention(block, frames_ln, events_ln, masks.frame_events, nf)
    if adapter is not None:
        frame_out = adapter(frame_out, nf)
    frames_token_major = frames_ln.view(batch, nf, tokens, -1).transpose(1, 2).reshape(batch, tokens * nf, -1)
    keys = torch.cat([events_ln, copies, frames_token_major], dim=1)
    event_out, weights = block.attn(
        events_ln,
        keys,
        keys,
        attn_mask=masks.faithful_events.to(events_ln.dtype),
        need_weights=need_weights,
        average_attn_weights=True,
    )
    events = state.events + event_out
    frames = state.frames + frame_out
    events = events + block.mlp(block.ln_2(events))
    frames = frames + block.mlp(block.ln_2(frames))
    if weights is not None:
        num_events, num_prompts = events.shape[1], prompts.shape[0]
        prompt_part = weights[..., num_events : num_events + num_prompts * masks.prompt_copies]
        prompt_part = prompt_part.unflatten(-1, (num_prompts, masks.prompt_copies)).sum(-1)
        rest = weights[..., num_events + num_prompts * masks.prompt_copies :]
        weights = torch.cat([weights[..., :num_events], prompt_part, rest], dim=-1)
    return VisualState(events, frames, nf), weights


def _faithful_frame_attention(
    block: ResidualAttentionBlock, frames_ln: Tensor, events_ln: Tensor, frame_events: Tensor | None, nf: int
) -> Tensor:
    if frame_events is None:
        return block.attn(frames_ln, frames_ln, frames_ln, need_weights=False)[0]
    rows, tokens, _ = frames_ln.shape
    num_events = events_ln.shape[1]
    event_keys = events_ln.unsqueeze(1).expand(-1, nf, -1, -1).reshape(rows, num_events, -1)
    keys = torch.cat([frames_ln, event_keys], dim=1)
    allowed = torch.cat([frame_events.new_ones(nf, tokens), frame_events], dim=1)  # [Nf, T + Ne]
    allowed = allowed.repeat(rows // nf, 1).repeat_interleave(block.attn.num_heads, dim=0)  # row n*heads + h
    mask = torch.zeros(allowed.shape, dtype=frames_ln.dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)
    mask = mask.unsqueeze(1).expand(-1, tokens, -1)
    return block.attn(frames_ln, keys, keys, attn_mask=mask, need_weights=False)[0]


def fast_visual_layer(
    block: ResidualAttentionBlock,
    adapter: TemporalAdapter | None,
    state: VisualState,
    prompts: Tensor,
    masks: LayerMasks,
    need_weights: bool,
    update_frames: bool = True,
) -> tuple[VisualState, Tensor | None]:
    """One visual layer, same numbers as `faithful_visual_layer`, computed without redundant work.

    `update_frames=False` (the last layer: its frame outputs are never read) skips the frame attention, adapter and
    MLP and returns the frames unchanged. Attention weights (if asked) come back in the faithful layout
    [B, Ne, Ne + Nvp + T*Nf] (frames token-major).
    """
    attn = block.attn
    heads = attn.num_heads
    batch, num_events, width = state.events.shape
    nf = state.num_frames
    rows, tokens, _ = state.frames.shape
    head_dim = width // heads
    events_ln, frames_ln, prompts_ln = block.ln_1(state.events), block.ln_1(state.frames), block.ln_1(prompts)
    kv_weight, kv_bias = attn.in_proj_weight[width:], attn.in_proj_bias[width:]
    qkv_e = F.linear(events_ln, attn.in_proj_weight, attn.in_proj_bias)
    q_e, k_e, v_e = qkv_e.view(batch, num_events, 3, heads, head_dim).unbind(2)
    k_p, v_p = F.linear(prompts_ln, kv_weight, kv_bias).view(-1, 2, heads, head_dim).unbind(1)
    frames = state.frames
    if update_frames:  # one QKV projection of the frame tokens, shared by the frame and the event attention
        qkv_f = F.linear(frames_ln, attn.in_proj_weight, attn.in_proj_bias)
        q_f, k_f, v_f = qkv_f.view(rows, tokens, 3, heads, head_dim).unbind(2)
        frames = frames + _fast_frame_attention(attn, adapter, q_f, k_f, v_f, k_e, v_e, masks, nf)
        frames = frames + block.mlp(block.ln_2(frames))
    else:
        k_f, v_f = F.linear(frames_ln, kv_weight, kv_bias).view(rows, tokens, 2, heads, -1).unbind(2)

    def video_major(x: Tensor) -> Tensor:  # [B*Nf, T, h, d] -> [B, h, Nf*T, d]
        return x.reshape(batch, nf * tokens, heads, head_dim).transpose(1, 2)

    keys = torch.cat([k_e.transpose(1, 2), k_p.transpose(0, 1).expand(batch, -1, -1, -1), video_major(k_f)], dim=2)
    values = torch.cat([v_e.transpose(1, 2), v_p.transpose(0, 1).expand(batch, -1, -1, -1), video_major(v_f)], dim=2)
    bias = masks.fast_events.to(q_e.dtype)
    queries = q_e.transpose(1, 2)
    weights = None
    if need_weights:
        probs = torch.softmax(queries @ keys.transpose(-1, -2) / math.sqrt(head_dim) + bias, dim=-1)
        event_out = probs @ values
        weights = probs.mean(1)
        frame_part = weights[..., -nf * tokens :].unflatten(-1, (nf, tokens)).transpose(-1, -2).flatten(-2)
        weights = torch.cat([weights[..., : -nf * tokens], frame_part], dim=-1)
    else:
        event_out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias)
    event_out = event_out.transpose(1, 2).reshape(batch, num_events, width)
    events = state.events + F.linear(event_out, attn.out_proj.weight, attn.out_proj.bias)
    events = events + block.mlp(block.ln_2(events))
    return VisualState(events, frames, nf), weights


def _fast_frame_attention(
    attn: nn.MultiheadAttention,
    adapter: TemporalAdapter | None,
    q_f: Tensor,
    k_f: Tensor,
    v_f: Tensor,
    k_e: Tensor,
    v_e: Tensor,
    masks: LayerMasks,
    nf: int,
) -> Tensor:
    """Block-diagonal (per frame) SDPA of the frame tokens [B*Nf, T, h, d], plus event keys in the attn-* modes."""
    rows, tokens, heads, head_dim = q_f.shape
    frame_keys, frame_values, frame_mask = k_f.transpose(1, 2), v_f.transpose(1, 2), None
    if masks.frame_events is not None:
        frame_keys = torch.cat([frame_keys, _per_frame(k_e, nf)], dim=2)
        frame_values = torch.cat([frame_values, _per_frame(v_e, nf)], dim=2)
        allowed = torch.cat([masks.frame_events.new_ones(nf, tokens), masks.frame_events], dim=1)
        frame_mask = allowed.repeat(rows // nf, 1)[:, None, None, :]
    out = F.scaled_dot_product_attention(q_f.transpose(1, 2), frame_keys, frame_values, attn_mask=frame_mask)
    out = F.linear(
        out.transpose(1, 2).reshape(rows, tokens, heads * head_dim), attn.out_proj.weight, attn.out_proj.bias
    )
    return adapter(out, nf) if adapter is not None else out


def _per_frame(event_part: Tensor, nf: int) -> Tensor:
    """[B, Ne, h, d] event keys/values to [B*Nf, h, Ne, d], one copy per frame of the same video."""
    batch, num_events, heads, head_dim = event_part.shape
    per_frame = event_part.transpose(1, 2).unsqueeze(1).expand(-1, nf, -1, -1, -1)
    return per_frame.reshape(batch * nf, heads, num_events, head_dim)
