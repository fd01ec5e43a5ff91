"""Workflows that string the commands together: run models, judge them, write the reports
(above the outputs layer, below the commands)."""
