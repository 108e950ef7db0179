"""ModelWeights: fused storage, HF views, validate-then-load, fingerprints."""

from __future__ import annotations

import pytest
import torch

from infer_side.engines.weights import ModelWeights, WeightError
from rlsync.model_config import ModelConfig
from rlsync.plan.buckets import dtype_name, tensor_fingerprint

CONFIGS = {
    "llama": ModelConfig(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    ),
    "qwen2-tied": ModelConfig(
        model_type="qwen2",
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=64,
        tie_word_embeddings=True,
    ),
}


@pytest.fixture(params=list(CONFIGS))
def cfg(request) -> ModelConfig:
    return CONFIGS[request.param]


def random_tensors(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(s, generator=gen).to(dtype) for n, s in cfg.hf_parameter_shapes().items()
    }


def loaded(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> ModelWeights:
    weights = ModelWeights.empty(cfg, dtype)
    weights.load(random_tensors(cfg, dtype).items())
    return weights


def test_views_cover_hf_names_and_share_storage(cfg):
    weights = ModelWeights.empty(cfg)
    views = weights.hf_views()
    assert {n: tuple(v.shape) for n, v in views.items()} == cfg.hf_parameter_shapes()
    fused_ptrs = {t.untyped_storage().data_ptr() for t in weights.fused().values()}
    assert all(v.untyped_storage().data_ptr() in fused_ptrs for v in views.values())
    views["model.layers.1.self_attn.k_proj.weight"][0, 0] = 7.0
    assert weights.layers[1].qkv_proj[cfg.q_size, 0] == 7.0
    views["model.layers.0.mlp.up_proj.weight"][2, 3] = 5.0
    assert weights.layers[0].gate_up_proj[cfg.intermediate_size + 2, 3] == 5.0
    assert (weights.lm_head is None) == cfg.tie_word_embeddings
    assert (weights.layers[0].qkv_bias is not None) == cfg.attention_bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_round_trips_bit_exactly(cfg, dtype):
    src = random_tensors(cfg, dtype)
    weights = ModelWeights.empty(cfg, dtype)
    assert weights.load(src.items()) == len(src)
    views = weights.hf_views()
    assert all(torch.equal(views[n], t) for n, t in src.items())
    assert weights.fingerprints() == {n: tensor_fingerprint(t) for n, t in src.items()}
    q, kv = cfg.q_size, cfg.kv_size
    qkv = weights.layers[0].qkv_proj
    assert torch.equal(qkv[q + kv :], src["model.layers.0.self_attn.v_proj.weight"])
    assert weights.expected()["model.norm.weight"] == (dtype_name(dtype), (cfg.hidden_size,))
    assert weights.nbytes == sum(t.numel() * t.element_size() for t in src.values())


def _bad_updates(cfg: ModelConfig) -> dict[str, tuple[str, list[tuple[str, torch.Tensor]]]]:
    """case -> (name the error must mention, update with the bad item last)."""
    fresh = list(random_tensors(cfg, seed=1).items())
    name, t = fresh[-1]
    return {
        "unknown": (
            "model.layers.9.mlp.gate_proj.weight",
            fresh + [("model.layers.9.mlp.gate_proj.weight", t)],
        ),
        "missing": (name, fresh[:-1]),
        "shape": (name, fresh[:-1] + [(name, t[:-1])]),
        "dtype": (name, fresh[:-1] + [(name, t.to(torch.bfloat16))]),
        "duplicate": (fresh[0][0], fresh + [fresh[0]]),
    }


@pytest.mark.parametrize("case", ["unknown", "missing", "shape", "dtype", "duplicate"])
def test_bad_update_names_tensor_and_changes_nothing(cfg, case):
    weights = loaded(cfg)
    before = weights.fingerprints()
    culprit, update = _bad_updates(cfg)[case]
    with pytest.raises(WeightError, match=culprit.replace(".", r"\.")):
        weights.load(update)
    assert weights.fingerprints() == before


def test_validate_specs_and_partial_load(cfg):
    weights = loaded(cfg)
    with pytest.raises(WeightError, match="model.norm.weight"):
        weights.validate([("model.norm.weight", "float16", (cfg.hidden_size,))], complete=False)
    weights.validate([("model.norm.weight", "float32", [cfg.hidden_size])], complete=False)
    before = weights.fingerprints()
    weights.load([("model.norm.weight", torch.full((cfg.hidden_size,), 3.0))], complete=False)
    after = weights.fingerprints()
    assert [n for n in after if after[n] != before[n]] == ["model.norm.weight"]
    with pytest.raises(WeightError, match="'x'"):
        weights.load([("x", [1.0])])


def test_clone_empty_and_copy_from(cfg):
    weights = loaded(cfg)
    shadow = weights.clone_empty()
    assert shadow.expected() == weights.expected()
    assert all(not v.any() for v in shadow.hf_views().values())
    shadow.copy_from(weights)
    assert shadow.fingerprints() == weights.fingerprints()
    weights.norm.add_(1.0)
    assert shadow.fingerprints()["model.norm.weight"] != weights.fingerprints()["model.norm.weight"]
    with pytest.raises(WeightError):
        shadow.copy_from(ModelWeights.empty(cfg, torch.bfloat16))


def test_fingerprint_changes_with_one_element(cfg):
    weights = loaded(cfg)
    before = weights.fingerprints()
    name = "model.layers.1.mlp.gate_proj.weight"
    weights.hf_views()[name][3, 5] += 1.0
    after = weights.fingerprints()
    assert [n for n in after if after[n] != before[n]] == [name]
    assert weights.fingerprints([name]) == {name: after[name]}
    with pytest.raises(WeightError, match="nope"):
        weights.fingerprints(["nope"])


def test_store_made_under_inference_mode_is_writable_outside(cfg):
    with torch.inference_mode():
        weights = ModelWeights.empty(cfg)
        shadow = weights.clone_empty()
    src = random_tensors(cfg)
    weights.hf_views()["model.norm.weight"].copy_(src["model.norm.weight"])
    shadow.load(src.items())
    weights.copy_from(shadow)
    assert weights.fingerprints() == shadow.fingerprints()
