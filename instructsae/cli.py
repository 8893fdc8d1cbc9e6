"""`instructsae extract | dedup | train | sweep | evaluate | features | steer | autointerp | inspect | verify |
convert | demo | pipeline compare | export neuronpedia`.

Bad input: one line on stderr, exit 2."""

import json
import os
import sys

import click

from instructsae import __version__
from instructsae.cli_options import build, options_from, read_yaml
from instructsae.errors import UserError
from instructsae.schemas.autointerp import AutointerpConfig
from instructsae.schemas.base import split_list
from instructsae.schemas.compare import CompareConfig
from instructsae.schemas.dataset import DedupConfig
from instructsae.schemas.evaluate import LMViewConfig
from instructsae.schemas.extract import ExtractConfig
from instructsae.schemas.features import FeaturesConfig
from instructsae.schemas.neuronpedia import NeuronpediaExportConfig
from instructsae.schemas.steer import SteerConfig
from instructsae.schemas.sweep import SweepConfig
from instructsae.schemas.train import ARCHITECTURES, PRESETS, JumpReLUConfig, OptimConfig, TopKConfig, TrainConfig
from instructsae.schemas.train import MatryoshkaBatchTopKConfig
from instructsae.schemas.transcoder import ACTIVATIONS, TranscoderConfig


def _describe(model, field: str) -> str:
    return model.model_fields[field].description or ""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="instructsae", message="%(prog)s %(version)s")
def cli():
    """Sparse autoencoders for instruct models: extract activations once, train many SAEs on them."""


@cli.command()
@click.option("--config", "config_file", type=click.Path(), help="YAML file with any of the options below")
@options_from(ExtractConfig)
def extract(config_file, **options):
    """Run a causal LM over a dataset (FAST or BT) and store per-token activations in a zarr store."""
    from instructsae import distributed
    from instructsae.api import extract_activations

    cfg = build(ExtractConfig, read_yaml(config_file), options)
    manifest = extract_activations(cfg)
    if distributed.ranks().is_main:  # under torchrun, rank 0 speaks for the store
        click.echo(f"store {cfg.out}: {manifest.n_tokens:,} tokens, {manifest.n_instances:,} instances, "
                   f"layers {list(manifest.identity.layers)}, sites {list(manifest.identity.stored_sites)}, "
                   f"complete={manifest.complete}")


@cli.command()
@options_from(DedupConfig)
def dedup(**options):
    """Drop exact and near-duplicate rows (word n-gram MinHash LSH, as the FAST paper's 20-gram dedup) and write
    the rest as parquet in the `messages` format."""
    from instructsae.extract.dedup_run import format_report, run_dedup

    click.echo(format_report(run_dedup(build(DedupConfig, options))))


# train's flags for one architecture's settings, beyond those in its signature (activation: a transcoder's)
SAE_ONLY_FLAGS = ("target_l0", "target_l0_gain", "prefixes", "activation")


@cli.command()
@click.option("--config", "config_file", type=click.Path(), help="YAML file (TrainConfig fields, nested sae/optim)")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="defaults to start from")
@options_from(TrainConfig, skip=("sae", "optim"))
@click.option("--sae", "arch", type=click.Choice(ARCHITECTURES), help="SAE architecture")
@click.option("--expansion", "--expansion-factor", "expansion", type=int, help=_describe(JumpReLUConfig, "expansion"))
@click.option("--d-sae", type=int, help=_describe(JumpReLUConfig, "d_sae") + " (give it or --expansion)")
@click.option("--sparsity-coeff", "--l1-coefficient", "--l0-coefficient", "sparsity_coeff", type=float,
              help="sparsity coefficient (L1 for standard, L0 for jumprelu; SAELens's names are on another scale: "
                   "see the README's alias table)")
@click.option("--bandwidth", "--jumprelu-bandwidth", "bandwidth", type=float,
              help=_describe(JumpReLUConfig, "bandwidth"))
@click.option("--init-threshold", "--jumprelu-init-threshold", "init_threshold", type=float,
              help=_describe(JumpReLUConfig, "init_threshold"))
@click.option("--target-l0", type=float, help=_describe(JumpReLUConfig, "target_l0") + " (jumprelu)")
@click.option("--target-l0-gain", type=float, help=_describe(JumpReLUConfig, "target_l0_gain") + " (jumprelu)")
@click.option("--prefixes", callback=lambda ctx, param, value: split_list(value),
              help=_describe(MatryoshkaBatchTopKConfig, "prefixes") + ", e.g. 256,1024 (matryoshka_batchtopk)")
@click.option("--k", type=int, help=_describe(TopKConfig, "k") + " (topk, batchtopk, matryoshka_batchtopk; a "
              "transcoder given k alone is topk)")
@click.option("--activation", type=click.Choice(ACTIVATIONS), help=_describe(TranscoderConfig, "activation"))
@options_from(OptimConfig)
@click.option("--resume", is_flag=True, help="continue a killed run from its checkpoint (same config and store)")
@click.option("--overwrite", is_flag=True,
              help="replace the finished SAE in --out (another config, or the same one trained again)")
