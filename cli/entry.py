"""The console scripts' entry points: Ctrl-C is handled from the first moment on.

The scripts import these tiny functions first, so an interrupt while click, numpy or torch are
still being imported ends the program with ``Aborted`` and exit code 130 instead of a traceback
(or a crash of a half-imported extension). Once a command runs, ``CommandGroup`` takes over and
lets the interrupt unwind, so files being written are discarded on the way out.
"""

from __future__ import annotations

import os
import signal


def _abort(signum, frame) -> None:
    os.write(2, b"Aborted\n")
    os._exit(130)


def imagefolder() -> None:
    signal.signal(signal.SIGINT, _abort)
    from imagefolder.cli.main import main

    main()


def imagefolder_export() -> None:
    signal.signal(signal.SIGINT, _abort)
    from imagefolder.cli.export import main

    main()
