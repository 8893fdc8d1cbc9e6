"""What `instructsae train` does. The SAE part is a union tagged by `arch`: one config per architecture."""

from typing import Annotated, Literal, Union

from pydantic import AliasChoices, Field

from instructsae.schemas.base import FrozenModel
from instructsae.schemas.sites import Site
from instructsae.schemas.transcoder import TARGET_L0_GAIN, SkipTranscoderConfig, TranscoderConfig
from instructsae.schemas.width import DEFAULT_EXPANSION, SAEWidth  # noqa: F401 (imported from here)

# SAELens's names are accepted beside ours (validation_alias below; `other_names` lists them). Where the value's
# scale differs, the description says how: our inputs have E||x||^2 = 1, SAELens's (normalize_activations
# "expected_average_only_in") E||x|| = sqrt(d_model), so its MSE is d_model times ours, its latents and
# thresholds sqrt(d_model) times ours, and a penalty coefficient converts by what keeps the loss's balance.


class StandardConfig(SAEWidth):
    """ReLU SAE with an L1 penalty weighted by decoder row norms (Anthropic, April 2024 update)."""

    arch: Literal["standard"] = "standard"
    # Anthropic's lambda = 5 at E||x||^2 = d_model is 5 / sqrt(d_model) at our E||x||^2 = 1 (0.21 for d_model 576).
    sparsity_coeff: float = Field(0.2, ge=0, validation_alias=AliasChoices("sparsity_coeff", "l1_coefficient"),
                                  description="L1 coefficient (inputs have unit mean squared norm; SAELens's "
                                  "l1_coefficient λ is λ / sqrt(d_model) here)")


class JumpReLUConfig(SAEWidth):
    """JumpReLU SAE with an L0 penalty through a rectangle-kernel straight-through estimator (Gemma Scope)."""

    arch: Literal["jumprelu"] = "jumprelu"
    sparsity_coeff: float = Field(1e-3, ge=0, validation_alias=AliasChoices("sparsity_coeff", "l0_coefficient"),
                                  description="L0 coefficient (inputs have unit mean squared norm; SAELens's "
                                  "l0_coefficient λ is λ / d_model here)")
    bandwidth: float = Field(1e-3, gt=0, validation_alias=AliasChoices("bandwidth", "jumprelu_bandwidth"),
                             description="width of the rectangle kernel of the estimator (SAELens's "
                             "jumprelu_bandwidth b is b / sqrt(d_model) here)")
    init_threshold: float = Field(1e-3, gt=0, validation_alias=AliasChoices("init_threshold",
                                                                            "jumprelu_init_threshold"),
                                  description="initial threshold of every feature (SAELens's "
                                  "jumprelu_init_threshold t is t / sqrt(d_model) here)")
    target_l0: float | None = Field(None, gt=0, description="aim L0 at this target: the penalty becomes "
                                    "sparsity_coeff · (2/T)·(L0 − A)² per token (Gemma Scope 2, with its centre A "
                                    "steered by target_l0_gain) instead of sparsity_coeff · L0, and sparsity_coeff "
                                    "defaults to 0.03/T (None: no target)")
    target_l0_gain: float = Field(TARGET_L0_GAIN, ge=0, description="with target_l0: after each step the "
                                  "quadratic's centre moves by this times (target − the batch's mean L0), so the "
                                  "run's L0 lands on the target (0: centred on the target, as Gemma Scope 2)")


class TopKConfig(SAEWidth):
    """TopK SAE: the k largest latents of each token stay, with the AuxK loss for dead latents (Gao et al. 2024)."""

    arch: Literal["topk"] = "topk"
    k: int = Field(32, gt=0, description="active latents per token (the sparsity setting; at most d_sae)")
    aux_k: int | None = Field(None, gt=0, description="dead latents AuxK reconstructs with (None: d_model // 2)")
    aux_coeff: float = Field(1 / 32, ge=0, validation_alias=AliasChoices("aux_coeff", "aux_loss_coefficient"),
                             description="coefficient of the AuxK loss (divided by the error's variance here, "
                             "not in SAELens: its aux_loss_coefficient is not on the same scale)")


class BatchTopKConfig(TopKConfig):
    """BatchTopK SAE: the k·batch largest latents of a batch stay; a global threshold serves inference."""

    arch: Literal["batchtopk"] = "batchtopk"
    k: int = Field(32, gt=0, description="active latents per token on average over a batch (at most d_sae)")


class MatryoshkaBatchTopKConfig(BatchTopKConfig):
    """Matryoshka BatchTopK SAE: BatchTopK whose nested prefixes of the dictionary each learn to reconstruct too."""

    arch: Literal["matryoshka_batchtopk"] = "matryoshka_batchtopk"
    prefixes: tuple[int, ...] | None = Field(
        None, description="sizes of the nested prefixes below the whole dictionary, increasing, each under d_sae "
                          "(None: d_sae/16 and d_sae/4); in a sweep grid, a list of such lists")


SAE_CONFIGS = (StandardConfig, JumpReLUConfig, TopKConfig, BatchTopKConfig, MatryoshkaBatchTopKConfig,
               TranscoderConfig, SkipTranscoderConfig)
