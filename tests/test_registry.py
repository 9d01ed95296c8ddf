"""Tests of the model registry (modeling/registry.py): lookup errors, overrides, meta builds, seeding."""

import dataclasses

import pytest
import torch

from modeling import registry
from modeling.registry import ModelSpec, build_model, get_model_spec, list_models, model_config, register_model


def test_gpt_is_registered_on_first_use():
    assert "gpt" in list_models()
    spec = get_model_spec("gpt")
    assert spec.task == "causal_lm"
    assert set(spec.flavors) == {"debug", "small", "full"}
    for field in dataclasses.fields(spec.config_cls):
        assert field.metadata["help"], field.name


def test_unknown_model_names_it_and_the_nearest():
    with pytest.raises(ValueError, match=r"unknown model 'gtp'.*Did you mean 'gpt'"):
        get_model_spec("gtp")
    with pytest.raises(ValueError, match=r"'llama'.*Valid: .*gpt"):
        build_model("llama", "debug")


def test_unknown_flavor_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown flavor 'smal'.*Did you mean 'small'.*Valid: small, debug, full"):
        model_config("gpt", "smal")


def test_unknown_override_key_names_it_and_the_nearest_field():
    with pytest.raises(ValueError, match=r"'n_layers'.*Did you mean 'n_layer'"):
        model_config("gpt", "debug", {"n_layers": 3})
    with pytest.raises(ValueError, match=r"'vocab'.*Did you mean 'vocab_size'"):
        build_model("gpt", "debug", {"vocab": 100})


def test_overrides_change_the_config_and_the_model():
    config = model_config("gpt", "debug", {"vocab_size": 300, "sequence_len": 32, "use_gradient_checkpointing": True})
    assert (config.vocab_size, config.sequence_len, config.use_gradient_checkpointing) == (300, 32, True)
    assert config.n_layer == model_config("gpt", "debug").n_layer  # the rest comes from the flavor
    model = build_model("gpt", "debug", {"vocab_size": 300, "n_layer": 3})
    assert model.lm_head.weight.shape == (300, 64) and len(model.blocks) == 3


def test_override_values_are_type_checked():
    with pytest.raises(ValueError, match="n_layer"):
        model_config("gpt", "debug", {"n_layer": "abc"})
    with pytest.raises(ValueError, match="n_embd"):
        model_config("gpt", "debug", {"n_embd": 64.5})
    with pytest.raises(ValueError, match="n_layer"):
        model_config("gpt", "debug", {"n_layer": True})  # a bool is not a count
    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        model_config("gpt", "debug", {"use_gradient_checkpointing": "maybe"})
    # Strings from a command line are parsed.
    config = model_config("gpt", "debug", {"n_layer": "3", "use_gradient_checkpointing": "true"})
    assert config.n_layer == 3 and config.use_gradient_checkpointing is True


def test_build_on_meta_allocates_nothing():
    model = build_model("gpt", "small", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert model.num_params() > 0


def test_same_seed_same_weights():
    torch.manual_seed(123)
    first = build_model("gpt", "debug")
    torch.manual_seed(123)
    second = build_model("gpt", "debug")
    torch.manual_seed(124)
    third = build_model("gpt", "debug")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(first.wte.weight, third.wte.weight)
    # Rotary tables are recomputed after to_empty, not left as uninitialised memory.
    torch.testing.assert_close(first.rotary.cos, second.rotary.cos, rtol=0, atol=0)
    assert first.rotary.cos[0].eq(1).all() and first.rotary.sin[0].eq(0).all()


def test_register_rejects_duplicates_and_bad_flavors():
    gpt = get_model_spec("gpt")
    with pytest.raises(ValueError, match="already registered"):
        register_model(gpt)
    bad = dataclasses.replace(gpt, name="gpt_bad_flavor", flavors={"debug": {**gpt.flavors["debug"], "n_heads": 4}})
    with pytest.raises(ValueError, match=r"'n_heads'.*flavor 'debug'.*Did you mean 'n_head'"):
        register_model(bad)
    assert "gpt_bad_flavor" not in list_models()


def test_registering_a_new_family(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # keep the test family local
    @dataclasses.dataclass(frozen=True)
    class TinyConfig:
        width: int = dataclasses.field(default=4, metadata={"help": "hidden width"})

    class Tiny(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.linear = torch.nn.Linear(config.width, config.width)

        def init_weights(self):
            torch.nn.init.ones_(self.linear.weight)
            torch.nn.init.zeros_(self.linear.bias)

    register_model(ModelSpec("tiny_test_family", TinyConfig, Tiny, {"debug": {"width": 3}}, task="regression"))
    model = build_model("tiny_test_family", "debug", {"width": "5"})
    assert model.linear.weight.shape == (5, 5) and model.linear.weight.eq(1).all()


def test_every_model_counts_its_flops_and_has_three_flavors():
    """Every registered model: debug / small / full flavors, and training FLOPs per token (or per input
    value) counted from its layers, so `mfu` is reported for every family."""
    for name in list_models():
        spec = get_model_spec(name)
        assert {"debug", "small", "full"} <= set(spec.flavors), name
        model = build_model(name, "debug", device="meta")  # counted without weights (or a tokenizer's codebooks)
        flops = model.num_flops_per_token()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert flops >= 2 * params * 0.01 and flops > 0, (name, flops, params)
