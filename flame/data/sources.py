"""Opening `[[data.sources]]` entries as `datasets` tables, with every input check done up front."""

import glob
import os

from flame.data.config import SourceConfig

TOKEN_COLUMN = "input_ids"
META_FILE = "flame_tokenizer.json"
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


class Source:
    """An opened source: a map-style `datasets.Dataset` or a streaming `datasets.IterableDataset`
    holding one column, either text (`column` = the text column) or token ids (`pretokenized`)."""

    def __init__(self, cfg: SourceConfig, where: str, dataset, column: str, pretokenized: bool,
                 tokenizer_meta: dict | None = None):
        self.tokenizer_meta = tokenizer_meta  # written by `python -m flame.data.tokenize`
        self.cfg = cfg
        self.where = where
        self.dataset = dataset
        self.column = column
        self.pretokenized = pretokenized

    @property
    def streaming(self) -> bool:
        import datasets

        return isinstance(self.dataset, datasets.IterableDataset)


def _data_files(path: str, where: str) -> tuple[str, list[str]]:
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.splitext(f)[1] in _FILE_BUILDERS)
    else:
        files = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if os.path.exists(path) else [])
    if not files:
        raise ValueError(f"{where}.path = {path!r} matches no files")
    exts = {os.path.splitext(f)[1] for f in files}
    unknown = exts - set(_FILE_BUILDERS)
    if unknown:
        raise ValueError(f"{where}.path = {path!r} matches files of unsupported type {sorted(unknown)}; "
                         f"supported: {sorted(_FILE_BUILDERS)}")
    if all(os.path.getsize(f) == 0 for f in files):
        raise ValueError(f"{where}.path = {path!r}: the dataset is empty (every matched file has 0 bytes)")
    builders = {_FILE_BUILDERS[e] for e in exts}
    if len(builders) > 1:
        raise ValueError(f"{where}.path = {path!r} mixes file types {sorted(exts)}; "
                         "use one [[data.sources]] entry per type")
    return builders.pop(), files


def _hub_unreachable() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _as_stream(ds):
    # Many contiguous shards, so that readers split whole shards rather than every example.
    return ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 1024)))


def _load(cfg: SourceConfig, where: str):
    import datasets

    if cfg.kind == "default":
        from flame.data.corpus import load_default_corpus

        ds = load_default_corpus()
        return _as_stream(ds) if cfg.streaming else ds
    if cfg.kind == "disk":
        if not os.path.isdir(cfg.path):
            raise ValueError(f"{where}.path = {cfg.path!r} is not a directory written by save_to_disk")
        try:
            ds = datasets.load_from_disk(cfg.path)
        except Exception as e:
            raise ValueError(f"{where}.path = {cfg.path!r} could not be read with datasets.load_from_disk: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ValueError(f"{where}.split = {cfg.split!r} is not in {cfg.path!r}; it has {list(ds)}")
            ds = ds[cfg.split]
        return _as_stream(ds) if cfg.streaming else ds
    if cfg.kind == "files":
        builder, files = _data_files(cfg.path, where)
        kwargs = {"sample_by": cfg.txt_sample_by} if builder == "text" else {}
        try:
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=cfg.streaming,
                                         **kwargs)
        except Exception as e:
            raise ValueError(f"{where}.path = {cfg.path!r} could not be read as {builder}: "
                             f"{type(e).__name__}: {e}") from e
    # kind == "hub"
    try:
        return datasets.load_dataset(cfg.path, cfg.name or None, split=cfg.split, streaming=cfg.streaming)
    except Exception as e:
        hint = ""
        if _hub_unreachable() or isinstance(e, (ConnectionError, OSError)) or "connect" in str(e).lower():
            hint = (" The hub looks unreachable (HF_HUB_OFFLINE is set or the connection failed): run where the "
                    "hub is reachable, or download the data and point a \"files\" or \"disk\" source at it.")
        raise ValueError(f"{where}: hub dataset {cfg.path!r} (name={cfg.name or None!r}, split={cfg.split!r}) "
                         f"could not be loaded: {type(e).__name__}: {str(e).rstrip('.')}.{hint}") from e


def open_source(cfg: SourceConfig, where: str) -> Source:
    """Loads the dataset, picks its text (or token-id) column and checks it is not empty."""
    import datasets

    ds = _load(cfg, where)
    columns = ds.column_names
    first = None
    if columns is None:  # streaming with unknown features: look at one example
        first = next(iter(ds.take(1)), None)
        if first is None:
            raise ValueError(f"{where}: the dataset {cfg.path or 'default corpus'!r} is empty")
        columns = list(first)
    if cfg.text_column in columns:
        column, pretokenized = cfg.text_column, False
    elif TOKEN_COLUMN in columns:
        column, pretokenized = TOKEN_COLUMN, True
    else:
        raise ValueError(f"{where}.text_column = {cfg.text_column!r} is not a column of {cfg.path!r}; "
                         f"its columns are {columns}")
    ds = ds.select_columns([column])
    if isinstance(ds, datasets.Dataset):
        if len(ds) == 0:
            raise ValueError(f"{where}: the dataset {cfg.path!r} (split {cfg.split!r}) is empty")
    elif first is None and next(iter(ds.take(1)), None) is None:
        raise ValueError(f"{where}: the dataset {cfg.path!r} (split {cfg.split!r}) is empty")
    meta = None
    meta_path = os.path.join(cfg.path, META_FILE) if cfg.kind == "disk" else ""
    if pretokenized and os.path.exists(meta_path):
        import json

        with open(meta_path) as f:
            meta = json.load(f)
    return Source(cfg, where, ds, column, pretokenized, meta)
