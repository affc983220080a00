"""Pose-regression baseline (paper Sec. V-B "Regression"; SPEC "Baselines").

"The network structure is equivalent to a DMN with one particle. However, the
particle pose is now set to the pose estimate of the previous step (or the mean
initial belief for t = 0); and instead of estimating the particle likelihood, the
observation model directly regresses to a pose (x, y, ψ), which is interpreted
relative to the previous pose estimate."

So: the DMN's view-embedding map and egocentric attention (CNN1-CNN6, the SPEC
layer table, written literally here since there is only one "particle"), with
FC1's last layer giving 3 numbers instead of 1. The output ``(dx, dy, dψ)`` is
composed with the previous estimate in its own frame. There are no particle
weights: the regressed pose is the estimate, trained with the same pose MSE.

Not a particle filter: it has ``regress_prepared`` instead of
``log_likelihood_prepared``, and runs with :func:`dmn_ros.training.trainer.RegressionLoss`
and :func:`dmn_ros.evaluation.protocol.run_regression`, not with the filter or the Localizer.
"""

import math
from typing import Final

import torch
from torch import nn

from dmn_ros.geometry import egocentric_viewpoints_torch
from dmn_ros.model.base import ImageModel, embedding_nets, fc_head, query_nets
from dmn_ros.model.networks import CNN2, CNN3, CNN4, CNN6, conv_stack, init_weights

EMBED_DIM = 64
KEY_DIM = 32
VALUE_DIM = 64
QUERY_DIM = 64
POSE_DIM = 4
HEAD_INIT_GAIN = 0.01
"""The last layer starts small: the first estimates stay near the prior's mean instead of random jumps."""


