"""Hostile frames for the live fuzz of an engine server, built deterministically from a seed.

Each case is (category, parts): the parts of one multipart ZMQ message. Categories: random
bytes, truncated / bit-flipped / byte-smashed valid messages of every type, wrong field
types, huge declared msgpack lengths, unknown message types and shapes, valid messages with
absurd values, bucket plans that disagree with themselves or name unknown tensors (or carry
a plan_id that is not theirs), updates naming only a plan_id the engine may not know, reply
messages sent as requests, disk updates at missing/garbage checkpoints, IPC updates naming segments that do not exist (or
hold garbage), multipart messages with extra parts, and plain valid requests in between.

`harmless()` screens decodable frames before they are sent: a Shutdown would stop the
engine (that is obeying, not failing), and an InitWeightsGroup may only point at our own
dead loopback port with a short timeout (nothing beyond 127.0.0.1 is ever contacted).
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections.abc import Iterator

import msgpack

from rlsync.plan.buckets import plan_buckets
from rlsync.wire.codec import ProtocolError, decode, encode
from rlsync.wire.protocol import (
    CONTROL_MESSAGES,
    Abort,
    BucketPlan,
    ContinueGeneration,
    DestroyWeightsGroup,
    EngineDied,
    EngineInfo,
    FlushCache,
    Generate,
    GenerateOutput,
    GetInfo,
    GetWeightsFingerprint,
    GetWeightSpecs,
    InitWeightsGroup,
    Message,
    PauseGeneration,
    Result,
    SamplingParams,
    Shutdown,
    UpdateAccepted,
    UpdateDone,
    UpdateWeights,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromIPC,
    WeightFingerprints,
    WeightSpec,
    WeightSpecs,
    plan_id_of,
)
from tests.reliability.fuzz_targets import Targets

Case = tuple[str, list[bytes]]
BENIGN = tuple(c for c in (Generate, *CONTROL_MESSAGES) if not issubclass(c, UpdateWeights))
"""Requests that may succeed: a mutation that turns into one of them is not hostile (weight
updates aimed at nothing and replies sent as requests are always refused)."""
FAR_VERSION = 1 << 40
"""Every fuzzed update claims a version far ahead, so only validation can stop it."""
ODD_VALUES = [
    None,
    True,
    -1,
    0,
    1 << 63,
    (1 << 64) - 1,
    -(1 << 63),
    1.5,
    float("nan"),
    float("inf"),
    "",
    "x" * 300,
    b"\x00\xff",
    [],
    [1, "a"],
    {},
    {"k": [None]},
]


class FrameFactory:
    """Deterministic hostile cases for one model (`specs`: name -> (dtype, shape))."""

    def __init__(
        self,
        seed: int,
        specs: dict[str, tuple[str, tuple[int, ...]]],
        targets: Targets,
        dead_port: int,
    ):
        self.rng = random.Random(seed)
        self.specs, self.targets, self.dead_port = specs, targets, dead_port
        items = [(n, d, s) for n, (d, s) in specs.items()]
        self.plan = plan_buckets(items, 1 << 14)
        self.plan_id = plan_id_of(self.plan)
        self.count = 0
        self.categories = [
            self.random_bytes,
            self.truncated,
            self.bit_flipped,
            self.smashed,
            self.wrong_types,
            self.huge_lengths,
            self.unknown_shapes,
            self.absurd_values,
            self.bad_plans,
            self.bad_disk,
            self.bad_ipc,
            self.multipart,
            self.interleaved_valid,
        ]

    def cases(self, n: int) -> Iterator[Case]:
        """`n` cases, cycling through every category."""
        for i in range(n):
            make = self.categories[i % len(self.categories)]
            yield make.__name__, make()

    # ------------------------------------------------------------ valid bases

    def _rid(self) -> str:
        self.count += 1
        return f"fz{self.count}"

    def valid(self) -> Message:
        """A valid message of a random type (updates aimed at nothing that exists)."""
        rid, t = self._rid(), self.targets
        quick = {"weight_version": FAR_VERSION, "timeout_s": 0.5, "idle_timeout_s": 1.0}
        cases = [
            Generate(
                request_id=rid, input_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=2)
            ),
            Abort(request_id=rid, target_id="nobody"),
            InitWeightsGroup(request_id=rid, master_port=self.dead_port, timeout_s=0.2),
            DestroyWeightsGroup(request_id=rid, group_name="fuzz-none"),
            UpdateWeightsFromDistributed(
                request_id=rid,
                group_name="fuzz-none",
                plan_id=self.plan_id,
                plan=self.plan,
                **quick,
            ),
            UpdateWeightsFromIPC(
                request_id=rid,
                buffer=self.rng.choice(t.buffers),
                plan_id=self.plan_id,
                plan=self.plan,
                push_id=1,
                **quick,
            ),
            UpdateWeightsFromIPC(
                request_id=rid,
                buffer=self.rng.choice(t.buffers),  # id only
                plan_id=self.plan_id,
                push_id=1,
                **quick,
            ),
            UpdateWeightsFromDisk(request_id=rid, path=self.rng.choice(t.disk_paths), **quick),
            FlushCache(request_id=rid, empty_cache=False),
            ContinueGeneration(request_id=rid),
            GetWeightsFingerprint(request_id=rid, names=["model.norm.weight", "nope"]),
            GetWeightSpecs(request_id=rid),
            GetInfo(request_id=rid),
            Shutdown(request_id=rid),
            PauseGeneration(request_id=rid, mode=self.rng.choice(["abort", "retract", "in_place"])),
            # replies, sent the wrong way
            Result(request_id=rid, success=False, message="a"),
            GenerateOutput(request_id=rid, output_ids=[1]),
            EngineDied(request_id=rid, message="engine crashed: fuzz"),
            UpdateAccepted(request_id=rid, weight_version=FAR_VERSION, bytes=1 << 40),
            UpdateDone(request_id=rid, weight_version=FAR_VERSION, transport="ipc"),
            WeightFingerprints(
                request_id=rid, weight_version=FAR_VERSION, fingerprints={"model.norm.weight": 1}
            ),
            WeightSpecs(request_id=rid, specs=[WeightSpec(name="x", dtype="float32", shape=[1])]),
            EngineInfo(request_id=rid, weight_version=FAR_VERSION, model={"vocab_size": 1}),
        ]
        return cases[self.rng.randrange(len(cases))]

    def _plain(self) -> tuple[str, dict]:
        msg = self.valid()
        return type(msg).__name__, msgpack.unpackb(encode(msg))[1]

    # ------------------------------------------------------------ categories

    def random_bytes(self) -> list[bytes]:
        return [self.rng.randbytes(self.rng.randrange(0, 300))]

    def truncated(self) -> list[bytes]:
        frame = encode(self.valid())
        return [frame[: self.rng.randrange(0, len(frame))]]

    def _hostile(self, mutate) -> list[bytes]:  # noqa: ANN001 - a zero-argument mutation
        """`mutate()`'s frame, drawn again while it happens to be a valid request that may
        well succeed (a flip inside a GetInfo's request_id, names=None for a fingerprint):
        such a frame is no longer hostile, and the test expects every hostile one refused."""
        for _ in range(50):
            frame = mutate()
            try:
                msg = decode(frame)
            except ProtocolError:
                return [frame]
            if not isinstance(msg, BENIGN):
                return [frame]
        raise AssertionError("50 mutations in a row were valid requests")

    def bit_flipped(self) -> list[bytes]:
        def mutate() -> bytes:
            frame = bytearray(encode(self.valid()))
            for _ in range(self.rng.randint(1, 8)):
                frame[self.rng.randrange(len(frame))] ^= 1 << self.rng.randrange(8)
            return bytes(frame)

        return self._hostile(mutate)

    def smashed(self) -> list[bytes]:
        def mutate() -> bytes:
            frame = bytearray(encode(self.valid()))
            for _ in range(self.rng.randint(1, 4)):
                frame[self.rng.randrange(len(frame))] = self.rng.randrange(256)
            return bytes(frame)

        return self._hostile(mutate)

    def wrong_types(self) -> list[bytes]:
        def mutate() -> bytes:
            name, fields = self._plain()
            key = self.rng.choice(sorted(fields))
            fields[key] = self.rng.choice(ODD_VALUES)
            return msgpack.packb([name, fields], use_bin_type=True)

        return self._hostile(mutate)

    def huge_lengths(self) -> list[bytes]:
        """msgpack headers that declare ~4 G elements or bytes and carry almost none."""
        head = self.rng.choice(
            [b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9"]
        )  # arr/map/str/bin/ext 32
        declared = struct.pack(">I", self.rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1 << 28]))
        tail = self.rng.randbytes(self.rng.randrange(0, 16))
        prefix = self.rng.choice([b"", b"\x92\xa8Generate", b"\x92\xa8Generate\x81\xa9input_ids"])
        return [prefix + head + declared + tail]

    def unknown_shapes(self) -> list[bytes]:
        rid = self._rid()
        value = self.rng.choice(
            [
                ["Teleport", {"request_id": rid}],
                ["", {}],
                [7, {}],
                ["GetInfo"],
                ["GetInfo", {"request_id": rid}, 3],
                {"GetInfo": {}},
                "GetInfo",
                42,
                None,
                ["getinfo", {"request_id": rid}],
                ["Message", {"request_id": rid}],
                ["UpdateWeights", {"request_id": rid}],
                ["BucketUpdate", {"request_id": rid}],
                ["WeightSpec", {"name": "x", "dtype": "float32"}],
                ["GetInfo", {b"request_id": rid}],
                ["GetInfo", {"request_id": rid, "request_id ": "x"}],
                ["GetInfo", []],
            ]
        )
        return [msgpack.packb(value, use_bin_type=True)]

    def absurd_values(self) -> list[bytes]:
        rid, r = self._rid(), self.rng
        sampling = {
            "max_new_tokens": r.choice([-1, 0, 1 << 40, 255, 300]),
            "temperature": r.choice([-1.0, 1e9, 0.0]),
            "top_p": r.choice([-0.1, 2.0, 1.0]),
            "top_k": r.choice([-5, 0, 1 << 62]),
            "seed": r.choice([-1, None, 1 << 63]),
            "stop_token_ids": r.choice([[], [-1], list(range(2000))]),
        }
        fields = r.choice(
            [
                {
                    "input_ids": r.choice([[], [-1], [96], [(1 << 64) - 1], [1] * 300, [0] * 250]),
                    "sampling": {k: v for k, v in sampling.items() if r.random() < 0.5},
                },
                {"input_ids": [1, 2], "sampling": sampling},
            ]
        )
        return [msgpack.packb(["Generate", {"request_id": rid, **fields}], use_bin_type=True)]

    def bad_plans(self) -> list[bytes]:
        """Plans whose byte totals disagree with their entries, or that name the wrong tensors;
        each under its own plan_id, no id, the good plan's id (a poisoned cache entry if it
        were believed) or a made-up one; or no plan and an id the engine never saw."""
        plan, r = self._mutated_plan(), self.rng
        plan_id = r.choice([plan_id_of(plan), "", self.plan_id, r.randbytes(16).hex()])
        if r.random() < 0.15:
            plan, plan_id = None, r.choice(["", r.randbytes(16).hex(), "x" * 64])
        cls = r.choice([UpdateWeightsFromIPC, UpdateWeightsFromDistributed])
        extra = {"buffer": self.targets.buffers[0]} if cls is UpdateWeightsFromIPC else {}
        msg = cls(
            request_id=self._rid(),
            plan_id=plan_id,
            plan=plan,
            weight_version=FAR_VERSION,
            timeout_s=0.5,
            idle_timeout_s=1.0,
            **extra,
        )
        return [encode(msg)]

    def _mutated_plan(self) -> BucketPlan:
        plan = _copy_plan(self.plan)
        bucket = self.rng.choice(plan.buckets)
        spec = self.rng.choice(bucket.tensors)
        how = self.rng.randrange(9)
        if how == 0:
            bucket.nbytes += plan.alignment  # total disagrees with the entries
        elif how == 1:
            spec.nbytes += 4
        elif how == 2:
            spec.offset += 8
        elif how == 3:
            spec.name = "model.layers.77.self_attn.q_proj.weight"
        elif how == 4:
            bucket.tensors.remove(spec)
        elif how == 5:
            spec.dtype = self.rng.choice(["bfloat16", "float64", "int8", "complex32", "nope"])
        elif how == 6:
            spec.shape = [*spec.shape, 1]
        elif how == 7:
            bucket.tensors.append(dataclasses.replace(spec))
        else:
            plan.alignment = self.rng.choice([7, 1 << 20])
        return plan

    def bad_disk(self) -> list[bytes]:
        msg = UpdateWeightsFromDisk(
            request_id=self._rid(),
            weight_version=FAR_VERSION,
            path=self.rng.choice(self.targets.disk_paths),
            timeout_s=0.5,
            idle_timeout_s=1.0,
            load_mode=self.rng.choice(["in_place", "shadow"]),
        )
        return [encode(msg)]

    def bad_ipc(self) -> list[bytes]:
        msg = UpdateWeightsFromIPC(
            request_id=self._rid(),
            weight_version=FAR_VERSION,
            buffer=self.rng.choice(self.targets.buffers),
            plan_id=self.plan_id,
            plan=self.rng.choice([self.plan, None]),
            push_id=self.rng.choice([0, 1, 1 << 41]),
            timeout_s=0.5,
            idle_timeout_s=1.0,
            load_mode=self.rng.choice(["in_place", "shadow"]),
        )
        return [encode(msg)]

    def interleaved_valid(self) -> list[bytes]:
        """Plain requests mixed into the garbage: they must keep being served normally."""
        rid = self._rid()
        return [
            encode(
                self.rng.choice(
                    [
                        Generate(
                            request_id=rid,
                            input_ids=[self.rng.randrange(96) for _ in range(5)],
                            sampling=SamplingParams(max_new_tokens=3),
                        ),
                        GetInfo(request_id=rid),
                        GetWeightsFingerprint(request_id=rid, names=[]),
                        GetWeightSpecs(request_id=rid),
                    ]
                )
            )
        ]

    def multipart(self) -> list[bytes]:
        frame = encode(self.valid())
        extra = [
            self.rng.randbytes(self.rng.randrange(0, 20)) for _ in range(self.rng.randint(1, 4))
        ]
        return self.rng.choice([[frame, *extra], [*extra, frame], [b"", frame], [frame, frame]])


def _copy_plan(plan: BucketPlan) -> BucketPlan:
    return decode(encode(UpdateWeightsFromIPC(request_id="c", plan=plan))).plan  # deep copy


def harmless(parts: list[bytes], dead_port: int) -> bool:
    """False for a single frame that decodes to Shutdown, or to an InitWeightsGroup aimed
    anywhere but our dead loopback port within 1 s."""
    if len(parts) != 1:
        return True
    try:
        msg = decode(parts[0])
    except ProtocolError:
        return True
    if isinstance(msg, Shutdown):
        return False
    if isinstance(msg, InitWeightsGroup):
        return (msg.master_address, msg.master_port) == (
            "127.0.0.1",
            dead_port,
        ) and msg.timeout_s <= 1.0
    return True
