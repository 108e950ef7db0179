"""Trainer side: the policy model (Hugging Face parameter names), PPO, TrainerActor, WeightPusher.

Knows nothing of the inference engine's internals; it talks to engines only through the
protocol in `rlsync`.
"""
