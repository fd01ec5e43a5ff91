"""The numpy side: judging two runs in three stages, each a subpackage.

- :mod:`.lineup`: which records are the same record, and what each run computed in;
- :mod:`.measure`: the error metrics of each pair (no verdict);
- :mod:`.verdict`: the rules, against :mod:`.profiles` (what each precision costs).

The workflows on top: :mod:`.compare` (the three stages in order, giving a
:class:`~.report.Report`), :mod:`.consistency` and :mod:`.scan`. Never imports torch or
transformers: a dump taken on an NPU box is judged on a laptop.
"""
