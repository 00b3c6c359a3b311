"""The digits task of the examples: images of the digits 0-9 drawn from the
fonts that matplotlib ships (no download; scikit-learn's digits are not
needed), randomly rotated, scaled, sheared and shifted, shrunk to a small
square. Used by ``examples/sequence_norms.py`` (fed pixel by pixel) and
``examples/small_batch_norms.py`` (as images).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

# Fonts of matplotlib's own data directory with ordinary digit glyphs (its
# symbol-only fonts are left out). Variety of shapes stands in for handwriting.
FONTS = ["DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSansMono",
         "DejaVuSansMono-Bold", "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
         "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta", "cmr10", "cmss10", "cmtt10",
         "cmb10", "cmti10"]


def glyphs(size: int = 32) -> torch.Tensor:
    """``(len(FONTS), 10, size, size)`` images of the digits, ink 1 on 0, each
    digit's outline scaled to the middle 80% of the box."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import PathPatch
    from matplotlib.textpath import TextPath

    font_dir = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    out = np.zeros((len(FONTS), 10, size, size), dtype=np.float32)
    for f, font in enumerate(FONTS):
        prop = FontProperties(fname=os.path.join(font_dir, font + ".ttf"))
        for d in range(10):
            path = TextPath((0, 0), str(d), size=1, prop=prop)
            (x0, y0), (x1, y1) = path.get_extents().get_points()
            half = max(x1 - x0, y1 - y0) / 2 / 0.8
            fig = Figure(figsize=(1, 1), dpi=size)
            canvas = FigureCanvasAgg(fig)
            ax = fig.add_axes((0, 0, 1, 1))
            ax.axis("off")
            ax.add_patch(PathPatch(path, facecolor="black", edgecolor="none"))
            ax.set_xlim((x0 + x1) / 2 - half, (x0 + x1) / 2 + half)
            ax.set_ylim((y0 + y1) / 2 - half, (y0 + y1) / 2 + half)
            canvas.draw()
            out[f, d] = 1 - np.asarray(canvas.buffer_rgba())[..., 0] / 255.0
    return torch.from_numpy(out)


def digit_images(templates: torch.Tensor, count: int, seed: int, noise: float = 0.0, side: int = 8):
    """``count`` distorted digits as ``(count, 1, side, side)`` images and
    their labels: a random font and digit, a random affine map (rotation up to
    15 degrees, scale 0.8-1.1, shear up to 0.25, shift up to 12% of the side),
    shrunk to ``side`` x ``side`` by averaging, plus Gaussian noise of std
    ``noise``. Without noise the background is 0, as in MNIST."""
    g = torch.Generator().manual_seed(seed)
    fonts = templates.shape[0]
    font = torch.randint(fonts, (count,), generator=g)
    label = torch.randint(10, (count,), generator=g)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(count, generator=g)  # noqa: E731
    angle, scale, shear = u(-0.26, 0.26), u(0.8, 1.1), u(-0.25, 0.25)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, u(-0.12, 0.12)], 1),
                         torch.stack([sin, cos, u(-0.12, 0.12)], 1)], 1)
    images = templates[font, label].unsqueeze(1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, align_corners=False)
    images = F.adaptive_avg_pool2d(images, side)
    images = images + noise * torch.randn(images.shape, generator=g)
    return images, label
