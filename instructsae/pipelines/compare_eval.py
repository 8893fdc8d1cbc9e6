"""compare's evaluations, kept per SAE so that a killed compare does not evaluate again what it finished.

Each SAE's result is kept under compare's own folder (evaluate writes nothing into the SAE folders it reads), in
CACHE/<method>/<SAE folder name>/<store fingerprint>.json beside <fingerprint>.sequences.npz: the per-sequence sums
its figures come from (what the bootstrap resamples). Missing ones are evaluated one method at a time, so
the SAEs of a method share a read of the store and the clean and ablated LM runs, and each method's results are
on disk before the next starts.
"""

import json
from pathlib import Path

import numpy as np
import torch

from instructsae.evaluate.run import evaluate_saes_on_store, store_batches, without_per_sequence
from instructsae.store.reader import open_complete_store
from instructsae.fileio import write_atomically, write_text_atomically
from instructsae.schemas.evaluate import LMViewConfig

EVAL_CACHE = "eval-cache"  # under compare's --out
STORE_ARRAYS = ("sq_err_IR", "sq_IR", "l0_IR", "count_IR")
LM_ARRAYS = ("instance_I", "sums_IQR", "count_IR")


def _paths(cache: Path, sae: dict, fingerprint: str) -> tuple[Path, Path]:
    folder = cache / sae["method"] / Path(sae["dir"]).name
    return folder / f"{fingerprint}.json", folder / f"{fingerprint}.sequences.npz"


def _save(cache: Path, sae: dict, result: dict, lm_tokens: int) -> None:
    arrays = {name: result["per_sequence"][name] for name in STORE_ARRAYS}
    lm = (result.get("lm") or {}).get("per_sequence")
    if lm is not None:
        arrays.update({f"lm_{name}": lm[name] for name in LM_ARRAYS})
    json_path, npz = _paths(cache, sae, result["store_fingerprint"])
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def write(partial: Path) -> None:
        with open(partial, "wb") as file:
            np.savez(file, lm_tokens=np.array(lm_tokens), **arrays)

    write_atomically(npz, write)
    write_text_atomically(json_path, json.dumps(without_per_sequence(result), indent=2))


def _load(cache: Path, sae: dict, fingerprint: str, lm_tokens: int) -> dict | None:
    """A cached result with its per-sequence arrays, or None when absent, unreadable or of another LM view."""
    json_path, npz = _paths(cache, sae, fingerprint)
    try:
        result = json.loads(json_path.read_text())
        with np.load(npz) as arrays:
            if int(arrays["lm_tokens"]) != lm_tokens:
                return None
            result["per_sequence"] = {name: arrays[name] for name in STORE_ARRAYS}
            if "lm" in result:
                result["lm"]["per_sequence"] = {name: arrays[f"lm_{name}"] for name in LM_ARRAYS}
    except (OSError, ValueError, KeyError):
        return None
    return result


def evaluate_cached(saes: list[dict], store: str, lm: LMViewConfig, cache: Path) -> list[dict]:
    """evaluate's result (per_sequence arrays included) of each SAE ({"method", "dir"}) on the store, kept in
    `cache` (a folder of compare's own)."""
    fingerprint = open_complete_store(store).manifest.fingerprint
    results = [_load(cache, sae, fingerprint, lm.lm_tokens) for sae in saes]
    for method in dict.fromkeys(sae["method"] for sae in saes):
        todo = [i for i, sae in enumerate(saes) if sae["method"] == method and results[i] is None]
        if not todo:
            continue
        print(f"evaluating {len(todo)} {method} SAEs on {store}")
        fresh = evaluate_saes_on_store([saes[i]["dir"] for i in todo], store, lm=lm, per_sequence=True)
        for i, result in zip(todo, fresh):
            _save(cache, saes[i], result, lm.lm_tokens)
            results[i] = result
    return results


@torch.no_grad()
def instance_sums(store: str, layer: int, target: str = "resid_post") -> tuple[np.ndarray, int]:
    """([n_instances, d_model] sum of each sequence's activations at the reconstructed site, d_model): what the
    explained variance of a resample of sequences needs besides the per-sequence sums of each SAE."""
    reader = open_complete_store(store)
    sums_ID = torch.zeros(reader.n_instances, reader.d_model, dtype=torch.float64)
    for _, x_BD, instance_B, _ in store_batches(reader, (layer, target, target), None):
        sums_ID.index_add_(0, torch.from_numpy(instance_B.astype(np.int64)), x_BD.double())
    return sums_ID.numpy(), reader.d_model
