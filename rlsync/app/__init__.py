"""The RL application on top of the library: run config (YAML), the Ray launcher and session,
per-step metrics and plots.

It imports the library (`rlsync` core), `trainer_side` and `infer_side`; nothing below it
imports it back. Needs the `app` extra (`pip install rlsync[app]`: Ray, PyYAML, tqdm,
matplotlib).
"""
