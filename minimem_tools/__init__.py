"""The tooling that runs the minimem course; the library it runs is :mod:`minimem`.

``minimem <command>`` (:mod:`minimem_tools.cli`) dispatches to one module per command:
``train`` (:mod:`minimem_tools.train`), ``bench`` (:mod:`minimem_tools.bench`: scripts that print
ratios), ``experiment`` (:mod:`minimem_tools.experiments`: the runs behind the claims table),
``grade`` (:mod:`minimem_tools.grading`) and ``doctor``; :mod:`minimem_tools.bookbuild` builds the
book. Everything here depends on :mod:`minimem`, never the other way round (tests/test_layout.py).
"""