def train(config_file, preset, arch, expansion, d_sae, sparsity_coeff, bandwidth, init_threshold, k, resume,
          overwrite, **options):
    """Train one SAE on a store, streaming shuffled chunks through a mixing buffer."""
    from instructsae.api import train_sae
    from instructsae.train.config import resolve_train_config

    sae_flags = {"arch": arch, "expansion": expansion, "d_sae": d_sae, "sparsity_coeff": sparsity_coeff,
                 "bandwidth": bandwidth, "init_threshold": init_threshold, "k": k}
    sae_flags.update({name: options.pop(name) for name in SAE_ONLY_FLAGS})  # flags of one architecture each
    optim_flags = {name: options.pop(name) for name in OptimConfig.model_fields}
    cfg = resolve_train_config(read_yaml(config_file), preset, options, sae_flags, optim_flags)
    summary = train_sae(cfg, resume=resume, overwrite=overwrite)
    if summary is not None:  # under torchrun, rank 0 prints it
        click.echo(json.dumps(summary, indent=2))


@cli.command()
@click.option("--config", "config_file", required=True, type=click.Path(),
              help="sweep YAML: base train settings and a grid (see instructsae/configs/sweep-demo.yaml)")
@options_from(SweepConfig, skip=("base", "grid", "preset"))
@click.option("--resume", is_flag=True, help="continue a killed sweep from its checkpoint")
def sweep(config_file, resume, **options):
    """Train every SAE of a grid in one pass over a store; skip those already finished; report them all."""
    from instructsae.api import train_sweep

    train_sweep(build(SweepConfig, read_yaml(config_file), options), resume=resume)


@cli.command()
@click.option("--sae", "sae_dirs", required=True, multiple=True, type=click.Path(),
              help="SAE folder (SAELens layout); repeat it to evaluate several, sharing the LM's clean runs")
@click.option("--store", required=True, type=click.Path(), help="store to evaluate on (not trained on)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="evaluate on at most this many tokens")
@click.option("--out", type=click.Path(), default=None,
              help="also write the JSON result to this file (nothing is written into the SAE folders)")
@options_from(LMViewConfig)
def evaluate(sae_dirs, store, as_json, max_tokens, out, **lm_options):
    """Reconstruction (MSE, NMSE, explained variance, the FAST paper's Eq. 7), L0 and dead fraction of an SAE on a
    store, per token role too, and the LM's loss with the SAE spliced in (CE loss recovered, KL)."""
    from instructsae.api import evaluate_sae
    from instructsae.evaluate.run import format_role_table, format_table

    results = evaluate_sae(list(sae_dirs), store, max_tokens=max_tokens, lm=build(LMViewConfig, lm_options), out=out)
    tables = f"{format_table(results)}\n\nper role (LM columns: the role of the token predicted)\n" \
             f"{format_role_table(results)}"
    # one SAE: its result object; several: a list of them
    click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2) if as_json else tables)


@cli.command()
@options_from(FeaturesConfig)
def features(**options):
    """Per-feature density, mean activation, role shares and top contexts; JSON, Parquet and a static dashboard."""
    from instructsae.evaluate.features import format_summary, run_features

    click.echo(format_summary(run_features(build(FeaturesConfig, options))))


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the manifest and counts as JSON")
def inspect(store, as_json):
    """Print a store's manifest and counts."""
    from instructsae.extract.inspect import describe_store

    click.echo(describe_store(store, as_json))


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the findings as JSON")
def verify(store, as_json):
    """Read a whole store back and name every bad chunk (missing, truncated, checksum, rows beyond the commit,
    NaN/inf) and every disagreement between manifest and arrays. Exit 1 on any problem."""
    from instructsae.store.verify import format_report, verify_report

    report = verify_report(store, show_progress=not as_json)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["ok"]:
        sys.exit(1)


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--out", required=True, help="where to write the converted store (a new location)")
@click.option("--shard-mb", type=click.FloatRange(min=0, min_open=True), default=512.0, show_default=True,
              help=_describe(ExtractConfig, "shard_mb"))
def convert(store, out, shard_mb):
    """Rewrite a finished store of an older format (1: no checksums, a file per chunk; 2: chunks not bound to their
    place) in the current one."""
    from instructsae.store.convert import convert_store, describe

    click.echo(describe(convert_store(store, out, shard_mb), out))


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, help="folder for stores, SAEs and the table")
@click.option("--train-tokens", type=int, default=None, help="tokens in the training store")
def demo(out, train_tokens):
    """Extract a FAST store of the embedded model/data, train JumpReLU and Standard SAEs, evaluate both."""
    from instructsae.pipelines.demo import run_demo

    run_demo(out, train_tokens)


