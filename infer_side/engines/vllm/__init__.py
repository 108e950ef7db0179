"""The vLLM backend: a vLLM `LLMEngine` stepped in our process behind the same update
machine (`vllm_core.py`). Imports `infer_side.engines` and `infer_side.update`, never our
own engine.
"""
