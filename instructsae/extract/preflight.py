"""Before the model loads: read every dataset row the extraction will use, so that a dataset error anywhere in
them (a file that is not UTF-8 or not JSON, a garbage parquet, a row the chat template refuses) fails before the
first activation is written, not hours into a run with a half-written store behind it.

The check replays extract's own plan of instances with the tokenizer alone (no model): it reads exactly the rows
the extraction will read and stops where its token budget stops it.
"""

from tqdm.auto import tqdm

from instructsae.errors import UserError
from instructsae.extract.data import DatasetReader
from instructsae.extract.plan import planned_instances
from instructsae.schemas.extract import ExtractConfig


def check_rows_used(cfg: ExtractConfig, tokenizer, dataset: DatasetReader, show_progress: bool = True) -> int:
    """Tokens the extraction will store (before dropping first tokens); raises the first dataset error met."""
    tokens = 0
    bar = tqdm(total=cfg.max_tokens, unit="tok", unit_scale=True, desc="checking dataset", delay=2,
               disable=not show_progress, dynamic_ncols=True)
    with bar:
        for instance in planned_instances(cfg, tokenizer, dataset):
            tokens += len(instance.token_ids)
            bar.update(len(instance.token_ids))
    if tokens == 0:
        raise UserError(f"dataset '{cfg.dataset}' gave no usable instances "
                        f"({dataset.skip_report() or 'it has no rows'})")
    return tokens
