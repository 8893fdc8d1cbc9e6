"""What happened to the data on its way into a store, counted in the manifest and said once at the end of a run:
rows skipped, instances cut at --max-len, what was adapted to the chat template, columns left unused."""

from collections import Counter
from collections.abc import Sequence

from instructsae.extract.chat import describe_changes
from instructsae.extract.instances import TokenizedInstance
from instructsae.schemas.manifest import StoreManifest


def counted(manifest: StoreManifest, instances: Sequence[TokenizedInstance]) -> dict:
    """The manifest's truncation and template-adaptation counts with `instances` (about to be stored) added. A store
    begun before truncation was counted keeps None: a partial count would claim too little."""
    changes = Counter(manifest.rendering_changes)
    for instance in instances:
        changes.update(dict(instance.changes))
    update = {"rendering_changes": dict(changes)}
    if manifest.n_truncated is not None and manifest.tokens_truncated is not None:
        update["n_truncated"] = manifest.n_truncated + sum(1 for i in instances if i.truncated_tokens)
        update["tokens_truncated"] = manifest.tokens_truncated + sum(i.truncated_tokens for i in instances)
    return update


def summed(manifests: Sequence[StoreManifest]) -> dict:
    """The counts of several parts of one store, summed (None where any part has none)."""
    changes: Counter = Counter()
    for manifest in manifests:
        changes.update(manifest.rendering_changes)
    update = {"rendering_changes": dict(changes), "n_truncated": None, "tokens_truncated": None}
    if all(m.n_truncated is not None and m.tokens_truncated is not None for m in manifests):
        update["n_truncated"] = sum(m.n_truncated for m in manifests)
        update["tokens_truncated"] = sum(m.tokens_truncated for m in manifests)
    return update


def truncation_note(manifest: StoreManifest) -> str | None:
    if not manifest.n_truncated:
        return None
    verb = "was" if manifest.n_truncated == 1 else "were"
    return (f"{manifest.n_truncated:,} of {manifest.n_instances:,} instances {verb} cut at --max-len "
            f"{manifest.identity.max_len}, losing {manifest.tokens_truncated:,} tokens")


def data_notes(manifest: StoreManifest, dataset) -> list[str]:
    """The end-of-run notes about the data (each said once): skipped rows, truncation, template adaptations,
    unused columns. `dataset`: the DatasetReader that was read."""
    notes = [dataset.skip_report(), truncation_note(manifest), describe_changes(manifest.rendering_changes)]
    unused = getattr(dataset, "unused_columns", [])
    if unused:
        notes.append(f"column{'s' if len(unused) > 1 else ''} {', '.join(unused)} of the dataset "
                     f"{'were' if len(unused) > 1 else 'was'} not used (see --column, --system-column, "
                     "--prompt-column, --response-column)")
    return [note for note in notes if note]
