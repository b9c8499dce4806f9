"""Whether a run may go on after a round: a run never ends quietly broken.

A round whose eval loss is not finite or more than :data:`GUESSING_FACTOR` times that of
guessing uniformly over the vocabulary (ln V nats a token), after which a weight is not finite or
beyond :data:`WEIGHT_LIMIT`, or in which every client sampled was dropped, stops the run
(:class:`RunDiverged`, naming the round and the likely cause). The driver checks before it
checkpoints the round, so the checkpoint on disk stays the last good round's.
"""

from __future__ import annotations

import math

import torch

from .results import RoundRecord

WEIGHT_LIMIT = 1e4  # no weight of a trained language model comes near; diverged ones reach 1e18 and beyond
GUESSING_FACTOR = 2.0  # an eval loss of 2 ln V: far worse than knowing nothing


class RunDiverged(RuntimeError):
    """The run cannot usefully go on; the message names the round and the likely cause."""


def largest_weight(model: torch.nn.Module) -> float:
    """The largest absolute value among ``model``'s floating-point parameters (inf when one is
    not finite), computed on their device with one synchronisation."""
    peaks = [p.detach().abs().amax().float() for p in model.parameters() if p.is_floating_point() and p.numel()]
    if not peaks:
        return 0.0
    peak = float(torch.stack([x.to(peaks[0].device) for x in peaks]).amax())  # amax propagates NaN
    return math.inf if math.isnan(peak) else peak


def check_round(record: RoundRecord, model: torch.nn.Module, *, lr: float | None = None, scored: bool = True,
                every_client_dropped: bool = True) -> None:
    """Raise :class:`RunDiverged` when round ``record`` (1-based in the message, as printed) left
    the run broken: a non-finite eval loss or one above :data:`GUESSING_FACTOR` · ln V (V: the
    vocabulary size in ``model.config``, when it has one), a weight of ``model`` that is not
    finite or beyond :data:`WEIGHT_LIMIT`, or every sampled client dropped. ``lr`` is local
    training's learning rate, named in the message as the likely cause. ``scored=False``: the
    round had no eval data (its eval loss is NaN by design); ``every_client_dropped=False``: a
    round that lost every client goes on (a deployment whose nodes may be away for a while)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    guessing = math.log(vocab) if isinstance(vocab, int) and vocab > 1 else math.inf
    problem = None
    if every_client_dropped and record.clients and len(record.dropped) == len(record.clients):
        problem = f"every client was dropped (clients {record.dropped}; run.log says why)"
    elif scored and not math.isfinite(record.eval_loss):
        problem = f"the eval loss is {record.eval_loss}"
    elif scored and record.eval_loss > GUESSING_FACTOR * guessing:
        problem = (f"the eval loss is {record.eval_loss:.4g}, more than {GUESSING_FACTOR:g} times that of guessing "
                   f"uniformly over the {vocab} tokens ({guessing:.2f})")
    else:
        peak = largest_weight(model)
        if not peak <= WEIGHT_LIMIT:
            problem = (f"a weight is {peak:.3g}" if math.isfinite(peak) else "a weight is not finite") + \
                      f" (a trained model's stay below {WEIGHT_LIMIT:g})"
    if problem is None:
        return
    cause = ("local training diverged: lower the learning rate"
             + (f" (lr {lr:g})" if lr is not None else "") + ", or clip the gradients (clip)")
    raise RunDiverged(f"round {record.round + 1}: {problem}; the likely cause: {cause}")
