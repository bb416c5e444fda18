"""Image/label transforms of MaskFormer's semantic-segmentation mappers, in numpy + PIL.

Training (SimFormer's weak-shot mappers, method reference 2.3), applied in this order:

1. scale jitter: resize so the shortest edge is ``test_size * U(min_scale, max_scale)`` (longest edge capped at
   ``MAX_SIZE_FACTOR * test_size``); bilinear for images, nearest for labels. MaskFormer draws the shortest edge
   from a *choice list* (COCO: 320, 384, ..., 960; ADE: 256, 307, ..., 1024, i.e. ``test_size`` times evenly
   spaced factors); a continuous range with the same end points is an approximation that keeps the config to
   two numbers and avoids a dataset-specific list. The end points are 0.5-1.5 for COCO (320/640, 960/640) and
   0.5-2.0 for ADE20K (256/512, 1024/512).
2. random crop of ``crop_size x crop_size`` (smaller sides are cropped to the image and padded in step 5),
   re-drawn up to ``crop_retries`` times until the crop holds at least one labelled pixel (SimFormer's
   ``RandomCrop_CategoryAreaConstraint`` with SINGLE_CATEGORY_MAX_AREA 1.0 plus its re-draw loop).
3. SSD colour jitter (detectron2's ``ColorAugSSDTransform``).
4. horizontal flip with probability 0.5.
5. padding to ``crop_size x crop_size`` rounded up to a multiple of 32 (image 128, label 255), bottom/right as
   detectron2 pads, with a pad mask (True on padding), so every training image of a batch has the same size.

Test: shortest edge = ``test_size`` (longest capped at ``MAX_SIZE_FACTOR * test_size``), then padding to a
multiple of 32; the unpadded resized size is returned so predictions can be cropped and resized back.

All randomness comes from an explicit ``np.random.Generator``, drawn in a fixed order, so the same generator
state gives the same crop, colours and flip in any process.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from weakshot.config import AugmentConfig

IGNORE_LABEL = 255
PAD_IMAGE_VALUE = 128  # MaskFormer pads images with 128 (mid-grey before normalisation)
SIZE_DIVISIBILITY = 32  # the backbone's total stride
# MaskFormer's MAX_SIZE_{TRAIN,TEST} is 4x the test shortest edge on both datasets (2560/640, 2048/512).
MAX_SIZE_FACTOR = 4

# detectron2 ColorAugSSDTransform defaults.
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # in OpenCV's 8-bit hue units (2 degrees each)


# --- resizing -------------------------------------------------------------------------------------------


def shortest_edge_size(height: int, width: int, short_edge: float, max_size: float) -> tuple[int, int]:
    """(H, W) after resizing the shortest edge to ``short_edge``, longest edge at most ``max_size``.

    Rounds like detectron2's ``ResizeShortestEdge.get_output_shape`` (scale, cap, then ``int(x + 0.5)``).
    """
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        rescale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * rescale, new_w * rescale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an H x W x 3 uint8 image to ``size`` = (H, W) (PIL, as detectron2's ResizeTransform)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an H x W uint8 label map: no new (interpolated) class ids appear."""
    if label.shape == tuple(size):
        return label
    return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.NEAREST))


