"""ProPy (EMNLP 2025): interactive prompt pyramids on a frozen open_clip CLIP, with every ablation of the paper.

Build it through the registry::

    clip, arch = load_clip("weights/ViT-B-32.safetensors")
    model = build_model("propy", clip=clip, arch=arch, config=ProPyConfig.preset("propy"))
    videos = model.encode_videos(frames)              # [B, Nf, 3, H, W] normalised -> [B, Ne, E]
    queries = model.encode_queries(tokenize(captions, max_words=32))
    logits = model.similarity(queries, videos)        # [Nt, B] = exp(logit_scale) * max_e cos
    loss, t2v, v2t = propy_loss(logits, text_labels)

The CLIP is held as `model.clip` and stays frozen; its blocks' ln/attn/mlp weights are reused, never copied.
Trainable: event prompts [Ne, Dv], deep visual prompts [layers, Nvp, Dv], the prefix/postfix projections
(Dv -> Dt) and one temporal adapter per visual layer. Defaults reproduce the official code, including its defects
(see `postfix_fix` and `normalize_eval`); the project's notes on the official code (BUAAPY/ProPy) describe it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from stages.data.config import config_from_dict
from stages.data.errors import PipelineError
from stages.models.clip_backbone import ClipArch
from stages.models.propy_blocks import (
    LayerMasks,
    TemporalAdapter,
    VisualState,
    faithful_visual_layer,
    fast_visual_layer,
)
from stages.models.pyramid import EventInteraction, Pyramid, PyramidConfig, additive_mask
from stages.models.registry import register_model

FrameUpdate = Literal["adapter", "orig", "attn_pyr", "attn_whole", "attn_adapter"]
PromptCopy = Literal["l1", "none", "events"]
EventFrameArea = Literal["segment", "all"]


@dataclass(frozen=True)
class ProPyConfig:
    """ProPy's structure and every ablation switch of the paper (defaults: the official model).

    Ablations (paper section 4.3):
    - Table 4, pyramid: `pyramid` (Nf and H, or the offset form).
    - Table 5, event-event interaction area `event_interaction`: AD ancestors+descendants (ProPy), A ancestors,
      D descendants, P parents, C children, PC parents+children, W all events, S self only. Self is always kept.
    - Table 6, frame-token update `frame_update`: adapter (ProPy: temporal adapter on the frame attention output),
      orig (plain CLIP frame attention), attn_pyr (frame tokens also attend the event prompts whose segment holds
      the frame, mask M_f^e), attn_whole (frame tokens also attend every event prompt, DGL-style), attn_adapter
      (attn_pyr plus the adapter).
    - Table 7, MIL levels `mil_levels`: the pyramid layers (1 = bottom) whose events enter the max; () = all.
      `encode_videos` returns those events only, and `proposals` their windows.
    - Table 8, visual-prompt operation `visual_prompt_copy`: l1 = C(L1) (ProPy: Nvp prompts copied n1 times, an
      event uses the copies of the bottom events inside its segment), none = no-copy (every event sees the Nvp
      prompts once), events = C(E) (copied Ne times, one copy per event; an event uses the copies of the events it
      is related to by span containment, the C(L1) rule extended to all layers). Copies are identical, so a copy
      count m only adds log(m) to that prompt's attention logit; an event seeing one copy is exactly no-copy.
    - Table 9 toggles: AD <-> event_interaction AD/S, adapter <-> frame_update adapter/orig, C(L1) <->
      visual_prompt_copy l1/none (presets `table9_a` ... `table9_h`).
    Presets: see `PRESETS` (`ProPyConfig.preset("dgl_mil")` is the DGL-MIL baseline of Table 2).
    """

    pyramid: PyramidConfig = field(default_factory=PyramidConfig)  # Nf and H (paper default: 32 frames, 42 events)
    num_visual_prompts: int = 4  # Nvp: visual prompts per ViT layer (also the text prefix and postfix lengths)
    adapter_channels: int = 384  # temporal adapter bottleneck width (official: 384 for ViT-B/32)
    adapter_kernel: int = 5  # temporal kernel of the adapter conv (official: 5 for TVR/ActivityNet/QVH, 3 Charades)
    event_interaction: EventInteraction = "AD"  # Table 5: which events an event prompt attends (AD = ProPy)
    event_frame_area: EventFrameArea = "segment"  # event prompts attend the frames of their segment, or all frames
    frame_update: FrameUpdate = "adapter"  # Table 6: how frame tokens are updated (adapter = ProPy)
    visual_prompt_copy: PromptCopy = "l1"  # Table 8: C(L1) = l1 (ProPy), no-copy = none, C(E) = events
    mil_levels: tuple[int, ...] = ()  # Table 7: pyramid layers used in the MIL max (1 = bottom); () = all layers
    postfix_fix: bool = False  # official defect: postfix text prompts are dead; True inserts them before EOT
    normalize_eval: bool = True  # False = official ActivityNet evaluation (event features not L2-normalised)
    fast_path: bool = True  # shared QKV + SDPA + log-bias prompts (same numbers); False = the official computation
    grad_checkpointing: bool = False  # recompute each visual layer in backward (less memory, ~30% more time)

    def __post_init__(self) -> None:
        if self.num_visual_prompts < 1 or self.adapter_channels < 1:
            raise PipelineError("propy: num_visual_prompts and adapter_channels must be positive")
        if self.adapter_kernel < 1 or self.adapter_kernel % 2 == 0:
            raise PipelineError(f"propy: adapter_kernel must be a positive odd number, got {self.adapter_kernel}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ProPyConfig:
        """A named configuration (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise PipelineError(f"unknown ProPy preset {name!r}; available: {sorted(PRESETS)}")
        return replace(cls(), **{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "propy config") -> ProPyConfig:
        """Build from a (JSON/YAML) mapping, e.g. a checkpoint's `model_config` or params.yaml's `model:`."""
        return config_from_dict(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able mapping that `from_dict` turns back into this config."""
        return _lists(asdict(self))


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_lists(v) for v in value]
    return value


_TABLE9 = {
    f"table9_{row}": {
        "event_interaction": "AD" if interaction else "S",
        "frame_update": "adapter" if adapter else "orig",
        "visual_prompt_copy": "l1" if copy_l1 else "none",
    }
    for row, (interaction, adapter, copy_l1) in zip(
        "abcdefgh",
        [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)],
        strict=True,
    )
}
PRESETS: dict[str, dict[str, Any]] = {
    "propy": {},  # the paper's model (Table 9 row h)
    # DGL-MIL (paper Table 2): DGL's global prompts expanded to Ne and all used in the MIL max; every prompt attends
    # every frame and every other prompt, sees the Nvp visual prompts once, and frame tokens attend all prompts
    # (DGL-style frame update, no adapter). Built from the ProPy paper's one-line description, not DGL's code.
    "dgl_mil": {
        "event_interaction": "W",
        "event_frame_area": "all",
        "visual_prompt_copy": "none",
        "frame_update": "attn_whole",
    },
    "official_activitynet": {"normalize_eval": False},  # the published ActivityNet PRVR evaluation
    "fixed": {"postfix_fix": True, "normalize_eval": True},  # both documented defects fixed (changes the model)
    **_TABLE9,
}


class ProPy(nn.Module):
    """ProPy on an open_clip CLIP (OpenAI layout, sequence of `ResidualAttentionBlock`s with batch-first MHA)."""

    def __init__(self, clip: CLIP, arch: ClipArch, config: ProPyConfig) -> None:
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.arch, self.config = arch, config
        self.pyramid = pyramid = Pyramid(config.pyramid)
        bad_levels = sorted(set(config.mil_levels) - set(range(1, pyramid.num_levels + 1)))
        if bad_levels:
            raise PipelineError(f"propy: mil_levels {bad_levels} are not pyramid layers 1..{pyramid.num_levels}")
        width, layers, nvp = arch.vision_width, arch.vision_layers, config.num_visual_prompts
        bound = math.sqrt(6.0 / (3 * arch.patch_size**2 + width))  # the official uniform init of both prompt sets
        self.event_prompts = nn.Parameter(torch.empty(pyramid.num_events, width).uniform_(-bound, bound))
        self.visual_prompts = nn.Parameter(torch.empty(layers, nvp, width).uniform_(-bound, bound))
        self.prefix_proj = nn.Linear(width, arch.text_width)
        self.postfix_proj = nn.Linear(width, arch.text_width)
        with_adapter = config.frame_update in ("adapter", "attn_adapter")
        self.adapters = nn.ModuleList(
            [TemporalAdapter(width, config.adapter_channels, config.adapter_kernel) for _ in range(layers)]
            if with_adapter
            else []
        )
        self._register_masks()
        levels = config.mil_levels or tuple(range(1, pyramid.num_levels + 1))
        mil_index = np.flatnonzero(np.isin(pyramid.level_of_event, levels))
        self.register_buffer("mil_index", torch.from_numpy(mil_index), persistent=False)
        self.register_buffer("proposals", torch.from_numpy(pyramid.proposals[mil_index]), persistent=False)

    def _register_masks(self) -> None:
        pyramid, config = self.pyramid, self.config
        tokens, nvp = self.arch.tokens_per_frame, config.num_visual_prompts
        ne, nf = pyramid.num_events, pyramid.num_frames
        events = pyramid.event_interaction(config.event_interaction)
        frames = pyramid.event_frame_allowed if config.event_frame_area == "segment" else np.ones((ne, nf), bool)
        copies = {
            "l1": pyramid.event_l1_allowed,
            "events": pyramid.event_event_allowed,
            "none": np.ones((ne, 1), bool),
        }[config.visual_prompt_copy]
        faithful = np.concatenate([events, np.tile(copies, (1, nvp)), np.tile(frames, (1, tokens))], axis=1)
        count = copies.sum(axis=1, keepdims=True)
        prompt_bias = np.where(count > 0, np.log(np.maximum(count, 1)), -np.inf).astype(np.float32)
        fast = np.concatenate(
            [
                additive_mask(events),
                np.repeat(prompt_bias, nvp, axis=1),
                additive_mask(np.repeat(frames, tokens, axis=1)),
            ],
            axis=1,
        )
        frame_events = {"attn_pyr": frames.T, "attn_adapter": frames.T, "attn_whole": np.ones((nf, ne), bool)}
        chosen = frame_events.get(config.frame_update)
        self.register_buffer("faithful_mask", torch.from_numpy(additive_mask(faithful)), persistent=False)
        self.register_buffer("fast_mask", torch.from_numpy(fast), persistent=False)
        self.register_buffer(
            "frame_event_mask", None if chosen is None else torch.from_numpy(chosen.copy()), persistent=False
        )
        self.prompt_copies = copies.shape[1]

    def train(self, mode: bool = True) -> ProPy:
        """Set train/eval mode; the frozen CLIP always stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    # ---------------------------------------------------------------------------------------------------------
    # Visual branch
    # ---------------------------------------------------------------------------------------------------------

    def forward_visual(self, frames: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Event features of ALL events [B, Ne, E] (top layer first) and, if asked, the event attention maps.

        Attention maps: [layers, B, Ne, Ne + Nvp + T*Nf], head-averaged, columns [events; visual prompts (copies
        summed); frame tokens t*Nf + f (token-major, as the official maps)]. Asking for them does not change the
        features and costs nothing when not asked.
        """
        batch, nf = frames.shape[:2]
        size = self.arch.image_size
        if nf != self.pyramid.num_frames or tuple(frames.shape[2:]) != (3, size, size):
            raise PipelineError(
                f"propy expects frames [B, {self.pyramid.num_frames}, 3, {size}, {size}], got {tuple(frames.shape)}"
            )
        visual = self.clip.visual
        frame_tokens = visual._embeds(frames.flatten(0, 1))  # conv, CLS, positions, ln_pre (open_clip 3.x)
        state = VisualState(self.event_prompts.to(frame_tokens.dtype).expand(batch, -1, -1), frame_tokens, nf)
        masks = LayerMasks(self.faithful_mask, self.fast_mask, self.frame_event_mask, self.prompt_copies)
        blocks = visual.transformer.resblocks
        checkpointing = self.config.grad_checkpointing and torch.is_grad_enabled() and not need_weights
        maps = []
        for index, block in enumerate(blocks):
            if self.config.fast_path:  # the last layer's frame outputs are never read: skip them
                layer_fn = partial(fast_visual_layer, update_frames=index < len(blocks) - 1)
            else:
                layer_fn = faithful_visual_layer
            layer = partial(
                layer_fn,
                block,
                self.adapters[index] if len(self.adapters) else None,
                prompts=self.visual_prompts[index].to(frame_tokens.dtype),
                masks=masks,
                need_weights=need_weights,
            )
            if checkpointing:
                state = _checkpointed(layer, state)
            else:
                state, weights = layer(state)
                maps.append(weights)
        features = visual.ln_post(state.events) @ visual.proj
        return features, torch.stack(maps) if need_weights else None

    def encode_videos(self, frames: Tensor) -> Tensor:
        """CLIP-normalised frames [B, Nf, 3, H, W] -> event features [B, Ne', E] (not normalised) of the MIL
        events (`mil_levels`; all Ne by default), top layer first; `proposals` gives their windows."""
        features, _ = self.forward_visual(frames)
        if len(self.mil_index) == self.pyramid.num_events:
            return features
        return features[:, self.mil_index]

    # ---------------------------------------------------------------------------------------------------------
    # Text branch
    # ---------------------------------------------------------------------------------------------------------

    def encode_queries(self, text_ids: Tensor) -> Tensor:
        """Token ids [Nt, L] (SOT ... EOT, 0-padded; `clip_backbone.tokenize`) -> query features [Nt, E].

        Every text layer l < vision layers runs on [SOT, prefix_l, tokens[1:], postfix_l] with the causal mask over
        the whole prompted sequence; prefix_l/postfix_l project the visual prompts of layer l. Officially the
        postfix comes after the padding, where no token can see it (dead); `postfix_fix` puts it before EOT.
        """
        clip = self.clip
        num, length = text_ids.shape
        if length > self.arch.context_length:
            raise PipelineError(
                f"captions have {length} tokens, more than the context length {self.arch.context_length}"
            )
        if int(text_ids.max()) >= self.arch.vocab_size:
            raise PipelineError(
                f"token id {int(text_ids.max())} is outside this CLIP's vocabulary of {self.arch.vocab_size} tokens "
                "(captions are tokenised with the CLIP BPE of 49408 tokens)"
            )
        x = clip.token_embedding(text_ids) + clip.positional_embedding[:length]
        eot = text_ids.argmax(dim=-1)
        token_pos, source = self._text_layout(eot, length)
        size = source.shape[1]
        causal = torch.full((size, size), -math.inf, device=x.device, dtype=x.dtype).triu_(1)
        prefixes = self.prefix_proj(self.visual_prompts).to(x.dtype)
        postfixes = self.postfix_proj(self.visual_prompts).to(x.dtype)
        width = x.shape[-1]
        for index, block in enumerate(clip.transformer.resblocks):
            if index >= len(prefixes):
                x = block(x, attn_mask=causal[:length, :length])
                continue
            pieces = [x, prefixes[index].expand(num, -1, -1), postfixes[index].expand(num, -1, -1)]
            sequence = torch.cat(pieces, dim=1).gather(1, source.unsqueeze(-1).expand(-1, -1, width))
            sequence = block(sequence, attn_mask=causal)
            x = sequence.gather(1, token_pos.unsqueeze(-1).expand(-1, -1, width))
        x = clip.ln_final(x)
        return x[torch.arange(num, device=x.device), eot] @ clip.text_projection

    def _text_layout(self, eot: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Where each token goes in the prompted sequence ([Nt, L]) and, per sequence position, which element of
        [tokens (L); prefix (n); postfix (n)] it holds ([Nt, L + 2n])."""
        n, num, device = self.config.num_visual_prompts, eot.shape[0], eot.device
        positions = torch.arange(length, device=device).expand(num, -1)
        postfix_start = eot[:, None] if self.config.postfix_fix else torch.full_like(eot[:, None], length)
        shift = torch.where(positions >= postfix_start, 2 * n, n).masked_fill(positions == 0, 0)
        token_pos = positions + shift
        prompt_slots = torch.arange(n, device=device)
        source = torch.empty(num, length + 2 * n, dtype=torch.long, device=device)
        source.scatter_(1, token_pos, positions)
        source[:, 1 : 1 + n] = length + prompt_slots
        source.scatter_(1, postfix_start + n + prompt_slots, (length + n + prompt_slots).expand(num, -1))
        return token_pos, source

    # ---------------------------------------------------------------------------------------------------------
    # Matching
    # ---------------------------------------------------------------------------------------------------------

    def event_scores(self, queries: Tensor, videos: Tensor) -> Tensor:
        """Cosine similarity of every query with every event: [Nt, E] x [B, Ne, E] -> [Nt, B, Ne] (fp32).

        Event features are L2-normalised unless the model is in eval mode with `normalize_eval=False`.
        """
        queries = F.normalize(queries.float(), dim=-1)
        videos = videos.float()
        if self.training or self.config.normalize_eval:
            videos = F.normalize(videos, dim=-1)
        return torch.einsum("td,bed->tbe", queries, videos)

    def similarity(
        self, queries: Tensor, videos: Tensor, return_best_event: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """MIL logits [Nt, B] = exp(logit_scale) * max over events of the cosine similarity (paper Eq. 10);
        with `return_best_event`, also the argmax event [Nt, B] (an index into `proposals`)."""
        best, index = self.event_scores(queries, videos).max(dim=-1)
        logits = self.clip.logit_scale.exp().float() * best
        return (logits, index) if return_best_event else logits

    # ---------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ---------------------------------------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trainable parameters (everything but the frozen `clip.*`), detached."""
        return {name: value.detach() for name, value in self.state_dict().items() if not name.startswith("clip.")}

    def dead_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters whose gradient is always zero: the postfix projection while its prompts are dead
        (`postfix_fix=False`) and the last layer's adapter, whose frame outputs nothing reads (the official code
        still trains both, so weight decay shrinks their weights)."""
        dead = [] if self.config.postfix_fix else list(self.postfix_proj.parameters())
        return dead + (list(self.adapters[-1].parameters()) if len(self.adapters) else [])

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load `trainable_state_dict()` output; every trainable parameter must be present with its shape."""
        expected = self.trainable_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            raise PipelineError(
                f"ProPy parameters do not match this config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"wrong shape {wrong[:5]}"
            )
        self.load_state_dict(state, strict=False)


def _checkpointed(layer: Callable[[VisualState], tuple[VisualState, Tensor | None]], state: VisualState) -> VisualState:
    """Run one visual layer under activation checkpointing (recomputed in backward)."""

    def run(events: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        out, _ = layer(VisualState(events, frames, state.num_frames))
        return out.events, out.frames

    events, frames = checkpoint(run, state.events, state.frames, use_reentrant=False)
    return VisualState(events, frames, state.num_frames)


def propy_loss(logits: Tensor, text_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The official symmetric InfoNCE with multiple captions per video: (loss, t2v, v2t).

    t2v = mean_t [logsumexp_v s(t, v) - s(t, y_t)]; v2t = mean_v [logsumexp_t s(t, v) - logsumexp_{t: y_t = v}
    s(t, v)] (all captions of a video form its positive term); loss = (t2v + v2t) / 2. Every video of the batch
    needs at least one caption.
    """
    logits = logits.float()
    videos = torch.arange(logits.shape[1], device=logits.device)
    positive = text_labels[:, None] == videos[None, :]
    if not bool(positive.any(dim=0).all()):
        raise ValueError("propy_loss: every video of the batch needs at least one caption")
    t2v = (torch.logsumexp(logits, dim=1) - logits.gather(1, text_labels[:, None]).squeeze(1)).mean()
    v2t = (torch.logsumexp(logits, dim=0) - torch.logsumexp(logits.masked_fill(~positive, -math.inf), dim=0)).mean()
    return (t2v + v2t) / 2, t2v, v2t


@register_model("propy", config=ProPyConfig, inputs="frames")
def build_propy(clip: CLIP, arch: ClipArch, config: ProPyConfig | None = None) -> ProPy:
    """ProPy on the frozen `clip` (built by `load_clip`) with `config` (default: the paper's model)."""
    return ProPy(clip, arch, config or ProPyConfig())
