import dask
import dask.array as da
import pytest

from tme_pipeline.parallel import dask_scheduler


@pytest.mark.parametrize("name", ["threads", "synchronous"])
def test_local_schedulers_give_the_same_answer(name):
    x = da.arange(1000, chunks=100)
    with dask_scheduler(name, n_workers=2) as info:
        assert name in info
        assert dask.config.get("scheduler") == name
        assert int(x.sum().compute()) == 499500


def test_unknown_scheduler_refused():
    with pytest.raises(ValueError, match="unknown scheduler 'gpu-please'"):
        with dask_scheduler("gpu-please"):
            pass
