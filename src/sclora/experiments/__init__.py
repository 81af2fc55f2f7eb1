"""The paper-reproduction kit: everything the SC-LoRA paper's experiments need that the library does not.

    pip install "sclora[experiments]"      # adds rouge-score, math-verify, matplotlib

- ``data``, ``hub_data``, ``templates``: the data catalogue (pinned PyPI wheels checked by sha256, the paper's
  hub sets, GSM-Symbolic templates);
- ``align``: the safety-alignment stage that stands in for a chat model's own alignment;
- ``evaluate``: generation, scorers, judges, the metric registry and ``evaluate_model``, the one evaluation path;
- ``suites``: ``sclora eval`` — the paper's four suites as fixed sets of registered evaluations;
- ``runner``: ``sclora run`` — one YAML config -> statistics -> inits -> training -> evaluation -> results table;
- ``report``: paper-style tables, claim checks and figures from a results folder.

The library (``sclora`` outside this package) never imports it (an import-linter contract in ``make test``).
"""
