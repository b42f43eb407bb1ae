"""The paper's downstream experiments (Sec. 5, appendix A.2-A.4): OOD detection, imputation, KNN.

One module per task (:mod:`.ood`, :mod:`.imputation`, :mod:`.knn`), the metrics (:mod:`.metrics`),
the runs they train or reuse (:mod:`.runs`), the imputation classifier (:mod:`.classifier`), the
output folder (:mod:`.report`) and the command (:mod:`.cli`, ``python -m minilae.experiments``).
"""
