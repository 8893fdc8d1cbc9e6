"""metrics.jsonl, one line per logged step, and optionally the same records to Weights & Biases."""

import json
from pathlib import Path

from instructsae.errors import UserError
from instructsae.fileio import write_text_atomically
from instructsae.schemas.train import TrainConfig


class MetricsLog:
    def __init__(self, path: Path, cfg: TrainConfig, name: str, keep_before_step: int | None = None):
        if keep_before_step is not None:  # a resumed run drops what was logged after its checkpoint
            kept = [record for record in self.read(path) if record["step"] < keep_before_step]
            write_text_atomically(path, "".join(json.dumps(record) + "\n" for record in kept))
        self.file = open(path, "a")
        self.wandb_run = _start_wandb(cfg, name) if cfg.wandb else None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    @staticmethod
    def read(path: Path) -> list[dict]:
        """The records; a torn last line (the run was killed while writing it) is left out."""
        if not path.is_file():
            return []
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise UserError(f"{path} line {number} is not JSON: the metrics log is damaged") from None
        return records


def _start_wandb(cfg: TrainConfig, name: str):
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install 'instructsae[wandb]'") from None
    # one W&B run per SAE, several open at once in a sweep
    return wandb.init(project=cfg.wandb_project, name=name, config=cfg.model_dump(mode="json"),
                      reinit="create_new")
