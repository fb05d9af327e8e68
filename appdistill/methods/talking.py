"""``talking``: Talking Models (arXiv 2310.03188), interactive communication.

Student and teachers exchange messages in a shared message space ``R^{d_m}``:

* the student encodes its state: ``m_s = Enc_s(h)``;
* each differentiable teacher ``i`` decodes it into its hidden space, adds it to its cached state
  and runs its frozen head: ``r_i = H_i + Dec_i(m_s)``, answer ``[body(r_i) ; head(r_i)]``, and
  encodes the response ``m_i = Enc_i(answer)``; a teacher without a head (LightGBM) only *sends*:
  ``m_i = Enc_i(H_i)``;
* the student decodes the mean response and runs its own over-arch: ``z_int = over_arch(h + Dec_s(m̄))``.

Loss terms: ``BCE(z_s, y)``, ``BCE(z_int, y)``, message consistency ``‖Enc_s(h) − sg(m̄)‖²``,
reconstruction ``‖Dec_s(Enc_s(h)) − h‖² + Σ_i ‖Dec_i(Enc_i(answer(H_i))) − H_i‖²`` and
``T²·BCE(z_s/T, σ(sg(z_int)/T))``. Every module here is training-only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from appdistill.errors import ConfigError
from appdistill.features.batch import Batch
from appdistill.methods.base import METHODS, Method, label_bce
from appdistill.methods.committee import build_ports
from appdistill.student.model import RankingModel, StudentOutput


def _mlp(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, max(i, o)), nn.GELU(), nn.Linear(max(i, o), o))


@METHODS.register("talking")
class TalkingModels(Method):
    """Args:
        committee / student_dim: supplied by the training loop.
        teachers: committee members to talk to (default: all).
        d_m: message width.
        lambda_int, lambda_msg, lambda_rec, lambda_kd: weights of the interaction BCE, message
            consistency, reconstruction and KD terms.
        temperature: KD temperature.
        taps / leaf_dim / leaf_trees: which hidden taps to talk through; GBDT leaf-embedding width and
            trees (evenly spaced) in the leaf state (:class:`~appdistill.methods.committee.TeacherPort`).
    """

    grid = {"lambda_kd": [0.5, 2.0], "lambda_int": [0.5, 1.0]}

    kwarg_ranges = {"d_m": {"ge": 1, "le": 4096}, "lambda_int": {"ge": 0}, "lambda_msg": {"ge": 0},
                    "lambda_rec": {"ge": 0}, "lambda_kd": {"ge": 0}, "temperature": {"gt": 0, "le": 100},
                    "leaf_dim": {"ge": 1, "le": 4096}, "leaf_trees": {"ge": 1}}

    @classmethod
    def reads_hidden(cls, kwargs: dict[str, Any]) -> bool:
        return True  # messages go through every teacher's hidden tap

    def __init__(self, committee: dict[str, Any] | None = None, student_dim: int = 0,
                 teachers: list[str] | None = None, d_m: int = 32, lambda_int: float = 1.0,
                 lambda_msg: float = 0.1, lambda_rec: float = 0.1, lambda_kd: float = 0.5,
                 temperature: float = 1.0, taps: dict[str, str] | None = None, leaf_dim: int = 32,
                 leaf_trees: int | None = 32) -> None:
        super().__init__(committee)
        if student_dim <= 0:
            raise ConfigError("talking: student_dim must be supplied (the width of h)")
        self.names = self.pick(teachers)
        self.requires = tuple(self.names)
        self.ports = build_ports(committee or {}, self.names, taps, leaf_dim, leaf_trees)
        self.enc_s, self.dec_s = _mlp(student_dim, d_m), _mlp(d_m, student_dim)
        self.enc = nn.ModuleDict({n: _mlp(p.answer_dim if p.has_head else p.dim, d_m) for n, p in self.ports.items()})
        self.dec = nn.ModuleDict({n: _mlp(d_m, p.dim) for n, p in self.ports.items() if p.has_head})
        self.l_int, self.l_msg, self.l_rec, self.l_kd, self.T = lambda_int, lambda_msg, lambda_rec, lambda_kd, temperature

    def forward(self, out: StudentOutput, batch: Batch, model: RankingModel) -> dict[str, torch.Tensor]:
        h, z_s, y = out.h, out.logits, batch.labels
        m_s = self.enc_s(h)
        msgs, rec = [], self.l_rec * F.mse_loss(self.dec_s(m_s), h.detach())
        for n, port in self.ports.items():
            H = port.state(batch)
            if port.has_head:
                msgs.append(self.enc[n](port.answer(H + self.dec[n](m_s))))
                rec = rec + self.l_rec * F.mse_loss(self.dec[n](self.enc[n](port.answer(H))), H.detach())
            else:
                msgs.append(self.enc[n](H))  # send-only teacher
        m_bar = torch.stack(msgs).mean(0)
        z_int = model.over_arch(h + self.dec_s(m_bar))
        return {
            "bce": label_bce(z_s, y),
            "bce_interaction": self.l_int * label_bce(z_int, y),
            "message": self.l_msg * F.mse_loss(m_s, m_bar.detach()),
            "reconstruction": rec,
            "kd_interaction": self.l_kd * self.T ** 2 * F.binary_cross_entropy_with_logits(
                z_s / self.T, torch.sigmoid(z_int.detach() / self.T)),
        }
