"""Runs a torchdistill config that uses kdkernels' losses by name (kd_config.yaml beside this file).

Importing kdkernels.integrations.torchdistill registers KDKAttentionTransferLoss, KDKPixelKLLoss
and the other KDK<Loss> mid-level losses; everything else is torchdistill's own machinery: the
YAML loader builds the dataset, torchdistill's registry the models, and its DistillationBox the
hooks, the criterion, the optimiser and the steps, as in torchdistill's example scripts.
`--backend` replaces the `backend` of every KDK term (torch: kdkernels' eager reference).

Run:  python examples/torchdistill/run.py [--config kd_config.yaml] [--backend auto|torch|cpu|...]
      (needs `pip install torchdistill`; one epoch of 4 steps, a few seconds on 2 CPU cores)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchdistill.common import yaml_util
from torchdistill.core.distillation import get_distillation_box
from torchdistill.models.registry import get_model

import kdkernels.integrations.torchdistill  # noqa: F401  (registers the KDK* losses)

CONFIG = Path(__file__).with_name("kd_config.yaml")


def load_config(path=CONFIG, backend: str | None = None) -> dict:
    """The YAML through torchdistill's loader; `backend` replaces that of every KDK term."""
    config = yaml_util.load_yaml_file(str(path))
    if backend is not None:
        for term in config["train"]["criterion"]["kwargs"]["sub_terms"].values():
            if term["criterion"]["key"].startswith("KDK"):
                term["criterion"]["kwargs"]["backend"] = backend
    return config


def build(config: dict, seed: int = 0):
    """The models from torchdistill's registry and the DistillationBox (hooks, criterion,
    optimiser, data loader) from `config`, as torchdistill's example scripts build them."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = config["models"]
    teacher = get_model(models["teacher_model"]["key"], **models["teacher_model"]["kwargs"]).to(device)
    student = get_model(models["student_model"]["key"], **models["student_model"]["kwargs"]).to(device)
    return get_distillation_box(teacher, student, config["datasets"], config["train"], device,
                                device_ids=None, distributed=False, lr_factor=1)


def distil(config: dict, seed: int = 0) -> list[float]:
    """Trains for the config's epochs; returns the loss of every step."""
    box = build(config, seed)
    losses = []
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch.to(box.device), targets.to(box.device), supp_dict)
            box.post_forward_process(loss)
            losses.append(loss.item())
        box.post_epoch_process()
    return losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--backend", help="replaces the config's backend of every KDK loss")
    args = parser.parse_args(argv)
    losses = distil(load_config(args.config, args.backend))
    print("loss per step:", " ".join(f"{loss:.4f}" for loss in losses))


if __name__ == "__main__":
    main()
