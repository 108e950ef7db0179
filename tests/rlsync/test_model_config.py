"""ModelConfig against Hugging Face: config.json in, config.json out, parameter names and shapes."""

from __future__ import annotations

import pytest
import transformers

from rlsync.model_config import ModelConfig, ModelConfigError

LLAMA_JSON = {  # the shape of a real Llama config.json (values shrunk)
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "rope_scaling": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "use_cache": True,
    "attention_bias": False,
}
QWEN2_JSON = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 160,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 21,
}


def _hf_config(cfg: ModelConfig) -> transformers.PretrainedConfig:
    cls = transformers.Qwen2Config if cfg.model_type == "qwen2" else transformers.LlamaConfig
    return cls(**cfg.to_hf_dict())


def _hf_model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    hf = _hf_config(cfg)
    cls = (
        transformers.Qwen2ForCausalLM
        if cfg.model_type == "qwen2"
        else transformers.LlamaForCausalLM
    )
    return {n: tuple(p.shape) for n, p in cls(hf).named_parameters()}


# ---------------------------------------------------------------- from config.json


def test_llama_config_json():
    cfg = ModelConfig.from_hf_dict(LLAMA_JSON)
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
        "llama",
        128,
        96,
        256,
    )
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (3, 6, 2)
    assert (cfg.head_dim, cfg.q_size, cfg.kv_size) == (16, 96, 32)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (500000.0, 1e-5, 1024)
    assert cfg.tie_word_embeddings and not cfg.attention_bias and cfg.torch_dtype == "bfloat16"


def test_qwen2_config_json_forces_attention_bias():
    cfg = ModelConfig.from_hf_dict(QWEN2_JSON)
    assert cfg.attention_bias and cfg.rope_theta == 1e6 and cfg.num_key_value_heads == 1
    assert ModelConfig.from_hf_dict({**QWEN2_JSON, "attention_bias": False}).attention_bias


def test_missing_kv_heads_means_multi_head_attention():
    raw = {k: v for k, v in LLAMA_JSON.items() if k != "num_key_value_heads"}
    assert ModelConfig.from_hf_dict(raw).num_key_value_heads == 6


@pytest.mark.parametrize(
    "raw, dtype",
    [
        ({"torch_dtype": "torch.float16"}, "float16"),
        ({"dtype": "bfloat16"}, "bfloat16"),
        ({}, "float32"),
    ],
)
def test_dtype_spellings(raw, dtype):
    base = {k: v for k, v in LLAMA_JSON.items() if k != "torch_dtype"}
    assert ModelConfig.from_hf_dict({**base, **raw}).torch_dtype == dtype


def test_rope_theta_from_rope_parameters():
    # config.json as transformers >= 5 writes it: no top-level rope_theta
    raw = {k: v for k, v in LLAMA_JSON.items() if k not in ("rope_theta", "rope_scaling")}
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 250000.0}
    assert ModelConfig.from_hf_dict(raw).rope_theta == 250000.0


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            "rope_parameters",
        ),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"attention_bias": True}, "attention_bias"),
        ({"model_type": "mistral"}, "model_type"),
        ({"num_key_value_heads": 4}, "num_key_value_heads"),
    ],
)
def test_what_we_would_compute_wrongly_is_refused_by_key(extra, key):
    with pytest.raises(ModelConfigError, match=key):
        ModelConfig.from_hf_dict({**LLAMA_JSON, **extra})


def test_from_dir_reads_a_saved_transformers_config(tmp_path):
    cfg = ModelConfig(
        model_type="qwen2",
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=123456.0,
        tie_word_embeddings=True,
    )
    _hf_config(cfg).save_pretrained(tmp_path)
    assert ModelConfig.from_dir(tmp_path) == cfg


def test_from_dir_without_config_json(tmp_path):
    with pytest.raises(ModelConfigError, match="config.json"):
        ModelConfig.from_dir(tmp_path)


# ---------------------------------------------------------------- to config.json


CASES = {
    "llama": ModelConfig(),
    "llama-tied-gqa": ModelConfig(
        tie_word_embeddings=True, num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5
    ),
    "llama-wide-heads": ModelConfig(head_dim=32, num_attention_heads=4, num_key_value_heads=4),
    "qwen2": ModelConfig(model_type="qwen2", num_hidden_layers=3),
    "qwen2-tied": ModelConfig(model_type="qwen2", tie_word_embeddings=True, num_key_value_heads=1),
}


@pytest.mark.parametrize("cfg", CASES.values(), ids=CASES.keys())
def test_to_hf_dict_loads_in_transformers_with_the_same_sizes(cfg):
    hf = _hf_config(cfg)
    assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size) == (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
    )
    assert (hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    assert (hf.tie_word_embeddings, hf.rms_norm_eps, hf.max_position_embeddings) == (
        cfg.tie_word_embeddings,
        cfg.rms_norm_eps,
        cfg.max_position_embeddings,
    )


@pytest.mark.parametrize("cfg", CASES.values(), ids=CASES.keys())
def test_config_survives_a_trip_through_transformers(cfg):
    assert ModelConfig.from_hf_dict(_hf_config(cfg).to_dict()) == cfg


@pytest.mark.parametrize("cfg", CASES.values(), ids=CASES.keys())
def test_parameter_shapes_match_the_transformers_model(cfg):
    assert cfg.hf_parameter_shapes() == _hf_model_shapes(cfg)


@pytest.mark.parametrize(
    "model_type, tied, layers, count",
    [
        ("llama", False, 2, 9 * 2 + 3),
        ("llama", True, 2, 9 * 2 + 2),
        ("llama", False, 5, 9 * 5 + 3),
        ("qwen2", False, 2, 12 * 2 + 3),
        ("qwen2", True, 3, 12 * 3 + 2),
    ],
)
def test_parameter_counts(model_type, tied, layers, count):
    cfg = ModelConfig(model_type=model_type, tie_word_embeddings=tied, num_hidden_layers=layers)
    shapes = cfg.hf_parameter_shapes()
    assert len(shapes) == count
    assert ("lm_head.weight" in shapes) is not tied
    assert ("model.layers.0.self_attn.q_proj.bias" in shapes) is (model_type == "qwen2")


def test_parameter_shapes_use_head_dim_not_hidden_size():
    shapes = ModelConfig(
        head_dim=32, num_attention_heads=4, num_key_value_heads=2
    ).hf_parameter_shapes()
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (128, 64)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (64, 64)
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (64, 128)


# ---------------------------------------------------------------- direct construction


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 65}, "hidden_size"),
        ({"head_dim": 7}, "head_dim"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_hidden_layers": 2.0}, "num_hidden_layers"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"model_type": "gpt2"}, "model_type"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_invalid_configs_are_refused_by_key(kw, key):
    with pytest.raises(ModelConfigError, match=key):
        ModelConfig(**kw)
