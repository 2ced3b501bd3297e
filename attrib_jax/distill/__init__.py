"""FastGDA (SPEC §5): AbU+ rankings distilled into an embedding, served from an index.

  student.py   the MLP shared by queries and training items, its rank loss and training
  metrics.py   mAP(L) of a student's full ranking against the teacher's top-L
  index.py     exact and ScaNN retrieval behind one `search(queries, k)`
  teacher.py   teacher data: AbU+ over a query's candidate rows, pre losses shared
"""
