"""Model families: CLIP and SigLIP folders load through transformers' Auto classes, embed like
transformers' own processor, tokenizer and model, and /classify gives the model's own probabilities;
other model types are refused by name."""


import numpy as np
import pytest
import torch
from docarray import DocList
from PIL import Image

from executors.clip_image_encoder import CLIPImageEncoder
from executors.clip_text_encoder import CLIPTextEncoder
from executors.docs import ImageInput, QueryPart, TextQuery
from executors.models import loading
from executors.models.loading import ModelLoadError, check_model_available, features, load_clip

from tests.conftest import draw_picture

WORDS = "a photo of drawing red green blue yellow circle square car".split()
TEXT_LENGTH = 16  # the tiny SigLIP's max_position_embeddings: every text is padded to it
LABELS = ["red circle", "blue square", "car"]


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def save_siglip_tokenizer(folder: str) -> int:
    """A word-level tokenizer that ends every text with ``</s>`` (as SigLIP's does), saved as a tokenizers
    folder (tokenizer.json + tokenizer_config.json) that ``AutoTokenizer.from_pretrained`` loads. Returns
    its vocabulary size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>"] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=TEXT_LENGTH,
                            model_input_names=["input_ids", "attention_mask"]).save_pretrained(folder)
    return len(vocab)


def tiny_siglip_config(vocab_size: int):
    from transformers import SiglipConfig

    return SiglipConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=TEXT_LENGTH,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2),
    )


@pytest.fixture(scope="module")
def siglip_model(tmp_path_factory) -> str:
    """A randomly initialised small SiglipModel with its tokenizer and SiglipImageProcessor, saved to a
    folder like a hub model. Its logit scale and bias are set away from their initial values (1 and 0),
    so that /classify shows it uses both."""
    from transformers import SiglipImageProcessor, SiglipModel

    folder = str(tmp_path_factory.mktemp("models") / "tiny-siglip")
    vocab_size = save_siglip_tokenizer(folder)
    torch.manual_seed(0)
    model = SiglipModel(tiny_siglip_config(vocab_size)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(10.0)))
        model.logit_bias.fill_(-1.5)
    model.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["clip", "siglip"])
def family_model(request, tiny_model, siglip_model):
    """(family, folder) for each family."""
    return request.param, {"clip": tiny_model, "siglip": siglip_model}[request.param]


def reference(folder):
    """transformers' own model, image processor and tokenizer for ``folder``."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    return (AutoModel.from_pretrained(folder).eval(), AutoImageProcessor.from_pretrained(folder),
            AutoTokenizer.from_pretrained(folder))


def reference_tokens(family, tokenizer, texts):
    if family == "siglip":  # how SigLIP was trained, and what its model card asks for
        return tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, return_tensors="pt")
    return tokenizer(texts, padding=True, return_tensors="pt")


@pytest.fixture
def pictures(tmp_path):
    """PNG pictures of several shapes (an exact resize and a crop differ on the non-square ones)."""
    return [draw_picture(tmp_path / "red.png", "red"),
            draw_picture(tmp_path / "blue.png", "blue", size=(64, 120), shape="square"),
            draw_picture(tmp_path / "green.png", "green", size=(50, 50)),
            draw_picture(tmp_path / "yellow.png", "yellow", size=(200, 40), shape="square")]


def test_each_family_loads_through_the_auto_classes(tiny_model, siglip_model):
    siglip = load_clip(siglip_model, "cpu", "float32", with_tokenizer=True)
    assert type(siglip.model).__name__ == "SiglipModel"
    assert (siglip.family, siglip.text_padding) == ("siglip", "max_length")
    assert siglip.logit_scale == pytest.approx(10.0, rel=1e-6) and siglip.logit_bias == pytest.approx(-1.5)
    assert siglip.processor_config["size"] == {"height": 32, "width": 32}
    clip = load_clip(tiny_model, "cpu", "float32", with_tokenizer=True)
    assert type(clip.model).__name__ == "CLIPModel"
    assert (clip.family, clip.text_padding, clip.logit_bias) == ("clip", "longest", 0.0)
    check_model_available(siglip_model)


