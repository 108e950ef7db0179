"""Engine backends, and what they all share: `core_base` (messages in, replies out, the
update machine beside the core), `request` (one generation request), `weights` (HF-named
views into one flat store), `checkpoint` (loading a safetensors checkpoint). Each backend
is a folder (`native`, `vllm`) implementing `infer_side.update.engine_api`; backends never
import each other.
"""
