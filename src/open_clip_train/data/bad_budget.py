"""How many bad samples a run tolerates (`--max-bad-samples-fraction`): training counts each
epoch's replaced samples on every rank and stops as soon as the epoch is certain to exceed the
fraction; evaluation leaves bad images out and refuses a set with too many of them."""
from __future__ import annotations

import logging

from .. import distributed as dist_env
from ..errors import UserError, flag
from .bad_samples import BadTally, bad_of


class BadSampleBudget:
    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction
        self.local = BadTally()  # this rank's bad samples in the current epoch
        self.total = 0  # all ranks' count, summed step by step

    def new_epoch(self) -> None:
        self.local, self.total = BadTally(), 0

    def add_batches(self, batches) -> int:
        """This rank's bad samples of one step's batches; returns how many (for the step's all-reduce)."""
        bad = [x for batch in batches for x in bad_of(batch)]
        self.local.add(bad)
        return len(bad)

    def over_ranks(self) -> BadTally:
        parts = dist_env.all_gather_object(self.local)
        return parts[0].merge(parts[1:])

    def check(self, step_total: int, epoch_samples: int, epoch_name: str) -> None:
        """Add the step's bad samples (summed over ranks) and stop once they exceed the allowed
        fraction of the whole epoch (certain to be exceeded by its end), so a broken dataset
        wastes little time."""
        self.total += step_total
        if self.total > self.max_fraction * epoch_samples:
            message = (f"bad training data: {self.over_ranks().describe()} so far in {epoch_name}, more than "
                       f"{flag('max_bad_samples_fraction')} {self.max_fraction:g} of its "
                       f"{epoch_samples} samples; fix or remove them, or raise the limit")
            logging.error(message)
            raise UserError(message)

    def check_eval(self, epoch: int, dropped: BadTally, bad: BadTally, num_images: int) -> None:
        """Bad evaluation images (left out of the metrics; `bad` on this rank) and entries dropped
        at load: logged, and a user error past the fraction of the evaluation set."""
        tally = dropped.merge(dist_env.all_gather_object(bad))
        if not tally.total:
            return
        entries = num_images + dropped.total
        logging.warning(f"Eval Epoch: {epoch} left out {tally.describe(of=entries)}")
        if tally.total > self.max_fraction * entries:
            raise UserError(f"bad evaluation data: {tally.describe(of=entries)}, more than "
                            f"{flag('max_bad_samples_fraction')} {self.max_fraction:g}; fix or remove them, or raise the limit")
