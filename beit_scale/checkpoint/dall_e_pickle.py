"""Reading OpenAI's pickled DALL-E encoder (``encoder.pkl``) without running what the pickle asks for.

The official file is ``torch.save`` of the whole ``dall_e`` ``Encoder`` module, so reading it is unpickling, and
an ordinary unpickler imports and calls whatever the file names. This module is used only when the user passes
``--trust-pickle``, and then only through :class:`RestrictedUnpickler`, whose ``find_class`` admits:

- the ``dall_e`` classes and ``torch.nn`` layers such a file holds, each mapped onto an inert
  :class:`PickledModule` record (nothing of the ``dall_e`` package, or of those layers, is imported or run);
- torch's tensor and parameter rebuild functions, its storage types, ``torch.device`` and ``torch.Size``;
- ``collections.OrderedDict`` and ``builtins.set``.

Anything else is refused with :class:`UnsafePickleError` naming the class, before it is imported. ``torch.load``
runs with this unpickler as its ``pickle_module``, so both of its formats (the zip archive of torch >= 1.6 and
the legacy stream) are read by torch's own code; a TorchScript archive, which ``torch.load`` would hand to
``torch.jit.load``, is refused before.
"""
from __future__ import annotations

import collections
import logging
import pickle
import types
import warnings
import zipfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["PickledModule", "RestrictedUnpickler", "UnsafePickleError", "read_dall_e_encoder"]


class UnsafePickleError(ValueError):
    """The pickle names a class outside the allowlist; it was neither imported nor called."""


class PickledModule:
    """An inert record of a pickled ``nn.Module``: its attributes (``_parameters``, ``_modules``, ...), no code."""

    source = ""  # the class the pickle named, "module.Name"

    def __repr__(self) -> str:
        return f"<pickled {self.source}>"


def _record_class(module: str, name: str) -> type[PickledModule]:
    return type(name, (PickledModule,), {"source": f"{module}.{name}", "__module__": __name__})


_RECORDS = {
    (module, name): _record_class(module, name)
    for module, name in (
        ("dall_e.encoder", "Encoder"),
        ("dall_e.encoder", "EncoderBlock"),
        ("dall_e.utils", "Conv2d"),
        ("torch.nn.modules.container", "Sequential"),
        ("torch.nn.modules.activation", "ReLU"),
        ("torch.nn.modules.linear", "Identity"),
        ("torch.nn.modules.pooling", "MaxPool2d"),
    )
}
_ENCODER = _RECORDS["dall_e.encoder", "Encoder"]
_STORAGES = ("FloatStorage", "HalfStorage", "DoubleStorage", "BFloat16Storage")
_ADMITTED = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "device"): torch.device,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    **{("torch", name): getattr(torch, name) for name in _STORAGES},
}
_PY2_MODULES = {"__builtin__": "builtins"}  # protocol-2 pickles spell builtins the Python 2 way


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the classes and functions a DALL-E ``encoder.pkl`` needs.

    Raises:
        UnsafePickleError: From ``load()``, at the first global outside the allowlist, naming it.
    """

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)
        if (module, name) in _RECORDS:
            return _RECORDS[module, name]
        if (module, name) in _ADMITTED:
            return _ADMITTED[module, name]
        raise UnsafePickleError(
            f"the pickle asks for {module}.{name}, which a DALL-E encoder file does not hold; refused without "
            "importing or calling it (the file is not OpenAI's encoder.pkl, or it was altered)"
        )


def _load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load calls for its `pickle_module`: Unpickler for the main pickle, load() for the legacy headers.
_RESTRICTED_PICKLE = types.ModuleType("beit_scale_restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = RestrictedUnpickler
_RESTRICTED_PICKLE.load = _load


def _refuse_torchscript(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        return  # the legacy format: a plain pickle stream, read by RestrictedUnpickler throughout
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise UnsafePickleError(f"{path} is a TorchScript archive, not a torch.save'd DALL-E encoder; refused")


def _walk(record: PickledModule, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    """Parameters and buffers of a record and its submodules, by state-dict name."""
    if id(record) in seen:
        raise ValueError(f"the pickled module at {prefix or 'the root'!r} contains itself")
    seen.add(id(record))
    attrs = vars(record)
    for table in ("_parameters", "_buffers", "_modules"):
        entries = attrs.get(table, {})
        if not isinstance(entries, dict):
            raise ValueError(f"{prefix}{table} of the pickled {record.source} is a {type(entries).__name__}, "
                             "not a dict")
        for name, value in entries.items():
            if value is None:
                continue
            if table == "_modules":
                if not isinstance(value, PickledModule):
                    raise ValueError(f"submodule {prefix}{name} is a {type(value).__name__}, not a module")
                _walk(value, f"{prefix}{name}.", out, seen)
            elif isinstance(value, torch.Tensor):
                out[f"{prefix}{name}"] = value.detach().float().contiguous()
            else:
                raise ValueError(f"{prefix}{name} in {table} is a {type(value).__name__}, not a tensor")


def read_dall_e_encoder(path: str | Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Hyperparameters and weights of a pickled ``dall_e`` ``Encoder``, through :class:`RestrictedUnpickler`.

    Only call this when the user asked to trust the pickle (``--trust-pickle``): the allowlist stops code from
    running, but the file's contents are still the file's.

    Args:
        path: OpenAI's ``encoder.pkl`` (``torch.save`` of the whole module, either serialization format).

    Returns:
        ``(hparams, state_dict)``: ``n_hid``, ``n_blk_per_group``, ``input_channels`` and ``vocab_size`` as the
        file records them, and float32 CPU tensors by the official names (``blocks.input.w``, ...).

    Raises:
        UnsafePickleError: The file names a class outside the allowlist, or is a TorchScript archive.
        ValueError: The file is not a readable ``torch.save`` of a ``dall_e`` ``Encoder``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass OpenAI's encoder.pkl (https://cdn.openai.com/dall-e/encoder.pkl)")
    _refuse_torchscript(path)
    try:
        with warnings.catch_warnings():
            # the legacy format records module sources; the inert records have none to compare them with
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
            root = torch.load(path, map_location="cpu", pickle_module=_RESTRICTED_PICKLE, weights_only=False)
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch raise many types for a damaged file
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} cannot be read as a torch.save'd DALL-E encoder ({first})") from None
    if not isinstance(root, _ENCODER):
        found = root.source if isinstance(root, PickledModule) else type(root).__name__
        raise ValueError(f"{path} holds a {found}, not a dall_e.encoder.Encoder; pass the encoder file (encoder.pkl)")
    hparams = {k: vars(root).get(k) for k in ("n_hid", "n_blk_per_group", "input_channels", "vocab_size")}
    bad = {k: v for k, v in hparams.items() if not isinstance(v, int) or isinstance(v, bool)}
    if bad:
        raise ValueError(f"{path}: the pickled Encoder's {bad} must be ints; the file was altered")
    state: dict[str, torch.Tensor] = {}
    _walk(root, "", state, set())
    log.info("read %s: dall_e Encoder %s, %d tensors", path, hparams, len(state))
    return hparams, state
