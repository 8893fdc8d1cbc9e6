"""`instructsae verify`: a full scan of a store naming every chunk that cannot be trusted, and why.

Three passes, cheapest first: the manifest against the arrays' lengths; the shard files against the
shards the committed rows need (a listing: missing files, files shorter than their known size); then every
inner chunk read back through the same checks a training read does (crc32c, presence, size), activations
scanned for NaN/inf, on a small thread pool (reads and crc32c release the GIL). Last, the instance columns
against each other and the manifest: starts monotone, lengths summing to the token count.

A store written by several ranks (store/parts.py) is verified part by part, each as the store it is; its
problems name the part (`parts/unit-000003/acts/layer_15 chunk 2 (rows ...)`: rows counted within the part),
after the checks of the whole: every listed part present, complete and holding the counts the manifest lists.
"""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
from tqdm.auto import tqdm

from instructsae.store.checks import Problem, leftover_problems, length_problems, shard_file_problems
from instructsae.store.chunks import ChunkError, ShardedArray
from instructsae.errors import UserError
from instructsae.store.layout import count_nonfinite
from instructsae.store.location import location_exists
from instructsae.store.parts import PARTS_FOLDER, existing_parts, part_location, part_name, part_problem
from instructsae.store.reader import StoreReader, is_store, read_manifest

READ_THREADS = 8


def _check_chunk(array: ShardedArray, chunk: int, dtype: str | None) -> Problem | None:
    try:
        values = array.read_chunk(chunk)
    except ChunkError as error:
        return Problem(array.spec.name, (chunk, chunk), array.chunk_rows(chunk), error.what, str(error.detail))
    if dtype is not None and (bad := count_nonfinite(values, dtype)):
        return Problem(array.spec.name, (chunk, chunk), array.chunk_rows(chunk), "NaN/inf",
                       f"{bad:,} activations are NaN or inf")
    return None


def chunk_problems(reader: StoreReader, skip: set[tuple[str, int]], show_progress: bool) -> Iterator[Problem]:
    """Every committed chunk of every array read back and checked, on a thread pool."""
    jobs = [(array, chunk, reader.manifest.identity.dtype if name.startswith("acts/") else None)
            for name, array in reader.arrays.items() for chunk in range(array.n_chunks)
            if (name, chunk) not in skip]
    total_bytes = sum(array.spec.chunk_rows * array.spec.row_bytes for array, _, _ in jobs)
    with ThreadPoolExecutor(READ_THREADS) as pool, tqdm(total=total_bytes, unit="B", unit_scale=True,
                                                       desc="verify", disable=not show_progress) as bar:
        for (array, _, _), problem in zip(jobs, pool.map(lambda job: _check_chunk(*job), jobs)):
            bar.update(array.spec.chunk_rows * array.spec.row_bytes)
            if problem is not None:
                yield problem


def instance_problems(reader: StoreReader) -> Iterator[Problem]:
    """The instance columns against each other and the manifest (read only when their chunks are sound)."""
    starts = reader.read_column("instance_start").astype(np.int64)
    lengths = reader.read_column("instance_length").astype(np.int64)
    if int(lengths.sum()) != reader.n_tokens:
        yield Problem("instance_length", None, None, "manifest",
                      f"instance lengths sum to {int(lengths.sum()):,}, the manifest says {reader.n_tokens:,} tokens")
    expected = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    wrong = np.flatnonzero(starts != expected)
    if len(wrong):
        row = int(wrong[0])
        yield Problem("instance_start", None, (row, row + 1), "manifest",
                      f"instance {row} starts at row {int(starts[row]):,}, not {int(expected[row]):,} "
                      f"({len(wrong):,} instances out of place: starts must follow the lengths, monotone)")


