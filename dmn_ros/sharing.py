"""Multi-robot map sharing without ROS: shared-context records, validation, dedup, bounded merge.

Robots that share one global frame exchange *context views* (a pose plus either the
model's embedding ``V_i`` or the raw RGB image). Every view has a stable id
``"<robot_id>/<seq>"`` given once by the robot that saw it, so a view delivered twice
(re-sends, sync replies, several relaying peers) is merged once. :class:`ContextLedger`
holds what a robot knows (merged ids, the ids it dropped, images kept for re-sharing)
and applies the bounded-memory policy of :func:`thin_views`. The ROS adapter is
:mod:`dmn_ros.ros.mapping_node`; the wire layout is in :mod:`dmn_ros.ros.conversions`.
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dmn_ros.errors import DmnError
from dmn_ros.geometry import wrap_angle
from dmn_ros.maps import ViewMap

__all__ = [
    "MAX_ID_BYTES",
    "ContextBatch",
    "ContextLedger",
    "Rejection",
    "ShareFormat",
    "SharedContextError",
    "make_id",
    "parse_id",
    "robot_id_from_namespace",
    "thin_views",
]

MAX_ID_BYTES = 32
"""A stable id travels as a fixed 32-byte, NUL-padded UTF-8 field."""
_ID_RE = re.compile(r"^([A-Za-z0-9_.\-]+)/([0-9]{6,})$")


class SharedContextError(DmnError):
    """A shared-context message is malformed (layout, sizes), independent of any model."""


class ShareFormat(str, enum.Enum):
    """What a robot puts on the wire for each context it shares."""

    EMBEDDINGS = "embeddings"
    """``V_i`` float32 (D·h·w·4 bytes): no re-encoding at receivers, bit-identical maps; model-specific."""
    IMAGES = "images"
    """RGB uint8 (H·W·3 bytes): about 5× smaller and model-independent; every receiver re-encodes."""


class Rejection(str, enum.Enum):
    """Why a received context was not merged; each has a counter in :attr:`ContextLedger.counters`."""

    DUPLICATE = "duplicate"
    FINGERPRINT = "fingerprint"
    IMAGE_SIZE = "image_size"
    EMBED_SHAPE = "embed_shape"
    NON_FINITE = "non_finite"
    FRAME = "frame"
    BAD_ID = "bad_id"
    ID_COLLISION = "id_collision"
    """An unknown view with this robot's ``robot_id``: another robot uses the same id, or this robot
    restarted without its ``map_file``. Never merged; :attr:`ContextLedger.own_seq_floor` moves past it."""


def make_id(robot_id: str, seq: int) -> str:
    """The stable id of a robot's ``seq``-th context; :class:`ValueError` if it would not fit the wire."""
    vid = f"{robot_id}/{int(seq):06d}"
    if parse_id(vid) is None:
        raise ValueError(f"robot_id {robot_id!r} gives an invalid or too long (> {MAX_ID_BYTES} bytes) id {vid!r}")
    return vid


def parse_id(vid: str) -> tuple[str, int] | None:
    """``"robot1/000042"`` → ``("robot1", 42)``; None if it is not a valid stable id."""
    if len(vid.encode()) > MAX_ID_BYTES:
        return None
    m = _ID_RE.match(vid)
    return (m.group(1), int(m.group(2))) if m else None


def robot_id_from_namespace(namespace: str, default: str = "robot1") -> str:
    """``"/robot2"`` → ``"robot2"``, ``"/fleet/robot2"`` → ``"fleet_robot2"``; the root namespace → ``default``."""
    ns = namespace.strip("/").replace("/", "_")
    return ns or default