def test_image_embeddings_match_transformers(family_model, pictures):
    family, folder = family_model
    model, processor, _ = reference(folder)
    encoder = CLIPImageEncoder(pretrained_model_name_or_path=folder, device="cpu", dtype="float32", batch_size=3)
    docs = DocList[ImageInput]([ImageInput(url=p) for p in pictures])
    encoder.encode(docs)
    assert all(d.error is None for d in docs)
    with torch.inference_mode():
        pixel_values = processor(images=[Image.open(p).convert("RGB") for p in pictures],
                                 return_tensors="pt")["pixel_values"]
        expected = _unit(features(model.get_image_features(pixel_values=pixel_values)).numpy())
    got = np.stack([d.embedding for d in docs])
    assert got.dtype == np.float32
    cosines = (_unit(got) * expected).sum(axis=1)
    assert cosines.min() >= 0.9999, (family, cosines)


def test_text_embeddings_match_transformers(family_model):
    family, folder = family_model
    model, _, tokenizer = reference(folder)
    texts = ["a red circle", "a photo of a blue square", "green", "a drawing of a yellow car"]
    docs = DocList[TextQuery]([TextQuery(text=t) for t in texts])
    CLIPTextEncoder(pretrained_model_name_or_path=folder, device="cpu", dtype="float32").encode(docs)
    with torch.inference_mode():
        tokens = reference_tokens(family, tokenizer, texts)
        expected = _unit(features(model.get_text_features(**tokens)).numpy())
    cosines = (_unit(np.stack([d.embedding for d in docs])) * expected).sum(axis=1)
    assert cosines.min() >= 0.9999, (family, cosines)


def _tokens_seen(clip, texts, **kwargs):
    seen = []
    real = loading._text_features

    def spy(clip, tokens):
        seen.append(tokens)
        return real(clip, tokens)

    loading._text_features = spy
    try:
        vectors = loading.text_embeddings(clip, texts, **kwargs)
    finally:
        loading._text_features = real
    return (seen[0] if len(seen) == 1 else seen), vectors


def test_siglip_pads_every_text_to_the_text_towers_length(siglip_model, tiny_model):
    siglip = load_clip(siglip_model, "cpu", "float32", with_tokenizer=True)
    tokens, vectors = _tokens_seen(siglip, ["red", "a photo of a blue square"])
    assert tuple(tokens["input_ids"].shape) == (2, TEXT_LENGTH)
    # padded alone or beside a longer text: the same vector, since the padding does not depend on the batch
    alone = loading.text_embeddings(siglip, ["red"])
    np.testing.assert_allclose(alone[0], vectors[0], atol=1e-6)
    # a shorter max_length cuts the text, and it is still padded to the full length
    tokens, _ = _tokens_seen(siglip, ["a photo of a blue square"], max_length=4)
    pad = siglip.tokenizer.pad_token_id
    assert tuple(tokens["input_ids"].shape) == (1, TEXT_LENGTH)
    assert int((tokens["input_ids"][0] != pad).sum()) == 4
    clip = load_clip(tiny_model, "cpu", "float32", with_tokenizer=True)
    calls, _ = _tokens_seen(clip, ["red", "a photo of a blue square"])
    lengths = [len(clip.tokenizer(t)["input_ids"]) for t in ("red", "a photo of a blue square")]
    assert [tuple(c["input_ids"].shape) for c in calls] == [(1, n) for n in lengths]  # CLIP: one call per length, unpadded


def test_classify_gives_the_models_own_probabilities(family_model, pictures):
    family, folder = family_model
    model, processor, tokenizer = reference(folder)
    image_encoder = CLIPImageEncoder(pretrained_model_name_or_path=folder, device="cpu", dtype="float32")
    text_encoder = CLIPTextEncoder(pretrained_model_name_or_path=folder, device="cpu", dtype="float32")
    template = "a drawing of a {}"
    docs = DocList[TextQuery]([TextQuery(url=p, parts=DocList[QueryPart]([QueryPart(text=label) for label in LABELS]))
                               for p in pictures[:2]])
    text_encoder.encode_labels(docs, parameters={"template": template})
    image_encoder.classify(docs)
    with torch.inference_mode():
        tokens = reference_tokens(family, tokenizer, [template.format(label) for label in LABELS])
        pixel_values = processor(images=[Image.open(p).convert("RGB") for p in pictures[:2]],
                                 return_tensors="pt")["pixel_values"]
        logits = model(pixel_values=pixel_values, **tokens).logits_per_image.double()
    expected = torch.sigmoid(logits) if family == "siglip" else torch.softmax(logits, dim=-1)
    for doc, want in zip(docs, expected.numpy()):
        assert doc.error is None
        scores = [m.score for m in doc.matches]
        assert scores == sorted(scores, reverse=True)  # best first
        assert {m.id: m.score for m in doc.matches} == pytest.approx(dict(zip(LABELS, want.tolist())), abs=1e-4)
        if family == "clip":
            assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert doc.embedding is None and all(p.embedding is None for p in doc.parts)
    if family == "siglip":  # independent per label: nothing makes them sum to 1
        assert all(sum(m.score for m in doc.matches) != pytest.approx(1.0, abs=1e-3) for doc in docs)


