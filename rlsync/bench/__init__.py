"""Benchmarks: `rlsync bench sync` (weight sync vs baselines and the machine's limits) and
`rlsync bench generate` (engine throughput vs Hugging Face `generate`).

Like the CLI and the launcher, this package knows both sides: it drives a real
`trainer_side.sync.pusher.WeightPusher` against real `infer_side` engine processes. One role per
module:

- `model`: the Llama-shaped benchmark model of a given size, its weights and checkpoint.
- `stats`: rows, best/median, ratios, percentiles (pure functions).
- `probe`: the engine-pause probe (a streaming generate timed token by token).
- `ours`: our transports through the WeightPusher (broadcast, ipc, disk; in_place, shadow).
- `procs` + `receiver`: engine-side receiver processes for the baselines and limits.
- `baselines`: per-tensor broadcast and the safetensors disk round trip.
- `ray_baseline`: the Ray object store baseline.
- `pickle_baseline`: pickle over ZMQ; run as its own process, imported by nothing.
- `limits`: memcpy into a warm buffer and one raw broadcast of the same bytes.
- `profile`: each copy a push makes, timed alone (explains the end-to-end rows).
- `sync`: runs all of the above over sizes and engine counts.
- `report`: table, JSON and plot; `targets`: the issue's targets checked on a result.
- `generate`: the generation benchmark.
- `gpu`: the GPU section (CUDA IPC vs device copy; the flush with/without empty_cache).
"""
