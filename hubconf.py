"""torch.hub entry points: ``torch.hub.load(repo_dir, 'mrconvnext_tiny', source='local', pretrained=False)``.

One entry point per model this package registers with timm (MRConvNeXt and the sequence models); each
forwards its keyword arguments to ``timm.create_model``, so ``pretrained=True`` takes timm's weight
path (and, while no weights are published, the same error).
"""

import timm
from timm.models import model_entrypoint

import mrconvnext  # noqa: F401  (registers the models with timm)

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]


def _entrypoint(model_name: str):
    def create(pretrained: bool = False, **kwargs):
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)

    create.__name__ = model_name
    create.__doc__ = f"timm.create_model({model_name!r}, pretrained=pretrained, **kwargs)"
    return create


MODEL_NAMES = [name for name in timm.list_models() if model_entrypoint(name).__module__.startswith("mrconvnext.")]
globals().update({name: _entrypoint(name) for name in MODEL_NAMES})
