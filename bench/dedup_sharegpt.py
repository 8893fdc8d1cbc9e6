"""`instructsae dedup` on the embedded ShareGPT (17,671 conversations): rows removed, time, memory.

    .venv/bin/python bench/dedup_sharegpt.py [--dataset sharegpt] [--ngram 20] [--threshold 0.8]

Runs the command's own code (run_dedup) once, then measures what the dedup index holds per kept row (the LSH
band tables and key lists, the kept signatures, the exact-text digests: every object reached from them, by
sys.getsizeof) and compares peak RSS with a plain read of the same rows without dedup (in a child process, so
the two peaks do not mix). Memory beyond the index stays flat: rows stream and only a batch of 1,000 kept rows
waits for the parquet writer.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def deep_size(root) -> int:
    """Bytes of every distinct object reachable through dicts, lists, sets and tuples from root."""
    seen, stack, total = set(), [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
    return total


def index_bytes(duplicate_filter) -> dict:
    lsh = duplicate_filter.lsh
    tables = deep_size([dict(table._dict) for table in lsh.hashtables]) + deep_size(dict(lsh.keys._dict))
    kept = len(duplicate_filter._signature_row)
    return {"lsh_tables_bytes": tables, "signatures_bytes": kept * duplicate_filter.settings.num_perm * 4
            + deep_size(duplicate_filter._signature_row), "digests_bytes": deep_size(duplicate_filter._digests),
            "kept_rows": kept, "bands": lsh.b, "rows_per_band": lsh.r}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PLAIN_READ = """
import resource, sys, time
from instructsae.extract.data import DatasetReader
started = time.perf_counter()
n = sum(1 for _ in DatasetReader(sys.argv[1]))
print(n, round(time.perf_counter() - started, 1), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="sharegpt")
    parser.add_argument("--ngram", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=0.8)
    args = parser.parse_args()

    plain = subprocess.run([sys.executable, "-c", PLAIN_READ, args.dataset], capture_output=True, text=True,
                           check=True).stdout.split()

    import instructsae.extract.dedup_run as dedup_run
    from instructsae.extract.data import DatasetReader
    from instructsae.schemas.dataset import DedupConfig

    readers = []
    original = DatasetReader.from_options.__func__

    def keep_reader(cls, *a, **k):  # the report needs the filter run_dedup used
        readers.append(original(cls, *a, **k))
        return readers[-1]

    dedup_run.DatasetReader.from_options = classmethod(keep_reader)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "deduped.parquet"
        started = time.perf_counter()
        report = dedup_run.run_dedup(DedupConfig(dataset=args.dataset, out=str(out), ngram=args.ngram,
                                                 threshold=args.threshold), show_progress=False)
        seconds = time.perf_counter() - started
        out_mb = out.stat().st_size / 2**20
    sizes = index_bytes(readers[-1].duplicates)
    per_row = {key: round(value / sizes["kept_rows"]) for key, value in sizes.items() if key.endswith("_bytes")}
    print(json.dumps({
        "report": report, "seconds_total": round(seconds, 1), "out_mb": round(out_mb, 1),
        "index": sizes, "index_bytes_per_kept_row": per_row,
        "index_bytes_per_kept_row_total": sum(per_row.values()),
        "peak_rss_mb_dedup": round(peak_rss_mb()),
        "plain_read": {"rows": int(plain[0]), "seconds": float(plain[1]), "peak_rss_mb": round(float(plain[2]))},
    }, indent=2))


if __name__ == "__main__":
    main()
