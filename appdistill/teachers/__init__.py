"""Teachers of the committee, registered by name in :data:`TEACHERS`.

Importing this package registers ``lightgbm`` and ``dlrm``. Other built-in teachers
(``appdistill/teachers/<key>.py``, e.g. ``foundation`` with its encoder dependencies) are imported
on first use by :func:`~appdistill.teachers.fit.teacher_class` (``load_teacher``; the committee of a
config is fitted by ``appdistill.pipeline.fit_teachers``).
"""

from appdistill.teachers.base import Teacher, TEACHERS
from appdistill.teachers.dlrm import DLRMTeacher  # registers "dlrm"
from appdistill.teachers.fit import TeacherError, build_teacher, load_teacher, teacher_class
from appdistill.teachers.lightgbm import LightGBMTeacher  # registers "lightgbm"

__all__ = ["TEACHERS", "Teacher", "DLRMTeacher", "LightGBMTeacher", "TeacherError", "build_teacher",
           "load_teacher", "teacher_class"]
