"""SAE architectures, one per file, chosen by name from one registry."""

from instructsae.schemas.train import SAEConfig
from instructsae.train.sae.base import LossOutput, SparseAutoencoder
from instructsae.train.sae.jumprelu import JumpReLUSAE
from instructsae.train.sae.standard import StandardSAE

SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {cls.architecture: cls for cls in (StandardSAE, JumpReLUSAE)}


def build_sae(cfg: SAEConfig, d_in: int) -> SparseAutoencoder:
    """The SAE a config describes; architecture-specific fields become constructor arguments."""
    extra = cfg.model_dump(exclude={"arch", "expansion", "sparsity_coeff"})
    return SAE_CLASSES[cfg.arch](d_in, cfg.expansion * d_in, **extra)


__all__ = ["SAE_CLASSES", "LossOutput", "SparseAutoencoder", "build_sae"]
