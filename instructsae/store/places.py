"""Every chunk bound to its place: a chunk's crc32c says its bytes are whole, not where they belong, so two shard
files of one array swapped, or a shard copied in from another store, would pass it. Format 3 writes, for each
inner chunk, a place tag: crc32c over (store id, array name, chunk index, the chunk's own crc32c). The tags sit in
the shard file between the last chunk and the shard index, where zarr's sharding codec never looks (it finds
chunks through the index), so plain zarr reads the file as before. A read recomputes the tag of the chunk it
wants from where it wants it; any other place gives another tag.
"""

import crc32c
import numpy as np

TAG_BYTES = 4
NO_TAG = 0  # the slot of a chunk never written


def place_tag(store_id: str, array: str, chunk: int, chunk_crc: bytes) -> int:
    return crc32c.crc32c(f"{store_id}\0{array}\0{chunk}\0".encode() + bytes(chunk_crc))


def tags_block(tags: list[int], chunks_per_shard: int) -> bytes:
    block = np.full(chunks_per_shard, NO_TAG, dtype="<u4")
    block[: len(tags)] = tags
    return block.tobytes()


def read_tags(raw: bytes, chunks_per_shard: int) -> np.ndarray:
    return np.frombuffer(raw, dtype="<u4", count=chunks_per_shard)
