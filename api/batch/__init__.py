"""Many requests at once, in-process: ``python -m api.batch INPUT OUTPUT`` (``./manage.sh batch``).

:mod:`api.batch.formats` reads and writes the files (no engine), :mod:`api.batch.runner` runs
rows through a :class:`~api.serving.Serving` at full batch width, :mod:`api.batch.__main__` is
the command line.
"""

from api.batch.formats import BatchRow, RowResult
from api.batch.runner import BatchAborted, BatchStats, run_batch

__all__ = ["BatchAborted", "BatchRow", "BatchStats", "RowResult", "run_batch"]
