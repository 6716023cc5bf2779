"""What the libraries print that a command's user need not read in every stage: one progress bar per stage is the
command's own, so diffusers' and transformers' loading bars ("Loading pipeline components", "Loading weights",
"Writing model shards") are off; CLIP's truncation warning, which quotes the whole cut-off text of every long prompt
of every batch, is said once and shortened; warnings that every evaluation raised and no user can act on are hidden
(pyarrow's ``null_placement`` deprecation inside datasets, scipy's singular-matrix note inside clean-fid's FID, whose
result is the same number either way). Called by :func:`distill.core.config.run_cli` for every command.
"""

from __future__ import annotations

import logging
import sys
import warnings

TRUNCATED = "The following part of your input was truncated"
SAID_ONCE = " ... (said once: every prompt longer than the text encoder's limit is cut the same way)"


class _TruncationOnce(logging.Filter):
    """Lets the first truncation warning through, cut to a line's length; drops the rest."""

    def __init__(self):
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(TRUNCATED):
            return True
        if self.said:
            return False
        self.said = True
        record.msg, record.args = record.getMessage()[:240] + SAID_ONCE, ()
        return True


_FILTER = _TruncationOnce()


def quiet_libraries() -> None:
    """Apply the above for a command that works with models (it imported torch, or the libraries themselves, before its
    main runs); one that did not, such as a ``--help`` of a light command, imports nothing here and stays fast."""
    warnings.filterwarnings(
        "ignore", message="Specifying null_placement in SortOptions is deprecated", category=FutureWarning
    )
    warnings.filterwarnings("ignore", message="Matrix is singular and may not have a square root")
    for library in ("diffusers", "transformers"):
        if library not in sys.modules and "torch" not in sys.modules:
            continue
        library_logging = __import__(f"{library}.utils.logging", fromlist=["logging"])
        library_logging.disable_progress_bar()
        for (
            handler
        ) in library_logging.get_logger().handlers:  # the library's own handler: every module's records pass it
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