@dataclass
class ContextBatch:
    """One shared-context message, decoded but not yet trusted.

    Exactly one of ``embeddings`` / ``images`` is set. ``fingerprint`` is the embedding
    model's (None for images, which are model-independent).
    """

    frame_id: str
    ids: list[str]
    poses: np.ndarray
    """``(n, 3)`` float64 metric ``(x, y, yaw)`` in ``frame_id``."""
    embeddings: np.ndarray | None = None
    """``(n, D, h, w)`` float32, or None."""
    images: np.ndarray | None = None
    """``(n, H, W, 3)`` uint8 RGB, or None."""
    fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def format(self) -> ShareFormat:
        return ShareFormat.EMBEDDINGS if self.embeddings is not None else ShareFormat.IMAGES

    def select(self, keep: Sequence[int]) -> ContextBatch:
        idx = list(keep)
        return ContextBatch(
            frame_id=self.frame_id, ids=[self.ids[i] for i in idx], poses=self.poses[idx],
            embeddings=None if self.embeddings is None else self.embeddings[idx],
            images=None if self.images is None else self.images[idx], fingerprint=self.fingerprint,
        )


def thin_views(poses: np.ndarray, ids: Sequence[str], max_views: int, *, heading_scale_m: float = 2.0) -> list[int]:
    """Indices to drop so that at most ``max_views`` remain, keeping the most distinct coverage.

    Greedy: while over budget, take the closest pair of views in the distance
    ``sqrt(dx² + dy² + (heading_scale_m · Δyaw)²)`` (Δyaw wrapped) and drop the member
    whose nearest *other* neighbour is closer (it covers less on its own); a tie drops the
    larger id, so robots holding the same views drop the same ones.
    ``poses (N, 3)``; O(N²) memory per call.
    """
    n = len(ids)
    if max_views < 0:
        raise ValueError("max_views must be >= 0")
    if n <= max_views:
        return []
    p = np.asarray(poses, dtype=np.float64).reshape(n, 3)
    d_xy = p[:, None, :2] - p[None, :, :2]
    d_yaw = wrap_angle(p[:, None, 2] - p[None, :, 2]) * float(heading_scale_m)
    dist = np.sqrt((d_xy**2).sum(-1) + d_yaw**2)
    np.fill_diagonal(dist, np.inf)
    alive = np.ones(n, dtype=bool)
    dropped: list[int] = []
    for _ in range(n - max_views):
        if max_views == 0 or alive.sum() == 1:
            # Nothing to compare against: drop the largest id, for determinism.
            i = int(max(np.flatnonzero(alive), key=lambda j: ids[j]))
        else:
            flat = int(np.argmin(dist))
            a, b = divmod(flat, n)
            # Nearest neighbour of each member other than its partner.
            da = np.min(np.where(np.arange(n) == b, np.inf, dist[a])) if alive.sum() > 2 else np.inf
            db = np.min(np.where(np.arange(n) == a, np.inf, dist[b])) if alive.sum() > 2 else np.inf
            if da != db:
                i = a if da < db else b
            else:
                i = a if ids[a] > ids[b] else b
        alive[i] = False
        dist[i, :] = np.inf
        dist[:, i] = np.inf
        dropped.append(i)
    return dropped


@dataclass
class MergeResult:
    """What one :meth:`ContextLedger.commit` changed."""

    added: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    """Ids removed by the bounded-memory policy (possibly some just added)."""


