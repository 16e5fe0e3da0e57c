"""The data layer: Amazon Reviews 2018 / 2023 logs to clean Parquet tables, splits and
evaluation candidates (`prepare`), a generated dataset in the 2018 format (`synth`), and the
reader of a prepared directory (`load_prepared`)."""

from instructrec.training.data.errors import (
    DataError, EmptyResultError, FormatDetectionError, MalformedLineError)
from instructrec.training.data.pipeline import (
    CANDIDATES_SCHEMA, INTERACTIONS_SCHEMA, ITEMS_SCHEMA, SEARCH_SPLITS_SCHEMA, PreparedData,
    load_prepared, prepare)
from instructrec.training.data.synth import synth

__all__ = [
    "prepare", "synth", "load_prepared", "PreparedData",
    "ITEMS_SCHEMA", "INTERACTIONS_SCHEMA", "SEARCH_SPLITS_SCHEMA", "CANDIDATES_SCHEMA",
    "DataError", "EmptyResultError", "FormatDetectionError", "MalformedLineError",
]
