"""The paper's analyses (SimPropNet §3.1 premise validation), each run by a DVC stage.

* :mod:`~simprop.analysis.background_similarity` - Figure 3: cosine similarity of foreground
  and of background MAP vectors of same-class image pairs, per class.
* :mod:`~simprop.analysis.error_similarity` - "similarity of mispredicted regions": the ratio
  (Ze(A).Ze(B)) / (Zg(A).Zg(B)) over same-class test pairs, with a trained model's errors.
* :mod:`~simprop.analysis.error_overlap` - Table 1: FN overlap, FP overlap and TP gap between a
  few-shot model and a supervised segmentation model (torchvision DeepLabV3).

Each module has a ``run_*`` function returning a JSON-ready result and a ``write_*`` function
writing the metrics file and the report files; the stages in ``stages/analysis_*.py`` call them
and log to MLflow.
"""