def random_scale(
    image: np.ndarray, label: np.ndarray, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Scale jitter: shortest edge = test_size x U(min_scale, max_scale) (continuous stand-in for the list)."""
    short_edge = aug.test_size * rng.uniform(aug.min_scale, aug.max_scale)
    size = shortest_edge_size(*label.shape, short_edge, MAX_SIZE_FACTOR * aug.test_size)
    return resize_image(image, size), resize_label(label, size)


# --- cropping and flipping ------------------------------------------------------------------------------


def random_crop(
    image: np.ndarray, label: np.ndarray, crop_size: int, retries: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A crop of at most crop_size x crop_size, re-drawn until it holds a labelled pixel (at most ``retries``).

    A side shorter than ``crop_size`` is kept whole (padding happens later). When no draw within ``retries``
    finds a labelled pixel, the last draw is kept; a label map without any labelled pixel takes one draw.
    """
    height, width = label.shape
    crop_h, crop_w = min(crop_size, height), min(crop_size, width)
    attempts = max(1, retries) if bool((label != IGNORE_LABEL).any()) else 1
    for _ in range(attempts):
        y0 = int(rng.integers(0, height - crop_h + 1))
        x0 = int(rng.integers(0, width - crop_w + 1))
        crop_label = label[y0 : y0 + crop_h, x0 : x0 + crop_w]
        if (crop_label != IGNORE_LABEL).any():
            break
    return image[y0 : y0 + crop_h, x0 : x0 + crop_w], crop_label


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of image and label together, with probability 0.5."""
    if rng.random() < 0.5:
        return image[:, ::-1], label[:, ::-1]
    return image, label


# --- colour ---------------------------------------------------------------------------------------------


def _affine_uint8(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # detectron2 clips and truncates (astype) back to uint8 after every step; keep that quantisation.
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def rgb_to_hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """H x W x 3 RGB (any range) -> hue in degrees [0, 360), saturation in [0, 1], value (input range).

    Works on contiguous float32 planes with pairwise max/min: reductions over a length-3 last axis are
    several times slower in numpy, and this runs on every training crop.
    """
    red, green, blue = image.transpose(2, 0, 1).astype(np.float32)
    value = np.maximum(np.maximum(red, green), blue)
    chroma = value - np.minimum(np.minimum(red, green), blue)
    safe_chroma = chroma + (chroma == 0)  # hue is 0 for grey pixels; avoid 0/0
    sextant = np.where(
        value == red,
        (green - blue) / safe_chroma,
        np.where(value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0),
    )
    hue = sextant * 60.0  # in (-60, 300]; np.mod is slow, only the red sextant can be negative
    hue += 360.0 * (hue < 0)
    saturation = chroma / (value + (value == 0))
    return hue, saturation, value


def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Inverse of ``rgb_to_hsv``, rounded to uint8.

    Channel n (5 = R, 3 = G, 1 = B) is V - V S clamp(min(k, 4 - k), 0, 1) with k = (n + H / 60) mod 6.
    """
    out = np.empty((*hue.shape, 3), dtype=np.uint8)
    chroma = value * saturation
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = hue * (1.0 / 60.0) + n  # in [n, n + 6): "mod 6" is one conditional subtraction
        k -= 6.0 * (k >= 6.0)
        plane = value - chroma * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
        out[..., channel] = np.clip(np.rint(plane), 0, 255)
    return out


def _contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.integers(2):
        return _affine_uint8(image, alpha=rng.uniform(*CONTRAST_RANGE))
    return image


def _saturation_hue(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Saturation and hue are adjacent in both of ColorAugSSD's orders, so one HSV round trip serves both.
    # Unlike OpenCV we keep HSV in float between the two steps (no 8-bit HSV quantisation).
    saturation_alpha = rng.uniform(*SATURATION_RANGE) if rng.integers(2) else None
    hue_shift = int(rng.integers(-HUE_DELTA, HUE_DELTA + 1)) if rng.integers(2) else None
    if saturation_alpha is None and hue_shift is None:
        return image
    hue, saturation, value = rgb_to_hsv(image)
    if saturation_alpha is not None:
        saturation = np.clip(saturation * saturation_alpha, 0.0, 1.0)
    if hue_shift is not None:
        hue = hue + 2.0 * hue_shift  # OpenCV hue units are 2 degrees; wrap back into [0, 360)
        hue += 360.0 * (hue < 0) - 360.0 * (hue >= 360.0)
    return hsv_to_rgb(hue, saturation, value)


def color_aug_ssd(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SSD photometric distortion, as detectron2's ColorAugSSDTransform.

    Brightness (p = 0.5, additive U(-32, 32)) first; then, by a fair coin, either contrast -> saturation -> hue
    or saturation -> hue -> contrast. Each of contrast (x U(0.5, 1.5)), saturation (x U(0.5, 1.5)) and hue
    (+ U{-18..18} x 2 degrees) is applied with probability 0.5. The operations are symmetric in the channel
    order, so working on RGB instead of detectron2's BGR changes nothing.
    """
    if rng.integers(2):
        image = _affine_uint8(image, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    if rng.integers(2):
        image = _saturation_hue(_contrast(image, rng), rng)
    else:
        image = _contrast(_saturation_hue(image, rng), rng)
    return image


# --- padding --------------------------------------------------------------------------------------------


def round_up(value: int, divisor: int = SIZE_DIVISIBILITY) -> int:
    return -(-value // divisor) * divisor


def pad_image(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad an H x W x 3 image at the bottom/right with 128 to height x width; also return the pad mask."""
    h, w = image.shape[:2]
    if h > height or w > width:
        raise ValueError(f"cannot pad a {h}x{w} image to {height}x{width}")
    padded = np.full((height, width, 3), PAD_IMAGE_VALUE, dtype=np.uint8)
    padded[:h, :w] = image
    pad_mask = np.ones((height, width), dtype=bool)
    pad_mask[:h, :w] = False
    return padded, pad_mask


def pad_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad a label map at the bottom/right with the ignore label 255."""
    h, w = label.shape
    padded = np.full((height, width), IGNORE_LABEL, dtype=np.uint8)
    padded[:h, :w] = label
    return padded


# --- pipelines ------------------------------------------------------------------------------------------


def train_augment(
    image: np.ndarray, label: np.ndarray, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full training pipeline: (image H x W x 3 uint8, label H x W uint8, pad mask H x W bool).

    The output is always ``round_up(crop_size) x round_up(crop_size)``. Random numbers are drawn in a fixed
    order (scale, crop, colour, flip), so the result depends only on the generator's state.
    """
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    image, label = random_scale(image, label, aug, rng)
    image, label = random_crop(image, label, aug.crop_size, aug.crop_retries, rng)
    if aug.color_jitter:
        image = color_aug_ssd(np.ascontiguousarray(image), rng)
    if aug.flip:
        image, label = random_flip(image, label, rng)
    side = round_up(aug.crop_size)
    image, pad_mask = pad_image(image, side, side)
    return image, pad_label(label, side, side), pad_mask


def resize_for_test(
    image: np.ndarray, test_size: int, max_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Test-time resize: shortest edge = test_size, then pad to a multiple of 32.

    Returns (padded image, pad mask, (h, w) of the resized image before padding).
    """
    size, padded_size = test_sizes(*image.shape[:2], test_size, max_size)
    resized = resize_image(image, size)
    padded, pad_mask = pad_image(resized, *padded_size)
    return padded, pad_mask, size


def test_sizes(
    height: int, width: int, test_size: int, max_size: int | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(h, w) of an image of ``height`` x ``width`` after the test-time resize, and (H, W) after the padding:
    what :func:`resize_for_test` makes of it, from the size alone."""
    max_size = MAX_SIZE_FACTOR * test_size if max_size is None else max_size
    size = shortest_edge_size(height, width, test_size, max_size)
    return size, (round_up(size[0]), round_up(size[1]))


test_sizes.__test__ = False  # a function of test-time sizes, not a pytest test
