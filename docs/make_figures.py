"""Render the illustrative figure of README.md: SMCA's Gaussian weight maps on a generated image.

No trained model is involved: the centers and scales are chosen by hand (one query on each
object of a generated shapes image, see ``smca_d2.data.synthetic``), and the maps are computed
with the package's own ``smca_d2.modeling.attention.gaussian_log_weights``, the function that
builds the attention bias inside the decoder. The three panels show the three scale types of the
decoder (``scale_type``): fixed, one scale per head, independent x/y scales.

The maps of a trained model are drawn by ``tools/visualize_gaussian_maps.py``.

    python docs/make_figures.py            # writes docs/figures/gaussian_maps.png
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from smca_d2.data.synthetic import CLASS_NAMES, render_image
from smca_d2.modeling.attention import gaussian_log_weights

HERE = os.path.dirname(os.path.abspath(__file__))
STRIDE = 8  # feature stride of the maps (res3, as in the demo config)
BETA = 8.0  # the configs' bandwidth (log G = -D / beta)
IMAGE_SIZE = (192, 256)
SEED = 3


def scales_for(box, scale_type: str):
    """Hand-chosen squared scales for a box [x, y, w, h] in pixels: a Gaussian whose standard
    deviation is about a third of the box's side, in feature cells (sigma^2 = beta / (2 s))."""
    w, h = box[2] / STRIDE, box[3] / STRIDE
    sx, sy = BETA / (2 * (w / 3) ** 2), BETA / (2 * (h / 3) ** 2)
    if scale_type == "fixed":
        return None
    if scale_type == "single":
        return [(sx * sy) ** 0.5]
    return [sx, sy]


def weight_maps(objects, scale_type: str) -> np.ndarray:
    """[Q, H, W] Gaussian weights (exp of the log weights) of one query per object."""
    fh, fw = IMAGE_SIZE[0] // STRIDE, IMAGE_SIZE[1] // STRIDE
    # Centers in feature cells (x = column, y = row), at each box's center.
    centers = torch.tensor(
        [[(x + w / 2) / STRIDE - 0.5, (y + h / 2) / STRIDE - 0.5] for _, (x, y, w, h) in objects]
    ).view(1, 1, -1, 2)
    scales = [scales_for(box, scale_type) for _, box in objects]
    scales = None if scales[0] is None else torch.tensor(scales).view(1, 1, len(objects), -1)
    log_w = gaussian_log_weights(centers, scales, (fh, fw), BETA)  # [1, 1, Q, fh * fw]
    return log_w.exp().view(len(objects), fh, fw).numpy()


def draw(path: str) -> None:
    image, objects = render_image(*IMAGE_SIZE, np.random.default_rng(SEED))
    titles = {
        "fixed": 'fixed scale (scale_type="fixed")',
        "single": 'one scale per head ("single")',
        "independent": 'x/y scales ("independent")',
    }
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.0), dpi=80)
    h, w = IMAGE_SIZE
    for ax, (scale_type, title) in zip(axes, titles.items()):
        maps = weight_maps(objects, scale_type)
        ax.imshow(image)
        # The maps of the queries together (their maximum), on the image, cell by cell.
        ax.imshow(maps.max(axis=0), cmap="magma", alpha=0.6, extent=(0, w, h, 0), interpolation="bilinear")
        for category, (x, y, bw, bh) in objects:
            ax.add_patch(plt.Rectangle((x, y), bw, bh, fill=False, edgecolor="cyan", linewidth=1))
            ax.plot(x + bw / 2, y + bh / 2, "+", color="cyan", markersize=6)
            ax.text(x, y - 2, CLASS_NAMES[category - 1], color="cyan", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(
        "SMCA's Gaussian weight maps, one query per object (illustrative: hand-chosen centers and scales)",
        fontsize=9,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    plt.close(fig)
    # A 256-colour palette keeps the file small (the image's noise makes a true-colour PNG large).
    Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(HERE, "figures", "gaussian_maps.png"))
    args = parser.parse_args(argv)
    draw(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
