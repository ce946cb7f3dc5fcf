"""Make small CLIP models offline: a CLIP-compatible BPE tokenizer trained on a word list,
and a ``CLIPModel`` folder (model + tokenizer + image processor) loadable by
``CLIPModel.from_pretrained`` exactly like a hub model.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Optional

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Everyday words so that free text is tokenized into whole words where possible.
COMMON_WORDS = (
    "a an the of and or with without in on at to from by for is are this that these those photo picture image "
    "drawing painting of some one two three four many big small large tiny little left right top bottom middle "
    "center centre corner near far above below beside next background foreground light dark bright pale black "
    "white gray grey red green blue yellow orange purple pink brown cyan magenta cat dog car tree house person "
    "people beach sunset sky sea water mountain city street flower food bird"
).split()


def train_tokenizer(folder: str, words: Iterable[str], vocab_size: int = 1024) -> str:
    """Train a byte-level BPE on ``words`` with CLIP's conventions and save it as a
    ``CLIPTokenizer`` (vocab.json + merges.txt + tokenizer files) in ``folder``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    corpus = sorted({w.lower() for w in list(words) + list(COMMON_WORDS) if w.strip()})
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=EOS))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    # Each word many times, so that whole words win the merges.
    tok.train_from_iterator((" ".join(corpus) for _ in range(20)), trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        tok.model.save(tmp)
        vocab_path, merges_path = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        vocab = json.load(open(vocab_path, encoding="utf-8"))
        # Every single byte also needs its end-of-word form, as in CLIP's own vocabulary.
        for ch in pre_tokenizers.ByteLevel.alphabet():
            vocab.setdefault(ch + "</w>", len(vocab))
        for special in (BOS, EOS):
            vocab.setdefault(special, len(vocab))
        with open(vocab_path, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        tokenizer = CLIPTokenizer(vocab_path, merges_path, model_max_length=77)
        os.makedirs(folder, exist_ok=True)
        tokenizer.save_pretrained(folder)
    return folder


def tiny_clip_config(vocab_size: int, *, image_size: int = 32, patch_size: int = 8, width: int = 64,
                     layers: int = 2, projection_dim: int = 32, max_positions: int = 77):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers,
                         num_attention_heads=max(1, width // 32), max_position_embeddings=max_positions,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None),
        vision_config=dict(image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=width * 2,
                           num_hidden_layers=layers, num_attention_heads=max(1, width // 32)),
        projection_dim=projection_dim,
    )


def save_clip_folder(folder: str, model, tokenizer, image_size: int) -> str:
    """Save model, tokenizer and a matching CLIPImageProcessor so ``from_pretrained(folder)`` loads all three."""
    from transformers import CLIPImageProcessor

    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def make_tiny_clip(folder: str, *, words: Iterable[str] = (), seed: int = 0, image_size: int = 32,
                   patch_size: int = 8, width: int = 64, layers: int = 2, projection_dim: int = 32,
                   tokenizer_folder: Optional[str] = None) -> str:
    """A randomly initialised small CLIP saved to ``folder`` (for tests and as a training start)."""
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    tok_dir = tokenizer_folder or os.path.join(folder, "_tokenizer")
    if tokenizer_folder is None:
        train_tokenizer(tok_dir, words)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    config = tiny_clip_config(len(tokenizer), image_size=image_size, patch_size=patch_size, width=width,
                              layers=layers, projection_dim=projection_dim)
    config.text_config.eos_token_id = tokenizer.convert_tokens_to_ids(EOS)
    config.text_config.bos_token_id = tokenizer.convert_tokens_to_ids(BOS)
    config.text_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.text_config.eos_token_id
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    save_clip_folder(folder, model, tokenizer, image_size)
    if tokenizer_folder is None:
        import shutil

        shutil.rmtree(tok_dir, ignore_errors=True)
    return folder


def make_vit_b32(folder: str, seed: int = 0) -> str:
    """CLIPConfig() defaults (ViT-B/32 image tower, 512-d text tower, 512-d projection), random
    weights, an offline BPE tokenizer, saved so ``from_pretrained(folder)`` loads it like a hub model."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    tok_dir = folder + "_tokenizer"
    train_tokenizer(tok_dir, [])
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    config = CLIPConfig()
    config.text_config.eos_token_id = tokenizer.convert_tokens_to_ids(EOS)
    config.text_config.bos_token_id = tokenizer.convert_tokens_to_ids(BOS)
    config.text_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.text_config.eos_token_id
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    save_clip_folder(folder, model, tokenizer, config.vision_config.image_size)
    import shutil

    shutil.rmtree(tok_dir, ignore_errors=True)
    return folder