def test_siglip_in_bfloat16_stays_close_to_float32(siglip_model, pictures):
    from executors.images.imaging import Preprocess, decode_image, preprocess

    f32 = load_clip(siglip_model, "cpu", "float32")
    bf16 = load_clip(siglip_model, "cpu", "bfloat16")
    assert bf16.logit_bias == f32.logit_bias and bf16.logit_scale == f32.logit_scale  # read before the precision
    recipe = Preprocess.from_processor_config(f32.processor_config)
    pixels = np.stack([preprocess(decode_image(open(p, "rb").read(), p), recipe) for p in pictures])
    a, b = loading.image_embeddings(f32, pixels), loading.image_embeddings(bf16, pixels)
    assert (a * b).sum(axis=1).min() > 0.99


def _config_only_folder(path, config) -> str:
    """A folder with only ``config.json``: a model type is refused before any weights would be read."""
    config.save_pretrained(str(path))
    return str(path)


def test_model_without_image_and_text_features_is_refused_by_type(tmp_path):
    from transformers import BertConfig

    folder = _config_only_folder(tmp_path / "bert", BertConfig(hidden_size=32, num_hidden_layers=1,
                                                               num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ModelLoadError) as err:
        load_clip(folder, "cpu", "float32")
    message = str(err.value)
    assert "'bert'" in message and "get_image_features" in message and folder in message
    assert "clip (CLIPModel)" in message and "siglip (SiglipModel)" in message


def test_siglip2_naflex_is_refused_with_the_fixed_resolution_alternative(tmp_path, siglip_model):
    import shutil

    from transformers import Siglip2Config

    folder = _config_only_folder(tmp_path / "naflex", Siglip2Config(
        text_config=dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)))
    shutil.copy(f"{siglip_model}/preprocessor_config.json", folder)  # so the cheap check reaches the model type
    for check in (lambda: load_clip(folder, "cpu", "float32"), lambda: check_model_available(folder)):
        with pytest.raises(ModelLoadError) as err:
            check()
        message = str(err.value)
        assert "'siglip2'" in message and "NaFlex" in message and "google/siglip2-base-patch16-224" in message
        assert "clip (CLIPModel)" in message and "siglip (SiglipModel)" in message


def save_sentencepiece_tokenizer(folder) -> int:
    """A real sentencepiece unigram model trained on WORDS, saved as ``spiece.model`` with a
    ``SiglipTokenizer`` config: how SigLIP (1) checkpoints ship their tokenizer. Returns its vocabulary size."""
    import io
    import json

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(WORDS)] * 50 + WORDS), model_writer=model,
                                   vocab_size=40, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SiglipTokenizer",
                                                              "model_max_length": TEXT_LENGTH}))
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()


def test_a_sentencepiece_siglip_checkpoint_embeds_like_transformers(tmp_path):
    """SigLIP (1) checkpoints ship ``spiece.model``: it loads through the same path and pads to the full length."""
    from transformers import SiglipImageProcessor, SiglipModel

    folder = tmp_path / "spm-siglip"
    folder.mkdir()
    vocab_size = save_sentencepiece_tokenizer(folder)
    torch.manual_seed(1)
    SiglipModel(tiny_siglip_config(vocab_size + 1)).eval().save_pretrained(str(folder))
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    clip = load_clip(str(folder), "cpu", "float32", with_tokenizer=True)
    assert type(clip.tokenizer).__name__ == "SiglipTokenizer" and clip.text_padding == "max_length"
    texts = ["a red circle", "a photo of a blue square", "yellow car"]
    docs = DocList[TextQuery]([TextQuery(text=t) for t in texts])
    CLIPTextEncoder(pretrained_model_name_or_path=str(folder), device="cpu", dtype="float32").encode(docs)
    model, _, tokenizer = reference(str(folder))
    with torch.inference_mode():
        expected = _unit(features(model.get_text_features(**reference_tokens("siglip", tokenizer, texts))).numpy())
    cosines = (_unit(np.stack([d.embedding for d in docs])) * expected).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines
