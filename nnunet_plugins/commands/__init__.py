"""``nnunet-plugins`` sub-commands (one module each, see ``nnunet_plugins.cli``) and their shared option parsing."""
from __future__ import annotations

import json


def arch_kwargs_option(text: str | None) -> dict | None:
    """The ``--arch-kwargs`` JSON object (network constructor arguments) or None; ValueError if it is not one."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--arch-kwargs is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError("--arch-kwargs must be a JSON object")
    return value
