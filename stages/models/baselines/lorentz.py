"""HLFormer's Lorentz-model (hyperbolic) maths: its manifold on geoopt, its attention, and the entailment cones.

**The manifold.** `HLFormerLorentz` is geoopt's `Lorentz` manifold (the official code subclasses it too): geoopt
holds the frozen curvature parameter `k` (state-dict key `manifold.k`) and supplies the projection onto the
hyperboloid <x, x>_L = -k (`projx`) and the Minkowski product <a, b>_L = -a_0 b_0 + sum_r a_r b_r (`inner`).
Where the official maths departs from geoopt's, only the departure is written here:

- `expmap0` ignores k: `space = sinh(min(n, 10)) * (u / n)` with `n = sqrt(max(|u|^2, 1e-9))` (geoopt scales by
  sqrt(k) and neither clamps the norm at 10 nor at 1e-9); the time coordinate then comes from geoopt's `projx`,
  which does use k;
- `mid_point` (the Lorentzian centroid, not in geoopt) normalises to <m, m>_L = -1, whatever k;
- `logmap0` ignores k too and divides by sqrt(alpha^2 - 1) of the time coordinate alpha, not by the norm of the
  space part (geoopt). The two agree on the unit hyperboloid, but the official code applies the log map to the
  **concatenation of all heads' midpoints**, one point whose time is head 0's: the other heads' time coordinates
  pass through as ordinary components (fixture README §14.4 step 6, §14.11 point 2), and only this formula gives
  the official tangent there.
- `cinner`: the [.., Lq, Lk] matrix of Minkowski products (geoopt has only the elementwise `inner`).

**The entailment cones** (MERU's parametrisation: curvature c = exp(`curv`), points stored as their space
components): `oxy_angle` lifts the points with geoopt's projection (k = 1/c) and takes geoopt's Minkowski product;
`half_aperture` needs only the space norm. `exp_map0` is written out: it equals geoopt's `expmap0` with k = 1/c, but
the official code clamps the sinh input to [1e-8, asinh(2^15)] (it saturates beyond a radius of 11.09, which a
query vector of the official size, norm about sqrt(384), reaches as `exp(textual_alpha)` nears its bound 1), and
geoopt does not clamp.

geoopt's projection computes |x|^2 as `norm(x) ** 2` where the official code sums the squares: in float32 this moves
the fixture's Lorentz tangents by up to 2e-5 and the encodings by up to 5e-6 (rounding; a summed square would be
bitwise identical), well inside the 1e-4 of the reference check.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from stages.models.baselines.layers import InputProjection

with warnings.catch_warnings():  # geoopt compiles its maths with the deprecated torch.jit.script
    warnings.simplefilter("ignore", FutureWarning)
    from geoopt.manifolds import Lorentz
    from geoopt.manifolds.lorentz import math as lorentz_math

EXPMAP0_MAX_NORM = 10.0
EXPMAP0_MIN_SQUARED_NORM = 1e-9
MIDPOINT_MIN_SQUARED_NORM = 1e-8
ACOSH_MIN_ARGUMENT = 1 + 1e-8  # exactly 1 in float32
ACOSH_MIN_SQUARED = 1e-9
LORENTZ_MASK_FILL = -1e18  # attention logits of padded keys (replaced, not added)
LORENTZ_TIME_OFFSET = 1.1  # LorentzLinear: time = sigmoid(y_0) * exp(scale) + 1.1
ENTAILMENT_EPS = 1e-8
SINH_MAX_INPUT = math.asinh(2**15)


class HLFormerLorentz(Lorentz):
    """geoopt's Lorentz manifold with the official (k-free) exponential map, midpoint and log map at the origin."""

    def expmap0(self, u: torch.Tensor, *, project: bool = True, dim: int = -1) -> torch.Tensor:
        """Point of the tangent vector `u` at the origin (time coordinate 0 in front), then geoopt's projection."""
        norm = self.inner(None, u, dim=dim).unsqueeze(dim).clamp_min(EXPMAP0_MIN_SQUARED_NORM).sqrt()
        point = torch.sinh(norm.clamp_max(EXPMAP0_MAX_NORM)) * (u / norm)
        return self.projx(point, dim=dim) if project else point

    def logmap0(self, y: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
        """Tangent vector at the origin of `y`, from its time coordinate alone (first component 0)."""
        time = y.narrow(dim, 0, 1)
        clamped = time.clamp_min(ACOSH_MIN_ARGUMENT)
        distance = torch.log(clamped + (clamped * clamped - 1).clamp_min(ACOSH_MIN_SQUARED).sqrt())
        space = distance / (time * time - 1).sqrt() * y.narrow(dim, 1, y.shape[dim] - 1)
        return torch.cat([torch.zeros_like(time), space], dim=dim)

    def cinner(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[..., Lx, Ly] Minkowski products of the rows of `x` [..., Lx, d] with those of `y` [..., Ly, d]."""
        flipped = torch.cat([-x[..., :1], x[..., 1:]], dim=-1)
        return flipped @ y.transpose(-1, -2)

    def mid_point(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted Lorentzian centroid `a / sqrt(|<a, a>_L|)`, a = weights @ values (rows of `weights` sum to 1)."""
        average = weights @ values
        squared = self.inner(None, average).unsqueeze(-1).abs().clamp_min(MIDPOINT_MIN_SQUARED_NORM)
        return average / squared.sqrt()


class LorentzLinear(nn.Module):
    """Fully hyperbolic linear map (the official `LorentzLinear`, no bias) whose output is split into heads.

    `y = p W^T` is viewed as [..., heads, d_h]; per head the time becomes `sigmoid(y_0) exp(scale) + 1.1` and the
    space part is rescaled so that the head lies on the hyperboloid <z, z>_L = -k.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float, manifold: HLFormerLorentz) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = nn.Parameter(torch.tensor(2.3))
        self.manifold = manifold
        self.weight = nn.Linear(dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """[B, L, d_M] points -> [B, L, heads, d_h] points on the hyperboloid, head by head."""
        y = self.weight(self.dropout(points))
        y = y.view(*y.shape[:-1], self.num_heads, -1)
        space = y[..., 1:]
        time = y[..., :1].sigmoid() * self.scale.exp() + LORENTZ_TIME_OFFSET
        rescale = (time * time - self.manifold.k) / (space * space).sum(dim=-1, keepdim=True)
        return torch.cat([time, space * rescale.sqrt()], dim=-1)


class LorentzMultiHeadAttention(nn.Module):
    """Hyperbolic multi-head self-attention (the official `LorentzMultiHeadedAttention`).

    Logits `(2 + 2 <q_i, k_j>_L) / scale + bias` (times the Gaussian mask when given; padded keys replaced by -1e18),
    softmax over keys, and per head the Lorentzian centroid of the values. No dropout on the attention weights (the
    official module defines one but never applies it).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float, manifold: HLFormerLorentz) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Lorentz model dimension {dim} is not a multiple of {num_heads} heads")
        self.scale = nn.Parameter(torch.tensor([math.sqrt(dim)]))
        self.bias = nn.Parameter(torch.zeros(()))
        self.manifold = manifold
        self.linear_keys = LorentzLinear(dim, num_heads, dropout, manifold)
        self.linear_values = LorentzLinear(dim, num_heads, dropout, manifold)
        self.linear_query = LorentzLinear(dim, num_heads, dropout, manifold)

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None, gauss: torch.Tensor | None) -> torch.Tensor:
        """[B, L, d_M] points, key mask [B, L] -> [B, L, d_M] midpoints of the heads, concatenated head-major."""
        keys, values, queries = (
            layer(points).transpose(1, 2) for layer in (self.linear_keys, self.linear_values, self.linear_query)
        )
        logits = (2 + 2 * self.manifold.cinner(queries, keys)) / self.scale + self.bias
        if gauss is not None:
            logits = logits * gauss
        if mask is not None:
            logits = logits.masked_fill(mask[:, None, None, :] == 0, LORENTZ_MASK_FILL)
        midpoints = self.manifold.mid_point(values, torch.softmax(logits, dim=-1))
        return midpoints.transpose(1, 2).flatten(2)


