"""Brain extraction with deepbet before registration (`nifti --skull-strip deepbet`).

The template nilearn ships is skull-stripped, so a stripped scan registers to it without the
scalp pulling the fit. deepbet (Fisch et al. 2024) is a pair of 3D U-Nets whose TorchScript
weights ship inside its wheel (nothing is downloaded) and runs on the CPU torch fedmpi already
needs. The model is loaded once per worker and run with one torch thread: parallelism is over
subjects.
"""

from __future__ import annotations

import functools

import nibabel as nib
import numpy as np

from preprocess.nifti import BadImage


@functools.lru_cache(maxsize=1)
def _model():
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=True)


def brain_mask(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Boolean brain mask on the image's own grid; BadImage when deepbet finds no brain."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, mask, _ = _model().run(nib.Nifti1Image(np.asarray(data, np.float32), affine))
    except Exception as exc:  # deepbet asserts, and numpy raises, on images without a head
        raise BadImage(f"skull stripping (deepbet) found no brain: {exc or type(exc).__name__}") from None
    finally:
        torch.set_num_threads(threads)
    mask = np.asarray(mask.dataobj) > 0
    if not mask.any():
        raise BadImage("skull stripping (deepbet) found no brain")
    return mask
