"""The suite's jobs, one module each: ``run(ctx) -> JobResult`` (see ``bench/__main__.py``)."""
