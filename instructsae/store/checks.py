"""The cheap checks of a store, made on every open and first by `verify`: the arrays' lengths against the
manifest, and the shard files against the shards the committed rows need (one listing per array)."""

from collections.abc import Iterator
from dataclasses import asdict, dataclass

from instructsae.errors import first_line
from instructsae.fileio import PARTIAL_SUFFIX
from instructsae.store.chunks import ShardedArray
from instructsae.store.location import filesystem


@dataclass(frozen=True)
class Problem:
    array: str
    chunks: tuple[int, int] | None  # first and last chunk index; None for whole-array or manifest problems
    rows: tuple[int, int] | None  # [start, stop)
    what: str  # missing, truncated, checksum, misplaced, rows beyond the committed count, NaN/inf, manifest,
    #            incomplete, left over
    detail: str

    def line(self) -> str:
        where = self.array
        if self.chunks is not None:
            first, last = self.chunks
            where += f" chunk {first}" if first == last else f" chunks {first}-{last}"
        if self.rows is not None:
            where += f" (rows {self.rows[0]:,}-{self.rows[1]:,})"
        return f"{where}: {self.what}: {self.detail}"

    def to_json(self) -> dict:
        return asdict(self)


def _span(array: ShardedArray, first_row: int, stop_row: int) -> tuple[tuple[int, int], tuple[int, int]]:
    rows = array.spec.chunk_rows
    return (first_row // rows, (stop_row - 1) // rows), (first_row, stop_row)


def length_problems(reader) -> Iterator[Problem]:
    for name, spec in reader.specs.items():
        try:
            length = reader.group[name].shape[0]
        except Exception as error:  # absent, or its zarr.json damaged
            yield _unopenable(reader.arrays[name], name, error)
            continue
        committed = reader.committed_rows(spec.per)
        array = reader.arrays[name]
        if length < committed:
            chunks, rows = _span(array, length, committed)
            yield Problem(name, chunks, rows, "missing", f"the array has {length:,} rows, the manifest commits "
                                                         f"{committed:,}")
        elif length > committed and reader.manifest.complete:
            chunks, rows = _span(array, committed, length)
            yield Problem(name, chunks, rows, "rows beyond the committed count",
                          f"the manifest commits {committed:,} rows (another writer appended?)")


def _unopenable(array: ShardedArray, name: str, error: Exception) -> Problem:
    description = f"{array.root.rstrip('/')}/{name}/zarr.json"
    if not array.fs.exists(description):
        return Problem(name, None, None, "missing", f"its description {description} is not there")
    return Problem(name, None, None, "damaged", f"its description {description} cannot be read "
                                                f"({first_line(error)})")


def shard_file_problems(reader) -> Iterator[Problem]:
    """Shard files missing or shorter than they must be, from one listing per array."""
    for name, array in reader.arrays.items():
        n_shards = -(-array.n_rows // array.spec.shard_rows)
        try:
            listing = array.fs.find(f"{array.root}/{name}/c", detail=True)
        except FileNotFoundError:
            listing = {}
        sizes = {path.rstrip("/"): info.get("size") for path, info in listing.items()}
        for shard in range(n_shards):
            path = array.shard_path(shard)
            first_row = shard * array.spec.shard_rows
            chunks, rows = _span(array, first_row, min(first_row + array.spec.shard_rows, array.n_rows))
            size = sizes.get(path, sizes.get(array.fs._strip_protocol(path)))
            if size is None:
                yield Problem(name, chunks, rows, "missing", f"shard file {path} is not there")
                continue
            expected = array.expected_shard_size(shard, array.n_rows)
            # A shard may hold more than the committed rows (an unfinished extraction), never less.
            if expected is not None and size == expected - array.tag_bytes and array.tag_bytes:
                yield Problem(name, chunks, rows, "misplaced", f"shard file {path} has no place tags: rewritten "
                                                               "by another writer (plain zarr?)")
            elif expected is not None and size < expected:
                yield Problem(name, chunks, rows, "truncated", f"shard file {path} has {size:,} of at least "
                                                               f"{expected:,} bytes")



def leftover_files(fs, root: str) -> list[str]:
    """`.partial` files inside a store (zarr's own `zarr.<uuid>.partial` metadata writes, our shard writes) that a
    killed writer left: never part of the store, and nothing a reader should find there."""
    try:
        found = fs.find(root.rstrip("/"))
    except FileNotFoundError:
        return []
    return sorted(path for path in found if path.endswith(PARTIAL_SUFFIX))


def leftover_problems(reader) -> Iterator[Problem]:
    fs, root = filesystem(reader.path)
    for path in leftover_files(fs, root):
        yield Problem("store", None, None, "left over", f"{path} is a half-written file a killed writer left "
                                                         "(rerun the extract to resume, which removes it)")
