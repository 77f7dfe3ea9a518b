"""torch.hub entry points: ``torch.hub.load(repo_dir, 'mrconvnext_tiny', source='local', pretrained=False)``.

Each entry point forwards its keyword arguments to ``timm.create_model``; ``pretrained=True`` takes the
same weight path (and the same error while no weights are published) as timm.
"""

import timm

import mrconvnext  # noqa: F401  (registers the models with timm)

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]


def _entrypoint(model_name: str):
    def create(pretrained: bool = False, **kwargs):
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)

    create.__name__ = model_name
    create.__doc__ = f"timm.create_model({model_name!r}, pretrained=pretrained, **kwargs)"
    return create


mrconvnext_atto = _entrypoint("mrconvnext_atto")
mrconvnext_nano = _entrypoint("mrconvnext_nano")
mrconvnext_tiny = _entrypoint("mrconvnext_tiny")
mrconvnext_small = _entrypoint("mrconvnext_small")
mrconvnext_base = _entrypoint("mrconvnext_base")
