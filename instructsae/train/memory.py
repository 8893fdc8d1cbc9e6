"""Will the SAEs fit? Checked before anything is built, so a too-large sweep fails in a second, not an hour in."""

import psutil
import torch

from instructsae import distributed
from instructsae.errors import UserError
from instructsae.sae import build_sae
from instructsae.schemas.train import TrainConfig

GIB = 2**30
FLOAT_BYTES = 4
# weights, gradients and Adam's two moments
COPIES_PER_PARAMETER = 4
# pre-activations, latents and their gradients for one batch: the SAEs step one after another, so only one SAE's
# batch is alive at a time
BATCH_COPIES = 4
# the buffer's rows, the pool being shuffled and the rows set aside
BUFFER_COPIES = 3


def sae_bytes(cfg: TrainConfig, d_model: int) -> int:
    with torch.device("meta"):  # every architecture's own parameters (a skip transcoder's W_skip too), unallocated
        n_parameters = sum(parameter.numel() for parameter in build_sae(cfg.sae, d_model).parameters())
    return n_parameters * FLOAT_BYTES * COPIES_PER_PARAMETER


def free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return psutil.virtual_memory().available


def check_fits(configs: list[TrainConfig], d_model: int, n_layers: int) -> None:
    first = configs[0]
    per_sae = [sae_bytes(cfg, d_model) for cfg in configs]
    batch = max(first.batch_size * cfg.sae.width(d_model) for cfg in configs) * FLOAT_BYTES * BATCH_COPIES
    buffer = first.buffer_tokens * n_layers * d_model * FLOAT_BYTES * BUFFER_COPIES
    on_device = first.device != "cpu"
    # Under torchrun the ranks of one machine share its host memory; each has its own GPU.
    free = free_bytes(first.device) // (1 if on_device else distributed.ranks().local_world)
    need = sum(per_sae) + batch + (0 if on_device else buffer)
    if need <= free:
        return
    fit = 0
    while fit < len(per_sae) and sum(per_sae[: fit + 1]) + batch + (0 if on_device else buffer) <= free:
        fit += 1
    where = first.device if on_device else "host"
    if distributed.ranks().distributed:
        where = f"rank {distributed.ranks().rank}'s {where}"
    raise UserError(f"{len(configs)} SAE(s) need ~{need / GIB:.1f} GiB of {where} memory but {free / GIB:.1f} GiB "
                    f"is free: at most {fit} fit at once; split the grid or lower expansion / batch_size")
