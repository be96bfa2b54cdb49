"""Loading a frozen teacher from a spec: embedded name, CTranslate2 dir, HF dir or hub id."""

from __future__ import annotations

from pathlib import Path

from colld.teachers.base import LoadedModel


def load_teacher(
    spec: str, *, trust_remote_code: bool = False, revision: str | None = None
) -> LoadedModel:
    """Resolve ``spec`` in this order: an embedded teacher name, a CTranslate2 directory
    (holding model.bin), a local Hugging Face directory or a hub id. The encoder comes back
    frozen (eval mode, no gradients)."""
    from colld.teachers.embedded import EMBEDDED, load_embedded_teacher

    if spec in EMBEDDED:
        return load_embedded_teacher(spec)
    path = Path(spec)
    if path.is_dir():
        from colld.teachers.ctranslate2 import is_ct2_dir, load_ct2_teacher

        if is_ct2_dir(path):
            return load_ct2_teacher(path)
    elif path.exists():
        raise ValueError(f"teacher '{spec}' is a file; expected a model directory or a name")
    from colld.teachers.hf import load_hf_teacher

    return load_hf_teacher(spec, trust_remote_code=trust_remote_code, revision=revision)


__all__ = ["LoadedModel", "load_teacher"]
