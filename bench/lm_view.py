"""The LM view of `evaluate`, with the layers below the splice computed once per batch against every run whole.

    PYTHONPATH=. .venv/bin/python bench/lm_view.py --store runs/demo/stores/fast-heldout \
        --sae runs/demo/saes/jumprelu --sae runs/demo/saes/standard [--tokens 2000] [--copies 4] [--rounds 2]

Runs `evaluate`'s LM view (clean, ablated and one spliced run per SAE on each batch) on the store's first
--tokens stored tokens with the model that made the store, once reusing the clean run's lower layers (what
`evaluate` does) and once running every layer for every run, alternating for --rounds rounds; prints the wall
times, their ratio and checks the figures are the same. --copies evaluates each SAE that many times over, as a
sweep's K SAEs of one layer are.
"""

import argparse
import time

from instructsae.evaluate import splice
from instructsae.evaluate.dialogues import first_stored_position, stored_sequences
from instructsae.lm.models import load_model
from instructsae.store.reader import open_complete_store
from instructsae.sae.folder import load_sae, sae_layer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--sae", action="append", required=True)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    args = parser.parse_args()

    reader = open_complete_store(args.store)
    loaded = [load_sae(folder) for folder in args.sae]
    layer = sae_layer(loaded[0][1], args.sae[0])
    saes = [sae.eval() for sae, _ in loaded] * args.copies
    identity = reader.manifest.identity
    lm = load_model(identity.model, identity.model_dtype, "cpu")
    sequences = stored_sequences(reader, lm, args.tokens)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    print(f"{lm.name}: {lm.n_layers} layers, splice after layer {layer}; {len(saes)} SAEs, "
          f"{sum(len(s.roles) for s in sequences):,} stored tokens in {len(sequences)} sequences")

    can_reuse = splice.lower_layers_can_be_reused
    seconds: dict[str, list[float]] = {"lower layers once": [], "every layer, every run": []}
    figures = {}
    for _ in range(args.rounds):
        for label, reuse in (("lower layers once", None), ("every layer, every run", False)):
            splice.lower_layers_can_be_reused = can_reuse if reuse is None else (lambda *_args: False)
            started = time.perf_counter()
            results = splice.lm_view(lm.model, layer, saes, sequences, first_stored_position(reader),
                                     args.batch_tokens, pad_id)
            seconds[label].append(time.perf_counter() - started)
            figures[label] = [{name: value for name, value in result.items() if name != "per_sequence"}
                              for result in results]
            print(f"  {label:<24} {seconds[label][-1]:7.1f} s", flush=True)
    splice.lower_layers_can_be_reused = can_reuse
    best = {label: min(times) for label, times in seconds.items()}
    print(f"lower layers once / every layer (best of {args.rounds}): "
          f"{best['lower layers once'] / best['every layer, every run']:.2f}")
    same = figures["lower layers once"] == figures["every layer, every run"]
    print(f"figures the same: {same}")


if __name__ == "__main__":
    main()
