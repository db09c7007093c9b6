"""Real data: dataset sources, the prepared tensor store, and class-balanced partitions."""

from moedd.data.partition import Partition, check_ipc_fits, load_partition, make_partition, save_partition
from moedd.data.sources import SOURCES, DataSourceError, RawDataset, RawSplit, load_source
from moedd.data.store import Prepared, load_prepared, save_prepared

__all__ = [
    "SOURCES", "DataSourceError", "RawDataset", "RawSplit", "load_source",
    "Prepared", "load_prepared", "save_prepared",
    "Partition", "make_partition", "save_partition", "load_partition", "check_ipc_fits",
]
