"""Row ranges of a sharded broadcast push, on hand-made plans: each sender's pieces tile
every tensor exactly, bad row splits are refused naming the tensor (by `check_rows` and by
an engine's broadcast receiver, before any byte moves), and the wire keeps rows typed."""

from __future__ import annotations

import pytest

from rlsync.plan.buckets import plan_buckets
from rlsync.transports.broadcast import Receiver
from rlsync.transports.sharded.broadcast_rows import check_rows, pieces, row_count
from rlsync.wire import codec
from rlsync.wire.codec import ProtocolError
from rlsync.wire.protocol import DeltaInfo, UpdateWeightsFromDistributed

SPECS = [
    ("embed", "float32", (99, 8)),
    ("norm", "bfloat16", (8,)),
    ("scale", "float32", ()),
    ("up", "bfloat16", (70, 8)),
]


def chunked(n: int, senders: int) -> list[int]:
    step = -(-n // senders)
    return [min(r * step, n) for r in range(senders + 1)]


def rows_for(plan, senders: int) -> dict[str, list[int]]:
    specs = [s for b in plan.buckets for s in b.tensors]
    return {s.name: chunked(row_count(s), senders) for s in specs}


@pytest.mark.parametrize("senders", [1, 2, 3, 4])
@pytest.mark.parametrize("bucket_bytes", [64, 1 << 20])
def test_every_byte_of_every_tensor_is_sent_by_exactly_one_sender(senders, bucket_bytes):
    plan = plan_buckets(SPECS, bucket_bytes)
    rows = rows_for(plan, senders)
    check_rows(plan, rows, senders)
    for bucket in plan.buckets:
        covered = [p for r in range(senders) for p in pieces(bucket, rows, r)]
        for spec in bucket.tensors:
            mine = sorted((p.at, p.at + p.nbytes) for p in covered if p.spec.name == spec.name)
            ends = [spec.offset] + [b for _, b in mine]
            assert [a for a, _ in mine] == ends[:-1]  # back to back, no gap, no overlap
            assert ends[-1] == spec.offset + spec.nbytes
    # uneven: 99 rows over 4 senders is 25, 25, 25, 24; a 0-dim tensor is sender 0's
    if senders == 4:
        assert rows["embed"] == [0, 25, 50, 75, 99] and rows["scale"] == [0, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda r: r.pop("up"), "'up' is missing"),
        (lambda r: r.update(ghost=[0, 1, 1]), "'ghost' is not a tensor"),
        (lambda r: r.update(up=[0, 70]), "rows['up']: 2 boundaries"),
        (lambda r: r.update(up=[0, 40, 30]), "rows['up']: [0, 40, 30] does not split"),
        (lambda r: r.update(up=[0, 35, 69]), "rows['up']: [0, 35, 69] does not split"),
        (lambda r: r.update(up=[1, 35, 70]), "rows['up']: [1, 35, 70] does not split"),
    ],
)
def test_bad_rows_are_refused_naming_the_tensor(change, named):
    plan = plan_buckets(SPECS, 1 << 20)
    rows = rows_for(plan, 2)
    change(rows)
    with pytest.raises(ValueError) as err:
        check_rows(plan, rows, 2)
    assert named in str(err.value)


def receiver_with(group: str, senders: int) -> Receiver:
    receiver = Receiver()
    receiver.groups[group] = [object()] * senders  # checked, never used: no byte moves
    return receiver


def test_an_engine_refuses_rows_that_do_not_fit_its_group():
    plan = plan_buckets(SPECS, 1 << 20)
    sharded, single = receiver_with("g", 2), receiver_with("g", 1)
    ok = UpdateWeightsFromDistributed(group_name="g", plan=plan, rows=rows_for(plan, 2))
    assert sharded.check(ok, plan, None) == sum(b.nbytes for b in plan.buckets)
    cases = [
        (sharded, UpdateWeightsFromDistributed(group_name="g", plan=plan), "must say which rows"),
        (single, ok, "takes no rows"),
        (
            sharded,
            UpdateWeightsFromDistributed(group_name="g", plan=plan, rows=rows_for(plan, 3)),
            "rows['embed']: 4 boundaries, 2 senders need 3",
        ),
        (
            sharded,
            UpdateWeightsFromDistributed(
                group_name="g", plan=plan, rows=ok.rows, delta=DeltaInfo(base_version=1)
            ),
            "cannot carry delta",
        ),
    ]
    for receiver, msg, why in cases:
        with pytest.raises(ValueError, match=why.replace("[", r"\[")):
            receiver.check(msg, plan, None)


def test_rows_travel_as_typed_lists():
    plan = plan_buckets(SPECS, 1 << 20)
    msg = UpdateWeightsFromDistributed(group_name="g", plan=plan, rows=rows_for(plan, 2))
    assert codec.decode(codec.encode(msg)).rows == msg.rows
    bad = UpdateWeightsFromDistributed(group_name="g", rows={"up": [0, "35", 70]})
    with pytest.raises(ProtocolError, match=r"rows.up\[1\]"):
        codec.decode(codec.encode(bad))
