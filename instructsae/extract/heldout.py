"""Where a held-out store starts: after every dataset row a training store read, and never inside one of its
conversations (ShareGPT cuts long conversations into consecutive rows, so the row after the last one read may
continue a dialogue the SAEs trained on)."""

from instructsae.extract.data import DatasetReader


def heldout_skip(dataset: str, split: str, rows_seen: int) -> int:
    """Usable rows a held-out store skips: the first rows_seen, then any that continue their conversations."""
    seen_conversations, n_rows = set(), 0
    for index, record in enumerate(DatasetReader(dataset, split)):
        if index < rows_seen:
            seen_conversations.add(record.conversation)
        elif record.conversation is None or record.conversation not in seen_conversations:
            return index
        n_rows = index + 1
    return n_rows  # the dataset ends first: nothing is left to hold out
