"""Switching a module to eval mode for a block, and back to the mode it had (no dropout while
decoding, scoring, exporting or probing, whatever the caller was doing)."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
