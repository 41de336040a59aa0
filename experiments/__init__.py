"""Experiments: one script per figure or table, each runnable alone, all run by
``python -m experiments``.

Convention every script follows (and ``experiments/validation.py``, when present, too):

* it is a module ``experiments/<name>.py`` with a function
  ``main(results_dir: Path, quick: bool | None = None) -> list[Section]`` (``quick`` may be
  left out of the signature; ``python -m experiments`` passes it only to functions that take it);
* it writes its figures (PNG) and the CSV data behind each figure or table into ``results_dir``,
  every file atomically (:mod:`iosim.results`), and names them after itself
  (``roofline_a100-40gb.png``, ``roofline_points.csv``);
* it returns report sections: :class:`Section` objects (a title, a markdown body with the
  tables, the figures and data files to link), or plain markdown strings;
* ``quick`` (default: the ``IOSIM_QUICK`` environment variable, ``1`` = on) runs a reduced
  setting in seconds — the same code path and outputs, smaller shapes — for the smoke tests;
* run alone as ``python -m experiments.<name> [results_dir] [--quick]`` (default ``results/``).

``python -m experiments [results_dir] [--quick] [--only name ...]`` runs every script in
:data:`SCRIPTS` order, then ``experiments/validation.py`` if it exists, and writes
``results_dir/report.md`` with every section, table and figure link.
"""
from ._common import Section, is_quick

#: The experiment scripts, in report order.
SCRIPTS = ("figure2_table", "figure2_blocksize", "sram_sweep", "seq_len_sweep",
           "backward_tradeoff", "inference", "roofline", "timeline", "design_space")

__all__ = ["SCRIPTS", "Section", "is_quick"]
