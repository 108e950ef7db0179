"""Checkpoint files: atomic sharded write, bit-exact read, clear errors, transformers-loadable."""

from __future__ import annotations

import json

import pytest
import torch

from rlsync.checkpoint_io import (
    INDEX_FILE,
    CheckpointError,
    checkpoint_specs,
    iter_checkpoint_tensors,
    read_checkpoint_metadata,
    write_checkpoint,
)
from rlsync.model_config import ModelConfig
from tests.checkpoints import load_hf_model, make_hf_checkpoint

CFG = ModelConfig(
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
)


def tensors(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(s, generator=gen).to(dtype) for n, s in CFG.hf_parameter_shapes().items()
    }


def read_all(path) -> dict[str, torch.Tensor]:
    out = dict(iter_checkpoint_tensors(path))
    assert all(t.device.type == "cpu" for t in out.values())
    return out


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_file_round_trip(tmp_path, dtype):
    src = tensors(dtype)
    write_checkpoint(tmp_path / "ck", CFG, src, metadata={"weight_version": "7"})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert_bit_equal(read_all(tmp_path / "ck"), src)
    assert read_checkpoint_metadata(tmp_path / "ck") == {"weight_version": "7"}
    assert ModelConfig.from_dir(tmp_path / "ck") == CFG


def test_sharded_round_trip_with_index(tmp_path):
    src = tensors()
    write_checkpoint(tmp_path / "ck", CFG, src, max_shard_bytes=20_000, metadata={"a": "b"})
    files = sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "ck" / INDEX_FILE).read_text())
    assert index["weight_map"].keys() == src.keys() and set(index["weight_map"].values()) == set(
        files
    )
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in src.values())
    assert_bit_equal(read_all(tmp_path / "ck"), src)
    assert read_checkpoint_metadata(tmp_path / "ck") == {"a": "b"}


def test_specs_from_headers_match_tensors(tmp_path):
    src = {**tensors(torch.bfloat16), "model.norm.weight": torch.ones(32), "ids": torch.arange(3)}
    write_checkpoint(tmp_path / "ck", CFG, src, max_shard_bytes=20_000)
    specs = checkpoint_specs(tmp_path / "ck")
    assert sorted(specs) == sorted(
        (n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in src.items()
    )


def test_views_strided_and_shared_storage_are_written_as_copies(tmp_path):
    base = torch.randn(8, 6)
    src = {
        "t": base.t(),
        "slice": base[2:5, 1:3],
        "same": base,
        "same_again": base,
        "ints": torch.arange(10, dtype=torch.int64)[::2],
    }
    write_checkpoint(tmp_path / "ck", CFG, src)
    assert_bit_equal(read_all(tmp_path / "ck"), {n: t.contiguous() for n, t in src.items()})


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tmp_path):
    write_checkpoint(tmp_path / "ck", CFG, tensors(seed=0), max_shard_bytes=20_000)
    write_checkpoint(tmp_path / "ck", CFG, tensors(seed=1))
    assert_bit_equal(read_all(tmp_path / "ck"), tensors(seed=1))
    assert not (tmp_path / "ck" / INDEX_FILE).exists()
    with pytest.raises(CheckpointError, match="'bad'"):
        write_checkpoint(tmp_path / "ck", CFG, {**tensors(seed=2), "bad": [1.0]})
    assert_bit_equal(read_all(tmp_path / "ck"), tensors(seed=1))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_truncated_file_error_names_the_file(tmp_path):
    write_checkpoint(tmp_path / "ck", CFG, tensors(), max_shard_bytes=20_000)
    victim = sorted((tmp_path / "ck").glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=victim.name):
        read_all(tmp_path / "ck")
    victim.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match=victim.name):
        read_all(tmp_path / "ck")


def test_index_mismatch_and_metadata_errors(tmp_path):
    write_checkpoint(tmp_path / "ck", CFG, tensors(), max_shard_bytes=20_000)
    index_path = tmp_path / "ck" / INDEX_FILE
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = sorted(index["weight_map"].values())[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not match the index"):
        read_all(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="'format'"):
        write_checkpoint(tmp_path / "x", CFG, tensors(), metadata={"format": "np"})
    with pytest.raises(CheckpointError, match="no .*safetensors"):
        read_all(tmp_path.joinpath("empty").mkdir() or tmp_path / "empty")


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_transformers_loads_our_checkpoint(tmp_path, model_type, tie):
    theta = 5000.0 if model_type == "llama" else 1e6
    hf = load_hf_model(make_hf_checkpoint(tmp_path, model_type=model_type, tie=tie))
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=theta,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    state = hf.state_dict()
    assert set(cfg.hf_parameter_shapes()) | ({"lm_head.weight"} if tie else set()) == set(state)
    write_checkpoint(
        tmp_path / "ours",
        cfg,
        {n: state[n] for n in cfg.hf_parameter_shapes()},
        max_shard_bytes=30_000,
    )
    reloaded = load_hf_model(tmp_path / "ours")
    ids = torch.tensor([[3, 17, 42, 5, 9, 60, 1]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)
