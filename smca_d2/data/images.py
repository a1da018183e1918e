"""Reading image files as training and evaluation see them.

:func:`read_image` applies the EXIF orientation, turns grayscale / palette / CMYK images into
RGB, scales 16-bit images to 8 bits (``value / 257``) instead of clipping them to white, and
composites transparent pixels (RGBA, LA, palette with transparency) over white instead of
showing whatever colour the file stores under them. :func:`image_size` gives the size it would
return from the file's header alone.
"""

from typing import Optional, Tuple

import numpy as np
from PIL import Image

from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager

__all__ = ["exif_orientation", "image_size", "read_image"]

_ORIENTATION_TAG = 274  # EXIF "Orientation"
#: EXIF orientations that swap width and height.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_size(file_name: str) -> Tuple[int, int]:
    """(height, width) of an image as :func:`read_image` returns it (EXIF orientation applied),
    reading only the file's header."""
    with PathManager.open(file_name, "rb") as f, Image.open(f) as image:
        width, height = image.size
        if exif_orientation(image) in TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    return height, width


def _is_loaded(image: Image.Image) -> bool:
    try:
        return image.im is not None  # Pillow >= 11 asserts instead of returning None
    except Exception:
        return False


def exif_orientation(image: Image.Image) -> Optional[int]:
    """The EXIF orientation, without decoding the pixels (Pillow's ``getexif`` decodes a whole PNG
    to look for an EXIF chunk after the pixel data; only one before it is read here, unless the
    image is already loaded)."""
    try:
        if image.format == "PNG" and not _is_loaded(image):
            raw = image.info.get("exif")
            if not raw:
                return None
            exif = Image.Exif()
            exif.load(raw)
            return exif.get(_ORIENTATION_TAG)
        return image.getexif().get(_ORIENTATION_TAG)
    except Exception:  # a broken EXIF block: detectron2 ignores it too
        return None


def _composite_alpha(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Modes whose values do not fit 8 bits, as 8-bit grayscale."""
    if image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.float32) / 257.0
    elif image.mode == "I":
        array = np.asarray(image).astype(np.float64)
        if array.size and array.max() > 255:  # 16-bit data in a 32-bit container
            array = np.clip(array, 0, 65535) / 257.0
    elif image.mode == "F":
        array = np.asarray(image)
    else:
        return image
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def read_image(file_name: str, format: Optional[str] = None) -> np.ndarray:
    """:func:`detectron2.data.detection_utils.read_image`, fixed for 16-bit and transparent images.

    detectron2 converts every PIL mode with ``Image.convert``, which clips 16-bit values to 255
    (a 16-bit PNG becomes almost white) and drops the alpha channel (transparent pixels show the
    colour stored under them, often garbage). Here 16-bit images are scaled by ``1/257``, and
    images with transparency are composited over white. EXIF orientation is applied as in
    detectron2; the other modes (L, P, CMYK, 1, ...) convert as they do there.
    """
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image = utils._apply_exif_orientation(image)
        image = _to_8bit(image)
        if _has_alpha(image):
            image = _composite_alpha(image)
        return utils.convert_PIL_to_numpy(image, format)
