"""The graders: one pytest file per chapter, ``test_chN.py``, marked with points, hints and time limits."""
