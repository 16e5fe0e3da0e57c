"""Classic baselines scored on the data layer's stored candidate lists: popularity, SASRec,
BERT4Rec, a DSSM-style two-tower retriever (product search, hard negatives) and TEM-style
personalized search. See README.md beside this file for the interface and the tuning grids."""

from instructrec.training.baselines.common import (
    FitReport, ItemCatalog, LabeledRequest, RankingRequest, TrainingData, evaluate,
)
from instructrec.training.baselines.popularity import Popularity
from instructrec.training.baselines.prepared import PreparedBaselineData, load_prepared
from instructrec.training.baselines.sequential import BERT4Rec, SASRec, SequentialConfig
from instructrec.training.baselines.tem import TEM, TEMConfig
from instructrec.training.baselines.tuning import TuningResult, grid_points, tune
from instructrec.training.baselines.two_tower import (
    TwoTowerConfig, TwoTowerRetriever, category_queries, retrieve_hard_negatives,
)

__all__ = [
    "BERT4Rec", "FitReport", "ItemCatalog", "LabeledRequest", "Popularity", "PreparedBaselineData",
    "RankingRequest", "SASRec", "SequentialConfig", "TEM", "TEMConfig", "TrainingData", "TuningResult",
    "TwoTowerConfig", "TwoTowerRetriever", "category_queries", "evaluate", "grid_points",
    "load_prepared", "retrieve_hard_negatives", "tune",
]
