"""The benchmark suite: ``python -m bench`` (``make bench``), and standalone scripts for earlier issues.

Every benchmark here measures side by side in one run, interleaved, and reports ratios and multiples
of the machine's floor calibrated in the same run: the machine is shared and its processor changes
between sessions, so absolute times drift. Modules: ``cost`` (FLOPs and bytes of each graph),
``calibrate`` (the floor), ``machine`` (what it ran on), ``bundles`` (models and bundles, reused),
``timing`` (interleaved measurement), ``budget``, ``context``, ``report``, ``figures``, and ``jobs/``.
"""
