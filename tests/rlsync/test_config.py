"""Run config: YAML + `--set a.b=value` overrides, every error naming its dotted key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rlsync.app.run_config import RunConfig, apply_override, load_config, to_dict
from rlsync.config import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _error(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------- loading


def test_defaults_without_a_file():
    assert load_config() == RunConfig()


def test_yaml_values_land_in_nested_sections(tmp_path):
    path = _write(
        tmp_path,
        """
name: t1
steps: 3
placement: disaggregated
trainer: {lr: 0.25, world_size: 2}
sync: {transport: broadcast, pause_mode: retract, bucket_mb: 8}
model: {hidden_size: 32, num_attention_heads: 2, num_key_value_heads: 1}
""",
    )
    cfg = load_config(path)
    assert (cfg.name, cfg.steps, cfg.placement) == ("t1", 3, "disaggregated")
    assert (cfg.trainer.lr, cfg.trainer.world_size, cfg.trainer.ppo_epochs) == (0.25, 2, 1)
    assert (cfg.sync.transport, cfg.sync.pause_mode, cfg.sync.bucket_bytes) == (
        "broadcast",
        "retract",
        8 << 20,
    )
    assert (cfg.model.hidden_size, cfg.model.head_dim) == (32, 16)


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing\n")) == RunConfig()


@pytest.mark.parametrize(
    "text", ["- a\n- b\n", "just text\n", "a: [1,\n"], ids=["list", "scalar", "broken"]
)
def test_yaml_that_is_not_a_mapping_is_refused(tmp_path, text):
    path = _write(tmp_path, text)
    assert str(path) in _error([], path)


def test_missing_file_is_a_config_error(tmp_path):
    assert "nope.yaml" in _error([], tmp_path / "nope.yaml")


# ---------------------------------------------------------------- overrides


OVERRIDES = [
    ("trainer.lr=1e-4", lambda c: c.trainer.lr, 1e-4),
    ("trainer.lr=2.5E+3", lambda c: c.trainer.lr, 2500.0),
    ("trainer.weight_decay=-1e-2", lambda c: c.trainer.weight_decay, -0.01),
    ("trainer.lr=5", lambda c: c.trainer.lr, 5.0),
    ("trainer.lr=0.5", lambda c: c.trainer.lr, 0.5),
    ("steps=7", lambda c: c.steps, 7),
    ("sync.verify=true", lambda c: c.sync.verify, True),
    ("sync.flush_cache=false", lambda c: c.sync.flush_cache, False),
    ("sync.pause_mode=null", lambda c: c.sync.pause_mode, None),
    ("sync.pause_mode=in_place", lambda c: c.sync.pause_mode, "in_place"),
    ("sync.delta=true", lambda c: c.sync.delta, True),
    ("sync.delta_full_every=5", lambda c: c.sync.delta_full_every, 5),
    ("engine.dtype=bfloat16", lambda c: c.engine.dtype, "bfloat16"),
    ("engine.endpoint=", lambda c: c.engine.endpoint, None),
    ("ray_address=auto", lambda c: c.ray_address, "auto"),
    ("model.num_hidden_layers=1", lambda c: c.model.num_hidden_layers, 1),
    ("model.head_dim=8", lambda c: c.model.head_dim, 8),
    ("name=a=b", lambda c: c.name, "a=b"),
]


@pytest.mark.parametrize("item, get, expected", OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_override_sets_the_typed_value(item, get, expected):
    value = get(load_config(None, [item]))
    assert value == expected and type(value) is type(expected)


def test_overrides_win_over_yaml_and_keep_the_rest(tmp_path):
    path = _write(tmp_path, "trainer: {lr: 0.1, seed: 5}\nsteps: 3\n")
    cfg = load_config(path, ["trainer.lr=1e-4", "steps=4", "steps=9"])
    assert (cfg.trainer.lr, cfg.trainer.seed, cfg.steps) == (1e-4, 5, 9)


@pytest.mark.parametrize(
    "item, expected",
    [
        ("a.b.c=[1, 2.5, x]", {"a": {"b": {"c": [1, 2.5, "x"]}}}),
        ("a=[]", {"a": []}),
        ("a.b={k: 1}", {"a": {"b": {"k": 1}}}),
        ("a.b=null", {"a": {"b": None}}),
        ("a.b=~", {"a": {"b": None}}),
        ("a.b='007'", {"a": {"b": "007"}}),
    ],
)
def test_override_values_parse_as_yaml(item, expected):
    raw: dict = {}
    apply_override(raw, item)
    assert raw == expected


@dataclasses.dataclass(kw_only=True)
class _WithList:
    ranks: list[int] = dataclasses.field(default_factory=list)


def test_list_fields_are_checked_element_by_element():
    assert load_config(None, ["ranks=[0, 3]"], cls=_WithList).ranks == [0, 3]
    with pytest.raises(ConfigError, match="^ranks"):
        load_config(None, ["ranks=[0, x]"], cls=_WithList)
    with pytest.raises(ConfigError, match="^ranks"):
        load_config(None, ["ranks=3"], cls=_WithList)


@pytest.mark.parametrize("item", ["trainer.lr", "=3", ""])
def test_malformed_override_is_refused(item):
    assert "key=value" in _error([item])


def test_override_through_a_non_section_is_refused(tmp_path):
    assert _error(["steps.x=1"], _write(tmp_path, "steps: 3\n")).startswith("steps.x: ")
    assert _error(["steps.x=1"]).startswith("steps: ")


# ---------------------------------------------------------------- errors name the key


@pytest.mark.parametrize(
    "item, key",
    [
        ("trainer.lrr=1e-4", "trainer.lrr"),
        ("stepz=3", "stepz"),
        ("model.hiden_size=8", "model.hiden_size"),
        ("sync.transport.kind=ipc", "sync.transport"),
    ],
)
def test_unknown_key_is_named(item, key):
    message = _error([item])
    assert message.startswith(f"{key}: ")


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = _write(tmp_path, "engine:\n  kv_token: 10\n")
    assert _error([], path).startswith("engine.kv_token: unknown key")


@pytest.mark.parametrize(
    "item, key",
    [
        ("steps=abc", "steps"),
        ("steps=2.0", "steps"),
        ("steps=true", "steps"),
        ("trainer.lr=fast", "trainer.lr"),
        ("trainer.lr=true", "trainer.lr"),
        ("sync.verify=1", "sync.verify"),
        ("sync.verify=yes please", "sync.verify"),
        ("engine.device=3", "engine.device"),
        ("engine.kv_tokens=[1]", "engine.kv_tokens"),
        ("trainer=5", "trainer"),
        ("model=[]", "model"),
        ("model.vocab_size=1.5", "model.vocab_size"),
    ],
)
def test_bad_type_is_named(item, key):
    assert _error([item]).startswith(f"{key}: ")


@pytest.mark.parametrize(
    "item, key",
    [
        ("steps=-1", "steps"),
        ("steps=0", "steps"),
        ("num_engines=0", "num_engines"),
        ("staleness=-1", "staleness"),
        ("trainer.world_size=0", "trainer.world_size"),
        ("trainer.lr=0", "trainer.lr"),
        ("trainer.lr=.nan", "trainer.lr"),
        ("sync.timeout_s=.inf", "sync.timeout_s"),
        ("sync.bucket_mb=-1", "sync.bucket_mb"),
        ("sync.delta_full_every=0", "sync.delta_full_every"),
        ("sync.delta=maybe", "sync.delta"),
        ("sync.transport=carrier-pigeon", "sync.transport"),
        ("sync.pause_mode=drain", "sync.pause_mode"),
        ("sync.backend=mpi", "sync.backend"),
        ("placement=everywhere", "placement"),
        ("engine.kv_tokens=0", "engine.kv_tokens"),
        ("task.group_size=0", "task.group_size"),
    ],
)
def test_bad_value_is_named(item, key):
    assert _error([item]).startswith(f"{key}: ")


@pytest.mark.parametrize(
    "item, key",
    [
        ("model.num_key_value_heads=3", "model.num_key_value_heads"),
        ("model.model_type=gpt2", "model.model_type"),
        ("model.head_dim=7", "model.head_dim"),
        ("model.hidden_size=0", "model.hidden_size"),
        ("model.torch_dtype=int8", "model.torch_dtype"),
    ],
)
def test_model_section_errors_are_named(item, key):
    message = _error([item])
    assert message.startswith(key) and message[len(key)] in ":= "


# ---------------------------------------------------------------- the shipped configs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.model.hidden_size <= 512  # tiny models only: these run on CPU in CI


@pytest.mark.parametrize(
    "name, placement, transport, engines, ray_address",
    [
        ("colocated_cpu", "colocated", "ipc", 1, None),
        ("disaggregated_cpu", "disaggregated", "broadcast", 2, None),
        ("ray_cluster", "disaggregated", "broadcast", 2, "auto"),
        ("bench", "colocated", "ipc", 1, None),
    ],
)
def test_shipped_configs_say_what_their_names_promise(
    name, placement, transport, engines, ray_address
):
    cfg = load_config(CONFIGS[0].parent / f"{name}.yaml")
    assert (cfg.placement, cfg.sync.transport, cfg.num_engines, cfg.ray_address) == (
        placement,
        transport,
        engines,
        ray_address,
    )
    assert cfg.sync.flush_cache and not cfg.sync.torch_empty_cache


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dumped_config_loads_back_equal(tmp_path, path):
    cfg = load_config(path)
    dumped = _write(tmp_path, yaml.safe_dump(to_dict(cfg)))
    assert load_config(dumped) == cfg


def test_atomic_commit_needs_shadow_and_names_the_key():
    assert "sync.commit: 'atomic' needs load_mode 'shadow'" in _error(["sync.commit=atomic"])
    assert "sync.commit: " in _error(["sync.commit=together"])
    assert "sync.commit_timeout_s: must be > 2" in _error(
        ["sync.commit=atomic", "sync.load_mode=shadow", "sync.commit_timeout_s=1.5"]
    )
    cfg = load_config(None, ["sync.commit=atomic", "sync.load_mode=shadow", "sync.timeout_s=5"])
    assert cfg.sync.commit == "atomic" and cfg.sync.commit_wait_s == 4 * 5 + 30
