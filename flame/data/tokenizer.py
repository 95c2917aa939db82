"""Tokenizers: flame's default byte-level BPE (trained on the default corpus) or any fast HF one."""

import hashlib
import os
import tempfile
from pathlib import Path

from flame.data.config import DataConfig
from flame.data.corpus import build_lock, cache_dir, corpus_fingerprint, load_default_corpus

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_RECIPE_VERSION = 1
# The BPE is trained on every n-th corpus document: enough text for a few thousand merges while
# keeping the first run to seconds.
_TRAIN_EVERY = 4


def _train_default(vocab_size: int, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = load_default_corpus()["text"][::_TRAIN_EVERY]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
    hf.save_pretrained(str(out_dir))


def default_tokenizer_path(vocab_size: int) -> Path:
    """Trains the default tokenizer on first use and caches it in Hugging Face format."""
    key = hashlib.sha256(
        f"v{_RECIPE_VERSION} {corpus_fingerprint()} {vocab_size} {_TRAIN_EVERY}".encode()
    ).hexdigest()[:16]
    path = cache_dir() / f"tokenizer-bpe{vocab_size}-{key}"
    with build_lock(path):
        if not (path / "tokenizer.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp"))
            _train_default(vocab_size, tmp)
            os.replace(tmp, path)
    return path


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def build_tokenizer(data_cfg: DataConfig):
    """Returns a `transformers.PreTrainedTokenizerFast` with the separator token the packer needs."""
    data_cfg.validate()
    tok = load_tokenizer(data_cfg.tokenizer, data_cfg.default_vocab_size)
    check_separator(tok, data_cfg.separator, data_cfg.tokenizer)
    return tok


def load_tokenizer(name: str, default_vocab_size: int = 4096):
    """"default" (flame's BPE), a hub id or a local directory -> PreTrainedTokenizerFast."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name == "default":
        tok = PreTrainedTokenizerFast.from_pretrained(str(default_tokenizer_path(default_vocab_size)))
    else:
        local = os.path.isdir(name)
        if not local and os.path.exists(name):
            raise ValueError(f"data.tokenizer = {name!r} is a file; give the directory holding tokenizer.json")
        try:
            tok = AutoTokenizer.from_pretrained(name, use_fast=True)
        except Exception as e:
            where = "this local directory" if local else "the Hugging Face hub"
            hint = (" The hub is unreachable (HF_HUB_OFFLINE is set or there is no network): download it "
                    "beforehand or point data.tokenizer at a local directory."
                    if not local and _hub_offline() else "")
            raise ValueError(f"data.tokenizer = {name!r} could not be loaded from {where}: "
                             f"{type(e).__name__}: {str(e).rstrip('.')}.{hint}") from e
        if not isinstance(tok, PreTrainedTokenizerFast):
            raise ValueError(f"data.tokenizer = {name!r} has no fast (Rust) tokenizer; "
                             "flame needs one (tokenizer.json) for throughput")
    return tok


def check_separator(tok, separator: str, name: str = "") -> int:
    token_id = tok.eos_token_id if separator == "eos" else tok.bos_token_id
    if token_id is None:
        raise ValueError(f"data.tokenizer {name!r} has no {separator.upper()} token, which data.separator = "
                         f"{separator!r} needs between documents; set data.separator to "
                         f"{'bos' if separator == 'eos' else 'eos'!r} or use a tokenizer that defines it")
    return token_id
