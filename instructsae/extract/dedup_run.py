"""`instructsae dedup`: a dataset in, its rows without exact and near-duplicates out, as a parquet file in the
`messages` format (or `text` for plain text) that every command reads. Rows stream through; memory holds the
dedup index and one batch of kept rows."""

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from instructsae.errors import UserError
from instructsae.extract.data import DatasetReader
from instructsae.extract.rows import Message, Record
from instructsae.fileio import write_atomically
from instructsae.locks import writer_lock
from instructsae.schemas.dataset import DedupConfig, DedupSettings

BATCH_ROWS = 1000


def _schema():
    import pyarrow as pa

    # a turn's tool calls and a row's tools list are JSON text (their arguments and schemas have no fixed shape);
    # the reader parses them back
    turn = pa.struct([("role", pa.string()), ("content", pa.string()), ("reasoning_content", pa.string()),
                      ("tool_calls", pa.string()), ("name", pa.string()), ("tool_call_id", pa.string())])
    # `text` holds plain-text rows (messages null); `conversation` keeps ShareGPT's grouping of split rows;
    # `source_row` is the row's number in the input, so a kept row can be traced back.
    return pa.schema([("messages", pa.list_(turn)), ("text", pa.string()), ("conversation", pa.string()),
                      ("source_row", pa.int64()), ("tools", pa.string())])


def _turn(message: Message) -> dict:
    return {"role": message.role, "content": message.content, "reasoning_content": message.reasoning,
            "tool_calls": None if message.tool_calls is None else json.dumps(list(message.tool_calls)),
            "name": message.name, "tool_call_id": message.tool_call_id}


def _row(record: Record) -> dict:
    messages = None if record.messages is None else [_turn(message) for message in record.messages]
    return {"messages": messages, "text": record.text, "conversation": record.conversation,
            "source_row": record.source_row, "tools": None if record.tools is None else json.dumps(list(record.tools))}


def _check_out(cfg: DedupConfig) -> Path:
    out = Path(cfg.out).expanduser()
    if out.suffix != ".parquet":
        raise UserError(f"--out {cfg.out}: dedup writes a .parquet file")
    if out.is_dir():
        raise UserError(f"--out {cfg.out} is a folder: dedup writes a .parquet file")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"--out {cfg.out} exists (use --overwrite to replace it)")
    if Path(cfg.dataset).expanduser().resolve() == out.resolve():
        raise UserError(f"--out {cfg.out} is the dataset itself: write the deduplicated rows elsewhere")
    if not out.parent.is_dir():
        raise UserError(f"--out {cfg.out}: folder {out.parent} does not exist")
    return out


def run_dedup(cfg: DedupConfig, show_progress: bool = True) -> dict:
    """Write the kept rows to cfg.out (atomically: a killed run leaves no half file) and return the report."""
    out = _check_out(cfg)
    with writer_lock(out, "dedup output", is_file=True):  # a second dedup into the same --out is refused
        return _write_kept_rows(cfg, out, show_progress)


def _write_kept_rows(cfg: DedupConfig, out: Path, show_progress: bool) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    settings = DedupSettings(ngram=cfg.ngram, threshold=cfg.threshold, seed=cfg.seed, num_perm=cfg.num_perm)
    reader = DatasetReader.from_options(cfg, settings)
    started = time.perf_counter()

    def write(partial: Path) -> None:
        batch: list[dict] = []
        with pq.ParquetWriter(partial, _schema()) as writer:
            for record in tqdm(reader, desc="dedup", unit="row", disable=not show_progress, dynamic_ncols=True):
                batch.append(_row(record))
                if len(batch) == BATCH_ROWS:
                    writer.write_table(pa.Table.from_pylist(batch, schema=_schema()))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=_schema()))

    write_atomically(out, write)  # built in OUT.partial, renamed into place; a failure leaves neither half
    counts = reader.duplicates.counts
    unusable = {reason: n for reason, n in reader.skipped.items() if reason not in ("duplicate", "near duplicate")}
    return {
        "dataset": cfg.dataset, "out": str(out), "rows_in": reader.rows_used + reader.rows_skipped,
        "rows_unusable": sum(unusable.values()), "unusable_by_reason": unusable, "rows_out": reader.rows_used,
        "duplicates": counts.duplicates, "near_duplicates": counts.near_duplicates, "clusters": counts.clusters,
        "seconds": round(time.perf_counter() - started, 1), "settings": settings.model_dump(),
        "unused_columns": reader.unused_columns,
    }


def format_report(report: dict) -> str:
    unusable = ", ".join(f"{n:,} {reason}" for reason, n in report["unusable_by_reason"].items())
    unused = report.get("unused_columns") or []
    return (f"dedup {report['dataset']}: {report['rows_in']:,} rows in, {report['rows_out']:,} out; removed "
            f"{report['duplicates']:,} exact and {report['near_duplicates']:,} near duplicates in "
            f"{report['clusters']:,} clusters"
            + (f", skipped {report['rows_unusable']:,} unusable ({unusable})" if unusable else "")
            + f"; {report['seconds']} s; wrote {report['out']}"
            + (f"\nnote: column{'s' if len(unused) > 1 else ''} {', '.join(unused)} of the dataset not written "
               "(see --column, --system-column, --prompt-column, --response-column)" if unused else ""))
