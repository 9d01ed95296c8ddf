"""Registry of model families, looked up by name.

Each family module (e.g. `modeling.text.gpt`) calls `register_model(ModelSpec(...))` at import time;
the registry imports it the first time one of its models is looked up (`_MODEL_MODULES`).
The trainer only talks to this module: it picks a model by name and flavor, overrides a few
config fields from the data set (vocab_size, sequence_len), and gets a plain `nn.Module` back.

    from modeling.registry import build_model
    model = build_model("gpt", "debug", overrides={"vocab_size": 512})

Config classes are dataclasses whose fields carry `metadata={"help": ...}`. Overrides may be
given as strings (as they come from a command line); they are parsed to the field's type.
"""

import dataclasses
import difflib
import importlib
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

# Model name -> the module that registers it. A family's module (and what it imports: transformers
# for TokCom and FlatGPT) loads only when one of its models is asked for. A new model adds its name
# here. The brain-gen zoo keeps brain-gen's `model_name` spellings, so its configs read the same.
_FLATGPT_NAMES = ("FlatGPT", "FlatGPTEmbeds", "FlatGPTRVQ", "FlatGPTMix", "FlatGPTMixRVQ", "FlatGPTEmbedsRVQ")
_MODEL_MODULES = {
    "gpt": "modeling.text.gpt",
    "tokcom_vae": "modeling.text.tokcom",
    "tokcom_diffusion": "modeling.text.tokcom",
    **dict.fromkeys(_FLATGPT_NAMES, "modeling.brain.flatgpt"),
    "totem": "modeling.tokenizers.totem",
    "BrainOmniCausalTokenizer": "modeling.tokenizers.brainomni",
    "BrainOmniCausalTokenizerSEANetChannelMix": "modeling.tokenizers.brainomni",
    "BrainOmniCausalForecast": "modeling.brain.brainomni_forecast",
    "Vidtok": "modeling.tokenizers.vidtok",
    "VidtokRVQ": "modeling.tokenizers.vidtok",
    "TransformerForecaster": "modeling.transformer.model",
    "STGPT2MEG": "modeling.brain.stgpt2meg",
    "TASA3D": "modeling.brain.tasa3d",
    "Wavenet3D": "modeling.brain.wavenet",
    "WavenetFullChannel": "modeling.brain.wavenet",
    "BENDRForecast": "modeling.brain.bendr",
    "NTD": "modeling.brain.ntd",
    "MEGFactorizedAutoencoder": "modeling.brain.factorized",
    **dict.fromkeys(("ClassifierContinuous", "ClassifierQuantized", "ClassifierQuantizedImage"), "modeling.brain.classifiers"),
}

_REGISTRY: dict[str, "ModelSpec"] = {}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type  # a dataclass; each field has metadata={"help": "one line doc"}
    builder: Callable[[Any], nn.Module]  # config -> model, built on the current default device
    flavors: dict[str, dict]  # flavor name -> config field values ("debug", "small", "full")
    task: str  # which batch format the trainer feeds, e.g. "causal_lm"
    # config fields naming weight files that init_weights loads (e.g. a frozen stage-1 model); a loader
    # of a whole checkpoint of this model sets them to None, since the checkpoint holds those weights
    weight_file_fields: tuple[str, ...] = ()


def _suggest(kind: str, bad: str, valid: typing.Iterable[str], context: str = "") -> ValueError:
    """A ValueError naming the bad value, its nearest valid one and all valid ones (nearest first)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(bad, valid, n=len(valid), cutoff=0.5)
    ordered = close + [v for v in valid if v not in close]
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {bad!r}{context}.{hint} Valid: {', '.join(ordered) or '(none)'}")


def register_model(spec: ModelSpec) -> None:
    """Add a model family. Flavors are checked now, so a typo fails at import, not at launch."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    if not dataclasses.is_dataclass(spec.config_cls):
        raise ValueError(f"config_cls of model {spec.name!r} must be a dataclass, got {spec.config_cls!r}")
    for field in dataclasses.fields(spec.config_cls):
        if not field.metadata.get("help"):
            raise ValueError(f"field {field.name!r} of {spec.config_cls.__name__} has no metadata['help']")
    for flavor, values in spec.flavors.items():
        _make_config(spec, values, context=f" in flavor {flavor!r} of model {spec.name!r}")
    _REGISTRY[spec.name] = spec


