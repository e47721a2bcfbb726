"""Fit one concept-aligned MIL head on bags, with early stopping.

The risk head is a sigmoid over one logit trained with a positive-class
weighted binary cross-entropy. The site head is a softmax trained with a
class-weighted cross-entropy. Both weight the classes by inverse frequency,
so a rare site weighs as much in the loss as a common one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from histomet.models.concepts import ConceptBank
from histomet.models.mil import ConceptMIL
from histomet.models.mil import MILConfig
from histomet.train.dataset import Bag
from histomet.train.dataset import pad_bags

__all__ = ["FitConfig", "FitResult", "class_weights", "fit_head", "predict_bags"]

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    """Optimiser and stopping settings of one head."""

    learning_rate: float = 5e-4
    weight_decay: float = 1e-4
    batch_size: int = 8
    max_epochs: int = 100
    patience: int = 10
    max_train_instances: int = 4096
    # A torch device string such as "cpu" or "cuda:0". Bags stay on the CPU
    # and move to the device one padded batch at a time.
    # NOTE: only "cpu" is exercised by the tests; no GPU run has been made.
    device: str = "cpu"


@dataclass
class FitResult:
    """A fitted head and its training history."""

    model: ConceptMIL
    best_epoch: int
    epochs_run: int
    stop_losses: list[float]


def class_weights(targets: np.ndarray, n_classes: int) -> torch.Tensor:
    """Return inverse-frequency weights ``n / (n_classes * count)`` per class.

    A class absent from ``targets`` gets weight 0, since no sample carries it.
    """
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    weights = np.zeros(n_classes)
    present = counts > 0
    weights[present] = targets.size / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def _loss(
    model: ConceptMIL,
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    if model.config.output == "sigmoid":
        # weights = [negative, positive]: BCE with the ratio as pos_weight.
        pos_weight = weights[1] / weights[0]
        return F.binary_cross_entropy_with_logits(
            logits[:, 0], targets.float(), pos_weight=pos_weight
        )
    return F.cross_entropy(logits, targets, weight=weights)


def _mean_loss(
    model: ConceptMIL,
    bags: Sequence[Bag],
    targets: np.ndarray,
    weights: torch.Tensor,
    batch_size: int,
    device: str,
) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(bags), batch_size):
            chunk = bags[start : start + batch_size]
            embedding, projected, mask = pad_bags(chunk)
            logits, _ = model.batch_logits(
                embedding.to(device), projected.to(device), mask.to(device)
            )
            target = torch.from_numpy(targets[start : start + batch_size]).to(device)
            total += float(_loss(model, logits, target, weights)) * len(chunk)
    return total / len(bags)


def _train_epoch(
    model: ConceptMIL,
    optimiser: torch.optim.Optimizer,
    bags: Sequence[Bag],
    targets: np.ndarray,
    weights: torch.Tensor,
    config: FitConfig,
    rng: np.random.Generator,
) -> None:
    model.train()
    order = rng.permutation(len(bags))
    for start in range(0, len(order), config.batch_size):
        index = order[start : start + config.batch_size]
        embedding, projected, mask = pad_bags(
            [bags[i] for i in index], config.max_train_instances, rng
        )
        logits, _ = model.batch_logits(
            embedding.to(config.device),
            projected.to(config.device),
            mask.to(config.device),
        )
        target = torch.from_numpy(targets[index]).to(config.device)
        loss = _loss(model, logits, target, weights)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def fit_head(
    mil_config: MILConfig,
    concept_bank: ConceptBank,
    bags: Sequence[Bag],
    targets: np.ndarray,
    config: FitConfig,
    *,
    seed: int,
    stop_bags: Sequence[Bag] | None = None,
    stop_targets: np.ndarray | None = None,
    epochs: int | None = None,
) -> FitResult:
    """Fit a fresh head on ``bags`` with integer ``targets``.

    With ``stop_bags``, training stops after ``config.patience`` epochs
    without a lower loss on them and the best epoch's weights are returned.
    Without them it runs exactly ``epochs`` epochs. The class weights come
    from ``targets`` and are used in both losses. Torch and numpy draws are
    seeded from ``seed``, so one seed and one torch build give one result.
    """
    if (stop_bags is None) == (epochs is None):
        raise ValueError("give either stop_bags or epochs")
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConceptMIL(mil_config, copy.deepcopy(concept_bank))
        model.to(config.device)
        n_classes = max(2, mil_config.n_outputs)
        weights = class_weights(targets, n_classes).to(config.device)
        optimiser = torch.optim.AdamW(
            model.parameters(),
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        if epochs is not None:
            for _ in range(epochs):
                _train_epoch(model, optimiser, bags, targets, weights, config, rng)
            return FitResult(model.cpu().eval(), epochs, epochs, [])

        assert stop_targets is not None
        best_loss = float("inf")
        best_state = copy.deepcopy(model.state_dict())
        best_epoch = 0
        losses: list[float] = []
        for epoch in range(1, config.max_epochs + 1):
            _train_epoch(model, optimiser, bags, targets, weights, config, rng)
            loss = _mean_loss(
                model,
                stop_bags,
                stop_targets,
                weights,
                config.batch_size,
                config.device,
            )
            losses.append(loss)
            if loss < best_loss:
                best_loss, best_epoch = loss, epoch
                best_state = copy.deepcopy(model.state_dict())
            elif epoch - best_epoch >= config.patience:
                break
        model.load_state_dict(best_state)
        _LOGGER.debug(
            "fitted %s head: best epoch %d of %d, loss %.4f",
            mil_config.output,
            best_epoch,
            len(losses),
            best_loss,
        )
        return FitResult(model.cpu().eval(), best_epoch, len(losses), losses)


def predict_bags(model: ConceptMIL, bags: Sequence[Bag]) -> np.ndarray:
    """Return probabilities ``[n_bags, n_outputs]``, each bag pooled whole."""
    model.eval()
    with torch.no_grad():
        rows = [model(bag.embedding, bag.projected).probabilities for bag in bags]
    return torch.stack(rows).numpy().astype(np.float64)
