"""`instructsae inspect STORE`: the manifest and counts, as text or JSON."""

import json

import numpy as np

from instructsae.extract.chat import describe_changes
from instructsae.store.reader import open_store
from instructsae.schemas.manifest import ROLES

ROLE_BLOCK = 1 << 22


def store_summary(store: str) -> dict:
    reader = open_store(store)
    manifest = reader.manifest
    role_counts = np.zeros(len(ROLES), dtype=np.int64)
    for start in range(0, reader.n_tokens, ROLE_BLOCK):  # in blocks: a store can be larger than memory
        role_counts += np.bincount(reader.read_column("role", start, start + ROLE_BLOCK), minlength=len(ROLES))
    return {
        "path": store,
        "manifest": manifest.model_dump(mode="json", exclude={"chat_template"}),
        "counts": {
            "tokens": reader.n_tokens,
            "instances": reader.n_instances,
            "chunks": reader.n_chunks,
            "tokens_by_role": {name: int(role_counts[code]) for code, name in enumerate(ROLES)},
        },
        "mean_sq_norm": {layer: stats.mean_sq_norm for layer, stats in manifest.layer_stats.items()},
    }


def truncation_line(manifest: dict, identity: dict) -> str:
    if manifest.get("n_truncated") is None:  # a store from before they were counted
        return "truncated   not counted (a store made before instructsae counted the instances cut at max_len)"
    return (f"truncated   {manifest['n_truncated']:,} instances cut at max_len={identity['max_len']}, "
            f"{manifest['tokens_truncated']:,} tokens lost")


def data_lines(manifest: dict, identity: dict) -> list[str]:
    """How the data was read and fitted to the chat template: truncation, the options that shaped the rows."""
    lines = [truncation_line(manifest, identity)]
    columns = [f"--{name.replace('_', '-')} {identity[name]}"
               for name in ("column", "system_column", "prompt_column", "response_column") if identity.get(name)]
    if columns:
        lines.append(f"columns     {'  '.join(columns)}")
    if identity.get("system_prompt"):  # recorded only where the template has no system role
        lines.append(f"template    no system role: --system-prompt {identity['system_prompt']}")
    changes = describe_changes(manifest.get("rendering_changes") or {})
    if changes:
        lines.append(f"template    {changes}")
    return lines


def describe_store(store: str, as_json: bool) -> str:
    summary = store_summary(store)
    if as_json:
        return json.dumps(summary, indent=2)
    manifest, counts, identity = summary["manifest"], summary["counts"], summary["manifest"]["identity"]
    lines = [
        f"store       {store}  ({'complete' if manifest['complete'] else 'INCOMPLETE: rerun extract to resume'})",
        f"model       {identity['model']}  d_model={identity['d_model']}  layers={identity['layers']}"
        f"  sites={','.join(identity.get('sites') or [identity['hook_site']])}  dtype={identity['dtype']} "
        f"(computed in {identity['model_dtype']}"
        + (f", {manifest['attn_implementation']} attention)" if manifest.get("attn_implementation") else ")"),
        f"dataset     {identity['dataset']} [{identity['split']}]  sha256={identity['dataset_sha256'][:12]}",
        f"mode        {identity['mode']}  max_len={identity['max_len']}  block_len={identity['block_len']}"
        f"  keep_first_token={identity['keep_first_token']}",
        f"tokens      {counts['tokens']:,} in {counts['instances']:,} instances, {counts['chunks']} chunks of "
        f"{identity['chunk_tokens']}",
        "roles       " + ", ".join(f"{name} {n:,}" for name, n in counts["tokens_by_role"].items()),
        f"rows        {manifest['rows_used']:,} usable read ({identity['skip_instances']:,} passed over by "
        f"--skip-instances), {manifest['rows_skipped']:,} skipped as unusable",
        "mean |x|^2  " + ", ".join(f"layer {k.replace('.', ' ')}: {v:.1f}" for k, v in summary["mean_sq_norm"].items()),
        *data_lines(manifest, identity),
        f"fingerprint {manifest['fingerprint']}  (instructsae {manifest['tool_version']})",
    ]
    if manifest.get("part_tokens") is not None:  # written under torchrun
        lines.append(f"parts       {len(manifest['parts'])} work units of ~{manifest['part_tokens']:,} tokens under "
                     f"parts/, written by torchrun ranks" + ("" if manifest["complete"] else " (so far: see parts/)"))
    return "\n".join(lines)
