"""SAE architectures, one per file, chosen by name from one registry."""

from instructsae.schemas.train import SAEConfig
from instructsae.sae.base import LossOutput, SparseAutoencoder
from instructsae.sae.batchtopk import BatchTopKSAE
from instructsae.sae.jumprelu import JumpReLUSAE
from instructsae.sae.standard import StandardSAE
from instructsae.sae.topk import TopKSAE

SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (StandardSAE, JumpReLUSAE, TopKSAE, BatchTopKSAE)}
TRAINER_FIELDS = {"arch", "expansion", "sparsity_coeff"}  # read by build_sae and the trainer, not the module


def sae_class(arch: str) -> type[SparseAutoencoder]:
    """The class of an architecture tag (a config's `arch`): where its facts are asked."""
    return SAE_CLASSES[arch]


def check_sae_config(cfg: SAEConfig, d_in: int) -> None:
    """What the schema cannot check alone: settings that depend on the model's width."""
    sae_class(cfg.arch).check_config(cfg, d_in)


def build_sae(cfg: SAEConfig, d_in: int) -> SparseAutoencoder:
    """The SAE a config describes; architecture-specific fields become constructor arguments."""
    check_sae_config(cfg, d_in)
    extra = cfg.model_dump(exclude=TRAINER_FIELDS)
    return sae_class(cfg.arch)(d_in, cfg.expansion * d_in, **extra)


__all__ = ["SAE_CLASSES", "LossOutput", "SparseAutoencoder", "build_sae", "check_sae_config", "sae_class"]