def list_models() -> list[str]:
    for module_name in sorted(set(_MODEL_MODULES.values())):
        importlib.import_module(module_name)
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY and name in _MODEL_MODULES:
        importlib.import_module(_MODEL_MODULES[name])
    if name not in _REGISTRY:
        raise _suggest("model", name, {*_MODEL_MODULES, *_REGISTRY})
    return _REGISTRY[name]


def _parse_bool(field_name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"field {field_name!r} expects a bool, got {value!r}")


def _coerce(field_name: str, field_type: Any, value: Any) -> Any:
    """Check `value` against the field's type; strings are parsed (they come from command lines)."""
    origin = typing.get_origin(field_type)
    if origin in (typing.Union, types.UnionType):  # e.g. `int | None`
        options = typing.get_args(field_type)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(field_name, option, value)
            except ValueError:
                pass
        raise ValueError(f"field {field_name!r} expects {field_type}, got {value!r}")
    if field_type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _parse_bool(field_name, value)
        raise ValueError(f"field {field_name!r} expects a bool, got {value!r} ({type(value).__name__})")
    if field_type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"field {field_name!r} expects an int, got {value!r} ({type(value).__name__})")
    if field_type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"field {field_name!r} expects a float, got {value!r} ({type(value).__name__})")
    if field_type is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"field {field_name!r} expects a str, got {value!r} ({type(value).__name__})")
    check_type = origin or field_type
    if isinstance(check_type, type) and not isinstance(value, check_type):
        raise ValueError(f"field {field_name!r} expects {field_type}, got {value!r} ({type(value).__name__})")
    return value


def _make_config(spec: ModelSpec, values: dict, context: str = "") -> Any:
    fields = {field.name: field for field in dataclasses.fields(spec.config_cls)}
    hints = typing.get_type_hints(spec.config_cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _suggest("config field", key, fields, context=f"{context} (config {spec.config_cls.__name__})")
        kwargs[key] = _coerce(key, hints[key], value)
    try:
        return spec.config_cls(**kwargs)
    except TypeError as error:  # a field without default is missing
        raise ValueError(f"cannot build {spec.config_cls.__name__}{context}: {error}") from error


def model_config(name: str, flavor: str, overrides: dict | None = None) -> Any:
    """The config of `flavor` with `overrides` applied on top, type-checked and validated."""
    spec = get_model_spec(name)
    if flavor not in spec.flavors:
        raise _suggest("flavor", flavor, spec.flavors, context=f" for model {name!r}")
    values = dict(spec.flavors[flavor])
    for key, value in (overrides or {}).items():
        # a dict-valued field (e.g. FlatGPT's trf_args) takes overrides key by key, so that
        # `--set model.args.trf_args.num_hidden_layers=4` keeps the flavor's other keys
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            value = {**values[key], **value}
        values[key] = value
    return _make_config(spec, values, context=f" for model {name!r}")


def build_model(
    name: str, flavor: str, overrides: dict | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build a model on the meta device, then materialise it on `device` and initialise it.

    With device="meta" nothing is allocated: use it to count the parameters of big flavors.
    Initialisation draws from torch's global RNG, so builds after the same `torch.manual_seed`
    are identical.
    """
    spec = get_model_spec(name)
    config = model_config(name, flavor, overrides)
    with torch.device("meta"):
        model = spec.builder(config)
    device = torch.device(device)
    if device.type == "meta":
        return model
    # what Module.to_empty does, without its torch.empty_like: on a meta tensor that runs torch's
    # Python reference code, which imports sympy on first use (~1.5 s of CPU in every process that
    # builds a model, e.g. each pretokenize actor); empty_strided makes the same tensors directly
    model._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device))
    with torch.no_grad():
        model.init_weights()
    return model
