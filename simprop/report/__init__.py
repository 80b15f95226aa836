"""The report stage: the paper's Tables 3, 4 and 5 beside our numbers, figures and a summary metric.

* :mod:`simprop.report.results`   load the metrics files of every (variant, fold) in params
* :mod:`simprop.report.tables`    rows of Tables 3-5 and of the support-use controls; the CSVs
* :mod:`simprop.report.markdown`  ``reports/tables.md``: header, tables, controls, training, analyses
* :mod:`simprop.report.figures`   per-class IoU, training curves, qualitative montage
* :mod:`simprop.report.build`     ``build_report``: the entry point, and ``metrics/report.json``
"""
