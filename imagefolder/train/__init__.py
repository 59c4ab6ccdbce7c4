"""Training: datasets in ``imagefolder.data``; tokenizer, generator and classifier trainers here.

Import the submodules directly (``imagefolder.train.tokenizer`` and so on); this package imports
nothing at import time, so ``imagefolder`` stays cheap to import.
"""
