"""dmn_ros.sharing without ROS: ids, validation, dedup, thinning, merge; plus the wire layout round trip."""

from __future__ import annotations

import numpy as np
import pytest

from dmn_ros.maps import ViewMap
from dmn_ros.sharing import (
    ContextBatch,
    ContextLedger,
    Rejection,
    ShareFormat,
    make_id,
    parse_id,
    robot_id_from_namespace,
    thin_views,
)

SHAPE = (4, 2, 2)
FP = "fp0001"


def _ledger(**kw) -> ContextLedger:
    args = {"robot_id": "robot2", "fingerprint": FP, "frame_id": "map", "image_size": (8, 8), "embed_shape": SHAPE}
    return ContextLedger(**{**args, **kw})


def _map() -> ViewMap:
    return ViewMap(fingerprint=FP, meters_per_unit=20.0, embed_shape=SHAPE, frame_id="map")


def _batch(ids, *, poses=None, emb=True, fp=FP, frame="map", img_hw=(8, 8)) -> ContextBatch:
    n = len(ids)
    rng = np.random.default_rng(n)
    poses = np.column_stack([np.arange(n) * 3.0, np.zeros(n), np.zeros(n)]) if poses is None else poses
    b = ContextBatch(frame_id=frame, ids=list(ids), poses=np.asarray(poses, dtype=np.float64))
    if emb:
        b.embeddings, b.fingerprint = rng.normal(size=(n, *SHAPE)).astype(np.float32), fp
    else:
        b.images = rng.integers(0, 255, size=(n, *img_hw, 3), dtype=np.uint8)
    return b


def test_ids():
    assert make_id("robot1", 42) == "robot1/000042"
    assert parse_id("robot1/000042") == ("robot1", 42)
    assert parse_id("robot1/1234567") == ("robot1", 1234567)
    for bad in ("robot1/42", "robot1", "/000001", "a b/000001", "x" * 30 + "/000001"):
        assert parse_id(bad) is None, bad
    with pytest.raises(ValueError):
        make_id("has space", 0)
    assert robot_id_from_namespace("/robot2") == "robot2"
    assert robot_id_from_namespace("/fleet/robot2/") == "fleet_robot2"
    assert robot_id_from_namespace("/") == "robot1"


def test_thinning_drops_the_least_distinct_view():
    # a and b are 0.5 m apart; b's next neighbour (c, 2.5 m) is closer than a's (5.5 m): b goes.
    poses = np.array([[0.0, 0, 0], [0.5, 0, 0], [3.0, 0, 0], [-5.5, 0, 0]])
    ids = ["a/000000", "b/000000", "c/000000", "d/000000"]
    assert thin_views(poses, ids, 3) == [1]
    assert thin_views(poses, ids, 4) == []
    # Heading counts: the same spot facing the other way (b) is a distinct view; c, 1 m from a, goes.
    poses = np.array([[0.0, 0, 0], [0.0, 0, np.pi], [1.0, 0, 0.05]])
    assert thin_views(poses, ["a/000000", "b/000000", "c/000000"], 2, heading_scale_m=2.0) == [2]
    assert thin_views(poses, ["a/000000", "b/000000", "c/000000"], 2, heading_scale_m=0.0) in ([0], [1])
    # Exact ties drop the larger id, whatever the order.
    poses = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    assert thin_views(poses, ["r/000001", "r/000000"], 1) == [0]
    assert thin_views(poses[::-1], ["r/000000", "r/000001"], 1) == [1]
    assert sorted(thin_views(poses, ["r/000001", "r/000000"], 0)) == [0, 1]


