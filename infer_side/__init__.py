"""Inference side: the engine (model, KV pool, prefix cache, scheduler), its ZMQ server
process, the client and the InferenceActor.

Knows nothing of training; weights arrive through the protocol and transports in `rlsync`.
"""
