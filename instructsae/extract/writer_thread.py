"""Writes blocks on a background thread so the store never slows the model down."""

import queue
import threading

from instructsae.store.layout import TokenBlock
from instructsae.store.writer import StoreWriter
from instructsae.schemas.manifest import StoreManifest

_DONE = object()


class BackgroundWriter:
    def __init__(self, writer: StoreWriter, depth: int = 2):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not _DONE:
            if self.error is None:
                try:
                    self.writer.append(*item)
                except BaseException as error:  # re-raised on the main thread
                    self.error = error

    def submit(self, block: TokenBlock, manifest: StoreManifest) -> None:
        self._raise_if_failed()
        self.queue.put((block, manifest))

    def close(self) -> None:
        """Wait for every submitted block to be committed."""
        self.queue.put(_DONE)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
