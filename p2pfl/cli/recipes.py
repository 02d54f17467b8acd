"""The learning rate and batch size the harness uses when none is given, per dataset and
model kind. A module with no imports: the argument parser states these defaults in its
help without loading the datasets' code."""

from __future__ import annotations

#: Learning rate and batch size the harness uses when none is given, per dataset (MLP/softmax
#: with plain SGD; measured with scripts/bench_accuracy.py). Small peers' shares (digits: ~180
#: samples each among 8) need small batches for enough steps per round.
RECIPES: dict[str, tuple[float, int]] = {
    "digits": (0.3, 4),
    "fashion-mnist": (0.1, 32),
    "diabetes": (0.002, 8),
}
DEFAULT_RECIPE = (0.1, 32)
#: The same for torch models, trained with SGD and momentum 0.9 (an effective step ten
#: times the learning rate), measured with scripts/bench_torch.py.
TORCH_RECIPES: dict[str, tuple[float, int]] = {
    "digits": (0.02, 8),
    "fashion-mnist": (0.01, 32),
    "diabetes": (0.001, 8),
}
DEFAULT_TORCH_RECIPE = (0.01, 32)


def recipe(spec: str, kind: str = "mlp") -> tuple[float, int]:
    """(learning rate, batch size) for ``--dataset spec`` and a model of ``kind`` when the
    user gives none."""
    name = spec.split(":", 1)[0]
    if kind == "torch":
        return TORCH_RECIPES.get(name, DEFAULT_TORCH_RECIPE)
    return RECIPES.get(name, DEFAULT_RECIPE)


def recipes_text(kind: str = "mlp") -> str:
    """``digits 0.3/4, fashion-mnist 0.1/32, ..., others 0.1/32`` (learning rate/batch)."""
    table, default = (
        (TORCH_RECIPES, DEFAULT_TORCH_RECIPE)
        if kind == "torch"
        else (
            RECIPES,
            DEFAULT_RECIPE,
        )
    )
    parts = [f"{name} {lr:g}/{batch}" for name, (lr, batch) in table.items()]
    return ", ".join([*parts, f"others {default[0]:g}/{default[1]}"])
