"""The variant registry: listing, validation messages, describe() and entry-point plugins."""

from importlib import metadata

import pytest
import torch

import variants
from variants import registry


def test_attention_variants_are_registered():
    names = variants.available("attention")
    assert {"full", "sdpa", "lsh"} <= set(names)
    assert set(names) <= set(variants.available())
    assert names == sorted(names)


def test_build_returns_configured_module():
    module = variants.build("lsh", d_model=32, n_heads=4, n_hashes=2, bucket_size=8)
    assert module.config.n_hashes == 2 and module.config.head_dim == 8
    assert module(torch.randn(2, 16, 32)).shape == (2, 16, 32)


def test_unknown_variant_lists_registered_names():
    with pytest.raises(ValueError, match="unknown variant 'nope'") as error:
        variants.build("nope")
    for name in ("full", "sdpa", "lsh"):
        assert name in str(error.value)


def test_unknown_parameter_lists_allowed_parameters():
    with pytest.raises(ValueError, match="does not take 'n_hash'") as error:
        variants.build("lsh", n_hash=4)
    for allowed in ("n_hashes (int)", "bucket_size (int)", "seed", "dup_correction (bool)", "d_model (int)"):
        assert allowed in str(error.value)


@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("lsh", dict(n_hashes=2.5), "'n_hashes' must be int"),
        ("lsh", dict(n_hashes=True), "'n_hashes' must be int"),
        ("lsh", dict(seed="0"), "'seed' must be"),
        ("full", dict(shared_qk=1), "'shared_qk' must be bool"),
    ],
)
def test_wrong_type_names_expected_type(name, params, expected):
    with pytest.raises(ValueError, match=expected):
        variants.build(name, **params)


def test_describe_gives_types_and_defaults():
    lsh = variants.describe("lsh")
    assert lsh["n_hashes"] == ("int", 1)
    assert lsh["bucket_size"] == ("int", 64)
    assert lsh["dup_correction"] == ("bool", False)
    assert lsh["n_buckets"][1] is None and "int" in lsh["n_buckets"][0]
    assert variants.describe("full")["shared_qk"] == ("bool", False)
    assert set(variants.describe("sdpa")) == {"d_model", "n_heads", "causal", "dropout", "shared_qk"}


PLUGIN = '''
from dataclasses import dataclass
import torch
from variants.attention.base import AttentionConfig, AttentionModule
from variants.registry import register

@dataclass
class ToyConfig(AttentionConfig):
    gain: float = 1.0

@register("toy_plugin_attention", config=ToyConfig)
class ToyAttention(AttentionModule):
    """Returns the values scaled by gain."""

    def __init__(self, config):
        super().__init__(config, n_inputs=3)

    def attend(self, q, k, v):
        return self.config.gain * v

    def core_flops(self, batch, seq_len):
        return 0
'''


def test_entry_point_plugin_adds_a_variant(tmp_path, monkeypatch):
    (tmp_path / "toy_reformer_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "toy_reformer_plugin", raising=False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # undone after the test
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    entry = metadata.EntryPoint(name="toy", value="toy_reformer_plugin", group=registry.ENTRY_POINT_GROUP)

    def fake_entry_points(**selection):
        return [entry] if selection.get("group") == registry.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(registry.metadata, "entry_points", fake_entry_points)
    assert "toy_plugin_attention" in variants.available("attention")
    module = variants.build("toy_plugin_attention", d_model=8, n_heads=2, gain=2.0)
    assert variants.describe("toy_plugin_attention")["gain"] == ("float", 1.0)
    assert module(torch.randn(1, 4, 8)).shape == (1, 4, 8)
