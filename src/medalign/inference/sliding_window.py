"""Segmentation inference on images of any size: sliding windows, optional flip TTA, outputs.

Images larger than the model's training size are covered by overlapping windows of that size
(MONAI's sliding-window inferer with Gaussian blending), so the model sees the scale it was
trained at instead of a downscaled image.

Prompt-guided models (text or attributes) are the exception: a prompt names places in the
whole image ("the right lower zone"), which a window does not show, and they were trained and
evaluated on whole images resized to their training size. So the whole image is resized to
that size, predicted once and the probabilities resized back, exactly as ``medalign eval
segment`` sees it. Flip test-time augmentation mirrors the prompt with the image ("left" <->
"right", :func:`medalign.data.transforms.mirror_words`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from PIL import Image

# Windows per forward pass. Batching feeds a GPU; on a CPU one window at a time stays in cache
# (8 windows measured 1.5x slower than 1 for a 224 px U-Net on a 1024 px image).
SW_BATCH_SIZE = {"cuda": 8, "cpu": 1}


@torch.inference_mode()
def predict_probabilities(
    model: Any,
    pixel_values: torch.Tensor,
    *,
    text: str | None = None,
    attributes: dict[str, str] | None = None,
    overlap: float = 0.25,
    flip_tta: bool = False,
    bf16: bool = False,
    sw_batch_size: int | None = None,
) -> np.ndarray:
    """Foreground probability map ``[H, W]`` for one image ``[1, C, H, W]`` of any size.

    ``bf16`` runs the model under bfloat16 autocast (about 1.8x faster on CPUs with bf16
    support); probabilities are blended in float32 either way.
    """
    model.eval()
    sw_batch_size = sw_batch_size or SW_BATCH_SIZE.get(pixel_values.device.type, 1)
    if getattr(model, "needs_text", False) and text is None:
        raise ValueError(
            "this model is text-guided: give the prompt that names what to segment ('' for none)"
        )
    if getattr(model, "takes_attributes", False) or getattr(model, "needs_text", False):
        return _predict_whole_image(model, pixel_values, text, attributes, flip_tta, bf16)

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        with torch.autocast(windows.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(pixel_values=windows)["logits"][:, :1]
        return torch.sigmoid(logits.float())

    size = model.config.image_size
    height, width = pixel_values.shape[-2:]
    padded = _pad_to(pixel_values, size)

    def run(x: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(
            x,
            (size, size),
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode="gaussian",
        )

    probabilities = run(padded)
    if flip_tta:
        probabilities = (probabilities + run(padded.flip(-1)).flip(-1)) / 2
    return probabilities[0, 0, :height, :width].numpy()


def _predict_whole_image(
    model: Any,
    pixel_values: torch.Tensor,
    text: str | None,
    attributes: dict[str, str] | None,
    flip_tta: bool,
    bf16: bool,
) -> np.ndarray:
    """A prompt-guided model on the whole image at its training size (see the module docstring)."""
    import torch.nn.functional as F

    from medalign.data.transforms import mirror_words

    height, width = pixel_values.shape[-2:]
    size = model.config.image_size
    whole = (height, width) == (size, size)
    resized = pixel_values if whole else F.interpolate(pixel_values, size=(size, size), mode="bilinear")

    def run(x: torch.Tensor, flips: tuple[int, ...]) -> torch.Tensor:
        inputs: dict[str, torch.Tensor] = {}
        if text is not None:
            inputs |= model.tokenize([mirror_words(text, flips)])
        if attributes is not None:
            mirrored = {k: mirror_words(v, flips) for k, v in attributes.items()}
            inputs["attributes"] = model.encode_attributes([mirrored])
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(pixel_values=x, **inputs)["logits"][:, :1]
        return torch.sigmoid(logits.float())

    probabilities = run(resized, ())
    if flip_tta:
        probabilities = (probabilities + run(resized.flip(-1), (1,)).flip(-1)) / 2
    if not whole:
        probabilities = F.interpolate(probabilities, size=(height, width), mode="bilinear")
    return probabilities[0, 0].cpu().numpy()


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad (bottom/right, zeros) so that each side is at least one window."""
    pad_h, pad_w = max(0, size - x.shape[-2]), max(0, size - x.shape[-1])
    return torch.nn.functional.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def save_mask(mask: np.ndarray, path: str | os.PathLike, spacing: Sequence[float] = (1.0, 1.0)) -> Path:
    """Binary mask as PNG (0/255) or NIfTI (uint8 0/1 with the pixel spacing), by suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = mask.astype(bool)
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        affine = np.diag([float(spacing[1]), float(spacing[0]), 1.0, 1.0])
        nib.save(nib.Nifti1Image(binary.T[:, :, None].astype(np.uint8), affine), str(path))  # (X, Y, 1)
    else:
        Image.fromarray((binary * 255).astype(np.uint8)).save(path)
    return path


def overlay(
    image: torch.Tensor, mask: np.ndarray, colour: tuple[int, int, int] = (255, 60, 60)
) -> Image.Image:
    """The first channel in grey with the mask tinted and its outline drawn, for reports."""
    grey = (image[0, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1).astype(np.float32)
    inside = mask.astype(bool)
    rgb[inside] = 0.6 * rgb[inside] + 0.4 * np.asarray(colour, dtype=np.float32)
    eroded = np.zeros_like(inside)
    eroded[1:-1, 1:-1] = (
        inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    )
    rgb[inside & ~eroded] = colour
    return Image.fromarray(rgb.astype(np.uint8))
