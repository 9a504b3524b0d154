"""Dask clusters for the extraction stages: an existing scheduler, or a local cluster of single-threaded processes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def dask_client(workers: int, scheduler_address: str | None = None) -> Iterator[Any]:
    """A client of `scheduler_address`, or of a local cluster of `workers` processes with one thread each."""
    from dask.distributed import Client, LocalCluster

    if scheduler_address:
        with Client(scheduler_address) as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
