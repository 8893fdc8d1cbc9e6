"""`make demo`: one FAST store of the embedded model and data, two SAEs trained from it, one table.

The held-out store takes the dialogues after those of the training store, from the next whole conversation, so
the table measures SAEs on dialogues they never saw.
"""

from pathlib import Path

from instructsae.cli_options import read_yaml
from instructsae.evaluate.run import evaluate_sae_on_store, format_table
from instructsae.extract.heldout import heldout_skip
from instructsae.extract.run import run_extract
from instructsae.schemas import ExtractConfig, TrainConfig
from instructsae.train.run import run_training

LAYER = 15
TRAIN_TOKENS = 120_000
HELDOUT_TOKENS = 20_000
CONFIGS = Path(__file__).parent.parent / "configs"
# Sized for a 2-core CPU in minutes (Gemma Scope's lr 7e-5 needs far more steps than a demo has).
DEMO_SAES = {"jumprelu": CONFIGS / "train-jumprelu.yaml", "standard": CONFIGS / "train-standard.yaml"}


def run_demo(out: str, train_tokens: int | None = None) -> str:
    root = Path(out)
    train_store = root / "stores" / "fast-train"
    heldout_store = root / "stores" / "fast-heldout"
    base = dict(model="smollm2", dataset="sharegpt", mode="fast", layers=(LAYER,))
    print(f"[1/4] extracting the training store -> {train_store}")
    manifest = run_extract(ExtractConfig(**base, out=str(train_store), max_tokens=train_tokens or TRAIN_TOKENS))
    print(f"[2/4] extracting the held-out store -> {heldout_store}")
    skip = heldout_skip(base["dataset"], manifest.identity.split, manifest.rows_used)
    run_extract(ExtractConfig(**base, out=str(heldout_store), skip_instances=skip, max_tokens=HELDOUT_TOKENS))
    results = []
    for step, (name, config_file) in enumerate(DEMO_SAES.items(), start=3):
        run_dir = root / "saes" / name
        print(f"[{step}/4] training the {name} SAE ({config_file.name}) -> {run_dir}")
        settings = read_yaml(str(config_file))
        run_training(TrainConfig(**settings, store=str(train_store), out=str(run_dir), layer=LAYER))
        results.append(evaluate_sae_on_store(str(run_dir), str(heldout_store)))
    table = format_table(results)
    (root / "results.md").write_text(f"Held-out FAST dialogues, layer {LAYER} of SmolLM2-135M-Instruct\n\n{table}\n")
    print(f"\nHeld-out FAST dialogues, layer {LAYER} (written to {root / 'results.md'}):\n{table}")
    return table
