"""mAP(L) (SPEC §5.5): how well a student's full ranking recovers the teacher's top-L.

For one query, the positives are the teacher's first L items; the student's ranking of every
item is scored by average precision, AP = (1/L) Σ_j j / rank(j-th positive in the student's
ranking), ranks from 1 (sklearn's average_precision_score on binary labels, which the
released code uses). Reported as mean ± standard error over queries.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def average_precision_at(student_ranking: np.ndarray, teacher_ranking: np.ndarray,
                         top_l: int) -> float:
  """AP of the teacher's top-`top_l` within the student's full ranking (both item ids)."""
  student_ranking = np.asarray(student_ranking)
  teacher_ranking = np.asarray(teacher_ranking)
  if not 1 <= top_l <= teacher_ranking.size:
    raise ValueError(f"L = {top_l} must lie in [1, {teacher_ranking.size}] (the teacher ranks "
                     f"{teacher_ranking.size} items)")
  if np.unique(student_ranking).size != student_ranking.size:
    raise ValueError("the student's ranking repeats items")
  positives = teacher_ranking[:top_l]
  ranks = np.flatnonzero(np.isin(student_ranking, positives)) + 1
  if ranks.size != top_l:
    raise ValueError(f"the student's ranking ({student_ranking.size} items) misses "
                     f"{top_l - ranks.size} of the teacher's top-{top_l}: rank every item")
  return float(np.mean(np.arange(1, top_l + 1) / ranks))


def map_at(student_rankings: Sequence[np.ndarray], teacher_rankings: Sequence[np.ndarray],
           top_l: int) -> tuple[float, float]:
  """(mean, standard error) of AP over queries; s.e. = std (ddof 1) / sqrt(n), 0 for n = 1."""
  if len(student_rankings) != len(teacher_rankings) or not len(student_rankings):
    raise ValueError(f"{len(student_rankings)} student rankings for {len(teacher_rankings)} "
                     "teacher rankings (need the same positive number)")
  ap = np.array([average_precision_at(s, t, top_l)
                 for s, t in zip(student_rankings, teacher_rankings)])
  se = float(ap.std(ddof=1) / np.sqrt(ap.size)) if ap.size > 1 else 0.0
  return float(ap.mean()), se


def scaled_l(paper_l: Sequence[int], num_items: int, paper_items: int = 118_287) -> list[int]:
  """The paper's L (500 / 1,000 / 4,000 of MSCOCO's 118,287) at the same fraction of
  `num_items`, at least 1 each."""
  return [max(1, int(round(l * num_items / paper_items))) for l in paper_l]
