"""Exact and near-duplicate rows, found as rows stream past: the FAST paper's 20-gram deduplication of SFT data.

Built on datasketch's MinHash and MinHashLSH. datasketch (numpy and scipy) is a library made for exactly this
and fits our shape: one process reading rows in order, an index in memory. datatrove's MinHash is a four-stage
pipeline over signature files on disk, meant for web-scale corpora on a cluster; its dependency tree and its
files on disk would be most of the work here.

A row is a duplicate when its text equals a kept row's (an xxh3-128 digest), a near-duplicate when its word
n-gram shingles have an estimated Jaccard similarity of at least `threshold` with a kept row's: LSH proposes
candidates (rows agreeing on a whole band of the signature) and the signatures confirm them. The first row of a
group is kept, so the result depends only on row order and the seed. Memory grows with the kept rows only: the
LSH index, the kept signatures (uint32 each) and the digests; rows themselves are never held.
"""

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import xxhash

from instructsae.extract.rows import Record
from instructsae.schemas.dataset import DedupSettings


def record_text(record: Record) -> str:
    """What two rows are compared on: the text, or every turn as 'role: content'."""
    if record.messages is None:
        return record.text
    return "\n".join(f"{message.role}: {message.content}" for message in record.messages)


_POWERS = np.ones(1, dtype=np.uint64)  # _BASE ** k mod 2^64, grown to the longest word met
_BASE = np.uint64(0x9E3779B97F4A7C15)


def _powers(length: int) -> np.ndarray:
    global _POWERS
    if len(_POWERS) < length:
        size = max(length, 2 * len(_POWERS))
        _POWERS = np.concatenate([[np.uint64(1)], np.cumprod(np.full(size - 1, _BASE, dtype=np.uint64))])
    return _POWERS[:length]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit affects every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def word_hashes(words: list[str]) -> np.ndarray:
    """uint64 hash of each word (of its UTF-8 bytes), all words at once: sum_k (byte_k + 1) * B^k, mixed."""
    data = np.frombuffer(" ".join(words).encode(), dtype=np.uint8)
    index = np.arange(len(data))
    space = data == 32
    starts = np.concatenate([[0], np.flatnonzero(space) + 1])
    within = index - np.maximum.accumulate(np.where(space, index + 1, 0))  # position in its word; -1 on spaces
    contribution = (data.astype(np.uint64) + np.uint64(1)) * _powers(int(within.max()) + 1)[np.maximum(within, 0)]
    contribution[space] = 0
    return _mix64(np.add.reduceat(contribution, starts))


def shingle_hashes(text: str, ngram: int, coefficients: np.ndarray) -> np.ndarray:
    """uint32 hashes of the text's word n-grams (lower-cased, split on whitespace); a text shorter than one n-gram
    is a single shingle of all its words. An n-gram's hash is sum_j c_j * h(word_{i+j}) mod 2^64 (order matters),
    computed for all n-grams at once."""
    words = text.lower().split()
    if not words:
        return np.zeros(0, dtype=np.uint32)
    hashes = word_hashes(words)
    width = min(ngram, len(words))
    count = len(words) - width + 1
    combined = np.zeros(count, dtype=np.uint64)
    for j in range(width):
        combined += coefficients[j] * hashes[j: j + count]  # wraps mod 2^64, as intended
    return (combined >> np.uint64(32)).astype(np.uint32)


@dataclass
class DedupCounts:
    rows_in: int = 0
    duplicates: int = 0
    near_duplicates: int = 0
    cluster_sizes: Counter = field(default_factory=Counter)  # kept row -> rows removed in its favour

    @property
    def rows_out(self) -> int:
        return self.rows_in - self.duplicates - self.near_duplicates

    @property
    def clusters(self) -> int:
        """Groups of two or more rows (a kept row and what was removed as its copy)."""
        return len(self.cluster_sizes)


class DuplicateFilter:
    """check(key, text) -> None (new: keep it; it is indexed), 'duplicate' or 'near duplicate'. Keys are row numbers."""

    def __init__(self, settings: DedupSettings):
        from datasketch import MinHash, MinHashLSH

        self.settings = settings
        try:
            self.lsh = MinHashLSH(threshold=settings.threshold, num_perm=settings.num_perm)
        except ValueError:  # a threshold near 1 gets a single band, which datasketch refuses: take two
            self.lsh = MinHashLSH(num_perm=settings.num_perm, params=(2, settings.num_perm // 2))
        self._template = MinHash(num_perm=settings.num_perm, seed=settings.seed, hashfunc=int)
        rng = np.random.default_rng(settings.seed)
        self._coefficients = rng.integers(1, 2**63, size=settings.ngram, dtype=np.uint64) * 2 + 1  # odd
        self._digests: dict[int, int] = {}  # xxh3-128 of the text -> kept row
        self._signatures = np.zeros((1024, settings.num_perm), dtype=np.uint32)  # kept rows' signatures, grown x2
        self._signature_row: dict[int, int] = {}  # kept row -> its signature's index
        self.counts = DedupCounts()

    def signature(self, text: str):
        minhash = self._template.copy()
        minhash.update_batch(shingle_hashes(text, self.settings.ngram, self._coefficients).tolist())
        return minhash

    def _keep_signature(self, key: int, hashvalues: np.ndarray) -> None:
        index = len(self._signature_row)
        if index == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.zeros_like(self._signatures)])
        self._signatures[index] = hashvalues
        self._signature_row[key] = index

    def _near(self, minhash) -> int | None:
        """The earliest kept row whose signature agrees on at least threshold of its values."""
        candidates = sorted(self.lsh.query(minhash))
        for key in candidates:
            agree = np.mean(self._signatures[self._signature_row[key]] == minhash.hashvalues)
            if agree >= self.settings.threshold:
                return key
        return None

    def check(self, key: int, text: str) -> str | None:
        self.counts.rows_in += 1
        digest = xxhash.xxh3_128_intdigest(text.encode())
        if digest in self._digests:
            self.counts.duplicates += 1
            self.counts.cluster_sizes[self._digests[digest]] += 1
            return "duplicate"
        minhash = self.signature(text)
        match = self._near(minhash)
        if match is not None:
            self.counts.near_duplicates += 1
            self.counts.cluster_sizes[match] += 1
            return "near duplicate"
        self._digests[digest] = key
        self.lsh.insert(key, minhash, check_duplication=False)
        self._keep_signature(key, minhash.hashvalues)
        return None
