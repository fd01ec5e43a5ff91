"""The torch side, by job: :mod:`.capture` (recording a running model), :mod:`.models`
(loading it, its dtype policy, its inputs), :mod:`.run` (``precision capture`` end to end)
and :mod:`.devices` (the device registry).
"""
