"""Shared test fixtures. The test machine has no network: keep every HF library offline."""
import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

from open_clip_train.errors import register_flags  # noqa: E402
from open_clip_train.params import build_parser, flag_spellings  # noqa: E402

# The library's messages spell settings as the command line does once it registered them
# (params.parse_args); unit tests that call the library directly see the same messages.
register_flags(flag_spellings(build_parser()))

EOS_TOKEN = "<|endoftext|>"

_SUBJECTS = ["a dog", "two cats", "a red car", "an old man", "a small bird", "a child", "three horses", "a boat"]
_VERBS = ["sitting on", "running across", "parked next to", "looking at", "flying over", "playing in"]
_PLACES = ["a wooden bench", "the green field", "a busy street", "the blue sky", "a sandy beach", "the snow"]
_EXTRAS = ["", " at sunset", " in the rain", " on a sunny day", ", photographed from above", " near a tree"]
_SYLLABLES = ["ka", "lo", "mi", "ren", "dor", "sta", "vel", "qui", "bra", "ton", "shi", "mar", "zel", "fin", "gru"]


def caption_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Caption-like sentences from a small grammar; made-up place names give BPE enough merges for ~1000 tokens."""
    rng = random.Random(seed)

    def place_name() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_PLACES)} in {place_name()}"
        f"{rng.choice(_EXTRAS)}."
        for _ in range(n)
    ]


def train_byte_level_bpe(out_dir: Path, vocab_size: int = 1000) -> Path:
    """Train a GPT-2 style byte-level BPE and save it as an HF tokenizer directory.

    EOS is the first special token, so it gets id 0 (what the tiny GPT-2 configs expect).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(caption_corpus(), trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)
    hf_tok.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_byte_level_bpe(tmp_path_factory.mktemp("gpt2_tokenizer"))
