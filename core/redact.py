"""Configs as they may be shown or saved: without credentials.

Storage options can carry secrets (s3fs `key`/`secret`/`token`, `client_kwargs.aws_*`, Azure
`account_key`/`sas_token`, passwords). Everything that prints or writes a config (config.yaml of a
run, `--print-config`, checkpoints' trainer_state.json, wandb, manifests) goes through
`public_dict`, which drops those entries; the endpoint and other options stay. The same goes for
the environment a job is given (`launch.env`, `launch.ray.runtime_env.env_vars`: AWS_SECRET_ACCESS_KEY,
WANDB_API_KEY, ...). A config read back from such a file gets its credentials from the environment
(AWS_* variables, ~/.aws) instead.
"""

from __future__ import annotations

from typing import Any

from core.schema import to_dict

SECRET_WORDS = ("key", "secret", "token", "password", "credential", "connection_string", "signature")


def is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def redact_options(options: Any) -> Any:
    """`options` without any entry (at any depth) whose name looks like a credential."""
    if isinstance(options, dict):
        return {k: redact_options(v) for k, v in options.items() if not (isinstance(k, str) and is_secret(k))}
    if isinstance(options, list):
        return [redact_options(v) for v in options]
    return options


# mappings whose entries may be credentials: fsspec options and job environments
SECRET_HOLDERS = ("storage_options", "env", "env_vars")


def redact_config(data: Any) -> Any:
    """A config dict with every SECRET_HOLDERS mapping (at any depth) redacted."""
    if isinstance(data, dict):
        return {k: redact_options(v) if k in SECRET_HOLDERS else redact_config(v) for k, v in data.items()}
    if isinstance(data, list):
        return [redact_config(v) for v in data]
    return data


def public_dict(config: Any) -> dict:
    """`to_dict(config)` safe to print, log or save."""
    return redact_config(to_dict(config))