def verify_store(reader: StoreReader, show_progress: bool = True) -> list[Problem]:
    problems = list(length_problems(reader))
    if not reader.manifest.complete:
        problems.append(Problem("manifest", None, None, "incomplete",
                                "the extraction has not finished: rerun its extract (only committed rows checked)"))
    problems += shard_file_problems(reader)
    problems += leftover_problems(reader)
    whole_shard = ("missing", "truncated", "misplaced")  # named once for the shard file, not again per chunk
    skip = {(p.array, chunk) for p in problems if p.chunks is not None and p.what in whole_shard
            for chunk in range(p.chunks[0], p.chunks[1] + 1)}
    problems += chunk_problems(reader, skip, show_progress)
    if not any(p.array.startswith("instance_") and p.what != "manifest" for p in problems):
        problems += instance_problems(reader)
    return problems


def open_for_verify(path: str) -> StoreReader:
    """The store as it is: unlike open_store, damage is what we are here to list, not a reason to stop."""
    if not location_exists(path):
        raise UserError(f"store not found: {path}")
    if not is_store(path):
        raise UserError(f"not an instructsae store (no zarr group with a manifest): {path}")
    return StoreReader(path)


def verify_report(path: str, show_progress: bool = True) -> dict:
    if is_store(path) and read_manifest(path).part_tokens is not None:
        return verify_parts_report(path, show_progress)
    reader = open_for_verify(path)
    problems = verify_store(reader, show_progress)
    return {"store": path, "ok": not problems, "n_tokens": reader.n_tokens, "n_instances": reader.n_instances,
            "chunks": sum(array.n_chunks for array in reader.arrays.values()),
            "problems": [problem.to_json() for problem in problems]}


def verify_parts_report(path: str, show_progress: bool = True) -> dict:
    """A multi-rank store: the parts its manifest lists (or, while incomplete, those written so far), each
    verified in full; their counts against the manifest."""
    manifest = read_manifest(path)
    problems, readers = [], []
    if manifest.complete:
        for index, expected in enumerate(manifest.parts):
            problem = part_problem(path, index, expected)
            if problem:
                problems.append(Problem(f"{PARTS_FOLDER}/{expected.name}", None, None, "manifest", problem))
            elif is_store(part_location(path, index)):
                readers.append((f"{PARTS_FOLDER}/{expected.name}", StoreReader(part_location(path, index))))
        counts = (sum(part.n_tokens for part in manifest.parts), sum(part.n_instances for part in manifest.parts))
        if counts != (manifest.n_tokens, manifest.n_instances):
            problems.append(Problem("manifest", None, None, "manifest",
                                    f"its parts list {counts[0]:,} tokens in {counts[1]:,} instances, the store "
                                    f"{manifest.n_tokens:,} in {manifest.n_instances:,}"))
    else:
        problems.append(Problem("manifest", None, None, "incomplete",
                                "the extraction has not finished: rerun its extract (the parts written so far "
                                "are checked)"))
        readers = [(f"{PARTS_FOLDER}/{part_name(index)}", StoreReader(part_location(path, index)))
                   for index in sorted(existing_parts(path))]
    for name, reader in readers:
        problems += [replace(problem, array=f"{name}/{problem.array}")
                     for problem in verify_store(reader, show_progress)
                     if manifest.complete or problem.what != "incomplete"]  # an unfinished part is expected then
    return {"store": path, "ok": not problems, "n_tokens": sum(reader.n_tokens for _, reader in readers),
            "n_instances": sum(reader.n_instances for _, reader in readers),
            "chunks": sum(array.n_chunks for _, reader in readers for array in reader.arrays.values()),
            "problems": [problem.to_json() for problem in problems]}


def format_report(report: dict) -> str:
    lines = [Problem(**{**problem, "chunks": problem["chunks"] and tuple(problem["chunks"]),
                        "rows": problem["rows"] and tuple(problem["rows"])}).line()
             for problem in report["problems"]]
    verdict = "ok" if report["ok"] else f"{len(report['problems'])} problem(s)"
    lines.append(f"store {report['store']}: {verdict} ({report['chunks']:,} chunks read, "
                 f"{report['n_tokens']:,} tokens, {report['n_instances']:,} instances)")
    return "\n".join(lines)
