"""Latent-map particle-filter baselines (paper Sec. V-B "Latent image map", "Latent vector map"; SPEC "Baselines").

Both replace the DMN's view-embedding map by one averaged map with no explicit
spatial structure, and keep the DMN's particle filter and its likelihood network.
They expose the DMN's observation-model methods (``embed_views``, ``prepare_map``,
``prepare_query``, ``log_likelihood_prepared``) with the same signatures, so the
filter, training, export, Localizer and ``dmn-eval`` run them unchanged.

Readings of the paper, written down as SPEC asks for open points:

* **Where the poses enter.** "Context and particle poses enter the model by
  concatenating the coordinates with the corresponding context and query image
  features." Context: the pose ``(x, y, sin ψ, cos ψ)`` is tiled over h×w and
  concatenated with CNN1's features ``V_i``; a small per-context encoder follows
  (otherwise averaging would only average the poses and lose which pose goes
  with which view); then the contexts are averaged element-wise. Particle: the
  same tiled pose is concatenated with the query features before CNN6. Poses
  are absolute (normalized) coordinates: there is no egocentric transform.
* **Latent image map**: encoder = CNN4's sizes (128-3-1-relu, 64-3-1-relu) on
  ``V_i ⊕ pose_i``; map = mean over contexts, ``(64, h, w)``.
* **Latent vector map**: encoder = 64-3-1-relu, 32-3-1-relu, flatten, FC 128-relu
  on ``V_i ⊕ pose_i``; map = mean over contexts, a 128-vector. For CNN6 it is
  tiled over h×w like a pose.
* **Likelihood**: the DMN's CNN6 + FC1 on ``map ⊕ CNN5(Q) ⊕ tile(particle pose)``,
  last layer linear (an unnormalized log-likelihood). CNN5 shares CNN1's first
  three layers as in :class:`~dmn_ros.model.DMN` (``share_query_trunk``).

Keeping ``prepare_map``'s signature: the encoder's first convolution is linear in
its input, so ``conv(V ⊕ tile(p)) = conv_V(V) + conv_p(tile(p))``. ``prepare_map``
computes the pose-free part once per map; ``log_likelihood_prepared``, which gets
the context poses, adds the pose part and finishes the (small, h×w) encoder once per
call, before the per-particle work. ``map_g`` is an empty ``(B, Nc, 0, h, w)``
placeholder. ``nearest`` is accepted and ignored: an averaged map has no per-context
entries to select, which is exactly the weakness the paper measures.
"""

from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

from dmn_ros.model.base import ParticleModel, embedding_nets, fc_head, particle_chunks, pose_channels, query_nets
from dmn_ros.model.networks import CNN4, CNN6, LayerSpec, conv_layer, conv_stack, init_weights, valid_tap_weights

EMBED_DIM = 64  # CNN1 output channels, as in the DMN
QUERY_DIM = 64
POSE_DIM = 4  # (x, y, sin ψ, cos ψ)
VECTOR_DIM = 128
VECTOR_CONVS: tuple[LayerSpec, ...] = ((64, 3, 1, True), (32, 3, 1, True))

__all__ = ["LatentImageMap", "LatentVectorMap", "pose_channels"]


