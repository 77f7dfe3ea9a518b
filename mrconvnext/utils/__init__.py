"""Training, evaluation, checkpoint and export helpers shared by the tools (``python -m mrconvnext.<tool>``)."""
