"""Which parameters of a model are weights to decay: shared by ``thalweg.create`` and Muon's router."""

from __future__ import annotations

from torch import nn

# Biases and the gains/shifts of normalisation layers (all the 1-d and 0-d parameters) and embedding
# tables are not weights to shrink: decaying them towards zero, or rescaling their step by ‖w‖/‖g‖,
# hurts (You et al. 2017 and 2019 exclude them; so do BERT and timm).
_NO_DECAY_LAYERS = (nn.Embedding, nn.EmbeddingBag)


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that should get no weight decay and no trust ratio: biases (and any other
    1-d or 0-d parameter), normalisation layers and embeddings."""
    skipped = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, _NO_DECAY_LAYERS) or param.ndim <= 1:
                skipped.add(full_name)
    return skipped