class _PosedEncoderFirst(nn.Module):
    """First encoder conv on ``V ⊕ tile(pose)``, split into its pose-free and pose parts (both exact)."""

    embed_dim: Final[int]

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.embed_dim = EMBED_DIM
        self.conv = conv_layer(EMBED_DIM + POSE_DIM, out_channels, 3, 1)

    def embedding_part(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, Nc, 64, h, w) -> (B, Nc, C, h, w)``: conv of the embedding channels, with the bias."""
        b, n, h, w = embeddings.shape[0], embeddings.shape[1], embeddings.shape[3], embeddings.shape[4]
        v = embeddings.reshape(b * n, self.embed_dim, h, w)
        a = F.conv2d(v, self.conv.weight[:, : self.embed_dim], self.conv.bias, padding=1)
        return a.reshape(b, n, a.shape[1], h, w)

    def add_poses(self, part: torch.Tensor, context_poses: torch.Tensor) -> torch.Tensor:
        """ReLU of the full first layer: ``part`` plus the conv of the tiled context poses."""
        eff = valid_tap_weights(self.conv.weight[:, self.embed_dim :], part.shape[3], part.shape[4])  # (C, 4, h, w)
        return (part + torch.einsum("ophw,bnp->bnohw", eff, pose_channels(context_poses))).relu()


class _LatentMapPF(ParticleModel):
    """Shared query side, context encoder convs and likelihood network; subclasses define ``_map_term``."""

    kind: Final[str]
    embed_dim: Final[int]
    query_dim: Final[int]
    map_dim: Final[int]
    max_rows: Final[int]

    def __init__(self, *, kind: str, map_dim: int, enc_convs: tuple[LayerSpec, ...], image_height: int,
                 image_width: int, share_query_trunk: bool, max_rows: int) -> None:
        super().__init__()
        self.kind = kind
        self._set_image(image_height, image_width, share_query_trunk)
        self.embed_dim, self.query_dim, self.map_dim = EMBED_DIM, QUERY_DIM, map_dim
        self.max_rows = max_rows  # particles per chunk (times B): bounds inference memory
        self.cnn1_trunk, self.cnn1_tail = embedding_nets()
        self.cnn5_trunk, self.cnn5_head = query_nets(share_query_trunk)
        self.cnn6_first = conv_layer(map_dim + QUERY_DIM + POSE_DIM, CNN6[0][0], CNN6[0][1], CNN6[0][2])
        self.cnn6_rest = conv_stack(CNN6[0][0], CNN6[1:])
        # Last layer linear: an unnormalized log-likelihood, as in the DMN.
        self.fc1 = fc_head(CNN6[-1][0] * self.feat_h * self.feat_w, 1)
        self.enc_first = _PosedEncoderFirst(enc_convs[0][0])
        self.enc_rest = conv_stack(enc_convs[0][0], enc_convs[1:])

    @torch.jit.export
    def prepare_map(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pose-free part of the encoder's first conv (B, Nc, C, h, w), empty placeholder)``."""
        a = self.enc_first.embedding_part(embeddings)
        return a, a.new_zeros(a.shape[0], a.shape[1], 0, a.shape[3], a.shape[4])

    def _encode_contexts(self, map_a: torch.Tensor, context_poses: torch.Tensor) -> torch.Tensor:
        """The encoder's convolutions per context: ``(B * Nc, C, h, w)``."""
        b, n, h, w = map_a.shape[0], map_a.shape[1], map_a.shape[3], map_a.shape[4]
        hidden = self.enc_first.add_poses(map_a, context_poses)
        return self.enc_rest(hidden.reshape(b * n, hidden.shape[2], h, w))

    @torch.jit.export
    def prepare_query(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CNN5(Q), CNN5's share of CNN6's first conv + its bias)``, both ``(B, 64, h, w)``."""
        f = self.cnn5_head(self.query_trunk(query))
        w = self.cnn6_first.weight[:, self.map_dim : self.map_dim + self.query_dim]
        return f, F.conv2d(f, w, self.cnn6_first.bias, padding=1)

    def _map_term(self, map_a: torch.Tensor, context_poses: torch.Tensor) -> torch.Tensor:
        """The map's share of CNN6's first conv, ``(B, 64, h, w)``."""
        raise NotImplementedError

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
        """``(B, K)`` log-likelihoods; ``map_g``, ``q`` and ``nearest`` are unused (see the module docstring)."""
        b = particles.shape[0]
        h, w = self.feat_h, self.feat_w
        base = self._map_term(map_a, context_poses) + hq  # (B, 64, h, w): shared by every particle
        # The tiled particle pose through CNN6's first conv is a per-position affine map of the 4 numbers.
        eff = valid_tap_weights(self.cnn6_first.weight[:, self.map_dim + self.query_dim :], h, w)  # (64, 4, h, w)
        outs: list[torch.Tensor] = []
        for chunk in particle_chunks(particles, b, self.max_rows):
            p = pose_channels(chunk)  # (B, k, 4)
            k = p.shape[1]
            pre = (torch.einsum("ophw,bkp->bkohw", eff, p) + base.unsqueeze(1)).relu()
            x = self.cnn6_rest(pre.reshape(b * k, pre.shape[2], h, w))
            outs.append(self.fc1(x).reshape(b, k))
        return torch.cat(outs, dim=1)

    def config(self) -> dict[str, int | bool | str]:
        """Constructor arguments plus ``kind``, stored with checkpoints and exported models."""
        return {"kind": self.kind, "image_height": self.image_height, "image_width": self.image_width,
                "share_query_trunk": self.share_query_trunk}


class LatentImageMap(_LatentMapPF):
    """PF with a latent image map: ``M = mean_i enc(CNN1(C_i) ⊕ tile(s_i))``, ``(64, h, w)``."""

    def __init__(self, *, image_height: int = 32, image_width: int = 32, share_query_trunk: bool = True,
                 max_rows: int = 4096) -> None:
        super().__init__(kind="latent_image", map_dim=CNN4[-1][0], enc_convs=CNN4, image_height=image_height,
                         image_width=image_width, share_query_trunk=share_query_trunk, max_rows=max_rows)
        init_weights(self)

    @torch.jit.export
    def latent_map(self, map_a: torch.Tensor, context_poses: torch.Tensor) -> torch.Tensor:
        """The latent image ``(B, 64, h, w)``: per-context encoding averaged element-wise over contexts."""
        enc = self._encode_contexts(map_a, context_poses)
        return enc.reshape(map_a.shape[0], map_a.shape[1], enc.shape[1], enc.shape[2], enc.shape[3]).mean(dim=1)

    def _map_term(self, map_a: torch.Tensor, context_poses: torch.Tensor) -> torch.Tensor:
        m = self.latent_map(map_a, context_poses)
        return F.conv2d(m, self.cnn6_first.weight[:, : self.map_dim], None, padding=1)


class LatentVectorMap(_LatentMapPF):
    """PF with a latent vector map: ``m = mean_i FC(conv(CNN1(C_i) ⊕ tile(s_i)))``, a ``vector_dim`` vector."""

    vector_dim: Final[int]

    def __init__(self, *, image_height: int = 32, image_width: int = 32, share_query_trunk: bool = True,
                 vector_dim: int = VECTOR_DIM, max_rows: int = 4096) -> None:
        super().__init__(kind="latent_vector", map_dim=vector_dim, enc_convs=VECTOR_CONVS, image_height=image_height,
                         image_width=image_width, share_query_trunk=share_query_trunk, max_rows=max_rows)
        self.vector_dim = vector_dim
        self.enc_fc = nn.Sequential(
            nn.Flatten(), nn.Linear(VECTOR_CONVS[-1][0] * self.feat_h * self.feat_w, vector_dim), nn.ReLU()
        )
        init_weights(self)

    @torch.jit.export
    def latent_map(self, map_a: torch.Tensor, context_poses: torch.Tensor) -> torch.Tensor:
        """The latent vector ``(B, vector_dim)``: per-context vectors averaged over contexts."""
        vec = self.enc_fc(self._encode_contexts(map_a, context_poses))
        return vec.reshape(map_a.shape[0], map_a.shape[1], self.vector_dim).mean(dim=1)

    def _map_term(self, map_a: torch.Tensor, context_poses: torch.Tensor) -> torch.Tensor:
        m = self.latent_map(map_a, context_poses)  # tiled over h×w, like a pose: a per-position affine map
        eff = valid_tap_weights(self.cnn6_first.weight[:, : self.map_dim], self.feat_h, self.feat_w)
        return torch.einsum("ophw,bp->bohw", eff, m)

    def config(self) -> dict[str, int | bool | str]:
        """:meth:`_LatentMapPF.config` plus ``vector_dim``."""
        return {**super().config(), "vector_dim": self.vector_dim}
