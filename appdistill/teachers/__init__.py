"""Teachers of the committee, registered by name in :data:`TEACHERS`.

Importing this package registers ``lightgbm`` and ``dlrm``. Other built-in teachers
(``appdistill/teachers/<key>.py``, e.g. ``foundation`` with its encoder dependencies) are imported
on first use by :func:`~appdistill.teachers.fit.teacher_class` (``fit_teachers``, ``load_teacher``).
"""

from appdistill.teachers.base import TEACHERS, Teacher
from appdistill.teachers.dlrm import DLRMTeacher  # registers "dlrm"
from appdistill.teachers.fit import (TeacherError, build_teacher, fit_teachers, load_teacher,
                                     teacher_class)
from appdistill.teachers.lightgbm import LightGBMTeacher  # registers "lightgbm"

__all__ = ["TEACHERS", "Teacher", "DLRMTeacher", "LightGBMTeacher", "TeacherError", "build_teacher",
           "fit_teachers", "load_teacher", "teacher_class"]
