"""Pre-tokenize a corpus once: `python -m flame.data.tokenize --kind files --path 'data/*.jsonl'
--output data/tokenized --num-proc 16`.

Writes a `datasets` table (save_to_disk) with one `input_ids` column (int32 ids, no separators:
the loader adds them when packing) plus flame_tokenizer.json naming the tokenizer. Train on it
with a source `{ kind = "disk", path = "data/tokenized" }` and the same data.tokenizer.
"""

import argparse
import json
import os

from flame.data.config import SOURCE_KINDS, SourceConfig
from flame.data.sources import META_FILE, TOKEN_COLUMN, open_source
from flame.data.tokenizer import load_tokenizer


class _Encode:
    """Picklable batch function for datasets.map worker processes."""

    def __init__(self, backend, column: str):
        self.backend = backend
        self.column = column

    def __call__(self, batch):
        texts = ["" if t is None else t for t in batch[self.column]]
        encode = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
        return {TOKEN_COLUMN: [e.ids for e in encode(texts, add_special_tokens=False)]}


def tokenize_corpus(source: SourceConfig, tokenizer: str, output: str, *, num_proc: int = 1,
                    batch_size: int = 1000, default_vocab_size: int = 4096) -> str:
    import datasets

    if source.streaming:
        raise ValueError("--streaming is not supported here: pre-tokenizing reads the whole source once")
    source.validate("source")
    if os.path.exists(output) and os.listdir(output):
        raise ValueError(f"--output {output!r} exists and is not empty; choose a new directory")
    tok = load_tokenizer(tokenizer, default_vocab_size)
    src = open_source(source, "source")
    if src.pretokenized:
        raise ValueError(f"source {source.path!r} is already tokenized (it has an {TOKEN_COLUMN!r} column)")
    features = datasets.Features({TOKEN_COLUMN: datasets.Sequence(datasets.Value("int32"))})
    out = src.dataset.map(_Encode(tok.backend_tokenizer, src.column), batched=True, batch_size=batch_size,
                          num_proc=num_proc if num_proc > 1 else None, remove_columns=[src.column],
                          features=features, desc="tokenizing")
    out.save_to_disk(output)
    meta = {"tokenizer": tokenizer, "vocab_size": len(tok), "source": source.__dict__,
            "documents": len(out)}
    with open(os.path.join(output, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return output


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m flame.data.tokenize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="files", choices=SOURCE_KINDS)
    p.add_argument("--path", default="", help="hub id, file / glob / directory, or save_to_disk directory")
    p.add_argument("--name", default="", help="hub dataset configuration")
    p.add_argument("--split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--txt-sample-by", default="document", choices=["document", "paragraph", "line"])
    p.add_argument("--tokenizer", default="default", help='"default" or a hub id / local directory')
    p.add_argument("--default-vocab-size", type=int, default=4096)
    p.add_argument("--output", required=True)
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=1000)
    a = p.parse_args(argv)
    src = SourceConfig(kind=a.kind, path=a.path, name=a.name, split=a.split, text_column=a.text_column,
                       txt_sample_by=a.txt_sample_by)
    out = tokenize_corpus(src, a.tokenizer, a.output, num_proc=a.num_proc, batch_size=a.batch_size,
                          default_vocab_size=a.default_vocab_size)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
