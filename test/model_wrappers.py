"""A stand-in observation model that forwards to a real one, for tests that force what it scores.

Tests subclass it and override ``log_likelihood_prepared`` (a forced kidnapping, a known marginal,
a step held open); everything else is the wrapped TorchScript model's own.
"""

from __future__ import annotations


class DelegatingModel:
    """Forwards the methods the filter and ``dmn_ros.export.module_device`` use to ``inner``."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def to(self, _device):
        return self

    def parameters(self):  # where the weights are (dmn_ros.export.module_device)
        return self.inner.parameters()

    def buffers(self):
        return self.inner.buffers()

    def embed_views(self, images):
        return self.inner.embed_views(images)

    def prepare_map(self, emb):
        return self.inner.prepare_map(emb)

    def prepare_query(self, q):
        return self.inner.prepare_query(q)

    def log_likelihood_prepared(self, a, g, poses, q, hq, particles, nearest: int = 0):
        return self.inner.log_likelihood_prepared(a, g, poses, q, hq, particles, nearest)
