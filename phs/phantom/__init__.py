"""Synthetic FLAIR-like brain MRI phantom with lesions and a healthy ground truth.

Every case is a pair of volumes of the *same* subject: a pathological FLAIR-like image and
the healthy image it was made from (ground truth for pseudo-healthy synthesis), plus the
lesion mask. Both images share the anatomy, bias field and noise realisation, so they are
bit-identical outside the (slightly dilated) lesion mask and differ inside it.

Anatomy comes from the MNI ICBM152 2009 tissue probability maps shipped inside nilearn
(no download). Per subject (deterministic from ``(kind, seed, index)``) the phantom varies
tissue contrast, scale, rotation, translation, a smooth elastic deformation, a multiplicative
bias field and Rician noise; lesions are drawn in subject space after the warp. Background
outside the brain is exactly 0 (skull-stripped data).

Layout on disk (the names other modules discover):

``kind="brats"`` (grid 240 x 240 x 155, 1 mm, LPS-like affine, gzip NIfTI)::

    <out>/HGG/Brats18_PHS_0001_1/Brats18_PHS_0001_1_flair.nii.gz          pathological FLAIR
    <out>/HGG/Brats18_PHS_0001_1/Brats18_PHS_0001_1_seg.nii.gz            labels 0,1,2,4
    <out>/HGG/Brats18_PHS_0001_1/Brats18_PHS_0001_1_flair_healthy.nii.gz  ground truth

``kind="isles"`` (grid 230 x 230 x 153, 1 mm, uncompressed NIfTI; id = 70000 + 10 * i)::

    <out>/1/VSD.Brain.XX.O.MR_Flair.70010/VSD.Brain.XX.O.MR_Flair.70010.nii          FLAIR
    <out>/1/VSD.Brain.XX.O.MR_Flair.70010/VSD.Brain.XX.O.MR_Flair.70010_healthy.nii  truth
    <out>/1/VSD.Brain.XX.O.OT.70011/VSD.Brain.XX.O.OT.70011.nii                     mask 0/1

``kind="ms"`` (grid 182 x 218 x 182, 1 mm, MNI-like LAS affine, gzip NIfTI; the Ljubljana MS
data's layout, read with ``data=folder`` through the datalist written beside it)::

    <out>/patient01/flair.nii.gz           pathological FLAIR (6-25 plaques of 1.5-7 mm)
    <out>/patient01/mask.nii.gz            mask 0/1
    <out>/patient01/flair_healthy.nii.gz   ground truth
    <out>/datalist.json                    {"training": [{"case", "image", "label", "healthy"}]}

General rule: the ground-truth healthy image of an image file ``<stem>.<ext>`` is
``<stem>_healthy.<ext>`` in the same folder (``<ext>`` being ``nii``, ``nii.gz`` ...).

``<out>/phantom.json`` (generation parameters and per-case lesion volumes) is written last:
a folder holding it is complete. Every file is written under a hidden temporary name in its
final folder and then renamed, so a visible file is always complete.

CLI: ``python -m phs.phantom out=DIR n_volumes=8 kind=brats|isles|ms seed=0``.

Modules: :mod:`~phs.phantom.anatomy` (template, subject warp, contrast, bias and noise),
:mod:`~phs.phantom.lesions` (tumour, stroke and MS plaque models, mass effect, blending),
:mod:`~phs.phantom.case` (one case from ``(kind, seed, index)``), :mod:`~phs.phantom.writer`
(files, ``phantom.json``, :func:`generate`, :func:`ensure_phantom`), ``__main__`` (the CLI).

The names below load on first use (PEP 562), so ``python -m phs.phantom --help`` and a mistyped
``kind=`` answer before torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

KINDS = ("brats", "isles", "ms")  # the layouts a phantom is written in

_EXPORTS = {
    "VERSION": "case",
    "generate_case": "case",
    "case_files": "writer",
    "ensure_phantom": "writer",
    "generate": "writer",
}
__all__ = ["KINDS", "VERSION", "case_files", "ensure_phantom", "generate", "generate_case"]

if TYPE_CHECKING:
    from phs.phantom.case import VERSION, generate_case
    from phs.phantom.writer import case_files, ensure_phantom, generate


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