class LorentzSelfAttention(nn.Module):
    """The attention of HLFormer's Lorentz branches (the official `LorentzSelfAttention`), D -> D.

    `u = InputProj(x) exp(min(scale_alpha, 0))` (D -> d_L), mapped to the hyperboloid (`expmap0`), hyperbolic
    attention, log map of the concatenated heads (its d_L space components), `/ exp(scale_alpha)`, `OutputProj`
    (d_L -> D). The forward clamps `scale_alpha` to <= 0 in place, as officially.
    """

    def __init__(
        self, dim: int, lorentz_dim: int, num_heads: int, dropout: float, manifold: HLFormerLorentz, eps: float
    ) -> None:
        super().__init__()
        self.scale_alpha = nn.Parameter(torch.tensor(lorentz_dim**-0.5).log())
        self.input_proj = InputProjection(dim, lorentz_dim, dropout, eps)
        self.lorentz_multiattention = LorentzMultiHeadAttention(lorentz_dim + 1, num_heads, dropout, manifold)
        self.manifold = manifold
        self.output_proj = InputProjection(lorentz_dim, dim, dropout, eps)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        gauss: torch.Tensor | None,
        context: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, L, D], key mask [B, L], Gaussian [L, L] -> [B, L, D]; self-attention only (the `TransformerLayer`
        attention interface: no context, no key bias)."""
        if context is not None or key_bias is not None:
            raise ValueError("the Lorentz attention is self-attention without a key bias")
        self.scale_alpha.data.clamp_(max=0.0)
        scale = self.scale_alpha.exp()
        tangent = F.pad(self.input_proj(x) * scale, (1, 0))
        midpoints = self.lorentz_multiattention(self.manifold.expmap0(tangent), mask, gauss)
        return self.output_proj(self.manifold.logmap0(midpoints)[..., 1:] / scale)


def exp_map0(x: torch.Tensor, curv: torch.Tensor) -> torch.Tensor:
    """MERU's exponential map at the origin of the hyperboloid of curvature -c: the space components only."""
    radius = curv.sqrt() * torch.norm(x, dim=-1, keepdim=True)
    sinh_input = radius.clamp(min=ENTAILMENT_EPS, max=SINH_MAX_INPUT)
    return torch.sinh(sinh_input) * x / radius.clamp_min(ENTAILMENT_EPS)


