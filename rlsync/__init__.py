"""rlsync: move model weights from RL trainers to inference engines, every step, fast and safely.

Layers, each importing only those below it (`tests/test_layers.py` enforces this):
- the library core, here: `wire` (what crosses a process), `plan` (bucket layout, delta
  format), `transports` (one module per transport, both halves; `transports.sharded` for
  FSDP ranks) and the configs (`config`, `model_config`, `checkpoint_io`, `procs`); it
  imports neither side.
- `trainer_side` and `infer_side`: each imports the library, never the other.
- `rlsync.app` (the RL loop on Ray) and `rlsync.cli` on top of both sides; `rlsync.bench`
  above everything, imported by nothing but the CLI.
"""

__version__ = "0.1.0"
