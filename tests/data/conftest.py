"""Generated dataset layouts shared by the importer tests (a fixture: test modules import no test modules).

Layouts as people have them: an ultrasound set (image folder + mask folder + header-less
diagnosis table), a colonoscopy set (``Original/`` + ``Ground Truth/`` with GIF masks), masks
next to their images in patient folders (``P1/P1_3.png`` + ``P1/P1_3_mask.png``), and a
deliberately tricky one (a header-less label table with rows for missing images, a ``None``
category, a repeated row, an empty id, frames of one sequence with near-identical stems).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


class Layouts:
    """Builders of tiny image datasets; each returns the folder it filled."""

    @staticmethod
    def picture(path: Path, seed: int, shape: tuple[int, ...] = (12, 12, 3)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)
        return path

    @staticmethod
    def mask(path: Path, size: int = 12) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((size, size), np.uint8)
        pixels[3:8, 4:9] = 255
        Image.fromarray(pixels).save(path)
        return path

    @staticmethod
    def ultrasound(root: Path) -> Path:
        """images/ + masks/ (<stem>_mask.png) + a header-less diagnosis table: id, sex, age, diagnosis."""
        for n in range(1, 7):
            Layouts.picture(root / "images" / f"case{n}.png", n)
        for n in range(1, 6):
            Layouts.mask(root / "masks" / f"case{n}_mask.png")
        Layouts.mask(root / "masks" / "case9_mask.png")  # a mask whose image is missing
        rows = [
            f"case{n},{'F' if n % 2 else 'M'},{40 + n},{'benign' if n < 4 else 'malignant'}"
            for n in range(1, 7)
        ]
        rows.append("case7,F,61,malignant")  # a row whose image is missing
        (root / "diagnosis.csv").write_text("\n".join(rows) + "\n")
        return root

    @staticmethod
    def colonoscopy(root: Path) -> Path:
        """Original/<n>.png + Ground Truth/<n>.gif (folder names with a space, GIF masks)."""
        for n in range(1, 7):
            Layouts.picture(root / "Original" / f"{n}.png", n)
            Layouts.mask(root / "Ground Truth" / f"{n}.gif")
        return root

    @staticmethod
    def side_by_side(root: Path) -> Path:
        """<patient>/<patient>_<slice>.png next to <patient>_<slice>_mask.png, as LGG and BUSI ship them.

        P1_3 has no mask, P2_9_mask.png no image, and P2_1_mask_2.png (a second mask in BUSI's
        style) is not named by the ``_mask`` rule.
        """
        for patient in (1, 2, 3):
            for n in (1, 2, 3):
                Layouts.picture(root / f"P{patient}" / f"P{patient}_{n}.png", 10 * patient + n)
                if (patient, n) != (1, 3):
                    Layouts.mask(root / f"P{patient}" / f"P{patient}_{n}_mask.png")
        Layouts.mask(root / "P2" / "P2_9_mask.png")
        Layouts.mask(root / "P2" / "P2_1_mask_2.png")
        (root / "notes.txt").write_text("scanner B\n")
        return root

    @staticmethod
    def tricky(root: Path) -> Path:
        """Frames of three sequences, and a header-less table that has every problem at once."""
        for seq in (1, 2, 3):
            for frame in range(1, 5):
                Layouts.picture(root / "frames" / f"seq{seq}_f{frame:03d}.png", 10 * seq + frame)
        (root / "frames" / "Thumbs.db").write_bytes(b"x")
        (root / "frames" / "old").mkdir()
        Layouts.picture(root / "frames" / "old" / "seq1_f001.png", 99)  # a subfolder: not searched, said so
        scores = {1: "mild", 2: "moderate", 3: "severe"}
        lines = [f"seq{s}_f{f:03d}.png,P{s},{scores[s]}" for s in (1, 2, 3) for f in range(1, 4)]
        lines[2] = "seq1_f003.png,P1,None"  # a missing category, spelled None
        lines += [
            "seq2_f001.png,P2,moderate",  # the same row again
            "seq9_f001.png,P9,mild",  # rows for images that do not exist
            "ghost,P9,severe",
            ",P3,mild",  # no id
        ]
        (root / "scores.csv").write_text("\n".join(lines) + "\n")
        return root


@pytest.fixture
def layouts() -> type[Layouts]:
    return Layouts
