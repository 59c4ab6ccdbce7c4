"""polygraphy's logger, quiet unless ours is verbose.

polygraphy logs every activation, inference and comparison to stdout, which would bury the check's
table. ``following_our_logging()`` lowers its threshold to INFO when imagefolder logs at DEBUG
(``-vv``) and otherwise lets through nothing: a failure still surfaces, because polygraphy raises
(``PolygraphyException``) where it logs a critical message. The previous threshold is restored on
exit. Imports polygraphy only when entered.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

log = logging.getLogger("imagefolder")


@contextlib.contextmanager
def following_our_logging() -> Iterator[None]:
    """For the block, polygraphy logs at INFO when imagefolder logs at DEBUG, else not at all."""
    from polygraphy.logger import G_LOGGER

    severity = G_LOGGER.INFO if log.isEnabledFor(logging.DEBUG) else G_LOGGER.CRITICAL
    with G_LOGGER.verbosity(severity):
        yield
