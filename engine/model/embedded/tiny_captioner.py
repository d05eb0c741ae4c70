"""``loraflow/tiny-captioner``: a tiny random-weight GIT captioning model, built locally.

Why: the caption step's local backend (:mod:`engine.caption.local`) must be tested, and
shown in the README, through the very ``from_pretrained`` path a Hub id takes (config,
processor, tokenizer, weights in a folder), offline and in a second on a CPU. GIT is a
real image-to-text architecture that transformers supports natively (a CLIP-like vision
tower feeding a BERT-like decoder); here it has a few thousand parameters and a
WordPiece vocabulary of the demo words, so its captions are deterministic gibberish.

The folder is byte-identical for the same library versions (fixed seed, CPU, float32).
"""

from __future__ import annotations

from pathlib import Path

TINY_CAPTIONER_ID = "loraflow/tiny-captioner"
#: Bump when anything below changes the built files (registry.py keys folders by it).
TINY_CAPTIONER_VERSION = "1"
IMAGE_SIZE = 32
_SEED = 0
_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORDS_FILE = Path(__file__).parent / "configs" / "vocab_words.txt"


def vocabulary() -> list[str]:
    """The WordPiece vocabulary: BERT's special tokens, then the tiny models' words."""
    words = [line.strip() for line in _WORDS_FILE.read_text(encoding="utf-8").splitlines()]
    kept = [w.lower() for w in words if w and not w.startswith("#")]
    return [*_SPECIAL, *dict.fromkeys(kept)]


def build_tiny_captioner(folder: str | Path) -> Path:
    """Write the model, its image processor and tokenizer into ``folder``; return it."""
    import torch
    from transformers import BertTokenizer, GitConfig, GitForCausalLM, GitProcessor

    try:  # transformers 5: the PIL image processor (the default one wants torchvision)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("".join(v + "\n" for v in vocab), encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True)
    vocab_file.unlink()  # save_pretrained writes its own copy
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    config = GitConfig(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 8},
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=128,
        pad_token_id=vocab.index("[PAD]"), bos_token_id=vocab.index("[CLS]"),
        eos_token_id=vocab.index("[SEP]"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = GitForCausalLM(config).eval()
    model.save_pretrained(folder)
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
