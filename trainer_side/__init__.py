"""Trainer side, in two folders:
- `sync`: what a trainer imports to push (`WeightPusher`, the engine set, the atomic round,
  the delta planner, the push report, the FSDP sharded pusher); knows no PPO.
- `rl`: the PPO application (policy with Hugging Face names, PPO, tasks, learner, FSDP2
  wrapping, TrainerActor); it uses `sync` to push.
Knows nothing of the inference engine's internals: it talks to engines only through the
protocol and transports of `rlsync`; never imports `infer_side`.
"""
