"""rlsync: move model weights from RL trainers to inference engines, every step, fast and safely.

Layers, each importing only those below it (`tests/test_layers.py` enforces this):
- the library (`rlsync.*` top-level modules and `rlsync.transports`): protocol + codec, bucket
  layout, transports, checkpoint I/O, model/sync/engine configs; it imports neither side.
- `trainer_side` and `infer_side`: each imports the library, never the other.
- `rlsync.app` (the RL loop on Ray: run config, launcher, metrics, plots), `rlsync.bench` and
  `rlsync.cli`: the only code that imports both sides.
"""

__version__ = "0.1.0"
