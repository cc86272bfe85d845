import logging

import dask.array as da

from tme_pipeline.progress import progress


def test_progress_is_logged(caplog):
    x = da.ones((40, 40), chunks=4)
    with caplog.at_level(logging.INFO, logger="tme_pipeline.progress"):
        with progress("summing", every_s=0.0):
            assert int(x.sum().compute(scheduler="threads")) == 1600
    messages = [r.getMessage() for r in caplog.records]
    assert messages and all(m.startswith("summing: ") for m in messages)
    assert any("tasks)" in m for m in messages)
