"""Parts shared by the DMN and the baselines: CNN1 and CNN5's trunk, FC1, image-size constants.

Shared through module-level builders (each model keeps its submodule names, so its
state_dict keys, and its construction order) and a plain ``nn.Module`` base whose
methods TorchScript compiles into each scripted subclass.
"""

import torch
from torch import nn

from dmn_ros.model.networks import CNN1, CNN5, conv_stack, output_hw

FC_DIM = 512


def pose_channels(pose: torch.Tensor) -> torch.Tensor:
    """``(..., 3) -> (..., 4)``: the continuous ``(x, y, sin ψ, cos ψ)`` the networks see."""
    return torch.stack([pose[..., 0], pose[..., 1], torch.sin(pose[..., 2]), torch.cos(pose[..., 2])], dim=-1)


def embedding_nets() -> tuple[nn.Sequential, nn.Sequential]:
    """CNN1 as ``(trunk, tail)``, split after its third layer (the trunk CNN5 may share)."""
    return conv_stack(3, CNN1[:3]), conv_stack(CNN1[2][0], CNN1[3:])


def query_nets(share_query_trunk: bool) -> tuple[nn.Sequential, nn.Sequential]:
    """CNN5 as ``(trunk, head)``; the trunk is empty when CNN1's trunk is shared."""
    trunk = nn.Sequential() if share_query_trunk else conv_stack(3, CNN5[:3])
    return trunk, conv_stack(CNN5[2][0], CNN5[3:])


def fc_head(in_features: int, outputs: int, hidden: int = FC_DIM) -> nn.Sequential:
    """FC1: flatten, ``hidden``-relu, then a linear layer of ``outputs`` (weights at ``1.*`` and ``3.*``)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


def particle_chunks(particles: torch.Tensor, rows_per_particle: int, max_rows: int) -> list[torch.Tensor]:
    """``particles (B, K, 3)`` sliced along K into chunks of ``max_rows // rows_per_particle`` (at least 1)."""
    chunk = max(1, max_rows // max(1, rows_per_particle))
    return [particles[:, start : start + chunk] for start in range(0, particles.shape[1], chunk)]


class ImageModel(nn.Module):
    """Base of the models: image sizes, CNN1 (``embed_views``) and CNN5's trunk (``query_trunk``).

    Subclasses call :meth:`_set_image` and assign ``cnn1_trunk``, ``cnn1_tail`` and
    ``cnn5_trunk`` (from :func:`embedding_nets` and :func:`query_nets`).
    """

    # Inherited through getattr, unlike Final annotations (TorchScript reads one class's annotations).
    __constants__ = ("image_height", "image_width", "feat_h", "feat_w", "share_query_trunk")

    def _set_image(self, image_height: int, image_width: int, share_query_trunk: bool) -> None:
        self.image_height, self.image_width = image_height, image_width
        self.feat_h, self.feat_w = output_hw(image_height, image_width)
        self.share_query_trunk = share_query_trunk

    @torch.jit.export
    def embed_views(self, images: torch.Tensor) -> torch.Tensor:
        """CNN1: ``(N, 3, H, W) -> (N, 64, h, w)``, the view-embedding map's entries."""
        return self.cnn1_tail(self.cnn1_trunk(images - 0.5))

    def query_trunk(self, images: torch.Tensor) -> torch.Tensor:
        if self.share_query_trunk:
            return self.cnn1_trunk(images - 0.5)
        return self.cnn5_trunk(images - 0.5)


class ParticleModel(ImageModel):
    """Base of the particle-filter observation models: ``forward`` through their prepared-map methods.

    Subclasses define ``prepare_map``, ``prepare_query`` and ``log_likelihood_prepared``
    (:class:`dmn_ros.filter.runner.ObservationModel`).
    """

    def forward(
        self,
        query: torch.Tensor,
        embeddings: torch.Tensor,
        context_poses: torch.Tensor,
        particles: torch.Tensor,
    ) -> torch.Tensor:
        """``l_t^k``: ``(B, K)`` unnormalized log-likelihoods of each particle for the query frame."""
        map_a, map_g = self.prepare_map(embeddings)
        q, hq = self.prepare_query(query)
        return self.log_likelihood_prepared(map_a, map_g, context_poses, q, hq, particles, 0)
