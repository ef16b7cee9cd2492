"""What every stage shares, one concern a module.

``device``      where tensors live: device, AMP, channels-last, DDP wrapping
``rng``         seeds and RNG state (what makes resume exact)
``runs``        run folders, resume checks, ``config.yaml`` and ``metrics.jsonl``
``evaluation``  no-grad passes: accuracy and loss, or logits
``optim``       optimizers and per-step schedulers from timm's factories
``progress``    rank 0's console, progress bars, throughput
``interrupt``   Ctrl-C / SIGTERM as a request to stop after a checkpoint
``stage``       the skeleton that ``train-large`` and ``distill`` share
"""
