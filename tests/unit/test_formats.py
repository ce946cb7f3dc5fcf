"""The formats people's photos come in: HEIC/HEIF, AVIF, and a bound on decoded megapixels."""


import numpy as np
import pytest
from docarray import DocList
from PIL import Image

from executors.clip_image_encoder import CLIPImageEncoder
from executors.docs import STATUS_FAILED, ImageInput
from executors.images.imaging import ImageError, decode_image, is_image_file


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, dtype="float32")  # the container alone differs


def _photo(size=(160, 120), turned=False):
    """A noisy red gradient with a blue block in the top left corner (``turned``: the bottom right one)."""
    rng = np.random.default_rng(1)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    arr[..., 1] = 90
    arr[: size[1] // 2, : size[0] // 2, 2] = 220
    if turned:
        arr = np.ascontiguousarray(arr[::-1, ::-1])
    return Image.fromarray(np.clip(arr + rng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8))


# The same picture in two containers (quality 95) measured cosine >= 0.99998 in float32 (>= 0.99963 in int8). The
# control, the same photo turned upside down, scored 0.977 (its colours decoded as BGR: 0.931; in grey: 0.882)
# under this random model.
SAME_PICTURE = 0.999
OTHER_PICTURE = 0.99


@pytest.mark.parametrize("fmt,ext", [("HEIF", ".heic"), ("AVIF", ".avif"), ("PNG", ".png")])
def test_phone_formats_index_like_a_jpeg(encoder, tmp_path, fmt, ext):
    photo = _photo()
    path = tmp_path / f"photo{ext}"
    photo.save(path, format=fmt, **({"quality": 95} if fmt != "PNG" else {}))
    reference, other = tmp_path / "photo.jpg", tmp_path / "other.jpg"
    photo.save(reference, quality=95)
    _photo(turned=True).save(other, quality=95)
    assert is_image_file(str(path))
    docs = DocList[ImageInput]([ImageInput(url=str(path)), ImageInput(url=str(reference)), ImageInput(url=str(other))])
    encoder.encode(docs)
    assert docs[0].error is None and (docs[0].width, docs[0].height) == (160, 120)
    same = float(np.dot(docs[0].embedding, docs[1].embedding))
    control = float(np.dot(docs[0].embedding, docs[2].embedding))
    # a different picture scores clearly lower: the model tells pictures apart at this threshold ...
    assert control < OTHER_PICTURE, control
    # ... and the same picture, whatever the container, scores above it
    assert same >= SAME_PICTURE and same - control >= 0.01, (same, control)


def test_max_megapixels_downscales_jpeg_and_refuses_others(tiny_model, tmp_path):
    big = _photo((4000, 3000))
    jpeg, png = tmp_path / "big.jpg", tmp_path / "big.png"
    big.save(jpeg, quality=90)
    big.save(png)
    img = decode_image(jpeg.read_bytes(), "big.jpg", max_megapixels=2)
    assert img.size[0] * img.size[1] <= 2e6 and getattr(img, "original_size", None) == (4000, 3000)
    with pytest.raises(ImageError, match="12.0 megapixels, over the limit of 2"):
        decode_image(png.read_bytes(), "big.png", max_megapixels=2)
    docs = DocList[ImageInput]([ImageInput(url=str(jpeg)), ImageInput(url=str(png))])
    CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, max_megapixels=2).encode(docs)
    assert docs[0].embedding is not None and (docs[0].width, docs[0].height) == (4000, 3000)
    assert docs[1].status == STATUS_FAILED and "over the limit of 2" in docs[1].error
