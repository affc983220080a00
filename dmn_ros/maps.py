"""The view-embedding map as a value that nodes keep, publish, save and reload (SPEC "Map").

``m = {(V_i, s_i)}``: one embedding per context view plus its metric pose.
Nothing is averaged, so adding or removing a view is exact. Files are
safetensors (raw tensors plus a JSON header, never pickle), written atomically,
and carry the fingerprint of the model that made the embeddings: a map made by
another model is refused instead of silently misread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from dmn_ros.errors import FingerprintMismatchError, MapError
from dmn_ros.files import atomic_write_bytes

__all__ = ["MAP_FORMAT", "ViewMap"]

MAP_FORMAT = "dmn_ros.map/1"
"""Value of the ``format`` key in a map file's header."""
_META_KEY = "dmn_map"


class ViewMap:
    """Context views embedded by one model: ``embeddings (N, D, h, w)``, metric ``poses (N, 3)``, ``ids``."""

    def __init__(
        self,
        *,
        fingerprint: str,
        meters_per_unit: float,
        embed_shape: Sequence[int] = (64, 8, 8),
        frame_id: str = "map",
    ) -> None:
        self.fingerprint = str(fingerprint)
        """Weights fingerprint of the model that computed the embeddings."""
        self.meters_per_unit = float(meters_per_unit)
        """That model's metric scale (informative; poses are stored in meters)."""
        self.embed_shape: tuple[int, int, int] = tuple(int(v) for v in embed_shape)  # type: ignore[assignment]
        """``(D, h, w)`` of one embedding."""
        self.frame_id = str(frame_id)
        """The global frame the poses are expressed in."""
        self.embeddings = np.zeros((0, *self.embed_shape), dtype=np.float32)
        """``(N, D, h, w)`` float32 view embeddings ``V_i``."""
        self.poses = np.zeros((0, 3), dtype=np.float64)
        """``(N, 3)`` metric ``(x, y, yaw)`` of each view in ``frame_id``."""
        self.ids: list[str] = []
        """Stable view ids such as ``"robot1/000042"``; adding an existing id replaces that view."""

    @classmethod
    def for_model(cls, info: object, *, frame_id: str = "map") -> ViewMap:
        """An empty map for a loaded model's :class:`~dmn_ros.export.ModelInfo`."""
        return cls(
            fingerprint=info.fingerprint,  # type: ignore[attr-defined]
            meters_per_unit=info.meters_per_unit,  # type: ignore[attr-defined]
            embed_shape=info.embed_shape,  # type: ignore[attr-defined]
            frame_id=frame_id,
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"ViewMap({len(self)} views, frame {self.frame_id!r}, model {self.fingerprint})"

    # ---- editing -----------------------------------------------------------------------------
    def add(self, *, embeddings: np.ndarray, poses: np.ndarray, ids: Sequence[str]) -> None:
        """Append views; ``embeddings (n, D, h, w)``, metric ``poses (n, 3)``. Existing ids are replaced."""
        emb = np.asarray(embeddings, dtype=np.float32)
        pos = np.asarray(poses, dtype=np.float64)
        ids = [str(i) for i in ids]
        if emb.ndim == 3:
            emb, pos = emb[None], pos.reshape(1, 3)
        n = len(ids)
        if emb.shape != (n, *self.embed_shape):
            raise MapError(f"embeddings have shape {emb.shape}, expected {(n, *self.embed_shape)}")
        if pos.shape != (n, 3):
            raise MapError(f"poses have shape {pos.shape}, expected ({n}, 3)")
        if not (np.isfinite(emb).all() and np.isfinite(pos).all()):
            raise MapError("views with non-finite embeddings or poses are not added")
        if len(set(ids)) != n:
            raise MapError("duplicate ids in one add() call")
        self.remove(ids)
        self.embeddings = np.concatenate([self.embeddings, emb])
        self.poses = np.concatenate([self.poses, pos])
        self.ids.extend(ids)

    def remove(self, ids: Iterable[str]) -> int:
        """Drop the views with these ids (unknown ids are ignored); returns how many were removed."""
        drop = set(ids)
        keep = [i for i, v in enumerate(self.ids) if v not in drop]
        removed = len(self.ids) - len(keep)
        if removed:
            self.embeddings = self.embeddings[keep]
            self.poses = self.poses[keep]
            self.ids = [self.ids[i] for i in keep]
        return removed

    def clear(self) -> None:
        self.remove(list(self.ids))

    def extent(self) -> tuple[float, float, float, float] | None:
        """``(xmin, xmax, ymin, ymax)`` of the view positions in meters, or None for an empty map."""
        if len(self) == 0:
            return None
        lo, hi = self.poses[:, :2].min(axis=0), self.poses[:, :2].max(axis=0)
        return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])

    def check_fingerprint(self, fingerprint: str, *, source: str = "map") -> None:
        """Raise :class:`FingerprintMismatchError` if the map was made by another model."""
        if self.fingerprint != fingerprint:
            raise FingerprintMismatchError(
                f"{source} was embedded by model {self.fingerprint}, but the loaded model is {fingerprint}; "
                "re-map with this model or load the matching model"
            )

    def copy(self) -> ViewMap:
        out = ViewMap(fingerprint=self.fingerprint, meters_per_unit=self.meters_per_unit,
                      embed_shape=self.embed_shape, frame_id=self.frame_id)
        out.embeddings, out.poses, out.ids = self.embeddings.copy(), self.poses.copy(), list(self.ids)
        return out

    # ---- files -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        meta = {
            "format": MAP_FORMAT,
            "fingerprint": self.fingerprint,
            "meters_per_unit": self.meters_per_unit,
            "embed_shape": list(self.embed_shape),
            "frame_id": self.frame_id,
            "ids": self.ids,
        }
        tensors = {
            "embeddings": np.ascontiguousarray(self.embeddings),
            "poses": np.ascontiguousarray(self.poses),
        }
        return save(tensors, metadata={_META_KEY: json.dumps(meta)})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a failed write leaves the previous file untouched."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def from_bytes(
        cls, data: bytes, *, source: str = "map", expected_fingerprint: str | None = None
    ) -> ViewMap:
        from safetensors.numpy import load

        try:
            tensors = load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
            meta = json.loads(header["__metadata__"][_META_KEY])
        except MapError:
            raise
        except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
            raise MapError(f"{source} is not a readable dmn_ros map file: {exc}") from exc
        try:
            if not isinstance(meta, dict) or meta.get("format") != MAP_FORMAT:
                if not isinstance(meta, dict):
                    raise MapError(f"{source} has a malformed header: {_META_KEY} is not an object")
                raise MapError(f"{source} has format {meta.get('format')!r}, expected {MAP_FORMAT!r}")
            out = cls(
                fingerprint=meta["fingerprint"],
                meters_per_unit=float(meta["meters_per_unit"]),
                embed_shape=meta["embed_shape"],
                frame_id=meta["frame_id"],
            )
            if not isinstance(meta["ids"], list):
                raise MapError(f"{source} has a malformed header: ids is not a list")
            if not (np.isfinite(out.meters_per_unit) and out.meters_per_unit > 0):
                raise MapError(f"{source} has meters_per_unit {out.meters_per_unit}")
            ids = [str(i) for i in meta["ids"]]
            emb, poses = tensors["embeddings"], tensors["poses"]
        except MapError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise MapError(f"{source} has a malformed header: {exc}") from exc
        if expected_fingerprint is not None:
            out.check_fingerprint(expected_fingerprint, source=source)
        if emb.dtype != np.float32 or poses.dtype not in (np.float64, np.float32):
            raise MapError(f"{source}: embeddings are {emb.dtype} and poses {poses.dtype}, expected float32 and "
                           "float64")
        if len(ids) == 0 and (emb.size or poses.size):
            raise MapError(f"{source}: no ids but embeddings {emb.shape} and poses {poses.shape}")
        if len(ids) and (emb.shape != (len(ids), *out.embed_shape) or poses.shape != (len(ids), 3)):
            raise MapError(f"{source}: {len(ids)} ids but embeddings {emb.shape} and poses {poses.shape}")
        if len(ids):
            out.add(embeddings=emb, poses=poses, ids=ids)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, expected_fingerprint: str | None = None) -> ViewMap:
        """Read a map file; :class:`MapError` if unreadable, :class:`FingerprintMismatchError` if foreign."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MapError(f"cannot read map file {path}: {exc}") from exc
        return cls.from_bytes(data, source=f"map file {path}", expected_fingerprint=expected_fingerprint)
