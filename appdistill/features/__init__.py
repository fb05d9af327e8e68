"""Feature specs, tables, vocabularies and batches (the first stage of the data flow)."""

from appdistill.features.batch import Batch, BatchBuilder, BatchLoader, TeacherOutput
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpec, FeatureSpecSet

__all__ = ["Batch", "BatchBuilder", "BatchLoader", "Dataset", "FeatureSpec", "FeatureSpecSet", "TeacherOutput"]
