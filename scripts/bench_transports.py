"""Throughput of the transports on this machine, next to its own limits.

    python scripts/bench_transports.py --gib 1 --bucket-mib 64 --repeats 3

Measures, for a plan of ~`gib` GiB of fp32 tensors in `bucket-mib` buckets:
  memcpy     one byte copy of the plan's size, and pack_bucket of every bucket, into warm
             (pre-faulted) buffers: the ceiling every transport's copies run into
  shm xN     ShmSender.push -> N engine processes copying each bucket into warm weights;
             end to end (push returns once every engine has loaded everything)
  gloo       send_buckets -> recv_buckets (engine copies into warm weights) vs one raw
             broadcast of a preallocated buffer of the same size
Every figure is the best of `repeats` runs after one warm-up (GB/s = 1e9 bytes/s).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from collections.abc import Callable

import torch

from rlsync.buckets import bucket_views, pack_bucket, plan_buckets, plan_total_bytes, specs_of
from rlsync.protocol import BucketPlan, IpcBuffer
from rlsync.transports.broadcast import BroadcastGroup, free_port, recv_buckets, send_buckets
from rlsync.transports.shm import ShmReceiver, ShmSender

SPAWN = mp.get_context("spawn")
TENSOR_MIB = 16


def make_model(gib: float) -> dict[str, torch.Tensor]:
    n = max(1, int(gib * 1024 / TENSOR_MIB))
    return {f"layers.{i}.weight": torch.full((TENSOR_MIB << 18,), float(i)) for i in range(n)}


def warm_weights(plan: BucketPlan) -> dict[str, torch.Tensor]:
    return {s.name: torch.zeros(s.shape) for b in plan.buckets for s in b.tensors}


def loader(weights: dict[str, torch.Tensor]) -> Callable:
    def on_bucket(index: int, bucket, buf: torch.Tensor) -> None:
        for name, view in bucket_views(bucket, buf):
            weights[name].copy_(view)
    return on_bucket


def best(fn: Callable[[], float], repeats: int) -> float:
    fn()  # warm-up
    return min(fn() for _ in range(repeats))


def bench_memcpy(plan: BucketPlan, tensors: dict[str, torch.Tensor], repeats: int
                 ) -> tuple[float, float]:
    """(one byte copy of the whole plan's size, pack_bucket of every bucket), both into
    warm buffers."""
    src = torch.ones(plan_total_bytes(plan), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    buf = torch.zeros(max(b.nbytes for b in plan.buckets), dtype=torch.uint8)

    def raw() -> float:
        t0 = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t0

    def pack() -> float:
        t0 = time.perf_counter()
        for bucket in plan.buckets:
            pack_bucket(bucket, tensors, buf)
        return time.perf_counter() - t0
    return best(raw, repeats), best(pack, repeats)


# ---------------------------------------------------------------- shm

def _shm_engine(fields: dict, plan_specs: list, bucket_bytes: int, rounds: int, ready,
                threads: int) -> None:
    torch.set_num_threads(threads)
    plan = plan_buckets(plan_specs, bucket_bytes=bucket_bytes)
    receiver = ShmReceiver(IpcBuffer(**fields))
    on_bucket = loader(warm_weights(plan))
    ready.set()
    for push_id in range(rounds):
        receiver.receive(plan, push_id, on_bucket, timeout_s=120)
    receiver.close()


def bench_shm(plan: BucketPlan, tensors: dict, engines: int, repeats: int, bucket_bytes: int) -> float:
    sender = ShmSender(plan, num_engines=engines)
    specs = specs_of(tensors.items())
    events = [SPAWN.Event() for _ in range(engines)]
    procs = [SPAWN.Process(target=_shm_engine, args=(
        vars(sender.descriptor(e)), specs, bucket_bytes, repeats + 1, events[e],
        torch.get_num_threads()))
        for e in range(engines)]
    for p in procs:
        p.start()
    for ev in events:
        assert ev.wait(300), "engine did not start"
    push_id = iter(range(repeats + 1))

    def run() -> float:
        t0 = time.perf_counter()
        stats = sender.push(plan, tensors, next(push_id), timeout_s=120)
        assert not stats.timed_out_engines
        return time.perf_counter() - t0
    try:
        return best(run, repeats)
    finally:
        for p in procs:
            p.join(120)
        sender.close()


# ---------------------------------------------------------------- gloo

def _gloo_engine(port: int, plan_specs: list, bucket_bytes: int, rounds: int, raw_bytes: int,
                 results, threads: int) -> None:
    torch.set_num_threads(threads)
    plan = plan_buckets(plan_specs, bucket_bytes=bucket_bytes)
    group = BroadcastGroup.create("127.0.0.1", port, 1, 2, timeout_s=300)
    on_bucket = loader(warm_weights(plan))
    raw = torch.zeros(raw_bytes, dtype=torch.uint8)
    for i in range(rounds):
        group.broadcast(torch.zeros(1))  # line up with the sender
        t0 = time.perf_counter()
        recv_buckets(group, plan, on_bucket, timeout_s=120)
        results[2 * i] = time.perf_counter() - t0
        group.broadcast(torch.zeros(1))
        t0 = time.perf_counter()
        group.broadcast(raw, 120)
        results[2 * i + 1] = time.perf_counter() - t0
    group.destroy()


def bench_gloo(plan: BucketPlan, tensors: dict, repeats: int, bucket_bytes: int
               ) -> tuple[float, float]:
    port, total = free_port(), plan_total_bytes(plan)
    results = SPAWN.Array("d", 2 * (repeats + 1))  # the engine's seconds, per round
    proc = SPAWN.Process(target=_gloo_engine, args=(
        port, specs_of(tensors.items()), bucket_bytes, repeats + 1, total, results,
        torch.get_num_threads()))
    proc.start()
    group = BroadcastGroup.create("127.0.0.1", port, 0, 2, timeout_s=300)
    raw = torch.zeros(total, dtype=torch.uint8)
    sends, raws = [], []
    for _ in range(repeats + 1):
        group.broadcast(torch.zeros(1))
        t0 = time.perf_counter()
        send_buckets(group, plan, tensors, timeout_s=120)
        t_send = time.perf_counter() - t0
        group.broadcast(torch.zeros(1))
        t0 = time.perf_counter()
        group.broadcast(raw, 120)
        raws.append(time.perf_counter() - t0)
        sends.append(t_send)
    proc.join(120)
    group.destroy()
    engine = list(results)  # end to end = the later of the two sides' finish
    bucketed = [max(s, r) for s, r in zip(sends, engine[0::2], strict=True)]
    raw_s = [max(s, r) for s, r in zip(raws, engine[1::2], strict=True)]
    return min(bucketed[1:]), min(raw_s[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--bucket-mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=["memcpy", "shm1", "shm2", "gloo"])
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads in every process (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tensors = make_model(args.gib)
    bucket_bytes = args.bucket_mib << 20
    plan = plan_buckets(specs_of(tensors.items()), bucket_bytes=bucket_bytes)
    total = plan_total_bytes(plan)
    print(f"plan: {total / 2**30:.2f} GiB in {len(plan.buckets)} buckets of "
          f"{args.bucket_mib} MiB; torch threads {torch.get_num_threads()}")

    def report(name: str, seconds: float) -> None:
        print(f"{name:<34} {seconds * 1e3:9.1f} ms  {total / seconds / 1e9:6.2f} GB/s", flush=True)

    if "memcpy" in args.only:
        raw, pack = bench_memcpy(plan, tensors, args.repeats)
        report("memcpy (one byte copy, warm)", raw)
        report("memcpy (pack_bucket, warm buffer)", pack)
    for n in (1, 2):
        if f"shm{n}" in args.only:
            report(f"shm push+receive, {n} engine(s)",
                   bench_shm(plan, tensors, n, args.repeats, bucket_bytes))
    if "gloo" in args.only:
        bucketed, raw = bench_gloo(plan, tensors, args.repeats, bucket_bytes)
        report("gloo send_buckets/recv_buckets", bucketed)
        report("gloo raw broadcast, one buffer", raw)


if __name__ == "__main__":
    main()
