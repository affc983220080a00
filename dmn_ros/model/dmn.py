"""The DMN observation model: view-embedding map encoder plus egocentric spatial attention.

Two readings the paper leaves open, decided here (SPEC "Networks"):

* **CNN4/CNN5 sharing.** CNN1 followed by CNN4 maps a context *image* through
  32-2-2, 32-3-1, 64-2-2, 64-3-1, 128-3-1, 64-3-1, which is exactly CNN5's table.
  We read "the first three layers of CNN4 and CNN5 are shared" as: the image-side
  value path (CNN1∘CNN4) and the query path CNN5 share their first three layers,
  i.e. CNN5's first three layers *are* CNN1's first three layers. That keeps
  query and context features in one feature space. ``share_query_trunk=False``
  gives CNN5 its own layers.
* **FC1's last activation** is linear: the output is an unnormalized
  log-likelihood and must be able to go negative.

One more choice: attention logits are scaled by ``1/sqrt(32·h·w)`` (the
dot-product length), which keeps the softmax out of saturation at initialization.

Everything is computed in the model's normalized coordinates. Two exact
implementations exist: :meth:`DMN.reference_log_likelihood` is the literal,
per-particle reading of the SPEC; :meth:`DMN.log_likelihood` factors it by
linearity (map-only, query-only and per-particle terms) and is what training,
the filter and the nodes run. Tests hold the two equal.
"""

import math
from typing import Final

import torch
import torch.nn.functional as F

from dmn_ros.geometry import egocentric_viewpoints_torch
from dmn_ros.model.base import (
    FC_DIM,
    ParticleModel,
    embedding_nets,
    fc_head,
    particle_chunks,
    pose_channels,
    query_nets,
)
from dmn_ros.model.networks import CNN2, CNN3, CNN4, CNN6, conv_layer, conv_stack, init_weights, valid_tap_weights

EMBED_DIM = 64  # D, SPEC
KEY_DIM = 32
VALUE_DIM = 64
QUERY_DIM = 64


