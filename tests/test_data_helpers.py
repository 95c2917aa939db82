"""Small local corpora and a word-level tokenizer whose ids can be read back, for the data tests."""

import json
import os

import numpy as np

MARKERS = 400  # document i starts with token "m{i}"; body tokens are "w{j}"
WORDS = 600


def make_tokenizer(path, eos=True, bos=True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<bos>": 1}
    vocab.update({f"m{i}": 2 + i for i in range(MARKERS)})
    vocab.update({f"w{j}": 2 + MARKERS + j for j in range(WORDS)})
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {"unk_token": "<unk>"}
    if eos:
        kw["eos_token"] = "<eos>"
    if bos:
        kw["bos_token"] = "<bos>"
    PreTrainedTokenizerFast(tokenizer_object=tok, **kw).save_pretrained(str(path))
    return str(path)


def make_docs(n, seed=0, max_len=30, marker_offset=0):
    """n documents; document i = marker token then 0..max_len-1 body tokens (as text)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        body = rng.integers(0, WORDS, size=int(rng.integers(0, max_len)))
        docs.append(" ".join([f"m{i + marker_offset}"] + [f"w{j}" for j in body]))
    return docs


def doc_ids(text):
    """Token ids of a document text under make_tokenizer."""
    out = []
    for t in text.split():
        out.append(2 + int(t[1:]) if t[0] == "m" else 2 + MARKERS + int(t[1:]))
    return out


def write_jsonl(dirpath, docs, files=1, column="text"):
    os.makedirs(dirpath, exist_ok=True)
    paths = []
    for f in range(files):
        p = os.path.join(dirpath, f"part-{f:03d}.jsonl")
        with open(p, "w") as fh:
            for d in docs[f::files]:
                fh.write(json.dumps({column: d, "meta": 1}) + "\n")
        paths.append(p)
    return paths