def test_thinning_keeps_spread_and_is_order_independent():
    rng = np.random.default_rng(3)
    poses = np.column_stack([rng.uniform(0, 20, 60), rng.uniform(0, 20, 60), rng.uniform(-3, 3, 60)])
    ids = [f"r/{i:06d}" for i in range(60)]
    drop = thin_views(poses, ids, 20)
    assert len(drop) == 40 and len(set(drop)) == 40
    perm = rng.permutation(60)
    drop_perm = thin_views(poses[perm], [ids[i] for i in perm], 20)
    assert {ids[i] for i in drop} == {ids[perm[i]] for i in drop_perm}
    kept = np.delete(poses, drop, axis=0)
    nn = lambda p: np.sort(np.hypot(*(p[:, None, :2] - p[None, :, :2]).transpose(2, 0, 1)), axis=1)[:, 1]  # noqa: E731
    random_kept = poses[rng.choice(60, 20, replace=False)]
    assert nn(kept).min() > nn(random_kept).min()  # thinning spreads the kept views out


def test_screen_rejects_and_counts_each_reason():
    led = _ledger()
    for batch, reason in (
        (_batch(["robot1/000000"], frame="odom"), Rejection.FRAME),
        (_batch(["robot1/000000"], fp="other"), Rejection.FINGERPRINT),
        (_batch(["robot1/000000"], emb=False, img_hw=(16, 8)), Rejection.IMAGE_SIZE),
        (_batch(["robot1/000000", "bad id"]), Rejection.BAD_ID),
        (_batch(["robot1/000000"], poses=[[np.nan, 0, 0]]), Rejection.NON_FINITE),
        (_batch(["robot2/000007"]), Rejection.ID_COLLISION),
    ):
        _fresh, problems = led.screen(batch)
        assert led.counters[reason.value] >= 1 and problems[-1][0] is reason, reason
    assert led.own_seq_floor == 8 and led.next_seq([]) == 8  # a restarted robot does not reuse peers' ids
    b = _batch(["robot1/000000"])
    b.embeddings = np.zeros((1, 1, 1, 3), np.float32)
    assert len(led.screen(b)[0]) == 0 and led.counters["embed_shape"] == 1
    b = _batch(["robot1/000000"])
    b.embeddings[0, 0, 0, 0] = np.inf
    assert len(led.screen(b)[0]) == 0 and led.counters["non_finite"] == 2
    assert led.counters["received"] == 9 and led.counters["merged"] == 0


def test_merge_dedup_echo_and_images():
    led, vm = _ledger(keep_images=True), _map()
    b = _batch(["robot1/000000", "robot1/000001", "robot1/000001"], emb=False)
    fresh, _ = led.screen(b)
    assert fresh.ids == ["robot1/000000", "robot1/000001"] and led.counters["duplicate"] == 1
    emb = np.ones((2, *SHAPE), np.float32)
    res = led.commit(vm, ids=fresh.ids, poses=fresh.poses, embeddings=emb, images=fresh.images)
    assert res.added == fresh.ids and not res.dropped and len(vm) == 2 and set(led.images) == set(fresh.ids)
    fresh, _ = led.screen(_batch(["robot1/000001", "robot3/000000"]))  # re-delivery + a new robot
    assert fresh.ids == ["robot3/000000"] and led.counters["duplicate"] == 2
    led.commit(vm, ids=["robot2/000000"], poses=[[9.0, 9.0, 0.0]], embeddings=np.zeros((1, *SHAPE)))  # own view
    fresh, _ = led.screen(_batch(["robot2/000000"]))  # own view relayed back by a peer: an echo, not news
    assert len(fresh) == 0 and led.counters["own_echo"] == 1 and led.counters["id_collision"] == 0
    led.forget()
    assert led.known == {"robot2/000000"} and not led.images
    assert led.screen(_batch(["robot1/000000"]))[0].ids == ["robot1/000000"]


def test_max_contexts_thins_and_dropped_views_stay_dropped():
    led, vm = _ledger(max_contexts=3), _map()
    poses = np.array([[0.0, 0, 0], [10.0, 0, 0], [20.0, 0, 0], [10.2, 0, 0]])
    ids = ["robot1/000000", "robot1/000001", "robot1/000002", "robot1/000003"]
    res = led.commit(vm, ids=ids, poses=poses, embeddings=np.zeros((4, *SHAPE)))
    assert len(vm) == 3 and len(res.dropped) == 1 and res.dropped[0] in ("robot1/000001", "robot1/000003")
    assert led.counters["thinned"] == 1
    fresh, _ = led.screen(_batch(res.dropped))  # a peer re-sends it: ignored, no churn
    assert len(fresh) == 0