def lift(x: torch.Tensor, curv: torch.Tensor) -> torch.Tensor:
    """The point [x_0, x] of the hyperboloid of curvature -c with space components x (geoopt's projection)."""
    return lorentz_math.project(F.pad(x, (1, 0)), k=1 / curv)


def oxy_angle(x: torch.Tensor, y: torch.Tensor, curv: torch.Tensor) -> torch.Tensor:
    """Exterior angle at x of the triangle (origin, x, y), per row of the space components x, y [..., D]."""
    x_point, y_point = lift(x, curv), lift(y, curv)
    product = curv * lorentz_math.inner(x_point, y_point)
    numerator = y_point[..., 0] + product * x_point[..., 0]
    denominator = torch.sqrt(torch.clamp(product**2 - 1, min=ENTAILMENT_EPS))
    cosine = numerator / (torch.norm(x, dim=-1) * denominator + ENTAILMENT_EPS)
    return torch.acos(torch.clamp(cosine, min=-1 + ENTAILMENT_EPS, max=1 - ENTAILMENT_EPS))


def half_aperture(x: torch.Tensor, curv: torch.Tensor, min_radius: float) -> torch.Tensor:
    """Half aperture of the entailment cone of x (space components [..., D])."""
    sine = 2 * min_radius / (torch.norm(x, dim=-1) * curv**0.5 + ENTAILMENT_EPS)
    return torch.asin(torch.clamp(sine, min=-1 + ENTAILMENT_EPS, max=1 - ENTAILMENT_EPS))


def entailment_loss(
    videos: torch.Tensor, queries: torch.Tensor, curv: torch.Tensor, min_radius: float
) -> dict[str, torch.Tensor]:
    """`mean_i max(0, angle(v_i, q_i) - aperture(v_i))`: each query inside its video's cone; also the parts.

    Args:
        videos: [N, D] hyperbolic video embeddings, row i the video of query i.
        queries: [N, D] hyperbolic query embeddings.
        curv: the curvature c (> 0).
        min_radius: MERU's minimum radius of the cone (0.1).
    """
    angle = oxy_angle(videos, queries, curv)
    aperture = half_aperture(videos, curv, min_radius)
    return {"loss": F.relu(angle - aperture).mean(), "angle": angle, "aperture": aperture}
