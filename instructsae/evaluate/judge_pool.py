"""Features scored concurrently against one endpoint: up to `concurrency` features at once, each on a thread of
its own sending its requests in turn (its scoring requests need its explanation first). Each result reaches the
caller's thread as soon as its feature finishes, so the report can be rewritten after every one."""

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm.auto import tqdm

from instructsae.errors import UserError


def score_concurrently(score_one: Callable[[dict], dict], jobs: Iterable[dict], concurrency: int,
                       on_done: Callable[[dict], None]) -> tuple[str, dict] | None:
    """Run score_one on every job; on_done(result) in this thread as each finishes. The first UserError (an
    endpoint that failed past its retries) stops the jobs not yet started; those running finish and are kept.
    Returns (that error's text, the job it stopped) or None when every job finished."""
    jobs, stop = list(jobs), threading.Event()
    stopped = None

    def guarded(job: dict) -> dict | None:
        if stop.is_set():  # set by the worker that failed, so no job starts after it, whatever the timing
            return None
        try:
            return score_one(job)
        except UserError:
            stop.set()
            raise

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge") as pool:
        futures = {pool.submit(guarded, job): job for job in jobs}
        for future in tqdm(as_completed(futures), total=len(futures), desc="autointerp", unit="feature"):
            try:
                result = future.result()
            except UserError as error:
                stopped = stopped or (str(error), futures[future])
                continue
            if result is not None:
                on_done(result)
    return stopped
