"""What every official-checkpoint converter shares: reading the file, unwrapping the state dict, and the
strict name-and-shape match onto our network that names every tensor that does not fit.

A converter is a renaming function ``official name -> our name (or None: not a parameter of that
network)``; :func:`convert_with` applies it and :func:`match_state_dict` checks the result against the
network: every parameter and buffer of ours must receive exactly one official tensor of the same shape
and no official tensor may be left over. One :class:`CheckpointMismatch` lists all problems, each
tensor by name (official name and ours), so a user sees at once what a checkpoint lacks or carries
in addition.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Callable, Mapping

import torch

#: entries under which training scripts store the weights (DoDNet: 'model'; nnU-Net v1 and TransDoDNet:
#: 'state_dict'; nnU-Net v2: 'network_weights')
WRAPPER_KEYS = ("network_weights", "state_dict", "model")
#: how many names an error lists per kind of problem
SHOW = 12


class CheckpointMismatch(ValueError):
    """The official checkpoint does not fit the network (names or shapes); the message names the tensors."""


def read_checkpoint(path: str, allow_pickle: bool = False):
    """``torch.load`` an official checkpoint on the CPU. Weights-only unpickling (plus numpy scalars, which
    nnU-Net v1 checkpoints hold in their training curves) unless ``allow_pickle``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    if allow_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # unpickling errors come in several types
            raise ValueError(f"{path}: cannot read the checkpoint: {e}") from e
    import numpy as np

    safe = [np.dtype, type(np.dtype("float64")), type(np.dtype("float32")), np.float64, np.float32]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    safe.append(scalar)
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as weights only ({type(e).__name__}: {str(e)[:300]}). If you "
                         f"trust this file, rerun with --allow-pickle") from e


def unwrap_state_dict(checkpoint, source: str = "checkpoint", prefixes: tuple[str, ...] = ()) -> dict:
    """The tensors of a checkpoint: a bare state dict or one under 'network_weights' / 'state_dict' /
    'model' (nested wrappers too); 'module.' (DataParallel / DDP) and the given ``prefixes`` (official
    wrapper modules, e.g. ``ResCNN_DeformTR.``) are stripped from the names."""
    state = checkpoint
    while isinstance(state, Mapping) and not _is_state_dict(state):
        key = next((k for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if key is None:
            keys = list(state)[:10]
            raise ValueError(f"{source}: expected a state dict or a dict with one of {list(WRAPPER_KEYS)}, "
                             f"found keys {keys}")
        state = state[key]
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{source}: expected a state dict of tensors, found {type(state).__name__}")
    out = {}
    for key, value in state.items():
        name = key
        stripped = True
        while stripped:
            stripped = False
            for p in ("module.",) + tuple(prefixes):
                if name.startswith(p):
                    name, stripped = name[len(p):], True
        if name in out:
            raise ValueError(f"{source}: {key!r} and another entry both become {name!r} without their prefixes")
        out[name] = value
    return out


def _is_state_dict(d: Mapping) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def rules_renamer(rules) -> Callable[[str], str | None]:
    """``official name -> ours`` from ``rules``: (regex, replacement) pairs, the first whose regex matches the
    WHOLE name wins; the replacement is an ``re`` template or a function of the match. None if no rule matches."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]

    def rename(key: str) -> str | None:
        for pattern, repl in compiled:
            m = pattern.fullmatch(key)
            if m:
                return repl(m) if callable(repl) else m.expand(repl)
        return None

    return rename


def convert_with(official: Mapping[str, torch.Tensor], rename: Callable[[str], str | None],
                 network: torch.nn.Module, method: str) -> dict:
    """Rename ``official`` with ``rename`` and match it strictly onto ``network`` (:func:`match_state_dict`)."""
    renamed, origin, unknown = {}, {}, []
    for key, value in official.items():
        name = rename(key)
        if name is None:
            unknown.append(key)
            continue
        if name in renamed:
            raise CheckpointMismatch(f"official {origin[name]!r} and {key!r} both map to {name!r}")
        renamed[name], origin[name] = value, key
    return match_state_dict(renamed, network, method, unknown=unknown, origin=origin)


def match_state_dict(renamed: Mapping[str, torch.Tensor], network: torch.nn.Module, method: str,
                     unknown=(), origin: Mapping[str, str] | None = None) -> dict:
    """``network``'s complete state dict filled from ``renamed`` (already in our names).

    Raises :class:`CheckpointMismatch` naming (1) every parameter/buffer of ours without an official tensor,
    (2) every official tensor without a place (``unknown``: names the renaming did not recognise;
    renamed names that are not ours), (3) every shape mismatch. A tensor registered under several names
    (dynamic-network-architectures keeps a conv as ``.conv`` and ``.all_modules.0``; decoders alias the
    encoder) is filled from whichever of its names the checkpoint provides.
    """
    origin = origin or {}
    ours = network.state_dict()
    aliases = defaultdict(list)
    for name, tensor in list(network.named_parameters(remove_duplicate=False)) + \
            list(network.named_buffers(remove_duplicate=False)):
        if name in ours:
            aliases[id(tensor)].append(name)
    result, missing, wrong_shape, used = {}, [], [], set()
    for names in aliases.values():
        source = next((n for n in names if n in renamed), None)
        if source is None:
            missing.append(min(names, key=lambda n: (len(n), n)))  # the canonical name, not an alias
            continue
        used.update(n for n in names if n in renamed)
        value = renamed[source]
        if tuple(value.shape) != tuple(ours[source].shape):
            wrong_shape.append(f"{source}: official {tuple(value.shape)} vs ours {tuple(ours[source].shape)} "
                               f"(official name {origin.get(source, source)!r})")
            continue
        for n in names:
            result[n] = value.detach().to(ours[n].dtype).clone()
    extra = [f"{origin.get(k, k)!r}" + (f" (-> {k})" if origin.get(k, k) != k else "")
             for k in sorted(set(renamed) - used)] + [repr(k) for k in unknown]
    problems = []
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches: " + _listing(wrong_shape))
    if missing:
        problems.append(f"{len(missing)} tensors of our network are missing in the checkpoint: "
                        + _listing(sorted(missing)))
    if extra:
        problems.append(f"{len(extra)} official tensors have no place in our network: " + _listing(extra))
    if problems:
        raise CheckpointMismatch(f"the official checkpoint does not match the {method} network: " + " | ".join(problems))
    not_filled = sorted(set(ours) - set(result))
    if not_filled:  # a state-dict entry that is neither a parameter nor a buffer: cannot happen with torch modules
        raise CheckpointMismatch("internal: network tensors not filled: " + _listing(not_filled))
    return result


def _listing(items) -> str:
    items = list(items)
    return ", ".join(items[:SHOW]) + (f", ... ({len(items) - SHOW} more)" if len(items) > SHOW else "")
