"""The sequences of a store as the model ran them: the stored token ids, with the dropped first token put back.

By default extract does not store each sequence's first token (the attention sink), and the store keeps no
trace of it. Its id depends on the chat template and, in BT mode, on where a block was cut, so the only exact
way back is to replay extract's own deterministic plan of instances from the dataset. The replayed ids after
the first must equal the stored ones, which proves the replay used the same data, tokenizer and template.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from instructsae.errors import UserError
from instructsae.extract.data import DatasetReader
from instructsae.extract.memory_data import PREFIX as IN_MEMORY
from instructsae.extract.plan import planned_instances
from instructsae.lm.models import LoadedModel
from instructsae.store.reader import StoreReader


@dataclass(frozen=True)
class StoredSequence:
    instance: int
    token_ids: np.ndarray  # int32 [n]: what the model runs (the name lm.batches.padded_batch reads)
    roles: np.ndarray  # uint8 [n - first_stored]: roles of the stored tokens


def first_stored_position(reader: StoreReader) -> int:
    """Position of the first stored token of every sequence: 0 if extract kept the first token, else 1."""
    return 0 if reader.manifest.identity.keep_first_token else 1


def stored_tokens(reader: StoreReader, max_tokens: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(instance, token ids, roles) of the store's first sequences, the last cut so exactly max_tokens are given.

    Instances are stored in order from row 0, so the first max_tokens rows hold exactly these tokens.
    """
    rows = min(max_tokens, reader.n_tokens)
    token_id, role = reader.read_column("token_id", 0, rows), reader.read_column("role", 0, rows)
    starts = reader.read_column("instance_start")
    lengths = reader.read_column("instance_length")
    for instance in range(reader.n_instances):
        start = int(starts[instance])
        if start >= rows:
            return
        stop = min(start + int(lengths[instance]), rows)
        yield instance, token_id[start:stop], role[start:stop]


def replayed_instances(reader: StoreReader, lm: LoadedModel, dataset: str | None) -> Iterator[np.ndarray]:
    """Token ids of the store's instances as extract planned them (first token included), from the dataset."""
    identity = reader.manifest.identity
    dataset = dataset or identity.dataset
    if dataset.startswith(IN_MEMORY):
        raise UserError(f"store {reader.path} was extracted from dialogues given in Python ({dataset}): pass "
                        "--dataset a file with the same dialogues to replay its dropped first tokens")
    records = DatasetReader(dataset, identity.split, identity.column, identity.role_key, identity.content_key,
                            identity.dedup, identity.system_column, identity.prompt_column, identity.response_column)
    return (instance.token_ids for instance in planned_instances(identity, lm.tokenizer, records))


def stored_sequences(reader: StoreReader, lm: LoadedModel, max_tokens: int,
                     dataset: str | None = None) -> list[StoredSequence]:
    """The model inputs of the store's first sequences, holding exactly max_tokens stored tokens in all."""
    stored = list(stored_tokens(reader, max_tokens))
    if first_stored_position(reader) == 0:
        return [StoredSequence(instance, ids, roles) for instance, ids, roles in stored]
    replay = replayed_instances(reader, lm, dataset)
    sequences = []
    for instance, ids, roles in stored:
        replayed = next(replay, None)
        if replayed is None or not np.array_equal(replayed[1:len(ids) + 1], ids):
            raise UserError(
                f"store {reader.path}: instance {instance} re-made from dataset "
                f"'{dataset or reader.manifest.identity.dataset}' with model '{lm.name}' differs from the stored "
                f"tokens; pass the --dataset and --model the store was made with")
        sequences.append(StoredSequence(instance, np.concatenate([replayed[:1], ids]).astype(np.int32), roles))
    return sequences
