"""Tokenizer files: safetensors weights with the architecture in the metadata. No pickle anywhere.

Three formats: a dVAE or a VQ-KD tokenizer trained here (``beit-scale train-tokenizer``, ``tokenizer.kind``) and
OpenAI's DALL-E encoder converted once from its pickle (``beit-scale convert-tokenizer dall-e``, the only place a
pickle is read, and only when trusted). A VQ-KD file holds the encoder, projection and codebook (with its EMA
statistics) only: the decoder and the teacher are not needed to label images.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from beit_scale.checkpoint.files import sha256
from beit_scale.checkpoint.weights import save_weights
from beit_scale.tokenizers import DallEArch, DallEEncoder, DiscreteVAE, DVAEArch, VQKDArch, VQKDTokenizer
from beit_scale.tokenizers.dall_e import official_name

log = logging.getLogger(__name__)

FORMAT = "beit_scale.dvae.v1"
DALL_E_FORMAT = "beit_scale.dall_e.v1"
VQKD_FORMAT = "beit_scale.vqkd.v1"
_ARCHS = {FORMAT: DVAEArch, DALL_E_FORMAT: DallEArch, VQKD_FORMAT: VQKDArch}
_MODELS = {DVAEArch: DiscreteVAE, DallEArch: DallEEncoder, VQKDArch: VQKDTokenizer}
_WRITERS = {FORMAT: "`beit-scale train-tokenizer`", DALL_E_FORMAT: "`beit-scale convert-tokenizer dall-e`",
            VQKD_FORMAT: "`beit-scale train-tokenizer` (tokenizer.kind=vqkd)"}
_PREFIX = "tokenizer."  # where the VQ-KD training model keeps its labelling half


def save_tokenizer(model, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Write the tokenizer; ``state_dict`` is full and unsharded (floats as fp32 on CPU), written atomically.

    ``model``: a :class:`DiscreteVAE`, or a VQ-KD model (:class:`~beit_scale.tokenizers.VQKD`, whose ``tokenizer.*``
    entries are kept, or :class:`VQKDTokenizer`).
    """
    fmt = VQKD_FORMAT if isinstance(model.arch, VQKDArch) else FORMAT
    if fmt == VQKD_FORMAT and any(k.startswith(_PREFIX) for k in state_dict):
        state_dict = {k[len(_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_PREFIX)}
    meta = {"format": fmt, "arch": json.dumps(dataclasses.asdict(model.arch))}
    save_weights({k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                  for k, v in state_dict.items()}, path, meta)


def read_tokenizer_arch(path: str | Path) -> DVAEArch | DallEArch | VQKDArch:
    """The architecture of a tokenizer file, from its metadata only (cheap: used to validate configs)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer.path={str(path)!r}: no such file; train one with `beit-scale train-tokenizer` "
                         "(or convert DALL-E's with `beit-scale convert-tokenizer dall-e`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"tokenizer.path={str(path)!r} is not a safetensors tokenizer file: {err}") from None
    fmt = meta.get("format")
    if fmt not in _ARCHS:
        raise ValueError(f"tokenizer.path={str(path)!r} has format {fmt!r}, expected {FORMAT!r} (a dVAE), "
                         f"{VQKD_FORMAT!r} (a VQ-KD tokenizer) or {DALL_E_FORMAT!r} (DALL-E's encoder)")
    arch_type = _ARCHS[fmt]
    expected = sorted(f.name for f in dataclasses.fields(arch_type))
    try:
        arch = json.loads(meta.get("arch", ""))
    except json.JSONDecodeError:
        arch = None
    if not isinstance(arch, dict) or sorted(arch) != expected:
        found = sorted(arch) if isinstance(arch, dict) else "nothing readable"
        raise ValueError(f"tokenizer.path={str(path)!r}: its metadata 'arch' must hold exactly {expected}, found "
                         f"{found}; the file was not written by {_WRITERS[fmt]} of this version")
    return arch_type(**arch)


def load_tokenizer(path: str | Path) -> DiscreteVAE | DallEEncoder | VQKDTokenizer:
    """Rebuild a tokenizer (trained dVAE or VQ-KD, or converted DALL-E encoder) from its file, strictly, in eval
    mode with gradients off."""
    arch = read_tokenizer_arch(path)
    model = _MODELS[type(arch)](arch)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        lines = [line.strip() for line in str(err).splitlines() if line.strip()][1:4]
        raise ValueError(f"tokenizer.path={str(path)!r}: the weights do not match the architecture in its "
                         f"metadata ({'; '.join(lines)[:400]}); the file is damaged or was edited") from None
    model.eval().requires_grad_(False)
    return model


def convert_dall_e(source: str | Path, out: str | Path, input_size: int = 112, trust_pickle: bool = False) -> DallEArch:
    """OpenAI's pickled DALL-E encoder (``encoder.pkl``) -> a DALL-E tokenizer file that :func:`load_tokenizer` reads.

    Args:
        source: ``torch.save`` of the whole ``dall_e`` ``Encoder`` module.
        out: The ``.safetensors`` file to write (atomically).
        input_size: Side in pixels of the tokenizer view the file records: 112 for a 14x14 token grid (patch 16
            at 224 px), 128 for 16x16 (patch 14 at 224 px). A multiple of 8; the view is never cropped.
        trust_pickle: The user's consent to unpickle ``source``; without it nothing is read.

    Returns:
        The architecture written into the file's metadata (beside the format and the source file's sha256).

    Raises:
        ValueError: No consent, a bad ``input_size``, or a file that is not a DALL-E encoder (refused classes
            raise :class:`~beit_scale.checkpoint.dall_e_pickle.UnsafePickleError`, also a ``ValueError``).
    """
    source, out = Path(source), Path(out)
    if not trust_pickle:
        raise ValueError(f"{source} is a pickle, and unpickling can run code; nothing was read. Pass --trust-pickle "
                         "for a file you got from OpenAI (https://cdn.openai.com/dall-e/encoder.pkl): it is then read "
                         "with an unpickler that admits only the classes a DALL-E encoder file holds")
    from beit_scale.checkpoint.dall_e_pickle import read_dall_e_encoder

    DallEArch(input_size=input_size)  # a bad size is refused before the (large) file is read
    digest = sha256(source) if source.is_file() else None  # of the bytes about to be read
    hparams, official = read_dall_e_encoder(source)
    if hparams["input_channels"] != 3:
        raise ValueError(f"{source}: the encoder reads {hparams['input_channels']} channels; BEiT's views are RGB (3)")
    arch = DallEArch(vocab_size=hparams["vocab_size"], input_size=input_size, hidden_dim=hparams["n_hid"],
                     num_blocks_per_group=hparams["n_blk_per_group"])
    with torch.device("meta"):
        template = DallEEncoder(arch).state_dict()  # names and shapes only
    names = {official_name(k): k for k in template}
    if set(names) != set(official):
        missing, extra = sorted(set(names) - set(official)), sorted(set(official) - set(names))
        raise ValueError(f"{source}: its tensors are not those of a DALL-E encoder with {hparams} (missing "
                         f"{missing[:5]}, unexpected {extra[:5]})")
    state = {}
    for theirs, ours in names.items():
        if official[theirs].shape != template[ours].shape:
            raise ValueError(f"{source}: {theirs} has shape {tuple(official[theirs].shape)}, expected "
                             f"{tuple(template[ours].shape)} for a DALL-E encoder with {hparams}")
        state[ours] = official[theirs]
    meta = {"format": DALL_E_FORMAT, "arch": json.dumps(dataclasses.asdict(arch)), "source_sha256": digest,
            "source_name": source.name}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(state, out, meta)
    log.info("wrote %s: DALL-E encoder %s from %s (sha256 %s)", out, arch, source, digest)
    return arch