class DMN(ParticleModel):
    """Map encoder (CNN1, CNN4) and observation model (CNN2, CNN3, CNN5, CNN6, FC1).

    Shapes: images ``(B, 3, H, W)`` float in [0, 1]; view embeddings
    ``(B, Nc, 64, h, w)`` with ``h, w = H/4, W/4``; context poses ``(B, Nc, 3)``;
    particles ``(B, K, 3)``; log-likelihoods ``(B, K)``. ``K`` and ``Nc`` are free
    at every call since all weights are shared across particles and contexts.
    """

    image_height: Final[int]
    image_width: Final[int]
    feat_h: Final[int]
    feat_w: Final[int]
    attention: Final[bool]
    egocentric: Final[bool]
    share_query_trunk: Final[bool]
    pose_dim: Final[int]
    max_rows: Final[int]
    embed_dim: Final[int]
    key_dim: Final[int]
    value_dim: Final[int]
    query_dim: Final[int]
    fc_dim: Final[int]

    def __init__(
        self,
        *,
        image_height: int = 32,
        image_width: int = 32,
        attention: bool = True,
        egocentric: bool = True,
        share_query_trunk: bool = True,
        max_rows: int = 512,
    ) -> None:
        super().__init__()
        self.embed_dim, self.key_dim, self.value_dim = EMBED_DIM, KEY_DIM, VALUE_DIM
        self.query_dim, self.fc_dim = QUERY_DIM, FC_DIM
        self._set_image(image_height, image_width, share_query_trunk)
        self.attention = attention
        self.egocentric = egocentric
        # Without the egocentric transform the keys see both absolute poses (ablation).
        self.pose_dim = 4 if egocentric else 8
        # Particle x context rows per chunk. Small chunks keep the per-(particle, context) tensors
        # near the caches: 512 rows ran 1.4-2.4x faster on CPU than one 32768-row chunk (docs/PERFORMANCE.md).
        self.max_rows = max_rows

        self.cnn1_trunk, self.cnn1_tail = embedding_nets()
        self.cnn2_first = conv_layer(self.embed_dim + self.pose_dim, CNN2[0][0], CNN2[0][1], CNN2[0][2])
        self.cnn2_rest = conv_stack(CNN2[0][0], CNN2[1:])
        if len(self.cnn2_rest) != 1:  # the attention factorization below needs one linear conv
            raise ValueError("CNN2 after its first layer must be a single linear convolution")
        self.cnn3 = conv_stack(3, CNN3)
        self.cnn4 = conv_stack(self.embed_dim, CNN4)
        self.cnn5_trunk, self.cnn5_head = query_nets(share_query_trunk)
        cnn6_in = self.value_dim + self.key_dim + self.query_dim
        self.cnn6_first = conv_layer(cnn6_in, CNN6[0][0], CNN6[0][1], CNN6[0][2])
        self.cnn6_rest = conv_stack(CNN6[0][0], CNN6[1:])
        # Last layer linear: an unnormalized log-likelihood (SPEC).
        self.fc1 = fc_head(CNN6[-1][0] * self.feat_h * self.feat_w, 1, self.fc_dim)
        init_weights(self)
        self.attn_scale = 1.0 / math.sqrt(self.key_dim * self.feat_h * self.feat_w)

    # ---- map side (embed_views: ImageModel) ------------------------------------------------
    @torch.jit.export
    def prepare_map(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything that depends on the map only, computed once per map.

        Returns ``A`` (CNN2's first conv on the embedding channels, with its bias) and
        ``G`` (CNN6's first conv on CNN4's values, no bias), both ``(B, Nc, 64, h, w)``.
        Both convolutions are linear, so they commute with the attention sum.
        """
        b, n = embeddings.shape[0], embeddings.shape[1]
        v = embeddings.reshape(b * n, self.embed_dim, self.feat_h, self.feat_w)
        a = F.conv2d(v, self.cnn2_first.weight[:, : self.embed_dim], self.cnn2_first.bias, padding=1)
        u = self.cnn4(v)
        g = F.conv2d(u, self.cnn6_first.weight[:, :self.value_dim], None, padding=1)
        return (
            a.reshape(b, n, a.shape[1], self.feat_h, self.feat_w),
            g.reshape(b, n, g.shape[1], self.feat_h, self.feat_w),
        )

    # ---- query side (query_trunk: ImageModel) ---------------------------------------------
    @torch.jit.export
    def prepare_query(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per frame: query key ``q = CNN3(Q)`` and CNN5's share of CNN6's first conv (+ its bias)."""
        q = self.cnn3(query - 0.5)
        f = self.cnn5_head(self.query_trunk(query))
        hq = F.conv2d(f, self.cnn6_first.weight[:, self.value_dim + self.key_dim :], self.cnn6_first.bias, padding=1)
        return q, hq

    # ---- per particle ---------------------------------------------------------------------
    def pose_features(self, context_poses: torch.Tensor, particles: torch.Tensor) -> torch.Tensor:
        """``(B, K, Nc, pose_dim)``: SPEC egocentric transform, or absolute poses for the ablation."""
        if self.egocentric:
            return egocentric_viewpoints_torch(context_poses, particles)
        k = particles.shape[1]
        n = context_poses.shape[1]
        ctx = pose_channels(context_poses).unsqueeze(1).expand(-1, k, -1, -1)
        par = pose_channels(particles).unsqueeze(2).expand(-1, -1, n, -1)
        return torch.cat([ctx, par], dim=-1)

    def attention_weights(self, logits: torch.Tensor) -> torch.Tensor:
        if self.attention:
            return torch.softmax(logits, dim=-1)
        return torch.full_like(logits, 1.0 / logits.shape[-1])

    @torch.jit.export
    def log_likelihood_prepared(
        self,
        map_a: torch.Tensor,
        map_g: torch.Tensor,
        context_poses: torch.Tensor,
        q: torch.Tensor,
        hq: torch.Tensor,
        particles: torch.Tensor,
        nearest: int = 0,
    ) -> torch.Tensor:
        """``(B, K)`` log-likelihoods from a prepared map and a prepared query, chunked over K.

        ``nearest > 0`` attends, per particle, only to the ``nearest`` contexts closest to it in
        x-y (large shared maps); it equals full attention when ``nearest >= Nc``.
        """
        n = context_poses.shape[1]
        if 0 < nearest < n:
            n = nearest
        chunks = particle_chunks(particles, particles.shape[0] * n, self.max_rows)
        if len(chunks) <= 1:
            return self._particles_chunk(map_a, map_g, context_poses, q, hq, particles, nearest)
        outs = [self._particles_chunk(map_a, map_g, context_poses, q, hq, p, nearest) for p in chunks]
        return torch.cat(outs, dim=1)

    def _particles_chunk(
        self,
        map_a: torch.Tensor,
        map_g: torch.Tensor,
        context_poses: torch.Tensor,
        q: torch.Tensor,
        hq: torch.Tensor,
        particles: torch.Tensor,
        nearest: int,
    ) -> torch.Tensor:
        b, k = particles.shape[0], particles.shape[1]
        n = context_poses.shape[1]
        h, w = self.feat_h, self.feat_w
        pose = self.pose_features(context_poses, particles)  # (B, K, Nc, P)
        a_sel = map_a.unsqueeze(1)  # (B, 1, Nc, 64, h, w), shared by all particles
        g_sel = map_g.unsqueeze(1)
        if 0 < nearest < n:  # per-particle subset of the map: (B, K, M, ...)
            d2 = (particles[:, :, None, :2] - context_poses[:, None, :, :2]).pow(2).sum(-1)  # (B, K, Nc)
            idx = torch.topk(d2, nearest, dim=2, largest=False).indices  # (B, K, M)
            pose = torch.gather(pose, 2, idx.unsqueeze(-1).expand(-1, -1, -1, pose.shape[-1]))
            bidx = torch.arange(b, device=idx.device).view(b, 1, 1).expand_as(idx)
            a_sel = map_a[bidx, idx]
            g_sel = map_g[bidx, idx]
            n = nearest
        # CNN2 first conv = conv(V) + conv(tile(pose)); the second is a per-position affine map.
        eff = valid_tap_weights(self.cnn2_first.weight[:, self.embed_dim:], h, w)  # (64, P, h, w)
        pose_term = torch.einsum("ophw,bkip->bkiohw", eff, pose)
        hidden = (pose_term + a_sel).relu_()  # (B, K, Nc, 64, h, w); in place: one buffer fewer
        # CNN2's last conv is linear (no ReLU), so it commutes with the attention: the logits
        # <W*x + b, q> equal <x, W^T*q> + <b, sum q>, and the attended key sum_i l_i (W*x_i + b)
        # is W*(sum_i l_i x_i) + b because the l_i sum to one. The conv then runs once per
        # particle instead of once per (particle, context).
        conv2 = self.cnn2_rest[0]
        q_back = F.conv_transpose2d(q, conv2.weight, None, padding=1)  # (B, 64, h, w)
        bias2 = conv2.bias
        assert bias2 is not None
        q_bias = (bias2.view(1, -1) * q.sum(dim=(2, 3))).sum(dim=1)  # (B,)
        logits = (torch.einsum("bkichw,bchw->bki", hidden, q_back) + q_bias.view(b, 1, 1)) * self.attn_scale
        lam = self.attention_weights(logits)  # (B, K, Nc)
        mixed = torch.einsum("bki,bkichw->bkchw", lam, hidden).reshape(b * k, hidden.shape[3], h, w)
        att_key = conv2(mixed)  # (B*K, 32, h, w): the attended K_i^k
        if g_sel.shape[1] == 1:  # the whole map: one value set shared by every particle
            att_val = torch.einsum("bki,bichw->bkchw", lam, g_sel[:, 0])
        else:
            att_val = torch.einsum("bki,bkichw->bkchw", lam, g_sel)
        w_key = self.cnn6_first.weight[:, self.value_dim : self.value_dim + self.key_dim]
        key_term = F.conv2d(att_key, w_key, None, padding=1)
        pre6 = (att_val + key_term.reshape(b, k, -1, h, w)).add_(hq.unsqueeze(1)).relu_()
        x = self.cnn6_rest(pre6.reshape(b * k, -1, h, w))
        return self.fc1(x).reshape(b, k)

    @torch.jit.unused
    def reference_log_likelihood(
        self,
        query: torch.Tensor,
        embeddings: torch.Tensor,
        context_poses: torch.Tensor,
        particles: torch.Tensor,
    ) -> torch.Tensor:
        """The SPEC read literally, one (particle, context) pair at a time in a batch.

        Slow and memory hungry; it exists to pin down what :meth:`forward` computes.
        """
        b, n = embeddings.shape[:2]
        k = particles.shape[1]
        h, w = self.feat_h, self.feat_w
        pose = self.pose_features(context_poses, particles)  # (B, K, Nc, P)
        tiled = pose[..., None, None].expand(b, k, n, self.pose_dim, h, w)
        v = embeddings.unsqueeze(1).expand(b, k, n, self.embed_dim, h, w)
        x2 = torch.cat([v, tiled], dim=3).reshape(b * k * n, self.embed_dim + self.pose_dim, h, w)
        keys = self.cnn2_rest(torch.relu(self.cnn2_first(x2))).reshape(b, k, n, self.key_dim, h, w)
        q = self.cnn3(query - 0.5)
        logits = (keys * q[:, None, None]).sum(dim=(3, 4, 5)) * self.attn_scale
        lam = self.attention_weights(logits)
        values = self.cnn4(embeddings.reshape(b * n, self.embed_dim, h, w)).reshape(b, 1, n, self.value_dim, h, w)
        per_ctx = torch.cat([values.expand(b, k, n, self.value_dim, h, w), keys], dim=3)
        map_feat = (lam[..., None, None, None] * per_ctx).sum(dim=2)  # (B, K, 96, h, w)
        f = self.cnn5_head(self.query_trunk(query))
        x6 = torch.cat([map_feat, f.unsqueeze(1).expand(b, k, self.query_dim, h, w)], dim=2)
        x = self.cnn6_rest(torch.relu(self.cnn6_first(x6.reshape(b * k, -1, h, w))))
        return self.fc1(x).reshape(b, k)

    def config(self) -> dict[str, int | bool]:
        """Constructor arguments, stored with checkpoints and exported models."""
        return {
            "image_height": self.image_height,
            "image_width": self.image_width,
            "attention": self.attention,
            "egocentric": self.egocentric,
            "share_query_trunk": self.share_query_trunk,
        }