class PoseRegression(ImageModel):
    """DMN trunk with one particle at the previous estimate, regressing the relative pose.

    Shapes: embeddings ``(B, Nc, 64, h, w)``, context poses ``(B, Nc, 3)``, previous
    estimate ``(B, 3)``, output ``(B, 3)`` in the model's normalized coordinates.
    """

    kind: Final[str]
    embed_dim: Final[int]
    key_dim: Final[int]
    value_dim: Final[int]
    pose_dim: Final[int]

    def __init__(self, *, image_height: int = 32, image_width: int = 32, share_query_trunk: bool = True) -> None:
        super().__init__()
        self.kind = "regression"
        self._set_image(image_height, image_width, share_query_trunk)
        self.embed_dim, self.key_dim, self.value_dim, self.pose_dim = EMBED_DIM, KEY_DIM, VALUE_DIM, POSE_DIM
        self.cnn1_trunk, self.cnn1_tail = embedding_nets()
        self.cnn2 = conv_stack(EMBED_DIM + POSE_DIM, CNN2)
        self.cnn3 = conv_stack(3, CNN3)
        self.cnn4 = conv_stack(EMBED_DIM, CNN4)
        self.cnn5_trunk, self.cnn5_head = query_nets(share_query_trunk)
        self.cnn6 = conv_stack(VALUE_DIM + KEY_DIM + QUERY_DIM, CNN6)
        self.fc = fc_head(CNN6[-1][0] * self.feat_h * self.feat_w, 3)  # (dx, dy, dψ) in the previous estimate's frame
        init_weights(self)
        with torch.no_grad():
            self.fc[3].weight.mul_(HEAD_INIT_GAIN)
        self.attn_scale = 1.0 / math.sqrt(KEY_DIM * self.feat_h * self.feat_w)

    @torch.jit.export
    def prepare_map(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V, CNN4(V))``, both ``(B, Nc, 64, h, w)``: the pose-free map terms."""
        b, n = embeddings.shape[0], embeddings.shape[1]
        u = self.cnn4(embeddings.reshape(b * n, self.embed_dim, self.feat_h, self.feat_w))
        return embeddings, u.reshape(b, n, u.shape[1], self.feat_h, self.feat_w)

    @torch.jit.export
    def prepare_query(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CNN3(Q) the query key (B, 32, h, w), CNN5(Q) the query features (B, 64, h, w))``."""
        return self.cnn3(query - 0.5), self.cnn5_head(self.query_trunk(query))

    @torch.jit.export
    def regress_prepared(
        self,
        map_v: torch.Tensor,
        map_u: torch.Tensor,
        context_poses: torch.Tensor,
        q: torch.Tensor,
        f: torch.Tensor,
        previous: torch.Tensor,
    ) -> torch.Tensor:
        """The new estimate ``(B, 3)``: ``previous ⊕ (dx, dy, dψ)``, yaw wrapped to [-π, π)."""
        b, n = map_v.shape[0], map_v.shape[1]
        h, w = self.feat_h, self.feat_w
        pose = egocentric_viewpoints_torch(context_poses, previous.unsqueeze(1))[:, 0]  # (B, Nc, 4)
        tiled = pose[..., None, None].expand(b, n, self.pose_dim, h, w)
        x2 = torch.cat([map_v, tiled], dim=2).reshape(b * n, self.embed_dim + self.pose_dim, h, w)
        keys = self.cnn2(x2).reshape(b, n, self.key_dim, h, w)
        lam = torch.softmax((keys * q.unsqueeze(1)).sum(dim=(2, 3, 4)) * self.attn_scale, dim=1)  # (B, Nc)
        mixed = (lam[:, :, None, None, None] * torch.cat([map_u, keys], dim=2)).sum(dim=1)  # (B, 96, h, w)
        delta = self.fc(self.cnn6(torch.cat([mixed, f], dim=1)))  # (B, 3)
        c, s = torch.cos(previous[:, 2]), torch.sin(previous[:, 2])
        x = previous[:, 0] + c * delta[:, 0] - s * delta[:, 1]
        y = previous[:, 1] + s * delta[:, 0] + c * delta[:, 1]
        yaw = torch.remainder(previous[:, 2] + delta[:, 2] + math.pi, 2.0 * math.pi) - math.pi
        return torch.stack([x, y, yaw], dim=1)

    def forward(
        self,
        query: torch.Tensor,
        embeddings: torch.Tensor,
        context_poses: torch.Tensor,
        previous: torch.Tensor,
    ) -> torch.Tensor:
        """``(B, 3)`` estimate for the query frame from the previous estimate (the one "particle")."""
        map_v, map_u = self.prepare_map(embeddings)
        q, f = self.prepare_query(query)
        return self.regress_prepared(map_v, map_u, context_poses, q, f, previous)

    def config(self) -> dict[str, int | bool | str]:
        """Constructor arguments plus ``kind``, stored with checkpoints and exported models."""
        return {"kind": self.kind, "image_height": self.image_height, "image_width": self.image_width,
                "share_query_trunk": self.share_query_trunk}


def regress_sequence(
    model: nn.Module,
    *,
    map_v: torch.Tensor,
    map_u: torch.Tensor,
    context_poses: torch.Tensor,
    queries: torch.Tensor,
    egomotion: torch.Tensor,
    initial: torch.Tensor,
) -> list[torch.Tensor]:
    """Estimates ``[(B, 3)] * T`` for ``queries (B, T, 3, H, W)``; ``egomotion[:, 0]`` is ignored.

    The odometry convention of the filter (SPEC "Odometry indexing"): before step t > 0 the
    previous estimate is moved by ``Δ_t`` (robot frame at t-1), then the frame at t corrects it.
    Works with the eager model and its TorchScript export.
    """
    from dmn_ros.geometry import compose

    estimates: list[torch.Tensor] = []
    prev = initial
    for t in range(queries.shape[1]):
        if t > 0:
            prev = compose(prev, egomotion[:, t])
        q, f = model.prepare_query(queries[:, t])
        prev = model.regress_prepared(map_v, map_u, context_poses, q, f, prev)
        estimates.append(prev)
    return estimates


__all__ = ["PoseRegression", "regress_sequence"]
