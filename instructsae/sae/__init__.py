"""SAE architectures, one per file, chosen by name from one registry."""

from instructsae.schemas.train import SAEConfig
from instructsae.sae.base import LossOutput, SparseAutoencoder
from instructsae.sae.batchtopk import BatchTopKSAE
from instructsae.sae.jumprelu import JumpReLUSAE
from instructsae.sae.matryoshka_batchtopk import MatryoshkaBatchTopKSAE
from instructsae.sae.standard import StandardSAE
from instructsae.sae.topk import TopKSAE
from instructsae.sae.transcoder import TRANSCODERS
from instructsae.sae.skip_transcoder import SKIP_TRANSCODERS
from instructsae.schemas.transcoder import TranscoderConfig

SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (StandardSAE, JumpReLUSAE, TopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE)}
# Transcoders by class name (jumprelu_transcoder, ...): their configs' tag is transcoder or skip_transcoder
TRANSCODER_CLASSES: dict[str, type[SparseAutoencoder]] = {cls.architecture: cls
                                                          for cls in (*TRANSCODERS, *SKIP_TRANSCODERS)}
DICTIONARY_CLASSES = {**SAE_CLASSES, **TRANSCODER_CLASSES}  # every class a folder may hold
TRAINER_FIELDS = {"arch", "expansion", "sparsity_coeff"}  # read by build_sae and the trainer, not the module


def sae_class(arch: str) -> type[SparseAutoencoder]:
    """The class of an architecture tag (a config's `arch`, or a transcoder class's name): where its facts are
    asked."""
    return DICTIONARY_CLASSES[arch]


def config_class(cfg: SAEConfig) -> type[SparseAutoencoder]:
    """The class a config builds: its `arch`, or for a transcoder its arch and activation (jumprelu_transcoder)."""
    return DICTIONARY_CLASSES[cfg.architecture if isinstance(cfg, TranscoderConfig) else cfg.arch]


def check_sae_config(cfg: SAEConfig, d_in: int) -> None:
    """What the schema cannot check alone: settings that depend on the model's width."""
    config_class(cfg).check_config(cfg, d_in)


def build_sae(cfg: SAEConfig, d_in: int) -> SparseAutoencoder:
    """The SAE a config describes; architecture-specific fields become constructor arguments."""
    check_sae_config(cfg, d_in)
    extra = cfg.constructor_settings() if isinstance(cfg, TranscoderConfig) else cfg.model_dump(exclude=TRAINER_FIELDS)
    return config_class(cfg)(d_in, cfg.expansion * d_in, **extra)


__all__ = ["DICTIONARY_CLASSES", "SAE_CLASSES", "TRANSCODER_CLASSES", "LossOutput", "SparseAutoencoder", "build_sae",
           "check_sae_config", "config_class", "sae_class"]