def test_outgoing_batches_and_formats():
    led, vm = _ledger(keep_images=True), _map()
    ids = [make_id("robot2", i) for i in range(5)]
    imgs = np.zeros((5, 8, 8, 3), np.uint8)
    led.commit(vm, ids=ids[:3], poses=np.zeros((3, 3)) + np.arange(3)[:, None], embeddings=np.ones((3, *SHAPE)),
               images=imgs[:3])
    led.commit(vm, ids=ids[3:], poses=np.zeros((2, 3)) + 7 + np.arange(2)[:, None], embeddings=np.ones((2, *SHAPE)),
               images=imgs[3:])
    led.images.pop(ids[4])  # as if received as an embedding
    out = led.outgoing(vm, fmt=ShareFormat.EMBEDDINGS, batch_size=2)
    assert [len(b) for b in out] == [2, 2, 1] and all(b.fingerprint == FP for b in out)
    assert [v for b in out for v in b.ids] == ids
    out = led.outgoing(vm, fmt=ShareFormat.IMAGES, batch_size=10)
    kinds = {b.format: b.ids for b in out}
    assert kinds[ShareFormat.IMAGES] == ids[:4] and kinds[ShareFormat.EMBEDDINGS] == ids[4:]
    assert out[1].fingerprint is None and out[1].images.shape == (4, 8, 8, 3)
    assert led.outgoing(vm, ["robot2/999999"]) == []


def test_wire_layout_round_trip_and_malformed():
    pytest.importorskip("sensor_msgs")
    from builtin_interfaces.msg import Time

    from dmn_ros.ros.conversions import pointcloud_to_shared_batch, shared_batch_to_pointcloud
    from dmn_ros.sharing import SharedContextError

    for emb in (True, False):
        b = _batch(["robot1/000000", "fleet_robot12/1234567"], emb=emb,
                   poses=[[1.0 / 3, -2.5, 3.1], [1e6 + 0.1, 2.0, -0.7]])
        msg = shared_batch_to_pointcloud(b, stamp=Time(sec=1))
        payload = 4 * int(np.prod(SHAPE)) if emb else 8 * 8 * 3
        assert msg.point_step == 56 + payload and len(msg.data) == 2 * msg.point_step
        back = pointcloud_to_shared_batch(msg, embed_shape=SHAPE)
        assert back.ids == b.ids and back.frame_id == "map"
        np.testing.assert_array_equal(back.poses, b.poses)  # float64 on the wire: bit-identical
        if emb:
            assert back.fingerprint == FP
            np.testing.assert_array_equal(back.embeddings, b.embeddings)
        else:
            assert back.fingerprint is None
            np.testing.assert_array_equal(back.images, b.images)
    wrong = pointcloud_to_shared_batch(msg, embed_shape=(2, 2, 2))  # images do not depend on embed_shape
    assert wrong.images.shape == (2, 8, 8, 3)
    msg = shared_batch_to_pointcloud(_batch(["robot1/000000"]), stamp=Time(sec=1))
    assert pointcloud_to_shared_batch(msg, embed_shape=(2, 2, 2)).embeddings.shape == (1, 1, 1, 16)
    msg.data = bytes(msg.data)[:-4]
    with pytest.raises(SharedContextError):
        pointcloud_to_shared_batch(msg, embed_shape=SHAPE)
    msg = shared_batch_to_pointcloud(_batch(["robot1/000000"]), stamp=Time(sec=1))
    msg.fields = msg.fields[1:]
    with pytest.raises(SharedContextError):
        pointcloud_to_shared_batch(msg, embed_shape=SHAPE)
