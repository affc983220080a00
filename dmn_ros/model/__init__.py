"""Networks of the Differentiable Mapping Network (SPEC "Networks", "Egocentric spatial attention")."""

from dmn_ros.model.dmn import DMN

__all__ = ["DMN"]
