"""Our own engine (small, CPU-friendly, the reference backend): model and layers, paged KV
pool, radix prefix cache, scheduler, sampling; open `engine_core.py` first. Imports
`infer_side.engines` and `infer_side.update`, never another backend.
"""
