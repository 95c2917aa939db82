"""The `[data]` section of a training config: where documents come from and how they are packed."""

from dataclasses import dataclass, field, fields

SOURCE_KINDS = ("default", "hub", "files", "disk")
SEPARATORS = ("eos", "bos")
TXT_SAMPLE_BY = ("document", "paragraph", "line")


@dataclass
class SourceConfig:
    """One `[[data.sources]]` entry.

    kind:
      "default"  the embedded corpus (the running Python's standard library sources); needs no
                 network and no files.
      "hub"      a Hugging Face hub dataset; `path` is its id, `name` its configuration.
      "files"    local jsonl/json/parquet/csv/txt files; `path` is a file, a glob or a directory.
      "disk"     a dataset written by `datasets.Dataset.save_to_disk`, for example by
                 `python -m flame.data.tokenize` (a pre-tokenized `input_ids` column).
    A source whose table has no `text_column` but has an `input_ids` column is read as
    pre-tokenized.
    """

    kind: str = "default"
    path: str = ""
    name: str = ""
    split: str = "train"
    streaming: bool = False
    text_column: str = "text"
    weight: float = 1.0
    # How a .txt file becomes documents: the whole file, blank-line separated paragraphs, or lines.
    txt_sample_by: str = "document"

    def validate(self, where: str = "data.sources[0]") -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"{where}.kind = {self.kind!r}: expected one of {SOURCE_KINDS}")
        if self.kind != "default" and not self.path:
            raise ValueError(f"{where}.path is empty: a {self.kind!r} source needs a path or hub id")
        if self.kind == "default" and self.path:
            raise ValueError(f"{where}.path = {self.path!r}: the default corpus takes no path; "
                             "set kind = \"files\", \"disk\" or \"hub\" to read it")
        if not self.text_column:
            raise ValueError(f"{where}.text_column is empty: name the column holding the text")
        if not isinstance(self.weight, (int, float)) or not self.weight >= 0 or self.weight == float("inf"):
            raise ValueError(f"{where}.weight = {self.weight!r}: must be a finite number >= 0")
        if self.txt_sample_by not in TXT_SAMPLE_BY:
            raise ValueError(f"{where}.txt_sample_by = {self.txt_sample_by!r}: expected one of {TXT_SAMPLE_BY}")


def check_sources(sources: list, name: str) -> None:
    """Each entry of a non-empty source list (`name`: its config path) valid, with some weight."""
    for i, src in enumerate(sources):
        if not isinstance(src, SourceConfig):
            raise ValueError(f"{name}[{i}] is a {type(src).__name__}, expected SourceConfig")
        src.validate(f"{name}[{i}]")
    total = sum(s.weight for s in sources)
    if not total > 0:
        raise ValueError(f"{name} weights sum to {total}: give at least one source a weight > 0")


@dataclass
class DataConfig:
    """Documents -> tokens -> packed rows of seq_len + 1 tokens with document boundaries."""

    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    # "default" trains flame's own byte-level BPE on the default corpus (cached after the first
    # run); anything else is a hub id or a local directory loadable by AutoTokenizer.
    tokenizer: str = "default"
    default_vocab_size: int = 4096
    # Token placed between documents: "eos" after each document, "bos" before each.
    separator: str = "eos"
    # Documents longer than this many tokens (separator included) are split into pieces that
    # are packed as separate documents; 0 keeps documents whole.
    max_doc_len: int = 0
    # Map-style sources are read in a fresh seeded order every epoch; streaming sources are
    # permuted within each read of docs_per_read documents (a window that resumes exactly).
    shuffle: bool = True
    num_workers: int = 2
    prefetch_factor: int = 4
    # Page-locked batches for faster, asynchronous copies to the GPU (ignored without CUDA).
    pin_memory: bool = True
    # Documents read and tokenized together; a resume re-reads at most one such batch per source.
    docs_per_read: int = 32

    def validate(self) -> None:
        if not isinstance(self.sources, list) or not self.sources:
            raise ValueError("data.sources is empty: add at least one [[data.sources]] entry")
        check_sources(self.sources, "data.sources")
        if not self.tokenizer:
            raise ValueError('data.tokenizer is empty: use "default" or a hub id / local path')
        if self.default_vocab_size < 300:
            raise ValueError(f"data.default_vocab_size = {self.default_vocab_size}: must be >= 300 "
                             "(256 byte tokens, special tokens and merges)")
        if self.separator not in SEPARATORS:
            raise ValueError(f"data.separator = {self.separator!r}: expected one of {SEPARATORS}")
        if self.max_doc_len < 0 or self.max_doc_len == 1:
            raise ValueError(f"data.max_doc_len = {self.max_doc_len}: use 0 (no limit) or a length >= 2")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers = {self.num_workers}: must be >= 0")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor = {self.prefetch_factor}: must be >= 1")
        if self.docs_per_read < 1:
            raise ValueError(f"data.docs_per_read = {self.docs_per_read}: must be >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        """Builds a DataConfig from a parsed `[data]` TOML table; unknown keys are errors."""
        d = dict(d)
        sources = d.pop("sources", None)
        _check_keys(cls, d, "data")
        cfg = cls(**d)
        if sources is not None:
            if not isinstance(sources, list):
                raise ValueError("data.sources must be an array of tables ([[data.sources]])")
            cfg.sources = []
            for i, s in enumerate(sources):
                if isinstance(s, SourceConfig):
                    cfg.sources.append(s)
                    continue
                if not isinstance(s, dict):
                    raise ValueError(f"data.sources[{i}] must be a table")
                _check_keys(SourceConfig, s, f"data.sources[{i}]")
                cfg.sources.append(SourceConfig(**s))
        cfg.validate()
        return cfg


@dataclass
class ValidationConfig:
    """The `[validation]` section: every `freq` steps and after the last one, the mean loss per
    label token over batches of held-out documents, with no gradients, logged beside the
    training loss (`validation_loss` in metrics.jsonl). Every evaluation reads the same batches:
    the sources are read from their beginning, in order (no shuffle), each time."""

    enable: bool = False
    freq: int = 500
    # Batches per data-parallel rank per evaluation; -1 reads the sources once to their end.
    steps: int = 20
    local_batch_size: int = 0  # 0: training.local_batch_size
    seq_len: int = 0  # 0: training.seq_len
    # Held-out documents, in the form of [[data.sources]] entries ([[validation.sources]]);
    # tokenized and packed with [data]'s tokenizer, separator and max_doc_len.
    sources: list[SourceConfig] = field(default_factory=list)

    def validate(self) -> None:
        if self.freq < 1:
            raise ValueError(f"validation.freq = {self.freq}: must be >= 1 (steps between evaluations)")
        if self.steps == 0 or self.steps < -1:
            raise ValueError(f"validation.steps = {self.steps}: give the batches per evaluation (>= 1), "
                             "or -1 to read the sources once to their end")
        for key in ("local_batch_size", "seq_len"):
            if getattr(self, key) < 0:
                raise ValueError(f"validation.{key} = {getattr(self, key)}: must be >= 1, or 0 for "
                                 f"training.{key}")
        if self.enable and not self.sources:
            raise ValueError("validation.enable = true needs held-out documents: add a [[validation.sources]] "
                             "entry (the same keys as [[data.sources]], e.g. kind = \"files\" and a path, or "
                             "a hub dataset's validation split)")
        if self.sources:
            check_sources(self.sources, "validation.sources")


def _check_keys(cls, d: dict, where: str) -> None:
    import difflib

    known = [f.name for f in fields(cls)]
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise ValueError(f"unknown key {where}.{key}{hint}")