SAEConfig = Annotated[Union[SAE_CONFIGS], Field(discriminator="arch")]
ARCHITECTURES = tuple(config.model_fields["arch"].default for config in SAE_CONFIGS)



class OptimConfig(FrozenModel):
    """Adam with warm-up and decay; defaults follow Gemma Scope."""

    lr: float = Field(7e-5, gt=0, description="peak learning rate (left unset, runs under 100,000 steps get "
                      "7e-5 * sqrt(100,000 / steps), at most 1e-3)")
    lr_end: float | None = Field(None, ge=0, description="final learning rate of the cosine decay (None: constant)")
    lr_warmup_steps: int = Field(1000, ge=0, validation_alias=AliasChoices("lr_warmup_steps", "lr_warm_up_steps"),
                                 description="linear learning-rate warm-up (left unset: at most 5% "
                                 "of the run's steps)")
    beta1: float = Field(0.0, ge=0, lt=1, validation_alias=AliasChoices("beta1", "adam_beta1"),
                         description="Adam beta1 (Gemma Scope: 0)")
    beta2: float = Field(0.999, ge=0, lt=1, validation_alias=AliasChoices("beta2", "adam_beta2"),
                         description="Adam beta2")
    sparsity_warmup_steps: int = Field(10_000, ge=0, validation_alias=AliasChoices(
                                       "sparsity_warmup_steps", "l1_warm_up_steps", "l0_warm_up_steps"),
                                       description="linear warm-up of the sparsity coefficient "
                                       "(left unset: at most the first half of the run)")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the gradient norm (None: off)")


class TrainConfig(FrozenModel):
    store: str = Field(..., description="activation store written by `instructsae extract`")
    out: str = Field(..., description="run folder for the SAE (SAELens layout), metrics and summary")
    layer: int | None = Field(None, description="layer to train on (default: the store's only/first layer)")
    site: Site | None = Field(None, description="hook site the dictionary reads (default: resid_post for an SAE, "
                             "mlp_in for a transcoder)")
    target_site: Site | None = Field(None, description="hook site it reconstructs (default: an SAE its own input, a "
                                    "transcoder mlp_out)")
    sae: SAEConfig = Field(default_factory=JumpReLUConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    tokens: int | None = Field(None, gt=0, validation_alias=AliasChoices("tokens", "training_tokens"),
                               description="training tokens (default: one pass over the training chunks)")
    batch_size: int = Field(4096, gt=0, validation_alias=AliasChoices("batch_size", "train_batch_size_tokens"),
                            description="tokens per optimiser step (left unset: halved, down to "
                            "1024, until the run has 1,000 steps)")
    buffer_tokens: int = Field(262_144, gt=0, description="mixing buffer size in tokens")
    holdout_fraction: float = Field(0.05, ge=0, lt=1, description="share of chunks held out for the summary")
    seed: int = Field(0, description="seeds the stream (chunk order, buffer shuffles, the b_dec sample) and, "
                                     "unless sae_seed is set, the SAE's initial weights")
    sae_seed: int | None = Field(None, description="seeds the SAE's initial weights alone (None: seed); SAEs of "
                                                   "one sweep share the stream but each follows its own sae_seed")
    dead_threshold: float = Field(1e-8, ge=0, validation_alias=AliasChoices("dead_threshold", "dead_feature_threshold"),
                                  description="a feature fires when its activation exceeds this")
    dead_window: int = Field(1000, gt=0, validation_alias=AliasChoices("dead_window", "dead_feature_window"),
                             description="steps without firing after which a feature counts as dead")
    geometric_median_tokens: int = Field(8192, ge=0, description="sample size for the b_dec initialisation (0: off)")
    log_every: int = Field(25, gt=0, description="steps between metrics.jsonl lines")
    checkpoint_every: int = Field(10_000_000, gt=0, description="tokens between checkpoints (for --resume)")
    wandb: bool = Field(False, validation_alias=AliasChoices("wandb", "log_to_wandb"),
                        description="also log to Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = Field("instructsae", description="Weights & Biases project for --wandb")
    device: str = Field(
        "auto", description="torch device, a runtime knob (auto: this rank's GPU when CUDA is present, else the CPU)")


# Presets override defaults and are overridden by YAML and CLI flags: {"train", "optim", "sae": {arch: ...}}.
PRESETS: dict[str, dict] = {
    "gemma-scope": {},  # the schema defaults are Gemma Scope's
    "fast-paper": {  # the FAST paper, Appendix C (fp32 and geometric-median b_dec are always on here)
        "train": {"batch_size": 128, "dead_threshold": 1e-8, "dead_window": 1000},
        "optim": {"lr": 7e-5, "lr_end": 7e-6, "lr_warmup_steps": 16_000, "beta1": 0.9, "beta2": 0.999,
                  "sparsity_warmup_steps": 10_000},
        "sae": {"jumprelu": {"sparsity_coeff": 0.01}, "standard": {"sparsity_coeff": 5.0}},
    },
}