@cli.command()
@options_from(SteerConfig)
def steer(**options):
    """Generate greedily with α × a feature's unit-norm decoder direction added after the SAE's layer."""
    from instructsae.evaluate.steering import run_steering, side_by_side

    options["alpha"] = split_list(options["alpha"])
    if options["out"] is None and options["feature"] is not None:
        options["out"] = f"steer-feature-{options['feature']}.json"
    result = run_steering(build(SteerConfig, options))
    click.echo(f"feature {result['feature']} of {result['sae']}, layer {result['layer']} of {result['model']}")
    click.echo(side_by_side(result["generations"]))
    click.echo(f"\nwrote {result['out']}")


@cli.command()
@click.option("--config", "config_file", type=click.Path(), help="YAML file with any of the options below")
@options_from(AutointerpConfig)
def autointerp(config_file, **options):
    """Explain sampled features through an OpenAI-compatible endpoint and score the explanations: delphi's
    detection and fuzzing (balanced accuracy) and the FAST paper's 1-5 rubric."""
    from instructsae.evaluate.autointerp import format_summary, run_autointerp

    options["scorers"] = split_list(options["scorers"])
    click.echo(format_summary(run_autointerp(build(AutointerpConfig, read_yaml(config_file), options))))


@cli.group(name="export")
def export_group():
    """Hand an SAE's features to other tools."""


@export_group.command(name="neuronpedia")
@options_from(NeuronpediaExportConfig)
def export_neuronpedia(**options):
    """Write Neuronpedia's bulk-import layout (as SAEDashboard's exporter does): features with their activation
    records (per-token values and chat roles), logits, histograms and explanations."""
    from instructsae.evaluate.neuronpedia import run_neuronpedia_export

    result = run_neuronpedia_export(build(NeuronpediaExportConfig, options))
    click.echo(f"{result['n_features']:,} features, {result['n_activations']:,} activation records, "
               f"{result['n_explanations']:,} explanations in {result['n_batches']} batches; wrote {result['out']}")


@cli.group()
def pipeline():
    """End-to-end recipes built from the stages."""


@pipeline.command()
@options_from(CompareConfig, skip=("grid", "train", "heldout"))
@click.option("--heldout", "heldout", multiple=True,
              help=CompareConfig.model_fields["heldout"].description + " [default: chatterbot]")
@click.option("--config", "config_file", type=click.Path(), help="YAML with any of these options, and grid/train")
def compare(config_file, heldout, **options):
    """BT(P) vs BT(F) vs FAST at matched L0 over seeds, with confidence intervals, on held-out dialogue sets;
    writes report.md and frontier.png."""
    from instructsae.pipelines.compare import run_compare

    run_compare(build(CompareConfig, read_yaml(config_file), {**options, "heldout": tuple(heldout) or None}))


def _end_progress_bars() -> None:
    """A bar still drawn when an error stops a command (a bad chunk met mid-training) ends its line first,
    so the error is a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


INTERRUPTED = "interrupted (a store keeps what it committed, a run its last checkpoint; rerun to resume)"


_signalled: list[int] = []


def _interrupt_on_signals() -> None:
    """SIGTERM (a scheduler's stop, `kill`) ends a command the way Ctrl-C (SIGINT) does: KeyboardInterrupt, so
    the blocks that hold locks and `.partial` files release and remove them, then the same line."""
    import signal
    import threading

    def interrupt(signum, frame):
        _signalled.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, interrupt)


def _say(line: str, every_rank: bool = True) -> None:
    """A line on stderr; under torchrun, a line every rank would say alike (a refusal rank 0 decided for all, an
    interrupt) is said by rank 0 alone."""
    if every_rank or os.environ.get("RANK", "0") == "0":  # torchrun's rank (distributed.ranks, without torch)
        click.echo(line, err=True)


def _leave(code: int) -> None:
    """Exit; under torchrun leave the process group first, or its threads abort the process at exit (SIGABRT,
    'terminate called without an active exception'). After a signal, at once: the interrupted blocks have
    released what they held, and the interpreter's teardown would only wake zarr's event loop thread to print
    tracebacks of the tasks the interrupt left it."""
    if "torch.distributed" in sys.modules:  # (a command that failed before importing torch has no group)
        from instructsae.distributed import abandon

        abandon()
    if _signalled:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main() -> None:
    from instructsae.fileio import os_error_line

    _interrupt_on_signals()
    try:
        cli.main(standalone_mode=False)
    except UserError as error:
        _end_progress_bars()
        _say(f"error: {error}", every_rank=not getattr(error, "said_by_main", False))
        _leave(2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns KeyboardInterrupt into Abort
        _end_progress_bars()
        _say(INTERRUPTED, every_rank=False)
        _leave(130)
    except click.ClickException as error:  # a bad flag or value: one line too, not click's usage block
        click.echo(f"error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except OSError as error:  # a full disk, a read-only file system, no permission: the file, not a traceback
        _end_progress_bars()
        _say(f"error: {os_error_line(error)}")
        _leave(2)


if __name__ == "__main__":
    main()
