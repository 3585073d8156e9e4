"""Self-supervised learning from unlabelled scans: the data-path pieces of the ``restore`` and
``contrastive`` task kinds (corruptions to undo, paired views to match)."""
