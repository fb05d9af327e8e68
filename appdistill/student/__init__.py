"""The student ranking model (TorchRec)."""
from appdistill.student.model import RankingModel, StudentConfig, StudentOutput, build_student

__all__ = ["RankingModel", "StudentConfig", "StudentOutput", "build_student"]
