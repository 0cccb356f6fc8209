"""``dms mine ... --report``: one self-contained HTML page about a mining job.

The page works offline: every figure is matplotlib's SVG, inlined; the style sheet
is inline; nothing is fetched (no script, font or image from anywhere). The data
behind the figures is embedded too, as JSON in ``<script type="application/json"
id="report-data">``, so a reader (or a test) can check what is drawn.

Sections: the clusters in 2-D (PCA) beside the plaintext baseline, convergence
per round, time per phase and per round, placement (peers and MB), the confusion
matrix (k-NN with true labels), and what each party learned (``dms.mining.learned``).

``data`` computes what is shown, ``figures`` draws it (matplotlib, loaded only
here), ``page`` fills the jinja2 template ``templates/report.html.j2``.
"""

from dms.report.data import ReportInput, confusion, pca_2d, report_data
from dms.report.page import REPORT_FILE, SECTIONS, render, write_report

__all__ = [
    "REPORT_FILE",
    "SECTIONS",
    "ReportInput",
    "confusion",
    "pca_2d",
    "render",
    "report_data",
    "write_report",
]
