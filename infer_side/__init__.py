"""Inference side, one folder per role:
- `update`: the weight-update state machine (open `update_machine.py` first: the update
  order) and the engine interface it drives (`engine_api`); engine-agnostic.
- `engines`: what every backend shares (`core_base`, requests, HF-named weight stores,
  checkpoint loading), then one folder per backend: `native` (our paged-KV engine) and
  `vllm` (vLLM stepped in our process).
- `process`: the ZMQ server process and its client (thin shells); `actor.py`: the Ray actor.
Knows nothing of training; never imports `trainer_side`.
"""
