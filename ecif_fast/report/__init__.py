"""Self-contained HTML reports: plots (inline SVG), thumbnails (data URIs), tables, summary.json.

Needs matplotlib and pandas (``pip install "ecif-fast[report]"``); pyarrow for Parquet tables. They
are imported only when a report is rendered, so importing this package needs neither.
"""
from __future__ import annotations

from .html import render_report, write_report
from .images import to_png_data_uri
from .output import OutputLocationError, atomic_output_dir, atomic_output_file, is_output_dir, write_table
from .plots import influence_histogram, precision_at_k_plot, precision_curve, roc_curve, roc_plot

__all__ = ["OutputLocationError", "atomic_output_dir", "atomic_output_file", "influence_histogram",
           "is_output_dir", "precision_at_k_plot", "precision_curve", "render_report", "roc_curve", "roc_plot",
           "to_png_data_uri", "write_report", "write_table"]
