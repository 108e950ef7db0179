"""rlsync: move model weights from RL trainers to inference engines, every step, fast and safely.

The core package holds what both sides share (protocol, codec, bucket layout, transports,
config) plus the CLI and launcher, the only code that imports both `trainer_side` and
`infer_side`.
"""

__version__ = "0.1.0"