class ContextLedger:
    """Which shared views a robot holds, has seen, and may re-share; the merge and memory policy.

    The :class:`~dmn_ros.maps.ViewMap` stays the single store of embeddings and poses;
    the ledger adds the dedup memory (ids merged or dropped, so neither comes back),
    the images kept for re-sharing in :attr:`ShareFormat.IMAGES` mode and counters.
    """

    def __init__(
        self,
        *,
        robot_id: str,
        fingerprint: str,
        frame_id: str,
        image_size: tuple[int, int],
        embed_shape: Sequence[int],
        max_contexts: int = 0,
        heading_scale_m: float = 2.0,
        keep_images: bool = False,
    ) -> None:
        self.robot_id = robot_id
        self.fingerprint = fingerprint
        self.frame_id = frame_id
        self.image_size = (int(image_size[0]), int(image_size[1]))
        """``(H, W)`` the model embeds; shared images of another size are rejected."""
        self.embed_shape = tuple(int(v) for v in embed_shape)
        self.max_contexts = int(max_contexts)
        """Most views kept (0: unbounded); beyond it :func:`thin_views` drops views."""
        self.heading_scale_m = float(heading_scale_m)
        self.keep_images = bool(keep_images)
        self.known: set[str] = set()
        """Ids merged at some point, including those dropped since: re-deliveries are ignored."""
        self.images: dict[str, np.ndarray] = {}
        """RGB of held views, by id (only with ``keep_images``), to re-share them as images."""
        self.own_seq_floor = 0
        """One past the highest sequence number seen with this robot's id: new own ids start here at least,
        so a robot restarted without its map does not reuse ids that peers already hold."""
        self.counters: Counter[str] = Counter({k: 0 for k in ("received", "own_echo", "merged", "thinned")})
        self.counters.update({r.value: 0 for r in Rejection})
        """``received`` (views from peers), ``own_echo`` (own views coming back, ignored), ``merged`` (own and
        peers' views added), ``thinned`` and one per :class:`Rejection` value."""

    # ---- receiving --------------------------------------------------------------------------
    def screen(self, batch: ContextBatch) -> tuple[ContextBatch, list[tuple[Rejection, str]]]:
        """Keep the contexts of ``batch`` that are valid and new; the rest are counted and described."""
        problems: list[tuple[Rejection, str]] = []
        for parsed in map(parse_id, batch.ids):
            if parsed is not None and parsed[0] == self.robot_id:
                self.own_seq_floor = max(self.own_seq_floor, parsed[1] + 1)
        echo = [i for i, v in enumerate(batch.ids) if v in self.known and (parse_id(v) or ("",))[0] == self.robot_id]
        if echo:  # our own views coming back (our own publication, or a peer's sync reply): not news
            self.counters["own_echo"] += len(echo)
            batch = batch.select([i for i in range(len(batch)) if i not in set(echo)])
        n = len(batch)
        self.counters["received"] += n

        def reject_all(reason: Rejection, detail: str) -> tuple[ContextBatch, list[tuple[Rejection, str]]]:
            self.counters[reason.value] += n
            return batch.select([]), [(reason, detail)]

        if batch.frame_id != self.frame_id:
            return reject_all(Rejection.FRAME, f"frame '{batch.frame_id}', expected '{self.frame_id}'")
        if batch.embeddings is not None:
            if batch.fingerprint != self.fingerprint:
                return reject_all(Rejection.FINGERPRINT, f"embedded by model {batch.fingerprint}, "
                                                         f"this robot runs {self.fingerprint}")
            if tuple(batch.embeddings.shape[1:]) != self.embed_shape:
                return reject_all(Rejection.EMBED_SHAPE, f"embeddings {tuple(batch.embeddings.shape[1:])}, "
                                                         f"expected {self.embed_shape}")
        elif batch.images is not None:
            if tuple(batch.images.shape[1:3]) != self.image_size:
                return reject_all(Rejection.IMAGE_SIZE, f"images {tuple(batch.images.shape[1:3])}, "
                                                        f"the model takes {self.image_size}")
        keep: list[int] = []
        seen_here: set[str] = set()
        for i, vid in enumerate(batch.ids):
            reason, detail = None, ""
            parsed = parse_id(vid)
            if parsed is None:
                reason, detail = Rejection.BAD_ID, f"invalid id {vid!r}"
            elif vid in self.known or vid in seen_here:
                reason = Rejection.DUPLICATE
            elif parsed[0] == self.robot_id:
                reason, detail = Rejection.ID_COLLISION, f"a peer sends {vid!r} with this robot's robot_id"
            elif not np.isfinite(batch.poses[i]).all() or (
                batch.embeddings is not None and not np.isfinite(batch.embeddings[i]).all()
            ):
                reason, detail = Rejection.NON_FINITE, f"{vid} has a non-finite pose or embedding"
            if reason is None:
                keep.append(i)
                seen_here.add(vid)
            else:
                self.counters[reason.value] += 1
                if reason is not Rejection.DUPLICATE:
                    problems.append((reason, detail))
        return batch.select(keep), problems

    # ---- merging ----------------------------------------------------------------------------
    def commit(self, view_map: ViewMap, *, ids: Sequence[str], poses: np.ndarray, embeddings: np.ndarray,
               images: np.ndarray | Sequence[np.ndarray] | None = None) -> MergeResult:
        """Add views (own or screened) to ``view_map``, remember their ids, then apply ``max_contexts``."""
        ids = list(ids)
        if ids:
            view_map.add(embeddings=embeddings, poses=poses, ids=ids)
            self.known.update(ids)
            if self.keep_images and images is not None:
                for vid, img in zip(ids, images, strict=True):
                    self.images[vid] = np.asarray(img, dtype=np.uint8)
        res = MergeResult(added=ids)
        if self.max_contexts > 0 and len(view_map) > self.max_contexts:
            drop = thin_views(view_map.poses, view_map.ids, self.max_contexts, heading_scale_m=self.heading_scale_m)
            res.dropped = [view_map.ids[i] for i in drop]
            view_map.remove(res.dropped)
            for vid in res.dropped:
                self.images.pop(vid, None)
            self.counters["thinned"] += len(res.dropped)
        self.counters["merged"] += len(ids)
        return res

    def mark_known(self, ids: Sequence[str]) -> None:
        """Views that arrived some other way (a loaded map file) count as seen."""
        self.known.update(ids)

    def forget(self) -> None:
        """After a map clear: forget the peers' ids (they may fill the map again) and every image.

        Own ids stay known: this robot is their only source, so they are never merged from a peer.
        """
        self.known = {v for v in self.known if (parse_id(v) or ("",))[0] == self.robot_id}
        self.images.clear()

    # ---- sharing ----------------------------------------------------------------------------
    def outgoing(self, view_map: ViewMap, ids: Sequence[str] | None = None, *,
                 fmt: ShareFormat = ShareFormat.EMBEDDINGS, batch_size: int = 50) -> list[ContextBatch]:
        """Batches to publish for ``ids`` (default: the whole map), at most ``batch_size`` views each.

        In images mode, views without a kept image (received as embeddings) go out as embeddings.
        """
        index = {v: i for i, v in enumerate(view_map.ids)}
        rows = [index[v] for v in (view_map.ids if ids is None else ids) if v in index]
        groups: dict[ShareFormat, list[int]] = {ShareFormat.EMBEDDINGS: [], ShareFormat.IMAGES: []}
        for r in rows:
            use_image = fmt is ShareFormat.IMAGES and view_map.ids[r] in self.images
            groups[ShareFormat.IMAGES if use_image else ShareFormat.EMBEDDINGS].append(r)
        out: list[ContextBatch] = []
        step = max(int(batch_size), 1)
        for kind, rs in groups.items():
            for k in range(0, len(rs), step):
                part = rs[k : k + step]
                ids_part = [view_map.ids[r] for r in part]
                b = ContextBatch(frame_id=view_map.frame_id, ids=ids_part, poses=view_map.poses[part].copy(),
                                 fingerprint=view_map.fingerprint if kind is ShareFormat.EMBEDDINGS else None)
                if kind is ShareFormat.EMBEDDINGS:
                    b.embeddings = view_map.embeddings[part].copy()
                else:
                    b.images = np.stack([self.images[v] for v in ids_part])
                out.append(b)
        return out

    def next_seq(self, ids: Sequence[str]) -> int:
        """The first sequence number this robot has not used among ``ids`` (e.g. after loading a map)."""
        seqs = [p[1] for p in map(parse_id, ids) if p is not None and p[0] == self.robot_id]
        return max([*seqs, self.own_seq_floor - 1]) + 1
