"""How a push is laid out: buckets of tensors and their byte offsets (`buckets`, including
plans that follow an engine's store and the bounds an engine checks), and the lossless delta
format (`delta`: payloads; `delta_encode`: the trainer's encoder). Imports `rlsync.wire`
only.
"""
