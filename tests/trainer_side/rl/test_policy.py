"""LlamaPolicy against transformers: same names and shapes, same logits, checkpoints both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlsync.checkpoint_io import iter_checkpoint_tensors, write_checkpoint
from rlsync.model_config import ModelConfig
from tests.checkpoints import load_hf_model, make_hf_checkpoint
from trainer_side.rl.policy import LlamaPolicy

ATOL = 1e-5


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows, right-padded to lengths 11, 7 and 3."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=gen)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask


def _assert_same_logits(policy: LlamaPolicy, hf: torch.nn.Module, vocab: int) -> None:
    ids, mask = _batch(vocab)
    with torch.no_grad():
        ours = policy(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=ATOL)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_logits_match_transformers(
    tmp_path: Path, model_type: str, tie: bool, kv_heads: int
) -> None:
    path = make_hf_checkpoint(tmp_path, model_type=model_type, tie=tie, kv_heads=kv_heads)
    policy = LlamaPolicy.from_pretrained(path).eval()
    _assert_same_logits(policy, load_hf_model(path), policy.cfg.vocab_size)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True])
def test_named_parameters_are_hf_shapes(model_type: str, tie: bool) -> None:
    cfg = ModelConfig(model_type=model_type, tie_word_embeddings=tie, num_hidden_layers=3)
    policy = LlamaPolicy.from_config(cfg, seed=0)
    shapes = {name: tuple(p.shape) for name, p in policy.named_parameters()}
    assert shapes == cfg.hf_parameter_shapes()
    assert list(shapes) == list(policy.hf_tensors())


def test_tied_head_is_the_embedding_parameter() -> None:
    policy = LlamaPolicy.from_config(ModelConfig(tie_word_embeddings=True), seed=0)
    assert policy.lm_head.weight is policy.model.embed_tokens.weight
    names = [name for name, _ in policy.named_parameters()]
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_loads_in_transformers(tmp_path: Path, model_type: str, tie: bool) -> None:
    cfg = ModelConfig(
        model_type=model_type,
        tie_word_embeddings=tie,
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        rope_theta=5000.0,
    )
    policy = LlamaPolicy.from_config(cfg, seed=3, init_std=0.2).eval()
    if model_type == "qwen2":
        with torch.no_grad():  # non-zero biases, so a dropped bias shows
            for name, p in policy.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
    path = policy.save_pretrained(tmp_path / "ckpt")
    _assert_same_logits(policy, load_hf_model(path), cfg.vocab_size)
    again = LlamaPolicy.from_pretrained(path)
    for (name, a), (name_b, b) in zip(
        policy.named_parameters(), again.named_parameters(), strict=True
    ):
        assert name == name_b and torch.equal(a, b), name


def test_from_config_is_seeded_and_not_degenerate() -> None:
    cfg = ModelConfig()
    a, b = LlamaPolicy.from_config(cfg, seed=1), LlamaPolicy.from_config(cfg, seed=1)
    c = LlamaPolicy.from_config(cfg, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    ids, mask = _batch(cfg.vocab_size)
    with torch.no_grad():
        logits = a(ids, mask)
    assert torch.isfinite(logits).all()
    spread = logits.std(dim=-1)
    assert (spread > 0.05).all() and (spread < 5.0).all()  # neither flat nor one-hot
    assert logits.argmax(-1).unique().numel() > 1


def test_padding_does_not_change_real_tokens() -> None:
    policy = LlamaPolicy.from_config(ModelConfig(), seed=0, init_std=0.2).eval()
    ids, mask = _batch(64)
    with torch.no_grad():
        padded = policy(ids, mask)
        alone = policy(ids[1:2, :7])
        garbage = ids.clone()
        garbage[1, 7:] = 5
        padded_other = policy(garbage, mask)
    torch.testing.assert_close(padded[1, :7], alone[0], rtol=0, atol=ATOL)  # batch-size rounding
    torch.testing.assert_close(padded_other[1, :7], padded[1, :7], rtol=0, atol=0)


def test_every_parameter_gets_a_gradient() -> None:
    policy = LlamaPolicy.from_config(ModelConfig(model_type="qwen2"), seed=0)
    ids, mask = _batch(64)
    policy(ids, mask).logsumexp(-1).sum().backward()
    for name, p in policy.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_from_pretrained_refuses_a_missing_tensor(tmp_path: Path) -> None:
    cfg = ModelConfig()
    tensors = LlamaPolicy.from_config(cfg, seed=0).hf_tensors()
    del tensors["model.norm.weight"]
    write_checkpoint(tmp_path / "ckpt", cfg, tensors)
    with pytest.raises(KeyError, match="model.norm.weight"):
        LlamaPolicy.from_pretrained(tmp_path / "ckpt")


def test_bf16_checkpoint_loads_into_float32_and_saves_as_bf16(tmp_path: Path) -> None:
    path = make_hf_checkpoint(tmp_path, model_type="qwen2", dtype=torch.bfloat16)
    policy = LlamaPolicy.from_pretrained(path)
    hf = load_hf_model(path)
    assert policy.cfg.torch_dtype == "bfloat16"
    for name, p in policy.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, hf.get_parameter(name).float()), name
    saved = LlamaPolicy.from_pretrained(policy.save_pretrained(tmp_path / "again"))
    assert {t.dtype for _, t in iter_checkpoint_tensors(tmp_path / "again")} == {torch.bfloat16}
    assert all(
        torch.equal(a, b) for a, b in zip(policy.parameters(), saved.parameters(), strict=True)
    )
